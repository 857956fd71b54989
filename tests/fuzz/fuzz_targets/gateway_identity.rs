//! A client certificate's DER, as the gateway reads it after the handshake:
//! the audit fields and the identity URI in the trust domain. An identity
//! that comes out must be one a client id can bind to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twofold_gateway::identity::{self, CertInfo};
use twofold_protocol::{Principal, TrustDomain};

fuzz_target!(|der: &[u8]| {
    let _ = CertInfo::from_der(der);
    let td = TrustDomain::parse("iot.example").unwrap();
    if let Ok(principal) = identity::principal(der, &td) {
        let name = match &principal {
            Principal::Device(id) => id.as_str().to_owned(),
            Principal::Service(name) => name.as_str().to_owned(),
        };
        assert!(identity::client_id_matches(&principal, &name));
    }
});
