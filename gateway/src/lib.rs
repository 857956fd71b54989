//! The Twofold gateway: what runs in the cloud.
//!
//! Every device connects over mutual TLS ([`tls`]). The gateway reads the
//! identity URI from the client certificate ([`identity`]), binds the MQTT
//! session to it (the client id must be the device id), checks every
//! PUBLISH and SUBSCRIBE against a policy templated on the identity
//! ([`policy`]), and relays the session to a broker ([`broker`]): an
//! embedded rumqttd in process by default ([`embedded`]). Revocation is live
//! ([`revocation`]): a new CRL applies to new handshakes at once and closes
//! sessions whose certificate it lists. Every refusal is written to the
//! audit log with a reason from a fixed set ([`reason`], [`audit`]). Devices
//! renew their certificates inside their session, through the CA service
//! ([`renewal`]); the gateway holds no CA key.
#![forbid(unsafe_code)]

pub mod audit;
pub mod broker;
pub mod config;
pub mod crl_feed;
pub mod embedded;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod reason;
pub mod renewal;
pub mod revocation;
pub mod server;
pub mod session;
pub mod tls;
