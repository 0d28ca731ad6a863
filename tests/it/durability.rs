//! No password is ever lost: crashes at every step of a rotation, a nats-server that dies right
//! after acknowledging a backup, an outbox that fills up while NATS is away.

use std::time::Duration;

use fleetlaps_agent::fault;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator};
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

    let mut rotations = 1;
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
            assert!(!status.success(), "{context}: the agent was killed");

            // Assert: the invariant holds while the agent is dead…
            assert_account_password_is_held(&agent, &orchestrator, &context).await;

            // …and a restart rolls forward to a plain state: nothing pending, the newest backup on the account.
            let mut recovered = agent.run_binary(None).await;
            rotations += 1;
            let passwords = orchestrator
                .wait_for_passwords(&agent.device_id, rotations.min(3))
                .await;
            wait_until(
                &format!("the agent recovers ({context})"),
                Duration::from_secs(30),
                || async {
                    let ControlResponse::Status(status) =
                        fleetlaps_agent::control::send(&agent.state_dir, &ControlRequest::Status)
                            .await
                            .ok()?
                    else {
                        return None;
                    };
                    let newest = orchestrator.passwords(&agent.device_id).await.into_iter().next()?;
                    (status.pending_rotation.is_none() && status.outbox_pending == 0 && agent.has_password(&newest))
                        .then_some(())
                },
            )
            .await;
            assert!(!passwords.is_empty());
            recovered.kill().await.expect("stopping the agent");
        }
    }
    agent.start_in_process().await;
    assert_account_password_is_held(&agent, &orchestrator, "after all crashes").await;
}

#[tokio::test]
async fn a_backup_lost_by_a_nats_server_crash_after_its_ack_is_sent_again_and_retrievable() {
    let mut nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: "backup_confirmation_timeout_secs = 2".to_owned(),
        ..AgentOptions::default()
    };
    let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    wait_until("the first backup is confirmed", Duration::from_secs(20), || async {
        (agent.status().await.unconfirmed_backups == 0).then_some(())
    })
    .await;

    // With the orchestrator away, JetStream acknowledges the backup but nobody confirms it.
    orchestrator.stop().await;
    let answer = agent.control(ControlRequest::Reset).await;
    assert!(
        matches!(&answer, ControlResponse::Done { message } if message.contains("rotated")),
        "{answer:?}"
    );
    assert_eq!(
        agent.status().await.unconfirmed_backups,
        1,
        "the agent keeps the backup until confirmed"
    );

    // The server dies before it synced the acknowledged message, and comes back with its store.
    nats.kill();
    nats.restart();
    orchestrator.restart().await;

    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    assert!(
        agent.has_password(&passwords[0]),
        "the orchestrator holds the account's password"
    );
    wait_until("the re-sent backup is confirmed", Duration::from_secs(30), || async {
        (agent.status().await.unconfirmed_backups == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_full_outbox_stops_rotations_loudly_and_loses_nothing() {
    let mut nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: "outbox_limit = 2".to_owned(),
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);

    // While NATS is away, every start queues its policy event.
    nats.stop();
    agent.restart().await;
    agent.restart().await;
    let status = agent.status().await;
    assert!(status.outbox_pending >= 2, "{status:?}");

    let answer = agent.control(ControlRequest::Reset).await;
    assert!(
        matches!(&answer, ControlResponse::Refused { message } if message.contains("outbox holds")),
        "{answer:?}"
    );
    assert!(
        agent
            .status()
            .await
            .last_error
            .is_some_and(|error| error.contains("outbox"))
    );
    assert!(agent.has_password(&first), "no rotation while the outbox is full");

    // NATS back: the outbox drains in order and rotations resume.
    nats.restart();
    wait_until("the outbox drains", Duration::from_secs(30), || async {
        (agent.status().await.outbox_pending == 0).then_some(())
    })
    .await;
    let answer = agent.control(ControlRequest::ProcessNow).await;
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
}
