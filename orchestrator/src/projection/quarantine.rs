//! The quarantine: stream messages that were not applied, with the reason, never their payload.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Why a message was not applied. A bounded set: it is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineReason {
    /// Not a valid envelope (not JSON, wrong shape, unknown kind).
    Malformed,
    /// A schema version this orchestrator does not read.
    UnsupportedSchema,
    /// The LAPS code does not belong to the kind.
    CodeMismatch,
    /// The subject is neither a device event's nor an orchestrator event's.
    UnknownSubject,
    /// The device or kind in the envelope differs from its subject's.
    SubjectMismatch,
    /// An event about a device that never enrolled.
    UnknownDevice,
    /// A device event without a valid signature by its device's enrolled key.
    Forged,
    /// A backup whose sealed password opens with no escrow key of this orchestrator.
    Unopenable,
    /// A commit for a rotation that was never backed up.
    UnknownRotation,
    /// A revocation of a token that was never created.
    UnknownToken,
}

impl QuarantineReason {
    /// Every reason, for metrics.
    pub const ALL: [Self; 10] = [
        Self::Malformed,
        Self::UnsupportedSchema,
        Self::CodeMismatch,
        Self::UnknownSubject,
        Self::SubjectMismatch,
        Self::UnknownDevice,
        Self::Forged,
        Self::Unopenable,
        Self::UnknownRotation,
        Self::UnknownToken,
    ];

    /// The reason's name, as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedSchema => "unsupported_schema",
            Self::CodeMismatch => "code_mismatch",
            Self::UnknownSubject => "unknown_subject",
            Self::SubjectMismatch => "subject_mismatch",
            Self::UnknownDevice => "unknown_device",
            Self::Forged => "forged",
            Self::Unopenable => "unopenable",
            Self::UnknownRotation => "unknown_rotation",
            Self::UnknownToken => "unknown_token",
        }
    }
}

impl fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message kept out of the projections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    /// Its stream sequence: the message itself stays in the stream for investigation.
    pub stream_sequence: u64,
    /// The subject it came on.
    pub subject: String,
    /// Why it was refused.
    pub reason: QuarantineReason,
    /// The decoder's explanation, without payload content.
    pub detail: String,
    /// When the stream stored it.
    pub received_at: DateTime<Utc>,
}
