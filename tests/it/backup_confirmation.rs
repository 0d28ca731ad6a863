//! The account changes only once the orchestrator has confirmed that it stored the backup
//! durably and can open it: JetStream's ack alone is not enough.

use std::time::Duration;

use fleetlaps_agent::fault::{FailPoint, Faults};
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::{Event, EventKind};
use fleetlaps_proto::seal::EscrowSecretKey;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator, device_events};
use crate::harness::{TestNats, wait_until};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Settings that keep waits short: a rotation waits 2 s for its confirmation per cycle.
fn quick() -> String {
    "reset_min_interval_secs = 0\nbackup_confirmation_wait_secs = 2\nbackup_confirmation_timeout_secs = 2".to_owned()
}

#[tokio::test]
async fn with_the_orchestrator_stopped_a_reset_leaves_the_account_unchanged_says_why_and_completes_once_it_is_back() {
    // Arrange
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: quick(),
        ..AgentOptions::default()
    };
    let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    wait_until("the first rotation is committed", TIMEOUT, || async {
        agent.has_password(&first).then_some(())
    })
    .await;

    // Act: NATS is up, JetStream takes the backup, but nobody confirms it.
    orchestrator.stop().await;
    let answer = agent.control(ControlRequest::Reset).await;

    // Assert: refused, saying why; the account keeps its password; the rotation waits.
    assert!(
        matches!(&answer, ControlResponse::Refused { message }
            if message.contains("has not confirmed storing it") && message.contains("keeps its password")),
        "{answer:?}"
    );
    assert!(agent.has_password(&first), "no confirmation, no change");
    let status = agent.status().await;
    assert!(status.pending_rotation.is_some(), "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("has not confirmed")),
        "{status:?}"
    );

    // The orchestrator back: the same rotation completes on its own, and the centre returns it.
    orchestrator.restart().await;
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    wait_until("the account gets the confirmed password", TIMEOUT, || async {
        agent.has_password(&passwords[0]).then_some(())
    })
    .await;
    assert_eq!(passwords[1].expose(), first.expose());
    wait_until("nothing is pending any more", TIMEOUT, || async {
        agent.status().await.pending_rotation.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_backup_the_orchestrator_cannot_open_is_refused_the_account_keeps_its_password_and_the_next_uses_the_centres_key()
 {
    // Arrange: a device that seals to a key this orchestrator never had, and has not yet heard
    // of the right one (the orchestrator is down when it starts).
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: quick(),
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::enrolled(&nats, &orchestrator, options).await;
    agent.seal_to(&EscrowSecretKey::generate().public_key());
    let initial_hash = agent.account_hash();
    orchestrator.stop().await;
    agent.start_in_process().await;
    wait_until("the first backup waits for its confirmation", TIMEOUT, || async {
        agent.status().await.pending_rotation.is_some().then_some(())
    })
    .await;
    assert_eq!(agent.account_hash(), initial_hash);

    // Act: the orchestrator comes back and finds a backup it cannot open.
    orchestrator.restart().await;

    // Assert: refused by name, LAPS's failure event, the account untouched by it; then a
    // rotation sealed to the orchestrator's key, confirmed and applied.
    let failures = wait_until("the refusal is reported on the stream", TIMEOUT, || async {
        let failures = device_events(&nats, &agent.device_id, EventKind::RotationFailed).await;
        (!failures.is_empty()).then_some(failures)
    })
    .await;
    let Event::RotationFailed(failure) = &failures[0].event else {
        unreachable!("filtered by kind")
    };
    assert!(failure.error.contains("unopenable"), "{}", failure.error);
    assert_eq!(failures[0].code, Some(10005));
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    wait_until("the account gets the confirmed password", TIMEOUT, || async {
        agent.has_password(&passwords[0]).then_some(())
    })
    .await;
    let rotated = device_events(&nats, &agent.device_id, EventKind::PasswordRotated).await;
    assert_eq!(rotated.len(), 1, "only the confirmed backup ever reached the account");
    assert_eq!(
        orchestrator
            .metric("fleetlaps_backups_confirmed_total{outcome=\"unopenable\"}")
            .await,
        1.0
    );
    assert!(
        agent.status().await.last_backup_refusal.is_none(),
        "the refusal is cleared once a rotation succeeds"
    );
}

#[tokio::test]
async fn a_refusal_shows_in_status_until_it_is_overcome() {
    // The refused rotation is visible to an administrator on the device.
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: quick(),
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::enrolled(&nats, &orchestrator, options).await;
    agent.seal_to(&EscrowSecretKey::generate().public_key());
    orchestrator.stop().await;
    agent.start_in_process().await;
    wait_until("the first backup waits for its confirmation", TIMEOUT, || async {
        agent.status().await.pending_rotation.is_some().then_some(())
    })
    .await;
    orchestrator.restart().await;
    let output = wait_until("status shows the refusal", TIMEOUT, || async {
        let output = crate::apps::run(
            "fleetlaps-agent",
            &["--config", agent.config_path.to_str().expect("utf-8"), "status"],
        )
        .await;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.lines()
            .any(|line| line.starts_with("LastBackupRefusal") && line.contains("unopenable"))
            .then_some(text)
    })
    .await;
    assert!(output.contains("does not open with any escrow key"), "{output}");
}

#[tokio::test]
async fn a_sled_error_reading_a_backup_from_the_outbox_or_recording_its_ack_never_changes_the_account() {
    for point in [FailPoint::OutboxRead, FailPoint::OutboxAck] {
        // Arrange: the agent's state fails at `point` for every backup.
        let nats = TestNats::start();
        let orchestrator = TestOrchestrator::spawn(&nats).await;
        let options = AgentOptions {
            settings: quick(),
            faults: Faults::failing_at(point),
            ..AgentOptions::default()
        };
        let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
        let initial_hash = agent.account_hash();
        if point == FailPoint::OutboxAck {
            // The backup left before the failure: the orchestrator stores and confirms it.
            orchestrator.wait_for_passwords(&agent.device_id, 1).await;
        }

        // Act: a cycle, after whatever the orchestrator had to say.
        let answer = agent.control(ControlRequest::ProcessNow).await;

        // Assert: the cycle fails naming the store, and the account never changed.
        assert!(
            matches!(&answer, ControlResponse::Refused { message } if message.contains("injected fault")),
            "{point:?}: {answer:?}"
        );
        assert_eq!(
            agent.account_hash(),
            initial_hash,
            "{point:?}: the account is unchanged"
        );
        assert!(
            device_events(&nats, &agent.device_id, EventKind::PasswordRotated)
                .await
                .is_empty(),
            "{point:?}: nothing was committed"
        );
    }
}
