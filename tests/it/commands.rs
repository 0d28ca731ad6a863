//! Commands from the orchestrator reach devices that were offline, and run once.

use async_nats::jetstream;
use fleetlaps_proto::command::CommandAction;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::subject;

use crate::apps::{TestAgent, TestOrchestrator};
use crate::harness::TestNats;

#[tokio::test]
async fn an_offline_agent_runs_a_rotate_command_issued_while_it_was_down_exactly_once() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    agent.stop().await;
    let jetstream = jetstream::new(nats.client().await);
    let action = CommandAction::RotatePassword {
        reason: "suspected breach".to_owned(),
    };
    fleetlaps_orchestrator::bus::issue_command(&jetstream, &agent.device_id, action)
        .await
        .expect("issued");

    agent.start_in_process().await;
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    crate::harness::wait_until(
        "the account gets the confirmed password",
        std::time::Duration::from_secs(30),
        || async { agent.has_password(&passwords[0]).then_some(()) },
    )
    .await;

    // Restarted, and asked to process again: the same command does not run twice.
    agent.restart().await;
    let answer = agent.control(ControlRequest::ProcessNow).await;
    assert!(
        matches!(&answer, ControlResponse::Done { message } if message.contains("not due")),
        "{answer:?}"
    );
    assert_eq!(count(&jetstream, &agent, "password_backed_up").await, 2);
    assert_eq!(count(&jetstream, &agent, "command_executed").await, 1);
}

/// How many events of `kind` the device has in the stream.
async fn count(jetstream: &jetstream::Context, agent: &TestAgent, kind: &str) -> u64 {
    let stream = jetstream
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("events stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("laps.events.{}.{kind}", agent.device_id),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut consumer = consumer;
    consumer.info().await.expect("consumer info").num_pending
}
