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

pub mod basic;
pub mod link;
pub mod mqtt;
pub mod provider;
pub mod renew;
pub mod session;
pub mod verify;
pub mod x509;

pub use link::Link;
pub use provider::{DeviceKey, DeviceProvider};
pub use renew::{ChainSlots, Chains, NoSlots, RenewEvent, SlotError};
pub use session::{
    Agent, App, Backoff, Buffers, Connect, Error, Event, MCU_MQTT_RX, MCU_MQTT_TX, MCU_TLS_RX,
    MCU_TLS_TX, Settings, Stats, TelemetryQos, Timer,
};
pub use verify::{Clock, NoClock, Refusal, StrictVerifier};
