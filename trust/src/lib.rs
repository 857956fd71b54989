//! Each trust rule of Twofold, once.
//!
//! The gateway, the Linux agent and provisioning all decide questions of
//! trust about the same certificates and files: which serial a certificate
//! has, which identity it names, which CRLs may replace the ones in force,
//! and whether a file on disk has changed. When each part answered these
//! itself, the answers drifted apart (three serial normalisations with
//! different leading-zero handling; a certificate with an extra URI that
//! the gateway accepted and the agent refused), and every fix had to land
//! twice. This crate owns the rules; the parts call it.
//!
//! It is a `std` library: the microcontroller agent keeps its own strict
//! verifier (`agent-nostd`), and the wire formats stay in `protocol`. Each
//! rule is a pure function or a small value type, with errors as enums a
//! caller can match on.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod crl;
pub mod files;
pub mod identity;
pub mod policy;
pub mod renewal;
pub mod serial;
pub mod stamp;
pub mod tls;

pub use identity::{IdentityUriError, identity_of, principal_in};
pub use serial::{Serial, SerialError};
pub use stamp::FileStamp;
