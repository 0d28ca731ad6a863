//! The sled store behind the projections, and the fold that applies one stream message.
//!
//! One sled tree holds every projection under a key prefix, so that applying a message is one
//! atomic batch: either every record it changes is written, or none is.
//!
//! Keys:
//! - `m/last_sequence`: the stream sequence of the last applied (or refused) message;
//! - `m/layout`: the layout version of these keys ([`LAYOUT_VERSION`]); a store of another
//!   layout is emptied at open and rebuilt from the stream;
//! - `d/<device>`: a [`DeviceRecord`];
//! - `c/<device>/<sequence>`: a [`CredentialRecord`], the sequence big-endian so keys sort by it;
//! - `r/<device>/<rotation>`: the `c/` key of a rotation's credential;
//! - `e/<event id>`: marks an applied event id, for idempotence;
//! - `q/<sequence>`: a [`QuarantineRecord`], at most `quarantine.max_entries` of them;
//! - `m/quarantine_len`: how many `q/` records there are;
//! - `qd/<reason>`: how many quarantine records of that reason were dropped to keep the bound;
//! - `a/<sequence>`: an orchestrator event ([`AuditEnvelope`]): the audit history;
//! - `t/<token id>`: a [`TokenRecord`], an API or enrollment token; `h/<token sha256>`: the id
//!   of the token with that digest;
//! - `k/<device>`: an [`EnrolledKeyRecord`], the key the device's events must be signed with;
//! - `w/<device>`: when a rotation of the device was last requested (the rotate throttle);
//! - `rc/<device>`: a clone detected and not yet reported on the history.
//! - `x/<escrow public key>`: an [`EscrowKeyRecord`], a key the history recorded;
//! - `o/key`: the [`OrchestratorKeyRecord`], the key orchestrator events must be signed with.
//!
//! An orchestrator event counts only when it is signed by the recorded orchestrator key; the
//! first `orchestrator_key_created` on the stream, signed by the key it names, records that key
//! (trust on first use), and a later one must be signed by the key recorded before it. Anything
//! else on `laps.audit.>`, and any orchestrator event before a key is recorded, is quarantined
//! as forged.
//!
//! Devices are created by `device_enrolled` events only. A device event counts only when it is
//! signed by its subject's device's enrolled key and names that device, and a backup only when
//! its sealed password opens with the escrow key; anything else is quarantined. An event id seen
//! before is a duplicate (nothing changes). An event at or before the device's newest position
//! (a clone, or a rolled-back copy that has not noticed yet) is applied all the same, so no
//! backup is dropped, and the device's position never moves back.

use std::path::Path;

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, AuditKind, CloneSource, DeviceCloneDetected, TokenId};
use fleetlaps_proto::command::{BackupConfirmation, BackupOutcome, BackupRefusal};
use fleetlaps_proto::event::{DecodeError, Envelope, Event, EventKind, RotationStage, sealing_context};
use fleetlaps_proto::ids::{DeviceId, EventId, RotationId};
use fleetlaps_proto::seal::{EscrowPublicKey, EscrowSecretKey, SealedBox};
use fleetlaps_proto::signature::{DevicePublicKey, OrchestratorPublicKey};
use fleetlaps_proto::subject;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::credentials::CredentialRecord;
use super::devices::{DeviceRecord, FailureRecord};
use super::escrow_keys::EscrowKeyRecord;
use super::orchestrator_key::OrchestratorKeyRecord;
use super::principals::{EnrolledKeyRecord, TokenKind, TokenRecord};
use super::quarantine::{self, QuarantineReason, QuarantineRecord};

const LAST_SEQUENCE_KEY: &[u8] = b"m/last_sequence";
const QUARANTINE_LEN_KEY: &[u8] = b"m/quarantine_len";
/// Where the layout version is kept.
const LAYOUT_KEY: &[u8] = b"m/layout";
/// The layout of the keys above. Raised when a change of keys or records needs a rebuild: 2
/// keeps API and enrollment tokens as one record under `t/`.
const LAYOUT_VERSION: u64 = 2;
const ORCHESTRATOR_KEY_KEY: &str = "o/key";

/// A failure of the store itself (not of a message: those are quarantined).
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// sled failed.
    #[error("projection store: {0}")]
    Store(#[from] sled::Error),
    /// A stored record does not decode: the store is corrupt or from another version.
    #[error("projection store: corrupt record under {key}: {source}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
}

/// One message as read from the stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamMessage<'a> {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its subject.
    pub subject: &'a str,
    /// When the stream stored it.
    pub published: DateTime<Utc>,
    /// Its bytes.
    pub payload: &'a [u8],
    /// Its `Fleetlaps-Signature` header, if it has one (device and orchestrator events must).
    pub signature: Option<&'a str>,
}

/// Whether a sealed password opens with the escrow keys, tried without disclosing it: how the
/// fold knows a backup is usable before it confirms it to its device.
pub trait SealCheck {
    /// Whether the secret half of `public_key` is held, so a backup sealed to it can be tried.
    fn holds(&self, public_key: &EscrowPublicKey) -> bool;

    /// Whether `sealed` opens with one of the held keys, with `context` as its associated data.
    fn opens(&self, sealed: &SealedBox, context: &[u8]) -> bool;
}

impl SealCheck for EscrowSecretKey {
    fn holds(&self, public_key: &EscrowPublicKey) -> bool {
        self.public_key() == *public_key
    }

    fn opens(&self, sealed: &SealedBox, context: &[u8]) -> bool {
        self.open(sealed, context).is_ok()
    }
}

impl SealCheck for crate::escrow::EscrowKeyring {
    fn holds(&self, public_key: &EscrowPublicKey) -> bool {
        Self::holds(self, public_key)
    }

    fn opens(&self, sealed: &SealedBox, context: &[u8]) -> bool {
        self.open(sealed, context).is_ok()
    }
}

/// Why a message is quarantined, and for a device's backup the refusal its device waits for.
#[derive(Debug)]
struct Refusal {
    /// The metric label.
    reason: QuarantineReason,
    /// A payload-free explanation.
    detail: String,
    /// For a backup of an enrolled device, signed by it: the negative confirmation it waits for.
    confirmation: Option<BackupConfirmation>,
}

impl From<(QuarantineReason, String)> for Refusal {
    fn from((reason, detail): (QuarantineReason, String)) -> Self {
        Self {
            reason,
            detail,
            confirmation: None,
        }
    }
}

/// What applying a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event changed the projections.
    Applied(EventKind),
    /// An orchestrator event was added to the audit history (and changed what it changes).
    Recorded(AuditKind),
    /// An event with the same id was applied before (a re-sent event); nothing changed.
    Duplicate,
    /// The message's stream sequence is not after the last applied one (redelivery); skipped.
    AlreadySeen,
    /// The message was refused and recorded in the quarantine.
    Quarantined(QuarantineReason),
}

/// What applying one message did, and what to tell its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The effect on the projections.
    pub outcome: Outcome,
    /// For a backup: the confirmation (stored, or refused and why) its device waits for. Send
    /// it only after the projections are flushed.
    pub confirmation: Option<BackupConfirmation>,
    /// The device whose record the message changed, whose current password version is then
    /// published again.
    pub device_id: Option<DeviceId>,
    /// Whether it was a device event older than its device's newest one (applied anyway).
    pub out_of_order: bool,
    /// The clone the event showed, if it showed a new one.
    pub clone: Option<DeviceCloneDetected>,
}

impl Applied {
    fn outcome(outcome: Outcome) -> Self {
        Self {
            outcome,
            confirmation: None,
            device_id: None,
            out_of_order: false,
            clone: None,
        }
    }
}

/// The projections, in a sled database. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct Projections {
    db: sled::Db,
    tree: sled::Tree,
    /// The last applied stream sequence, for those waiting to read their own writes.
    position: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// The most quarantine records kept; older ones are dropped and counted.
    quarantine_max_entries: u64,
}

impl Projections {
    /// Opens (or creates) the projections at `path`.
    pub fn open(path: &Path) -> Result<Self, ProjectionError> {
        let db = sled::open(path)?;
        let tree = db.open_tree("projections")?;
        let layout = tree.get(LAYOUT_KEY)?.map(|bytes| decode_u64(&bytes));
        if layout != Some(LAYOUT_VERSION) {
            if !tree.is_empty() {
                tracing::warn!(
                    found = layout.unwrap_or(1),
                    wanted = LAYOUT_VERSION,
                    "the projections have an older layout: emptied, they are rebuilt from the stream"
                );
                tree.clear()?;
            }
            tree.insert(LAYOUT_KEY, &LAYOUT_VERSION.to_be_bytes())?;
            tree.flush()?;
        }
        let last = tree.get(LAST_SEQUENCE_KEY)?.map_or(0, |bytes| decode_u64(&bytes));
        let (position, _) = tokio::sync::watch::channel(last);
        Ok(Self {
            db,
            tree,
            position: std::sync::Arc::new(position),
            quarantine_max_entries: quarantine::DEFAULT_MAX_ENTRIES,
        })
    }

    /// Keeps at most `max_entries` quarantine records from now on (at least one). Give a replay
    /// the same bound as the run it rebuilds, or it keeps a different quarantine.
    #[must_use]
    pub fn with_quarantine_max_entries(mut self, max_entries: u64) -> Self {
        self.quarantine_max_entries = max_entries.max(1);
        self
    }

    /// The most quarantine records kept.
    pub fn quarantine_max_entries(&self) -> u64 {
        self.quarantine_max_entries
    }

    /// Waits until the message at stream `sequence` is folded in (so what it changed can be
    /// read), at most `timeout`. Returns whether it was.
    pub async fn wait_for_sequence(&self, sequence: u64, timeout: std::time::Duration) -> bool {
        let mut position = self.position.subscribe();
        tokio::time::timeout(timeout, position.wait_for(|applied| *applied >= sequence))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// The stream sequence of the last message folded in, from memory (no read of the store).
    pub fn applied_sequence(&self) -> u64 {
        *self.position.borrow()
    }

    /// The stream sequence of the last message folded in; 0 for a new store.
    pub fn last_applied_sequence(&self) -> Result<u64, ProjectionError> {
        Ok(self.tree.get(LAST_SEQUENCE_KEY)?.map_or(0, |bytes| decode_u64(&bytes)))
    }

    /// Folds one stream message into the projections, atomically. Not yet durable: call
    /// [`Self::flush`] before acknowledging the message. `escrow` tells whether a backup's sealed
    /// password opens, so a backup nobody could read is refused, not confirmed.
    pub fn apply(&self, message: StreamMessage<'_>, escrow: &dyn SealCheck) -> Result<Applied, ProjectionError> {
        if message.sequence <= self.last_applied_sequence()? {
            return Ok(Applied::outcome(Outcome::AlreadySeen));
        }
        let mut batch = sled::Batch::default();
        batch.insert(LAST_SEQUENCE_KEY, &message.sequence.to_be_bytes());
        let applied = match self.fold(message, escrow, &mut batch)? {
            Ok(applied) => applied,
            Err(Refusal {
                reason,
                detail,
                confirmation,
            }) => {
                let record = QuarantineRecord {
                    stream_sequence: message.sequence,
                    subject: message.subject.to_owned(),
                    reason,
                    detail,
                    received_at: message.published,
                };
                // A refused message changes nothing but the quarantine and the position, and
                // for a backup its device really sent, the device's latest backup outcome, so
                // the device also finds the refusal in its current password version.
                batch = sled::Batch::default();
                batch.insert(LAST_SEQUENCE_KEY, &message.sequence.to_be_bytes());
                self.quarantine_into(&mut batch, &record)?;
                let mut refused_device = None;
                if let Some(confirmation) = &confirmation
                    && let Some(mut device) = self.device(&confirmation.device_id)?
                {
                    device.latest_backup = Some(confirmation.clone());
                    batch.insert(device_key(&confirmation.device_id).as_bytes(), encode(&device));
                    refused_device = Some(confirmation.device_id.clone());
                }
                Applied {
                    outcome: Outcome::Quarantined(reason),
                    confirmation,
                    device_id: refused_device,
                    out_of_order: false,
                    clone: None,
                }
            }
        };
        self.tree.apply_batch(batch)?;
        self.position.send_replace(message.sequence);
        Ok(applied)
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> Result<(), ProjectionError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Every device, ordered by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, ProjectionError> {
        self.tree
            .scan_prefix(b"d/")
            .values()
            .map(|value| decode("d/", &value?))
            .collect()
    }

    /// How many devices there are, without decoding their records.
    pub fn device_count(&self) -> usize {
        self.tree.scan_prefix(b"d/").keys().filter(Result::is_ok).count()
    }

    /// One device.
    pub fn device(&self, device_id: &DeviceId) -> Result<Option<DeviceRecord>, ProjectionError> {
        self.get(&device_key(device_id))
    }

    /// The clones detected that are not yet reported on the history.
    pub fn due_clone_reports(&self) -> Result<Vec<DeviceCloneDetected>, ProjectionError> {
        self.tree
            .scan_prefix(b"rc/")
            .map(|entry| {
                let (key, value) = entry?;
                decode(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    /// A device's credentials, newest backup first, at most `limit`.
    pub fn credentials(&self, device_id: &DeviceId, limit: usize) -> Result<Vec<CredentialRecord>, ProjectionError> {
        let prefix = format!("c/{device_id}/");
        self.tree
            .scan_prefix(prefix.as_bytes())
            .values()
            .rev()
            .take(limit)
            .map(|value| decode(&prefix, &value?))
            .collect()
    }

    /// Every quarantined message kept, oldest first.
    pub fn quarantine(&self) -> Result<Vec<QuarantineRecord>, ProjectionError> {
        self.quarantine_after(0, usize::MAX)
    }

    /// At most `limit` quarantined messages after stream sequence `after`, oldest first.
    pub fn quarantine_after(&self, after: u64, limit: usize) -> Result<Vec<QuarantineRecord>, ProjectionError> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.tree
            .range(quarantine_key(start)..)
            .take_while(|entry| entry.as_ref().map_or(true, |(key, _)| key.starts_with(b"q/")))
            .take(limit)
            .map(|entry| decode("q/", &entry?.1))
            .collect()
    }

    /// How many quarantine records were dropped to keep the bound, by reason (every reason, zeros
    /// included).
    pub fn quarantine_dropped(&self) -> Result<Vec<(QuarantineReason, u64)>, ProjectionError> {
        QuarantineReason::ALL
            .into_iter()
            .map(|reason| {
                let count = self
                    .tree
                    .get(quarantine_dropped_key(reason))?
                    .map_or(0, |bytes| decode_u64(&bytes));
                Ok((reason, count))
            })
            .collect()
    }

    /// How many quarantine records are kept.
    pub fn quarantine_len(&self) -> Result<u64, ProjectionError> {
        match self.tree.get(QUARANTINE_LEN_KEY)? {
            Some(bytes) => Ok(decode_u64(&bytes)),
            // A store from before the bound: count once; the next record writes the length.
            None => Ok(self.tree.scan_prefix(b"q/").keys().count() as u64),
        }
    }

    /// The token of either kind whose SHA-256 is `token_sha256` (hex), unusable ones included.
    pub fn token_by_digest(&self, token_sha256: &str) -> Result<Option<TokenRecord>, ProjectionError> {
        let Some(id) = self.tree.get(format!("h/{token_sha256}").as_bytes())? else {
            return Ok(None);
        };
        self.get(&format!("t/{}", String::from_utf8_lossy(&id)))
    }

    /// One token of either kind.
    pub fn token(&self, token_id: &TokenId) -> Result<Option<TokenRecord>, ProjectionError> {
        self.get(&format!("t/{token_id}"))
    }

    /// Every token of `kind` made through the API, oldest first (ids are time-ordered).
    pub fn tokens(&self, kind: TokenKind) -> Result<Vec<TokenRecord>, ProjectionError> {
        let mut tokens = Vec::new();
        for value in self.tree.scan_prefix(b"t/").values() {
            let record: TokenRecord = decode("t/", &value?)?;
            if record.kind == kind {
                tokens.push(record);
            }
        }
        Ok(tokens)
    }

    /// The key `device_id` enrolled with, if it did.
    pub fn enrolled_key(&self, device_id: &DeviceId) -> Result<Option<EnrolledKeyRecord>, ProjectionError> {
        self.get(&format!("k/{device_id}"))
    }

    /// The audit history after stream sequence `after`, oldest first, with each entry's
    /// sequence; at most `limit` entries.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditEnvelope)>, ProjectionError> {
        let start = audit_key(after.saturating_add(1));
        self.tree
            .range(start..)
            .take_while(|entry| entry.as_ref().map_or(true, |(key, _)| key.starts_with(b"a/")))
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                let sequence = std::str::from_utf8(&key[2..])
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .unwrap_or_default();
                Ok((sequence, decode("a/", &value)?))
            })
            .collect()
    }

    /// Every escrow public key the history recorded, oldest first.
    pub fn escrow_keys(&self) -> Result<Vec<EscrowKeyRecord>, ProjectionError> {
        let mut keys = self
            .tree
            .scan_prefix(b"x/")
            .values()
            .map(|value| decode::<EscrowKeyRecord>("x/", &value?))
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort_by_key(|key| key.stream_sequence);
        Ok(keys)
    }

    /// The key orchestrator events must be signed with, once the history recorded one.
    pub fn orchestrator_key(&self) -> Result<Option<OrchestratorKeyRecord>, ProjectionError> {
        self.get(ORCHESTRATOR_KEY_KEY)
    }

    /// A device's credential backed up at stream sequence `backup_stream_sequence`.
    pub fn credential(
        &self,
        device_id: &DeviceId,
        backup_stream_sequence: u64,
    ) -> Result<Option<CredentialRecord>, ProjectionError> {
        self.get(&credential_key(device_id, backup_stream_sequence))
    }

    /// When a rotation of `device_id` was last requested through the API.
    pub fn last_rotation_request(&self, device_id: &DeviceId) -> Result<Option<DateTime<Utc>>, ProjectionError> {
        self.get(&format!("w/{device_id}"))
    }

    /// A SHA-256 over every key and value: equal digests mean equal projections.
    pub fn digest(&self) -> Result<String, ProjectionError> {
        let mut hasher = Sha256::new();
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            hasher.update((key.len() as u64).to_be_bytes());
            hasher.update(&key);
            hasher.update((value.len() as u64).to_be_bytes());
            hasher.update(&value);
        }
        Ok(hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect())
    }

    /// Decides what a message does. `Ok(Err(..))` means: quarantine it.
    fn fold(
        &self,
        message: StreamMessage<'_>,
        escrow: &dyn SealCheck,
        batch: &mut sled::Batch,
    ) -> Result<Result<Applied, Refusal>, ProjectionError> {
        if let Some(kind) = subject::parse_audit_event(message.subject) {
            return Ok(self.fold_audit(kind, message, batch)?.map_err(Refusal::from));
        }
        let Some((subject_device, subject_kind)) = subject::parse_device_event(message.subject) else {
            return Ok(Err((
                QuarantineReason::UnknownSubject,
                "neither laps.events.<device>.<kind> nor laps.audit.<kind>".to_owned(),
            )
                .into()));
        };
        let envelope = match Envelope::from_json(message.payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                let (reason, detail) = describe_decode_error(&err);
                // A backup its device really sent but this orchestrator cannot read (another
                // schema, a wrong code): the device must hear that it was refused.
                let confirmation = (subject_kind == EventKind::PasswordBackedUp
                    && self.signed_by_enrolled_key(&subject_device, message)?.is_ok())
                .then(|| lenient_event_id(message.payload))
                .flatten()
                .map(|event_id| BackupConfirmation {
                    device_id: subject_device.clone(),
                    event_id,
                    rotation_id: None,
                    outcome: BackupOutcome::Refused {
                        reason: backup_refusal(reason),
                        detail: detail.clone(),
                    },
                });
                return Ok(Err(Refusal {
                    reason,
                    detail,
                    confirmation,
                }));
            }
        };
        // The subject's device must have enrolled, and signed exactly these bytes on exactly
        // this subject with its enrolled key.
        if self.enrolled_key(&subject_device)?.is_none() {
            return Ok(Err((
                QuarantineReason::UnknownDevice,
                format!("device {subject_device} never enrolled"),
            )
                .into()));
        };
        if let Err(detail) = self.signed_by_enrolled_key(&subject_device, message)? {
            return Ok(Err((QuarantineReason::Forged, detail).into()));
        }
        let stored = |rotation_id: RotationId| BackupConfirmation {
            device_id: subject_device.clone(),
            event_id: envelope.id,
            rotation_id: Some(rotation_id),
            outcome: BackupOutcome::Stored,
        };
        let refused = |rotation_id: Option<RotationId>, reason: BackupRefusal, detail: &str| BackupConfirmation {
            device_id: subject_device.clone(),
            event_id: envelope.id,
            rotation_id,
            outcome: BackupOutcome::Refused {
                reason,
                detail: detail.to_owned(),
            },
        };
        if envelope.device_id != subject_device || envelope.event.kind() != subject_kind {
            let detail = format!(
                "envelope names device {} kind {}",
                envelope.device_id,
                envelope.event.kind()
            );
            let confirmation = (subject_kind == EventKind::PasswordBackedUp)
                .then(|| refused(None, BackupRefusal::SubjectMismatch, &detail));
            return Ok(Err(Refusal {
                reason: QuarantineReason::SubjectMismatch,
                detail,
                confirmation,
            }));
        }
        let event_key = event_key(&envelope);
        if self.tree.contains_key(&event_key)? {
            // A device's own re-send (its confirmation was lost), or a replay: the same signed
            // bytes change nothing, and a backup's device hears again that it is stored.
            return Ok(Ok(Applied {
                outcome: Outcome::Duplicate,
                confirmation: match &envelope.event {
                    Event::PasswordBackedUp(body) => Some(stored(body.rotation_id)),
                    _ => None,
                },
                device_id: None,
                out_of_order: false,
                clone: None,
            }));
        }
        let mut confirmation = None;
        if let Event::PasswordBackedUp(body) = &envelope.event {
            // Confirmed only once it is known to open: a backup nobody can read is no backup.
            let context = sealing_context(&envelope.device_id, &body.rotation_id);
            if !self.backup_opens(body, &context, escrow)? {
                let detail = "the sealed password does not open with any escrow key of this orchestrator".to_owned();
                return Ok(Err(Refusal {
                    reason: QuarantineReason::Unopenable,
                    confirmation: Some(refused(Some(body.rotation_id), BackupRefusal::Unopenable, &detail)),
                    detail,
                }));
            }
            confirmation = Some(stored(body.rotation_id));
        }
        batch.insert(event_key, &message.sequence.to_be_bytes());

        let device_key = device_key(&envelope.device_id);
        let Some(mut device) = self.get::<DeviceRecord>(&device_key)? else {
            return Ok(Err((
                QuarantineReason::UnknownDevice,
                format!("device {} never enrolled", envelope.device_id),
            )
                .into()));
        };
        // An event older than the newest one applied, with a new id, comes from a second copy of
        // the device (a clone) or from a rolled-back copy that had not yet noticed: it is signed
        // by the device's key, so it is applied (a backup is never dropped); the position never
        // moves back.
        let position = envelope.position();
        let out_of_order = position <= device.last_position();
        if out_of_order {
            device.out_of_order_events = device.out_of_order_events.saturating_add(1);
        } else {
            device.last_generation = position.generation;
            device.last_sequence = position.sequence;
        }
        device.last_seen = device.last_seen.max(envelope.time);
        let clone = envelope.instance.and_then(|instance| {
            let source = CloneSource {
                instance,
                position,
                time: envelope.time,
            };
            device.heard_from(source, envelope.id)
        });
        if let Some(detected) = &clone {
            // Reported on the history by the consumer once it has caught up, unless a report
            // of it is already there (a rebuild meets it later and clears this).
            batch.insert(clone_report_key(&envelope.device_id).as_bytes(), encode(detected));
        }

        match &envelope.event {
            Event::PolicyApplied(body) => {
                device.device_name = body.device_name.clone();
                device.policy = Some((body.policy.clone(), body.source));
            }
            Event::PasswordBackedUp(body) => {
                let credential = CredentialRecord {
                    rotation_id: body.rotation_id,
                    stream_sequence: message.sequence,
                    account_name: body.account_name.clone(),
                    account_uid: body.account_uid,
                    backup_time: envelope.time,
                    expires_at: body.expires_at,
                    reason: body.reason,
                    sealed_password: body.sealed_password.clone(),
                    applied_at: None,
                };
                let credential_key = credential_key(&envelope.device_id, message.sequence);
                batch.insert(
                    rotation_key(&envelope.device_id, &body.rotation_id),
                    credential_key.as_bytes(),
                );
                batch.insert(credential_key.as_bytes(), encode(&credential));
                device.device_name = body.device_name.clone();
                device.account_name = Some(body.account_name.clone());
                device.account_uid = body.account_uid;
                device.last_backup = Some(envelope.time);
                device.refresh = Some(body.expires_at);
                device.latest_backup = confirmation.clone();
            }
            Event::PasswordRotated(body) => {
                let Some(credential_key) = self.tree.get(rotation_key(&envelope.device_id, &body.rotation_id))? else {
                    return Ok(Err((
                        QuarantineReason::UnknownRotation,
                        format!("rotation {} was never backed up", body.rotation_id),
                    )
                        .into()));
                };
                let key_text = String::from_utf8_lossy(&credential_key).into_owned();
                let mut credential: CredentialRecord =
                    self.get(&key_text)?.ok_or_else(|| ProjectionError::Corrupt {
                        key: key_text.clone(),
                        source: serde::de::Error::custom("rotation index points to no credential"),
                    })?;
                credential.applied_at = Some(envelope.time);
                batch.insert(credential_key, encode(&credential));
                device.current_rotation = Some(body.rotation_id);
                device.last_rotated = Some(envelope.time);
                device.last_failure = None;
            }
            Event::RotationFailed(body) => {
                device.last_failure = Some(FailureRecord {
                    time: envelope.time,
                    stage: body.stage,
                    error: body.error.clone(),
                });
            }
            Event::AccountMissing(body) => {
                device.last_failure = Some(FailureRecord {
                    time: envelope.time,
                    stage: RotationStage::Prepare,
                    error: format!("managed account {} does not exist", body.account),
                });
            }
            Event::AuthenticationSucceeded(body) => {
                device.last_authentication = Some(envelope.time);
                device.post_authentication_reset_at = body.reset_deadline;
            }
            Event::PostAuthenticationActionsSucceeded(_) => device.post_authentication_reset_at = None,
            Event::ImageRollbackDetected(_) => {
                device.image_rollbacks = device.image_rollbacks.saturating_add(1);
                device.last_image_rollback = Some(envelope.time);
            }
            // Kept in the stream for investigators; no projection needs them yet.
            Event::AuthenticationFailed(_)
            | Event::PostAuthenticationActionsStarted(_)
            | Event::PostAuthenticationActionsFailed(_)
            | Event::CommandExecuted(_) => {}
        }
        batch.insert(device_key.as_bytes(), encode(&device));
        Ok(Ok(Applied {
            outcome: Outcome::Applied(envelope.event.kind()),
            confirmation,
            device_id: Some(envelope.device_id),
            out_of_order,
            clone,
        }))
    }

    /// Whether a backup's sealed password is usable. Sealed to a key held: the trial decides.
    /// Sealed to a key the history recorded but not held (a key lost, then replaced by a
    /// recovery, whose backups are confirmed from before): accepted without a trial, unless the
    /// backup came after the key was lost. Sealed to any other key: refused. Naming no key (an
    /// older agent): the trial with every held key decides.
    fn backup_opens(
        &self,
        body: &fleetlaps_proto::event::PasswordBackedUp,
        context: &[u8],
        escrow: &dyn SealCheck,
    ) -> Result<bool, ProjectionError> {
        let Some(public_key) = &body.escrow_public_key else {
            return Ok(escrow.opens(&body.sealed_password, context));
        };
        if escrow.holds(public_key) {
            return Ok(escrow.opens(&body.sealed_password, context));
        }
        Ok(self
            .get::<EscrowKeyRecord>(&escrow_key_key(public_key))?
            .is_some_and(|record| record.lost_at_sequence.is_none()))
    }

    /// Whether `message` is signed, on exactly its subject, by the enrolled key of `device_id`:
    /// `Ok(Err(why))` when it is not.
    fn signed_by_enrolled_key(
        &self,
        device_id: &DeviceId,
        message: StreamMessage<'_>,
    ) -> Result<Result<(), String>, ProjectionError> {
        let Some(enrolled) = self.enrolled_key(device_id)? else {
            return Ok(Err(format!("device {device_id} never enrolled")));
        };
        Ok(
            match (DevicePublicKey::parse(&enrolled.public_key), message.signature) {
                (Err(err), _) => Err(format!("the enrolled key of device {device_id} is not usable: {err}")),
                (Ok(_), None) => Err(format!("no {} header", fleetlaps_proto::api::SIGNATURE_HEADER)),
                (Ok(key), Some(signature)) => key
                    .verify(message.subject, message.payload, signature)
                    .map_err(|err| err.to_string()),
            },
        )
    }

    /// Whether `message` (an orchestrator event, `envelope`) is signed, on exactly its subject, by
    /// the recorded orchestrator key; before any key is recorded, only an
    /// `orchestrator_key_created` signed by the key it names is (trust on first use).
    /// `Ok(Err(why))` when it is not.
    fn signed_by_orchestrator(
        &self,
        envelope: &AuditEnvelope,
        message: StreamMessage<'_>,
    ) -> Result<Result<(), String>, ProjectionError> {
        let public_key = match (self.orchestrator_key()?, &envelope.event) {
            (Some(recorded), _) => recorded.public_key,
            (None, AuditEvent::OrchestratorKeyCreated(body)) => body.public_key.clone(),
            (None, _) => return Ok(Err("no orchestrator key is recorded yet".to_owned())),
        };
        Ok(match (OrchestratorPublicKey::parse(&public_key), message.signature) {
            (Err(err), _) => Err(format!("orchestrator key: {err}")),
            (Ok(_), None) => Err(format!("no {} header", fleetlaps_proto::api::SIGNATURE_HEADER)),
            (Ok(key), Some(signature)) => key
                .verify(message.subject, message.payload, signature)
                .map_err(|err| format!("not signed by the recorded orchestrator key: {err}")),
        })
    }

    /// Records a revocation of the token `(id, by, by token id)` of `kind`; a token revoked
    /// before stays as it was. Refused when no token of that kind has the id.
    fn revoke_token(
        &self,
        kind: TokenKind,
        (token_id, revoked_by, revoked_by_token_id): (TokenId, &String, Option<TokenId>),
        time: DateTime<Utc>,
        batch: &mut sled::Batch,
    ) -> Result<Result<(), (QuarantineReason, String)>, ProjectionError> {
        let Some(mut record) = self.token(&token_id)?.filter(|record| record.kind == kind) else {
            return Ok(Err((
                QuarantineReason::UnknownToken,
                format!("{} {token_id} was never created", kind.describe()),
            )));
        };
        if record.revoked_at.is_none() {
            record.revoked_at = Some(time);
            record.revoked_by = Some(revoked_by.clone());
            record.revoked_by_token_id = revoked_by_token_id;
            insert_token(batch, &record);
        }
        Ok(Ok(()))
    }

    /// Folds one of the orchestrator's own events: every one joins the audit history; token
    /// events change the tokens, rotation requests the throttle.
    fn fold_audit(
        &self,
        subject_kind: AuditKind,
        message: StreamMessage<'_>,
        batch: &mut sled::Batch,
    ) -> Result<Result<Applied, (QuarantineReason, String)>, ProjectionError> {
        let envelope = match AuditEnvelope::from_json(message.payload) {
            Ok(envelope) => envelope,
            Err(fleetlaps_proto::audit::AuditDecodeError::Malformed(json)) => {
                return Ok(Err(describe_json_error(&json)));
            }
            Err(err @ fleetlaps_proto::audit::AuditDecodeError::UnsupportedSchema { .. }) => {
                return Ok(Err((QuarantineReason::UnsupportedSchema, err.to_string())));
            }
        };
        if envelope.event.kind() != subject_kind {
            return Ok(Err((
                QuarantineReason::SubjectMismatch,
                format!("envelope is a {} event", envelope.event.kind()),
            )));
        }
        // Only the orchestrator writes here: anyone else who can publish on `laps.audit.>` would
        // otherwise plant tokens or devices.
        if let Err(detail) = self.signed_by_orchestrator(&envelope, message)? {
            return Ok(Err((QuarantineReason::Forged, detail)));
        }
        let mut event_key = b"e/".to_vec();
        event_key.extend_from_slice(envelope.id.as_bytes());
        if self.tree.contains_key(&event_key)? {
            return Ok(Ok(Applied::outcome(Outcome::Duplicate)));
        }
        batch.insert(event_key, &message.sequence.to_be_bytes());
        match &envelope.event {
            AuditEvent::PasswordRead(_) => {}
            AuditEvent::TokenCreated(body) => {
                insert_token(batch, &TokenRecord::api(body, envelope.time));
            }
            AuditEvent::TokenRevoked(body) => {
                let revocation = (body.token_id, &body.revoked_by, body.revoked_by_token_id);
                if let Err(refusal) = self.revoke_token(TokenKind::Api, revocation, envelope.time, batch)? {
                    return Ok(Err(refusal));
                }
            }
            AuditEvent::RotationRequested(body) => {
                batch.insert(format!("w/{}", body.device_id).as_bytes(), encode(&envelope.time));
            }
            AuditEvent::EnrollmentTokenCreated(body) => {
                insert_token(batch, &TokenRecord::enrollment(body, envelope.time));
            }
            AuditEvent::EnrollmentTokenRevoked(body) => {
                let revocation = (body.token_id, &body.revoked_by, body.revoked_by_token_id);
                if let Err(refusal) = self.revoke_token(TokenKind::Enrollment, revocation, envelope.time, batch)? {
                    return Ok(Err(refusal));
                }
            }
            AuditEvent::DeviceCloneDetected(body) => {
                let key = clone_report_key(&body.device_id);
                let due: Option<DeviceCloneDetected> = self.get(&key)?;
                if due.is_some_and(|due| due.evidence_event_id == body.evidence_event_id) {
                    batch.remove(key.as_bytes());
                }
            }
            AuditEvent::EscrowKeyCreated(body) => {
                if body.reason == fleetlaps_proto::audit::EscrowKeyReason::Recovered {
                    // The key file was lost: every key recorded so far went with it.
                    for mut lost in self.escrow_keys()? {
                        if lost.lost_at_sequence.is_none() && lost.public_key != body.public_key {
                            lost.lost_at_sequence = Some(message.sequence);
                            batch.insert(escrow_key_key(&lost.public_key).as_bytes(), encode(&lost));
                        }
                    }
                }
                let record = EscrowKeyRecord {
                    public_key: body.public_key,
                    previous_public_key: body.previous_public_key,
                    reason: body.reason,
                    recorded_at: envelope.time,
                    stream_sequence: message.sequence,
                    lost_at_sequence: None,
                };
                batch.insert(escrow_key_key(&body.public_key).as_bytes(), encode(&record));
            }
            AuditEvent::PasswordResealed(body) => {
                let Some(mut credential) = self.credential(&body.device_id, body.backup_stream_sequence)? else {
                    return Ok(Err((
                        QuarantineReason::UnknownRotation,
                        format!(
                            "device {} has no credential backed up at stream sequence {}",
                            body.device_id, body.backup_stream_sequence
                        ),
                    )));
                };
                credential.sealed_password = body.sealed_password.clone();
                batch.insert(
                    credential_key(&body.device_id, body.backup_stream_sequence).as_bytes(),
                    encode(&credential),
                );
            }
            AuditEvent::OrchestratorKeyCreated(body) => {
                // Signed by the key recorded before it (checked above), or the first one.
                if let Err(err) = OrchestratorPublicKey::parse(&body.public_key) {
                    return Ok(Err((
                        QuarantineReason::Malformed,
                        format!("orchestrator_key_created: {err}"),
                    )));
                }
                let record = OrchestratorKeyRecord {
                    public_key: body.public_key.clone(),
                    recorded_at: envelope.time,
                    stream_sequence: message.sequence,
                };
                batch.insert(ORCHESTRATOR_KEY_KEY.as_bytes(), encode(&record));
            }
            AuditEvent::DeviceEnrolled(body) => {
                if let Err(err) = DevicePublicKey::parse(&body.public_key) {
                    return Ok(Err((QuarantineReason::Malformed, format!("device_enrolled: {err}"))));
                }
                let Some(mut token) = self
                    .token(&body.enrollment_token_id)?
                    .filter(|token| token.kind == TokenKind::Enrollment)
                else {
                    return Ok(Err((
                        QuarantineReason::UnknownToken,
                        format!("enrollment token {} was never created", body.enrollment_token_id),
                    )));
                };
                // The API reserves uses before it records an enrollment; the fold only counts.
                token.uses = token.uses.saturating_add(1);
                insert_token(batch, &token);
                let key = EnrolledKeyRecord {
                    device_id: body.device_id.clone(),
                    public_key: body.public_key.clone(),
                    enrollment_token_id: body.enrollment_token_id,
                    enrolled_at: envelope.time,
                };
                batch.insert(format!("k/{}", body.device_id).as_bytes(), encode(&key));
                let device_key = device_key(&body.device_id);
                if !self.tree.contains_key(device_key.as_bytes())? {
                    let device = DeviceRecord::new(body.device_id.clone(), body.device_name.clone(), envelope.time);
                    batch.insert(device_key.as_bytes(), encode(&device));
                }
            }
        }
        batch.insert(audit_key(message.sequence), encode(&envelope));
        Ok(Ok(Applied::outcome(Outcome::Recorded(envelope.event.kind()))))
    }

    /// Adds `record` to the quarantine in `batch`, first dropping the oldest records beyond the
    /// bound (also in `batch`, so both happen or neither) and counting them by reason.
    fn quarantine_into(&self, batch: &mut sled::Batch, record: &QuarantineRecord) -> Result<(), ProjectionError> {
        let held = self.quarantine_len()?;
        let to_drop = quarantine::to_drop_before_adding(held, self.quarantine_max_entries);
        let mut dropped: Vec<(QuarantineReason, u64)> = Vec::new();
        let mut n_dropped = 0u64;
        for entry in self.tree.scan_prefix(b"q/") {
            if n_dropped == to_drop {
                break;
            }
            let (key, value) = entry?;
            let oldest: QuarantineRecord = decode("q/", &value)?;
            batch.remove(key);
            n_dropped += 1;
            match dropped.iter_mut().find(|(reason, _)| *reason == oldest.reason) {
                Some((_, count)) => *count += 1,
                None => dropped.push((oldest.reason, 1)),
            }
        }
        for (reason, count) in dropped {
            let key = quarantine_dropped_key(reason);
            let before = self.tree.get(&key)?.map_or(0, |bytes| decode_u64(&bytes));
            batch.insert(key, &before.saturating_add(count).to_be_bytes());
        }
        batch.insert(
            QUARANTINE_LEN_KEY,
            &held.saturating_sub(n_dropped).saturating_add(1).to_be_bytes(),
        );
        batch.insert(quarantine_key(record.stream_sequence), encode(record));
        Ok(())
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ProjectionError> {
        self.tree
            .get(key.as_bytes())?
            .map(|value| decode(key, &value))
            .transpose()
    }
}

/// A reason and a payload-free explanation. serde's own messages can quote payload values
/// (`invalid type: string "…"`), which could be a secret, so only the category and position
/// are kept.
fn describe_decode_error(err: &DecodeError) -> (QuarantineReason, String) {
    match err {
        DecodeError::Malformed(json) => describe_json_error(json),
        DecodeError::UnsupportedSchema { .. } => (QuarantineReason::UnsupportedSchema, err.to_string()),
        DecodeError::CodeMismatch { .. } => (QuarantineReason::CodeMismatch, err.to_string()),
    }
}

/// The refusal a device hears for a backup quarantined for `reason`.
fn backup_refusal(reason: QuarantineReason) -> BackupRefusal {
    match reason {
        QuarantineReason::UnsupportedSchema => BackupRefusal::UnsupportedSchema,
        QuarantineReason::CodeMismatch => BackupRefusal::CodeMismatch,
        QuarantineReason::SubjectMismatch => BackupRefusal::SubjectMismatch,
        QuarantineReason::Unopenable => BackupRefusal::Unopenable,
        _ => BackupRefusal::Malformed,
    }
}

/// The `id` of a payload that is not a valid envelope, if it has a readable one.
fn lenient_event_id(payload: &[u8]) -> Option<EventId> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    serde_json::from_value(value.get("id")?.clone()).ok()
}

/// A malformed payload's reason and position, without serde's message (it can quote values).
fn describe_json_error(json: &serde_json::Error) -> (QuarantineReason, String) {
    let category = match json.classify() {
        serde_json::error::Category::Io => "i/o",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "truncated",
    };
    (
        QuarantineReason::Malformed,
        format!("{category} error at line {} column {}", json.line(), json.column()),
    )
}

fn audit_key(sequence: u64) -> Vec<u8> {
    format!("a/{sequence:020}").into_bytes()
}

fn device_key(device_id: &DeviceId) -> String {
    format!("d/{device_id}")
}

/// Where a detected clone waits to be reported on the history: `rc/<device_id>`.
fn clone_report_key(device_id: &DeviceId) -> String {
    format!("rc/{device_id}")
}

fn credential_key(device_id: &DeviceId, sequence: u64) -> String {
    // Zero-padded decimal sorts like the number and keeps keys readable.
    format!("c/{device_id}/{sequence:020}")
}

fn escrow_key_key(public_key: &EscrowPublicKey) -> String {
    // The text form is unpadded base64url: no `/` in it.
    format!("x/{public_key}")
}

fn rotation_key(device_id: &DeviceId, rotation_id: &RotationId) -> Vec<u8> {
    format!("r/{device_id}/{rotation_id}").into_bytes()
}

fn event_key(envelope: &Envelope) -> Vec<u8> {
    let mut key = b"e/".to_vec();
    key.extend_from_slice(envelope.id.as_bytes());
    key
}

/// Writes a token's record and its digest's index entry.
fn insert_token(batch: &mut sled::Batch, record: &TokenRecord) {
    batch.insert(format!("t/{}", record.token_id).as_bytes(), encode(record));
    batch.insert(
        format!("h/{}", record.token_sha256).as_bytes(),
        record.token_id.to_string().as_bytes(),
    );
}

fn quarantine_key(sequence: u64) -> Vec<u8> {
    format!("q/{sequence:020}").into_bytes()
}

fn quarantine_dropped_key(reason: QuarantineReason) -> Vec<u8> {
    format!("qd/{reason}").into_bytes()
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("projection records serialise: string keys only")
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ProjectionError> {
    serde_json::from_slice(bytes).map_err(|source| ProjectionError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    let len = bytes.len().min(8);
    array[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(array)
}

#[cfg(test)]
mod tests;
