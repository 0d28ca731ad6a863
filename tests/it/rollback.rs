//! Image rollback, lost state and clones: a device restored from an older copy of itself must
//! never run a password the centre cannot return, and two running copies of one device (a
//! cloned image) are reported while neither copy's backups are dropped.
//!
//! As Windows LAPS does with `msLAPS-CurrentPasswordVersion`, the agent compares its state with
//! the centre's current password version on start and every cycle; when the centre has seen
//! events this state never emitted, the device rotates at once, in a new generation that the
//! orchestrator accepts (no quarantine).

use std::collections::BTreeSet;
use std::time::Duration;

use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent};
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::{Envelope, Event, EventKind};
use fleetlaps_proto::password::Password;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator, device_events, stream_payloads};
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
    agent.wait_until_settled_with(&before_snapshot).await;
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
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_settled_with(&first).await;
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
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_settled_with(&first).await;
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

#[tokio::test]
async fn two_agents_started_from_one_cloned_identity_are_reported_as_a_clone_and_every_backup_is_kept() {
    // Arrange: a device with a backed-up password, copied whole into a second device.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: "reset_min_interval_secs = 0\nbackup_confirmation_wait_secs = 2".to_owned(),
        ..AgentOptions::default()
    };
    let mut original = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let first = orchestrator.wait_for_passwords(&original.device_id, 1).await.remove(0);
    original.wait_until_settled_with(&first).await;
    let mut copy = original.cloned().await;

    // Act: both copies run, and each is reset (twice over, so each is heard from after the other).
    original.start_in_process().await;
    copy.start_in_process().await;
    let mut known = vec![first];
    for _ in 0..2 {
        for agent in [&original, &copy] {
            let answer = agent.control(ControlRequest::Reset).await;
            assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
            let known_refs: Vec<&Password> = known.iter().collect();
            let newest = orchestrator.wait_for_new_password(&agent.device_id, &known_refs).await;
            agent.wait_until_has(&newest).await;
            known.push(newest);
        }
    }

    // Assert: the clone is on the history, naming two running copies of the device…
    let reports = wait_until("the clone is recorded", TIMEOUT, || async {
        let reports: Vec<AuditEnvelope> = stream_payloads(&nats, "laps.audit.device_clone_detected")
            .await
            .iter()
            .map(|payload| AuditEnvelope::from_json(payload).expect("an orchestrator event"))
            .collect();
        (!reports.is_empty()).then_some(reports)
    })
    .await;
    assert_eq!(reports.len(), 1, "one report per pair of copies");
    let AuditEvent::DeviceCloneDetected(clone) = &reports[0].event else {
        unreachable!("filtered by subject")
    };
    assert_eq!(clone.device_id, original.device_id);
    assert_ne!(clone.source.instance, clone.other.instance);
    let instances: BTreeSet<_> = stream_payloads(&nats, &format!("laps.events.{}.>", original.device_id))
        .await
        .iter()
        .filter_map(|payload| Envelope::from_json(payload).expect("an envelope").instance)
        .collect();
    assert!(instances.contains(&clone.source.instance) && instances.contains(&clone.other.instance));
    assert_eq!(orchestrator.metric("fleetlaps_device_clones_detected_total").await, 1.0);

    // …each copy's account has a password the centre returns…
    let returned = orchestrator.passwords(&original.device_id).await;
    for agent in [&original, &copy] {
        assert!(
            returned.iter().any(|password| agent.has_password(password)),
            "the centre returns the password of each copy's account"
        );
    }
    // …and no backup of either copy was dropped: every one on the stream was stored.
    assert_eq!(quarantine_reasons(&orchestrator).await, [], "nothing quarantined");
    let backups: BTreeSet<_> = device_events(&nats, &original.device_id, EventKind::PasswordBackedUp)
        .await
        .iter()
        .map(|envelope| envelope.id)
        .collect();
    assert!(
        backups.len() >= 5,
        "the first backup and four resets: {}",
        backups.len()
    );
    assert_eq!(
        orchestrator
            .metric(r#"fleetlaps_events_ingested_total{kind="password_backed_up",outcome="applied"}"#)
            .await,
        backups.len() as f64,
        "every backup on the stream is stored"
    );
}
