//! The verify step: one stream message becomes a [`Verified`] event, or a [`Refusal`] that
//! quarantines it, before anything in the projections changes.
//!
//! A device event (`laps.events.<device>.<kind>`) is verified when it decodes, its device
//! enrolled, it is signed by that device's enrolled key over exactly its subject and payload, its
//! envelope names the subject's device and kind, and, for a backup, its sealed password opens with
//! an escrow key (or was sealed to a recorded key lost only after it). An orchestrator event
//! (`laps.audit.<kind>`) is verified when it decodes, names its subject's kind, and is signed by
//! the recorded orchestrator key (the first `orchestrator_key_created`, by the key it names: trust
//! on first use). An event id applied before is [`Verified::Duplicate`].
//!
//! Verification only reads: the projections (enrolled keys, the orchestrator key, the recorded
//! escrow keys, applied event ids) and the escrow keyring.

use std::collections::HashMap;

use fleetlaps_proto::audit::{AuditDecodeError, AuditEnvelope, AuditEvent, AuditKind};
use fleetlaps_proto::command::{BackupConfirmation, BackupOutcome, BackupRefusal};
use fleetlaps_proto::event::{DecodeError, Envelope, Event, EventKind, PasswordBackedUp, sealing_context};
use fleetlaps_proto::ids::{DeviceId, EventId, RotationId};
use fleetlaps_proto::signature::{DevicePublicKey, SignedEvent, verify_batch};
use fleetlaps_proto::subject;

use super::escrow_keys::EscrowKeyRecord;
use super::keys;
use super::principals::EnrolledKeyRecord;
use super::quarantine::QuarantineReason;
use super::staged::{Records as _, Staged};
use super::store::{ProjectionError, Projections, SealCheck, StreamMessage};
use crate::attestation::Attestations;

/// A message that passed every check.
#[derive(Debug)]
pub(super) enum Verified {
    /// A device event never applied before; a backup carries the confirmation its device gets.
    Device {
        /// The event (boxed: a backup is much larger than the other variants).
        envelope: Box<Envelope>,
        /// For a backup: stored.
        confirmation: Option<BackupConfirmation>,
    },
    /// An orchestrator event never applied before.
    Orchestrator(Box<AuditEnvelope>),
    /// An event id applied before: nothing changes, and a backup's device hears again that it is
    /// stored (its confirmation was lost, or this is a replay).
    Duplicate(Option<BackupConfirmation>),
}

/// Why a message is quarantined, and for a backup its device really sent, the refusal it hears.
#[derive(Debug)]
pub(super) struct Refusal {
    /// The quarantine reason.
    pub(super) reason: QuarantineReason,
    /// A payload-free explanation.
    pub(super) detail: String,
    /// The refusal the backup's device hears, when there is one to tell.
    pub(super) confirmation: Option<BackupConfirmation>,
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

impl Projections {
    /// Verifies one message; `Ok(Err(..))` means: quarantine it.
    pub(super) fn verify(
        &self,
        staged: &Staged<'_>,
        message: StreamMessage<'_>,
        precheck: Precheck,
        escrow: &dyn SealCheck,
    ) -> Result<Result<Verified, Refusal>, ProjectionError> {
        if let Some(kind) = subject::parse_audit_event(message.subject) {
            return self.verify_orchestrator_event(staged, kind, message, precheck);
        }
        let Some((subject_device, subject_kind)) = subject::parse_device_event(message.subject) else {
            return Ok(Err((
                QuarantineReason::UnknownSubject,
                "neither laps.events.<device>.<kind> nor laps.audit.<kind>".to_owned(),
            )
                .into()));
        };
        self.verify_device_event(staged, &subject_device, subject_kind, message, precheck, escrow)
    }

    fn verify_device_event(
        &self,
        staged: &Staged<'_>,
        subject_device: &DeviceId,
        subject_kind: EventKind,
        message: StreamMessage<'_>,
        precheck: Precheck,
        escrow: &dyn SealCheck,
    ) -> Result<Result<Verified, Refusal>, ProjectionError> {
        let enrolled = staged.enrolled_key(subject_device)?;
        let checked = precheck.signature.as_ref();
        let envelope = match precheck.decoded.into_device(message.payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                let (reason, detail) = describe_decode_error(&err);
                // A backup its device really sent but this orchestrator cannot read (another
                // schema, a wrong code): the device must hear that it was refused.
                let confirmation = (subject_kind == EventKind::PasswordBackedUp
                    && self
                        .signed_by_enrolled_key(enrolled.as_ref(), subject_device, message, checked)
                        .is_ok())
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
        if enrolled.is_none() {
            return Ok(Err((
                QuarantineReason::UnknownDevice,
                format!("device {subject_device} never enrolled"),
            )
                .into()));
        };
        if let Err(detail) = self.signed_by_enrolled_key(enrolled.as_ref(), subject_device, message, checked) {
            return Ok(Err((QuarantineReason::Forged, detail).into()));
        }
        let answer = |rotation_id: Option<RotationId>, outcome: BackupOutcome| BackupConfirmation {
            device_id: subject_device.clone(),
            event_id: envelope.id,
            rotation_id,
            outcome,
        };
        let refused = |rotation_id: Option<RotationId>, reason: BackupRefusal, detail: &str| {
            answer(
                rotation_id,
                BackupOutcome::Refused {
                    reason,
                    detail: detail.to_owned(),
                },
            )
        };
        if envelope.device_id != *subject_device || envelope.event.kind() != subject_kind {
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
        let stored = match &envelope.event {
            Event::PasswordBackedUp(body) => Some(answer(Some(body.rotation_id), BackupOutcome::Stored)),
            _ => None,
        };
        if staged.device_event_applied_before(&envelope)? {
            return Ok(Ok(Verified::Duplicate(stored)));
        }
        if let Event::PasswordBackedUp(body) = &envelope.event {
            // Confirmed only once it is known to open: a backup nobody can read is no backup.
            let context = sealing_context(&envelope.device_id, &body.rotation_id);
            if !backup_opens(staged, body, &context, escrow)? {
                let detail = "the sealed password does not open with any escrow key of this orchestrator".to_owned();
                return Ok(Err(Refusal {
                    reason: QuarantineReason::Unopenable,
                    confirmation: Some(refused(Some(body.rotation_id), BackupRefusal::Unopenable, &detail)),
                    detail,
                }));
            }
        }
        Ok(Ok(Verified::Device {
            envelope: Box::new(envelope),
            confirmation: stored,
        }))
    }

    fn verify_orchestrator_event(
        &self,
        staged: &Staged<'_>,
        subject_kind: AuditKind,
        message: StreamMessage<'_>,
        precheck: Precheck,
    ) -> Result<Result<Verified, Refusal>, ProjectionError> {
        let checked = precheck.signature.as_ref();
        let envelope = match precheck.decoded.into_orchestrator(message.payload) {
            Ok(envelope) => envelope,
            Err(AuditDecodeError::Malformed(json)) => {
                return Ok(Err(describe_json_error(&json).into()));
            }
            Err(err @ AuditDecodeError::UnsupportedSchema { .. }) => {
                return Ok(Err((QuarantineReason::UnsupportedSchema, err.to_string()).into()));
            }
        };
        if envelope.event.kind() != subject_kind {
            return Ok(Err((
                QuarantineReason::SubjectMismatch,
                format!("envelope is a {} event", envelope.event.kind()),
            )
                .into()));
        }
        // Only the orchestrator writes here: anyone else who can publish on `laps.audit.>` would
        // otherwise plant tokens or devices.
        if let Err(detail) = signed_by_orchestrator(&self.signer_keys, staged, &envelope, message, checked)? {
            return Ok(Err((QuarantineReason::Forged, detail).into()));
        }
        if staged.event_applied(&envelope.id)? {
            return Ok(Ok(Verified::Duplicate(None)));
        }
        Ok(Ok(Verified::Orchestrator(Box::new(envelope))))
    }

    /// Whether `message` is signed, on exactly its subject, by `enrolled`, the key `device_id`
    /// enrolled with: `Err(why)` when it is not. `checked` is the batch's prepass, used when it
    /// checked against that same key (or found it attested).
    fn signed_by_enrolled_key(
        &self,
        enrolled: Option<&EnrolledKeyRecord>,
        device_id: &DeviceId,
        message: StreamMessage<'_>,
        checked: Option<&CheckedSignature>,
    ) -> Result<(), String> {
        let Some(enrolled) = enrolled else {
            return Err(format!("device {device_id} never enrolled"));
        };
        if let Some(verdict) = checked.and_then(|checked| checked.verdict_for(&enrolled.public_key)) {
            return verdict;
        }
        self.signer_keys
            .check(&enrolled.public_key, &Signer::Device(device_id.clone()), message)
    }
}

/// Whether a backup's sealed password is usable. Sealed to a key held: the trial decides.
/// Sealed to a key the history recorded but not held (a key lost, then replaced by a
/// recovery, whose backups are confirmed from before): accepted without a trial, unless the
/// backup came after the key was lost. Sealed to any other key: refused. Naming no key (an
/// older agent): the trial with every held key decides.
fn backup_opens(
    staged: &Staged<'_>,
    body: &PasswordBackedUp,
    context: &[u8],
    escrow: &dyn SealCheck,
) -> Result<bool, ProjectionError> {
    let Some(public_key) = &body.escrow_public_key else {
        return Ok(escrow.opens(&body.sealed_password, context));
    };
    if escrow.holds(public_key) {
        return Ok(escrow.opens(&body.sealed_password, context));
    }
    Ok(staged
        .record::<EscrowKeyRecord>(&keys::escrow_key(public_key))?
        .is_some_and(|record| record.lost_at_sequence.is_none()))
}

/// Whether `message` (an orchestrator event, `envelope`) is signed, on exactly its subject, by
/// the recorded orchestrator key; before any key is recorded, only an
/// `orchestrator_key_created` signed by the key it names is (trust on first use).
/// `Ok(Err(why))` when it is not.
fn signed_by_orchestrator(
    keys: &SignerKeys,
    staged: &Staged<'_>,
    envelope: &AuditEnvelope,
    message: StreamMessage<'_>,
    checked: Option<&CheckedSignature>,
) -> Result<Result<(), String>, ProjectionError> {
    let public_key = match (staged.orchestrator_key()?, &envelope.event) {
        (Some(recorded), _) => recorded.public_key,
        (None, AuditEvent::OrchestratorKeyCreated(body)) => body.public_key.clone(),
        (None, _) => return Ok(Err("no orchestrator key is recorded yet".to_owned())),
    };
    if let Some(verdict) = checked.and_then(|checked| checked.verdict_for(&public_key)) {
        return Ok(verdict);
    }
    Ok(keys.check(&public_key, &Signer::Orchestrator, message))
}

/// An event's signature, worked out before the fold.
#[derive(Debug, Clone)]
pub(super) enum CheckedSignature {
    /// Checked against the key its device had enrolled (or, for an orchestrator event, the
    /// orchestrator key recorded) when the batch began.
    Against {
        /// The key (base64) it was checked against: the verdict holds only while the signer's
        /// key is still this one.
        key: String,
        /// `Err(why)` when the signature is not that key's over exactly the subject and payload.
        verdict: Result<(), String>,
    },
    /// Attested by the orchestrator ([`crate::attestation`]): a replay takes that word for it,
    /// whatever key the fold finds.
    Attested,
}

impl CheckedSignature {
    /// The verdict for a signature whose signer's key is now `key`, if this one holds for it.
    fn verdict_for(&self, key: &str) -> Option<Result<(), String>> {
        match self {
            Self::Against { key: checked, verdict } => (checked == key).then(|| verdict.clone()),
            Self::Attested => Some(Ok(())),
        }
    }
}

/// What the fold needs of a message and can be worked out beside it, on every core and for the
/// next batch while one folds ([`super::store::Projections::precheck`]): its envelope decoded
/// and its signature checked. Pure: it changes nothing, and a verdict holds only for the key it
/// names, so one worked out before an earlier batch changed that key is checked again.
#[derive(Debug)]
pub(super) struct Precheck {
    /// The stream sequence of the message it was worked out for.
    pub(super) sequence: u64,
    /// Its envelope, decoded by its subject's kind.
    decoded: Decoded,
    /// Its signature, checked against its signer's key as it stood before, or attested.
    signature: Option<CheckedSignature>,
}

impl Precheck {
    /// Nothing worked out: the fold decodes and checks the message itself.
    pub(super) fn none(sequence: u64) -> Self {
        Self {
            sequence,
            decoded: Decoded::Nothing,
            signature: None,
        }
    }
}

/// A message's payload decoded as its subject says: a device event's envelope or an
/// orchestrator event's.
#[derive(Debug)]
enum Decoded {
    /// Not decoded (a message already folded, or on neither kind of subject).
    Nothing,
    /// On a device event's subject.
    Device(Result<Envelope, DecodeError>),
    /// On an orchestrator event's subject.
    Orchestrator(Result<AuditEnvelope, AuditDecodeError>),
}

impl Decoded {
    /// Decodes `message` as its subject says.
    fn of(message: &StreamMessage<'_>) -> Self {
        if subject::parse_audit_event(message.subject).is_some() {
            Self::Orchestrator(AuditEnvelope::from_json(message.payload))
        } else if subject::parse_device_event(message.subject).is_some() {
            Self::Device(Envelope::from_json(message.payload))
        } else {
            Self::Nothing
        }
    }

    /// The device event's envelope: this one, or `payload` decoded now.
    fn into_device(self, payload: &[u8]) -> Result<Envelope, DecodeError> {
        match self {
            Self::Device(decoded) => decoded,
            _ => Envelope::from_json(payload),
        }
    }

    /// The orchestrator event's envelope: this one, or `payload` decoded now.
    fn into_orchestrator(self, payload: &[u8]) -> Result<AuditEnvelope, AuditDecodeError> {
        match self {
            Self::Orchestrator(decoded) => decoded,
            _ => AuditEnvelope::from_json(payload),
        }
    }
}

/// Whose key an event is checked against: the words of a refusal name it.
#[derive(Debug, Clone)]
enum Signer {
    /// The device of a device event.
    Device(DeviceId),
    /// The orchestrator, of an orchestrator event.
    Orchestrator,
}

impl Signer {
    /// Why nothing signed by `self` could be checked: its key does not parse.
    fn unusable(&self, err: &fleetlaps_proto::signature::SignatureError) -> String {
        match self {
            Self::Device(device_id) => format!("the enrolled key of device {device_id} is not usable: {err}"),
            Self::Orchestrator => format!("orchestrator key: {err}"),
        }
    }

    /// Why a signature is not `self`'s.
    fn mismatch(&self, err: &fleetlaps_proto::signature::SignatureError) -> String {
        match self {
            Self::Device(_) => err.to_string(),
            Self::Orchestrator => format!("not signed by the recorded orchestrator key: {err}"),
        }
    }
}

/// The signers' keys (the devices' enrolled keys, the orchestrator key), parsed once and kept by
/// their text (a one-by-one check uses the decoded point; a batch decodes each key once per
/// batch), and the check of a fetch's signatures in batches, on every core.
#[derive(Default)]
pub(super) struct SignerKeys {
    /// Parsed keys by their base64 text; emptied when it reaches [`SignerKeys::MAX_KEPT`].
    parsed: std::sync::Mutex<HashMap<String, DevicePublicKey>>,
}

impl SignerKeys {
    /// The most parsed keys kept: one per device of a large fleet.
    const MAX_KEPT: usize = 1 << 20;
    /// Below this many signatures a batch is checked on the calling thread alone.
    const PARALLEL_FROM: usize = 16;

    /// `Err(why)` unless `message` is signed, on exactly its subject, by `key`, `signer`'s key.
    fn check(&self, key: &str, signer: &Signer, message: StreamMessage<'_>) -> Result<(), String> {
        let (parsed, signature) = self.key_and_signature(key, signer, message)?;
        parsed
            .verify(message.subject, message.payload, signature)
            .map_err(|err| signer.mismatch(&err))
    }

    /// What checking `message` against `key` needs: the parsed key and the signature header, or
    /// why it cannot be checked.
    fn key_and_signature<'m>(
        &self,
        key: &str,
        signer: &Signer,
        message: StreamMessage<'m>,
    ) -> Result<(DevicePublicKey, &'m str), String> {
        let parsed = self.parse(key).map_err(|err| signer.unusable(&err))?;
        let signature = message
            .signature
            .ok_or_else(|| format!("no {} header", fleetlaps_proto::api::SIGNATURE_HEADER))?;
        Ok((parsed, signature))
    }

    /// Checks `messages` against the keys in `work` (one entry per message, `None`: nothing to
    /// check) as one batch ([`fleetlaps_proto::signature::verify_batch`]).
    fn check_batch(
        &self,
        messages: &[StreamMessage<'_>],
        work: Vec<Option<(String, Signer)>>,
    ) -> Vec<Option<CheckedSignature>> {
        let prepared: Vec<_> = messages
            .iter()
            .zip(work)
            .map(|(message, work)| {
                work.map(|(key, signer)| {
                    let ready = self.key_and_signature(&key, &signer, *message);
                    (key, signer, ready)
                })
            })
            .collect();
        let events: Vec<SignedEvent<'_>> = messages
            .iter()
            .zip(&prepared)
            .filter_map(|(message, prepared)| match prepared {
                Some((_, _, Ok((key, signature)))) => Some(SignedEvent {
                    key,
                    subject: message.subject,
                    payload: message.payload,
                    signature,
                }),
                _ => None,
            })
            .collect();
        let mut verdicts = verify_batch(&events).into_iter();
        prepared
            .into_iter()
            .map(|prepared| {
                prepared.map(|(key, signer, ready)| CheckedSignature::Against {
                    key,
                    verdict: ready.and_then(|_| {
                        verdicts
                            .next()
                            .expect("one verdict per event checked")
                            .map_err(|err| signer.mismatch(&err))
                    }),
                })
            })
            .collect()
    }

    fn parse(&self, text: &str) -> Result<DevicePublicKey, fleetlaps_proto::signature::SignatureError> {
        let mut parsed = self.parsed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(key) = parsed.get(text) {
            return Ok(key.clone());
        }
        let key = DevicePublicKey::parse(text)?;
        if parsed.len() >= Self::MAX_KEPT {
            parsed.clear();
        }
        parsed.insert(text.to_owned(), key.clone());
        Ok(key)
    }

    /// Works out the [`Precheck`] of every message in `messages` after stream sequence `after`,
    /// spread over the machine's cores: its envelope decoded, and its signature checked when
    /// `tree` holds its signer's key (a device event against its device's enrolled key, an
    /// orchestrator event against the recorded orchestrator key). One entry per message.
    pub(super) fn precheck_all(
        &self,
        tree: &sled::Tree,
        messages: &[StreamMessage<'_>],
        after: u64,
        attestations: &Attestations,
    ) -> Vec<Precheck> {
        // A batch holds many events of each device: each enrolled key is read once.
        let mut enrolled_keys: HashMap<DeviceId, Option<String>> = HashMap::new();
        let mut orchestrator_key: Option<Option<String>> = None;
        let work: Vec<Work> = messages
            .iter()
            .map(|message| {
                if message.sequence <= after {
                    return Work::Skip;
                }
                if attestations.attested(message.sequence) {
                    return Work::Attested;
                }
                if subject::parse_audit_event(message.subject).is_some() {
                    let recorded = orchestrator_key
                        .get_or_insert_with(|| tree.orchestrator_key().ok().flatten().map(|key| key.public_key))
                        .clone();
                    return Work::Check(recorded.map(|key| (key, Signer::Orchestrator)));
                }
                let Some((device_id, _)) = subject::parse_device_event(message.subject) else {
                    return Work::Check(None);
                };
                let enrolled = enrolled_keys
                    .entry(device_id.clone())
                    .or_insert_with(|| tree.enrolled_key(&device_id).ok().flatten().map(|key| key.public_key))
                    .clone();
                Work::Check(enrolled.map(|key| (key, Signer::Device(device_id))))
            })
            .collect();
        let count = work.iter().filter(|work| !matches!(work, Work::Skip)).count();
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        if threads < 2 || count < Self::PARALLEL_FROM {
            return self.precheck_batch(messages, work);
        }
        let chunk = messages.len().div_ceil(threads);
        let mut work = work.into_iter();
        std::thread::scope(|scope| {
            let handles: Vec<_> = messages
                .chunks(chunk)
                .map(|messages| {
                    let work: Vec<_> = work.by_ref().take(messages.len()).collect();
                    scope.spawn(move || self.precheck_batch(messages, work))
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|handle| handle.join().expect("a precheck does not panic"))
                .collect()
        })
    }

    /// The prechecks of `messages` (one [`Work`] each): each decoded, and their signatures
    /// checked as one batch.
    fn precheck_batch(&self, messages: &[StreamMessage<'_>], work: Vec<Work>) -> Vec<Precheck> {
        let decoded: Vec<Decoded> = messages
            .iter()
            .zip(&work)
            .map(|(message, work)| match work {
                Work::Skip => Decoded::Nothing,
                Work::Attested | Work::Check(_) => Decoded::of(message),
            })
            .collect();
        let attested: Vec<bool> = work.iter().map(|work| matches!(work, Work::Attested)).collect();
        let signatures = self.check_batch(messages, work.into_iter().map(Work::into_key).collect());
        messages
            .iter()
            .zip(decoded)
            .zip(signatures)
            .zip(attested)
            .map(|(((message, decoded), signature), attested)| Precheck {
                sequence: message.sequence,
                decoded,
                signature: if attested {
                    Some(CheckedSignature::Attested)
                } else {
                    signature
                },
            })
            .collect()
    }
}

/// What a precheck does with one message.
enum Work {
    /// Nothing: folded before.
    Skip,
    /// Decode it; its signature is attested.
    Attested,
    /// Decode it, and check its signature against this key when its signer has one.
    Check(Option<(String, Signer)>),
}

impl Work {
    /// The key to check the signature against, if any.
    fn into_key(self) -> Option<(String, Signer)> {
        match self {
            Self::Skip | Self::Attested => None,
            Self::Check(key) => key,
        }
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
