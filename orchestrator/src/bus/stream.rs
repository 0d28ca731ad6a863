//! The event stream: created when missing, checked when present.

use async_nats::jetstream::{self, stream};
use fleetlaps_proto::subject;

use super::BusError;

/// Creates the events stream if it does not exist; if it does, checks that it holds the
/// subjects the orchestrator consumes and keeps messages for ever, and brings a stream made by
/// an older version up to date (the audit subjects, the maximum message size).
pub async fn ensure_events_stream(jetstream: &jetstream::Context) -> Result<stream::Stream, BusError> {
    let config = stream::Config {
        name: subject::EVENTS_STREAM.to_owned(),
        subjects: vec![subject::EVENTS_WILDCARD.to_owned(), subject::AUDIT_WILDCARD.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        // The stream is the history: nothing may remove messages from it.
        deny_delete: true,
        deny_purge: true,
        duplicate_window: std::time::Duration::from_secs(120),
        // JetStream refuses a larger message; the events are small (see `MAX_EVENT_BYTES`).
        max_message_size: subject::MAX_EVENT_BYTES,
        ..Default::default()
    };
    let wanted_subjects = config.subjects.clone();
    let mut stream = jetstream
        .get_or_create_stream(config)
        .await
        .map_err(|err| BusError::Stream { source: err.into() })?;
    let mut info = stream
        .info()
        .await
        .map_err(|err| BusError::Stream { source: err.into() })?
        .clone();
    // A stream made by an older version lacks the audit subjects: add them, keeping the rest.
    let missing: Vec<String> = wanted_subjects
        .iter()
        .filter(|wanted| !info.config.subjects.contains(wanted))
        .cloned()
        .collect();
    if !missing.is_empty() && info.config.subjects.iter().any(|s| s == subject::EVENTS_WILDCARD) {
        let mut updated = info.config.clone();
        updated.subjects.extend(missing);
        info = jetstream
            .update_stream(updated)
            .await
            .map_err(|err| BusError::Stream { source: err.into() })?;
        tracing::info!(subjects = ?info.config.subjects, "events stream subjects updated");
    }
    // A stream made before the bound existed takes any size: bound it. Existing messages stay.
    if info.config.max_message_size <= 0 || info.config.max_message_size > subject::MAX_EVENT_BYTES {
        let mut updated = info.config.clone();
        updated.max_message_size = subject::MAX_EVENT_BYTES;
        info = jetstream
            .update_stream(updated)
            .await
            .map_err(|err| BusError::Stream { source: err.into() })?;
        tracing::info!(
            max_message_size = info.config.max_message_size,
            "events stream message size bounded"
        );
    }
    if !wanted_subjects
        .iter()
        .all(|wanted| info.config.subjects.contains(wanted))
    {
        return Err(BusError::StreamMismatch {
            stream: subject::EVENTS_STREAM,
            problem: format!(
                "subjects are {:?}, expected to include {:?}",
                info.config.subjects, wanted_subjects
            ),
        });
    }
    if info.config.max_age != std::time::Duration::ZERO || info.config.max_messages > 0 {
        return Err(BusError::StreamMismatch {
            stream: subject::EVENTS_STREAM,
            problem: "it expires or limits messages, but the history must be kept whole".to_owned(),
        });
    }
    Ok(stream)
}

/// The stream's last sequence now; 0 when it holds no message. The projections must reach the
/// value read at start before the API trusts them ([`crate::health`]).
pub async fn last_sequence(stream: &mut stream::Stream) -> Result<u64, BusError> {
    let info = stream
        .info()
        .await
        .map_err(|err| BusError::Stream { source: err.into() })?;
    Ok(info.state.last_sequence)
}
