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

/// Publishes devices' current password versions, all at once, and waits until the stream holds
/// them: one outcome per version, in order.
pub async fn publish_password_versions(
    jetstream: &jetstream::Context,
    versions: &[CurrentPasswordVersion],
) -> Vec<Result<(), BusError>> {
    let publish_error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Stream { source };
    let mut acks = Vec::with_capacity(versions.len());
    for version in versions {
        let payload = serde_json::to_vec(version).expect("a password version serialises");
        acks.push(
            jetstream
                .publish(subject::device_password_version(&version.device_id), payload.into())
                .await,
        );
    }
    // Every publish is sent before any acknowledgement is awaited: one round trip, not one each.
    futures::future::join_all(acks.into_iter().map(|sent| async move {
        sent.map_err(|err| publish_error(err.into()))?
            .await
            .map_err(|err| publish_error(err.into()))?;
        Ok(())
    }))
    .await
}
