//! End-to-end tests of Twofold, and the helpers every part's process
//! tests share: a PKI on disk, the gateway and agent binaries, mosquitto
//! and its clients, all on free loopback ports and all killed when dropped.
//!
//! The helpers panic on failure: they are for tests only.
#![forbid(unsafe_code)]

pub mod agent;
pub mod ca_service;
pub mod cluster;
pub mod fleet;
pub mod gateway;
pub mod mqtt;
pub mod nats;
pub mod postgres;
pub mod process;
pub mod tokens;

pub use agent::{
    FleetAccount, TelemetryAccount, account_telemetry, agent, agent_config, agent_doctor,
    agent_with, assert_doctor_line, run_agent,
};
pub use ca_service::{CaService, RenewingMcu};
pub use cluster::{Cluster, Devices};
pub use fleet::{
    Fleet, Identity, MCU_LIMITS, TD, assert_mcu_refused_by_gateway, client_params, enroll_nostd,
    enroll_nostd_with, mint_with, public_keys,
};
pub use gateway::{Gateway, http_get, wait_connected};
pub use mqtt::{
    Relay, Sub, mosquitto, mosquitto_mtls, mosquitto_pub, mosquitto_sub, mosquitto_with_password,
    replies, send_command, tls_args,
};
pub use nats::{NATS_PASSWORD, NATS_USER, Nats};
pub use postgres::{PG_PASSWORD, PG_USER, Postgres};
pub use process::{
    Proc, assert_alive_then_kill, built, cpu_seconds, exit_status, finish, free_port, run_bounded,
    spawn, text, wait_port, wait_until,
};
pub use tokens::{SoftHsm, SwTpm, TokenEnv};
