//! The devices projection: one record per device, its name, account, policy and latest state.

use chrono::{DateTime, Utc};
use fleetlaps_proto::command::{BackupConfirmation, DevicePosition};
use fleetlaps_proto::event::RotationStage;
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, RotationId};
use fleetlaps_proto::policy::{Policy, PolicySource};
use serde::{Deserialize, Serialize};

/// What the orchestrator knows of one device.
///
/// Stored as JSON in sled; the encoding is private to the orchestrator and rebuildable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device's id (subject token).
    pub device_id: DeviceId,
    /// Its host name, as last reported.
    pub device_name: DeviceName,
    /// The managed account, once a backup named it.
    pub account_name: Option<AccountName>,
    /// The managed account's UID, once a backup named it.
    pub account_uid: Option<u32>,
    /// The policy the device last reported, and where it came from.
    pub policy: Option<(Policy, PolicySource)>,
    /// When the newest password was backed up (Graph's `lastBackupDateTime`).
    pub last_backup: Option<DateTime<Utc>>,
    /// When the newest password is due to be rotated (Graph's `refreshDateTime`).
    pub refresh: Option<DateTime<Utc>>,
    /// The rotation whose password the account has, as last confirmed by the device.
    pub current_rotation: Option<RotationId>,
    /// When the device last confirmed a rotation.
    pub last_rotated: Option<DateTime<Utc>>,
    /// The last failed rotation, if the latest outcome was a failure.
    pub last_failure: Option<FailureRecord>,
    /// When someone last authenticated as the managed account.
    #[serde(default)]
    pub last_authentication: Option<DateTime<Utc>>,
    /// When the post-authentication reset is scheduled, if one is.
    #[serde(default)]
    pub post_authentication_reset_at: Option<DateTime<Utc>>,
    /// The generation of the newest device event applied.
    #[serde(default)]
    pub last_generation: u64,
    /// The sequence of the newest device event applied.
    pub last_sequence: u64,
    /// Events applied that were older than the newest one (from a clone or a rolled-back copy).
    #[serde(default)]
    pub out_of_order_events: u64,
    /// The newest backup's confirmation, as its device is told.
    #[serde(default)]
    pub latest_backup: Option<BackupConfirmation>,
    /// How many image rollbacks the device reported.
    #[serde(default)]
    pub image_rollbacks: u64,
    /// When it last reported one.
    #[serde(default)]
    pub last_image_rollback: Option<DateTime<Utc>>,
    /// When the device's newest event happened.
    pub last_seen: DateTime<Utc>,
}

/// A failed rotation, as the device reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// When it failed.
    pub time: DateTime<Utc>,
    /// Where in the rotation.
    pub stage: RotationStage,
    /// What went wrong.
    pub error: String,
}

impl DeviceRecord {
    /// A device seen for the first time.
    pub(super) fn new(device_id: DeviceId, device_name: DeviceName, time: DateTime<Utc>) -> Self {
        Self {
            device_id,
            device_name,
            account_name: None,
            account_uid: None,
            policy: None,
            last_backup: None,
            refresh: None,
            current_rotation: None,
            last_rotated: None,
            last_failure: None,
            last_authentication: None,
            post_authentication_reset_at: None,
            last_generation: 0,
            last_sequence: 0,
            out_of_order_events: 0,
            latest_backup: None,
            image_rollbacks: 0,
            last_image_rollback: None,
            last_seen: time,
        }
    }

    /// The position of the newest device event applied.
    pub fn last_position(&self) -> DevicePosition {
        DevicePosition {
            generation: self.last_generation,
            sequence: self.last_sequence,
        }
    }
}
