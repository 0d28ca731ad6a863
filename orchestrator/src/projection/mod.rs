//! Projections: the orchestrator's derived state, folded from the event stream into sled.
//!
//! Everything here can be deleted and rebuilt by replaying the stream from its first message;
//! the fold is deterministic (it uses only what is in the messages, never the wall clock), so a
//! rebuild yields byte-identical state, which [`Projections::digest`] lets tests compare.
//!
//! Layout:
//! - `store`: [`Projections`]: the sled tree, the reads, and [`Projections::apply_all`], which
//!   takes each message of a batch through verify and fold and writes what they change in one
//!   atomic sled batch.
//! - `staged`: a batch's writes held over the tree, read back by its later messages, kept or
//!   discarded per message; `Records`, the typed reads of the tree and of a staged batch alike.
//! - `verify`: a message becomes a verified event or a refusal (signatures, subjects, schema,
//!   duplicates, the trial open of a backup), before anything changes; device keys parsed once,
//!   a batch's signatures checked on every core.
//! - `keys`: every key of the tree, built in one place.
//! - One module per aggregate, whose record applies what an event changes as a pure function:
//!   `devices` ([`DeviceRecord::apply`]), `credentials`, `principals` (tokens of both kinds and
//!   enrolled keys), `escrow_keys`, `orchestrator_key`, `campaigns` (breach campaigns and their
//!   devices), `quarantine` (the bound).

mod campaigns;
mod credentials;
mod devices;
mod escrow_keys;
mod keys;
mod orchestrator_key;
mod principals;
mod quarantine;
mod staged;
mod store;
mod verify;

pub use campaigns::{CampaignRecord, CampaignState, CampaignTarget};
pub use credentials::CredentialRecord;
pub use devices::{DeviceChange, DeviceRecord, DeviceStanding, DeviceState, FailureRecord};
pub use escrow_keys::EscrowKeyRecord;
pub use keys::is_report;
pub use orchestrator_key::OrchestratorKeyRecord;
pub use principals::{EnrolledKeyRecord, TokenKind, TokenRecord, TokenUnusable};
pub use quarantine::{
    DEFAULT_MAX_ENTRIES as QUARANTINE_DEFAULT_MAX_ENTRIES, MAX_ENTRIES_RANGE as QUARANTINE_MAX_ENTRIES_RANGE,
    QuarantineReason, QuarantineRecord,
};
pub use store::{
    Applied, ConfirmedRotation, Outcome, Prechecked, ProjectionError, Projections, SealCheck, StreamMessage,
};
