//! The agent's durable state, in sled: its identity, the event sequence, the current and the
//! pending rotation, and the outbox of events not yet acknowledged by JetStream.
//!
//! One tree, key prefixes, and every change that must happen together written as one atomic
//! batch and flushed before the caller goes on: when `begin_rotation` returns, the pending
//! rotation and its backup event are on disk together.
//!
//! Keys:
//! - `m/device_id`, `m/generation`, `m/next_sequence`, `m/current`, `m/pending`,
//!   `m/last_manual_reset`, `m/backup_refused`, `m/rollback_due`, `m/outbox_dropped`;
//! - `o/<sequence>`: an outbox entry (an [`Envelope`] as JSON), sequence big-endian;
//! - `u/<event id>`: a backup sent but not yet confirmed stored by the orchestrator;
//! - `x/<command id>`: a command already executed;
//! - other prefixes (such as `p/`) belong to other modules, through [`AgentState::put_record`].
//!
//! The outbox is bounded by `outbox_limit`, and the bound never blocks a backup:
//! - essential events ([`is_essential`]: the backup, the commit, a rollback's report) are always
//!   queued; they are bounded by the rotation itself, which begins only while the outbox has room
//!   for its backup and its commit ([`OUTBOX_RESERVED`] places), and is one at a time;
//! - every other event (authentication reports, policy, failures, command outcomes, …) is queued
//!   only while that reserve stays free ([`outbox_admits`]); otherwise it is dropped (the write
//!   it comes with still happens) and counted under `m/outbox_dropped`, which `status` shows.
//!
//! So reports can never fill the places a backup needs, and a dropped event takes no sequence
//! number: the events that do leave are numbered without gaps.
//!
//! Writes a crash may lose, because losing them only makes the agent do again what it did, are
//! not flushed: an acknowledged event leaving the outbox (it is published again; the centre
//! drops the duplicate by its id), a backup's confirmation (the agent asks again) and its resend
//! time. sled keeps writes in order, so the next flushed batch carries them to disk. Everything
//! that numbers an event or records a rotation's step is flushed before the agent goes on.
//!
//! No plaintext password is ever stored here: the backup event holds the password sealed to
//! the escrow key, which this device cannot open, and the pending rotation holds its SHA-512
//! crypt hash, as the account database does.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use fleetlaps_proto::command::{BackupRefusal, CommandId, DevicePosition};
use fleetlaps_proto::event::{Envelope, Event, EventKind, PasswordRotated, RotationReason};
use fleetlaps_proto::ids::{AccountName, DeviceId, EventId, InstanceId, RotationId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fault::{FailPoint, Faults, InjectedFault};
use crate::password_hash::PasswordHash;

/// The tree of a state opened with [`AgentState::open`], one device per database.
const AGENT_TREE: &str = "agent";
const DEVICE_ID_KEY: &[u8] = b"m/device_id";
const GENERATION_KEY: &[u8] = b"m/generation";
const BACKUP_REFUSED_KEY: &[u8] = b"m/backup_refused";
const ROLLBACK_DUE_KEY: &[u8] = b"m/rollback_due";
const NEXT_SEQUENCE_KEY: &[u8] = b"m/next_sequence";
const CURRENT_KEY: &[u8] = b"m/current";
const PENDING_KEY: &[u8] = b"m/pending";
const LAST_MANUAL_RESET_KEY: &[u8] = b"m/last_manual_reset";
const OUTBOX_DROPPED_KEY: &[u8] = b"m/outbox_dropped";
const OUTBOX_PREFIX: &[u8] = b"o/";

/// Places of the outbox only essential events may take: a rotation's backup and its commit.
pub const OUTBOX_RESERVED: usize = 2;
/// The default bound of the outbox.
pub const DEFAULT_OUTBOX_LIMIT: usize = 10_000;

/// Whether an event must reach the centre whatever else fills the outbox: the backup (the
/// password the account will get), the commit (the account got it) and a rollback's report (it
/// starts a generation). Everything else reports and may be dropped when the outbox is full.
pub fn is_essential(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::PasswordBackedUp | EventKind::PasswordRotated | EventKind::ImageRollbackDetected
    )
}

/// Whether an event of `kind` joins an outbox holding `pending` events under `limit`: an essential
/// one always, another only while the [`OUTBOX_RESERVED`] places stay free after it.
pub fn outbox_admits(kind: EventKind, pending: usize, limit: usize) -> bool {
    is_essential(kind) || pending.saturating_add(1).saturating_add(OUTBOX_RESERVED) <= limit
}
const UNCONFIRMED_PREFIX: &[u8] = b"u/";

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed.
    #[error("agent state: {0}")]
    Store(#[from] sled::Error),
    /// The state belongs to another device id than the enrolled identity's.
    #[error(
        "agent state: it belongs to device {stored}, but this agent enrolled as {enrolled}; \
         move the old state directory away to start afresh"
    )]
    OtherDevice {
        /// The id the state was made for.
        stored: DeviceId,
        /// The id of the enrolled identity.
        enrolled: DeviceId,
    },
    /// A fault injected by a test (see [`crate::fault`]).
    #[error("agent state: {0}")]
    Injected(#[from] InjectedFault),
    /// A stored record does not decode.
    #[error("agent state: corrupt record {key}: {detail}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Why.
        detail: String,
    },
}

/// The password the account has, as far as the agent knows: backed up and applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentCredential {
    /// The rotation that made it.
    pub rotation_id: RotationId,
    /// The account it is for.
    pub account_name: AccountName,
    /// When it was applied to the account.
    pub applied_at: DateTime<Utc>,
    /// When it expires (`PasswordAgeDays` after the rotation).
    pub expires_at: DateTime<Utc>,
}

/// A rotation whose backup is written (to the outbox, maybe already to the stream) but whose
/// password is not yet known to be on the account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRotation {
    /// The rotation.
    pub rotation_id: RotationId,
    /// The account it is for.
    pub account_name: AccountName,
    /// Why it started.
    pub reason: RotationReason,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When the new password will expire.
    pub expires_at: DateTime<Utc>,
    /// The device sequence of its backup event, to know when that left the outbox.
    pub backup_sequence: u64,
    /// Its backup event's id, whose confirmation by the orchestrator the account waits for.
    /// `None` in a rotation recorded by an agent that did not wait for confirmations.
    #[serde(default)]
    pub backup_event_id: Option<EventId>,
    /// The new password's hash: what is written to the account, and what recovery compares the
    /// account's stored hash with to know whether it was written.
    pub password_hash: PasswordHash,
    /// The orchestrator command that asked for it, if one did.
    pub command_id: Option<CommandId>,
}

/// The orchestrator's refusal of the last backup: shown by `status`, and, when sending a new
/// backup cannot help, it stops automatic rotations until the agent restarts or is reset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedBackup {
    /// The rotation whose backup was refused.
    pub rotation_id: RotationId,
    /// Why.
    pub reason: BackupRefusal,
    /// The orchestrator's explanation.
    pub detail: String,
    /// When the refusal arrived.
    pub at: DateTime<Utc>,
    /// Why the refused rotation was started: a retry that can help starts the same.
    pub reason_for_retry: RotationReason,
    /// The escrow key the refused backup was sealed to: an unopenable backup is retried only
    /// once the agent has learnt another.
    pub sealed_to: fleetlaps_proto::seal::EscrowPublicKey,
}

/// A backup the orchestrator has not yet confirmed storing: re-sent until it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnconfirmedBackup {
    /// The backup event (the password in it is sealed).
    pub envelope: Envelope,
    /// When it was last handed to JetStream.
    pub last_sent: DateTime<Utc>,
}

/// The agent's state store. Cheap to clone.
#[derive(Clone)]
pub struct AgentState {
    db: StateDb,
    tree: sled::Tree,
    device_id: DeviceId,
    /// This running copy's id, stamped on every event it emits; new each time the state opens.
    instance: InstanceId,
    /// Failures a test armed; none in production.
    faults: Faults,
    /// The outbox's bound (`outbox_limit`).
    outbox_limit: usize,
}

/// A sled database holding the states of one device ([`AgentState::open`]) or of many (the
/// simulator's, [`AgentState::open_in`]), whose flushes are made one at a time.
///
/// Why: every durable write flushes the whole database, and sled runs each `flush_async` on its
/// small shared I/O pool, where it waits for the log write it needs. Thousands of devices
/// flushing at once filled that pool with waiting flushes while the log write queued behind
/// them: a deadlock, seen with 100 simulated devices. One flush at a time covers every write
/// made before it began, so writers waiting meanwhile share the next one (group commit).
#[derive(Clone)]
pub struct StateDb {
    /// The database.
    db: sled::Db,
    /// Its flushes, one at a time.
    flushes: Arc<GroupFlush>,
}

/// Serialized flushes shared by the writers of one database.
#[derive(Default)]
struct GroupFlush {
    /// How many flushes have started; read after a write to know which flush covers it.
    started: AtomicU64,
    /// Held while a flush runs; counts the flushes completed.
    completed: tokio::sync::Mutex<u64>,
}

impl StateDb {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        Ok(Self {
            db: sled::open(path)?,
            flushes: Arc::default(),
        })
    }

    /// Returns once every write made before the call is on disk: after a flush that started
    /// after the call, this caller's or another's.
    async fn flush(&self) -> Result<(), StateError> {
        let ticket = self.flushes.started.load(Ordering::SeqCst);
        let mut completed = self.flushes.completed.lock().await;
        // No flush runs while the lock is free, so `completed` flushes have also started; the
        // one numbered `ticket + 1` started after this write.
        if *completed > ticket {
            return Ok(());
        }
        self.flushes.started.fetch_add(1, Ordering::SeqCst);
        self.db.flush_async().await?;
        *completed += 1;
        Ok(())
    }
}

impl AgentState {
    /// Opens (or creates) the state in `dir` for the enrolled device `device_id`. A new state
    /// records the id; a state that holds another device's id is refused, since its sequence,
    /// outbox and rotations belong to that device.
    ///
    /// A new state starts a generation numbered by the time it is made (milliseconds since the
    /// Unix epoch), so a state made afresh next to an existing identity (its directory deleted)
    /// emits events that order after everything the centre saw from the lost one.
    pub fn open(dir: &Path, device_id: &DeviceId) -> Result<Self, StateError> {
        let db = StateDb::open(&dir.join("state"))?;
        Self::open_in(&db, AGENT_TREE, device_id)
    }

    /// Opens the state kept in the tree `tree_name` of `db`, which other states may share (the
    /// simulator keeps one tree per simulated device in one database, so a fleet costs one set
    /// of sled threads, not one per device). The same checks as [`Self::open`]: a tree of
    /// another device is refused.
    pub fn open_in(db: &StateDb, tree_name: &str, device_id: &DeviceId) -> Result<Self, StateError> {
        let tree = db.db.open_tree(tree_name)?;
        match tree.get(DEVICE_ID_KEY)? {
            Some(bytes) => {
                let stored = DeviceId::parse(&String::from_utf8_lossy(&bytes)).map_err(|err| StateError::Corrupt {
                    key: "m/device_id".to_owned(),
                    detail: err.to_string(),
                })?;
                if stored != *device_id {
                    return Err(StateError::OtherDevice {
                        stored,
                        enrolled: device_id.clone(),
                    });
                }
            }
            None => {
                let generation = u64::try_from(Utc::now().timestamp_millis()).unwrap_or_default();
                let mut batch = sled::Batch::default();
                batch.insert(DEVICE_ID_KEY, device_id.as_str().as_bytes());
                batch.insert(GENERATION_KEY, &generation.to_be_bytes());
                tree.apply_batch(batch)?;
                db.db.flush()?;
            }
        }
        Ok(Self {
            db: db.clone(),
            tree,
            device_id: device_id.clone(),
            instance: InstanceId::new(),
            faults: Faults::none(),
            outbox_limit: DEFAULT_OUTBOX_LIMIT,
        })
    }

    /// The same state with the outbox bounded by `limit` (`outbox_limit`).
    #[must_use]
    pub fn with_outbox_limit(mut self, limit: usize) -> Self {
        self.outbox_limit = limit;
        self
    }

    /// How many events were dropped because the outbox was full, since the state was made.
    pub fn outbox_dropped(&self) -> Result<u64, StateError> {
        Ok(self.tree.get(OUTBOX_DROPPED_KEY)?.map_or(0, |bytes| decode_u64(&bytes)))
    }

    /// The same state with `faults` armed (tests).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// The position the next event will have.
    pub fn next_position(&self) -> Result<DevicePosition, StateError> {
        Ok(DevicePosition {
            generation: self.generation()?,
            sequence: self.tree.get(NEXT_SEQUENCE_KEY)?.map_or(1, |bytes| decode_u64(&bytes)),
        })
    }

    /// Starts generation `generation` after a detected rollback, together with the event that
    /// reports it (the first of the new generation) and the rotation it owes, which stays owed
    /// across restarts until a rotation completes.
    pub async fn start_generation(
        &self,
        generation: u64,
        time: DateTime<Utc>,
        event: Event,
    ) -> Result<Envelope, StateError> {
        let mut batch = sled::Batch::default();
        batch.insert(GENERATION_KEY, &generation.to_be_bytes());
        batch.insert(ROLLBACK_DUE_KEY, encode(&time));
        let envelope = self.envelope_at(&mut batch, generation, time, event)?;
        self.commit(batch).await?;
        Ok(envelope)
    }

    /// Whether a detected rollback still owes a rotation.
    pub fn rollback_due(&self) -> Result<bool, StateError> {
        Ok(self.tree.contains_key(ROLLBACK_DUE_KEY)?)
    }

    fn generation(&self) -> Result<u64, StateError> {
        Ok(self.tree.get(GENERATION_KEY)?.map_or(0, |bytes| decode_u64(&bytes)))
    }

    /// The orchestrator's refusal of the last backup, if the last backup was refused.
    pub fn backup_refused(&self) -> Result<Option<RefusedBackup>, StateError> {
        self.get(BACKUP_REFUSED_KEY)
    }

    /// Forgets a refusal (the agent restarted, or an administrator asked for a rotation).
    pub async fn clear_backup_refused(&self) -> Result<(), StateError> {
        if self.tree.remove(BACKUP_REFUSED_KEY)?.is_some() {
            self.db.flush().await?;
        }
        Ok(())
    }

    /// Whether the orchestrator confirmed storing the backup `event_id` (or it was never one
    /// this state waits for).
    pub fn backup_is_confirmed(&self, event_id: &EventId) -> Result<bool, StateError> {
        Ok(!self.tree.contains_key(unconfirmed_key(event_id))?)
    }

    /// Gives up the pending rotation whose backup the orchestrator refused: the account never
    /// had its password. Records the refusal and queues `failed`, in one durable batch.
    pub async fn abandon_rotation(
        &self,
        backup_event_id: &EventId,
        refused: &RefusedBackup,
        failed: Event,
    ) -> Result<Option<Envelope>, StateError> {
        let mut batch = sled::Batch::default();
        let envelope = self.envelope(&mut batch, refused.at, failed)?;
        batch.remove(PENDING_KEY);
        batch.remove(unconfirmed_key(backup_event_id));
        batch.insert(BACKUP_REFUSED_KEY, encode(refused));
        self.commit(batch).await?;
        Ok(envelope)
    }

    /// This device's id.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// The applied credential, if any.
    pub fn current(&self) -> Result<Option<CurrentCredential>, StateError> {
        self.get(CURRENT_KEY)
    }

    /// The rotation in progress, if any.
    pub fn pending(&self) -> Result<Option<PendingRotation>, StateError> {
        self.get(PENDING_KEY)
    }

    /// Queues one event in the outbox, durably, and returns it; `None` when the outbox had no room
    /// for it (see the module docs), which is then only counted.
    pub async fn emit(&self, time: DateTime<Utc>, event: Event) -> Result<Option<Envelope>, StateError> {
        let mut batch = sled::Batch::default();
        let envelope = self.envelope(&mut batch, time, event)?;
        self.commit(batch).await?;
        Ok(envelope)
    }

    /// Records a rotation as pending together with its backup event, durably.
    pub async fn begin_rotation(
        &self,
        time: DateTime<Utc>,
        pending: impl FnOnce(u64, EventId) -> PendingRotation,
        backup: Event,
    ) -> Result<(PendingRotation, Envelope), StateError> {
        let mut batch = sled::Batch::default();
        let envelope = self.essential_envelope(&mut batch, time, backup)?;
        let pending = pending(envelope.sequence, envelope.id);
        batch.insert(PENDING_KEY, encode(&pending));
        let unconfirmed = UnconfirmedBackup {
            envelope: envelope.clone(),
            last_sent: time,
        };
        batch.insert(unconfirmed_key(&envelope.id), encode(&unconfirmed));
        self.commit(batch).await?;
        Ok((pending, envelope))
    }

    /// Records that the pending rotation's password is on the account, with its commit event; a
    /// rollback's or a refusal's owed rotation is then paid. A rotation a command caused
    /// ([`PasswordRotated::command_id`]) records that command as executed in the same batch.
    pub async fn complete_rotation(
        &self,
        time: DateTime<Utc>,
        current: &CurrentCredential,
        rotated: PasswordRotated,
    ) -> Result<Envelope, StateError> {
        let mut batch = sled::Batch::default();
        if let Some(command_id) = &rotated.command_id {
            batch.insert(executed_key(command_id), encode(&time));
        }
        let envelope = self.essential_envelope(&mut batch, time, Event::PasswordRotated(rotated))?;
        batch.insert(CURRENT_KEY, encode(current));
        batch.remove(PENDING_KEY);
        batch.remove(ROLLBACK_DUE_KEY);
        batch.remove(BACKUP_REFUSED_KEY);
        self.commit(batch).await?;
        Ok(envelope)
    }

    /// Backups not yet confirmed stored by the orchestrator, oldest first.
    pub fn unconfirmed_backups(&self) -> Result<Vec<UnconfirmedBackup>, StateError> {
        let mut backups: Vec<UnconfirmedBackup> = self
            .tree
            .scan_prefix(UNCONFIRMED_PREFIX)
            .values()
            .map(|value| decode("u/", &value?))
            .collect::<Result<_, _>>()?;
        backups.sort_by_key(|backup| backup.envelope.sequence);
        Ok(backups)
    }

    /// Notes that a backup was handed to JetStream again. Not flushed (see the module's notes on
    /// writes a crash may lose): lost, the backup is only sent again sooner.
    pub fn backup_resent(&self, event_id: &EventId, time: DateTime<Utc>) -> Result<(), StateError> {
        let key = unconfirmed_key(event_id);
        if let Some(mut backup) = self.get::<UnconfirmedBackup>(&key)? {
            backup.last_sent = time;
            self.tree.insert(key, encode(&backup))?;
        }
        Ok(())
    }

    /// Forgets a backup the orchestrator confirmed storing. Returns whether it was waiting. Not
    /// flushed: lost, the agent asks the orchestrator again, which answers from its password
    /// version; the commit that follows a confirmation is flushed, and carries this with it.
    pub fn backup_confirmed(&self, event_id: &EventId) -> Result<bool, StateError> {
        Ok(self.tree.remove(unconfirmed_key(event_id))?.is_some())
    }

    /// Whether a command was already executed.
    pub fn command_executed(&self, command_id: &CommandId) -> Result<bool, StateError> {
        Ok(self.tree.contains_key(executed_key(command_id))?)
    }

    /// When `fleetlaps-agent reset` last rotated.
    pub fn last_manual_reset(&self) -> Result<Option<DateTime<Utc>>, StateError> {
        self.get(LAST_MANUAL_RESET_KEY)
    }

    /// Notes a manual reset, for throttling.
    pub async fn manual_reset_at(&self, time: DateTime<Utc>) -> Result<(), StateError> {
        self.tree.insert(LAST_MANUAL_RESET_KEY, encode(&time))?;
        self.db.flush().await?;
        Ok(())
    }

    /// Reads a record that another module keeps under its own key prefix (such as `p/` for
    /// post-authentication). Prefixes `m/`, `o/` and `u/` belong to this module.
    pub fn get_record<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        self.get(key.as_bytes())
    }

    /// Writes such a record, durably, together with an event queued in the outbox (if any):
    /// the record and the event are on disk together or not at all.
    pub async fn put_record<T: Serialize>(
        &self,
        key: &str,
        record: Option<&T>,
        time: DateTime<Utc>,
        event: Option<Event>,
    ) -> Result<Option<Envelope>, StateError> {
        let mut batch = sled::Batch::default();
        match record {
            Some(record) => batch.insert(key.as_bytes(), encode(record)),
            None => batch.remove(key.as_bytes()),
        }
        let envelope = match event {
            Some(event) => self.envelope(&mut batch, time, event)?,
            None => None,
        };
        self.commit(batch).await?;
        Ok(envelope)
    }

    /// The oldest event not yet acknowledged by JetStream.
    pub fn outbox_first(&self) -> Result<Option<Envelope>, StateError> {
        match self.tree.scan_prefix(OUTBOX_PREFIX).next().transpose()? {
            Some((key, value)) => {
                let envelope = Envelope::from_json(&value).map_err(|err| StateError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: err.to_string(),
                })?;
                if envelope.event.kind() == EventKind::PasswordBackedUp {
                    self.faults.check(FailPoint::OutboxRead)?;
                }
                Ok(Some(envelope))
            }
            None => Ok(None),
        }
    }

    /// Whether the event with device sequence `sequence` is still in the outbox.
    pub fn in_outbox(&self, sequence: u64) -> Result<bool, StateError> {
        Ok(self.tree.contains_key(outbox_key(sequence))?)
    }

    /// Removes an acknowledged event from the outbox. Not flushed: lost, the event is published
    /// again, and the centre drops it as a duplicate by its id, as it does when an ack is lost.
    pub fn acknowledged(&self, envelope: &Envelope) -> Result<(), StateError> {
        if envelope.event.kind() == EventKind::PasswordBackedUp {
            self.faults.check(FailPoint::OutboxAck)?;
        }
        self.tree.remove(outbox_key(envelope.sequence))?;
        Ok(())
    }

    /// How many events wait in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.tree.scan_prefix(OUTBOX_PREFIX).count()
    }

    /// Queues `event` in `batch` if the outbox admits it ([`outbox_admits`]); otherwise counts
    /// it as dropped in `batch` and returns `None`.
    fn envelope(
        &self,
        batch: &mut sled::Batch,
        time: DateTime<Utc>,
        event: Event,
    ) -> Result<Option<Envelope>, StateError> {
        let kind = event.kind();
        let pending = self.outbox_len();
        if !outbox_admits(kind, pending, self.outbox_limit) {
            let dropped = self.outbox_dropped()?.saturating_add(1);
            batch.insert(OUTBOX_DROPPED_KEY, &dropped.to_be_bytes());
            tracing::warn!(%kind, pending, limit = self.outbox_limit, dropped, "outbox full: event dropped, its places are kept for backups");
            return Ok(None);
        }
        self.essential_envelope(batch, time, event).map(Some)
    }

    /// Queues `event` in `batch` whatever the outbox holds: for essential events only.
    fn essential_envelope(
        &self,
        batch: &mut sled::Batch,
        time: DateTime<Utc>,
        event: Event,
    ) -> Result<Envelope, StateError> {
        let generation = self.generation()?;
        self.envelope_at(batch, generation, time, event)
    }

    fn envelope_at(
        &self,
        batch: &mut sled::Batch,
        generation: u64,
        time: DateTime<Utc>,
        event: Event,
    ) -> Result<Envelope, StateError> {
        let sequence = self.tree.get(NEXT_SEQUENCE_KEY)?.map_or(1, |bytes| decode_u64(&bytes));
        let position = DevicePosition { generation, sequence };
        let envelope = Envelope::at(self.device_id.clone(), position, time, event).emitted_by(self.instance);
        batch.insert(NEXT_SEQUENCE_KEY, &(sequence + 1).to_be_bytes());
        batch.insert(outbox_key(sequence), envelope.to_json());
        Ok(envelope)
    }

    async fn commit(&self, batch: sled::Batch) -> Result<(), StateError> {
        self.tree.apply_batch(batch)?;
        self.db.flush().await?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StateError> {
        self.tree
            .get(key)?
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|err| StateError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    detail: err.to_string(),
                })
            })
            .transpose()
    }
}

fn unconfirmed_key(event_id: &EventId) -> Vec<u8> {
    let mut key = UNCONFIRMED_PREFIX.to_vec();
    key.extend_from_slice(event_id.as_bytes());
    key
}

fn executed_key(command_id: &CommandId) -> Vec<u8> {
    format!("x/{command_id}").into_bytes()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|err| StateError::Corrupt {
        key: key.to_owned(),
        detail: err.to_string(),
    })
}

fn outbox_key(sequence: u64) -> Vec<u8> {
    let mut key = OUTBOX_PREFIX.to_vec();
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("state records serialise: string keys only")
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    let len = bytes.len().min(8);
    array[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(array)
}

#[cfg(test)]
mod tests {
    use fleetlaps_proto::event::{RotationFailed, RotationStage};

    use super::*;

    fn failed() -> Event {
        Event::RotationFailed(RotationFailed {
            rotation_id: None,
            stage: RotationStage::Prepare,
            error: "x".to_owned(),
        })
    }

    #[tokio::test]
    async fn events_get_increasing_sequences_and_leave_the_outbox_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let state = AgentState::open(dir.path(), &test_device()).unwrap();
        let first = state.emit(Utc::now(), failed()).await.unwrap().unwrap();
        let second = state.emit(Utc::now(), failed()).await.unwrap().unwrap();
        assert_eq!((first.sequence, second.sequence), (1, 2));
        assert_eq!(state.outbox_len(), 2);
        assert_eq!(state.outbox_first().unwrap().unwrap().id, first.id);
        state.acknowledged(&first).unwrap();
        assert_eq!(state.outbox_first().unwrap().unwrap().id, second.id);
    }

    fn test_device() -> DeviceId {
        DeviceId::parse("dev-1").unwrap()
    }

    #[tokio::test]
    async fn a_commanded_rotations_commit_records_its_command_executed_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let command_id = CommandId::new();
        let other_command = CommandId::new();
        {
            let state = AgentState::open(dir.path(), &test_device()).unwrap();
            for command in [None, Some(command_id)] {
                let rotation_id = RotationId::new();
                let account_name = AccountName::parse("lapsadmin").unwrap();
                let current = CurrentCredential {
                    rotation_id,
                    account_name: account_name.clone(),
                    applied_at: Utc::now(),
                    expires_at: Utc::now(),
                };
                let rotated = PasswordRotated {
                    rotation_id,
                    account_name,
                    command_id: command,
                };
                let envelope = state
                    .complete_rotation(Utc::now(), &current, rotated.clone())
                    .await
                    .unwrap();
                assert_eq!(
                    envelope.event,
                    Event::PasswordRotated(rotated),
                    "the commit names its command"
                );
            }
        }
        let reopened = AgentState::open(dir.path(), &test_device()).unwrap();
        assert!(
            reopened.command_executed(&command_id).unwrap(),
            "recorded with the commit"
        );
        assert!(!reopened.command_executed(&other_command).unwrap());
        assert_eq!(reopened.outbox_len(), 2, "one event per rotation, no command_executed");
    }

    #[test]
    fn a_state_of_another_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(AgentState::open(dir.path(), &test_device()).unwrap());
        let err = AgentState::open(dir.path(), &DeviceId::parse("dev-2").unwrap())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("belongs to device dev-1"), "{err}");
    }

    #[tokio::test]
    async fn devices_sharing_one_database_keep_their_own_state_in_their_own_tree() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("fleet")).unwrap();
        let first = AgentState::open_in(&db, "dev-1", &test_device()).unwrap();
        let second_id = DeviceId::parse("dev-2").unwrap();
        let second = AgentState::open_in(&db, "dev-2", &second_id).unwrap();
        first.emit(Utc::now(), failed()).await.unwrap();
        first.emit(Utc::now(), failed()).await.unwrap();
        assert_eq!(
            second
                .emit(Utc::now(), failed())
                .await
                .unwrap()
                .expect("room in the outbox")
                .sequence,
            1
        );
        assert_eq!((first.outbox_len(), second.outbox_len()), (2, 1));
        drop((first, second));
        let reopened = AgentState::open_in(&db, "dev-1", &test_device()).unwrap();
        assert_eq!(reopened.outbox_len(), 2);
        let err = AgentState::open_in(&db, "dev-2", &test_device())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("belongs to device dev-2"), "{err}");
    }

    #[tokio::test]
    async fn identity_sequence_and_outbox_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (device_id, envelope) = {
            let state = AgentState::open(dir.path(), &test_device()).unwrap();
            (
                state.device_id().clone(),
                state.emit(Utc::now(), failed()).await.unwrap().unwrap(),
            )
        };
        let state = AgentState::open(dir.path(), &test_device()).unwrap();
        assert_eq!(state.device_id(), &device_id);
        assert_eq!(state.outbox_first().unwrap().unwrap().id, envelope.id);
        assert_eq!(state.emit(Utc::now(), failed()).await.unwrap().unwrap().sequence, 2);
    }

    #[test]
    fn reports_leave_the_reserved_places_free_and_essential_events_always_fit() {
        assert!(outbox_admits(EventKind::AuthenticationSucceeded, 0, 3));
        assert!(!outbox_admits(EventKind::AuthenticationSucceeded, 1, 3));
        assert!(outbox_admits(EventKind::PolicyApplied, 7, 10));
        assert!(!outbox_admits(EventKind::PolicyApplied, 8, 10));
        for kind in [
            EventKind::PasswordBackedUp,
            EventKind::PasswordRotated,
            EventKind::ImageRollbackDetected,
        ] {
            assert!(outbox_admits(kind, 10, 10), "{kind}");
        }
        assert!(!outbox_admits(EventKind::RotationFailed, usize::MAX, 10));
    }

    #[tokio::test]
    async fn a_full_outbox_drops_and_counts_reports_without_numbering_them_and_keeps_essential_events() {
        let dir = tempfile::tempdir().unwrap();
        let state = AgentState::open(dir.path(), &test_device())
            .unwrap()
            .with_outbox_limit(4);
        let mut kept = Vec::new();
        for _ in 0..5 {
            kept.extend(state.emit(Utc::now(), failed()).await.unwrap());
        }
        assert_eq!(
            kept.iter().map(|envelope| envelope.sequence).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!((state.outbox_len(), state.outbox_dropped().unwrap()), (2, 3));
        let position = DevicePosition {
            generation: 0,
            sequence: 0,
        };
        let rollback = Event::ImageRollbackDetected(fleetlaps_proto::event::ImageRollbackDetected {
            local_rotation_id: None,
            centre_rotation_id: None,
            local_position: position,
            centre_position: position,
            new_generation: 1,
        });
        let essential = state.emit(Utc::now(), rollback).await.unwrap().expect("always queued");
        assert_eq!(essential.sequence, 3, "no gap where reports were dropped");
        assert_eq!(state.outbox_len(), 3);
    }
}
