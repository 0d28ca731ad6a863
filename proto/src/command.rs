//! What the orchestrator tells devices: rotate commands and backup confirmations.
//!
//! A [`Command`] is kept per device in JetStream (the last one per subject), so a device that
//! was offline when it was issued finds it when it comes back; the device executes each command
//! id once. A [`BackupConfirmation`] tells a device that the orchestrator has durably stored one
//! of its backups, so the device may forget the sealed copy it keeps until then.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{DeviceId, EventId, IdError, RotationId};

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

/// The orchestrator's word that a backup is durably stored in its projections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupConfirmation {
    /// The device whose backup it is.
    pub device_id: DeviceId,
    /// The backup event.
    pub event_id: EventId,
    /// The rotation it belongs to.
    pub rotation_id: RotationId,
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
