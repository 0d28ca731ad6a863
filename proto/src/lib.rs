//! The wire boundary of fleetlaps: every type that crosses a process boundary lives here.
//!
//! The agent and the orchestrator talk only through these types, as JSON on NATS subjects and
//! HTTP. This crate does no I/O and pulls in no async runtime; its only contact with the
//! operating system is the CSPRNG used to make passwords, keys and nonces.
//!
//! Layout:
//! - [`ids`]: validated identifiers (`DeviceId`, `EventId`, `RotationId`, `DeviceName`, `AccountName`).
//! - [`event`]: the event envelope and the closed set of event kinds, with LAPS event codes.
//! - [`subject`]: NATS subject and stream names, in one place.
//! - [`policy`]: the LAPS policy settings, their ranges and defaults, and validation.
//! - [`password`]: password and passphrase generation for every LAPS complexity.
//! - [`seal`]: the sealed box that carries a password from a device to the escrow key.
//! - [`nkey`]: NATS nkey user seeds, parsed from the seed files of both programs.
//! - [`signature`]: device keys and the Ed25519 signatures on device events.
//! - [`api`]: Microsoft Graph shapes served by the orchestrator's HTTP API.
//! - [`audit`]: what the orchestrator itself does (password reads, tokens, rotation requests), on the same history.
//! - [`breach`]: breaches and the campaigns that answer them (events on the same history).
//! - [`command`]: rotate commands and backup confirmations, from the orchestrator to devices.
//! - [`control`]: requests and answers on the agent's local control socket.
//! - [`liveness`]: the heartbeat each device puts in the liveness bucket every cycle (not on the history).

#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod breach;
pub mod command;
pub mod control;
pub mod event;
pub mod ids;
pub mod liveness;
pub mod nkey;
pub mod password;
pub mod policy;
pub mod seal;
pub mod signature;
pub mod subject;
