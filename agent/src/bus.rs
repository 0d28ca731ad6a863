//! The agent's side of NATS: publishing events to JetStream and waiting for the ack.
//!
//! Boundary: the only module of the agent that knows async-nats.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use fleetlaps_proto::command::{BackupConfirmation, Command};
use fleetlaps_proto::event::Envelope;
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::subject;
use futures::StreamExt;
use tokio::sync::mpsc;

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

/// What the orchestrator sends this device.
#[derive(Debug)]
pub enum Incoming {
    /// A backup is stored; the device may forget its copy.
    Confirmation(BackupConfirmation),
    /// Something to do.
    Command(Command),
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

    /// Forwards the orchestrator's backup confirmations and rotate commands for `device_id` to
    /// `inbox` until the receiver is dropped. Subscriptions are re-made by the client after a
    /// reconnection; commands missed while offline are found with [`Self::last_command`].
    pub async fn listen(&self, device_id: &DeviceId, inbox: mpsc::Sender<Incoming>) -> anyhow::Result<()> {
        let client = self.jetstream.client();
        let mut confirmations = client.subscribe(subject::device_confirmations(device_id)).await?;
        let mut commands = client.subscribe(subject::device_commands(device_id)).await?;
        tokio::spawn(async move {
            loop {
                let incoming = tokio::select! {
                    Some(message) = confirmations.next() => {
                        match serde_json::from_slice::<BackupConfirmation>(&message.payload) {
                            Ok(confirmation) => Incoming::Confirmation(confirmation),
                            Err(err) => {
                                tracing::warn!(error = %err, "malformed backup confirmation ignored");
                                continue;
                            }
                        }
                    }
                    Some(message) = commands.next() => {
                        match serde_json::from_slice::<Command>(&message.payload) {
                            Ok(command) => Incoming::Command(command),
                            Err(err) => {
                                tracing::warn!(error = %err, "malformed command ignored");
                                continue;
                            }
                        }
                    }
                    else => return,
                };
                if inbox.send(incoming).await.is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// The last command kept for `device_id` in the commands stream, if any. `Ok(None)` also
    /// when the stream does not exist yet (no command was ever issued).
    pub async fn last_command(&self, device_id: &DeviceId) -> anyhow::Result<Option<Command>> {
        let stream = match self.jetstream.get_stream(subject::COMMANDS_STREAM).await {
            Ok(stream) => stream,
            Err(err) if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        match stream
            .get_last_raw_message_by_subject(&subject::device_commands(device_id))
            .await
        {
            Ok(message) => Ok(Some(serde_json::from_slice(&message.payload)?)),
            Err(err) if matches!(err.kind(), jetstream::stream::LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.jetstream.client().connection_state() == async_nats::connection::State::Connected
    }
}
