//! Liveness: every agent puts a heartbeat in the liveness bucket at each cycle, the orchestrator
//! keeps each device's last one (by the server's time) and shows it as `lastHeartbeatDateTime`,
//! and a device that stops beating becomes silent (`isSilent`) after
//! `monitoring.silent_after_secs`, all without one message more on the history.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::subject;
use serde_json::Value;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, wait_until};
use crate::simulate::{nats_with_simulator, simulator_config};

/// A safety net only.
const TIMEOUT: Duration = Duration::from_secs(60);

/// An agent that cycles every second.
fn beating_every_second() -> AgentOptions {
    AgentOptions {
        processing_interval_secs: 1,
        ..AgentOptions::default()
    }
}

/// Every device's entry in the directory (`/v1.0/devices`), by id.
async fn directory(orchestrator: &TestOrchestrator) -> HashMap<DeviceId, Value> {
    orchestrator
        .directory()
        .await
        .into_iter()
        .map(|device| {
            let device_id = DeviceId::parse(device["id"].as_str().expect("an id")).expect("a device id");
            (device_id, device)
        })
        .collect()
}

/// Every device's `lastHeartbeatDateTime` as the API shows it.
async fn heartbeats(orchestrator: &TestOrchestrator) -> HashMap<DeviceId, Option<DateTime<Utc>>> {
    directory(orchestrator)
        .await
        .into_iter()
        .map(|(device_id, device)| {
            let heartbeat = serde_json::from_value(device["lastHeartbeatDateTime"].clone()).expect("a time or null");
            (device_id, heartbeat)
        })
        .collect()
}

/// The device's `isSilent` as the API shows it.
async fn is_silent(orchestrator: &TestOrchestrator, device_id: &DeviceId) -> bool {
    directory(orchestrator).await[device_id]["isSilent"]
        .as_bool()
        .expect("isSilent is a boolean")
}

/// The device's `lastHeartbeatDateTime` through the API.
async fn last_heartbeat(orchestrator: &TestOrchestrator, device_id: &DeviceId) -> Option<DateTime<Utc>> {
    heartbeats(orchestrator)
        .await
        .remove(device_id)
        .expect("the directory lists the device")
}

/// Waits until the device's last heartbeat, through the API, is later than `after`; returns it.
async fn heartbeat_after(
    orchestrator: &TestOrchestrator,
    device_id: &DeviceId,
    after: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    wait_until("the device's last heartbeat moves forward", TIMEOUT, || async {
        last_heartbeat(orchestrator, device_id)
            .await
            .filter(|heartbeat| after.is_none_or(|after| *heartbeat > after))
    })
    .await
}

/// How many messages the history (`LAPS_EVENTS`) holds.
async fn history_messages(nats: &TestNats) -> u64 {
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let mut stream = jetstream
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("the events stream");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn an_agent_beats_every_cycle_and_the_history_does_not_grow_with_the_beats() {
    // Arrange: an agent cycling every second, its first password backed up and applied.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn_with(&nats, &orchestrator, beating_every_second()).await;
    let password = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_settled_with(&password).await;
    let first = heartbeat_after(&orchestrator, &agent.device_id, None).await;
    let history_before = history_messages(&nats).await;

    // Act: several cycles with no rotation due.
    let mut last = first;
    for _ in 0..3 {
        last = heartbeat_after(&orchestrator, &agent.device_id, Some(last)).await;
    }

    // Assert: the heartbeat moved forward, the history did not move at all.
    assert!(last > first);
    assert_eq!(
        history_messages(&nats).await,
        history_before,
        "a heartbeat reached the history"
    );
    assert_eq!(
        orchestrator.liveness.last_seen(&agent.device_id).map(|at| at >= last),
        Some(true)
    );
}

#[tokio::test]
async fn a_stopped_agents_heartbeat_stops_and_it_is_silent_after_the_threshold() {
    // Arrange: a device is silent after 3 s without a heartbeat; its agent beats every second.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(&nats, "[monitoring]\nsilent_after_secs = 3").await;
    let mut agent = TestAgent::spawn_with(&nats, &orchestrator, beating_every_second()).await;
    let beat = heartbeat_after(&orchestrator, &agent.device_id, None).await;
    heartbeat_after(&orchestrator, &agent.device_id, Some(beat)).await;
    assert!(!is_silent(&orchestrator, &agent.device_id).await);

    // Act: the agent stops.
    agent.stop().await;
    // A beat may have been in flight: what the orchestrator holds a moment later is the last.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = last_heartbeat(&orchestrator, &agent.device_id).await;

    // Assert: the device becomes silent, and its last heartbeat stayed where it was.
    wait_until("the stopped device is silent", TIMEOUT, || async {
        is_silent(&orchestrator, &agent.device_id).await.then_some(())
    })
    .await;
    assert_eq!(last_heartbeat(&orchestrator, &agent.device_id).await, last);
    assert!(Utc::now() - last.expect("it beat") > chrono::Duration::seconds(3));

    // Act: it starts again. Assert: it beats, and nobody is silent.
    agent.start_in_process().await;
    heartbeat_after(&orchestrator, &agent.device_id, last).await;
    assert!(!is_silent(&orchestrator, &agent.device_id).await);
}

#[tokio::test]
async fn every_simulated_device_beats_through_the_simulators_shared_connection() {
    // Arrange: a small fleet simulated in this process, as the simulator's own NATS user.
    const DEVICES: usize = 20;
    let nats = nats_with_simulator();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = simulator_config(&nats, &dir.path().join("simulator"))
        .replace("processing_interval_secs = 3600", "processing_interval_secs = 2");
    let mut simulation = crate::simulate::enrolled_fleet(&orchestrator, DEVICES, &config).await;

    // Act: the fleet starts.
    simulation.start_all().await.expect("the fleet starts");

    // Assert: every simulated device has a last heartbeat, in the API and in the orchestrator's
    // liveness.
    let device_ids = simulation.device_ids();
    wait_until("every simulated device has beaten", TIMEOUT, || async {
        let heartbeats = heartbeats(&orchestrator).await;
        device_ids
            .iter()
            .all(|device_id| heartbeats.get(device_id).is_some_and(Option::is_some))
            .then_some(())
    })
    .await;
    let snapshot = orchestrator.liveness.snapshot();
    assert!(device_ids.iter().all(|device_id| snapshot.contains_key(device_id)));
    simulation.stop_all().await.expect("the fleet stops");
}
