//! One real rotation, end to end: agent → JetStream → orchestrator → API and lapsctl.

use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::password::Password;

use crate::apps::{READ_TOKEN, TestAgent, TestOrchestrator, run};
use crate::harness::TestNats;

#[tokio::test]
async fn an_agent_rotates_and_the_password_read_through_the_api_and_lapsctl_is_the_accounts() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;

    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    assert_eq!(passwords.len(), 1);
    agent.wait_until_has(&passwords[0]).await;
    let info = orchestrator.credentials(&agent.device_id).await.expect("device known");
    assert_eq!(info.device_name.as_str(), "device-1");
    assert!(
        info.refresh_date_time > info.last_backup_date_time,
        "the password expires after its backup"
    );

    let output = orchestrator
        .lapsctl(&[
            "--token",
            READ_TOKEN,
            "get-password",
            "--device",
            "device-1",
            "--include-passwords",
            "--as-plain-text",
            "-o",
            "json",
        ])
        .await;
    assert!(
        output.status.success(),
        "lapsctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("lapsctl -o json prints JSON");
    let entry = &printed[0];
    assert_eq!(entry["DeviceName"], "device-1");
    assert_eq!(entry["DeviceId"], agent.device_id.as_str());
    assert_eq!(entry["Account"], "lapsadmin");
    let password = Password::new(entry["Password"].as_str().expect("Password is printed").to_owned());
    assert!(agent.has_password(&password), "lapsctl's password is the account's");
}

#[tokio::test]
async fn an_expired_password_is_rotated_on_the_next_cycle_and_the_history_keeps_the_previous_one() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);

    // Not expired yet: a cycle changes nothing.
    let answer = agent.control(ControlRequest::ProcessNow).await;
    assert!(
        matches!(&answer, ControlResponse::Done { message } if message.contains("not due")),
        "{answer:?}"
    );
    assert!(agent.has_password(&first));

    // PasswordAgeDays defaults to 30: 31 days later the next cycle rotates.
    agent.clock.advance(chrono::Duration::days(31));
    let answer = agent.control(ControlRequest::ProcessNow).await;
    assert!(
        matches!(&answer, ControlResponse::Done { message } if message.contains("rotated")),
        "{answer:?}"
    );

    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    assert!(
        agent.has_password(&passwords[0]),
        "the newest backup is the account's password"
    );
    assert_eq!(
        passwords[1].expose(),
        first.expose(),
        "the history keeps the previous password"
    );
    assert!(!agent.has_password(&first), "the previous password no longer works");
}

#[tokio::test]
async fn a_manual_reset_rotates_at_once() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    let output = run(
        "fleetlaps-agent",
        &["--config", agent.config_path.to_str().expect("utf-8"), "reset"],
    )
    .await;
    assert!(
        output.status.success(),
        "reset failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("rotated"));

    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    assert!(agent.has_password(&passwords[0]));
}
