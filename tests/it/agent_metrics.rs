//! The agent's own metrics (`[metrics] listen`): a listener answering `GET /metrics` in
//! Prometheus' text format, counting rotations by trigger and outcome, and showing when the
//! password last changed and when the last heartbeat went out.

use std::time::Duration;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, wait_until};

/// The value of one sample (`name{labels}`) in `text`, if present.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name_and_labels)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// The agent's metrics text.
async fn agent_metrics(agent: &TestAgent) -> String {
    let url = agent.metrics_url().expect("the agent serves its metrics");
    let response = reqwest::get(&url).await.expect("the metrics listener answers");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    response.text().await.expect("text")
}

#[tokio::test]
async fn an_agent_with_a_metrics_listener_counts_its_rotation_by_trigger_and_shows_its_time() {
    // Arrange: an agent whose config asks for a metrics listener on a free port.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        extra_config: "[metrics]\nlisten = \"127.0.0.1:0\"\n".to_owned(),
        ..AgentOptions::default()
    };

    // Act: it starts, and makes and backs up its first password.
    let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let password = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_settled_with(&password).await;

    // Assert: one initial rotation succeeded, its backup was stored, and the gauges are set.
    let text = wait_until(
        "the agent's metrics show the rotation",
        Duration::from_secs(30),
        || async {
            let text = agent_metrics(&agent).await;
            let rotated = sample(
                &text,
                r#"fleetlaps_agent_rotations_total{outcome="succeeded",trigger="initial"}"#,
            );
            (rotated == Some(1.0)).then_some(text)
        },
    )
    .await;
    assert_eq!(
        sample(
            &text,
            r#"fleetlaps_agent_rotations_total{outcome="succeeded",trigger="command"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"fleetlaps_agent_backups_total{outcome="stored"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&text, "fleetlaps_agent_outbox_events"), Some(0.0));
    let now = chrono::Utc::now().timestamp() as f64;
    let last_rotation = sample(&text, "fleetlaps_agent_last_rotation_timestamp_seconds").expect("present");
    assert!(
        (now - 120.0..=now + 1.0).contains(&last_rotation),
        "{last_rotation} vs {now}"
    );
    let expiry = sample(&text, "fleetlaps_agent_password_expiry_timestamp_seconds").expect("present");
    assert!(expiry > now + 86_400.0, "the password expires days from now: {expiry}");
    let heartbeat = wait_until(
        "the agent's metrics show a heartbeat",
        Duration::from_secs(30),
        || async {
            sample(
                &agent_metrics(&agent).await,
                "fleetlaps_agent_last_heartbeat_timestamp_seconds",
            )
            .filter(|at| *at > 0.0)
        },
    )
    .await;
    assert!((now - 120.0..=now + 1.0).contains(&heartbeat), "{heartbeat} vs {now}");
}
