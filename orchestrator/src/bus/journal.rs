//! The orchestrator's side of the history: its own events (password reads, tokens, rotation
//! requests) appended to the events stream, each signed with the orchestrator's key, and
//! commands sent to devices.
//!
//! Handlers reach it through the [`Journal`] trait so they can be tested in-process; the only
//! implementation outside tests is [`JetStreamJournal`].

use std::sync::Arc;

use async_nats::jetstream::{self, message::PublishMessage};
use fleetlaps_proto::api::SIGNATURE_HEADER;
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent};
use fleetlaps_proto::command::Command;
use fleetlaps_proto::signature::OrchestratorSigningKey;
use fleetlaps_proto::subject;
use futures::future::BoxFuture;

use super::BusError;

/// Where the orchestrator records what it does, and how it reaches devices.
pub trait Journal: Send + Sync + 'static {
    /// Appends one event to the history and waits until JetStream has it; returns its stream
    /// sequence.
    fn append(&self, event: AuditEvent) -> BoxFuture<'_, Result<u64, BusError>>;

    /// Appends one event with `message_id` as its `Nats-Msg-Id`, so JetStream stores it once
    /// however often it is sent within the stream's duplicate window. A journal without such a
    /// window (the in-process test journals) appends it as [`Journal::append`] does.
    fn append_with_id(&self, event: AuditEvent, message_id: String) -> BoxFuture<'_, Result<u64, BusError>> {
        drop(message_id);
        self.append(event)
    }

    /// Sends a command to its device (kept until the device takes it).
    fn command(&self, command: Command) -> BoxFuture<'_, Result<(), BusError>>;
}

/// The journal on JetStream.
#[derive(Clone)]
pub struct JetStreamJournal {
    jetstream: jetstream::Context,
    /// Signs every event appended: the fold refuses an orchestrator event without its signature.
    signing_key: Arc<OrchestratorSigningKey>,
}

impl JetStreamJournal {
    /// A journal on this JetStream context, signing with `signing_key`.
    pub fn new(jetstream: jetstream::Context, signing_key: Arc<OrchestratorSigningKey>) -> Self {
        Self { jetstream, signing_key }
    }
}

/// The subject and message of an orchestrator event, signed with `signing_key` over exactly the
/// subject and payload sent, with `message_id` as its `Nats-Msg-Id`.
pub(crate) fn signed_audit_message(
    signing_key: &OrchestratorSigningKey,
    envelope: &AuditEnvelope,
    message_id: String,
) -> (String, PublishMessage) {
    let subject = subject::audit_event(envelope.event.kind());
    let payload = envelope.to_json();
    let signature = signing_key.sign(&subject, &payload);
    let message = PublishMessage::build()
        .payload(payload.into())
        .message_id(message_id)
        .header(SIGNATURE_HEADER, signature.as_str());
    (subject, message)
}

impl Journal for JetStreamJournal {
    fn append(&self, event: AuditEvent) -> BoxFuture<'_, Result<u64, BusError>> {
        let envelope = AuditEnvelope::new(chrono::Utc::now(), event);
        let message_id = envelope.id.to_string();
        self.publish(envelope, message_id)
    }

    fn append_with_id(&self, event: AuditEvent, message_id: String) -> BoxFuture<'_, Result<u64, BusError>> {
        self.publish(AuditEnvelope::new(chrono::Utc::now(), event), message_id)
    }

    fn command(&self, command: Command) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move { super::commands::send_command(&self.jetstream, &command).await })
    }
}

impl JetStreamJournal {
    /// Signs and appends `envelope` with `message_id`, and waits for JetStream's ack.
    fn publish(&self, envelope: AuditEnvelope, message_id: String) -> BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(async move {
            let (subject, message) = signed_audit_message(&self.signing_key, &envelope, message_id);
            let error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Journal { source };
            let ack = self
                .jetstream
                .send_publish(subject, message)
                .await
                .map_err(|err| error(err.into()))?
                .await
                .map_err(|err| error(err.into()))?;
            Ok(ack.sequence)
        })
    }
}
