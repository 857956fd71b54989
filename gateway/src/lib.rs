//! The Twofold gateway: terminates mutual TLS, binds each MQTT session to the
//! identity in the client certificate, enforces topic policy and relays
//! through a broker.
//!
//! Not built yet: this crate is a placeholder so the workspace has its final
//! shape. The work is tracked in the gateway issue; nothing here accepts
//! connections.
#![forbid(unsafe_code)]
