//! Detectors: the orchestrator raises breach signals itself from the authentications and password
//! reads the fleet reports (lateral movement, repeated failures, a read then authentications
//! spreading); in campaign mode it rotates exactly the devices involved; a restart or a rebuild
//! of the projections never raises the same detection twice.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, AuditKind};
use fleetlaps_proto::breach::{BreachDetected, Detector};
use fleetlaps_proto::control::{AuthenticationReport, ControlRequest, ControlResponse};
use fleetlaps_proto::event::{AuthenticationOutcome, EventKind};
use fleetlaps_proto::ids::DeviceId;
use serde_json::Value;

use crate::apps::{
    AgentOptions, MANAGED_ACCOUNT, OPERATOR_TOKEN, TestAgent, TestOrchestrator, device_events, rotations_since,
    stream_payloads,
};
use crate::harness::{TestNats, wait_until};

/// Reports one authentication as the managed account through the agent's control socket, as the
/// PAM hook does.
async fn authenticate(agent: &TestAgent, outcome: AuthenticationOutcome) {
    let report = ControlRequest::Authentication(AuthenticationReport {
        user: MANAGED_ACCOUNT.to_owned(),
        service: "sshd".to_owned(),
        remote_host: Some("203.0.113.7".to_owned()),
        tty: None,
        outcome,
    });
    assert!(matches!(agent.control(report).await, ControlResponse::Done { .. }));
}

/// Logs in once on each agent, waiting until each login is on the history.
async fn log_in_on(nats: &TestNats, agents: &[&TestAgent]) {
    for agent in agents {
        let before = device_events(nats, &agent.device_id, EventKind::AuthenticationSucceeded)
            .await
            .len();
        authenticate(agent, AuthenticationOutcome::Success).await;
        wait_until("the login is on the history", Duration::from_secs(30), || async {
            let after = device_events(nats, &agent.device_id, EventKind::AuthenticationSucceeded).await;
            (after.len() > before).then_some(())
        })
        .await;
    }
}

/// Every detection recorded on the history, oldest first.
async fn detections(nats: &TestNats) -> Vec<BreachDetected> {
    stream_payloads(nats, &fleetlaps_proto::subject::audit_event(AuditKind::BreachDetected))
        .await
        .iter()
        .map(
            |payload| match AuditEnvelope::from_json(payload).expect("an audit envelope").event {
                AuditEvent::BreachDetected(detection) => detection,
                other => panic!("not a detection: {other:?}"),
            },
        )
        .collect()
}

/// Waits until `count` detections of `detector` are recorded, and returns them.
async fn wait_for_detections(nats: &TestNats, detector: Detector, count: usize) -> Vec<BreachDetected> {
    wait_until(
        &format!("{count} {detector} detection(s)"),
        Duration::from_secs(30),
        || async {
            let found: Vec<BreachDetected> = detections(nats)
                .await
                .into_iter()
                .filter(|detection| detection.detector == detector)
                .collect();
            (found.len() >= count).then_some(found)
        },
    )
    .await
}

/// Starts `n` agents, each backed up and settled; failed logins are reported every second.
async fn fleet(nats: &TestNats, orchestrator: &TestOrchestrator, n: usize) -> Vec<TestAgent> {
    let mut agents = Vec::new();
    for index in 0..n {
        let options = AgentOptions {
            device_name: format!("device-{index}"),
            extra_config: "[post_authentication]\nfailure_report_interval_secs = 1\n".to_owned(),
            ..AgentOptions::default()
        };
        let agent = TestAgent::spawn_with(nats, orchestrator, options).await;
        let password = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
        agent.wait_until_settled_with(&password).await;
        agents.push(agent);
    }
    agents
}

fn ids(agents: &[&TestAgent]) -> BTreeSet<DeviceId> {
    agents.iter().map(|agent| agent.device_id.clone()).collect()
}

#[tokio::test]
async fn lateral_movement_fires_at_three_devices_and_not_at_two() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        "[detectors.lateral_movement]\nmode = \"alert\"\ndevices = 3\nwindow_minutes = 10\n",
    )
    .await;
    let agents = fleet(&nats, &orchestrator, 3).await;

    // Act: two devices, folded and looked at, then a third.
    log_in_on(&nats, &[&agents[0], &agents[1]]).await;
    wait_until("both logins are folded", Duration::from_secs(30), || async {
        let folded = orchestrator
            .metric(r#"fleetlaps_events_ingested_total{kind="authentication_succeeded",outcome="applied"}"#)
            .await;
        (folded >= 2.0).then_some(())
    })
    .await;
    log_in_on(&nats, &[&agents[2]]).await;

    // Assert: one detection, naming the three devices and their three logins (one fired at two
    // would name two, and silence the third login).
    let found = wait_for_detections(&nats, Detector::LateralMovement, 1).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let detection = &found[0];
    assert_eq!(
        detection.device_ids.iter().cloned().collect::<BTreeSet<_>>(),
        ids(&[&agents[0], &agents[1], &agents[2]])
    );
    assert_eq!((detection.device_count, detection.evidence_event_ids.len()), (3, 3));
    assert!(detection.window_start <= detection.window_end);
    assert_eq!(detection.breach_id, None, "alert mode declares no breach");
    assert_eq!(
        orchestrator
            .metric("fleetlaps_detections_total{detector=\"lateral_movement\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn in_campaign_mode_lateral_movement_rotates_exactly_the_devices_involved() {
    // Arrange: four devices; the attacker logs in on three.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        "[detectors]\ncampaign_deadline_minutes = 30\n[detectors.lateral_movement]\nmode = \"campaign\"\ndevices = 3\n",
    )
    .await;
    let agents = fleet(&nats, &orchestrator, 4).await;
    let since = Utc::now();

    // Act
    log_in_on(&nats, &[&agents[0], &agents[1], &agents[2]]).await;

    // Assert: the detection names its breach, which targets the three and completes.
    let detection = wait_for_detections(&nats, Detector::LateralMovement, 1).await.remove(0);
    let breach_id = detection.breach_id.expect("campaign mode declares a breach");
    let involved = ids(&[&agents[0], &agents[1], &agents[2]]);
    assert_eq!(detection.device_ids.iter().cloned().collect::<BTreeSet<_>>(), involved);
    let targeted: BTreeSet<DeviceId> =
        stream_payloads(&nats, &fleetlaps_proto::subject::audit_event(AuditKind::BreachTargeted))
            .await
            .iter()
            .filter_map(
                |payload| match AuditEnvelope::from_json(payload).expect("an audit envelope").event {
                    AuditEvent::BreachTargeted(targeted) if targeted.breach_id == breach_id => {
                        Some(targeted.device_ids)
                    }
                    _ => None,
                },
            )
            .flatten()
            .collect();
    assert_eq!(targeted, involved);
    let completed: Value = wait_until("the campaign completes", Duration::from_secs(60), || async {
        let campaign: Value = orchestrator
            .get(&format!("/v1.0/fleetlaps/breaches/{breach_id}"), Some(OPERATOR_TOKEN))
            .await
            .json()
            .await
            .expect("json");
        (campaign["state"] == "completed").then_some(campaign)
    })
    .await;
    assert_eq!(
        (completed["targeted"].as_u64(), completed["rotated"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(completed["declaredBy"], "detector:lateral_movement");
    for agent in &agents[..3] {
        assert!(
            rotations_since(&nats, &agent.device_id, since).await >= 1,
            "an involved device rotated"
        );
    }
    assert_eq!(
        rotations_since(&nats, &agents[3].device_id, since).await,
        0,
        "the uninvolved device did not rotate"
    );
}

#[tokio::test]
async fn repeated_failures_fire_on_the_one_device_counting_aggregated_reports() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        "[detectors.repeated_failures]\nmode = \"alert\"\nfailures = 5\nwindow_minutes = 10\n",
    )
    .await;
    let agents = fleet(&nats, &orchestrator, 2).await;

    // Act: six failures on one device (reported as a few events whose counts add up), one on
    // the other.
    for _ in 0..6 {
        authenticate(&agents[0], AuthenticationOutcome::Failure).await;
    }
    authenticate(&agents[1], AuthenticationOutcome::Failure).await;

    // Assert
    let found = wait_for_detections(&nats, Detector::RepeatedFailures, 1).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].device_ids, vec![agents[0].device_id.clone()]);
    assert!(found[0].authentication_count >= 5, "{found:?}");
    assert!(
        found[0].evidence_event_ids.len() < 6,
        "the agent aggregated the failures: {found:?}"
    );
}

#[tokio::test]
async fn a_password_read_then_logins_on_two_devices_fires_read_then_spread_naming_the_reader() {
    // Arrange: a fleet the harness's "investigator" read while it backed up, and logins on two
    // devices after those reads: the investigator's own detection, recorded.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        "[detectors.read_then_spread]\nmode = \"alert\"\ndevices = 2\nwindow_minutes = 10\n",
    )
    .await;
    let agents = fleet(&nats, &orchestrator, 3).await;
    let responder = orchestrator
        .create_token(
            crate::apps::ADMIN_TOKEN,
            serde_json::json!({"name": "responder", "scopes": ["DeviceLocalCredential.Read.All"]}),
        )
        .await
        .0;
    log_in_on(&nats, &[&agents[1], &agents[2]]).await;
    let setup = wait_for_detections(&nats, Detector::ReadThenSpread, 1).await;
    assert_eq!(setup[0].principal.as_deref(), Some("investigator"));

    // Act: the responder reads the first device's password, then someone logs in on two.
    let read = orchestrator
        .get(
            &format!(
                "/v1.0/directory/deviceLocalCredentials/{}?$select=credentials",
                agents[0].device_id
            ),
            Some(&responder),
        )
        .await;
    assert_eq!(read.status(), reqwest::StatusCode::OK);
    let read_id = wait_until("the read is on the history", Duration::from_secs(30), || async {
        stream_payloads(&nats, &fleetlaps_proto::subject::audit_event(AuditKind::PasswordRead))
            .await
            .iter()
            .map(|payload| AuditEnvelope::from_json(payload).expect("an audit envelope"))
            .find(|envelope| matches!(&envelope.event, AuditEvent::PasswordRead(read) if read.principal == "responder"))
            .map(|envelope| envelope.id)
    })
    .await;
    log_in_on(&nats, &[&agents[1], &agents[2]]).await;

    // Assert: the responder's detection holds its read and the two logins after it, not the two
    // before it.
    let found = wait_for_detections(&nats, Detector::ReadThenSpread, 2).await;
    assert_eq!(found.len(), 2, "{found:?}");
    let detection = &found[1];
    assert_eq!(detection.principal.as_deref(), Some("responder"));
    assert_eq!(
        detection.evidence_event_ids.first(),
        Some(&read_id),
        "the read is the first evidence"
    );
    assert_eq!(
        detection.evidence_event_ids.len(),
        3,
        "the read and the two logins after it, not those before: {detection:?}"
    );
    assert_eq!(
        detection.device_ids.iter().cloned().collect::<BTreeSet<_>>(),
        ids(&[&agents[0], &agents[1], &agents[2]])
    );
}

#[tokio::test]
async fn a_restart_or_a_rebuild_of_the_projections_never_raises_the_same_detection_twice() {
    // Arrange: a lateral movement detected; repeated failures serve as a marker that the
    // detectors have looked at everything before it.
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        "[detectors]\ncooldown_minutes = 60\n[detectors.lateral_movement]\nmode = \"alert\"\ndevices = 2\n\
         [detectors.repeated_failures]\nmode = \"alert\"\nfailures = 2\n",
    )
    .await;
    let agents = fleet(&nats, &orchestrator, 3).await;
    log_in_on(&nats, &[&agents[0], &agents[1]]).await;
    wait_for_detections(&nats, Detector::LateralMovement, 1).await;
    // Folded before the restart, so the restarted consumer does not meet it again.
    wait_until(
        "the detection is in the audit history",
        Duration::from_secs(30),
        || async {
            let page: Value = orchestrator
                .get("/v1.0/fleetlaps/auditEvents?kind=breach_detected", Some(OPERATOR_TOKEN))
                .await
                .json()
                .await
                .expect("json");
            (page["value"].as_array().map(Vec::len) == Some(1)).then_some(())
        },
    )
    .await;

    // Act: a restart, then the same devices again within the cool-down.
    orchestrator.restart().await;
    log_in_on(&nats, &[&agents[0], &agents[1]]).await;
    for _ in 0..2 {
        authenticate(&agents[0], AuthenticationOutcome::Failure).await;
    }
    wait_for_detections(&nats, Detector::RepeatedFailures, 1).await;
    // And a rebuild: the projections deleted and folded again from the whole history, the
    // logins of both detections' evidence included.
    orchestrator.delete_projections().await;
    orchestrator.restart().await;
    for _ in 0..2 {
        authenticate(&agents[2], AuthenticationOutcome::Failure).await;
    }
    wait_for_detections(&nats, Detector::RepeatedFailures, 2).await;

    // Assert: one lateral movement; each device's failures once.
    let found = detections(&nats).await;
    let lateral = found
        .iter()
        .filter(|detection| detection.detector == Detector::LateralMovement)
        .count();
    assert_eq!(lateral, 1, "{found:?}");
    let failures: Vec<&DeviceId> = found
        .iter()
        .filter(|detection| detection.detector == Detector::RepeatedFailures)
        .flat_map(|detection| &detection.device_ids)
        .collect();
    assert_eq!(failures, vec![&agents[0].device_id, &agents[2].device_id], "{found:?}");
}
