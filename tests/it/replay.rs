//! Replaying the history (`fleetlaps-orchestrator replay`): every projection rebuilt into a fresh
//! directory has the live digest, and `--until` gives the state as it was at that instant.

use std::time::Duration;

use chrono::Utc;
use fleetlaps_orchestrator::projection::{Projections, TokenKind};
use serde_json::json;

use crate::apps::{ADMIN_TOKEN, TestAgent, TestOrchestrator, publish_noise, run};
use crate::harness::TestNats;

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
