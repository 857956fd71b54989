//! Bytes from the gateway as the microcontroller agent reads them: framed,
//! decoded as MQTT 3.1.1, and a PUBLISH's payload decoded as a command
//! (whose reply, carrying up to 1 KiB of output as the agent's does, must
//! then encode and decode again).
#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_agent_nostd::mqtt::{self, Inbound};
use twofold_protocol::message::{self, Command, Reply, ReplyStatus};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(len)) = mqtt::frame_len(rest) {
        let Some(frame) = rest.get(..len) else {
            return;
        };
        rest = &rest[len..];
        if let Ok(Inbound::Publish { payload, .. }) = mqtt::decode(frame)
            && let Ok(cmd) = message::decode::<Command>(payload)
        {
            let reply = Reply {
                id: cmd.id,
                status: ReplyStatus::Ok,
                exit_code: None,
                output: &cmd.body[..cmd.body.len().min(1024)],
            };
            let mut buf = [0u8; 4096];
            let encoded = message::encode(&reply, &mut buf).expect("a reply fits");
            assert_eq!(message::decode::<Reply>(encoded).unwrap(), reply);
        }
    }
});
