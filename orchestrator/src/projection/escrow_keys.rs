//! The escrow keys projection: every escrow public key the history recorded, from
//! `escrow_key_created` events.

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::EscrowKeyReason;
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
