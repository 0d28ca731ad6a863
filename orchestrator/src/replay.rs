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

use crate::bus::{self, History};
use crate::config::Config;
use crate::escrow::{self, EscrowKeyring};
use crate::projection::{ProjectionError, Projections};

/// How many messages a replay folds in one sled batch, as the live consumer folds what waits.
const REPLAY_BATCH: usize = 512;

/// Waits for the fold of a batch, if one is folding: how many messages it folded.
async fn finish(folding: Option<tokio::task::JoinHandle<Result<u64, ProjectionError>>>) -> anyhow::Result<u64> {
    let Some(folding) = folding else {
        return Ok(0);
    };
    match folding.await {
        Ok(folded) => Ok(folded?),
        Err(err) => std::panic::resume_unwind(err.into_panic()),
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
    let mut reader = history.reader().await?;
    let total = reader.total();
    let keyring = Arc::new(keyring);
    let (mut messages, mut last_sequence) = (0, 0);
    // The batch folding now (on the blocking pool), while the next is read and prechecked.
    let mut folding: Option<tokio::task::JoinHandle<Result<u64, ProjectionError>>> = None;
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
            last_sequence = read.last().map_or(last_sequence, |message| message.sequence);
            let prechecking = projections.clone();
            let (read, prechecked) = crate::on_blocking_pool(move || {
                let stream_messages: Vec<_> = read.iter().map(bus::HistoryMessage::as_stream_message).collect();
                let prechecked = prechecking.precheck(&stream_messages);
                (read, prechecked)
            })
            .await;
            messages += finish(folding.take()).await?;
            progress(messages, total);
            let (folder, keyring) = (projections.clone(), Arc::clone(&keyring));
            folding = Some(tokio::task::spawn_blocking(move || {
                let stream_messages: Vec<_> = read.iter().map(bus::HistoryMessage::as_stream_message).collect();
                folder.apply_prechecked(&stream_messages, prechecked?, keyring.as_ref())?;
                Ok(read.len() as u64)
            }));
        }
        if ended {
            break;
        }
    }
    messages += finish(folding.take()).await?;
    progress(messages, total);
    projections.flush().await?;
    Ok(ReplayReport {
        messages,
        last_sequence,
        digest: projections.digest()?,
    })
}
