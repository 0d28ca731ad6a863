//! No password is ever lost: crashes at every step of a rotation, a nats-server that dies right
//! after acknowledging a backup, an outbox that fills up while NATS is away.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use fleetlaps_agent::fault;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::{Envelope, EventKind};

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator, device_events, stream_payloads};
use crate::harness::{TestNats, wait_until};
use crate::linux::LinuxUser;

/// The invariant: the account's password is one the orchestrator holds (or the account has
/// none yet). Waits for the orchestrator to consume what JetStream already acknowledged.
async fn assert_account_password_is_held(agent: &TestAgent, orchestrator: &TestOrchestrator, context: &str) {
    wait_until(
        &format!("the account's password is one the orchestrator holds ({context})"),
        Duration::from_secs(20),
        || async {
            let passwords = orchestrator.passwords(&agent.device_id).await;
            passwords
                .iter()
                .any(|password| agent.has_password(password))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_rotation_never_leaves_the_account_with_a_password_the_orchestrator_lacks() {
    crash_at_every_step(None, 2).await;
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_rotation_of_a_real_linux_account_loses_nothing() {
    let user = LinuxUser::create().await;
    crash_at_every_step(Some(user.name.clone()), 1).await;
}

/// Kills the agent (SIGKILL, through the fault-injection switch) at every step of a rotation,
/// `rounds` times over, checks the invariant while it is dead, and that a restart rolls forward.
async fn crash_at_every_step(linux_account: Option<String>, rounds: u32) {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: "reset_min_interval_secs = 0".to_owned(),
        linux_account,
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    let mut newest = orchestrator.passwords(&agent.device_id).await.remove(0);
    for round in 1..=rounds {
        for point in fault::POINTS {
            let context = format!("round {round}, killed {point}");
            // Arrange: the real binary, armed to SIGKILL itself at `point`.
            let mut crashing = agent.run_binary(Some(point)).await;
            wait_until(
                "the agent answers on its control socket",
                Duration::from_secs(20),
                || async {
                    fleetlaps_agent::control::send(&agent.state_dir, &ControlRequest::Status)
                        .await
                        .ok()
                        .map(|_| ())
                },
            )
            .await;

            // Act: a rotation, cut short by the kill.
            let _cut = fleetlaps_agent::control::send(&agent.state_dir, &ControlRequest::Reset).await;
            let status = tokio::time::timeout(Duration::from_secs(30), crashing.wait())
                .await
                .unwrap_or_else(|_| panic!("the agent did not die at {point}"))
                .expect("waiting for the agent");
            assert_eq!(
                status.signal(),
                Some(9),
                "{context}: killed by the armed SIGKILL, not by a failure"
            );

            // Assert: the invariant holds while the agent is dead…
            assert_account_password_is_held(&agent, &orchestrator, &context).await;

            // …and a restart rolls the cut rotation forward: a new password the centre holds is
            // on the account, and nothing is pending.
            let mut recovered = agent.run_binary(None).await;
            let rolled_forward = orchestrator.wait_for_new_password(&agent.device_id, &[&newest]).await;
            wait_until(
                &format!("the agent rolls forward ({context})"),
                Duration::from_secs(30),
                || async {
                    let ControlResponse::Status(status) =
                        fleetlaps_agent::control::send(&agent.state_dir, &ControlRequest::Status)
                            .await
                            .ok()?
                    else {
                        return None;
                    };
                    (status.pending_rotation.is_none()
                        && status.outbox_pending == 0
                        && agent.has_password(&rolled_forward))
                    .then_some(())
                },
            )
            .await;
            newest = rolled_forward;
            recovered.kill().await.expect("stopping the agent");
        }
    }
    let backups = device_events(&nats, &agent.device_id, EventKind::PasswordBackedUp).await;
    let rotations: std::collections::HashSet<_> = backups
        .iter()
        .map(|envelope| match &envelope.event {
            fleetlaps_proto::event::Event::PasswordBackedUp(backup) => backup.rotation_id,
            _ => unreachable!("filtered by kind"),
        })
        .collect();
    let expected = 1 + rounds as usize * fault::POINTS.len();
    assert_eq!(rotations.len(), expected, "one rotation per reset, each backed up");
    agent.start_in_process().await;
    assert_account_password_is_held(&agent, &orchestrator, "after all crashes").await;
}

#[tokio::test]
async fn a_backup_lost_by_a_nats_server_crash_after_its_ack_is_sent_again_and_retrievable() {
    // Arrange: a device with a committed rotation, and a copy of the server's store as it is then.
    let mut nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings:
            "reset_min_interval_secs = 0\nbackup_confirmation_wait_secs = 2\nbackup_confirmation_timeout_secs = 2"
                .to_owned(),
        ..AgentOptions::default()
    };
    let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_has(&first).await;
    let store_before_the_backup = nats.snapshot_store();

    // With the orchestrator away, JetStream acknowledges the next backup but nobody confirms it.
    orchestrator.stop().await;
    let answer = agent.control(ControlRequest::Reset).await;
    assert!(matches!(&answer, ControlResponse::Refused { .. }), "{answer:?}");
    let backups = device_events(&nats, &agent.device_id, EventKind::PasswordBackedUp).await;
    assert_eq!(backups.len(), 2, "JetStream took the backup");
    let lost = backups[1].id;

    // Act: the server dies before it synced the acknowledged backup, and comes back without it.
    nats.restart_on_store(store_before_the_backup.path());
    let backups = device_events(&nats, &agent.device_id, EventKind::PasswordBackedUp).await;
    assert_eq!(backups.len(), 1, "the acknowledged backup is lost");
    assert!(
        agent.has_password(&first),
        "an unconfirmed backup never reaches the account"
    );
    orchestrator.restart().await;

    // Assert: the agent sent the same backup again; the centre holds it; the account has it.
    let newest = orchestrator.wait_for_new_password(&agent.device_id, &[&first]).await;
    agent.wait_until_has(&newest).await;
    let backups = device_events(&nats, &agent.device_id, EventKind::PasswordBackedUp).await;
    assert_eq!(
        backups.last().map(|envelope| envelope.id),
        Some(lost),
        "the lost backup was re-sent"
    );
    wait_until("the re-sent backup is confirmed", Duration::from_secs(30), || async {
        let status = agent.status().await;
        (status.unconfirmed_backups == 0 && status.pending_rotation.is_none()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_full_outbox_drops_reports_never_the_backup_and_loses_nothing_it_kept() {
    let mut nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        // One place for reports; two kept for a rotation's backup and commit.
        settings: "outbox_limit = 3\nbackup_confirmation_wait_secs = 1".to_owned(),
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_has(&first).await;
    wait_until("the agent has sent everything", Duration::from_secs(30), || async {
        (agent.status().await.outbox_pending == 0).then_some(())
    })
    .await;
    let sent_before = device_history(&nats, &agent).await.len();

    // While NATS is away, every start reports its policy: the first fills the reports' place,
    // the second is dropped and counted.
    nats.stop();
    agent.restart().await;
    agent.restart().await;
    let status = agent.status().await;
    assert_eq!((status.outbox_pending, status.outbox_dropped), (1, 1), "{status:?}");

    // A rotation still finds room for its backup; the account waits for the confirmation.
    let _answer = agent.control(ControlRequest::Reset).await;
    let rotating = agent.status().await;
    assert!(rotating.pending_rotation.is_some(), "{rotating:?}");
    assert_eq!(rotating.outbox_pending, 2, "the backup is queued: {rotating:?}");
    assert!(
        agent.has_password(&first),
        "no password change before the backup is stored"
    );

    // NATS back: the outbox drains in order and rotations resume.
    let queued = status.outbox_pending;
    nats.restart();
    wait_until("the outbox drains", Duration::from_secs(30), || async {
        (agent.status().await.outbox_pending == 0).then_some(())
    })
    .await;
    let history = device_history(&nats, &agent).await;
    assert!(
        history.len() >= sent_before + queued,
        "every queued event reached the stream: {} before, {queued} queued, {} now",
        sent_before,
        history.len()
    );
    // The agent numbers its events one by one: a gap would be an event lost.
    assert!(
        history
            .windows(2)
            .all(|pair| pair[0].generation != pair[1].generation || pair[1].sequence == pair[0].sequence + 1),
        "no event missing: {:?}",
        history.iter().map(Envelope::position).collect::<Vec<_>>()
    );
    assert!(
        history.windows(2).all(|pair| pair[0].position() < pair[1].position()),
        "in the order they were emitted: {:?}",
        history.iter().map(Envelope::position).collect::<Vec<_>>()
    );
    let second = orchestrator
        .wait_for_new_password_within(&agent.device_id, &[&first], Duration::from_secs(120))
        .await;
    agent.wait_until_settled_with(&second).await;
}

/// The device's events in the stream, in stream order.
async fn device_history(nats: &TestNats, agent: &TestAgent) -> Vec<Envelope> {
    stream_payloads(nats, &format!("laps.events.{}.>", agent.device_id))
        .await
        .iter()
        .map(|payload| Envelope::from_json(payload).expect("a valid envelope"))
        .collect()
}
