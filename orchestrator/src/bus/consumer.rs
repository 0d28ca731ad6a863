//! The projection consumer: a durable pull consumer on the events stream that folds each batch
//! into sled, flushes, and only then acknowledges.
//!
//! Invariant: a message is acknowledged only after its effect on the projections is durable.
//! Position: the projections record the last stream sequence they hold. On start, if the durable
//! consumer's position differs from it (the sled directory was deleted, or a crash fell between
//! the flush and the ack), the consumer is recreated to deliver from the sequence after it: that
//! is how a deleted projection is rebuilt by replay.
//! Failure: a batch the projections cannot take is not acknowledged; the consumer reports it in
//! [`Health`], pauses, re-binds at the projections' position and tries again. It never stops the
//! orchestrator.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, AuditKind, SignaturesVerified};
use fleetlaps_proto::command::{BackupOutcome, CurrentPasswordVersion};
use fleetlaps_proto::event::EventKind;
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::seal::EscrowPublicKey;
use fleetlaps_proto::signature::OrchestratorSigningKey;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::attestation::Window;
use crate::detectors::{DetectorBatch, DetectorFeed, Observation};
use crate::escrow::EscrowKeyring;
use crate::health::Health;
use crate::metrics::{IngestOutcome, Metrics};
use crate::projection::{Outcome, Prechecked, ProjectionError, Projections, StreamMessage};

/// A failure of the bus (not of a message: those are quarantined).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// NATS could not be reached.
    #[error("connecting to NATS at {url}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The nkey seed file could not be used; nothing was sent.
    #[error("nats.nkey_seed_file")]
    NkeySeed(#[from] crate::nats_auth::SeedFileError),
    /// The stream could not be created or read.
    #[error("events stream")]
    Stream {
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The existing stream is not what the orchestrator needs.
    #[error("stream {stream} exists but {problem}")]
    StreamMismatch {
        /// The stream's name.
        stream: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The consumer could not be created or read.
    #[error("durable consumer {name}")]
    Consumer {
        /// The consumer's name.
        name: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An orchestrator event could not be recorded.
    #[error("recording to the history")]
    Journal {
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The projections failed; the batch was not acknowledged.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

/// The running consumer's parts.
pub struct Consumer {
    /// Where events are folded.
    projections: Projections,
    /// Counters for what each message did.
    metrics: Metrics,
    /// The durable pull consumer.
    consumer: jetstream::consumer::Consumer<pull::Config>,
    /// For backup confirmations and password versions to devices.
    jetstream: jetstream::Context,
    /// Tries backups' sealed passwords, so only a backup that opens is confirmed.
    escrow: Arc<EscrowKeyring>,
    /// The offline recovery key devices also seal to, if one is configured.
    recovery_public_key: Option<EscrowPublicKey>,
    /// Signs the clone reports this consumer records on the history.
    signing_key: Arc<OrchestratorSigningKey>,
    /// The stream, to re-bind the consumer after a failure.
    stream: stream::Stream,
    /// The durable consumer's name.
    name: String,
    /// Where failures and recoveries are reported.
    health: Arc<Health>,
    /// The detectors, fed after each flushed batch, when any is on.
    detectors: Option<DetectorFeed>,
    /// Wakes the campaign runner when a rotation was the last a running campaign waited for, so
    /// its end is recorded without waiting for the runner's next round.
    campaign_wake: Arc<tokio::sync::Notify>,
    /// Messages folded between two attestations (`history.signatures_verified_every`).
    signatures_verified_every: u64,
    /// The run folded since the last attestation; taken by the batch folding, put back once it
    /// is durable (a batch that fails leaves a new run).
    window: std::sync::Mutex<Window>,
}

/// What the consumer needs besides the stream: where to fold, what to count, which keys.
pub struct ConsumerParts {
    /// Where events are folded.
    pub projections: Projections,
    /// Counters.
    pub metrics: Metrics,
    /// The escrow keys backups must open with; the current one is the key devices seal to.
    pub escrow: Arc<EscrowKeyring>,
    /// The offline recovery key, if one is configured.
    pub recovery_public_key: Option<EscrowPublicKey>,
    /// The orchestrator's key, which signs the clone reports recorded on the history.
    pub signing_key: Arc<OrchestratorSigningKey>,
    /// Where the consumer reports failing and folding again.
    pub health: Arc<Health>,
    /// The detectors' feed, when any detector is on.
    pub detectors: Option<DetectorFeed>,
    /// The campaign runner's wake-up, notified when a rotation completes a running campaign.
    pub campaign_wake: Arc<tokio::sync::Notify>,
    /// Messages folded between two attestations (`history.signatures_verified_every`).
    pub signatures_verified_every: u64,
}

/// The durable consumer `name` on `stream`, delivering from the message after `last_applied`:
/// the existing one if it stands exactly there, else a new one (the old is deleted).
async fn open_at(
    stream: &stream::Stream,
    name: &str,
    last_applied: u64,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    let consumer_error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Consumer {
        name: name.to_owned(),
        source,
    };
    if let Ok(mut consumer) = stream.get_consumer::<pull::Config>(name).await {
        let info = consumer.info().await.map_err(|err| consumer_error(err.into()))?;
        if info.ack_floor.stream_sequence == last_applied && info.delivered.stream_sequence == last_applied {
            return Ok(consumer);
        }
        tracing::info!(
            consumer = name,
            ack_floor = info.ack_floor.stream_sequence,
            last_applied,
            "consumer and projections differ; replaying from the projections' position"
        );
        stream
            .delete_consumer(name)
            .await
            .map_err(|err| consumer_error(err.into()))?;
    }
    let deliver_policy = if last_applied == 0 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: last_applied + 1,
        }
    };
    let config = pull::Config {
        durable_name: Some(name.to_owned()),
        deliver_policy,
        ack_policy: jetstream::consumer::AckPolicy::All,
        ack_wait: Duration::from_secs(30),
        // Every subject of the stream: devices' events and the orchestrator's own.
        ..Default::default()
    };
    stream
        .create_consumer(config)
        .await
        .map_err(|err| consumer_error(err.into()))
}

/// At most this many messages already waiting are folded at once; one flush and one
/// acknowledgement cover them all. Two batches are out at once (one folding, the next fetched
/// meanwhile), so twice this stays below the consumer's `max_ack_pending` (1,000 by default): a
/// pull asking for more than the server may deliver unacknowledged waits for them forever.
const BATCH_SIZE: usize = 496;
/// How long the consumer waits for a message when none is waiting, before it asks again: short,
/// so a request lost with a restarted server stalls it little.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// How long a pull may go unanswered before it is given up and the consumer re-bound at the
/// projections' position: a server that stops or restarts forgets the pulls it held, and a pull
/// for what is already waiting has no expiry of its own, so without this deadline the consumer
/// would wait for its answer for ever. Longer than [`FETCH_WAIT`] and the client's own grace on it.
const PULL_DEADLINE: Duration = Duration::from_secs(10);
/// The pause after the first failed batch; it doubles with each failure in a row.
const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause between two attempts at a failing batch.
const LAST_RETRY_PAUSE: Duration = Duration::from_secs(8);

impl Consumer {
    /// Binds the durable consumer `name` on `stream` at the projections' position.
    pub async fn bind(
        stream: &stream::Stream,
        name: &str,
        jetstream: &jetstream::Context,
        parts: ConsumerParts,
    ) -> Result<Self, BusError> {
        let ConsumerParts {
            projections,
            metrics,
            escrow,
            recovery_public_key,
            signing_key,
            health,
            detectors,
            campaign_wake,
            signatures_verified_every,
        } = parts;
        let last_applied = projections.last_applied_sequence()?;
        let consumer = open_at(stream, name, last_applied).await?;
        metrics
            .projection_last_sequence
            .set(i64::try_from(last_applied).unwrap_or(i64::MAX));
        Ok(Self {
            projections,
            metrics,
            consumer,
            stream: stream.clone(),
            name: name.to_owned(),
            jetstream: jetstream.clone(),
            escrow,
            recovery_public_key,
            signing_key,
            health,
            detectors,
            campaign_wake,
            signatures_verified_every,
            window: std::sync::Mutex::default(),
        })
    }

    /// Consumes until `shutdown` is cancelled. Nothing stops it: NATS trouble is retried, and a
    /// batch the projections cannot take (a full disk, a sled error) is left unacknowledged,
    /// reported in [`Health`], and retried from the projections' position with a growing pause,
    /// while the API keeps serving.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pause = FIRST_RETRY_PAUSE;
        // The next batch, fetched and prechecked while the one before it folded.
        let mut fetched = None;
        loop {
            let batch = match fetched.take() {
                Some(batch) => batch,
                None => tokio::select! {
                    () = shutdown.cancelled() => return,
                    batch = self.fetch_prechecked() => batch,
                },
            };
            let failed = match batch {
                Ok(batch) if batch.messages.is_empty() => None,
                Ok(batch) => {
                    // The next batch is fetched and prechecked while this one folds; a batch
                    // that fails leaves it unused (the consumer is re-bound below).
                    let next = async {
                        tokio::select! {
                            () = shutdown.cancelled() => None,
                            batch = self.fetch_prechecked() => Some(batch),
                        }
                    };
                    let (processed, next) = tokio::join!(self.process(batch), next);
                    let Some(next) = next else { return };
                    fetched = processed.is_ok().then_some(next);
                    processed.err()
                }
                Err(err) => {
                    tracing::warn!(error = %err, "fetching events failed; retrying");
                    Some(BusError::Consumer {
                        name: self.name.clone(),
                        source: err,
                    })
                }
            };
            let Some(err) = failed else {
                self.health.consumer_succeeded();
                pause = FIRST_RETRY_PAUSE;
                continue;
            };
            tracing::error!(
                error = %err,
                details = ?err,
                retry_in_secs = pause.as_secs(),
                "the consumer failed; the batch stays unacknowledged and is retried"
            );
            self.health.consumer_failed(&err);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(LAST_RETRY_PAUSE);
            if let Err(err) = self.reopen().await {
                tracing::warn!(error = %err, "re-binding the consumer at the projections' position failed; retrying");
                self.health.consumer_failed(&err);
            }
        }
    }

    /// Re-binds the durable consumer at the projections' position, so the messages of a failed
    /// batch that were not folded are delivered again now rather than after the ack wait.
    async fn reopen(&mut self) -> Result<(), BusError> {
        let last_applied = self.projections.last_applied_sequence()?;
        self.consumer = open_at(&self.stream, &self.name, last_applied).await?;
        Ok(())
    }

    /// The next batch: every message already waiting (up to [`BATCH_SIZE`]) at once, or, when
    /// none waits, the next one the moment it arrives. So a lone write (an enrollment, a token, a
    /// backup its device waits on) is folded as soon as it is stored, and only what has piled up
    /// meanwhile is batched. A pull unanswered within [`PULL_DEADLINE`] is an error, so the
    /// consumer is re-bound rather than left waiting on a server that forgot it.
    async fn fetch(&self) -> Result<Vec<jetstream::Message>, async_nats::Error> {
        match tokio::time::timeout(PULL_DEADLINE, self.pull()).await {
            Ok(messages) => messages,
            Err(_) => Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "NATS did not answer a pull within {} s (a restarted server forgets the pulls it held)",
                    PULL_DEADLINE.as_secs()
                ),
            ))),
        }
    }

    /// [`Self::fetch`], then the batch's [`Projections::precheck`] on the blocking pool: the
    /// signatures checked and the envelopes decoded on every core, while the batch before it
    /// folds.
    async fn fetch_prechecked(&self) -> Result<Fetched, async_nats::Error> {
        let messages = self.fetch().await?;
        if messages.is_empty() {
            return Ok(Fetched {
                messages,
                prechecked: None,
            });
        }
        let projections = self.projections.clone();
        let (messages, prechecked) = crate::on_blocking_pool(move || {
            let (_, stream_messages) = stream_messages(&messages);
            let prechecked = projections.precheck(&stream_messages);
            (messages, prechecked)
        })
        .await;
        Ok(Fetched {
            messages,
            // A precheck the store failed to make is made again in the fold.
            prechecked: prechecked.ok(),
        })
    }

    /// [`Self::fetch`] without its deadline.
    async fn pull(&self) -> Result<Vec<jetstream::Message>, async_nats::Error> {
        let waiting = self.consumer.fetch().max_messages(BATCH_SIZE).messages().await?;
        let messages = collect(waiting).await?;
        if !messages.is_empty() {
            return Ok(messages);
        }
        let next = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(FETCH_WAIT)
            .messages()
            .await?;
        collect(next).await
    }

    async fn process(&self, Fetched { messages, prechecked }: Fetched) -> Result<(), BusError> {
        let started = Instant::now();
        let mut last_sequence = None;
        let mut confirmations = Vec::new();
        let mut touched = BTreeSet::new();
        let mut caught_up = false;
        let mut escrow_key_created = false;
        let mut observations = Vec::new();
        let mut published_times = Vec::with_capacity(messages.len());
        let mut rotations = Vec::new();
        let mut pending = None;
        // The fold is CPU work (signatures, sled): on the blocking pool, so the API's requests
        // are not kept waiting behind a batch.
        let projections = self.projections.clone();
        let escrow = Arc::clone(&self.escrow);
        let mut window = std::mem::take(&mut *self.window());
        let (messages, folded, window) = crate::on_blocking_pool(move || {
            let folded = fold_batch(&projections, escrow.as_ref(), &messages, prechecked, &mut window);
            (messages, folded, window)
        })
        .await;
        let folded = folded?;
        for Folded {
            index,
            sequence,
            published,
            pending: waiting,
            applied,
        } in folded
        {
            let message = &messages[index];
            let subject = message.subject.as_str();
            published_times.push(published);
            pending = Some(waiting);
            caught_up = waiting == 0;
            self.record(applied.outcome, sequence, subject);
            rotations.extend(applied.rotation);
            if applied.out_of_order {
                self.metrics.events_out_of_order.inc();
                tracing::warn!(
                    stream_sequence = sequence,
                    subject,
                    "device event older than its device's newest one: a clone or an unnoticed rollback"
                );
            }
            if let Some(clone) = &applied.clone {
                tracing::warn!(
                    device_id = %clone.device_id,
                    source = %clone.source.instance,
                    other = %clone.other.instance,
                    "two running copies of one device (a cloned image): both are kept; the clone is recorded"
                );
            }
            if self.detectors.is_some()
                && let Some(observation) = observe(applied.outcome, published, &message.payload)
            {
                observations.push(observation);
            }
            escrow_key_created |= applied.outcome == Outcome::Recorded(AuditKind::EscrowKeyCreated);
            confirmations.extend(applied.confirmation);
            touched.extend(applied.device_id);
            last_sequence = Some(sequence);
        }
        self.projections.flush().await?;
        *self.window() = window;
        let durable_at = chrono::Utc::now();
        // Counted once durable: a batch that fails is folded again and must not count twice.
        for rotation in &rotations {
            self.metrics.rotation_confirmed(rotation);
        }
        if rotations.iter().any(|rotation| rotation.completes_a_campaign) {
            self.campaign_wake.notify_one();
        }
        for published in published_times {
            self.metrics
                .ingest_lag
                .observe((durable_at - published).as_seconds_f64().max(0.0));
        }
        if let Some(pending) = pending {
            self.metrics
                .consumer_pending
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
        if let Some(last) = messages.last() {
            // AckPolicy::All: acknowledging the last message acknowledges the whole batch.
            if let Err(err) = last.ack_with(AckKind::Ack).await {
                tracing::warn!(error = %err, "acknowledging a batch failed; it will be redelivered and skipped");
            }
        }
        // Only now, with the projections durable, may devices change their accounts.
        let client = self.jetstream.client();
        for confirmation in confirmations {
            let outcome = match &confirmation.outcome {
                BackupOutcome::Stored => crate::metrics::BACKUP_STORED,
                BackupOutcome::Refused { reason, .. } => reason.as_str(),
            };
            self.metrics.backups_confirmed.with_label_values(&[outcome]).inc();
            let subject = fleetlaps_proto::subject::device_confirmations(&confirmation.device_id);
            let payload = serde_json::to_vec(&confirmation).expect("a confirmation serialises");
            if let Err(err) = client.publish(subject, payload.into()).await {
                tracing::warn!(error = %err, "sending a backup confirmation failed; the device reads its password version or re-sends");
            }
        }
        if escrow_key_created {
            // A new escrow key: every device learns it from its password version and seals to it
            // from its next rotation.
            touched.extend(self.projections.devices()?.into_iter().map(|device| device.device_id));
        }
        self.publish_password_versions(&touched).await;
        if let Some(sequence) = last_sequence {
            self.metrics
                .projection_last_sequence
                .set(i64::try_from(sequence).unwrap_or(i64::MAX));
        }
        if caught_up {
            self.report_clones().await?;
        }
        let due = self.window().take_due(self.signatures_verified_every);
        for attestation in due {
            self.attest(attestation).await;
        }
        if let Some(detectors) = &self.detectors {
            detectors
                .send(DetectorBatch {
                    observations,
                    caught_up,
                })
                .await;
        }
        self.metrics
            .consumer_batch_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Records on the history every clone detected and not yet reported. Only once caught up:
    /// during a rebuild, a report already on the stream comes later and clears its due entry.
    /// The `Nats-Msg-Id` names the evidence, so a report sent twice in a row is stored once.
    async fn report_clones(&self) -> Result<(), BusError> {
        for clone in self.projections.due_clone_reports()? {
            let message_id = format!("clone-{}", clone.evidence_event_id);
            let envelope = AuditEnvelope::new(chrono::Utc::now(), AuditEvent::DeviceCloneDetected(clone));
            let (subject, message) = super::journal::signed_audit_message(&self.signing_key, &envelope, message_id);
            let sent = self.jetstream.send_publish(subject, message).await;
            if let Err(err) = match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(async_nats::Error::from),
                Err(err) => Err(err.into()),
            } {
                tracing::warn!(error = %err, "recording a detected clone failed; retried after the next batch");
            }
        }
        Ok(())
    }

    /// The run folded since the last attestation.
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records on the history that the signatures of a run of messages were verified
    /// ([`crate::attestation`]). The `Nats-Msg-Id` names the run, so one sent twice is stored
    /// once; one that fails to be recorded leaves its run for a replay to check itself.
    async fn attest(&self, attestation: SignaturesVerified) {
        let message_id = format!(
            "signatures-verified-{}-{}",
            attestation.from_sequence, attestation.through_sequence
        );
        let envelope = AuditEnvelope::new(chrono::Utc::now(), AuditEvent::SignaturesVerified(attestation));
        let (subject, message) = super::journal::signed_audit_message(&self.signing_key, &envelope, message_id);
        let sent = match self.jetstream.send_publish(subject, message).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(async_nats::Error::from),
            Err(err) => Err(err.into()),
        };
        if let Err(err) = sent {
            tracing::warn!(error = %err, "recording an attestation of verified signatures failed; a replay checks those messages itself");
        }
    }

    /// Publishes the centre's view of each device in `device_ids` for it to compare with its own.
    async fn publish_password_versions(&self, device_ids: &BTreeSet<DeviceId>) {
        let mut versions = Vec::with_capacity(device_ids.len());
        for device_id in device_ids {
            let device = match self.projections.device(device_id) {
                Ok(Some(device)) => device,
                Ok(None) => continue,
                Err(err) => {
                    tracing::warn!(%device_id, error = %err, "reading a device for its current password version failed; it is published again at the device's next event");
                    continue;
                }
            };
            versions.push(CurrentPasswordVersion {
                device_id: device_id.clone(),
                rotation_id: device.current_rotation,
                position: device.last_position(),
                latest_backup: device.latest_backup,
                escrow_public_key: self.escrow.public_key(),
                escrow_recovery_public_key: self.recovery_public_key,
                clone_detected: device.clone.is_some(),
            });
        }
        let outcomes = super::publish_password_versions(&self.jetstream, &versions).await;
        for (version, outcome) in versions.iter().zip(outcomes) {
            if let Err(err) = outcome {
                tracing::warn!(device_id = %version.device_id, error = %err, "publishing the current password version failed; it is published again at the device's next event");
            }
        }
    }

    fn record(&self, outcome: Outcome, stream_sequence: u64, subject: &str) {
        match outcome {
            Outcome::Applied(kind) => {
                if kind == EventKind::ImageRollbackDetected {
                    self.metrics.image_rollbacks.inc();
                    tracing::warn!(
                        stream_sequence,
                        subject,
                        "a device reported an image rollback and rotates"
                    );
                }
                self.metrics.ingested(kind.as_str(), IngestOutcome::Applied);
                tracing::debug!(stream_sequence, %kind, "event applied");
            }
            Outcome::Recorded(kind) => {
                if kind == AuditKind::DeviceCloneDetected {
                    self.metrics.device_clones_detected.inc();
                }
                self.metrics.ingested(kind.as_str(), IngestOutcome::Applied);
                tracing::debug!(stream_sequence, %kind, "orchestrator event recorded");
            }
            Outcome::Duplicate => {
                self.metrics.ingested(kind_label(subject), IngestOutcome::Duplicate);
                tracing::debug!(stream_sequence, "duplicate event skipped");
            }
            Outcome::AlreadySeen => {}
            Outcome::Quarantined(reason) => {
                self.metrics.ingested(kind_label(subject), IngestOutcome::Quarantined);
                self.metrics
                    .events_quarantined
                    .with_label_values(&[reason.as_str()])
                    .inc();
                // Never the payload: it may hold anything, a password included.
                tracing::warn!(stream_sequence, subject, %reason, "event quarantined");
            }
        }
    }
}

/// One message of a batch as folded: where it is in the batch, its stream metadata, and what it did.
struct Folded {
    /// Its index in the batch.
    index: usize,
    /// Its stream sequence.
    sequence: u64,
    /// When the stream stored it.
    published: chrono::DateTime<chrono::Utc>,
    /// How many messages were still waiting after it.
    pending: u64,
    /// What folding it did.
    applied: crate::projection::Applied,
}

/// A fetched batch and, when the store could make them, its prechecks.
struct Fetched {
    /// The messages, in stream order.
    messages: Vec<jetstream::Message>,
    /// Their prechecks ([`Projections::precheck`]).
    prechecked: Option<Prechecked>,
}

/// The messages of a batch as the projections fold them, each with its index in the batch and
/// how many messages were still waiting after it; a message without JetStream metadata is
/// skipped.
fn stream_messages(messages: &[jetstream::Message]) -> (Vec<(usize, u64)>, Vec<StreamMessage<'_>>) {
    let mut placed = Vec::with_capacity(messages.len());
    let mut stream_messages = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let info = match message.info() {
            Ok(info) => info,
            Err(err) => {
                tracing::warn!(error = %err, "message without JetStream metadata; skipped");
                continue;
            }
        };
        let signature = super::signature_header(message.headers.as_ref());
        placed.push((index, info.pending));
        stream_messages.push(StreamMessage {
            sequence: info.stream_sequence,
            subject: message.subject.as_str(),
            published: info.published,
            payload: &message.payload,
            signature,
        });
    }
    (placed, stream_messages)
}

/// Folds `messages` into `projections` as one batch ([`Projections::apply_prechecked`], with
/// `prechecked` or prechecks made now).
fn fold_batch(
    projections: &Projections,
    escrow: &EscrowKeyring,
    messages: &[jetstream::Message],
    prechecked: Option<Prechecked>,
    window: &mut Window,
) -> Result<Vec<Folded>, ProjectionError> {
    let (placed, stream_messages) = stream_messages(messages);
    let prechecked = match prechecked {
        Some(prechecked) => prechecked,
        None => projections.precheck(&stream_messages)?,
    };
    // One sled batch for them all: far fewer log writes than one per message.
    let outcomes = projections.apply_prechecked(&stream_messages, prechecked, escrow)?;
    for (message, applied) in stream_messages.iter().zip(&outcomes) {
        if applied.outcome != Outcome::AlreadySeen {
            window.add(message, matches!(applied.outcome, Outcome::Quarantined(_)));
        }
    }
    Ok(placed
        .into_iter()
        .zip(stream_messages)
        .zip(outcomes)
        .map(|(((index, pending), message), applied)| Folded {
            index,
            sequence: message.sequence,
            published: message.published,
            pending,
            applied,
        })
        .collect())
}

/// Every message of a pull request's answer.
async fn collect(mut batch: pull::Batch) -> Result<Vec<jetstream::Message>, async_nats::Error> {
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        messages.push(message?);
    }
    Ok(messages)
}

/// The `kind` label of a message, from its subject: a device event's or an orchestrator event's
/// kind, or [`crate::metrics::UNKNOWN_KIND`].
fn kind_label(subject: &str) -> &'static str {
    if let Some((_, kind)) = fleetlaps_proto::subject::parse_device_event(subject) {
        kind.as_str()
    } else if let Some(kind) = fleetlaps_proto::subject::parse_audit_event(subject) {
        kind.as_str()
    } else {
        crate::metrics::UNKNOWN_KIND
    }
}

/// What the detectors watch in a message the projections took, if anything.
fn observe(outcome: Outcome, at: chrono::DateTime<chrono::Utc>, payload: &[u8]) -> Option<Observation> {
    match outcome {
        Outcome::Applied(kind @ (EventKind::AuthenticationSucceeded | EventKind::AuthenticationFailed)) => {
            let envelope = fleetlaps_proto::event::Envelope::from_json(payload).ok()?;
            let (fleetlaps_proto::event::Event::AuthenticationSucceeded(body)
            | fleetlaps_proto::event::Event::AuthenticationFailed(body)) = envelope.event
            else {
                return None;
            };
            Some(Observation::Authentication {
                event_id: envelope.id,
                device_id: envelope.device_id,
                at,
                succeeded: kind == EventKind::AuthenticationSucceeded,
                count: body.count,
            })
        }
        Outcome::Recorded(AuditKind::PasswordRead | AuditKind::BreachDetected | AuditKind::BreachDeclared) => {
            let envelope = AuditEnvelope::from_json(payload).ok()?;
            Observation::of_audit(&envelope.event, envelope.id, at)
        }
        _ => None,
    }
}
