//! The quarantine: stream messages that were not applied, with the reason, never their payload.
//!
//! It is bounded: it holds at most a configured number of records (`quarantine.max_entries`).
//! When a new record would exceed it, the oldest records are dropped in the same sled batch that
//! adds the new one, and a persistent counter per reason counts what was dropped. Both depend
//! only on the stream (and the bound), so a replay with the same bound gives the same quarantine
//! and the same counters.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How many records the quarantine holds when the config does not say.
pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;
/// The allowed range of `quarantine.max_entries`.
pub const MAX_ENTRIES_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;

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
    /// A campaign event for a breach that was never declared.
    UnknownBreach,
}

impl QuarantineReason {
    /// Every reason, for metrics.
    pub const ALL: [Self; 11] = [
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
        Self::UnknownBreach,
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
            Self::UnknownBreach => "unknown_breach",
        }
    }
}

/// How many of the oldest records must go before one more is added to a quarantine that holds
/// `held` records and may hold `max_entries`: the quarantine then holds exactly `max_entries`
/// when it was full, and fewer records only while it is not.
pub(super) fn to_drop_before_adding(held: u64, max_entries: u64) -> u64 {
    held.saturating_add(1).saturating_sub(max_entries.max(1))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_quarantine_drops_one_to_add_one_and_a_lowered_bound_drops_the_excess() {
        assert_eq!(to_drop_before_adding(0, 3), 0);
        assert_eq!(to_drop_before_adding(2, 3), 0);
        assert_eq!(to_drop_before_adding(3, 3), 1);
        // The bound was lowered from 10 to 3 between runs: down to 3 with the new one.
        assert_eq!(to_drop_before_adding(10, 3), 8);
        assert_eq!(to_drop_before_adding(0, 1), 0);
        assert_eq!(to_drop_before_adding(1, 1), 1);
        // A bound of 0 is refused by the config; here it acts as 1 so the newest is always kept.
        assert_eq!(to_drop_before_adding(1, 0), 1);
    }
}
