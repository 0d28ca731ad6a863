//! The credentials projection: every backed-up password of every device, sealed.

use chrono::{DateTime, Utc};
use fleetlaps_proto::event::RotationReason;
use fleetlaps_proto::ids::{AccountName, RotationId};
use fleetlaps_proto::seal::SealedBox;
use serde::{Deserialize, Serialize};

/// One backed-up password.
///
/// Invariant: the password is held only sealed to the escrow key; it is opened only to answer an
/// authorised request, and never stored opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// The rotation that made it.
    pub rotation_id: RotationId,
    /// The stream sequence of its backup event: orders a device's credentials.
    pub stream_sequence: u64,
    /// The account it is for.
    pub account_name: AccountName,
    /// The account's UID.
    pub account_uid: Option<u32>,
    /// When it was backed up.
    pub backup_time: DateTime<Utc>,
    /// When it is due to be rotated.
    pub expires_at: DateTime<Utc>,
    /// Why it was made.
    pub reason: RotationReason,
    /// The password, sealed to the escrow key.
    pub sealed_password: SealedBox,
    /// When the device reported that the account has it; `None` while only backed up.
    pub applied_at: Option<DateTime<Utc>>,
}
