//! Twofold provisioning: the certificate authority and the device registry.
//!
//! Every device gets an ECDSA P-256 key and a short-lived client
//! certificate whose SAN URI `spiffe://<trust-domain>/device/<id>` is its
//! identity. Three CAs ([`profile`]) keep the purposes apart: the device CA
//! issues client certificates and the CRL, the server CA issues gateway
//! certificates and is the only anchor devices trust, and the root signs
//! both. The [`registry`] records every certificate and is the source of
//! truth the CRL is derived from.
//!
//! The `provisioning` binary is a thin shell over [`Pki`]: open or create
//! the PKI directory, then enroll, sign CSRs, issue gateway certificates,
//! revoke and publish CRLs. Files are written atomically ([`atomic`]), and
//! each operation commits to the registry in one transaction.
#![forbid(unsafe_code)]

pub mod atomic;
pub mod audit;
pub mod crl;
pub mod csr;
pub mod enrollment;
pub mod error;
pub mod est;
pub mod keys;
pub mod output;
pub mod pki;
pub mod profile;
pub mod push;
pub mod registry;
pub mod renewal;
pub mod serial;
pub mod service;

pub use enrollment::{
    EnrollOptions, EnrollRequest, Enrollment, GatewayCert, KeySource, RevokeTarget,
};
pub use error::{Error, Result};
pub use pki::Pki;
pub use serial::Serial;
