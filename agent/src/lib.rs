//! The Twofold Linux device agent (Raspberry Pi class boards): mTLS MQTT
//! telemetry and commands with an offline queue.
//!
//! Not built yet: this crate is a placeholder so the workspace has its final
//! shape. The work is tracked in the Linux agent issue; nothing here connects.
#![forbid(unsafe_code)]
