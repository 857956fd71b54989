//! A certificate signing request from a device (PEM or DER), as
//! `provisioning sign-csr` checks it. An accepted request names the device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_protocol::{DeviceId, TrustDomain};
use twofold_provisioning::csr;

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::parse("iot.example").unwrap();
    let _ = csr::parse(data, &td, None);
    let expected = DeviceId::parse("sensor-1").unwrap();
    if let Ok(req) = csr::parse(data, &td, Some(&expected)) {
        assert_eq!(req.device_id, expected);
    }
});
