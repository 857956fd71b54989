//! The wire contract every Twofold part shares.
//!
//! Twofold gives each device a certificate whose SAN URI names it
//! ([`identity`]), connects it over mutual-TLS MQTT to a gateway that
//! confines it to its own topics ([`topic`]), and carries postcard-encoded
//! messages on them ([`message`]). Microcontrollers receive their key and
//! certificates as one flashable [`bundle`].
//!
//! The crate is `no_std` without an allocator, so the same code runs in the
//! gateway, the Linux agent and microcontroller firmware. Its types carry
//! validity: a [`DeviceId`] exists only if [`DeviceId::parse`] accepted it.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod bundle;
pub mod identity;
pub mod message;
pub mod name;
pub mod topic;

pub use backoff::Backoff;
pub use bundle::{Bundle, BundleError, ChainRecord, ChainState};
pub use identity::{Identity, IdentityError, Principal};
pub use message::{CertStatus, Command, Reading, Reply, ReplyStatus, Telemetry, Value, WireError};
pub use name::{DeviceId, GroupName, NameError, ServiceName, TrustDomain};
pub use topic::{Channel, Topic, TopicError};
