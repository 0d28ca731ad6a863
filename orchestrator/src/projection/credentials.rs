//! The credentials projection: every backed-up password of every device, sealed.

use chrono::{DateTime, Utc};
use fleetlaps_proto::event::{PasswordBackedUp, RotationReason};
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

impl CredentialRecord {
    /// The credential a verified backup, the message at stream `sequence`, makes: backed up, not
    /// yet applied.
    pub fn backed_up(body: &PasswordBackedUp, time: DateTime<Utc>, sequence: u64) -> Self {
        Self {
            rotation_id: body.rotation_id,
            stream_sequence: sequence,
            account_name: body.account_name.clone(),
            account_uid: body.account_uid,
            backup_time: time,
            expires_at: body.expires_at,
            reason: body.reason,
            sealed_password: body.sealed_password.clone(),
            applied_at: None,
        }
    }

    /// The device reported at `time` that the account has it (`password_rotated`).
    pub fn applied(&mut self, time: DateTime<Utc>) {
        self.applied_at = Some(time);
    }

    /// Sealed again to another escrow key (`password_resealed`): the same password.
    pub fn resealed(&mut self, sealed_password: SealedBox) {
        self.sealed_password = sealed_password;
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use fleetlaps_proto::seal::{EscrowSecretKey, seal};

    use super::*;

    #[test]
    fn a_backup_makes_a_credential_that_a_rotation_applies_and_a_reseal_keeps() {
        let key = EscrowSecretKey::from_bytes([7; 32]).public_key();
        let time = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let body = PasswordBackedUp {
            rotation_id: RotationId::new(),
            device_name: fleetlaps_proto::ids::DeviceName::parse("host-1").unwrap(),
            account_name: AccountName::parse("lapsadmin").unwrap(),
            account_uid: Some(1001),
            sealed_password: seal(&key, b"pw", b"context"),
            escrow_public_key: Some(key),
            recovery_sealed_password: None,
            expires_at: time + chrono::Duration::days(30),
            reason: RotationReason::Initial,
        };
        let mut credential = CredentialRecord::backed_up(&body, time, 42);
        assert_eq!(
            (
                credential.rotation_id,
                credential.stream_sequence,
                credential.applied_at
            ),
            (body.rotation_id, 42, None)
        );
        credential.applied(time + chrono::Duration::seconds(1));
        assert_eq!(credential.applied_at, Some(time + chrono::Duration::seconds(1)));
        let resealed = seal(&EscrowSecretKey::from_bytes([8; 32]).public_key(), b"pw", b"context");
        credential.resealed(resealed.clone());
        assert_eq!(credential.sealed_password, resealed);
        assert_eq!(credential.applied_at, Some(time + chrono::Duration::seconds(1)));
    }
}
