//! The `linux` account backend on this machine's real accounts: a throwaway user gets the
//! password the orchestrator backed up, and PAM (through `pamtester`) agrees.
//!
//! These tests need root (`useradd`, `chpasswd`, reading `/etc/shadow`), as CI runs them, and
//! Debian's `pamtester`. They only ever change the password of a user they created.

use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::EventKind;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator, device_events};
use crate::harness::{TestNats, wait_until};
use crate::linux::{LinuxUser, pamtester, unused_name};

#[tokio::test]
async fn a_real_account_gets_the_backed_up_password_and_pam_accepts_only_the_new_one() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let user = LinuxUser::create().await;
    let agent = TestAgent::spawn_with(
        &nats,
        &orchestrator,
        AgentOptions {
            linux_account: Some(user.name.clone()),
            ..Default::default()
        },
    )
    .await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    user.wait_until_holds(&first).await;
    assert!(
        pamtester("login", &user.name, &first).await,
        "PAM accepts the first backed-up password"
    );

    // Act
    let answer = agent.control(ControlRequest::Reset).await;

    // Assert
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    let (newest, previous) = (&passwords[0], &passwords[1]);
    assert_eq!(
        previous.expose(),
        first.expose(),
        "the history keeps the first password"
    );
    assert_ne!(newest.expose(), first.expose(), "the reset made a new password");
    user.wait_until_holds(newest).await;
    assert!(
        pamtester("login", &user.name, newest).await,
        "PAM accepts the new password"
    );
    assert!(
        !pamtester("login", &user.name, previous).await,
        "PAM refuses the previous password"
    );
}

#[tokio::test]
async fn an_unknown_account_is_refused_with_a_clear_error() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let name = unused_name();
    let agent = TestAgent::spawn_with(
        &nats,
        &orchestrator,
        AgentOptions {
            linux_account: Some(name.clone()),
            ..Default::default()
        },
    )
    .await;

    // Act
    let answer = agent.control(ControlRequest::ProcessNow).await;

    // Assert
    assert!(
        matches!(&answer, ControlResponse::Refused { message } if message.contains(&name) && message.contains("does not exist")),
        "{answer:?}"
    );
    let missing = wait_until(
        "the agent reports the missing account on the stream",
        std::time::Duration::from_secs(30),
        || async {
            let events = device_events(&nats, &agent.device_id, EventKind::AccountMissing).await;
            (!events.is_empty()).then_some(events)
        },
    )
    .await;
    assert_eq!(missing[0].code, Some(10013), "LAPS's event for a missing account");
    assert!(
        orchestrator.passwords(&agent.device_id).await.is_empty(),
        "the orchestrator holds no password for an account that does not exist"
    );
}
