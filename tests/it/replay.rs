//! Replaying the history (`fleetlaps-orchestrator replay`): every projection rebuilt into a fresh
//! directory has the live digest, and `--until` gives the state as it was at that instant. A
//! replay takes the orchestrator's attestations of the signatures it verified, and only those
//! that hold.

use std::time::Duration;

use chrono::Utc;
use fleetlaps_orchestrator::attestation::MessagesDigest;
use fleetlaps_orchestrator::bus::History;
use fleetlaps_orchestrator::config::Config;
use fleetlaps_orchestrator::projection::{Projections, TokenKind};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, SignaturesVerified};
use fleetlaps_proto::event::{Envelope, Event, PolicyApplied};
use fleetlaps_proto::ids::DeviceName;
use fleetlaps_proto::policy::{Policy, PolicySource};
use fleetlaps_proto::signature::{DeviceSigningKey, OrchestratorSigningKey};
use fleetlaps_proto::subject;
use serde_json::json;

use crate::apps::{ADMIN_TOKEN, TestAgent, TestOrchestrator, publish_noise, run};
use crate::harness::TestNats;
use crate::signed_history::publish;

#[tokio::test]
async fn a_replay_of_ten_thousand_events_has_the_live_digest_and_until_gives_the_state_at_that_instant() {
    // Arrange: a device that backed up and rotated, a token before an instant and one after it,
    // and ten thousand more messages.
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    orchestrator
        .create_token(ADMIN_TOKEN, json!({"name": "before", "scopes": ["Audit.Read.All"]}))
        .await;
    publish_noise(&nats, 10_000).await;
    orchestrator.wait_until_folded(&nats).await;
    // The instant lies strictly between the two tokens' stream times (nats-server and this test
    // read one clock); the pauses keep it clear of both.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let instant = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    orchestrator
        .create_token(ADMIN_TOKEN, json!({"name": "after", "scopes": ["Audit.Read.All"]}))
        .await;
    // Nothing more arrives; the live projections fold the whole history before they stop.
    agent.stop().await;
    orchestrator.wait_until_folded(&nats).await;
    orchestrator.stop().await;
    let live = Projections::open(&orchestrator.data_dir.join("projections")).expect("the live projections open");
    let live_digest = live.digest().expect("digest");
    let live_sequence = live.last_applied_sequence().expect("position");
    drop(live);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = orchestrator.config_path();
    let config = config.to_str().expect("a UTF-8 path");

    // Act: the whole history, then up to the instant.
    let whole = dir.path().join("whole");
    let replayed = run(
        "fleetlaps-orchestrator",
        &["replay", "--config", config, "--out", whole.to_str().expect("UTF-8")],
    )
    .await;
    let until = dir.path().join("until");
    let instant_text = instant.to_rfc3339();
    let until_replayed = run(
        "fleetlaps-orchestrator",
        &[
            "replay",
            "--config",
            config,
            "--out",
            until.to_str().expect("UTF-8"),
            "--until",
            &instant_text,
        ],
    )
    .await;

    // Assert
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let stdout = String::from_utf8_lossy(&replayed.stdout);
    assert!(stdout.contains(&format!("digest {live_digest}")), "{stdout}");
    assert!(live_sequence > 10_000, "{live_sequence}");
    assert!(
        until_replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&until_replayed.stderr)
    );
    let then = Projections::open(&until).expect("the replayed projections open");
    let names: Vec<String> = then
        .tokens(TokenKind::Api)
        .expect("tokens")
        .into_iter()
        .map(|token| token.name)
        .collect();
    assert_eq!(names, ["before"], "the state at the instant has the first token only");
    assert!(then.device(&agent.device_id).expect("device").is_some());
    assert!(then.last_applied_sequence().expect("position") < live_sequence);
    // A replay never writes over a directory that holds something.
    let again = run(
        "fleetlaps-orchestrator",
        &["replay", "--config", config, "--out", whole.to_str().expect("UTF-8")],
    )
    .await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));
}

/// Replays the history of `orchestrator` (stopped) into a fresh directory with `args` besides,
/// and returns what it printed.
async fn replay_of(orchestrator: &TestOrchestrator, args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("replayed");
    let config = orchestrator.config_path();
    let mut all = vec![
        "replay",
        "--config",
        config.to_str().expect("a UTF-8 path"),
        "--out",
        out.to_str().expect("a UTF-8 path"),
    ];
    all.extend(args);
    let output = run("fleetlaps-orchestrator", &all).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The live projections' digest, the orchestrator stopped.
fn live_digest(orchestrator: &TestOrchestrator) -> String {
    let live = Projections::open(&orchestrator.data_dir.join("projections")).expect("the live projections open");
    live.digest().expect("digest")
}

/// How many messages a replay took from attestations, from what it printed.
fn attested_count(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|line| line.starts_with("signatures taken from the orchestrator's attestations"))
        .unwrap_or_else(|| panic!("no count of attested messages: {stdout}"));
    line.split_whitespace()
        .nth(6)
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("a count: {line}"))
}

#[tokio::test]
async fn a_replay_takes_the_orchestrators_attestations_for_the_signatures_it_verified_and_has_the_live_digest() {
    // Arrange: an attestation every 100 messages, over a device's signed events, the
    // orchestrator's own, and unsigned noise the orchestrator refused.
    let nats = TestNats::start();
    let mut orchestrator =
        TestOrchestrator::spawn_with_config(&nats, "history = { signatures_verified_every = 100 }").await;
    let mut agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    for n in 0..120 {
        orchestrator
            .create_token(
                ADMIN_TOKEN,
                json!({"name": format!("token-{n}"), "scopes": ["Audit.Read.All"]}),
            )
            .await;
    }
    publish_noise(&nats, 300).await;
    orchestrator.wait_until_folded(&nats).await;
    agent.stop().await;
    orchestrator.wait_until_folded(&nats).await;
    orchestrator.stop().await;
    let live = live_digest(&orchestrator);

    // Act
    let taken = replay_of(&orchestrator, &[]).await;
    let checked = replay_of(&orchestrator, &["--verify-every-signature"]).await;

    // Assert: both have the live digest; the first took the signatures of every token's event
    // on the orchestrator's word (120 of them, in runs of 100 messages attested), the second none.
    assert!(taken.contains(&format!("digest {live}")), "{taken}");
    assert!(checked.contains(&format!("digest {live}")), "{checked}");
    assert!(!taken.contains("replayed again"), "{taken}");
    assert!(attested_count(&taken) >= 100, "{taken}");
    assert_eq!(attested_count(&checked), 0, "{checked}");
}

/// A device's event signed by a key that is not its own, then a `signatures_verified` naming
/// every message up to it as verified, signed by the orchestrator's own key or by another, with
/// the messages' true digest or not. Returns the live digest once all is folded.
async fn attested_forgery(
    nats: &TestNats,
    orchestrator: &mut TestOrchestrator,
    real_key: bool,
    true_digest: bool,
) -> String {
    let mut agent = TestAgent::spawn(nats, orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    agent.stop().await;
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let forged = Envelope::new(
        agent.device_id.clone(),
        1_000,
        Utc::now(),
        Event::PolicyApplied(PolicyApplied {
            device_name: DeviceName::parse("forged").expect("a valid name"),
            source: PolicySource::LocalConfig,
            policy: Policy::default(),
        }),
    );
    let forged_subject = subject::device_event(&agent.device_id, forged.event.kind());
    let forged_payload = forged.to_json();
    let forged_signature = DeviceSigningKey::generate().sign(&forged_subject, &forged_payload);
    let through = publish(nats, forged_subject, forged_payload, Some(forged_signature)).await;
    let mut digest = MessagesDigest::default();
    if true_digest {
        let mut reader = History::open(&jetstream)
            .await
            .expect("history")
            .reader()
            .await
            .expect("reader");
        while let Some(message) = reader.next().await.expect("read") {
            if message.sequence <= through {
                digest.add(&message.as_stream_message());
            }
        }
    }
    let attestation = AuditEnvelope::new(
        Utc::now(),
        AuditEvent::SignaturesVerified(SignaturesVerified {
            from_sequence: 1,
            through_sequence: through,
            messages_sha256: digest.finish(),
            not_verified: Vec::new(),
        }),
    );
    let key = if real_key {
        let config = Config::load(&orchestrator.config_path()).expect("config");
        fleetlaps_orchestrator::orchestrator_key::read(&fleetlaps_orchestrator::orchestrator_key::key_path(&config))
            .expect("key file")
            .expect("a key")
    } else {
        OrchestratorSigningKey::generate()
    };
    let attestation_subject = subject::audit_event(attestation.event.kind());
    let attestation_payload = attestation.to_json();
    let attestation_signature = key.sign(&attestation_subject, &attestation_payload);
    publish(
        nats,
        attestation_subject,
        attestation_payload,
        Some(attestation_signature),
    )
    .await;
    orchestrator.wait_until_folded(nats).await;
    orchestrator.stop().await;
    live_digest(orchestrator)
}

#[tokio::test]
async fn a_replay_checks_every_signature_again_when_the_messages_are_not_those_an_attestation_names() {
    // Arrange: an attestation signed with the orchestrator's key whose digest is not the
    // messages', vouching for a forged event among them (the live fold refused it).
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let live = attested_forgery(&nats, &mut orchestrator, true, false).await;

    // Act
    let replayed = replay_of(&orchestrator, &[]).await;

    // Assert: the replay found the digest wrong, started again, refused the forged event too.
    assert!(
        replayed.contains("replayed again checking every signature"),
        "{replayed}"
    );
    assert!(replayed.contains("another digest"), "{replayed}");
    assert!(replayed.contains(&format!("digest {live}")), "{replayed}");
    assert_eq!(attested_count(&replayed), 0, "{replayed}");
}

#[tokio::test]
async fn a_replay_takes_no_attestation_the_orchestrator_did_not_sign() {
    // Arrange: an attestation with the messages' true digest, vouching for a forged event among
    // them, signed by a key that is not the orchestrator's (the live fold refused both).
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let live = attested_forgery(&nats, &mut orchestrator, false, true).await;

    // Act
    let replayed = replay_of(&orchestrator, &[]).await;

    // Assert: the attestation folded as refused, so the replay started again and refused the
    // forged event too.
    assert!(
        replayed.contains("replayed again checking every signature"),
        "{replayed}"
    );
    assert!(replayed.contains("is not a signed orchestrator event"), "{replayed}");
    assert!(replayed.contains(&format!("digest {live}")), "{replayed}");
}
