//! The escrow keys projection: every escrow public key the history recorded, from
//! `escrow_key_created` events.

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::{EscrowKeyCreated, EscrowKeyReason};
use fleetlaps_proto::seal::EscrowPublicKey;
use serde::{Deserialize, Serialize};

/// One recorded escrow public key (never a secret key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowKeyRecord {
    /// The public key.
    pub public_key: EscrowPublicKey,
    /// The key it replaced, if any.
    pub previous_public_key: Option<EscrowPublicKey>,
    /// Why it was made.
    pub reason: EscrowKeyReason,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// The stream sequence of its `escrow_key_created` event.
    pub stream_sequence: u64,
    /// The stream sequence of the recovery that replaced it, when it was lost: a backup sealed to
    /// it after that is refused, since no key that opens it is held any more.
    pub lost_at_sequence: Option<u64>,
}

impl EscrowKeyRecord {
    /// The record an `escrow_key_created` event, at stream `sequence`, makes.
    pub fn recorded(body: &EscrowKeyCreated, time: DateTime<Utc>, sequence: u64) -> Self {
        Self {
            public_key: body.public_key,
            previous_public_key: body.previous_public_key,
            reason: body.reason,
            recorded_at: time,
            stream_sequence: sequence,
            lost_at_sequence: None,
        }
    }

    /// A recovery at stream `sequence` replaced the key file: this key went with it. Returns
    /// whether the record changed (a key lost before stays lost at its first loss).
    pub fn lost_by_recovery(&mut self, sequence: u64) -> bool {
        if self.lost_at_sequence.is_some() {
            return false;
        }
        self.lost_at_sequence = Some(sequence);
        true
    }
}

#[cfg(test)]
mod tests {
    use fleetlaps_proto::seal::EscrowSecretKey;

    use super::*;

    #[test]
    fn a_recorded_key_is_lost_once_at_the_first_recovery() {
        let body = EscrowKeyCreated {
            public_key: EscrowSecretKey::from_bytes([7; 32]).public_key(),
            previous_public_key: None,
            reason: EscrowKeyReason::Created,
        };
        let mut record = EscrowKeyRecord::recorded(&body, Utc::now(), 3);
        assert_eq!((record.stream_sequence, record.lost_at_sequence), (3, None));
        assert!(record.lost_by_recovery(10));
        assert!(!record.lost_by_recovery(20), "lost at its first loss");
        assert_eq!(record.lost_at_sequence, Some(10));
    }
}
