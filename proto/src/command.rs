//! What the orchestrator tells devices: rotate commands, backup confirmations and the current
//! password version.
//!
//! A [`Command`] is kept per device in JetStream (the last one per subject), so a device that
//! was offline when it was issued finds it when it comes back; the device executes each command
//! id once. A [`BackupConfirmation`] tells a device whether the orchestrator has durably stored
//! one of its backups and can open it: only then may the device change its account. The
//! [`CurrentPasswordVersion`] is the centre's view of one device (LAPS's
//! `msLAPS-CurrentPasswordVersion`), kept per device in JetStream, which the device compares with
//! its own state to detect an image rollback.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{DeviceId, EventId, IdError, RotationId};
use crate::seal::EscrowPublicKey;

/// The id of one command; a device executes each id at most once.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CommandId(Uuid);

impl CommandId {
    /// A fresh, time-ordered command id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a command id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        Uuid::parse_str(value).map(Self).map_err(|_| IdError {
            what: "command id",
            value: value.chars().take(80).collect(),
            allowed: "a UUID",
        })
    }
}

impl Default for CommandId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommandId({})", self.0)
    }
}

/// A command for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Its id: also the `Nats-Msg-Id` it is published with.
    pub id: CommandId,
    /// The device it is for; must match the subject's device token.
    pub device_id: DeviceId,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// What to do.
    pub action: CommandAction,
}

/// What a command asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum CommandAction {
    /// Rotate the managed account's password now (Intune's "Rotate local admin password").
    RotatePassword {
        /// Why, for the record (a breach campaign, an operator's request).
        reason: String,
    },
}

/// The orchestrator's word on one backup: stored durably and opened on trial, or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupConfirmation {
    /// The device whose backup it is.
    pub device_id: DeviceId,
    /// The backup event.
    pub event_id: EventId,
    /// The rotation it belongs to, when the backup could be read that far.
    pub rotation_id: Option<RotationId>,
    /// Stored, or refused and why.
    #[serde(flatten)]
    pub outcome: BackupOutcome,
}

/// What the orchestrator did with a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum BackupOutcome {
    /// Stored durably in the projections, and opened with the escrow key (nothing disclosed):
    /// the device may now set the password on its account.
    Stored,
    /// Not stored, or stored but not usable: the device must leave its account unchanged.
    Refused {
        /// Why, as a bounded reason.
        reason: BackupRefusal,
        /// A payload-free explanation.
        detail: String,
    },
}

/// Why the orchestrator refused a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupRefusal {
    /// Not a valid envelope.
    Malformed,
    /// A schema version the orchestrator does not read: the agent is newer or older than it.
    UnsupportedSchema,
    /// The LAPS code does not belong to the kind.
    CodeMismatch,
    /// The envelope names another device or kind than its subject.
    SubjectMismatch,
    /// The sealed password does not open with any escrow key the orchestrator holds: it was
    /// sealed to a key the orchestrator does not have (an old or a foreign one).
    Unopenable,
}

impl BackupRefusal {
    /// Every reason, for metrics.
    pub const ALL: [Self; 5] = [
        Self::Malformed,
        Self::UnsupportedSchema,
        Self::CodeMismatch,
        Self::SubjectMismatch,
        Self::Unopenable,
    ];

    /// The reason's name, as a metric label and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedSchema => "unsupported_schema",
            Self::CodeMismatch => "code_mismatch",
            Self::SubjectMismatch => "subject_mismatch",
            Self::Unopenable => "unopenable",
        }
    }

    /// Whether sending a new backup can succeed where this one failed without a change on the
    /// device: only an unopenable backup can, once the device seals to the orchestrator's
    /// current escrow key (which it learns from [`CurrentPasswordVersion`]). The others need a
    /// compatible agent.
    pub fn retry_helps(self) -> bool {
        matches!(self, Self::Unopenable)
    }
}

impl fmt::Display for BackupRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The position of a device event in its device's own order: the generation of the device's
/// state, then the sequence within it. A state made afresh or after a detected rollback starts a
/// higher generation, so its events come after everything the centre saw from before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct DevicePosition {
    /// The state's generation (compared first).
    pub generation: u64,
    /// The event's sequence.
    pub sequence: u64,
}

impl fmt::Display for DevicePosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.generation, self.sequence)
    }
}

/// The centre's view of one device, published after every change (LAPS's
/// `msLAPS-CurrentPasswordVersion`): which rotation it holds as the account's password, how far
/// it has read the device's events, and the escrow key to seal to. Only the orchestrator may
/// write it; only its device may read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentPasswordVersion {
    /// The device.
    pub device_id: DeviceId,
    /// The rotation the device last reported applied (its password is the account's).
    pub rotation_id: Option<RotationId>,
    /// The newest device event the centre has applied.
    pub position: DevicePosition,
    /// The newest backup's confirmation, for a device that missed the live one.
    pub latest_backup: Option<BackupConfirmation>,
    /// The escrow public key new backups must be sealed to.
    pub escrow_public_key: EscrowPublicKey,
    /// The offline recovery public key every backup is also sealed to, if one is configured.
    #[serde(default)]
    pub escrow_recovery_public_key: Option<EscrowPublicKey>,
    /// Whether the centre has seen two running copies of this device (a cloned image): the
    /// centre's position then moves with both, so it is no sign of a rollback.
    #[serde(default)]
    pub clone_detected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_as_tagged_json() {
        let command = Command {
            id: CommandId::new(),
            device_id: DeviceId::parse("dev-1").expect("valid"),
            issued_at: Utc::now(),
            action: CommandAction::RotatePassword {
                reason: "breach".to_owned(),
            },
        };
        let json = serde_json::to_value(&command).expect("serialises");
        assert_eq!(json["action"]["action"], "rotate_password");
        assert_eq!(serde_json::from_value::<Command>(json).expect("parses"), command);
    }
}
