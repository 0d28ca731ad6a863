//! Image rollback, lost state and clones: a device restored from an older copy of itself must
//! never run a password the centre cannot return.
//!
//! As Windows LAPS does with `msLAPS-CurrentPasswordVersion`, the agent compares its state with
//! the centre's current password version on start and every cycle; when the centre has seen
//! events this state never emitted, the device rotates at once, in a new generation that the
//! orchestrator accepts (no quarantine).

use std::time::Duration;

use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::{Event, EventKind};

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator, device_events};
use crate::enrollment::quarantine_reasons;
use crate::harness::{TestNats, wait_until};
use crate::linux::LinuxUser;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_device_restored_from_a_snapshot_rotates_at_once_and_the_centre_returns_the_accounts_password() {
    full_device_rollback(None).await;
}

#[tokio::test]
async fn a_real_linux_device_restored_from_a_snapshot_rotates_at_once_and_the_centre_returns_the_accounts_password() {
    let user = LinuxUser::create().await;
    full_device_rollback(Some(user.name.clone())).await;
}

/// The whole device (state directory and account database) restored from a copy taken before
/// a rotation, as a VM snapshot does.
async fn full_device_rollback(linux_account: Option<String>) {
    // Arrange: a device with a backed-up password, copied whole; then rotated once more.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        linux_account,
        settings: "reset_min_interval_secs = 0".to_owned(),
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let before_snapshot = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    let snapshot = agent.snapshot().await;
    agent.start_in_process().await;
    let answer = agent.control(ControlRequest::Reset).await;
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    let after_snapshot = orchestrator.wait_for_passwords(&agent.device_id, 2).await.remove(0);
    assert!(agent.has_password(&after_snapshot));

    // Act: the snapshot is restored, the device starts, and an administrator resets it too.
    agent.stop().await;
    agent.restore(&snapshot, true);
    assert!(
        agent.has_password(&before_snapshot),
        "the restored account runs its old password"
    );
    agent.start_in_process().await;

    // Assert: the agent noticed, rotated at once, and the centre returns the account's password.
    let newest = orchestrator
        .wait_for_new_password(&agent.device_id, &[&before_snapshot, &after_snapshot])
        .await;
    wait_until(
        "the restored account has the password the centre returns",
        TIMEOUT,
        || async { agent.has_password(&newest).then_some(()) },
    )
    .await;
    let rollbacks = device_events(&nats, &agent.device_id, EventKind::ImageRollbackDetected).await;
    assert_eq!(rollbacks.len(), 1, "the rollback is on the history");
    let Event::ImageRollbackDetected(rollback) = &rollbacks[0].event else {
        unreachable!("filtered by kind")
    };
    assert!(rollback.new_generation > rollback.centre_position.generation);
    wait_until("the rollback is counted", TIMEOUT, || async {
        (orchestrator.metric("fleetlaps_image_rollbacks_total").await == 1.0).then_some(())
    })
    .await;

    // …and a reset now (what an operator would try) keeps the promise as well.
    let answer = agent.control(ControlRequest::Reset).await;
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    let after_reset = orchestrator.wait_for_new_password(&agent.device_id, &[&newest]).await;
    assert!(
        agent.has_password(&after_reset),
        "the centre returns the account's password"
    );
    assert_eq!(quarantine_reasons(&orchestrator).await, [], "nothing quarantined");
    assert_eq!(orchestrator.metric("fleetlaps_events_out_of_order_total").await, 0.0);
}

#[tokio::test]
async fn a_state_directory_restored_alone_loses_no_backup_and_the_centre_returns_the_accounts_password() {
    // Arrange: the state copied, then two rotations; the account keeps the newest password.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: "reset_min_interval_secs = 0".to_owned(),
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let snapshot = agent.snapshot().await;
    agent.start_in_process().await;
    for count in 2..=3 {
        agent.control(ControlRequest::Reset).await;
        orchestrator.wait_for_passwords(&agent.device_id, count).await;
    }
    let account_password = orchestrator.passwords(&agent.device_id).await.remove(0);

    // Act: only the state directory goes back (a file-level backup restored).
    agent.stop().await;
    agent.restore(&snapshot, false);
    assert!(agent.has_password(&account_password));
    agent.start_in_process().await;

    // Assert
    let newest = orchestrator
        .wait_for_new_password(&agent.device_id, &[&account_password])
        .await;
    wait_until("the account has the password the centre returns", TIMEOUT, || async {
        agent.has_password(&newest).then_some(())
    })
    .await;
    let history = orchestrator.passwords(&agent.device_id).await;
    assert!(
        history
            .iter()
            .any(|password| password.expose() == account_password.expose()),
        "every backup stays retrievable"
    );
    assert_eq!(quarantine_reasons(&orchestrator).await, [], "nothing quarantined");
}

#[tokio::test]
async fn a_state_deleted_next_to_its_identity_never_restarts_sequences_behind_the_centre() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let before = device_events(&nats, &agent.device_id, EventKind::PasswordBackedUp).await;

    // Act: an operator wipes the state directory's database but keeps the identity.
    agent.stop().await;
    agent.delete_state_keeping_identity();
    agent.start_in_process().await;

    // Assert: a new backup, after everything the centre saw; nothing refused or out of order.
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    wait_until("the account has the new password", TIMEOUT, || async {
        agent.has_password(&passwords[0]).then_some(())
    })
    .await;
    let after = device_events(&nats, &agent.device_id, EventKind::PasswordBackedUp).await;
    assert!(
        after.last().expect("a new backup").position() > before.last().expect("the first backup").position(),
        "the fresh state's events order after the lost state's"
    );
    assert_eq!(quarantine_reasons(&orchestrator).await, [], "nothing quarantined");
    assert_eq!(orchestrator.metric("fleetlaps_events_out_of_order_total").await, 0.0);
}
