//! Commands for devices: kept in their own stream, the last one per device, so a device that is
//! offline when a command is issued finds it when it comes back.

use async_nats::jetstream::{self, message::PublishMessage, stream};
use chrono::Utc;
use fleetlaps_proto::command::{Command, CommandAction, CommandId};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::subject;

use super::BusError;

/// Creates the commands stream if it does not exist.
pub async fn ensure_commands_stream(jetstream: &jetstream::Context) -> Result<stream::Stream, BusError> {
    let config = stream::Config {
        name: subject::COMMANDS_STREAM.to_owned(),
        subjects: vec![subject::COMMANDS_WILDCARD.to_owned()],
        storage: stream::StorageType::File,
        // Only the newest command per device matters: one newer replaces an older one not yet run.
        max_messages_per_subject: 1,
        allow_direct: true,
        duplicate_window: std::time::Duration::from_secs(120),
        ..Default::default()
    };
    jetstream
        .get_or_create_stream(config)
        .await
        .map_err(|err| BusError::Stream { source: err.into() })
}

/// Issues a command to one device and waits until the stream holds it.
pub async fn issue_command(
    jetstream: &jetstream::Context,
    device_id: &DeviceId,
    action: CommandAction,
) -> Result<Command, BusError> {
    let command = Command {
        id: CommandId::new(),
        device_id: device_id.clone(),
        issued_at: Utc::now(),
        action,
    };
    send_command(jetstream, &command).await?;
    Ok(command)
}

/// Sends a command made by the caller to its device and waits until the stream holds it. The
/// command id is its `Nats-Msg-Id`, so sending it twice stores it once.
pub async fn send_command(jetstream: &jetstream::Context, command: &Command) -> Result<(), BusError> {
    let payload = serde_json::to_vec(command).expect("a command serialises");
    let message = PublishMessage::build()
        .payload(payload.into())
        .message_id(command.id.to_string());
    let publish_error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Stream { source };
    jetstream
        .send_publish(subject::device_commands(&command.device_id), message)
        .await
        .map_err(|err| publish_error(err.into()))?
        .await
        .map_err(|err| publish_error(err.into()))?;
    tracing::info!(command_id = %command.id, device_id = %command.device_id, "command issued");
    Ok(())
}
