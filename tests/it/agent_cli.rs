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

#[tokio::test]
async fn on_a_host_that_runs_the_orchestrator_too_its_variables_do_not_stop_the_agent() {
    // Arrange: the orchestrator's own variables exported, as on its host (which is managed too),
    // one of them pointing NATS nowhere; and one of the agent's own.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let environment = [
        ("FLEETLAPS_BOOTSTRAP_ADMIN_TOKEN", "an-admin-token"),
        ("FLEETLAPS_NATS__URL", "nats://127.0.0.1:1"),
        ("FLEETLAPS_AGENT_RESET_MIN_INTERVAL_SECS", "0"),
    ];

    // Act
    let mut binary = agent.run_binary_with_env(None, &environment).await;

    // Assert: it runs, on its own config's NATS, and takes its own variable (no reset throttle).
    let status = crate::harness::wait_until(
        "the agent answers on its control socket",
        std::time::Duration::from_secs(20),
        || async {
            match fleetlaps_agent::control::send(&agent.state_dir, &ControlRequest::Status).await {
                Ok(ControlResponse::Status(status)) if status.connected => Some(status),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(status.device_id, agent.device_id.as_str());
    for _ in 0..2 {
        let answer = agent.control(ControlRequest::Reset).await;
        assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    }
    binary.kill().await.expect("stopping the agent");
}

#[test]
fn the_orchestrator_ignores_the_agents_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &config,
        "data_dir = \"/nonexistent/fleetlaps\"\ninsecure_nats = true\n[nats]\nurl = \"nats://127.0.0.1:1\"\n[http]\nplain_http = true\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("writing config");
    let output = std::process::Command::new(crate::apps::binary("fleetlaps-orchestrator"))
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .env("FLEETLAPS_AGENT_NATS__URL", "nats://127.0.0.1:2")
        .output()
        .expect("running the orchestrator");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it cannot start here (no data dir): {stderr}");
    assert!(
        !stderr.contains("agent_nats") && !stderr.contains("unknown field"),
        "{stderr}"
    );
}
