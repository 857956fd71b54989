//! The Twofold microcontroller agent: no_std, no allocator, mutual TLS 1.3
//! over embedded-tls with a strict server verifier.
//!
//! Not built yet: this crate is a placeholder so the workspace has its final
//! shape. The work is tracked in the microcontroller agent issue.
#![no_std]
#![forbid(unsafe_code)]
