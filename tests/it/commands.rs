//! Commands from the orchestrator reach devices that were offline, and run once.

use async_nats::jetstream;
use fleetlaps_proto::command::{CommandAction, CommandId};
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::{Envelope, Event};
use fleetlaps_proto::subject;
use futures::StreamExt as _;

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
    let command = fleetlaps_orchestrator::bus::issue_command(&jetstream, &agent.device_id, action)
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
    assert_eq!(
        rotations_commands(&jetstream, &agent).await,
        [None, Some(command.id)],
        "the second rotation names the command it carried out"
    );
    assert_eq!(
        count(&jetstream, &agent, "command_executed").await,
        0,
        "the rotation says it"
    );
}

/// The command each of the device's rotations names, in the stream's order.
async fn rotations_commands(jetstream: &jetstream::Context, agent: &TestAgent) -> Vec<Option<CommandId>> {
    let mut consumer = device_events(jetstream, agent, "password_rotated").await;
    let rotations = consumer.info().await.expect("consumer info").num_pending;
    let mut messages = consumer.messages().await.expect("messages");
    let mut commands = Vec::new();
    for _ in 0..rotations {
        let message = messages.next().await.expect("a message").expect("readable");
        let envelope = Envelope::from_json(&message.payload).expect("an event");
        let Event::PasswordRotated(rotated) = envelope.event else {
            panic!("not a rotation: {envelope:?}");
        };
        commands.push(rotated.command_id);
    }
    commands
}

/// How many events of `kind` the device has in the stream.
async fn count(jetstream: &jetstream::Context, agent: &TestAgent, kind: &str) -> u64 {
    let mut consumer = device_events(jetstream, agent, kind).await;
    consumer.info().await.expect("consumer info").num_pending
}

/// An ordered consumer of the device's events of `kind`, from the first.
async fn device_events(
    jetstream: &jetstream::Context,
    agent: &TestAgent,
    kind: &str,
) -> jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig> {
    let stream = jetstream
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("events stream");
    stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("laps.events.{}.{kind}", agent.device_id),
            ..Default::default()
        })
        .await
        .expect("ordered consumer")
}
