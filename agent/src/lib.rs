//! The fleetlaps agent: rotates the password of one local administrator account on a LAPS
//! policy, and backs every new password up to the orchestrator before it changes the account.
//!
//! Layout:
//! - [`app`]: start-up and the run loop (a cycle at start, every interval, and on request).
//! - [`enroll`]: `fleetlaps-agent enroll`: a key pair, enrolled with the orchestrator over HTTPS.
//! - [`identity`]: the enrolled identity (device id, signing key, escrow key, policy), 0600.
//! - [`config`]: the typed configuration, with the local LAPS policy.
//! - [`telemetry`]: logging set-up.
//! - [`rotation`]: the processing cycle and the rotation, in the order that loses nothing.
//! - [`status`]: the text of `fleetlaps-agent status`.
//! - [`state`]: durable state in sled: identity, sequence, pending rotation, outbox.
//! - [`account`]: account backends (a file database for simulations and tests).
//! - [`password_hash`]: the SHA-512 crypt hash a rotation writes, never the password.
//! - [`bus`]: publishing to JetStream (the only module that knows NATS).
//! - [`control`]: the local control socket behind `reset` and `process-now`.
//! - [`postauth`]: LAPS post-authentication actions: reset (and log off, reboot, terminate) after a login.
//! - [`failure_window`]: failed authentications aggregated into a bounded number of events.
//! - [`metrics`]: the agent's own Prometheus metrics and their optional listener.
//! - [`clock`]: injectable time.
//! - [`fault`]: kill and failure points of the crash tests (cargo feature `fault-injection`).
//! - [`simulate`]: `fleetlaps-agent simulate`: many simulated devices in one process (test and bench fleets).

pub mod account;
pub mod app;
pub mod bus;
pub mod clock;
pub mod config;
pub mod control;
pub mod enroll;
pub mod failure_window;
pub mod fault;
pub mod identity;
pub mod metrics;
pub mod password_hash;
pub mod postauth;
pub mod rotation;
pub mod simulate;
pub mod state;
pub mod status;
pub mod telemetry;

pub use app::App;
pub use config::Config;
