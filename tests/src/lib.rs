//! End-to-end tests of Twofold: real processes, real TLS, real third-party
//! peers (mosquitto, openssl, QEMU), started by the tests on loopback.
//!
//! The cross-part suite grows here as the gateway and the agents land (the
//! end-to-end issue). Until then each part's own `tests/` folder holds its
//! process-level tests, e.g. `provisioning/tests/`.
#![forbid(unsafe_code)]
