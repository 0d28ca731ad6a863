//! The devices projection: one record per device, its name, account, policy and latest state.

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::{CloneSource, DeviceCloneDetected};
use fleetlaps_proto::command::{BackupConfirmation, DevicePosition};
use fleetlaps_proto::event::RotationStage;
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, EventId, InstanceId, RotationId};
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
    /// The running copy of the agent whose event arrived last, and where that event stood.
    #[serde(default)]
    pub last_source: Option<CloneSource>,
    /// Copies heard from before another took over, newest last (at most 16): one restarted copy is never heard from again, so a copy
    /// heard from again is a second running copy, a clone.
    #[serde(default)]
    pub superseded_instances: Vec<InstanceId>,
    /// The latest clone detected, with both sources.
    #[serde(default)]
    pub clone: Option<DeviceCloneDetected>,
    /// How many events came from a copy that another had taken over from.
    #[serde(default)]
    pub clone_events: u64,
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
            last_source: None,
            superseded_instances: Vec::new(),
            clone: None,
            clone_events: 0,
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

    /// Notes that an event `evidence_event_id` came from `source`; returns the clone it shows,
    /// if it is a new one: the copy was taken over from by another before (which one restarted
    /// copy never is), and not already reported with the same other copy.
    pub(super) fn heard_from(
        &mut self,
        source: CloneSource,
        evidence_event_id: EventId,
    ) -> Option<DeviceCloneDetected> {
        let last = self.last_source.replace(source)?;
        if last.instance == source.instance {
            return None;
        }
        let reappeared = self.superseded_instances.contains(&source.instance);
        self.superseded_instances
            .retain(|instance| *instance != source.instance && *instance != last.instance);
        self.superseded_instances.push(last.instance);
        let excess = self
            .superseded_instances
            .len()
            .saturating_sub(SUPERSEDED_INSTANCES_KEPT);
        self.superseded_instances.drain(..excess);
        if !reappeared {
            return None;
        }
        self.clone_events = self.clone_events.saturating_add(1);
        let pair = |detected: &DeviceCloneDetected| {
            let mut pair = [detected.source.instance, detected.other.instance];
            pair.sort();
            pair
        };
        let detected = DeviceCloneDetected {
            device_id: self.device_id.clone(),
            source,
            other: last,
            evidence_event_id,
        };
        if self.clone.as_ref().is_some_and(|known| pair(known) == pair(&detected)) {
            return None;
        }
        self.clone = Some(detected.clone());
        Some(detected)
    }
}

/// How many superseded copies a device record remembers.
const SUPERSEDED_INSTANCES_KEPT: usize = 16;
