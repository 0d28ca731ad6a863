//! The agent's side of NATS: publishing events to JetStream and waiting for the ack.
//!
//! Boundary: the only module of the agent that knows async-nats.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use fleetlaps_proto::event::Envelope;
use fleetlaps_proto::subject;

/// A publish that was not acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("publishing {kind} event to JetStream: {source}")]
pub struct PublishError {
    /// The kind of event that was not published.
    kind: &'static str,
    /// Why.
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Publishes envelopes to JetStream, each with its event id as `Nats-Msg-Id`.
#[derive(Clone)]
pub struct Publisher {
    jetstream: jetstream::Context,
}

impl Publisher {
    /// Connects to `url`. The connection is made in the background and re-made after losses, so
    /// an agent starts (and keeps its account untouched) while NATS is unreachable.
    pub async fn connect(url: &str, ack_timeout: Duration) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name("fleetlaps-agent")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 200).min(2_000)))
            .connect(url)
            .await
            .map_err(|err| anyhow::anyhow!("connecting to NATS at {url}: {err}"))?;
        let jetstream = jetstream::ContextBuilder::new().timeout(ack_timeout).build(client);
        Ok(Self { jetstream })
    }

    /// Publishes one envelope and waits for JetStream's acknowledgement.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let kind = envelope.event.kind();
        let error = |source: Box<dyn std::error::Error + Send + Sync>| PublishError {
            kind: kind.as_str(),
            source,
        };
        let message = PublishMessage::build()
            .payload(envelope.to_json().into())
            .message_id(envelope.id.to_string());
        let ack = self
            .jetstream
            .send_publish(subject::device_event(&envelope.device_id, kind), message)
            .await
            .map_err(|err| error(err.into()))?;
        ack.await.map_err(|err| error(err.into()))?;
        Ok(())
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.jetstream.client().connection_state() == async_nats::connection::State::Connected
    }
}
