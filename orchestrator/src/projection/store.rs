//! The sled store behind the projections: the reads, and the fold that writes what one verified
//! message changes.
//!
//! One sled tree holds every projection under a key prefix, so that applying a message is one
//! atomic batch: either every record it changes is written, or none is.
//!
//! Every key is built in [`super::keys`], which lists them; the layout version (`m/layout`,
//! [`LAYOUT_VERSION`]) names their layout, and a store of another layout is emptied at open and
//! rebuilt from the stream.
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

use chrono::{DateTime, TimeDelta, Utc};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, AuditKind, DeviceCloneDetected, TokenId};
use fleetlaps_proto::breach::BreachId;
use fleetlaps_proto::command::BackupConfirmation;
use fleetlaps_proto::event::{Envelope, Event, EventKind, RotationReason};
use fleetlaps_proto::ids::{DeviceId, DeviceName};
use fleetlaps_proto::seal::{EscrowPublicKey, EscrowSecretKey, SealedBox};
use sha2::{Digest, Sha256};

use super::campaigns::{CampaignRecord, CampaignTarget};
use super::credentials::CredentialRecord;
use super::devices::{DeviceRecord, DeviceStanding};
use super::escrow_keys::EscrowKeyRecord;
use super::orchestrator_key::OrchestratorKeyRecord;
use super::principals::{EnrolledKeyRecord, TokenKind, TokenRecord};
use super::quarantine::{self, QuarantineReason, QuarantineRecord};

use super::keys::{self, LAST_SEQUENCE as LAST_SEQUENCE_KEY};
use super::staged::{Records, Staged, decode, decode_u64, encode};
use super::verify::{Precheck, Refusal, SignerKeys, Verified};
use crate::attestation::Attestations;

/// The layout of the keys in [`super::keys`]. Raised when a change of keys or records needs a
/// rebuild: 2 keeps API and enrollment tokens as one record under `t/`; 3 indexes the
/// orchestrator events about each device (`ad/`) for its timeline; 4 indexes devices by name
/// (`n/`) and password reads by principal (`pr/`); 5 keeps a campaign's scope in words only; 6 keeps
/// a report's running copy's mark (`rm/`) instead of its id, and notes the reports passed over (`rx/`);
/// 7 verifies signatures by ZIP 215's rules, which accept a few signatures strict verification
/// refused (`fleetlaps_proto::signature`).
const LAYOUT_VERSION: u64 = 7;

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
    /// For a `password_rotated`: the rotation its device confirmed.
    pub rotation: Option<ConfirmedRotation>,
}

/// A rotation its device confirmed (the account changed), as the fold saw it: for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmedRotation {
    /// Why the device rotated (its backup said).
    pub reason: RotationReason,
    /// For each running campaign the rotation counted for: the time from its declaration.
    pub campaign_delays: Vec<TimeDelta>,
    /// Whether it was the last rotation a running campaign waited for.
    pub completes_a_campaign: bool,
}

impl Applied {
    fn outcome(outcome: Outcome) -> Self {
        Self {
            outcome,
            confirmation: None,
            device_id: None,
            out_of_order: false,
            clone: None,
            rotation: None,
        }
    }
}

/// The prechecks of a batch of messages ([`Projections::precheck`]), for
/// [`Projections::apply_prechecked`].
#[derive(Debug)]
pub struct Prechecked(Vec<Precheck>);

/// The projections, in a sled database. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct Projections {
    db: sled::Db,
    tree: sled::Tree,
    /// The last applied stream sequence, for those waiting to read their own writes.
    position: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// The most quarantine records kept; older ones are dropped and counted.
    quarantine_max_entries: u64,
    /// The devices' enrolled keys, parsed once, and the check of a batch's signatures.
    pub(super) signer_keys: std::sync::Arc<SignerKeys>,
}

impl Projections {
    /// Opens (or creates) the projections at `path`.
    pub fn open(path: &Path) -> Result<Self, ProjectionError> {
        let db = sled::open(path)?;
        let tree = db.open_tree("projections")?;
        let layout = tree.get(keys::LAYOUT)?.map(|bytes| decode_u64(&bytes));
        if layout != Some(LAYOUT_VERSION) {
            if !tree.is_empty() {
                tracing::warn!(
                    found = layout.unwrap_or(1),
                    wanted = LAYOUT_VERSION,
                    "the projections have an older layout: emptied, they are rebuilt from the stream"
                );
                tree.clear()?;
            }
            tree.insert(keys::LAYOUT, &LAYOUT_VERSION.to_be_bytes())?;
            tree.flush()?;
        }
        let last = tree.get(LAST_SEQUENCE_KEY)?.map_or(0, |bytes| decode_u64(&bytes));
        let (position, _) = tokio::sync::watch::channel(last);
        Ok(Self {
            db,
            tree,
            position: std::sync::Arc::new(position),
            quarantine_max_entries: quarantine::DEFAULT_MAX_ENTRIES,
            signer_keys: std::sync::Arc::default(),
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
        Ok(self.tree.number(LAST_SEQUENCE_KEY)?.unwrap_or(0))
    }

    /// Folds one stream message into the projections, atomically: [`Self::apply_all`] of one.
    pub fn apply(&self, message: StreamMessage<'_>, escrow: &dyn SealCheck) -> Result<Applied, ProjectionError> {
        let mut applied = self.apply_all(&[message], escrow)?;
        Ok(applied.pop().expect("one outcome per message"))
    }

    /// Folds stream messages into the projections, in order, as one sled batch: all of them or,
    /// if the store fails, none. Each message still counts alone: a refused one writes only its
    /// refusal, and a later message reads what an earlier one wrote. Not yet durable: call
    /// [`Self::flush`] before acknowledging them. `escrow` tells whether a backup's sealed
    /// password opens, so a backup nobody could read is refused, not confirmed. One outcome per
    /// message, in order. [`Self::precheck`] then [`Self::apply_prechecked`].
    pub fn apply_all(
        &self,
        messages: &[StreamMessage<'_>],
        escrow: &dyn SealCheck,
    ) -> Result<Vec<Applied>, ProjectionError> {
        let prechecked = self.precheck(messages)?;
        self.apply_prechecked(messages, prechecked, escrow)
    }

    /// What the fold of `messages` needs and can be worked out beside it, on every core: each
    /// envelope decoded, each signature checked against its signer's key as it stands now. It
    /// only reads, so a consumer works out the next batch's while this one folds; a verdict
    /// holds only for the key it was checked against, so one that an earlier batch made stale
    /// (a device enrolled again) is checked again in the fold.
    pub fn precheck(&self, messages: &[StreamMessage<'_>]) -> Result<Prechecked, ProjectionError> {
        self.precheck_attested(messages, &Attestations::default())
    }

    /// [`Self::precheck`] for a replay: the signatures `attestations` vouch for are not checked
    /// (the replay makes sure of the attestations themselves, [`crate::attestation`]).
    pub fn precheck_attested(
        &self,
        messages: &[StreamMessage<'_>],
        attestations: &Attestations,
    ) -> Result<Prechecked, ProjectionError> {
        let after = self.last_applied_sequence()?;
        Ok(Prechecked(self.signer_keys.precheck_all(
            &self.tree,
            messages,
            after,
            attestations,
        )))
    }

    /// [`Self::apply_all`] with the prechecks of `messages` worked out before
    /// ([`Self::precheck`]); a precheck made for another message is ignored.
    pub fn apply_prechecked(
        &self,
        messages: &[StreamMessage<'_>],
        prechecked: Prechecked,
        escrow: &dyn SealCheck,
    ) -> Result<Vec<Applied>, ProjectionError> {
        let mut staged = Staged::new(&self.tree);
        let mut last = self.last_applied_sequence()?;
        let mut prechecks = prechecked.0.into_iter();
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            let precheck = prechecks
                .next()
                .filter(|precheck| precheck.sequence == message.sequence)
                .unwrap_or_else(|| Precheck::none(message.sequence));
            if message.sequence <= last {
                outcomes.push(Applied::outcome(Outcome::AlreadySeen));
                continue;
            }
            outcomes.push(self.apply_one(&mut staged, *message, precheck, escrow)?);
            last = message.sequence;
        }
        if staged.is_empty() {
            return Ok(outcomes);
        }
        staged.insert(LAST_SEQUENCE_KEY, last.to_be_bytes());
        staged.keep();
        let written = staged.keys();
        self.tree.apply_batch(staged.into_batch())?;
        // sled finishes a node's split on a later traversal through it, and such a traversal
        // writes: once a flush has failed (a full disk) it fails, and a read meeting it would
        // answer 500. Traversing every key written, while the log still takes writes, leaves no
        // split half done on their paths for a later read to finish.
        for _ in 0..2 {
            for key in &written {
                self.tree.get(key)?;
            }
        }
        self.position.send_replace(last);
        Ok(outcomes)
    }

    /// One message's fold into `staged`: verified, then folded, or else quarantined.
    fn apply_one(
        &self,
        staged: &mut Staged<'_>,
        message: StreamMessage<'_>,
        precheck: Precheck,
        escrow: &dyn SealCheck,
    ) -> Result<Applied, ProjectionError> {
        // Verify first, then change: the two steps are apart, and a refusal at either writes
        // only the quarantine.
        let folded = match self.verify(staged, message, precheck, escrow)? {
            Ok(verified) => self.fold(staged, verified, message)?,
            Err(refusal) => Err(refusal),
        };
        let applied = match folded {
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
                staged.discard();
                self.quarantine_into(staged, &record)?;
                let mut refused_device = None;
                if let Some(confirmation) = &confirmation
                    && let Some(mut device) = staged.device(&confirmation.device_id)?
                {
                    device.latest_backup = Some(confirmation.clone());
                    staged.insert_record(keys::device(&confirmation.device_id), device);
                    refused_device = Some(confirmation.device_id.clone());
                }
                Applied {
                    outcome: Outcome::Quarantined(reason),
                    confirmation,
                    device_id: refused_device,
                    out_of_order: false,
                    clone: None,
                    rotation: None,
                }
            }
        };
        // A report keeps no id (`keys::is_report`): a copy of one, or a refused one, on a
        // device's subject is noted instead, so the timeline can tell which it passed over.
        if !matches!(applied.outcome, Outcome::Applied(_))
            && let Some((device_id, kind)) = fleetlaps_proto::subject::parse_device_event(message.subject)
            && keys::is_report(kind)
        {
            staged.insert(keys::report_passed_over(&device_id, message.sequence), []);
        }
        staged.keep();
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
            .scan_prefix(keys::DEVICES)
            .values()
            .map(|value| decode(keys::DEVICES, &value?))
            .collect()
    }

    /// The devices after `after` (from the first without it), ordered by id, read as iterated:
    /// a page of the directory reads only its own devices.
    pub fn devices_after(
        &self,
        after: Option<&DeviceId>,
    ) -> impl Iterator<Item = Result<DeviceRecord, ProjectionError>> + '_ {
        self.device_records(after)
    }

    /// Where every device stands ([`DeviceStanding`]), ordered by device id: what a metrics
    /// scrape reads, without decoding the rest of each record.
    pub fn device_standings(&self) -> impl Iterator<Item = Result<DeviceStanding, ProjectionError>> + '_ {
        self.device_records(None)
    }

    /// The device records after `after`, as `T` (the whole record, or a part of it).
    fn device_records<T: serde::de::DeserializeOwned>(
        &self,
        after: Option<&DeviceId>,
    ) -> impl Iterator<Item = Result<T, ProjectionError>> + '_ {
        use std::ops::Bound;
        let start = match after {
            Some(after) => Bound::Excluded(keys::device(after)),
            None => Bound::Included(keys::DEVICES.to_vec()),
        };
        self.tree
            .range((start, Bound::Unbounded))
            .take_while(|entry| entry.as_ref().map_or(true, |(key, _)| key.starts_with(keys::DEVICES)))
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
    }

    /// The devices named `device_name`, in any case (DNS names are), ordered by id: from the
    /// name index, without reading any other device.
    pub fn devices_named(&self, device_name: &DeviceName) -> Result<Vec<DeviceRecord>, ProjectionError> {
        let mut devices = Vec::new();
        for key in self.tree.scan_prefix(keys::devices_named(device_name)).keys() {
            let key = key?;
            let device_id = keys::named_device(&key).ok_or_else(|| ProjectionError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                source: serde::de::Error::custom("not a device id"),
            })?;
            devices.extend(self.device(&device_id)?);
        }
        Ok(devices)
    }

    /// The devices whose passwords `principal` read at or after `since`: from the index of its
    /// reads, without reading anyone else's.
    pub fn devices_read_by(
        &self,
        principal: &str,
        since: DateTime<Utc>,
    ) -> Result<std::collections::BTreeSet<DeviceId>, ProjectionError> {
        let since = since.timestamp_millis();
        let mut devices = std::collections::BTreeSet::new();
        for entry in self.tree.scan_prefix(keys::principal_reads(principal)) {
            let (key, value) = entry?;
            let corrupt = || ProjectionError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                source: serde::de::Error::custom("not a time and a device id"),
            };
            let (at, device) = value.split_at_checked(8).ok_or_else(corrupt)?;
            let at = i64::from_be_bytes(at.try_into().map_err(|_| corrupt())?);
            if at >= since {
                let device = std::str::from_utf8(device).map_err(|_| corrupt())?;
                devices.insert(DeviceId::parse(device).map_err(|_| corrupt())?);
            }
        }
        Ok(devices)
    }

    /// One device.
    pub fn device(&self, device_id: &DeviceId) -> Result<Option<DeviceRecord>, ProjectionError> {
        self.tree.record(&keys::device(device_id))
    }

    /// The clones detected that are not yet reported on the history.
    pub fn due_clone_reports(&self) -> Result<Vec<DeviceCloneDetected>, ProjectionError> {
        self.tree
            .scan_prefix(keys::CLONE_REPORTS)
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect()
    }

    /// A device's credentials, newest backup first, at most `limit`.
    pub fn credentials(&self, device_id: &DeviceId, limit: usize) -> Result<Vec<CredentialRecord>, ProjectionError> {
        let prefix = keys::credentials_of(device_id);
        self.tree
            .scan_prefix(&prefix)
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
            .range(keys::quarantine(start)..)
            .take_while(|entry| {
                entry
                    .as_ref()
                    .map_or(true, |(key, _)| key.starts_with(keys::QUARANTINE))
            })
            .take(limit)
            .map(|entry| decode(keys::QUARANTINE, &entry?.1))
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
                    .get(keys::quarantine_dropped(reason))?
                    .map_or(0, |bytes| decode_u64(&bytes));
                Ok((reason, count))
            })
            .collect()
    }

    /// How many quarantine records are kept.
    pub fn quarantine_len(&self) -> Result<u64, ProjectionError> {
        self.tree.quarantine_len()
    }

    /// The token of either kind whose SHA-256 is `token_sha256` (hex), unusable ones included.
    pub fn token_by_digest(&self, token_sha256: &str) -> Result<Option<TokenRecord>, ProjectionError> {
        let Some(id) = self.tree.get(keys::token_digest(token_sha256))? else {
            return Ok(None);
        };
        let Ok(token_id) = TokenId::parse(&String::from_utf8_lossy(&id)) else {
            return Err(ProjectionError::Corrupt {
                key: String::from_utf8_lossy(&keys::token_digest(token_sha256)).into_owned(),
                source: serde::de::Error::custom("not a token id"),
            });
        };
        self.token(&token_id)
    }

    /// One token of either kind.
    pub fn token(&self, token_id: &TokenId) -> Result<Option<TokenRecord>, ProjectionError> {
        self.tree.record(&keys::token(token_id))
    }

    /// Every token of `kind` made through the API, oldest first (ids are time-ordered).
    pub fn tokens(&self, kind: TokenKind) -> Result<Vec<TokenRecord>, ProjectionError> {
        let mut tokens = Vec::new();
        for value in self.tree.scan_prefix(keys::TOKENS).values() {
            let record: TokenRecord = decode(keys::TOKENS, &value?)?;
            if record.kind == kind {
                tokens.push(record);
            }
        }
        Ok(tokens)
    }

    /// The key `device_id` enrolled with, if it did.
    pub fn enrolled_key(&self, device_id: &DeviceId) -> Result<Option<EnrolledKeyRecord>, ProjectionError> {
        self.tree.record(&keys::enrolled_key(device_id))
    }

    /// The audit history after stream sequence `after`, oldest first, with each entry's
    /// sequence; at most `limit` entries.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditEnvelope)>, ProjectionError> {
        let start = keys::audit(after.saturating_add(1));
        self.tree
            .range(start..)
            .take_while(|entry| entry.as_ref().map_or(true, |(key, _)| key.starts_with(keys::AUDIT)))
            .take(limit)
            .map(|entry| {
                let (key, value) = entry?;
                let sequence = keys::audit_sequence(&key).unwrap_or_default();
                Ok((sequence, decode(&key, &value)?))
            })
            .collect()
    }

    /// The orchestrator events about `device_id` (see `devices_concerned`) after stream
    /// sequence `after` and at or before `until`, oldest first, with each one's sequence; at
    /// most `limit`.
    pub fn device_audit(
        &self,
        device_id: &DeviceId,
        after: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<(u64, AuditEnvelope)>, ProjectionError> {
        let prefix = keys::device_audits(device_id);
        let mut found = Vec::new();
        for entry in self
            .tree
            .range(keys::device_audit(device_id, after.saturating_add(1))..)
        {
            let (key, _) = entry?;
            if !key.starts_with(&prefix) || found.len() >= limit {
                break;
            }
            let sequence = keys::device_audit_sequence(&key).ok_or_else(|| ProjectionError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                source: serde::de::Error::custom("not a stream sequence"),
            })?;
            if sequence > until {
                break;
            }
            let audit_key = keys::audit(sequence);
            let envelope = self.tree.record(&audit_key)?.ok_or_else(|| ProjectionError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                source: serde::de::Error::custom("the device's index points to no orchestrator event"),
            })?;
            found.push((sequence, envelope));
        }
        Ok(found)
    }

    /// Whether the message at stream `sequence`, a report ([`keys::is_report`]) on `device_id`'s
    /// subject that the projections have folded, was passed over: a copy of one applied before,
    /// or refused.
    pub fn report_passed_over(&self, device_id: &DeviceId, sequence: u64) -> Result<bool, ProjectionError> {
        Ok(self.tree.get(keys::report_passed_over(device_id, sequence))?.is_some())
    }

    /// The stream sequence of the message that applied the event with this id; `None` when no
    /// message did (never folded, or refused). A re-sent copy of an event has another sequence.
    /// Reports ([`keys::is_report`]) keep no id: see [`Self::report_passed_over`].
    pub fn event_sequence(&self, event_id: &fleetlaps_proto::ids::EventId) -> Result<Option<u64>, ProjectionError> {
        self.tree.number(&keys::event(event_id))
    }

    /// Every escrow public key the history recorded, oldest first.
    pub fn escrow_keys(&self) -> Result<Vec<EscrowKeyRecord>, ProjectionError> {
        let mut keys = self
            .tree
            .scan_prefix(keys::ESCROW_KEYS)
            .values()
            .map(|value| decode::<EscrowKeyRecord>(keys::ESCROW_KEYS, &value?))
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort_by_key(|key| key.stream_sequence);
        Ok(keys)
    }

    /// The key orchestrator events must be signed with, once the history recorded one.
    pub fn orchestrator_key(&self) -> Result<Option<OrchestratorKeyRecord>, ProjectionError> {
        self.tree.record(keys::ORCHESTRATOR_KEY)
    }

    /// A device's credential backed up at stream sequence `backup_stream_sequence`.
    pub fn credential(
        &self,
        device_id: &DeviceId,
        backup_stream_sequence: u64,
    ) -> Result<Option<CredentialRecord>, ProjectionError> {
        self.tree.record(&keys::credential(device_id, backup_stream_sequence))
    }

    /// When a rotation of `device_id` was last requested through the API.
    pub fn last_rotation_request(&self, device_id: &DeviceId) -> Result<Option<DateTime<Utc>>, ProjectionError> {
        self.tree.record(&keys::rotation_request(device_id))
    }

    /// One breach's campaign.
    pub fn campaign(&self, breach_id: &BreachId) -> Result<Option<CampaignRecord>, ProjectionError> {
        self.tree.record(&keys::campaign(breach_id))
    }

    /// Every campaign, oldest first (breach ids are time-ordered).
    pub fn campaigns(&self) -> Result<Vec<CampaignRecord>, ProjectionError> {
        self.tree
            .scan_prefix(keys::CAMPAIGNS)
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect()
    }

    /// Every device of a campaign, by device id.
    pub fn campaign_targets(&self, breach_id: &BreachId) -> Result<Vec<CampaignTarget>, ProjectionError> {
        self.tree
            .scan_prefix(keys::campaign_targets(breach_id))
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect()
    }

    /// One device of a campaign.
    pub fn campaign_target(
        &self,
        breach_id: &BreachId,
        device_id: &DeviceId,
    ) -> Result<Option<CampaignTarget>, ProjectionError> {
        self.tree.record(&keys::campaign_target(breach_id, device_id))
    }

    /// The campaigns targeting a device, oldest first.
    pub fn device_campaigns(&self, device_id: &DeviceId) -> Result<Vec<BreachId>, ProjectionError> {
        let mut breaches = Vec::new();
        for key in self.tree.scan_prefix(keys::device_campaigns(device_id)).keys() {
            let key = key?;
            let breach_id = keys::device_campaign_breach(&key).ok_or_else(|| ProjectionError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                source: serde::de::Error::custom("not a breach id"),
            })?;
            breaches.push(breach_id);
        }
        Ok(breaches)
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

    /// What a verified event changes, staged in `staged`: one pure `apply` per aggregate
    /// (the records' own methods), with the reads and writes around them. `Ok(Err(..))` means:
    /// quarantine it after all (a rotation never backed up, an unusable key in an event).
    fn fold(
        &self,
        staged: &mut Staged<'_>,
        verified: Verified,
        message: StreamMessage<'_>,
    ) -> Result<Result<Applied, Refusal>, ProjectionError> {
        match verified {
            Verified::Duplicate(confirmation) => Ok(Ok(Applied {
                confirmation,
                ..Applied::outcome(Outcome::Duplicate)
            })),
            Verified::Device { envelope, confirmation } => {
                self.fold_device_event(staged, &envelope, confirmation, message)
            }
            Verified::Orchestrator(envelope) => self.fold_orchestrator_event(staged, &envelope, message),
        }
    }

    /// A device event: its device ([`DeviceRecord::apply`]) and, for a backup or a rotation,
    /// the credential ([`CredentialRecord::backed_up`], [`CredentialRecord::applied`]).
    fn fold_device_event(
        &self,
        staged: &mut Staged<'_>,
        envelope: &Envelope,
        confirmation: Option<BackupConfirmation>,
        message: StreamMessage<'_>,
    ) -> Result<Result<Applied, Refusal>, ProjectionError> {
        let device_id = envelope.device_id.clone();
        let Some(mut device) = staged.record::<DeviceRecord>(&keys::device(&device_id))? else {
            return Ok(Err((
                QuarantineReason::UnknownDevice,
                format!("device {device_id} never enrolled"),
            )
                .into()));
        };
        let mut rotation = None;
        match &envelope.event {
            Event::PasswordBackedUp(body) => {
                let credential = CredentialRecord::backed_up(body, envelope.time, message.sequence);
                let credential_key = keys::credential(&device_id, message.sequence);
                staged.insert(keys::rotation(&device_id, &body.rotation_id), credential_key.as_slice());
                staged.insert_record(credential_key, credential);
            }
            Event::PasswordRotated(body) => {
                let Some(credential_key) = staged.raw(&keys::rotation(&device_id, &body.rotation_id))? else {
                    return Ok(Err((
                        QuarantineReason::UnknownRotation,
                        format!("rotation {} was never backed up", body.rotation_id),
                    )
                        .into()));
                };
                let mut credential: CredentialRecord =
                    staged
                        .record(&credential_key)?
                        .ok_or_else(|| ProjectionError::Corrupt {
                            key: String::from_utf8_lossy(&credential_key).into_owned(),
                            source: serde::de::Error::custom("rotation index points to no credential"),
                        })?;
                credential.applied(envelope.time);
                let reason = credential.reason;
                staged.insert_record(credential_key, credential);
                let (campaign_delays, completes_a_campaign) =
                    count_campaign_rotations(staged, &device_id, envelope.time)?;
                rotation = Some(ConfirmedRotation {
                    reason,
                    campaign_delays,
                    completes_a_campaign,
                });
            }
            _ => {}
        }
        let name_before = device.device_name.clone();
        let change = device.apply(envelope, confirmation.as_ref());
        if device.device_name != name_before {
            staged.remove(keys::device_name(&name_before, &device_id));
            staged.insert(keys::device_name(&device.device_name, &device_id), []);
        }
        if let Some(detected) = &change.clone {
            // Reported on the history by the consumer once it has caught up, unless a report
            // of it is already there (a rebuild meets it later and clears this).
            staged.insert(keys::clone_report(&device_id), encode(detected));
        }
        staged.device_event_applied(envelope, message.sequence);
        staged.insert_record(keys::device(&device_id), device);
        Ok(Ok(Applied {
            outcome: Outcome::Applied(envelope.event.kind()),
            confirmation,
            device_id: Some(device_id),
            out_of_order: change.out_of_order,
            clone: change.clone,
            rotation,
        }))
    }

    /// One of the orchestrator's own events: every one joins the audit history (`a/`); tokens
    /// ([`TokenRecord`]), enrolled keys and new devices, escrow and orchestrator keys,
    /// rotation requests, clone reports and resealed credentials change as the event says.
    fn fold_orchestrator_event(
        &self,
        staged: &mut Staged<'_>,
        envelope: &AuditEnvelope,
        message: StreamMessage<'_>,
    ) -> Result<Result<Applied, Refusal>, ProjectionError> {
        let refuse = |reason: QuarantineReason, detail: String| Ok(Err(Refusal::from((reason, detail))));
        match &envelope.event {
            AuditEvent::PasswordRead(body) => {
                let mut read = envelope.time.timestamp_millis().to_be_bytes().to_vec();
                read.extend_from_slice(body.device_id.as_str().as_bytes());
                staged.insert(keys::principal_read(&body.principal, message.sequence), read);
            }
            AuditEvent::TokenCreated(body) => insert_token(staged, &TokenRecord::api(body, envelope.time)),
            AuditEvent::EnrollmentTokenCreated(body) => {
                insert_token(staged, &TokenRecord::enrollment(body, envelope.time));
            }
            AuditEvent::TokenRevoked(body) => {
                let Some(mut token) = token_of_kind(staged, &body.token_id, TokenKind::Api)? else {
                    return refuse(
                        QuarantineReason::UnknownToken,
                        format!("token {} was never created", body.token_id),
                    );
                };
                token.revoke(envelope.time, &body.revoked_by, body.revoked_by_token_id);
                insert_token(staged, &token);
            }
            AuditEvent::EnrollmentTokenRevoked(body) => {
                let Some(mut token) = token_of_kind(staged, &body.token_id, TokenKind::Enrollment)? else {
                    return refuse(
                        QuarantineReason::UnknownToken,
                        format!("enrollment token {} was never created", body.token_id),
                    );
                };
                token.revoke(envelope.time, &body.revoked_by, body.revoked_by_token_id);
                insert_token(staged, &token);
            }
            AuditEvent::RotationRequested(body) => {
                staged.insert(keys::rotation_request(&body.device_id), encode(&envelope.time));
            }
            AuditEvent::DeviceCloneDetected(body) => {
                let key = keys::clone_report(&body.device_id);
                let due: Option<DeviceCloneDetected> = staged.record(&key)?;
                if due.is_some_and(|due| super::devices::clone_report_settles(&due, body)) {
                    staged.remove(key);
                }
            }
            AuditEvent::EscrowKeyCreated(body) => {
                if body.reason == fleetlaps_proto::audit::EscrowKeyReason::Recovered {
                    // The key file was lost: every key recorded so far went with it.
                    for mut lost in staged.escrow_keys()? {
                        if lost.public_key != body.public_key && lost.lost_by_recovery(message.sequence) {
                            staged.insert(keys::escrow_key(&lost.public_key), encode(&lost));
                        }
                    }
                }
                let record = EscrowKeyRecord::recorded(body, envelope.time, message.sequence);
                staged.insert(keys::escrow_key(&body.public_key), encode(&record));
            }
            AuditEvent::PasswordResealed(body) => {
                let Some(mut credential) = staged.credential(&body.device_id, body.backup_stream_sequence)? else {
                    return refuse(
                        QuarantineReason::UnknownRotation,
                        format!(
                            "device {} has no credential backed up at stream sequence {}",
                            body.device_id, body.backup_stream_sequence
                        ),
                    );
                };
                credential.resealed(body.sealed_password.clone());
                staged.insert(
                    keys::credential(&body.device_id, body.backup_stream_sequence),
                    encode(&credential),
                );
            }
            AuditEvent::OrchestratorKeyCreated(body) => {
                // Signed by the key recorded before it (verified), or the first one.
                match OrchestratorKeyRecord::recorded(body, envelope.time, message.sequence) {
                    Ok(record) => staged.insert(keys::ORCHESTRATOR_KEY, encode(&record)),
                    Err(detail) => return refuse(QuarantineReason::Malformed, detail),
                }
            }
            // A detection changes nothing but the audit history; the breach it declared, if any,
            // has its own events. An attestation neither: a replay reads it from the stream.
            AuditEvent::BreachDetected(_) | AuditEvent::SignaturesVerified(_) => {}
            AuditEvent::BreachDeclared(body) => {
                staged.insert(
                    keys::campaign(&body.breach_id),
                    encode(&CampaignRecord::declared(body, envelope.time)),
                );
            }
            AuditEvent::BreachTargeted(body) => {
                let Some(mut campaign) = staged.campaign(&body.breach_id)? else {
                    return refuse(
                        QuarantineReason::UnknownBreach,
                        format!("breach {} was never declared", body.breach_id),
                    );
                };
                for device_id in &body.device_ids {
                    let key = keys::campaign_target(&body.breach_id, device_id);
                    if staged.has(&key)? {
                        continue;
                    }
                    let last_rotated = staged.device(device_id)?.and_then(|device| device.last_rotated);
                    let target = CampaignTarget::targeted(device_id.clone(), campaign.declared_at, last_rotated);
                    campaign.target_added(target.rotated_at.is_some());
                    staged.insert_record(key, target);
                    staged.insert(keys::device_campaign(device_id, &body.breach_id), []);
                }
                staged.insert_record(keys::campaign(&body.breach_id), campaign);
            }
            AuditEvent::BreachWaveCommanded(body) => {
                let Some(mut campaign) = staged.campaign(&body.breach_id)? else {
                    return refuse(
                        QuarantineReason::UnknownBreach,
                        format!("breach {} was never declared", body.breach_id),
                    );
                };
                for command in &body.commands {
                    let Some(mut target) = staged.campaign_target(&body.breach_id, &command.device_id)? else {
                        continue;
                    };
                    if target.commanded(command.command_id, command.covered_by, envelope.time) {
                        campaign.target_commanded();
                        staged.insert(
                            keys::campaign_target(&body.breach_id, &command.device_id),
                            encode(&target),
                        );
                    }
                }
                staged.insert_record(keys::campaign(&body.breach_id), campaign);
            }
            AuditEvent::BreachEnded(body) => {
                let Some(mut campaign) = staged.campaign(&body.breach_id)? else {
                    return refuse(
                        QuarantineReason::UnknownBreach,
                        format!("breach {} was never declared", body.breach_id),
                    );
                };
                campaign.ended(&body.outcome, envelope.time);
                staged.insert_record(keys::campaign(&body.breach_id), campaign);
            }
            AuditEvent::DeviceEnrolled(body) => {
                let key = match EnrolledKeyRecord::enrolled(body, envelope.time) {
                    Ok(key) => key,
                    Err(detail) => return refuse(QuarantineReason::Malformed, detail),
                };
                let Some(mut token) = token_of_kind(staged, &body.enrollment_token_id, TokenKind::Enrollment)? else {
                    return refuse(
                        QuarantineReason::UnknownToken,
                        format!("enrollment token {} was never created", body.enrollment_token_id),
                    );
                };
                token.count_use();
                insert_token(staged, &token);
                staged.insert_record(keys::enrolled_key(&body.device_id), key);
                let device_key = keys::device(&body.device_id);
                let existing = staged.record::<DeviceRecord>(&device_key)?;
                let fresh = existing.is_none();
                let mut device = existing.unwrap_or_else(|| {
                    DeviceRecord::new(body.device_id.clone(), body.device_name.clone(), envelope.time)
                });
                if fresh {
                    staged.insert(keys::device_name(&device.device_name, &body.device_id), []);
                }
                if fresh || !body.tags.is_empty() {
                    device.tags_set(&body.tags);
                    staged.insert_record(device_key, device);
                }
            }
            AuditEvent::DeviceTagsSet(body) => {
                let Some(mut device) = staged.device(&body.device_id)? else {
                    return refuse(
                        QuarantineReason::UnknownDevice,
                        format!("device {} never enrolled", body.device_id),
                    );
                };
                device.tags_set(&body.tags);
                staged.insert_record(keys::device(&body.device_id), device);
            }
        }
        staged.insert(keys::event(&envelope.id), message.sequence.to_be_bytes());
        staged.insert(keys::audit(message.sequence), encode(envelope));
        for device_id in devices_concerned(&envelope.event) {
            staged.insert(keys::device_audit(device_id, message.sequence), []);
        }
        Ok(Ok(Applied::outcome(Outcome::Recorded(envelope.event.kind()))))
    }

    /// Adds `record` to the quarantine in `staged`, first dropping the oldest records beyond the
    /// bound (also in `staged`, so both happen or neither) and counting them by reason.
    fn quarantine_into(&self, staged: &mut Staged<'_>, record: &QuarantineRecord) -> Result<(), ProjectionError> {
        let held = staged.quarantine_len()?;
        let to_drop = quarantine::to_drop_before_adding(held, self.quarantine_max_entries);
        let mut dropped: Vec<(QuarantineReason, u64)> = Vec::new();
        let mut n_dropped = 0u64;
        let oldest: Vec<_> = staged
            .raw_prefix(keys::QUARANTINE)
            .take(usize::try_from(to_drop).unwrap_or(usize::MAX))
            .collect::<Result<_, _>>()?;
        for (key, value) in oldest {
            let oldest: QuarantineRecord = decode(&key, &value)?;
            staged.remove(key);
            n_dropped += 1;
            match dropped.iter_mut().find(|(reason, _)| *reason == oldest.reason) {
                Some((_, count)) => *count += 1,
                None => dropped.push((oldest.reason, 1)),
            }
        }
        for (reason, count) in dropped {
            let key = keys::quarantine_dropped(reason);
            let before = staged.raw(&key)?.map_or(0, |bytes| decode_u64(&bytes));
            staged.insert(key, before.saturating_add(count).to_be_bytes());
        }
        staged.insert(
            keys::QUARANTINE_LEN,
            held.saturating_sub(n_dropped).saturating_add(1).to_be_bytes(),
        );
        staged.insert(keys::quarantine(record.stream_sequence), encode(record));
        Ok(())
    }
}

/// Counts a rotation the device confirmed at `at` for every running campaign targeting it that
/// it had not counted for yet ([`CampaignTarget::rotated`]); returns, for each, the time from its
/// declaration, and whether one of them has now every device rotated.
fn count_campaign_rotations(
    staged: &mut Staged<'_>,
    device_id: &DeviceId,
    at: DateTime<Utc>,
) -> Result<(Vec<TimeDelta>, bool), ProjectionError> {
    let mut delays = Vec::new();
    let mut completed = false;
    for breach_id in staged.device_campaigns(device_id)? {
        let Some(mut campaign) = staged
            .campaign(&breach_id)?
            .filter(|campaign| campaign.state.is_active())
        else {
            continue;
        };
        let Some(mut target) = staged.campaign_target(&breach_id, device_id)? else {
            continue;
        };
        if target.rotated(at, campaign.declared_at) {
            campaign.target_rotated();
            completed |= campaign.all_rotated();
            delays.push(at - campaign.declared_at);
            staged.insert_record(keys::campaign_target(&breach_id, device_id), target);
            staged.insert_record(keys::campaign(&breach_id), campaign);
        }
    }
    Ok((delays, completed))
}

/// The token with this id, if it is of `kind`.
fn token_of_kind(
    records: &impl Records,
    token_id: &TokenId,
    kind: TokenKind,
) -> Result<Option<TokenRecord>, ProjectionError> {
    Ok(records.token(token_id)?.filter(|token| token.kind == kind))
}

/// The devices an orchestrator event is about, each of which finds it in its timeline (`ad/`):
/// the device a read, a rotation request, an enrollment, tags, a clone or a reseal names; every
/// device a campaign targets or commands, a detection involves or a deadline leaves behind. Events
/// about no device (tokens, keys, a declaration before its targets) are in no timeline.
pub(super) fn devices_concerned(event: &AuditEvent) -> Vec<&DeviceId> {
    use fleetlaps_proto::breach::BreachOutcome;
    match event {
        AuditEvent::PasswordRead(body) => vec![&body.device_id],
        AuditEvent::RotationRequested(body) => vec![&body.device_id],
        AuditEvent::DeviceEnrolled(body) => vec![&body.device_id],
        AuditEvent::DeviceTagsSet(body) => vec![&body.device_id],
        AuditEvent::DeviceCloneDetected(body) => vec![&body.device_id],
        AuditEvent::PasswordResealed(body) => vec![&body.device_id],
        AuditEvent::BreachTargeted(body) => body.device_ids.iter().collect(),
        AuditEvent::BreachWaveCommanded(body) => body.commands.iter().map(|command| &command.device_id).collect(),
        AuditEvent::BreachDetected(body) => body.device_ids.iter().collect(),
        AuditEvent::BreachEnded(body) => match &body.outcome {
            BreachOutcome::DeadlinePassed { stragglers, .. } => stragglers.iter().collect(),
            BreachOutcome::Completed | BreachOutcome::Cancelled { .. } => Vec::new(),
        },
        AuditEvent::TokenCreated(_)
        | AuditEvent::TokenRevoked(_)
        | AuditEvent::EnrollmentTokenCreated(_)
        | AuditEvent::EnrollmentTokenRevoked(_)
        | AuditEvent::EscrowKeyCreated(_)
        | AuditEvent::OrchestratorKeyCreated(_)
        | AuditEvent::BreachDeclared(_)
        | AuditEvent::SignaturesVerified(_) => Vec::new(),
    }
}

/// Writes a token's record and its digest's index entry.
fn insert_token(staged: &mut Staged<'_>, record: &TokenRecord) {
    staged.insert(keys::token(&record.token_id), encode(record));
    staged.insert(
        keys::token_digest(&record.token_sha256),
        record.token_id.to_string().as_bytes(),
    );
}

#[cfg(test)]
mod tests;
