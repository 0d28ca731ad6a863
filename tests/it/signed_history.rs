//! The orchestrator's own events are signed: a client that can publish on `laps.audit.>` cannot
//! plant a token or a device, and the orchestrator's key file is guarded like the escrow key.

use std::time::Duration;

use async_nats::HeaderMap;
use fleetlaps_proto::api::SIGNATURE_HEADER;
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, DeviceEnrolled, TokenCreated, TokenId};
use fleetlaps_proto::event::{Envelope, Event, PolicyApplied};
use fleetlaps_proto::ids::{DeviceId, DeviceName};
use fleetlaps_proto::policy::{Policy, PolicySource};
use fleetlaps_proto::signature::{DeviceSigningKey, OrchestratorSigningKey};
use fleetlaps_proto::subject;
use reqwest::StatusCode;
use serde_json::json;

use crate::apps::{TestOrchestrator, create_enrollment_token, run};
use crate::enrollment::quarantine_reasons;
use crate::harness::{TestNats, wait_until};

/// Publishes `payload` on `subject` as any client of the test NATS could, with a
/// `Fleetlaps-Signature` header when `signature` is given, and waits for JetStream's ack: the
/// message's stream sequence.
pub(crate) async fn publish(nats: &TestNats, subject: String, payload: Vec<u8>, signature: Option<String>) -> u64 {
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let mut headers = HeaderMap::new();
    if let Some(signature) = signature {
        headers.insert(SIGNATURE_HEADER, signature.as_str());
    }
    jetstream
        .publish_with_headers(subject, headers, payload.into())
        .await
        .expect("published")
        .await
        .expect("stored")
        .sequence
}

/// A forged orchestrator event: its subject and payload.
fn forged(event: AuditEvent) -> (String, Vec<u8>) {
    let envelope = AuditEnvelope::new(chrono::Utc::now(), event);
    (subject::audit_event(envelope.event.kind()), envelope.to_json())
}

/// Waits until the quarantine lists `count` messages, and returns (reason, subject) of each.
async fn wait_for_quarantine(orchestrator: &TestOrchestrator, count: usize) -> Vec<(String, String)> {
    wait_until(
        "the forged messages are quarantined",
        Duration::from_secs(10),
        || async {
            let reasons = quarantine_reasons(orchestrator).await;
            (reasons.len() >= count).then_some(reasons)
        },
    )
    .await
}

#[tokio::test]
async fn a_forged_token_created_is_quarantined_and_its_token_refused_unsigned_or_signed_by_another_key() {
    // Arrange: a token the intruder knows, and its digest with every password's read scope.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let unsigned_token = "flp_planted-unsigned";
    let other_key_token = "flp_planted-other-key";
    let plant = |token: &str| {
        forged(AuditEvent::TokenCreated(TokenCreated {
            token_id: TokenId::new(),
            name: "intruder".to_owned(),
            scopes: vec![fleetlaps_proto::api::SCOPE_READ_PASSWORDS.to_owned()],
            expires_at: None,
            token_sha256: fleetlaps_orchestrator::auth::token_sha256(token),
            created_by: "admin".to_owned(),
            created_by_token_id: None,
        }))
    };

    // Act: one unsigned, one signed with a key the intruder made.
    let (subject, payload) = plant(unsigned_token);
    publish(&nats, subject, payload, None).await;
    let (subject, payload) = plant(other_key_token);
    let signature = OrchestratorSigningKey::generate().sign(&subject, &payload);
    publish(&nats, subject, payload, Some(signature)).await;

    // Assert: both quarantined as forged, and neither token opens the API.
    let quarantined = wait_for_quarantine(&orchestrator, 2).await;
    assert_eq!(
        quarantined,
        vec![
            ("forged".to_owned(), "laps.audit.token_created".to_owned()),
            ("forged".to_owned(), "laps.audit.token_created".to_owned()),
        ]
    );
    for token in [unsigned_token, other_key_token] {
        let response = orchestrator
            .get("/v1.0/directory/deviceLocalCredentials", Some(token))
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{token}");
    }
    assert_eq!(
        orchestrator
            .metric("fleetlaps_events_quarantined_total{reason=\"forged\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_forged_device_enrolled_is_quarantined_and_the_device_it_names_does_not_exist() {
    // Arrange: a real enrollment token's id, and a device key the intruder holds.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let (_, enrollment_token_id) = create_enrollment_token(&orchestrator, json!({"name": "batch"})).await;
    let device_key = DeviceSigningKey::generate();
    let device_id = DeviceId::parse("planted-device").expect("a valid id");
    let (subject, payload) = forged(AuditEvent::DeviceEnrolled(DeviceEnrolled {
        device_id: device_id.clone(),
        device_name: DeviceName::parse("planted").expect("a valid name"),
        public_key: device_key.public_key().to_string(),
        enrollment_token_id: TokenId::parse(&enrollment_token_id).expect("a token id"),
        tags: Vec::new(),
    }));

    // Act: the forged enrollment, then an event signed by the planted key for that device.
    publish(&nats, subject, payload, None).await;
    let envelope = Envelope::new(
        device_id.clone(),
        1,
        chrono::Utc::now(),
        Event::PolicyApplied(PolicyApplied {
            device_name: DeviceName::parse("planted").expect("a valid name"),
            source: PolicySource::LocalConfig,
            policy: Policy::default(),
        }),
    );
    let event_subject = subject::device_event(&device_id, envelope.event.kind());
    let event_payload = envelope.to_json();
    let signature = device_key.sign(&event_subject, &event_payload);
    publish(&nats, event_subject.clone(), event_payload, Some(signature)).await;

    // Assert: the enrollment is forged, the device unknown, and the API knows no such device.
    let quarantined = wait_for_quarantine(&orchestrator, 2).await;
    assert_eq!(
        quarantined,
        vec![
            ("forged".to_owned(), "laps.audit.device_enrolled".to_owned()),
            ("unknown_device".to_owned(), event_subject),
        ]
    );
    assert!(
        orchestrator.devices().await.iter().all(|device| device.id != device_id),
        "no device was planted"
    );
    let tokens = orchestrator
        .get("/v1.0/fleetlaps/enrollmentTokens", Some(crate::apps::ADMIN_TOKEN))
        .await
        .text()
        .await
        .expect("text");
    assert!(
        tokens.contains("\"uses\":0"),
        "the forged enrollment used nothing: {tokens}"
    );
}

#[tokio::test]
async fn with_its_orchestrator_key_file_deleted_the_orchestrator_refuses_to_start_naming_the_file_the_key_and_the_fix()
{
    // Arrange
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    orchestrator.stop().await;
    let key_file = orchestrator
        .data_dir
        .join(fleetlaps_orchestrator::orchestrator_key::KEY_FILE);
    let recorded_key = fleetlaps_orchestrator::orchestrator_key::read(&key_file)
        .expect("readable")
        .expect("made at first start")
        .public_key()
        .to_string();
    let backup = orchestrator.data_dir.with_extension("orchestrator-key-backup");
    std::fs::rename(&key_file, &backup).expect("moving the key file away");

    // Act
    let refused = orchestrator.try_restart().await.expect_err("no key, no start");

    // Assert: the message names the file, the recorded key and the fix; no key was made up.
    let message = format!("{refused:#}");
    assert!(
        message.contains(&format!("{} is missing", key_file.display())),
        "{message}"
    );
    assert!(message.contains(&recorded_key), "{message}");
    assert!(
        message.contains(&format!("Restore {}", key_file.display())),
        "{message}"
    );
    assert!(!key_file.exists(), "no key is created while the history names one");
    let output = run(
        "fleetlaps-orchestrator",
        &[
            "run",
            "--config",
            orchestrator.config_path().to_str().expect("a UTF-8 path"),
        ],
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&recorded_key) && stderr.contains("Restore"), "{stderr}");

    // Restored: it starts, and what it records is signed and counts.
    std::fs::rename(&backup, &key_file).expect("restoring the key file");
    orchestrator.try_restart().await.expect("starts with its key restored");
    let (_, _) = create_enrollment_token(&orchestrator, json!({"name": "after"})).await;
    assert!(quarantine_reasons(&orchestrator).await.is_empty());
}
