//! The orchestrator's side of the history: its own events (password reads, tokens, rotation
//! requests) appended to the events stream, and commands sent to devices.
//!
//! Handlers reach it through the [`Journal`] trait so they can be tested in-process; the only
//! implementation outside tests is [`JetStreamJournal`].

use async_nats::jetstream::{self, message::PublishMessage};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent};
use fleetlaps_proto::command::Command;
use fleetlaps_proto::subject;
use futures::future::BoxFuture;

use super::BusError;

/// Where the orchestrator records what it does, and how it reaches devices.
pub trait Journal: Send + Sync + 'static {
    /// Appends one event to the history and waits until JetStream has it; returns its stream
    /// sequence.
    fn append(&self, event: AuditEvent) -> BoxFuture<'_, Result<u64, BusError>>;

    /// Sends a command to its device (kept until the device takes it).
    fn command(&self, command: Command) -> BoxFuture<'_, Result<(), BusError>>;
}

/// The journal on JetStream.
#[derive(Clone)]
pub struct JetStreamJournal {
    jetstream: jetstream::Context,
}

impl JetStreamJournal {
    /// A journal on this JetStream context.
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self { jetstream }
    }
}

impl Journal for JetStreamJournal {
    fn append(&self, event: AuditEvent) -> BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(async move {
            let envelope = AuditEnvelope::new(chrono::Utc::now(), event);
            let message = PublishMessage::build()
                .payload(envelope.to_json().into())
                .message_id(envelope.id.to_string());
            let error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Journal { source };
            let ack = self
                .jetstream
                .send_publish(subject::audit_event(envelope.event.kind()), message)
                .await
                .map_err(|err| error(err.into()))?
                .await
                .map_err(|err| error(err.into()))?;
            Ok(ack.sequence)
        })
    }

    fn command(&self, command: Command) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move { super::commands::send_command(&self.jetstream, &command).await })
    }
}
