//! The devices projection: one record per device, its name, account, policy and latest state.

use chrono::{DateTime, TimeDelta, Utc};
use fleetlaps_proto::audit::{CloneSource, DeviceCloneDetected};
use fleetlaps_proto::command::{BackupConfirmation, DevicePosition};
use fleetlaps_proto::event::{Envelope, Event, RotationStage};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, DeviceTag, EventId, InstanceId, RotationId};
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
    /// Its tags (a site, a group), from its enrollment or an admin.
    #[serde(default)]
    pub tags: Vec<DeviceTag>,
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
            tags: Vec::new(),
        }
    }

    /// Its tags from now on (`device_enrolled` with tags, `device_tags_set`).
    pub fn tags_set(&mut self, tags: &[DeviceTag]) {
        self.tags = tags.to_vec();
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

/// What applying one device event to its device's record showed, besides the record's change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceChange {
    /// The event was older than the newest one applied (a clone or a rolled-back copy).
    pub out_of_order: bool,
    /// A clone the event showed, newly.
    pub clone: Option<DeviceCloneDetected>,
}

/// Where a device stands for monitoring (the `state` label of `fleetlaps_devices`): one state
/// per device, the first of these that holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// No heartbeat (and, if it never beat, no enrollment) for longer than the silence
    /// threshold: whatever else its record says may no longer be true.
    Silent,
    /// Enrolled, but no password of it was ever backed up.
    NeverBackedUp,
    /// It reported an image rollback and has not confirmed a rotation since.
    RolledBack,
    /// Its password is past its expiry (`refreshDateTime`) and not rotated yet.
    Expired,
    /// Heard from, backed up, its password within its age.
    Compliant,
}

impl DeviceState {
    /// Every state, so each label value exists from the start.
    pub const ALL: [Self; 5] = [
        Self::Silent,
        Self::NeverBackedUp,
        Self::RolledBack,
        Self::Expired,
        Self::Compliant,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Silent => "silent",
            Self::NeverBackedUp => "never_backed_up",
            Self::RolledBack => "rolled_back",
            Self::Expired => "expired",
            Self::Compliant => "compliant",
        }
    }
}

/// The part of a [`DeviceRecord`] that says where its device stands ([`DeviceState`]) and how old
/// its password is: all a metrics scrape reads of each device, decoded from the stored record
/// without the rest (policy, names, running copies, latest backup), which a scrape of a large
/// fleet would otherwise build for every device. Its fields are the record's, by the same names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DeviceStanding {
    /// The device.
    pub device_id: DeviceId,
    /// When it was last heard from by an event.
    pub last_seen: DateTime<Utc>,
    /// When its last backup was stored.
    pub last_backup: Option<DateTime<Utc>>,
    /// When its current password must be replaced.
    pub refresh: Option<DateTime<Utc>>,
    /// When its current password was applied.
    pub last_rotated: Option<DateTime<Utc>>,
    /// When it last reported an image rollback.
    #[serde(default)]
    pub last_image_rollback: Option<DateTime<Utc>>,
}

impl DeviceStanding {
    /// Where the device stands at `now` ([`DeviceState`]): silent when it was `last_heard` (its
    /// last heartbeat, or its enrollment when it never beat: `Liveness::last_heard`) more than
    /// `silent_after` ago.
    pub fn state(&self, last_heard: DateTime<Utc>, now: DateTime<Utc>, silent_after: TimeDelta) -> DeviceState {
        if now - last_heard > silent_after {
            DeviceState::Silent
        } else if self.last_backup.is_none() {
            DeviceState::NeverBackedUp
        } else if self
            .last_image_rollback
            .is_some_and(|rollback| self.last_rotated.is_none_or(|rotated| rotated < rollback))
        {
            DeviceState::RolledBack
        } else if self.refresh.is_some_and(|refresh| refresh <= now) {
            DeviceState::Expired
        } else {
            DeviceState::Compliant
        }
    }
}

impl DeviceRecord {
    /// Where the device stands and how old its password is.
    pub fn standing(&self) -> DeviceStanding {
        DeviceStanding {
            device_id: self.device_id.clone(),
            last_seen: self.last_seen,
            last_backup: self.last_backup,
            refresh: self.refresh,
            last_rotated: self.last_rotated,
            last_image_rollback: self.last_image_rollback,
        }
    }
}

impl DeviceRecord {
    /// Applies one verified device event to the record: where the device stands (its position
    /// never moves back; an older event is applied all the same, so no backup is dropped), which
    /// running copy it was heard from, and what the event says of it. `backup` is the
    /// confirmation a backup gets (its device's latest backup outcome). A pure function of the
    /// record and the event.
    pub fn apply(&mut self, envelope: &Envelope, backup: Option<&BackupConfirmation>) -> DeviceChange {
        let position = envelope.position();
        let out_of_order = position <= self.last_position();
        if out_of_order {
            self.out_of_order_events = self.out_of_order_events.saturating_add(1);
        } else {
            self.last_generation = position.generation;
            self.last_sequence = position.sequence;
        }
        self.last_seen = self.last_seen.max(envelope.time);
        let clone = envelope.instance.and_then(|instance| {
            let source = CloneSource {
                instance,
                position,
                time: envelope.time,
            };
            self.heard_from(source, envelope.id)
        });
        match &envelope.event {
            Event::PolicyApplied(body) => {
                self.device_name = body.device_name.clone();
                self.policy = Some((body.policy.clone(), body.source));
            }
            Event::PasswordBackedUp(body) => {
                self.device_name = body.device_name.clone();
                self.account_name = Some(body.account_name.clone());
                self.account_uid = body.account_uid;
                self.last_backup = Some(envelope.time);
                self.refresh = Some(body.expires_at);
                self.latest_backup = backup.cloned();
            }
            Event::PasswordRotated(body) => {
                self.current_rotation = Some(body.rotation_id);
                self.last_rotated = Some(envelope.time);
                self.last_failure = None;
            }
            Event::RotationFailed(body) => {
                self.last_failure = Some(FailureRecord {
                    time: envelope.time,
                    stage: body.stage,
                    error: body.error.clone(),
                });
            }
            Event::AccountMissing(body) => {
                self.last_failure = Some(FailureRecord {
                    time: envelope.time,
                    stage: RotationStage::Prepare,
                    error: format!("managed account {} does not exist", body.account),
                });
            }
            Event::AuthenticationSucceeded(body) => {
                self.last_authentication = Some(envelope.time);
                self.post_authentication_reset_at = body.reset_deadline;
            }
            Event::PostAuthenticationActionsSucceeded(_) => self.post_authentication_reset_at = None,
            Event::ImageRollbackDetected(_) => {
                self.image_rollbacks = self.image_rollbacks.saturating_add(1);
                self.last_image_rollback = Some(envelope.time);
            }
            // Kept in the stream for investigators; no projection needs them yet.
            Event::AuthenticationFailed(_)
            | Event::PostAuthenticationActionsStarted(_)
            | Event::PostAuthenticationActionsFailed(_)
            | Event::CommandExecuted(_) => {}
        }
        DeviceChange { out_of_order, clone }
    }
}

/// Whether a `device_clone_detected` on the history is the report of the clone waiting to be
/// reported (`due`): the same evidence. Then nothing waits any more.
pub(super) fn clone_report_settles(due: &DeviceCloneDetected, recorded: &DeviceCloneDetected) -> bool {
    due.evidence_event_id == recorded.evidence_event_id
}

/// How many superseded copies a device record remembers.
const SUPERSEDED_INSTANCES_KEPT: usize = 16;

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use fleetlaps_proto::command::{BackupOutcome, CommandId};
    use fleetlaps_proto::event::{
        AccountMissing, AuthenticationObserved, CommandExecuted, EventKind, ImageRollbackDetected, PasswordBackedUp,
        PasswordRotated, PolicyApplied, PostAuthenticationActions, PostAuthenticationActionsFailed, RotationFailed,
        RotationReason,
    };
    use fleetlaps_proto::seal::{EscrowSecretKey, seal};

    use super::*;

    fn device_id() -> DeviceId {
        DeviceId::parse("dev-1").unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
    }

    fn record() -> DeviceRecord {
        DeviceRecord::new(device_id(), DeviceName::parse("host-1").unwrap(), at(0))
    }

    fn envelope(sequence: u64, event: Event) -> Envelope {
        Envelope::new(device_id(), sequence, at(i64::try_from(sequence).unwrap()), event)
    }

    fn account() -> AccountName {
        AccountName::parse("lapsadmin").unwrap()
    }

    /// One event of every kind, in an order a device could send them.
    fn one_of_each(rotation_id: RotationId) -> Vec<Event> {
        let key = EscrowSecretKey::from_bytes([7; 32]).public_key();
        let observed = AuthenticationObserved {
            account_name: account(),
            service: "sshd".to_owned(),
            remote_host: None,
            tty: None,
            reset_deadline: Some(at(3600)),
            count: 1,
            first_at: None,
            last_at: None,
        };
        let actions = PostAuthenticationActions {
            account_name: account(),
            actions: 1,
        };
        vec![
            Event::PolicyApplied(PolicyApplied {
                device_name: DeviceName::parse("host-renamed").unwrap(),
                source: PolicySource::LocalConfig,
                policy: Policy::default(),
            }),
            Event::PasswordBackedUp(PasswordBackedUp {
                rotation_id,
                device_name: DeviceName::parse("host-renamed").unwrap(),
                account_name: account(),
                account_uid: Some(1001),
                sealed_password: seal(&key, b"pw", b"context"),
                escrow_public_key: Some(key),
                recovery_sealed_password: None,
                expires_at: at(86_400),
                reason: RotationReason::Initial,
            }),
            Event::PasswordRotated(PasswordRotated {
                rotation_id,
                account_name: account(),
                command_id: None,
            }),
            Event::RotationFailed(RotationFailed {
                rotation_id: None,
                stage: RotationStage::Backup,
                error: "NATS unreachable".to_owned(),
            }),
            Event::AccountMissing(AccountMissing {
                account: "lapsadmin".to_owned(),
            }),
            Event::AuthenticationSucceeded(observed.clone()),
            Event::AuthenticationFailed(AuthenticationObserved {
                reset_deadline: None,
                ..observed
            }),
            Event::PostAuthenticationActionsStarted(actions.clone()),
            Event::PostAuthenticationActionsFailed(PostAuthenticationActionsFailed {
                account_name: account(),
                actions: 1,
                attempt: 1,
                error: "logoff failed".to_owned(),
            }),
            Event::PostAuthenticationActionsSucceeded(actions),
            Event::CommandExecuted(CommandExecuted {
                command_id: CommandId::new(),
                rotation_id: None,
                error: None,
            }),
            Event::ImageRollbackDetected(ImageRollbackDetected {
                local_rotation_id: None,
                centre_rotation_id: Some(rotation_id),
                local_position: DevicePosition {
                    generation: 0,
                    sequence: 1,
                },
                centre_position: DevicePosition {
                    generation: 0,
                    sequence: 3,
                },
                new_generation: 1,
            }),
        ]
    }

    #[test]
    fn every_event_kind_changes_the_device_as_it_says_and_moves_its_position() {
        let rotation_id = RotationId::new();
        let events = one_of_each(rotation_id);
        let mut kinds: Vec<EventKind> = events.iter().map(Event::kind).collect();
        kinds.sort();
        let mut all = EventKind::ALL.to_vec();
        all.sort();
        assert_eq!(kinds, all, "one event of every kind");

        let mut device = record();
        let stored = BackupConfirmation {
            device_id: device_id(),
            event_id: EventId::new(),
            rotation_id: Some(rotation_id),
            outcome: BackupOutcome::Stored,
        };
        for (index, event) in events.into_iter().enumerate() {
            let sequence = u64::try_from(index).unwrap() + 1;
            let before = device.clone();
            let kind = event.kind();
            let backup = (kind == EventKind::PasswordBackedUp).then_some(&stored);
            let change = device.apply(&envelope(sequence, event), backup);
            assert_eq!(change, DeviceChange::default(), "{kind}");
            assert_eq!(device.last_sequence, sequence, "{kind}");
            assert_eq!(device.last_seen, at(i64::try_from(sequence).unwrap()), "{kind}");
            match kind {
                EventKind::PolicyApplied => {
                    assert_eq!(device.device_name.as_str(), "host-renamed");
                    assert_eq!(device.policy, Some((Policy::default(), PolicySource::LocalConfig)));
                }
                EventKind::PasswordBackedUp => {
                    assert_eq!(device.account_name, Some(account()));
                    assert_eq!(device.account_uid, Some(1001));
                    assert_eq!(device.last_backup, Some(at(2)));
                    assert_eq!(device.refresh, Some(at(86_400)));
                    assert_eq!(device.latest_backup.as_ref(), Some(&stored));
                    assert_eq!(device.current_rotation, None, "backed up is not yet applied");
                }
                EventKind::PasswordRotated => {
                    assert_eq!(device.current_rotation, Some(rotation_id));
                    assert_eq!(device.last_rotated, Some(at(3)));
                }
                EventKind::RotationFailed => {
                    let failure = device.last_failure.as_ref().expect("a failure");
                    assert_eq!(
                        (failure.stage, failure.error.as_str()),
                        (RotationStage::Backup, "NATS unreachable")
                    );
                }
                EventKind::AccountMissing => {
                    let failure = device.last_failure.as_ref().expect("a failure");
                    assert!(failure.error.contains("lapsadmin does not exist"), "{failure:?}");
                }
                EventKind::AuthenticationSucceeded => {
                    assert_eq!(device.last_authentication, Some(at(6)));
                    assert_eq!(device.post_authentication_reset_at, Some(at(3600)));
                }
                EventKind::PostAuthenticationActionsSucceeded => {
                    assert_eq!(device.post_authentication_reset_at, None);
                }
                EventKind::ImageRollbackDetected => {
                    assert_eq!(device.image_rollbacks, 1);
                    assert_eq!(device.last_image_rollback, Some(at(12)));
                }
                EventKind::AuthenticationFailed
                | EventKind::PostAuthenticationActionsStarted
                | EventKind::PostAuthenticationActionsFailed
                | EventKind::CommandExecuted => {
                    let mut expected = before;
                    expected.last_sequence = sequence;
                    expected.last_seen = device.last_seen;
                    assert_eq!(device, expected, "{kind} changes only where the device stands");
                }
            }
        }
        // A later rotation clears the failure.
        device.apply(
            &envelope(
                20,
                Event::PasswordRotated(PasswordRotated {
                    rotation_id,
                    account_name: account(),
                    command_id: None,
                }),
            ),
            None,
        );
        assert_eq!(device.last_failure, None);
    }

    #[test]
    fn tags_are_replaced_whole_and_a_report_settles_only_its_own_clone() {
        let mut device = record();
        device.tags_set(&[
            DeviceTag::parse("site:paris").unwrap(),
            DeviceTag::parse("role:web").unwrap(),
        ]);
        device.tags_set(&[DeviceTag::parse("site:lyon").unwrap()]);
        assert_eq!(device.tags, [DeviceTag::parse("site:lyon").unwrap()]);
        device.tags_set(&[]);
        assert!(device.tags.is_empty());

        let event = one_of_each(RotationId::new()).remove(0);
        let from = |sequence: u64, instance: InstanceId| Envelope {
            instance: Some(instance),
            ..envelope(sequence, event.clone())
        };
        let (first, second) = (InstanceId::new(), InstanceId::new());
        device.apply(&from(1, first), None);
        device.apply(&from(2, second), None);
        let due = device.apply(&from(3, first), None).clone.expect("a clone");
        assert!(clone_report_settles(&due, &due.clone()));
        let other = DeviceCloneDetected {
            evidence_event_id: EventId::new(),
            ..due.clone()
        };
        assert!(
            !clone_report_settles(&due, &other),
            "another clone's report leaves this one due"
        );
    }

    #[test]
    fn an_older_event_is_applied_without_moving_the_position_back() {
        let mut device = record();
        let newer = one_of_each(RotationId::new()).remove(0);
        device.apply(&envelope(5, newer.clone()), None);
        let change = device.apply(&envelope(3, newer), None);
        assert!(change.out_of_order);
        assert_eq!((device.last_sequence, device.out_of_order_events), (5, 1));
        assert_eq!(device.last_seen, at(5), "last seen never moves back either");
    }

    #[test]
    fn a_copy_heard_from_again_after_another_took_over_is_a_clone() {
        let mut device = record();
        let event = one_of_each(RotationId::new()).remove(0);
        let from = |sequence: u64, instance: InstanceId| Envelope {
            instance: Some(instance),
            ..envelope(sequence, event.clone())
        };
        let (first, second) = (InstanceId::new(), InstanceId::new());
        assert_eq!(device.apply(&from(1, first), None).clone, None);
        assert_eq!(
            device.apply(&from(2, second), None).clone,
            None,
            "a restart is no clone"
        );
        let detected = device.apply(&from(3, first), None).clone.expect("the first copy again");
        assert_eq!((detected.source.instance, detected.other.instance), (first, second));
        assert_eq!(device.apply(&from(4, second), None).clone, None, "the same pair once");
        assert_eq!(device.clone_events, 2);
    }
}

#[cfg(test)]
mod state_tests {
    use chrono::{TimeDelta, TimeZone as _};

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
    }

    /// A device enrolled at 0, backed up and rotated at 10, its password due at 1,000.
    fn backed_up() -> DeviceRecord {
        let mut device = DeviceRecord::new(
            DeviceId::parse("dev-1").unwrap(),
            DeviceName::parse("host-1").unwrap(),
            at(0),
        );
        device.last_backup = Some(at(10));
        device.last_rotated = Some(at(10));
        device.refresh = Some(at(1_000));
        device.last_seen = at(10);
        device
    }

    const SILENT_AFTER: TimeDelta = TimeDelta::seconds(100);

    /// Where `record` stands, as a metrics scrape reads it: from the stored record.
    fn stored(record: &DeviceRecord) -> DeviceStanding {
        serde_json::from_slice(&serde_json::to_vec(record).expect("encodes"))
            .expect("a stored record gives its standing")
    }

    #[test]
    fn the_standing_read_from_a_stored_record_is_the_records_own() {
        let mut device = backed_up();
        device.last_image_rollback = Some(at(20));
        assert!(
            device.last_backup.is_some() && device.refresh.is_some() && device.last_rotated.is_some(),
            "every field set, so a field read under another name would show"
        );
        assert_eq!(stored(&device), device.standing());
    }

    #[test]
    fn a_device_heard_from_within_the_threshold_with_a_valid_password_is_compliant() {
        assert_eq!(
            stored(&backed_up()).state(at(40), at(50), SILENT_AFTER),
            DeviceState::Compliant
        );
    }

    #[test]
    fn a_device_not_heard_from_for_longer_than_the_threshold_is_silent() {
        let device = backed_up();
        assert_eq!(
            stored(&device).state(at(10), at(110), SILENT_AFTER),
            DeviceState::Compliant,
            "exactly the threshold"
        );
        assert_eq!(
            stored(&device).state(at(10), at(111), SILENT_AFTER),
            DeviceState::Silent
        );
        // However recent its last event: only the heartbeat (or enrollment) counts, by the
        // server's clock, not the device's.
        let mut sent = device;
        sent.last_seen = at(500);
        assert_eq!(stored(&sent).state(at(20), at(500), SILENT_AFTER), DeviceState::Silent);
    }

    #[test]
    fn silence_wins_over_every_other_state() {
        let mut device = backed_up();
        device.last_backup = None;
        assert_eq!(
            stored(&device).state(at(0), at(5_000), SILENT_AFTER),
            DeviceState::Silent
        );
    }

    #[test]
    fn an_enrolled_device_without_a_backup_is_never_backed_up() {
        let mut device = backed_up();
        device.last_backup = None;
        device.last_rotated = None;
        device.refresh = None;
        assert_eq!(
            stored(&device).state(at(40), at(50), SILENT_AFTER),
            DeviceState::NeverBackedUp
        );
    }

    #[test]
    fn a_device_rolled_back_after_its_last_rotation_is_rolled_back_until_it_rotates() {
        let mut device = backed_up();
        device.last_image_rollback = Some(at(20));
        assert_eq!(
            stored(&device).state(at(30), at(40), SILENT_AFTER),
            DeviceState::RolledBack
        );
        device.last_rotated = Some(at(25));
        assert_eq!(
            stored(&device).state(at(30), at(40), SILENT_AFTER),
            DeviceState::Compliant
        );
    }

    #[test]
    fn a_password_past_its_refresh_time_is_expired() {
        let device = backed_up();
        assert_eq!(
            stored(&device).state(at(1_000), at(1_001), SILENT_AFTER),
            DeviceState::Expired
        );
        assert_eq!(
            stored(&device).state(at(990), at(999), SILENT_AFTER),
            DeviceState::Compliant
        );
    }
}
