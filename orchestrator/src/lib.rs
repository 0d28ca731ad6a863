//! The fleetlaps orchestrator: consumes the fleet's events from JetStream, folds them into sled
//! projections, and serves backed-up passwords through a Microsoft Graph-compatible API.
//!
//! Layout:
//! - [`app`]: start-up, the run loop and shutdown.
//! - [`config`]: the typed configuration, from a file and `FLEETLAPS_*` variables.
//! - [`telemetry`]: logging set-up.
//! - [`data_dir`]: the data directory's lock (one process at a time).
//! - [`escrow`]: the escrow keyring that opens backed-up passwords, and its files.
//! - [`orchestrator_key`]: the key that signs the orchestrator's own events, and its file.
//! - [`key_ceremony`]: the escrow key against the history: the check at start, rotate, recover.
//! - [`tls`]: the API's certificate, from files or self-signed at first start.
//! - [`auth`]: bearer tokens, principals and Graph-named scopes.
//! - [`bus`]: the events stream and the durable consumer (the only module that knows NATS).
//! - [`projection`]: devices, credentials and quarantine, folded from events into sled.
//! - [`campaigns`]: the breach campaign runner: waves of rotate commands, deadlines, completion.
//! - [`detectors`]: breach signals raised from what the fleet reports (lateral movement, repeated
//!   failures, a read then authentications spreading), kept in sliding windows.
//! - [`investigations`]: a device's timeline and the exposure of its password at an instant.
//! - [`replay`]: `replay`: every projection rebuilt from the history into a fresh directory, up to an instant.
//! - [`http`]: the Graph-compatible API and the metrics endpoint (the only module that knows axum).
//! - [`metrics`]: metric names and the registry.
//! - [`liveness`]: each device's last heartbeat (from the liveness bucket, not the history) and
//!   which devices are silent.
//! - [`health`]: whether the projections may be trusted yet (caught up since start) and whether
//!   the consumer works.
//! - [`nats_auth`]: the nats-server configuration (a user per device) and nkey seed files.
//! - [`client`]: the API client behind `lapsctl`.

pub mod app;
pub mod attestation;
pub mod auth;
pub mod bus;
pub mod campaigns;
pub mod client;
pub mod config;
pub mod data_dir;
pub mod detectors;
pub mod escrow;
pub mod health;
pub mod http;
pub mod investigations;
pub mod key_ceremony;
pub mod liveness;
pub mod metrics;
pub mod nats_auth;
pub mod orchestrator_key;
pub mod projection;
pub mod replay;
pub mod telemetry;
pub mod tls;

pub use app::App;
pub use config::Config;

/// Runs `work` on tokio's blocking pool and returns what it returns, so CPU work or a long
/// read of the projections never holds the threads that answer requests; a panic in `work`
/// goes on unwinding here.
pub(crate) async fn on_blocking_pool<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    joined(tokio::task::spawn_blocking(work)).await
}

/// What `task` returned; a panic in it goes on unwinding here.
pub(crate) async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(done) => done,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}
