//! The Twofold microcontroller agent: mutual TLS 1.3 (embedded-tls) and
//! MQTT to the gateway with no allocator and static buffers.
//!
//! Generic over the link (`embedded_io_async::{Read, Write}`: a TCP socket
//! of a network stack, or a modem's UART in transparent mode), a
//! `rand_core` CryptoRng, the device key ([`provider::DeviceKey`]) and an
//! optional clock ([`verify::Clock`]).
//!
//! The server is checked by [`verify::StrictVerifier`], never by
//! embedded-tls's own verification; read its documentation for what a
//! device without a clock does and does not check.
#![no_std]
#![forbid(unsafe_code)]

pub mod provider;
pub mod verify;
pub mod x509;

pub use provider::{DeviceKey, DeviceProvider};
pub use verify::{Clock, NoClock, Refusal, StrictVerifier};
