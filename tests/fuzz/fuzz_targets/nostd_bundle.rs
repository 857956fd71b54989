//! A microcontroller's identity bundle as read from its flash partition.
//! A bundle that decodes must encode, and decode again to the same bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_protocol::bundle::Bundle;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = Bundle::decode(data) {
        let _ = bundle.leaf();
        let mut out = vec![0u8; data.len()];
        let n = bundle.encode(&mut out).expect("a decoded bundle encodes");
        assert!(Bundle::decode(&out[..n]).expect("and decodes") == bundle);
    }
});
