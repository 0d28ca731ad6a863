//! The liveness bucket (`LAPS_LIVENESS`): a JetStream KV bucket, one heartbeat per device, which
//! devices put straight on their own key (`$KV.LAPS_LIVENESS.<device id>`) and the orchestrator
//! watches into a [`Liveness`]. Not the history: nothing is folded, nothing is kept but each
//! device's last heartbeat.
//!
//! nats-server 2.9 answers the account-info request of async-nats's `create_key_value` without
//! fields it expects, so the bucket's stream is made here as a KV bucket's stream is
//! (`KV_<bucket>`, `$KV.<bucket>.>`, one message per subject, rollups allowed, deletes denied,
//! direct gets allowed), and read with an ordered consumer like any stream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use fleetlaps_proto::liveness::Heartbeat;
use fleetlaps_proto::subject;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::BusError;
use crate::liveness::Liveness;

/// How long the watcher waits before it reads the bucket again after losing it.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Creates the liveness bucket's stream if it does not exist.
pub async fn ensure_liveness_bucket(jetstream: &jetstream::Context) -> Result<stream::Stream, BusError> {
    let config = stream::Config {
        name: subject::LIVENESS_STREAM.to_owned(),
        subjects: vec![subject::LIVENESS_WILDCARD.to_owned()],
        storage: stream::StorageType::File,
        // A KV bucket of history 1: each device's last heartbeat only.
        max_messages_per_subject: 1,
        max_message_size: subject::MAX_HEARTBEAT_BYTES,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    jetstream
        .get_or_create_stream(config)
        .await
        .map_err(|err| BusError::Stream { source: err.into() })
}

/// Reads every device's last heartbeat from the bucket into `liveness`, then each new one as it
/// comes, until `cancel`; a heartbeat is dated by the server's time of its entry. Losing the
/// bucket (NATS away) is logged and the reading starts again; it never stops the orchestrator.
pub async fn watch_heartbeats(jetstream: jetstream::Context, liveness: Liveness, cancel: CancellationToken) {
    loop {
        let watched = tokio::select! {
            () = cancel.cancelled() => return,
            watched = watch_once(&jetstream, &liveness) => watched,
        };
        if let Err(err) = watched {
            tracing::warn!(error = %err, details = ?err, "reading the liveness bucket failed; reading it again");
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
}

/// Reads the bucket with a new ordered consumer, from each key's last heartbeat, until an error.
async fn watch_once(jetstream: &jetstream::Context, liveness: &Liveness) -> Result<(), BusError> {
    const READER: &str = "liveness watcher";
    let consumer_error = |source| super::history::reader_error(READER, source);
    let stream = jetstream
        .get_stream(subject::LIVENESS_STREAM)
        .await
        .map_err(|err| BusError::Stream { source: err.into() })?;
    let config = consumer::pull::OrderedConfig {
        filter_subject: subject::LIVENESS_WILDCARD.to_owned(),
        deliver_policy: consumer::DeliverPolicy::LastPerSubject,
        ..Default::default()
    };
    let (pending, mut messages) = super::history::open_ordered(&stream, config, READER).await?;
    if pending == 0 {
        liveness.mark_caught_up();
    }
    while let Some(message) = messages.next().await {
        let message = message.map_err(|err| consumer_error(err.into()))?;
        let info = message.info().map_err(|err| consumer_error(err.to_string().into()))?;
        let (published, caught_up) = (info.published, info.pending == 0);
        match subject::parse_device_heartbeat(&message.subject) {
            Some(device_id) => {
                // The server's time dates it: any value on a device's key shows that something
                // holding the device's credentials is alive, even one this version cannot read.
                if let Err(err) = serde_json::from_slice::<Heartbeat>(&message.payload) {
                    tracing::debug!(%device_id, error = %err, "a heartbeat this version cannot read");
                }
                liveness.record(device_id, published);
            }
            None => tracing::debug!(subject = %message.subject, "a liveness key that is no device id ignored"),
        }
        if caught_up {
            liveness.mark_caught_up();
        }
    }
    Ok(())
}
