//! The current password version of each device (LAPS's `msLAPS-CurrentPasswordVersion`): the
//! centre's view of the device, kept in its own stream, the last one per device, which only the
//! orchestrator may write and each device may read for itself alone.

use async_nats::jetstream::{self, stream};
use fleetlaps_proto::command::CurrentPasswordVersion;
use fleetlaps_proto::subject;

use super::BusError;

/// Creates the password versions stream if it does not exist.
pub async fn ensure_password_versions_stream(jetstream: &jetstream::Context) -> Result<stream::Stream, BusError> {
    let config = stream::Config {
        name: subject::PASSWORD_VERSIONS_STREAM.to_owned(),
        subjects: vec![subject::PASSWORD_VERSIONS_WILDCARD.to_owned()],
        storage: stream::StorageType::File,
        // Only the newest view of a device matters.
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    };
    jetstream
        .get_or_create_stream(config)
        .await
        .map_err(|err| BusError::Stream { source: err.into() })
}

/// Publishes a device's current password version and waits until the stream holds it.
pub async fn publish_password_version(
    jetstream: &jetstream::Context,
    version: &CurrentPasswordVersion,
) -> Result<(), BusError> {
    let payload = serde_json::to_vec(version).expect("a password version serialises");
    let publish_error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Stream { source };
    jetstream
        .publish(subject::device_password_version(&version.device_id), payload.into())
        .await
        .map_err(|err| publish_error(err.into()))?
        .await
        .map_err(|err| publish_error(err.into()))?;
    Ok(())
}
