use chrono::{TimeZone, Utc};
use fleetlaps_proto::command::{BackupOutcome, BackupRefusal};
use fleetlaps_proto::event::{
    Envelope, Event, PasswordBackedUp, PasswordRotated, PolicyApplied, RotationReason, sealing_context,
};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, RotationId};
use fleetlaps_proto::policy::{Policy, PolicySource};
use fleetlaps_proto::seal::{EscrowSecretKey, seal};
use fleetlaps_proto::signature::{DeviceSigningKey, OrchestratorSigningKey};
use fleetlaps_proto::subject;

use base64::Engine as _;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    projections: Projections,
    next_sequence: u64,
    /// The signing keys of the devices enrolled in this fixture.
    keys: std::collections::HashMap<DeviceId, DeviceSigningKey>,
}

/// The enrollment token of the fixtures.
fn enrollment_token_id() -> TokenId {
    TokenId::parse("018f0000-0000-7000-8000-000000000001").unwrap()
}

/// A device's signing key, the same in every fixture (so digests can be compared).
fn key_of(device_id: &DeviceId) -> DeviceSigningKey {
    let seed: [u8; 32] = Sha256::digest(device_id.as_str().as_bytes()).into();
    DeviceSigningKey::from_base64(&base64::engine::general_purpose::STANDARD.encode(seed)).unwrap()
}

/// The fixtures' orchestrator key, the same in every fixture (so digests can be compared).
fn orchestrator_key() -> OrchestratorSigningKey {
    OrchestratorSigningKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([9u8; 32])).unwrap()
}

/// An `orchestrator_key_created` recording `public_key`, unsigned.
fn orchestrator_key_record(public_key: &str) -> (String, Vec<u8>) {
    audit(AuditEvent::OrchestratorKeyCreated(
        fleetlaps_proto::audit::OrchestratorKeyCreated {
            public_key: public_key.to_owned(),
        },
    ))
}

/// The messages that create the fixtures' enrollment token and enroll `devices` with it.
fn enrollment_messages(devices: &[&DeviceId]) -> Vec<(String, Vec<u8>)> {
    let mut messages = vec![audit(AuditEvent::EnrollmentTokenCreated(
        fleetlaps_proto::audit::EnrollmentTokenCreated {
            token_id: enrollment_token_id(),
            name: "batch".to_owned(),
            max_uses: 10,
            expires_at: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
            token_sha256: "cd".repeat(32),
            created_by: "admin".to_owned(),
            created_by_token_id: None,
        },
    ))];
    for device_id in devices {
        messages.push(audit(AuditEvent::DeviceEnrolled(
            fleetlaps_proto::audit::DeviceEnrolled {
                device_id: (*device_id).clone(),
                device_name: DeviceName::parse("host-1").unwrap(),
                public_key: key_of(device_id).public_key().to_string(),
                enrollment_token_id: enrollment_token_id(),
                tags: Vec::new(),
            },
        )));
    }
    messages
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let projections = Projections::open(&dir.path().join("db")).expect("opens");
        let mut fixture = Self::without_orchestrator_key(dir, projections);
        // One record for every fixture (the same event id), so digests can be compared.
        static RECORD: std::sync::OnceLock<(String, Vec<u8>)> = std::sync::OnceLock::new();
        let (subject, payload) =
            RECORD.get_or_init(|| orchestrator_key_record(&orchestrator_key().public_key().to_string()));
        assert_eq!(
            fixture.apply_on(subject, payload),
            Outcome::Recorded(AuditKind::OrchestratorKeyCreated)
        );
        fixture
    }

    /// A fixture whose history has recorded no orchestrator key yet.
    fn without_orchestrator_key(dir: tempfile::TempDir, projections: Projections) -> Self {
        Self {
            _dir: dir,
            projections,
            next_sequence: 1,
            keys: std::collections::HashMap::new(),
        }
    }

    /// A fixture on a new store whose history has recorded no orchestrator key yet.
    fn empty() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let projections = Projections::open(&dir.path().join("db")).expect("opens");
        Self::without_orchestrator_key(dir, projections)
    }

    /// A fixture where `dev-1` is enrolled.
    fn enrolled() -> Self {
        let mut fixture = Self::new();
        fixture.enroll(&enrollment_messages(&[&device()]));
        fixture
    }

    /// Applies enrollment messages, and signs the enrolled devices' events from then on.
    fn enroll(&mut self, messages: &[(String, Vec<u8>)]) {
        for (subject, payload) in messages {
            let outcome = self.apply_on(subject, payload);
            assert!(matches!(outcome, Outcome::Recorded(_)), "{outcome:?}");
            if let Ok(AuditEvent::DeviceEnrolled(body)) = AuditEnvelope::from_json(payload).map(|e| e.event) {
                self.keys.insert(body.device_id.clone(), key_of(&body.device_id));
            }
        }
    }

    fn apply_full(&mut self, subject: &str, payload: &[u8], signature: Option<&str>) -> Applied {
        self.apply_checked(subject, payload, signature, &escrow())
    }

    /// Applies a message, trying backups with `escrow`.
    fn apply_checked(
        &mut self,
        subject: &str,
        payload: &[u8],
        signature: Option<&str>,
        escrow: &dyn SealCheck,
    ) -> Applied {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let published = Utc
            .timestamp_opt(1_700_000_000 + i64::try_from(sequence).expect("small"), 0)
            .unwrap();
        self.projections
            .apply(
                StreamMessage {
                    sequence,
                    subject,
                    published,
                    payload,
                    signature,
                },
                escrow,
            )
            .expect("store works")
    }

    /// Applies a device's signed event, trying backups with `escrow`.
    fn apply_device_event(&mut self, envelope: &Envelope, escrow: &dyn SealCheck) -> Applied {
        let (subject, payload, signature) = signed(envelope);
        self.apply_checked(&subject, &payload, signature.as_deref(), escrow)
    }

    fn apply_signed(&mut self, subject: &str, payload: &[u8], signature: Option<&str>) -> Outcome {
        self.apply_full(subject, payload, signature).outcome
    }

    /// Applies a message on `subject`, signed by the subject's device if it enrolled here, or by
    /// the fixtures' orchestrator key if it is an orchestrator event.
    fn apply_on(&mut self, subject: &str, payload: &[u8]) -> Outcome {
        let signature = if subject::parse_audit_event(subject).is_some() {
            Some(orchestrator_key().sign(subject, payload))
        } else {
            subject::parse_device_event(subject)
                .and_then(|(device_id, _)| self.keys.get(&device_id))
                .map(|key| key.sign(subject, payload))
        };
        self.apply_signed(subject, payload, signature.as_deref())
    }

    fn apply(&mut self, envelope: &Envelope) -> Outcome {
        let subject = subject::device_event(&envelope.device_id, envelope.event.kind());
        self.apply_on(&subject, &envelope.to_json())
    }
}

fn device() -> DeviceId {
    DeviceId::parse("dev-1").unwrap()
}

fn policy_applied(sequence: u64) -> Envelope {
    Envelope::new(
        device(),
        sequence,
        Utc::now(),
        Event::PolicyApplied(PolicyApplied {
            device_name: DeviceName::parse("host-1").unwrap(),
            source: PolicySource::LocalConfig,
            policy: Policy::default(),
        }),
    )
}

/// The escrow key the fixture's projections open backups with.
fn escrow() -> EscrowSecretKey {
    EscrowSecretKey::from_bytes([7; 32])
}

fn backed_up(sequence: u64, rotation_id: RotationId) -> Envelope {
    backed_up_to(sequence, rotation_id, &escrow().public_key())
}

fn backed_up_to(
    sequence: u64,
    rotation_id: RotationId,
    recipient: &fleetlaps_proto::seal::EscrowPublicKey,
) -> Envelope {
    backed_up_declaring(sequence, rotation_id, recipient, None)
}

/// A backup sealed to `recipient` that names `declared` as the key it is sealed to.
fn backed_up_declaring(
    sequence: u64,
    rotation_id: RotationId,
    recipient: &fleetlaps_proto::seal::EscrowPublicKey,
    declared: Option<fleetlaps_proto::seal::EscrowPublicKey>,
) -> Envelope {
    Envelope::new(
        device(),
        sequence,
        Utc::now(),
        Event::PasswordBackedUp(PasswordBackedUp {
            rotation_id,
            device_name: DeviceName::parse("host-1").unwrap(),
            account_name: AccountName::parse("lapsadmin").unwrap(),
            account_uid: Some(1001),
            sealed_password: seal(recipient, b"pw", &sealing_context(&device(), &rotation_id)),
            escrow_public_key: declared,
            recovery_sealed_password: None,
            expires_at: Utc::now(),
            reason: RotationReason::Initial,
        }),
    )
}

fn rotated(sequence: u64, rotation_id: RotationId) -> Envelope {
    Envelope::new(
        device(),
        sequence,
        Utc::now(),
        Event::PasswordRotated(PasswordRotated {
            rotation_id,
            account_name: AccountName::parse("lapsadmin").unwrap(),
            command_id: None,
        }),
    )
}

#[test]
fn a_backup_then_its_commit_make_the_current_credential() {
    let mut fixture = Fixture::enrolled();
    let rotation_id = RotationId::new();
    assert_eq!(
        fixture.apply(&policy_applied(1)),
        Outcome::Applied(EventKind::PolicyApplied)
    );
    assert_eq!(
        fixture.apply(&backed_up(2, rotation_id)),
        Outcome::Applied(EventKind::PasswordBackedUp)
    );
    let credentials = fixture.projections.credentials(&device(), 3).unwrap();
    assert_eq!(credentials.len(), 1);
    assert_eq!(credentials[0].applied_at, None);
    assert_eq!(
        fixture.apply(&rotated(3, rotation_id)),
        Outcome::Applied(EventKind::PasswordRotated)
    );
    let device_record = fixture.projections.device(&device()).unwrap().expect("known");
    assert_eq!(device_record.current_rotation, Some(rotation_id));
    assert_eq!(device_record.last_sequence, 3);
    assert!(
        fixture.projections.credentials(&device(), 3).unwrap()[0]
            .applied_at
            .is_some()
    );
}

#[test]
fn a_confirmed_rotation_reports_its_reason_and_a_backup_alone_reports_none() {
    let mut fixture = Fixture::enrolled();
    let rotation_id = RotationId::new();
    let backup = fixture.apply_device_event(&backed_up(1, rotation_id), &escrow());
    assert_eq!(backup.rotation, None, "a backup alone changes no account");
    let rotation = fixture.apply_device_event(&rotated(2, rotation_id), &escrow());
    assert_eq!(
        rotation.rotation,
        Some(ConfirmedRotation {
            reason: RotationReason::Initial,
            campaign_delays: Vec::new(),
            completes_a_campaign: false,
        })
    );
}

#[test]
fn credentials_come_newest_first_and_limited() {
    let mut fixture = Fixture::enrolled();
    let rotations: Vec<RotationId> = (0..4).map(|_| RotationId::new()).collect();
    for (index, rotation_id) in rotations.iter().enumerate() {
        fixture.apply(&backed_up(index as u64 + 1, *rotation_id));
    }
    let credentials = fixture.projections.credentials(&device(), 3).unwrap();
    let ids: Vec<RotationId> = credentials.iter().map(|c| c.rotation_id).collect();
    assert_eq!(ids, vec![rotations[3], rotations[2], rotations[1]]);
}

#[test]
fn a_resent_or_replayed_event_is_a_duplicate_that_changes_nothing_and_a_resent_backup_is_still_confirmed() {
    let mut fixture = Fixture::enrolled();
    let envelope = backed_up(1, RotationId::new());
    let first = fixture.apply_full(
        &subject::device_event(&device(), EventKind::PasswordBackedUp),
        &envelope.to_json(),
        Some(&key_of(&device()).sign(
            &subject::device_event(&device(), EventKind::PasswordBackedUp),
            &envelope.to_json(),
        )),
    );
    assert_eq!(first.outcome, Outcome::Applied(EventKind::PasswordBackedUp));
    assert_eq!(
        first.confirmation.map(|confirmation| confirmation.outcome),
        Some(BackupOutcome::Stored)
    );
    let before = fixture.projections.device(&device()).unwrap();
    let credentials_before = fixture.projections.credentials(&device(), 10).unwrap();

    // The same event again (a device's re-send after JetStream's duplicate window, or a replay).
    let subject = subject::device_event(&device(), EventKind::PasswordBackedUp);
    let payload = envelope.to_json();
    let signature = key_of(&device()).sign(&subject, &payload);
    let again = fixture.apply_full(&subject, &payload, Some(&signature));
    assert_eq!(again.outcome, Outcome::Duplicate);
    let confirmation = again.confirmation.expect("a re-sent backup is still confirmed");
    assert_eq!(
        (confirmation.event_id, confirmation.outcome),
        (envelope.id, BackupOutcome::Stored)
    );
    assert_eq!(fixture.projections.device(&device()).unwrap(), before);
    assert_eq!(
        fixture.projections.credentials(&device(), 10).unwrap(),
        credentials_before
    );
    assert!(fixture.projections.quarantine().unwrap().is_empty());
}

#[test]
fn an_older_signed_backup_with_a_new_id_is_stored_never_dropped_and_the_position_never_moves_back() {
    // A clone, or a rolled-back copy that had not yet noticed: its events are older than the
    // newest one applied, but signed by the device, and a backup must never be lost.
    let mut fixture = Fixture::enrolled();
    fixture.apply(&policy_applied(5));
    let older_rotation = RotationId::new();
    assert_eq!(
        fixture.apply(&backed_up(3, older_rotation)),
        Outcome::Applied(EventKind::PasswordBackedUp)
    );
    let credentials = fixture.projections.credentials(&device(), 10).unwrap();
    assert_eq!(credentials[0].rotation_id, older_rotation, "the backup is stored");
    let device_record = fixture.projections.device(&device()).unwrap().unwrap();
    assert_eq!(device_record.last_sequence, 5, "the position never moves back");
    assert_eq!(device_record.out_of_order_events, 1);
    assert!(fixture.projections.quarantine().unwrap().is_empty());
}

#[test]
fn a_backup_that_opens_with_no_escrow_key_is_refused_to_its_device_and_not_stored() {
    let mut fixture = Fixture::enrolled();
    let rotation_id = RotationId::new();
    let envelope = backed_up_to(1, rotation_id, &EscrowSecretKey::generate().public_key());
    let subject = subject::device_event(&device(), EventKind::PasswordBackedUp);
    let payload = envelope.to_json();
    let signature = key_of(&device()).sign(&subject, &payload);
    let applied = fixture.apply_full(&subject, &payload, Some(&signature));
    assert_eq!(applied.outcome, Outcome::Quarantined(QuarantineReason::Unopenable));
    let confirmation = applied.confirmation.expect("its device hears the refusal");
    assert_eq!(confirmation.event_id, envelope.id);
    assert!(
        matches!(
            confirmation.outcome,
            BackupOutcome::Refused {
                reason: BackupRefusal::Unopenable,
                ..
            }
        ),
        "{confirmation:?}"
    );
    assert!(fixture.projections.credentials(&device(), 10).unwrap().is_empty());
}

#[test]
fn a_backup_in_a_schema_this_orchestrator_does_not_read_is_refused_to_its_device_by_id() {
    let mut fixture = Fixture::enrolled();
    let envelope = backed_up(1, RotationId::new());
    let mut json: serde_json::Value = serde_json::from_slice(&envelope.to_json()).unwrap();
    json["schema"] = 2.into();
    let subject = subject::device_event(&device(), EventKind::PasswordBackedUp);
    let payload = json.to_string().into_bytes();
    let signature = key_of(&device()).sign(&subject, &payload);
    let applied = fixture.apply_full(&subject, &payload, Some(&signature));
    assert_eq!(
        applied.outcome,
        Outcome::Quarantined(QuarantineReason::UnsupportedSchema)
    );
    let confirmation = applied.confirmation.expect("its device hears the refusal");
    assert_eq!(confirmation.event_id, envelope.id);
    assert!(
        matches!(
            confirmation.outcome,
            BackupOutcome::Refused {
                reason: BackupRefusal::UnsupportedSchema,
                ..
            }
        ),
        "{confirmation:?}"
    );
    // Unsigned, the same bytes tell the device nothing: anyone could have sent them.
    let unsigned = fixture.apply_full(&subject, &payload, None);
    assert_eq!(unsigned.confirmation, None);
}

#[test]
fn forged_events_unsigned_signed_by_another_key_or_naming_another_device_change_nothing() {
    let other = DeviceId::parse("dev-2").unwrap();
    let mut fixture = Fixture::new();
    fixture.enroll(&enrollment_messages(&[&device(), &other]));
    fixture.apply(&policy_applied(1));
    let before = fixture.projections.device(&device()).unwrap();
    let envelope = backed_up(2, RotationId::new());
    let subject = subject::device_event(&device(), EventKind::PasswordBackedUp);
    let payload = envelope.to_json();

    assert_eq!(
        fixture.apply_signed(&subject, &payload, None),
        Outcome::Quarantined(QuarantineReason::Forged),
        "unsigned"
    );
    let by_another = DeviceSigningKey::generate().sign(&subject, &payload);
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some(&by_another)),
        Outcome::Quarantined(QuarantineReason::Forged),
        "signed by a key that is not dev-1's"
    );
    let by_other_device = key_of(&other).sign(&subject, &payload);
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some(&by_other_device)),
        Outcome::Quarantined(QuarantineReason::Forged),
        "signed by another enrolled device"
    );
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some("not base64!")),
        Outcome::Quarantined(QuarantineReason::Forged),
        "garbage signature"
    );
    // Signed by dev-2 on its own subject, but naming dev-1.
    let foreign_subject = subject::device_event(&other, EventKind::PasswordBackedUp);
    assert_eq!(
        fixture.apply_on(&foreign_subject, &payload),
        Outcome::Quarantined(QuarantineReason::SubjectMismatch)
    );
    // A device that never enrolled.
    let stranger = DeviceId::parse("dev-3").unwrap();
    let mut introduced = policy_applied(1);
    introduced.device_id = stranger.clone();
    assert_eq!(
        fixture.apply(&introduced),
        Outcome::Quarantined(QuarantineReason::UnknownDevice)
    );

    assert_eq!(fixture.projections.device(&device()).unwrap(), before);
    assert!(fixture.projections.credentials(&device(), 10).unwrap().is_empty());
    assert!(fixture.projections.device(&stranger).unwrap().is_none());
    let quarantine = fixture.projections.quarantine().unwrap();
    assert_eq!(quarantine.len(), 6);
    assert!(!format!("{quarantine:?}").contains("sealed_password"));
}

#[test]
fn enrollment_tokens_count_their_uses_and_enrollment_creates_the_device_and_its_key() {
    let mut fixture = Fixture::new();
    fixture.enroll(&enrollment_messages(&[&device()]));
    let token = fixture
        .projections
        .token(&enrollment_token_id())
        .unwrap()
        .expect("created");
    assert_eq!(
        (token.kind, token.uses, token.max_uses),
        (TokenKind::Enrollment, 1, Some(10))
    );
    assert_eq!(
        fixture
            .projections
            .token_by_digest(&"cd".repeat(32))
            .unwrap()
            .map(|token| token.token_id),
        Some(enrollment_token_id())
    );
    assert_eq!(fixture.projections.tokens(TokenKind::Enrollment).unwrap(), vec![token]);
    assert!(fixture.projections.tokens(TokenKind::Api).unwrap().is_empty());
    let key = fixture.projections.enrolled_key(&device()).unwrap().expect("enrolled");
    assert_eq!(key.public_key, key_of(&device()).public_key().to_string());
    let record = fixture
        .projections
        .device(&device())
        .unwrap()
        .expect("created by the enrollment");
    assert_eq!((record.device_name.as_str(), record.last_sequence), ("host-1", 0));

    // An enrollment with a bad key or an unknown token changes nothing.
    let bad_key = audit(AuditEvent::DeviceEnrolled(fleetlaps_proto::audit::DeviceEnrolled {
        device_id: DeviceId::parse("dev-9").unwrap(),
        device_name: DeviceName::parse("host-9").unwrap(),
        public_key: "not a key".to_owned(),
        enrollment_token_id: enrollment_token_id(),
        tags: Vec::new(),
    }));
    assert_eq!(
        fixture.apply_on(&bad_key.0, &bad_key.1),
        Outcome::Quarantined(QuarantineReason::Malformed)
    );
    let unknown_token = audit(AuditEvent::DeviceEnrolled(fleetlaps_proto::audit::DeviceEnrolled {
        device_id: DeviceId::parse("dev-9").unwrap(),
        device_name: DeviceName::parse("host-9").unwrap(),
        public_key: key_of(&device()).public_key().to_string(),
        enrollment_token_id: TokenId::new(),
        tags: Vec::new(),
    }));
    assert_eq!(
        fixture.apply_on(&unknown_token.0, &unknown_token.1),
        Outcome::Quarantined(QuarantineReason::UnknownToken)
    );
    assert!(
        fixture
            .projections
            .device(&DeviceId::parse("dev-9").unwrap())
            .unwrap()
            .is_none()
    );

    let revoked = audit(AuditEvent::EnrollmentTokenRevoked(
        fleetlaps_proto::audit::EnrollmentTokenRevoked {
            token_id: enrollment_token_id(),
            revoked_by: "admin".to_owned(),
            revoked_by_token_id: None,
        },
    ));
    assert_eq!(
        fixture.apply_on(&revoked.0, &revoked.1),
        Outcome::Recorded(AuditKind::EnrollmentTokenRevoked)
    );
    let token = fixture
        .projections
        .token(&enrollment_token_id())
        .unwrap()
        .expect("kept");
    assert!(token.revoked_at.is_some());
}

#[test]
fn a_redelivered_sequence_is_skipped() {
    let mut fixture = Fixture::enrolled();
    fixture.apply(&policy_applied(1));
    let payload = policy_applied(2).to_json();
    let outcome = fixture
        .projections
        .apply(
            StreamMessage {
                sequence: 1,
                subject: "laps.events.dev-1.policy_applied",
                published: Utc::now(),
                payload: &payload,
                signature: None,
            },
            &escrow(),
        )
        .unwrap()
        .outcome;
    assert_eq!(outcome, Outcome::AlreadySeen);
}

#[test]
fn bad_messages_are_quarantined_without_their_payload() {
    let mut fixture = Fixture::new();
    let secret_payload = br#"{"schema": 1, "password": "hunter2-secret"#;
    assert_eq!(
        fixture.apply_on("laps.events.dev-1.password_backed_up", secret_payload),
        Outcome::Quarantined(QuarantineReason::Malformed)
    );
    let mut wrong_type: serde_json::Value = serde_json::from_slice(&policy_applied(1).to_json()).unwrap();
    wrong_type["sequence"] = "hunter2-secret".into();
    assert_eq!(
        fixture.apply_on("laps.events.dev-1.policy_applied", wrong_type.to_string().as_bytes()),
        Outcome::Quarantined(QuarantineReason::Malformed)
    );
    assert_eq!(
        fixture.apply(&policy_applied(1)),
        Outcome::Quarantined(QuarantineReason::UnknownDevice),
        "a policy no longer introduces a device: enrollment does"
    );
    let other = DeviceId::parse("dev-2").unwrap();
    fixture.enroll(&enrollment_messages(&[&device(), &other]));
    assert_eq!(
        fixture.apply_on("laps.events.dev-2.policy_applied", &policy_applied(1).to_json()),
        Outcome::Quarantined(QuarantineReason::SubjectMismatch)
    );
    fixture.apply(&policy_applied(1));
    assert_eq!(
        fixture.apply(&rotated(2, RotationId::new())),
        Outcome::Quarantined(QuarantineReason::UnknownRotation)
    );

    let quarantine = fixture.projections.quarantine().unwrap();
    assert_eq!(quarantine.len(), 5);
    let stored = format!("{quarantine:?}");
    assert!(!stored.contains("hunter2"), "{stored}");
    // The orchestrator key's record, then the 9 messages above.
    assert_eq!(fixture.projections.last_applied_sequence().unwrap(), 10);
}

#[test]
fn the_same_messages_fold_to_the_same_digest() {
    let rotation_id = RotationId::new();
    let envelopes = [policy_applied(1), backed_up(2, rotation_id), rotated(3, rotation_id)];
    let enrollment = enrollment_messages(&[&device()]);
    let mut first = Fixture::new();
    let mut second = Fixture::new();
    first.enroll(&enrollment);
    second.enroll(&enrollment);
    for envelope in &envelopes {
        first.apply(envelope);
        second.apply(envelope);
    }
    assert_eq!(
        first.projections.digest().unwrap(),
        second.projections.digest().unwrap()
    );
    second.apply(&policy_applied(4));
    assert_ne!(
        first.projections.digest().unwrap(),
        second.projections.digest().unwrap()
    );
}

/// Folds `messages` (subject, payload, signature) into `one_by_one` a message at a time and
/// into `batched` as one fetch, checks that both give the same outcomes and the same state, and
/// returns the outcomes.
fn fold_both_ways(
    messages: &[(String, Vec<u8>, Option<String>)],
    one_by_one: &mut Fixture,
    batched: &Fixture,
) -> Vec<Applied> {
    let expected: Vec<Applied> = messages
        .iter()
        .map(|(subject, payload, signature)| one_by_one.apply_full(subject, payload, signature.as_deref()))
        .collect();
    let stream_messages = as_stream_messages(messages, batched.projections.last_applied_sequence().unwrap() + 1);
    let outcomes = batched.projections.apply_all(&stream_messages, &escrow()).unwrap();
    assert_eq!(outcomes, expected);
    assert_eq!(
        batched.projections.digest().unwrap(),
        one_by_one.projections.digest().unwrap()
    );
    outcomes
}

/// `envelope` as its device publishes it: its subject, its payload, its device's signature.
fn signed(envelope: &Envelope) -> (String, Vec<u8>, Option<String>) {
    let subject = subject::device_event(&envelope.device_id, envelope.event.kind());
    let payload = envelope.to_json();
    let signature = key_of(&envelope.device_id).sign(&subject, &payload);
    (subject, payload, Some(signature))
}

/// `messages` (subject, payload, signature) as stream messages numbered from `first`.
fn as_stream_messages(messages: &[(String, Vec<u8>, Option<String>)], first: u64) -> Vec<StreamMessage<'_>> {
    messages
        .iter()
        .zip(first..)
        .map(|((subject, payload, signature), sequence)| StreamMessage {
            sequence,
            subject,
            published: Utc
                .timestamp_opt(1_700_000_000 + i64::try_from(sequence).unwrap(), 0)
                .unwrap(),
            payload,
            signature: signature.as_deref(),
        })
        .collect()
}

#[test]
fn one_batch_folds_to_the_same_state_and_outcomes_as_one_message_at_a_time() {
    // Later messages of the batch depend on earlier ones (the enrollment, the backup a rotation
    // confirms, an event id seen earlier in the batch); refused messages sit between them.
    let rotation_id = RotationId::new();
    let orchestrator = |(subject, payload): (String, Vec<u8>)| {
        let signature = orchestrator_key().sign(&subject, &payload);
        (subject, payload, Some(signature))
    };
    let backup = backed_up(2, rotation_id);
    let mut forged = signed(&policy_applied(3));
    forged.2 = Some(key_of(&DeviceId::parse("dev-2").unwrap()).sign(&forged.0, &forged.1));
    let mut messages: Vec<(String, Vec<u8>, Option<String>)> = enrollment_messages(&[&device()])
        .into_iter()
        .map(orchestrator)
        .collect();
    messages.extend([
        signed(&policy_applied(1)),
        signed(&backup),
        forged,
        signed(&backup),
        (
            "laps.events.dev-1.password_backed_up".to_owned(),
            b"{not json".to_vec(),
            None,
        ),
        signed(&rotated(4, rotation_id)),
    ]);
    // Enough device events for the signatures to be checked on every core, one forged among them.
    messages.extend((5..30).map(|sequence| signed(&policy_applied(sequence))));
    let late_forgery = messages.len() - 3;
    messages[late_forgery].2 =
        Some(key_of(&DeviceId::parse("dev-2").unwrap()).sign(&messages[late_forgery].0, &messages[late_forgery].1));

    let batched = Fixture::new();
    let first = batched.projections.last_applied_sequence().unwrap() + 1;
    let outcomes = fold_both_ways(&messages, &mut Fixture::new(), &batched);

    let kinds: Vec<Outcome> = outcomes.iter().map(|applied| applied.outcome).collect();
    assert_eq!(kinds[late_forgery], Outcome::Quarantined(QuarantineReason::Forged));
    assert_eq!(
        kinds[2..8],
        [
            Outcome::Applied(EventKind::PolicyApplied),
            Outcome::Applied(EventKind::PasswordBackedUp),
            Outcome::Quarantined(QuarantineReason::Forged),
            Outcome::Duplicate,
            Outcome::Quarantined(QuarantineReason::Malformed),
            Outcome::Applied(EventKind::PasswordRotated),
        ]
    );
    let stream_messages = as_stream_messages(&messages, first);
    assert_eq!(
        batched.projections.applied_sequence(),
        stream_messages.last().unwrap().sequence
    );

    // Delivered again, the whole batch is skipped.
    let again = batched.projections.apply_all(&stream_messages, &escrow()).unwrap();
    assert!(again.iter().all(|applied| applied.outcome == Outcome::AlreadySeen));
}

#[test]
fn a_fetchs_signatures_checked_in_batches_give_each_event_the_verdict_it_gets_alone() {
    // The device enrolled before the fetch, so every one of its events is checked in the
    // batches (groups of 64, on every core); bad signatures sit in different groups.
    let mut messages: Vec<(String, Vec<u8>, Option<String>)> =
        (1..=150).map(|sequence| signed(&policy_applied(sequence))).collect();
    let other_key = key_of(&DeviceId::parse("dev-2").unwrap());
    for forged in [10, 70, 140] {
        messages[forged].2 = Some(other_key.sign(&messages[forged].0, &messages[forged].1));
    }
    messages[100].2 = None;
    messages[120].2 = Some(key_of(&device()).sign(&messages[120].0, b"{}"));

    let enrollment = enrollment_messages(&[&device()]);
    let mut one_by_one = Fixture::new();
    one_by_one.enroll(&enrollment);
    let mut batched = Fixture::new();
    batched.enroll(&enrollment);
    let outcomes = fold_both_ways(&messages, &mut one_by_one, &batched);

    let refused: Vec<usize> = (0..messages.len())
        .filter(|&n| outcomes[n].outcome == Outcome::Quarantined(QuarantineReason::Forged))
        .collect();
    assert_eq!(refused, [10, 70, 100, 120, 140]);
}

#[test]
fn a_fetchs_orchestrator_events_checked_in_batches_give_each_the_verdict_it_gets_alone() {
    // The orchestrator key is recorded before the fetch, so its events are checked in the
    // batches too; one is signed by another key, one is not signed.
    let devices: Vec<DeviceId> = (0..30)
        .map(|n| DeviceId::parse(&format!("dev-b{n}")).unwrap())
        .collect();
    let mut messages: Vec<(String, Vec<u8>, Option<String>)> = enrollment_messages(&devices.iter().collect::<Vec<_>>())
        .into_iter()
        .map(|(subject, payload)| {
            let signature = orchestrator_key().sign(&subject, &payload);
            (subject, payload, Some(signature))
        })
        .collect();
    messages[5].2 = Some(OrchestratorSigningKey::generate().sign(&messages[5].0, &messages[5].1));
    messages[20].2 = None;

    let outcomes = fold_both_ways(&messages, &mut Fixture::new(), &Fixture::new());

    let forged: Vec<usize> = (0..messages.len())
        .filter(|&n| outcomes[n].outcome == Outcome::Quarantined(QuarantineReason::Forged))
        .collect();
    assert_eq!(forged, [5, 20]);
}

#[test]
fn a_precheck_made_before_an_earlier_batch_replaced_the_devices_key_is_checked_again_in_the_fold() {
    // A consumer prechecks the next batch while the one before it folds. Here the one before
    // enrolls dev-1 again with a new key: events signed with the old key, which the precheck
    // passed, must be refused, and events signed with the new key, which it refused, applied.
    let old_key = key_of(&device());
    let new_key = key_of(&DeviceId::parse("dev-new-key").unwrap());
    let orchestrator = |(subject, payload): (String, Vec<u8>)| {
        let signature = orchestrator_key().sign(&subject, &payload);
        (subject, payload, Some(signature))
    };
    let enrolled_again = vec![orchestrator(audit(AuditEvent::DeviceEnrolled(
        fleetlaps_proto::audit::DeviceEnrolled {
            device_id: device(),
            device_name: DeviceName::parse("host-1").unwrap(),
            public_key: new_key.public_key().to_string(),
            enrollment_token_id: enrollment_token_id(),
            tags: Vec::new(),
        },
    )))];
    let next: Vec<(String, Vec<u8>, Option<String>)> = (1..=40)
        .map(|sequence| {
            let (subject, payload, _) = signed(&policy_applied(sequence));
            let key = if sequence % 2 == 0 { &new_key } else { &old_key };
            let signature = key.sign(&subject, &payload);
            (subject, payload, Some(signature))
        })
        .collect();

    let enrollment = enrollment_messages(&[&device()]);
    let mut pipelined = Fixture::new();
    pipelined.enroll(&enrollment);
    let first = pipelined.projections.last_applied_sequence().unwrap() + 1;
    let enrolled_again_messages = as_stream_messages(&enrolled_again, first);
    let next_messages = as_stream_messages(&next, first + 1);
    let prechecked = pipelined.projections.precheck(&next_messages).unwrap();
    let outcomes = pipelined
        .projections
        .apply_all(&enrolled_again_messages, &escrow())
        .unwrap();
    assert_eq!(outcomes[0].outcome, Outcome::Recorded(AuditKind::DeviceEnrolled));
    let outcomes = pipelined
        .projections
        .apply_prechecked(&next_messages, prechecked, &escrow())
        .unwrap();

    let applied: Vec<u64> = next_messages
        .iter()
        .zip(&outcomes)
        .filter(|(_, applied)| applied.outcome == Outcome::Applied(EventKind::PolicyApplied))
        .map(|(message, _)| message.sequence - first)
        .collect();
    assert_eq!(applied, (1..=40).filter(|n| n % 2 == 0).collect::<Vec<u64>>());
    assert!(
        outcomes
            .iter()
            .filter(|applied| applied.outcome != Outcome::Applied(EventKind::PolicyApplied))
            .all(|applied| applied.outcome == Outcome::Quarantined(QuarantineReason::Forged))
    );
    // The same as folding both batches without prechecks made ahead.
    let mut one_by_one = Fixture::new();
    one_by_one.enroll(&enrollment);
    for (subject, payload, signature) in enrolled_again.iter().chain(&next) {
        one_by_one.apply_full(subject, payload, signature.as_deref());
    }
    assert_eq!(
        pipelined.projections.digest().unwrap(),
        one_by_one.projections.digest().unwrap()
    );
}

#[test]
fn a_precheck_made_for_other_messages_is_not_used() {
    // Prechecks belong to the messages they were made for: given with other messages (a
    // consumer re-bound between fetching and folding), they are ignored, not misapplied.
    let mut forged = signed(&policy_applied(1));
    forged.2 = Some(key_of(&DeviceId::parse("dev-2").unwrap()).sign(&forged.0, &forged.1));
    let good = signed(&policy_applied(1));
    let fixture = Fixture::enrolled();
    let first = fixture.projections.last_applied_sequence().unwrap() + 1;
    let good_messages = [good];
    let forged_messages = [forged];
    let prechecked_good = fixture
        .projections
        .precheck(&as_stream_messages(&good_messages, first + 1))
        .unwrap();
    let outcomes = fixture
        .projections
        .apply_prechecked(&as_stream_messages(&forged_messages, first), prechecked_good, &escrow())
        .unwrap();
    assert_eq!(outcomes[0].outcome, Outcome::Quarantined(QuarantineReason::Forged));
}

#[test]
fn the_name_index_finds_a_device_in_any_case_and_follows_its_renames() {
    let mut fixture = Fixture::enrolled();
    let named = |fixture: &Fixture, name: &str| -> Vec<String> {
        fixture
            .projections
            .devices_named(&DeviceName::parse(name).unwrap())
            .unwrap()
            .into_iter()
            .map(|device| device.device_id.to_string())
            .collect()
    };
    assert_eq!(named(&fixture, "HOST-1"), ["dev-1"]);
    assert!(named(&fixture, "host").is_empty(), "a prefix of a name is not the name");

    let mut renamed = policy_applied(1);
    if let Event::PolicyApplied(body) = &mut renamed.event {
        body.device_name = DeviceName::parse("Web-7").unwrap();
    }
    assert_eq!(fixture.apply(&renamed), Outcome::Applied(EventKind::PolicyApplied));
    assert_eq!(named(&fixture, "web-7"), ["dev-1"]);
    assert!(named(&fixture, "host-1").is_empty(), "the old name no longer finds it");
}

#[test]
fn password_reads_are_indexed_by_principal_with_their_time() {
    let mut fixture = Fixture::new();
    let read = |principal: &str, device: &str, at: i64| {
        let envelope = AuditEnvelope::new(
            Utc.timestamp_opt(at, 0).unwrap(),
            AuditEvent::PasswordRead(fleetlaps_proto::audit::PasswordRead {
                principal: principal.to_owned(),
                principal_token_id: None,
                device_id: DeviceId::parse(device).unwrap(),
                rotation_ids: Vec::new(),
                reason: None,
                client_name: None,
                client_version: None,
                source_address: None,
            }),
        );
        (subject::audit_event(envelope.event.kind()), envelope.to_json())
    };
    for (principal, device, at) in [
        ("helpdesk/eve", "dev-1", 1_000),
        ("helpdesk/eve", "dev-2", 2_000),
        ("helpdesk", "dev-3", 3_000),
        ("helpdesk/eve", "dev-4", 4_000),
    ] {
        let (subject, payload) = read(principal, device, at);
        assert_eq!(
            fixture.apply_on(&subject, &payload),
            Outcome::Recorded(AuditKind::PasswordRead)
        );
    }
    let read_by = |principal: &str, since: i64| -> Vec<String> {
        fixture
            .projections
            .devices_read_by(principal, Utc.timestamp_opt(since, 0).unwrap())
            .unwrap()
            .into_iter()
            .map(|device| device.to_string())
            .collect()
    };
    assert_eq!(read_by("helpdesk/eve", 0), ["dev-1", "dev-2", "dev-4"]);
    assert_eq!(read_by("helpdesk/eve", 2_000), ["dev-2", "dev-4"]);
    assert_eq!(
        read_by("helpdesk", 0),
        ["dev-3"],
        "a principal whose name begins another's"
    );
    assert!(read_by("nobody", 0).is_empty());
}

fn audit(event: fleetlaps_proto::audit::AuditEvent) -> (String, Vec<u8>) {
    let envelope = AuditEnvelope::new(Utc.timestamp_opt(1_700_000_000, 0).unwrap(), event);
    (subject::audit_event(envelope.event.kind()), envelope.to_json())
}

#[test]
fn orchestrator_events_join_the_audit_history_and_change_tokens_and_the_throttle() {
    use fleetlaps_proto::audit::{RotationRequested, TokenCreated, TokenRevoked};
    use fleetlaps_proto::command::CommandId;

    let mut fixture = Fixture::new();
    let token_id = TokenId::new();
    let created = audit(AuditEvent::TokenCreated(TokenCreated {
        token_id,
        name: "auditor".to_owned(),
        scopes: vec!["Audit.Read.All".to_owned()],
        expires_at: None,
        token_sha256: "ab".repeat(32),
        created_by: "admin".to_owned(),
        created_by_token_id: None,
    }));
    assert_eq!(
        fixture.apply_on(&created.0, &created.1),
        Outcome::Recorded(AuditKind::TokenCreated)
    );
    assert_eq!(fixture.apply_on(&created.0, &created.1), Outcome::Duplicate);
    let token = fixture
        .projections
        .token_by_digest(&"ab".repeat(32))
        .unwrap()
        .expect("by digest");
    assert_eq!((token.name.as_str(), token.revoked_at), ("auditor", None));

    let revoked = audit(AuditEvent::TokenRevoked(TokenRevoked {
        token_id,
        revoked_by: "admin".to_owned(),
        revoked_by_token_id: None,
    }));
    fixture.apply_on(&revoked.0, &revoked.1);
    assert!(
        fixture
            .projections
            .token(&token_id)
            .unwrap()
            .expect("kept")
            .revoked_at
            .is_some()
    );

    let unknown = audit(AuditEvent::TokenRevoked(TokenRevoked {
        token_id: TokenId::new(),
        revoked_by: "admin".to_owned(),
        revoked_by_token_id: None,
    }));
    assert_eq!(
        fixture.apply_on(&unknown.0, &unknown.1),
        Outcome::Quarantined(QuarantineReason::UnknownToken)
    );
    // An API token's revocation does not name an enrollment token, nor the reverse.
    let crossed = audit(AuditEvent::EnrollmentTokenRevoked(
        fleetlaps_proto::audit::EnrollmentTokenRevoked {
            token_id,
            revoked_by: "admin".to_owned(),
            revoked_by_token_id: None,
        },
    ));
    assert_eq!(
        fixture.apply_on(&crossed.0, &crossed.1),
        Outcome::Quarantined(QuarantineReason::UnknownToken)
    );
    let unknown = audit(AuditEvent::TokenRevoked(TokenRevoked {
        token_id: TokenId::new(),
        revoked_by: "admin".to_owned(),
        revoked_by_token_id: None,
    }));
    assert_eq!(
        fixture.apply_on(&unknown.0, &unknown.1),
        Outcome::Quarantined(QuarantineReason::UnknownToken)
    );
    // An event on another kind's subject is refused.
    assert_eq!(
        fixture.apply_on(&subject::audit_event(AuditKind::PasswordRead), &created.1),
        Outcome::Quarantined(QuarantineReason::SubjectMismatch)
    );

    let requested = audit(AuditEvent::RotationRequested(RotationRequested {
        command_id: CommandId::new(),
        device_id: device(),
        principal: "operator".to_owned(),
        principal_token_id: None,
        reason: None,
    }));
    fixture.apply_on(&requested.0, &requested.1);
    assert!(fixture.projections.last_rotation_request(&device()).unwrap().is_some());

    let history = fixture.projections.audit(0, 10).unwrap();
    let kinds: Vec<AuditKind> = history.iter().map(|(_, envelope)| envelope.event.kind()).collect();
    assert_eq!(
        kinds,
        [
            AuditKind::OrchestratorKeyCreated,
            AuditKind::TokenCreated,
            AuditKind::TokenRevoked,
            AuditKind::RotationRequested
        ]
    );
    assert_eq!(
        fixture.projections.audit(history[1].0, 10).unwrap().len(),
        2,
        "after a position"
    );
}

/// `policy_applied(sequence)` as emitted by the running copy `instance`.
fn policy_from(instance: fleetlaps_proto::ids::InstanceId, sequence: u64) -> Envelope {
    policy_applied(sequence).emitted_by(instance)
}

#[test]
fn one_copy_restarted_many_times_is_no_clone() {
    use fleetlaps_proto::ids::InstanceId;

    let mut fixture = Fixture::enrolled();
    for sequence in 1..=20 {
        // Every start of the agent is a new instance; none is heard from again.
        let outcome = fixture.apply(&policy_from(InstanceId::new(), sequence));
        assert_eq!(outcome, Outcome::Applied(EventKind::PolicyApplied));
    }
    let device = fixture.projections.device(&device()).unwrap().unwrap();
    assert_eq!(device.clone, None);
    assert_eq!(device.clone_events, 0);
    assert!(fixture.projections.due_clone_reports().unwrap().is_empty());
}

#[test]
fn two_copies_interleaving_are_a_clone_reported_once_with_both_sources_and_nothing_is_dropped() {
    use fleetlaps_proto::ids::InstanceId;

    // Arrange
    let mut fixture = Fixture::enrolled();
    let (first, second) = (InstanceId::new(), InstanceId::new());
    assert_eq!(
        fixture.apply(&policy_from(first, 1)),
        Outcome::Applied(EventKind::PolicyApplied)
    );
    // The copy starts from the same state: same position, another instance.
    assert_eq!(
        fixture.apply(&policy_from(second, 1)),
        Outcome::Applied(EventKind::PolicyApplied)
    );
    assert!(
        fixture.projections.due_clone_reports().unwrap().is_empty(),
        "a restart so far"
    );

    // Act: the first copy is heard from again.
    let evidence = policy_from(first, 2);
    let subject = subject::device_event(&device(), EventKind::PolicyApplied);
    let payload = evidence.to_json();
    let signature = fixture.keys[&device()].sign(&subject, &payload);
    let applied = fixture.apply_full(&subject, &payload, Some(&signature));

    // Assert: applied, and a clone naming both copies, due to be reported.
    assert_eq!(applied.outcome, Outcome::Applied(EventKind::PolicyApplied));
    let clone = applied.clone.expect("a clone");
    assert_eq!((clone.source.instance, clone.other.instance), (first, second));
    assert_eq!(clone.evidence_event_id, evidence.id);
    assert_eq!(
        fixture.projections.due_clone_reports().unwrap(),
        std::slice::from_ref(&clone)
    );
    // Still the same pair leapfrogging: counted, not reported again.
    let next = policy_from(second, 3);
    let next_subject = subject::device_event(&device(), EventKind::PolicyApplied);
    let next_payload = next.to_json();
    let next_signature = fixture.keys[&device()].sign(&next_subject, &next_payload);
    let again = fixture.apply_full(&next_subject, &next_payload, Some(&next_signature));
    assert_eq!(again.outcome, Outcome::Applied(EventKind::PolicyApplied));
    assert!(again.clone.is_none(), "the same pair is reported once");
    let device_record = fixture.projections.device(&device()).unwrap().unwrap();
    assert_eq!(device_record.clone_events, 2);

    // The report on the history clears the due entry.
    let (report_subject, report) = audit(AuditEvent::DeviceCloneDetected(clone));
    assert_eq!(
        fixture.apply_on(&report_subject, &report),
        Outcome::Recorded(AuditKind::DeviceCloneDetected)
    );
    assert!(fixture.projections.due_clone_reports().unwrap().is_empty());
}

mod escrow_keys {
    use fleetlaps_proto::audit::{EscrowKeyCreated, EscrowKeyReason, PasswordResealed};
    use fleetlaps_proto::seal::EscrowPublicKey;

    use super::*;
    use crate::escrow::EscrowKeyring;

    fn key_created(public_key: EscrowPublicKey, reason: EscrowKeyReason) -> (String, Vec<u8>) {
        audit(AuditEvent::EscrowKeyCreated(EscrowKeyCreated {
            public_key,
            previous_public_key: None,
            reason,
        }))
    }

    fn record(fixture: &mut Fixture, public_key: EscrowPublicKey, reason: EscrowKeyReason) {
        let (subject, payload) = key_created(public_key, reason);
        let outcome = fixture.apply_on(&subject, &payload);
        assert_eq!(outcome, Outcome::Recorded(AuditKind::EscrowKeyCreated));
    }

    #[test]
    fn escrow_key_created_is_recorded_in_the_history_of_keys() {
        let mut fixture = Fixture::enrolled();
        let first = EscrowSecretKey::generate().public_key();
        let second = EscrowSecretKey::generate().public_key();
        record(&mut fixture, first, EscrowKeyReason::Created);
        record(&mut fixture, second, EscrowKeyReason::Rotated);

        let keys = fixture.projections.escrow_keys().unwrap();
        assert_eq!(
            keys.iter().map(|key| key.public_key).collect::<Vec<_>>(),
            vec![first, second]
        );
        assert_eq!(keys[1].reason, EscrowKeyReason::Rotated);
        assert!(keys.iter().all(|key| key.lost_at_sequence.is_none()));
    }

    #[test]
    fn a_backup_naming_a_held_key_is_tried_and_refused_when_it_does_not_open() {
        let mut fixture = Fixture::enrolled();
        // Names the fixture's key, but is sealed to another: the trial decides, and fails.
        let envelope = backed_up_declaring(
            1,
            RotationId::new(),
            &EscrowSecretKey::generate().public_key(),
            Some(escrow().public_key()),
        );
        let applied = fixture.apply_device_event(&envelope, &escrow());
        assert_eq!(applied.outcome, Outcome::Quarantined(QuarantineReason::Unopenable));
    }

    #[test]
    fn a_backup_naming_an_unknown_key_is_refused_without_a_trial() {
        let mut fixture = Fixture::enrolled();
        // Sealed to the fixture's key (a trial would open it), but naming a key nobody recorded.
        let envelope = backed_up_declaring(
            1,
            RotationId::new(),
            &escrow().public_key(),
            Some(EscrowSecretKey::generate().public_key()),
        );
        let applied = fixture.apply_device_event(&envelope, &escrow());
        assert_eq!(applied.outcome, Outcome::Quarantined(QuarantineReason::Unopenable));
    }

    #[test]
    fn a_backup_naming_a_recorded_key_that_is_not_held_is_accepted_without_a_trial() {
        let mut fixture = Fixture::enrolled();
        let lost = EscrowSecretKey::generate().public_key();
        record(&mut fixture, lost, EscrowKeyReason::Created);
        // Not openable by the fixture's key: accepted because the history recorded its key.
        let envelope = backed_up_declaring(2, RotationId::new(), &lost, Some(lost));
        let applied = fixture.apply_device_event(&envelope, &escrow());
        assert_eq!(applied.outcome, Outcome::Applied(EventKind::PasswordBackedUp));
        assert_eq!(fixture.projections.credentials(&device(), 10).unwrap().len(), 1);
    }

    #[test]
    fn after_a_recovery_a_backup_sealed_to_the_lost_key_is_refused() {
        let mut fixture = Fixture::enrolled();
        let lost = EscrowSecretKey::generate().public_key();
        record(&mut fixture, lost, EscrowKeyReason::Created);
        record(&mut fixture, escrow().public_key(), EscrowKeyReason::Recovered);
        assert!(fixture.projections.escrow_keys().unwrap()[0].lost_at_sequence.is_some());

        let envelope = backed_up_declaring(2, RotationId::new(), &lost, Some(lost));
        let applied = fixture.apply_device_event(&envelope, &escrow());
        assert_eq!(applied.outcome, Outcome::Quarantined(QuarantineReason::Unopenable));
    }

    #[test]
    fn a_backup_naming_no_key_is_tried_with_every_held_key_retired_ones_included() {
        let mut fixture = Fixture::enrolled();
        let before = EscrowKeyring::generate();
        let old_public = before.public_key();
        let keyring = before.rotated();
        let envelope = backed_up_declaring(1, RotationId::new(), &old_public, None);
        let applied = fixture.apply_device_event(&envelope, &keyring);
        assert_eq!(applied.outcome, Outcome::Applied(EventKind::PasswordBackedUp));
        let stranger = backed_up_declaring(2, RotationId::new(), &EscrowSecretKey::generate().public_key(), None);
        let applied = fixture.apply_device_event(&stranger, &keyring);
        assert_eq!(applied.outcome, Outcome::Quarantined(QuarantineReason::Unopenable));
    }

    #[test]
    fn password_resealed_replaces_the_sealed_box_of_that_credential_only() {
        let mut fixture = Fixture::enrolled();
        let rotation_id = RotationId::new();
        let applied = fixture.apply_device_event(&backed_up(1, rotation_id), &escrow());
        assert_eq!(applied.outcome, Outcome::Applied(EventKind::PasswordBackedUp));
        let credential = fixture.projections.credentials(&device(), 1).unwrap().remove(0);
        let new_key = EscrowSecretKey::generate();
        let context = sealing_context(&device(), &rotation_id);
        let resealed = seal(&new_key.public_key(), b"pw", &context);

        let (subject, payload) = audit(AuditEvent::PasswordResealed(PasswordResealed {
            device_id: device(),
            backup_stream_sequence: credential.stream_sequence,
            sealed_password: resealed.clone(),
        }));
        assert_eq!(
            fixture.apply_on(&subject, &payload),
            Outcome::Recorded(AuditKind::PasswordResealed)
        );

        let after = fixture.projections.credentials(&device(), 1).unwrap().remove(0);
        assert_eq!(after.sealed_password, resealed);
        assert_eq!(
            new_key.open(&after.sealed_password, &context).unwrap().as_slice(),
            b"pw"
        );
        assert_eq!(after.rotation_id, credential.rotation_id, "only the box changes");

        // A credential that does not exist is not made up.
        let (subject, payload) = audit(AuditEvent::PasswordResealed(PasswordResealed {
            device_id: device(),
            backup_stream_sequence: 999,
            sealed_password: resealed,
        }));
        assert_eq!(
            fixture.apply_on(&subject, &payload),
            Outcome::Quarantined(QuarantineReason::UnknownRotation)
        );
    }
}

/// A `token_created` for a token with every password's read scope, as a forger would plant it.
fn planted_token() -> (String, Vec<u8>) {
    audit(AuditEvent::TokenCreated(fleetlaps_proto::audit::TokenCreated {
        token_id: TokenId::new(),
        name: "intruder".to_owned(),
        scopes: vec![fleetlaps_proto::api::SCOPE_READ_PASSWORDS.to_owned()],
        expires_at: None,
        token_sha256: "ef".repeat(32),
        created_by: "intruder".to_owned(),
        created_by_token_id: None,
    }))
}

#[test]
fn an_unsigned_orchestrator_event_is_quarantined_as_forged_and_changes_nothing() {
    let mut fixture = Fixture::new();
    let (subject, payload) = planted_token();
    let before = fixture.projections.audit(0, 100).unwrap().len();
    assert_eq!(
        fixture.apply_signed(&subject, &payload, None),
        Outcome::Quarantined(QuarantineReason::Forged)
    );
    assert!(fixture.projections.token_by_digest(&"ef".repeat(32)).unwrap().is_none());
    assert_eq!(fixture.projections.audit(0, 100).unwrap().len(), before);
    let quarantined = fixture.projections.quarantine().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert!(
        quarantined[0].detail.contains("Fleetlaps-Signature"),
        "{:?}",
        quarantined[0].detail
    );
}

#[test]
fn an_orchestrator_event_signed_by_another_key_is_quarantined_as_forged() {
    let mut fixture = Fixture::new();
    let (subject, payload) = planted_token();
    let signature = OrchestratorSigningKey::generate().sign(&subject, &payload);
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some(&signature)),
        Outcome::Quarantined(QuarantineReason::Forged)
    );
    assert!(fixture.projections.token_by_digest(&"ef".repeat(32)).unwrap().is_none());
    // Moved to another subject, the orchestrator's own signature no longer holds either.
    let signature = orchestrator_key().sign(&subject, &payload);
    assert_eq!(
        fixture.apply_signed(
            &subject::audit_event(AuditKind::PasswordRead),
            &payload,
            Some(&signature)
        ),
        Outcome::Quarantined(QuarantineReason::SubjectMismatch)
    );
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some(&signature)),
        Outcome::Recorded(AuditKind::TokenCreated)
    );
}

#[test]
fn an_orchestrator_event_before_any_orchestrator_key_is_recorded_is_quarantined() {
    let mut fixture = Fixture::empty();
    let (subject, payload) = planted_token();
    let signature = orchestrator_key().sign(&subject, &payload);
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some(&signature)),
        Outcome::Quarantined(QuarantineReason::Forged)
    );
    assert!(fixture.projections.orchestrator_key().unwrap().is_none());
    // A key record must be signed by the key it names, even the first one.
    let (key_subject, key_payload) = orchestrator_key_record(&orchestrator_key().public_key().to_string());
    let other = OrchestratorSigningKey::generate().sign(&key_subject, &key_payload);
    assert_eq!(
        fixture.apply_signed(&key_subject, &key_payload, Some(&other)),
        Outcome::Quarantined(QuarantineReason::Forged)
    );
    assert_eq!(
        fixture.apply_signed(&key_subject, &key_payload, None),
        Outcome::Quarantined(QuarantineReason::Forged)
    );
    assert!(fixture.projections.orchestrator_key().unwrap().is_none());
    // The first self-signed record is trusted; from then on its key decides.
    assert_eq!(
        fixture.apply_on(&key_subject, &key_payload),
        Outcome::Recorded(AuditKind::OrchestratorKeyCreated)
    );
    assert_eq!(
        fixture
            .projections
            .orchestrator_key()
            .unwrap()
            .expect("recorded")
            .public_key,
        orchestrator_key().public_key().to_string()
    );
    let (subject, payload) = planted_token();
    assert_eq!(
        fixture.apply_on(&subject, &payload),
        Outcome::Recorded(AuditKind::TokenCreated)
    );
}

#[test]
fn a_new_orchestrator_key_counts_only_when_signed_by_the_recorded_one() {
    let mut fixture = Fixture::new();
    let next = OrchestratorSigningKey::generate();
    let (subject, payload) = orchestrator_key_record(&next.public_key().to_string());

    // Signed only by itself: another key taking over.
    let self_signed = next.sign(&subject, &payload);
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some(&self_signed)),
        Outcome::Quarantined(QuarantineReason::Forged)
    );
    assert_eq!(
        fixture
            .projections
            .orchestrator_key()
            .unwrap()
            .expect("recorded")
            .public_key,
        orchestrator_key().public_key().to_string()
    );

    // Signed by the recorded key: a rotation.
    assert_eq!(
        fixture.apply_on(&subject, &payload),
        Outcome::Recorded(AuditKind::OrchestratorKeyCreated)
    );
    let recorded = fixture.projections.orchestrator_key().unwrap().expect("recorded");
    assert_eq!(recorded.public_key, next.public_key().to_string());

    // From then on the new key signs, and the old one no longer does.
    let (subject, payload) = planted_token();
    assert_eq!(
        fixture.apply_on(&subject, &payload),
        Outcome::Quarantined(QuarantineReason::Forged)
    );
    let (subject, payload) = planted_token();
    let signature = next.sign(&subject, &payload);
    assert_eq!(
        fixture.apply_signed(&subject, &payload, Some(&signature)),
        Outcome::Recorded(AuditKind::TokenCreated)
    );
}

#[test]
fn a_store_of_an_older_layout_is_emptied_at_open_so_the_stream_rebuilds_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        // As an older version left it: a position and an enrollment token under `n/`.
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("projections").unwrap();
        tree.insert(LAST_SEQUENCE_KEY, &42_u64.to_be_bytes()).unwrap();
        tree.insert(b"n/0190a5c4-7d1e-7c3a-9f00-000000000001", b"{}").unwrap();
        db.flush().unwrap();
    }
    let projections = reopen(dir.path());
    assert_eq!(
        projections.last_applied_sequence().unwrap(),
        0,
        "replayed from the start"
    );
    assert_eq!(projections.applied_sequence(), 0);
    assert!(projections.tree.scan_prefix(b"n/").next().is_none());
    drop(projections);
    // Once at the current layout, it is kept as it is.
    let projections = reopen(dir.path());
    let mut batch = sled::Batch::default();
    batch.insert(LAST_SEQUENCE_KEY, &7_u64.to_be_bytes());
    projections.tree.apply_batch(batch).unwrap();
    projections.tree.flush().unwrap();
    drop(projections);
    assert_eq!(reopen(dir.path()).last_applied_sequence().unwrap(), 7);
}

/// Opens the projections at `path` again once the dropped ones let go of the directory: sled's
/// background flusher may hold its file lock a moment after the last handle is dropped.
fn reopen(path: &std::path::Path) -> Projections {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match Projections::open(path) {
            Ok(projections) => return projections,
            Err(err) if err.to_string().contains("lock") || format!("{err:?}").contains("WouldBlock") => {
                assert!(std::time::Instant::now() < deadline, "the store stays locked: {err:?}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(err) => panic!("{err:?}"),
        }
    }
}

#[test]
fn a_full_quarantine_drops_its_oldest_record_in_the_same_batch_and_counts_it_the_same_on_replay() {
    let run = || {
        let mut fixture = Fixture::empty();
        fixture.projections = fixture.projections.clone().with_quarantine_max_entries(3);
        for _ in 0..5 {
            fixture.apply_on("laps.events.dev-1.policy_applied", b"not json");
        }
        fixture.apply_on("laps.events.dev-1.policy_applied", &policy_applied(1).to_json());
        fixture
    };
    let first = run();

    let kept = first.projections.quarantine().unwrap();
    assert_eq!(
        kept.iter().map(|record| record.stream_sequence).collect::<Vec<_>>(),
        [4, 5, 6],
        "the newest three are kept"
    );
    assert_eq!(first.projections.quarantine_len().unwrap(), 3);
    let dropped = first.projections.quarantine_dropped().unwrap();
    let count = |reason| dropped.iter().find(|(r, _)| *r == reason).map(|(_, n)| *n);
    assert_eq!(count(QuarantineReason::Malformed), Some(3));
    assert_eq!(count(QuarantineReason::UnknownDevice), Some(0));
    assert_eq!(
        first
            .projections
            .quarantine_after(4, 10)
            .unwrap()
            .iter()
            .map(|record| record.stream_sequence)
            .collect::<Vec<_>>(),
        [5, 6]
    );

    let second = run();
    assert_eq!(
        first.projections.digest().unwrap(),
        second.projections.digest().unwrap()
    );
}

/// A `breach_declared` of `breach_id` over every device, two of them, by the API.
fn breach_of_two(breach_id: fleetlaps_proto::breach::BreachId) -> (String, Vec<u8>) {
    use fleetlaps_proto::breach::{BreachDeclared, BreachScope, BreachSource};
    audit(AuditEvent::BreachDeclared(BreachDeclared {
        breach_id,
        reason: "phished".to_owned(),
        deadline: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
        scope: BreachScope::All,
        target_count: 2,
        declared_by: "soc".to_owned(),
        declared_by_token_id: None,
        source: BreachSource::Api,
    }))
}

#[test]
fn the_last_rotation_a_campaign_waits_for_is_the_one_that_completes_it() {
    use fleetlaps_proto::breach::{BreachId, BreachTargeted};

    let other = DeviceId::parse("dev-2").unwrap();
    let mut fixture = Fixture::new();
    fixture.enroll(&enrollment_messages(&[&device(), &other]));
    let breach_id = BreachId::new();
    for (subject, payload) in [
        breach_of_two(breach_id),
        audit(AuditEvent::BreachTargeted(BreachTargeted {
            breach_id,
            device_ids: vec![device(), other.clone()],
        })),
    ] {
        assert!(matches!(fixture.apply_on(&subject, &payload), Outcome::Recorded(_)));
    }
    // A backup and its rotation, by `device_id`.
    let mut rotate = |device_id: &DeviceId| {
        let rotation_id = RotationId::new();
        let mut backup = backed_up(1, rotation_id);
        backup.device_id = device_id.clone();
        if let Event::PasswordBackedUp(body) = &mut backup.event {
            body.sealed_password = seal(&escrow().public_key(), b"pw", &sealing_context(device_id, &rotation_id));
        }
        let mut applied = rotated(2, rotation_id);
        applied.device_id = device_id.clone();
        assert_eq!(
            fixture.apply_device_event(&backup, &escrow()).outcome,
            Outcome::Applied(EventKind::PasswordBackedUp)
        );
        fixture
            .apply_device_event(&applied, &escrow())
            .rotation
            .expect("a confirmed rotation")
    };

    let first = rotate(&device());
    assert_eq!(first.campaign_delays.len(), 1, "it counts for the campaign");
    assert!(!first.completes_a_campaign, "one of two devices rotated");
    let last = rotate(&other);
    assert!(last.completes_a_campaign, "both devices rotated");
    let again = rotate(&other);
    assert!(again.campaign_delays.is_empty() && !again.completes_a_campaign);
}

#[test]
fn orchestrator_events_about_a_device_are_indexed_for_its_timeline_and_only_those() {
    use fleetlaps_proto::audit::{PasswordRead, TokenCreated};
    use fleetlaps_proto::breach::{BreachCommand, BreachId, BreachTargeted, BreachWaveCommanded};
    use fleetlaps_proto::command::CommandId;

    let other = DeviceId::parse("dev-2").unwrap();
    let mut fixture = Fixture::new();
    fixture.enroll(&enrollment_messages(&[&device(), &other]));
    let read = |device_id: &DeviceId| {
        audit(AuditEvent::PasswordRead(PasswordRead {
            principal: "alice".to_owned(),
            principal_token_id: None,
            device_id: device_id.clone(),
            rotation_ids: Vec::new(),
            reason: None,
            client_name: None,
            client_version: None,
            source_address: None,
        }))
    };
    let breach_id = BreachId::new();
    let messages = [
        read(&device()),
        read(&other),
        audit(AuditEvent::TokenCreated(TokenCreated {
            token_id: TokenId::new(),
            name: "auditor".to_owned(),
            scopes: vec!["Audit.Read.All".to_owned()],
            expires_at: None,
            token_sha256: "ab".repeat(32),
            created_by: "admin".to_owned(),
            created_by_token_id: None,
        })),
        breach_of_two(breach_id),
        audit(AuditEvent::BreachTargeted(BreachTargeted {
            breach_id,
            device_ids: vec![other.clone(), device()],
        })),
        audit(AuditEvent::BreachWaveCommanded(BreachWaveCommanded {
            breach_id,
            commands: vec![BreachCommand {
                device_id: other.clone(),
                command_id: CommandId::new(),
                covered_by: None,
            }],
        })),
    ];
    let first = fixture.next_sequence;
    for (subject, payload) in &messages {
        let outcome = fixture.apply_on(subject, payload);
        assert!(matches!(outcome, Outcome::Recorded(_)), "{outcome:?}");
    }
    // A refused one (an unknown breach) is in no timeline.
    let refused = audit(AuditEvent::BreachTargeted(BreachTargeted {
        breach_id: BreachId::new(),
        device_ids: vec![device()],
    }));
    assert_eq!(
        fixture.apply_on(&refused.0, &refused.1),
        Outcome::Quarantined(QuarantineReason::UnknownBreach)
    );

    let kinds = |device_id: &DeviceId, after: u64, until: u64, limit: usize| {
        fixture
            .projections
            .device_audit(device_id, after, until, limit)
            .unwrap()
            .into_iter()
            .map(|(sequence, envelope)| (sequence, envelope.event.kind().as_str()))
            .collect::<Vec<_>>()
    };
    let enrolled = first - 2;
    assert_eq!(
        kinds(&device(), 0, u64::MAX, 10),
        [
            (enrolled, "device_enrolled"),
            (first, "password_read"),
            (first + 4, "breach_targeted")
        ]
    );
    assert_eq!(
        kinds(&other, 0, u64::MAX, 10),
        [
            (enrolled + 1, "device_enrolled"),
            (first + 1, "password_read"),
            (first + 4, "breach_targeted"),
            (first + 5, "breach_wave_commanded"),
        ]
    );
    // After a position, up to another, at most a limit.
    assert_eq!(
        kinds(&other, enrolled + 1, first + 4, 10),
        [(first + 1, "password_read"), (first + 4, "breach_targeted")]
    );
    assert_eq!(kinds(&other, 0, u64::MAX, 1), [(enrolled + 1, "device_enrolled")]);
    // Every applied event's sequence is known by its id.
    let envelope = AuditEnvelope::from_json(&messages[0].1).unwrap();
    assert_eq!(fixture.projections.event_sequence(&envelope.id).unwrap(), Some(first));
}

/// How many keys of the projections start with `prefix`.
fn keys_under(fixture: &Fixture, prefix: &[u8]) -> usize {
    fixture.projections.tree.scan_prefix(prefix).count()
}

#[test]
fn reports_keep_one_mark_per_running_copy_and_no_id_so_their_copies_are_duplicates_noted_for_the_timeline() {
    use fleetlaps_proto::ids::InstanceId;

    // Arrange
    let mut fixture = Fixture::enrolled();
    let instance = InstanceId::new();
    let ids_before = keys_under(&fixture, b"e/");

    // Act: fifty reports, each sent twice (a device's re-send of an event whose ack it lost).
    let mut copies = Vec::new();
    for sequence in 1..=50 {
        let report = policy_from(instance, sequence);
        assert_eq!(fixture.apply(&report), Outcome::Applied(EventKind::PolicyApplied));
        assert_eq!(
            fixture.apply(&report),
            Outcome::Duplicate,
            "the copy of report {sequence}"
        );
        copies.push(fixture.next_sequence - 1);
    }

    // Assert: one mark for the running copy, no id kept, a note for each copy only.
    assert_eq!(keys_under(&fixture, b"e/"), ids_before, "reports keep no ids");
    assert_eq!(keys_under(&fixture, b"rm/"), 1);
    assert_eq!(keys_under(&fixture, b"rx/"), copies.len());
    for &copy in &copies {
        assert!(fixture.projections.report_passed_over(&device(), copy).unwrap());
        assert!(
            !fixture.projections.report_passed_over(&device(), copy - 1).unwrap(),
            "the report {} itself was applied",
            copy - 1
        );
    }
    let device_record = fixture.projections.device(&device()).unwrap().unwrap();
    assert_eq!(device_record.last_sequence, 50);

    // A report of this copy from before its mark is a copy too; another running copy (a
    // cloned image) has its own mark; a later report is applied.
    assert_eq!(fixture.apply(&policy_from(instance, 10)), Outcome::Duplicate);
    assert_eq!(
        fixture.apply(&policy_from(InstanceId::new(), 10)),
        Outcome::Applied(EventKind::PolicyApplied)
    );
    assert_eq!(
        fixture.apply(&policy_from(instance, 51)),
        Outcome::Applied(EventKind::PolicyApplied)
    );
}

#[test]
fn a_refused_report_is_noted_as_passed_over_and_a_backup_still_keeps_its_id() {
    // Arrange
    let mut fixture = Fixture::enrolled();
    let report = policy_applied(1);
    let subject = subject::device_event(&device(), EventKind::PolicyApplied);
    let payload = report.to_json();

    // Act: the report unsigned (refused), then signed; then a backup.
    let refused = fixture.apply_full(&subject, &payload, None);
    let refused_at = fixture.next_sequence - 1;
    let signature = key_of(&device()).sign(&subject, &payload);
    let applied = fixture.apply_full(&subject, &payload, Some(&signature));
    let applied_at = fixture.next_sequence - 1;
    let backup = backed_up(2, RotationId::new());
    assert_eq!(fixture.apply(&backup), Outcome::Applied(EventKind::PasswordBackedUp));

    // Assert
    assert!(
        matches!(refused.outcome, Outcome::Quarantined(_)),
        "{:?}",
        refused.outcome
    );
    assert_eq!(applied.outcome, Outcome::Applied(EventKind::PolicyApplied));
    assert!(fixture.projections.report_passed_over(&device(), refused_at).unwrap());
    assert!(!fixture.projections.report_passed_over(&device(), applied_at).unwrap());
    assert_eq!(
        fixture.projections.event_sequence(&report.id).unwrap(),
        None,
        "no id kept"
    );
    assert_eq!(
        fixture.projections.event_sequence(&backup.id).unwrap(),
        Some(fixture.next_sequence - 1),
        "a backup keeps its id"
    );
}
