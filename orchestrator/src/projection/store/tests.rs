use chrono::{TimeZone, Utc};
use fleetlaps_proto::event::{
    Envelope, Event, PasswordBackedUp, PasswordRotated, PolicyApplied, RotationReason, sealing_context,
};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, RotationId};
use fleetlaps_proto::policy::{Policy, PolicySource};
use fleetlaps_proto::seal::{EscrowSecretKey, seal};
use fleetlaps_proto::subject;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    projections: Projections,
    next_sequence: u64,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let projections = Projections::open(&dir.path().join("db")).expect("opens");
        Self {
            _dir: dir,
            projections,
            next_sequence: 1,
        }
    }

    fn apply_on(&mut self, subject: &str, payload: &[u8]) -> Outcome {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let published = Utc
            .timestamp_opt(1_700_000_000 + i64::try_from(sequence).expect("small"), 0)
            .unwrap();
        self.projections
            .apply(StreamMessage {
                sequence,
                subject,
                published,
                payload,
            })
            .expect("store works")
            .outcome
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

fn backed_up(sequence: u64, rotation_id: RotationId) -> Envelope {
    let escrow = EscrowSecretKey::generate();
    Envelope::new(
        device(),
        sequence,
        Utc::now(),
        Event::PasswordBackedUp(PasswordBackedUp {
            rotation_id,
            device_name: DeviceName::parse("host-1").unwrap(),
            account_name: AccountName::parse("lapsadmin").unwrap(),
            account_uid: Some(1001),
            sealed_password: seal(&escrow.public_key(), b"pw", &sealing_context(&device(), &rotation_id)),
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
        }),
    )
}

#[test]
fn a_backup_then_its_commit_make_the_current_credential() {
    let mut fixture = Fixture::new();
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
fn credentials_come_newest_first_and_limited() {
    let mut fixture = Fixture::new();
    let rotations: Vec<RotationId> = (0..4).map(|_| RotationId::new()).collect();
    for (index, rotation_id) in rotations.iter().enumerate() {
        fixture.apply(&backed_up(index as u64 + 1, *rotation_id));
    }
    let credentials = fixture.projections.credentials(&device(), 3).unwrap();
    let ids: Vec<RotationId> = credentials.iter().map(|c| c.rotation_id).collect();
    assert_eq!(ids, vec![rotations[3], rotations[2], rotations[1]]);
}

#[test]
fn a_resent_event_changes_nothing() {
    let mut fixture = Fixture::new();
    let envelope = backed_up(1, RotationId::new());
    fixture.apply(&envelope);
    let before = fixture.projections.device(&device()).unwrap();
    assert_eq!(fixture.apply(&envelope), Outcome::Duplicate);
    assert_eq!(fixture.projections.device(&device()).unwrap(), before);
    assert_eq!(fixture.projections.credentials(&device(), 10).unwrap().len(), 1);
}

#[test]
fn a_redelivered_sequence_is_skipped() {
    let mut fixture = Fixture::new();
    fixture.apply(&policy_applied(1));
    let payload = policy_applied(2).to_json();
    let outcome = fixture
        .projections
        .apply(StreamMessage {
            sequence: 1,
            subject: "laps.events.dev-1.policy_applied",
            published: Utc::now(),
            payload: &payload,
        })
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
        fixture.apply_on("laps.events.dev-2.policy_applied", &policy_applied(1).to_json()),
        Outcome::Quarantined(QuarantineReason::SubjectMismatch)
    );
    assert_eq!(
        fixture.apply(&rotated(1, RotationId::new())),
        Outcome::Quarantined(QuarantineReason::UnknownDevice)
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
    assert_eq!(fixture.projections.last_applied_sequence().unwrap(), 6);
}

#[test]
fn the_same_messages_fold_to_the_same_digest() {
    let rotation_id = RotationId::new();
    let envelopes = [policy_applied(1), backed_up(2, rotation_id), rotated(3, rotation_id)];
    let mut first = Fixture::new();
    let mut second = Fixture::new();
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
        reason: None,
    }));
    fixture.apply_on(&requested.0, &requested.1);
    assert!(fixture.projections.last_rotation_request(&device()).unwrap().is_some());

    let history = fixture.projections.audit(0, 10).unwrap();
    let kinds: Vec<AuditKind> = history.iter().map(|(_, envelope)| envelope.event.kind()).collect();
    assert_eq!(
        kinds,
        [
            AuditKind::TokenCreated,
            AuditKind::TokenRevoked,
            AuditKind::RotationRequested
        ]
    );
    assert_eq!(
        fixture.projections.audit(history[0].0, 10).unwrap().len(),
        2,
        "after a position"
    );
}
