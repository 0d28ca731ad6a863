//! Reading the events stream outside the projection consumer: the last orchestrator event of a
//! kind (what start-up checks the escrow key against), the whole history in order (what a
//! recovery folds), and one device's own events (what its timeline reads, [`DeviceEvents`], a
//! message get at a time).

use async_nats::jetstream::{self, consumer, stream};
use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::{AuditEnvelope, AuditKind};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::subject;
use futures::StreamExt;
use futures::future::BoxFuture;

use super::BusError;

/// One message of the history, owned.
#[derive(Debug, Clone)]
pub struct HistoryMessage {
    /// Its stream sequence.
    pub sequence: u64,
    /// Its subject.
    pub subject: String,
    /// When the stream stored it.
    pub published: DateTime<Utc>,
    /// Its bytes.
    pub payload: Vec<u8>,
    /// Its `Fleetlaps-Signature` header, if any.
    pub signature: Option<String>,
}

impl HistoryMessage {
    /// The message as the projections fold it.
    pub fn as_stream_message(&self) -> crate::projection::StreamMessage<'_> {
        crate::projection::StreamMessage {
            sequence: self.sequence,
            subject: &self.subject,
            published: self.published,
            payload: &self.payload,
            signature: self.signature.as_deref(),
        }
    }
}

/// The events stream as a history to read and record into, outside the projection consumer.
pub struct History {
    /// For recording.
    jetstream: jetstream::Context,
    /// The events stream.
    stream: stream::Stream,
}

impl History {
    /// The events stream (created or checked as [`super::ensure_events_stream`] does).
    pub async fn open(jetstream: &jetstream::Context) -> Result<Self, BusError> {
        Ok(Self {
            jetstream: jetstream.clone(),
            stream: super::ensure_events_stream(jetstream).await?,
        })
    }

    /// The last orchestrator event of `kind`, with its stream sequence (see [`last_audit_event`]).
    pub async fn last_audit_event(&self, kind: AuditKind) -> Result<Option<(u64, AuditEnvelope)>, BusError> {
        last_audit_event(&self.stream, kind).await
    }

    /// The attestations of verified signatures (`laps.audit.signatures_verified`) stored at or
    /// before `until` when given, with their stream sequences, as stored: not verified (a
    /// replay checks them, [`crate::attestation`]); and the stream's last sequence when they
    /// were read, past which none is.
    pub async fn attestations(&self, until: Option<DateTime<Utc>>) -> Result<(Vec<(u64, Vec<u8>)>, u64), BusError> {
        let end = self
            .stream
            .get_info()
            .await
            .map_err(|err| BusError::Stream { source: err.into() })?
            .state
            .last_sequence;
        let filter = subject::audit_event(AuditKind::SignaturesVerified);
        let mut found = Vec::new();
        let mut next = 1;
        // A message get at a time, as a device's events are read.
        while next <= end {
            let Some(message) = self.first_from(&filter, next).await? else {
                break;
            };
            if message.sequence > end || until.is_some_and(|until| message.time > until) {
                break;
            }
            next = message.sequence + 1;
            found.push((message.sequence, message.payload.to_vec()));
        }
        Ok((found, end))
    }

    /// The first message on `filter` at or after stream sequence `sequence`, if there is one: a
    /// message get, whose answer is a message or "none", never a wait.
    async fn first_from(
        &self,
        filter: &str,
        sequence: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, BusError> {
        match self.stream.get_first_raw_message_by_subject(filter, sequence).await {
            Ok(message) => Ok(Some(message)),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(BusError::Stream { source: err.into() }),
        }
    }

    /// Starts reading every message from the first.
    pub async fn reader(&self) -> Result<HistoryReader, BusError> {
        HistoryReader::open(&self.stream).await
    }

    /// Where orchestrator events are appended, signed with `signing_key`.
    pub fn journal(
        &self,
        signing_key: std::sync::Arc<fleetlaps_proto::signature::OrchestratorSigningKey>,
    ) -> super::JetStreamJournal {
        super::JetStreamJournal::new(self.jetstream.clone(), signing_key)
    }
}

/// One device's own events on the history (`laps.events.<device>.>`), as its timeline reads
/// them. Handlers reach it through this trait so they can be tested in-process; the only
/// implementation outside tests is [`History`]'s.
pub trait DeviceEvents: Send + Sync + 'static {
    /// The messages on the device's subjects after stream sequence `after` and at or before
    /// `until`, oldest first, at most `limit`; as stored, not verified.
    fn device_events<'a>(
        &'a self,
        device_id: &'a DeviceId,
        after: u64,
        until: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryMessage>, BusError>>;
}

impl DeviceEvents for History {
    /// Read one message at a time with the stream's message get, asking for the first message
    /// on the device's subjects at or after a sequence: each answer is a message or "none", so a
    /// read never waits for a message that may not come (an ordered consumer counts what it will
    /// deliver when it is made, and a 2.9 server's count for a filtered consumer can be more than
    /// it delivers, which held a timeline page until the request timed out).
    fn device_events<'a>(
        &'a self,
        device_id: &'a DeviceId,
        after: u64,
        until: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<HistoryMessage>, BusError>> {
        Box::pin(async move {
            let filter = format!("laps.events.{device_id}.>");
            let mut found = Vec::new();
            let mut next = after.saturating_add(1);
            while found.len() < limit && next <= until {
                let Some(message) = self.first_from(&filter, next).await? else {
                    break;
                };
                if message.sequence > until {
                    break;
                }
                next = message.sequence.saturating_add(1);
                found.push(HistoryMessage {
                    sequence: message.sequence,
                    subject: message.subject.to_string(),
                    published: message.time,
                    signature: super::signature_header(Some(&message.headers)).map(str::to_owned),
                    payload: message.payload.to_vec(),
                });
            }
            Ok(found)
        })
    }
}

/// Opens an ordered (ephemeral) consumer on `stream` with `config`; returns how many messages it
/// has pending and its messages. `name` names the reader in errors.
pub(super) async fn open_ordered(
    stream: &stream::Stream,
    config: consumer::pull::OrderedConfig,
    name: &str,
) -> Result<(u64, consumer::pull::Ordered), BusError> {
    let mut consumer = stream
        .create_consumer(config)
        .await
        .map_err(|err| reader_error(name, err.into()))?;
    let pending = consumer
        .info()
        .await
        .map_err(|err| reader_error(name, err.into()))?
        .num_pending;
    let messages = consumer
        .messages()
        .await
        .map_err(|err| reader_error(name, err.into()))?;
    Ok((pending, messages))
}

/// The error of the reader `name`.
pub(super) fn reader_error(name: &str, source: Box<dyn std::error::Error + Send + Sync>) -> BusError {
    BusError::Consumer {
        name: name.to_owned(),
        source,
    }
}

/// A message read by a consumer, owned.
fn history_message(message: &jetstream::Message) -> Result<HistoryMessage, Box<dyn std::error::Error + Send + Sync>> {
    let info = message.info().map_err(|err| err.to_string())?;
    let signature = super::signature_header(message.headers.as_ref()).map(str::to_owned);
    Ok(HistoryMessage {
        sequence: info.stream_sequence,
        subject: message.subject.to_string(),
        published: info.published,
        payload: message.payload.to_vec(),
        signature,
    })
}

/// How long a pull of the history reader waits at most. A replay reading a million messages
/// against nats-server 2.9 was seen to stop for a minute now and then, its pull answered by no
/// message until it expired (async-nats's ordered consumer asks for 30 s by default), then again:
/// a short expiry makes such a pull be asked again in seconds.
const HISTORY_PULL_EXPIRES: std::time::Duration = std::time::Duration::from_secs(2);

/// The name of [`HistoryReader`] in errors.
const HISTORY_READER: &str = "ordered history reader";

/// The whole history, read in order by an ordered (ephemeral) consumer.
pub struct HistoryReader {
    /// How many messages there were when reading started.
    total: u64,
    /// The messages.
    messages: consumer::pull::Ordered,
    /// How many were read so far.
    read: u64,
}

/// The last orchestrator event of `kind` on the events stream, if there is one, with its stream
/// sequence. A message there that does not decode is an error: the history is not what this
/// version reads.
pub async fn last_audit_event(
    stream: &stream::Stream,
    kind: AuditKind,
) -> Result<Option<(u64, AuditEnvelope)>, BusError> {
    let stream_error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Stream { source };
    let message = match stream
        .get_last_raw_message_by_subject(&subject::audit_event(kind))
        .await
    {
        Ok(message) => message,
        Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(err) => return Err(stream_error(err.into())),
    };
    let envelope = AuditEnvelope::from_json(&message.payload).map_err(|err| stream_error(err.into()))?;
    Ok(Some((message.sequence, envelope)))
}

impl HistoryReader {
    /// Starts reading the events stream from its first message.
    pub async fn open(stream: &stream::Stream) -> Result<Self, BusError> {
        let config = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            max_expires: HISTORY_PULL_EXPIRES,
            ..Default::default()
        };
        let (total, messages) = open_ordered(stream, config, HISTORY_READER).await?;
        Ok(Self {
            total,
            messages,
            read: 0,
        })
    }

    /// How many messages the history held when reading started.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The next message, or `None` once the messages there at the start are all read.
    pub async fn next(&mut self) -> Result<Option<HistoryMessage>, BusError> {
        if self.read >= self.total {
            return Ok(None);
        }
        let consumer_error = |source| reader_error(HISTORY_READER, source);
        let message: jetstream::Message = match self.messages.next().await {
            Some(message) => message.map_err(|err| consumer_error(err.into()))?,
            None => return Ok(None),
        };
        let history_message = history_message(&message).map_err(consumer_error)?;
        self.read += 1;
        Ok(Some(history_message))
    }
}
