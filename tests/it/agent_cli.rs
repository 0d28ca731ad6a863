//! The agent's local commands: `status` (Get-LapsDiagnostics) and the `reset` throttle.

use fleetlaps_proto::control::{ControlRequest, ControlResponse};

use crate::apps::{TestAgent, TestOrchestrator, run};
use crate::harness::TestNats;

#[tokio::test]
async fn status_shows_the_policy_its_source_the_account_and_the_expiry() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    let output = run(
        "fleetlaps-agent",
        &["--config", agent.config_path.to_str().expect("utf-8"), "status"],
    )
    .await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "PolicySource",
        "local config",
        "ManagedAccount",
        "lapsadmin (uid 1001)",
        "PasswordLength",
        "PasswordExpirationTime",
        "Connected",
    ] {
        assert!(text.contains(expected), "status lacks {expected}: {text}");
    }
    let status = agent.status().await;
    assert!(status.expires_at > status.last_rotation);
    assert_eq!(status.device_id, agent.device_id.as_str());
}

#[tokio::test]
async fn a_reset_right_after_another_is_throttled_with_a_clear_message() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    let first = agent.control(ControlRequest::Reset).await;
    assert!(matches!(first, ControlResponse::Done { .. }), "{first:?}");
    let second = agent.control(ControlRequest::Reset).await;
    assert!(
        matches!(&second, ControlResponse::Refused { message } if message.contains("reset throttled") && message.contains("try again after")),
        "{second:?}"
    );
    assert_eq!(orchestrator.wait_for_passwords(&agent.device_id, 2).await.len(), 2);
}
