//! Projections: the orchestrator's derived state, folded from the event stream into sled.
//!
//! Everything here can be deleted and rebuilt by replaying the stream from its first message;
//! the fold is deterministic (it uses only what is in the messages, never the wall clock), so a
//! rebuild yields byte-identical state, which [`Projections::digest`] lets tests compare.

mod credentials;
mod devices;
mod escrow_keys;
mod orchestrator_key;
mod principals;
mod quarantine;
mod store;

pub use credentials::CredentialRecord;
pub use devices::{DeviceRecord, FailureRecord};
pub use escrow_keys::EscrowKeyRecord;
pub use orchestrator_key::OrchestratorKeyRecord;
pub use principals::{EnrolledKeyRecord, TokenKind, TokenRecord, TokenUnusable};
pub use quarantine::{
    DEFAULT_MAX_ENTRIES as QUARANTINE_DEFAULT_MAX_ENTRIES, MAX_ENTRIES_RANGE as QUARANTINE_MAX_ENTRIES_RANGE,
    QuarantineReason, QuarantineRecord,
};
pub use store::{Applied, Outcome, ProjectionError, Projections, SealCheck, StreamMessage};
