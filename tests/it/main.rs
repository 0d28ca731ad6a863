//! The fleetlaps integration tests: one binary, one module per feature, and `harness` with what
//! they share.
//!
//! Every test starts its own servers on free loopback ports (see [`harness::TestNats`]), so tests
//! run in parallel and leave nothing behind. The binaries under test must be built first
//! (`cargo build --workspace --bins --features fleetlaps-agent/fault-injection`, which `cargo
//! xtask test` does). Set `TEST_LOG=1` to see the in-process logs; an agent run as a binary logs
//! at debug level to `agent-binary.log` beside its state.

pub mod harness;

mod agent_cli;
mod agent_metrics;
mod api;
pub mod apps;
mod at_rest;
mod backup_confirmation;
mod bounds;
mod breach;
mod commands;
mod config;
mod dashboards;
mod detectors;
mod durability;
mod enrollment;
mod escrow;
mod harness_smoke;
mod https;
mod investigations;
pub mod linux;
mod linux_account;
mod liveness;
mod msgraph_sdk;
mod nats_permissions;
mod nats_security;
mod post_authentication;
mod replay;
mod resilience;
mod rollback;
mod rotation;
mod security;
mod signed_history;
mod simulate;
mod slow_clients;
