//! `fleetlaps-orchestrator replay`: rebuilds every projection from the history into a fresh
//! directory, with the same fold as the live consumer, optionally only up to an instant
//! (`--until`): the state as it was then, for an investigation. A replay of the whole history
//! has the live projections' digest.
//!
//! It only reads: the history (an ordered consumer) and the escrow key file (backups are trial
//! opened as the live fold opens them); it takes no lock, so it runs beside a live orchestrator.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use tokio::sync::mpsc;

use crate::bus::{self, BusError, History, HistoryMessage, HistoryReader};
use crate::config::Config;
use crate::escrow::{self, EscrowKeyring};
use crate::projection::{Prechecked, ProjectionError, Projections};

/// How many messages a replay folds in one sled batch, as the live consumer folds what waits.
const REPLAY_BATCH: usize = 512;

/// Messages read, in order, and the precheck of each.
type PrecheckedBatch = (Vec<HistoryMessage>, Result<Prechecked, ProjectionError>);

/// Reads the history in batches of [`REPLAY_BATCH`], up to the last message stored at or before
/// `until` when given, into `batches`; stops early when nobody takes them any more.
async fn read_batches(
    mut reader: HistoryReader,
    until: Option<DateTime<Utc>>,
    batches: mpsc::Sender<Vec<HistoryMessage>>,
) -> Result<(), BusError> {
    let mut batch = Vec::with_capacity(REPLAY_BATCH);
    loop {
        let next = reader.next().await?;
        let ended = match &next {
            None => true,
            Some(message) => until.is_some_and(|until| message.published > until),
        };
        if !ended {
            batch.extend(next);
        }
        if batch.len() == REPLAY_BATCH || (ended && !batch.is_empty()) {
            let read = std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH));
            if batches.send(read).await.is_err() {
                return Ok(());
            }
        }
        if ended {
            return Ok(());
        }
    }
}

/// Prechecks each batch from `batches` on the blocking pool ([`Projections::precheck`]) into
/// `prechecked`, in order.
async fn precheck_batches(
    projections: Projections,
    mut batches: mpsc::Receiver<Vec<HistoryMessage>>,
    prechecked: mpsc::Sender<PrecheckedBatch>,
) {
    while let Some(read) = batches.recv().await {
        let prechecking = projections.clone();
        let checked = crate::on_blocking_pool(move || {
            let stream_messages: Vec<_> = read.iter().map(HistoryMessage::as_stream_message).collect();
            let checked = prechecking.precheck(&stream_messages);
            (read, checked)
        })
        .await;
        if prechecked.send(checked).await.is_err() {
            return;
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages folded.
    pub messages: u64,
    /// The stream sequence of the last message folded; 0 when none was.
    pub last_sequence: u64,
    /// The replayed projections' digest ([`Projections::digest`]).
    pub digest: String,
}

/// Replays the history into `out` (a new or empty directory), up to and including the last
/// message stored at or before `until` when given; `progress(read, total)` follows it.
pub async fn replay(
    config: &Config,
    out: &Path,
    until: Option<DateTime<Utc>>,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<ReplayReport> {
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
    {
        anyhow::bail!(
            "{} is not empty: a replay writes fresh projections into a new or empty directory",
            out.display()
        );
    }
    let key_path = escrow::key_path(config);
    let keyring = EscrowKeyring::read(&key_path)?.with_context(|| {
        format!(
            "no escrow key at {}: a replay opens backups on trial as the live orchestrator does, so it needs the key",
            key_path.display()
        )
    })?;
    let projections = Projections::open(out)
        .with_context(|| format!("opening sled db at {}", out.display()))?
        .with_quarantine_max_entries(config.quarantine.max_entries);
    let (jetstream, _) = bus::connect(config).await?;
    let history = History::open(&jetstream).await?;
    let reader = history.reader().await?;
    let total = reader.total();
    let keyring = Arc::new(keyring);
    // Three stages at once, each a batch ahead of the next: reading, prechecking (both cores),
    // folding (one thread, on the blocking pool).
    let (read_tx, read_rx) = mpsc::channel(1);
    let (prechecked_tx, mut prechecked_rx) = mpsc::channel(1);
    let reading = tokio::spawn(read_batches(reader, until, read_tx));
    let prechecking = tokio::spawn(precheck_batches(projections.clone(), read_rx, prechecked_tx));
    let (mut messages, mut last_sequence) = (0, 0);
    while let Some((read, prechecked)) = prechecked_rx.recv().await {
        last_sequence = read.last().map_or(last_sequence, |message| message.sequence);
        let (folder, keyring) = (projections.clone(), Arc::clone(&keyring));
        messages += crate::on_blocking_pool(move || {
            let stream_messages: Vec<_> = read.iter().map(HistoryMessage::as_stream_message).collect();
            folder.apply_prechecked(&stream_messages, prechecked?, keyring.as_ref())?;
            Ok::<_, ProjectionError>(read.len() as u64)
        })
        .await?;
        progress(messages, total);
    }
    // The fold took every batch the reader sent: a read that failed ended it early.
    joined(reading).await?;
    joined(prechecking).await;
    projections.flush().await?;
    Ok(ReplayReport {
        messages,
        last_sequence,
        digest: projections.digest()?,
    })
}

/// What a task of the pipeline returned; its panic goes on.
async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(done) => done,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}
