//! The Twofold Linux device agent (Raspberry Pi class boards): one
//! mutual-TLS MQTT session to the gateway, system telemetry, commands, and
//! a durable offline queue so that no QoS 1 message is lost to an outage.
#![forbid(unsafe_code)]

pub mod api;
pub mod commands;
pub mod config;
pub mod crl_fetch;
pub mod doctor;
pub mod files;
pub mod gateway_cert;
pub mod identity;
pub mod keygen;
pub mod link;
pub mod queue;
pub mod renew;
pub mod run;
pub mod telemetry;
pub mod token_key;
