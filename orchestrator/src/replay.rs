//! `fleetlaps-orchestrator replay`: rebuilds every projection from the history into a fresh
//! directory, with the same fold as the live consumer, optionally only up to an instant
//! (`--until`): the state as it was then, for an investigation. A replay of the whole history
//! has the live projections' digest.
//!
//! It takes the orchestrator's attestations of the signatures it verified
//! ([`crate::attestation`]) instead of checking each one again, and starts again checking every
//! signature when one of them does not hold; `--verify-every-signature` takes none.
//!
//! It only reads: the history (an ordered consumer) and the escrow key file (backups are trial
//! opened as the live fold opens them); it takes no lock, so it runs beside a live orchestrator.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::AuditKind;
use tokio::sync::mpsc;

use crate::attestation::{Attestations, Broken, DigestCheck};
use crate::bus::{self, History, HistoryMessage, HistoryReader};
use crate::config::Config;
use crate::escrow::{self, EscrowKeyring};
use crate::projection::{Outcome, Prechecked, ProjectionError, Projections};

/// How many messages a replay folds in one sled batch: the more, the fewer sled writes and reads
/// of the records many of them touch (1,024 took about a fifth less CPU than 512 over a million
/// messages, `cargo xtask bench`).
const REPLAY_BATCH: usize = 1024;
/// How many batches read the reader may hold before the precheck takes them.
const READ_AHEAD: usize = 4;

/// Messages read, in order, and the precheck of each.
type PrecheckedBatch = (Vec<HistoryMessage>, Result<Prechecked, ProjectionError>);

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages folded.
    pub messages: u64,
    /// The stream sequence of the last message folded; 0 when none was.
    pub last_sequence: u64,
    /// The replayed projections' digest ([`Projections::digest`]).
    pub digest: String,
    /// Messages whose signatures were taken from the orchestrator's attestations, not checked.
    pub attested: u64,
    /// The attestation that did not hold, when the replay started again checking every
    /// signature.
    pub restarted: Option<Broken>,
}

/// Replays the history into `out` (a new or empty directory), up to and including the last
/// message stored at or before `until` when given, taking the orchestrator's attestations of
/// verified signatures unless `verify_every_signature`; `progress(read, total)` follows it.
pub async fn replay(
    config: &Config,
    out: &Path,
    until: Option<DateTime<Utc>>,
    verify_every_signature: bool,
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
    let keyring = Arc::new(keyring);
    let (jetstream, _) = bus::connect(config).await?;
    let history = History::open(&jetstream).await?;
    let attestations = if verify_every_signature {
        Attestations::default()
    } else {
        let (found, end) = history.attestations(until).await?;
        Attestations::from_history(
            found.iter().map(|(sequence, payload)| (*sequence, payload.as_slice())),
            end,
        )
    };
    let replayed = replay_into(config, out, &history, until, &keyring, attestations, &mut progress).await?;
    let broken = match replayed {
        Ok(report) => return Ok(report),
        Err(broken) => broken,
    };
    tracing::warn!(%broken, "an attestation of verified signatures does not hold: replaying again, checking every signature");
    for entry in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("emptying {} to replay again", out.display()))?;
    }
    let again = replay_into(
        config,
        out,
        &history,
        until,
        &keyring,
        Attestations::default(),
        &mut progress,
    )
    .await?;
    let mut report =
        again.map_err(|broken| anyhow::anyhow!("a replay that takes no attestation broke one: {broken}"))?;
    report.restarted = Some(broken);
    Ok(report)
}

/// One replay into `out` with `attestations`: `Ok(Err(..))` when one of them does not hold
/// (the projections in `out` are then not to be used).
async fn replay_into(
    config: &Config,
    out: &Path,
    history: &History,
    until: Option<DateTime<Utc>>,
    keyring: &Arc<EscrowKeyring>,
    attestations: Attestations,
    progress: &mut impl FnMut(u64, u64),
) -> anyhow::Result<Result<ReplayReport, Broken>> {
    let projections = Projections::open(out)
        .with_context(|| format!("opening sled db at {}", out.display()))?
        .with_quarantine_max_entries(config.quarantine.max_entries);
    let reader = history.reader().await?;
    let total = reader.total();
    let attestations = Arc::new(attestations);
    // Three stages at once: reading, prechecking (both cores), folding (one thread, on the
    // blocking pool). The reader may run a few batches ahead, so the stream's delivery is not
    // held up by a batch that folds slowly.
    let (read_tx, read_rx) = mpsc::channel(READ_AHEAD);
    let (prechecked_tx, mut prechecked_rx) = mpsc::channel(1);
    let reading = tokio::spawn(read_batches(reader, until, attestations.digest_check(), read_tx));
    let prechecking = tokio::spawn(precheck_batches(
        projections.clone(),
        Arc::clone(&attestations),
        read_rx,
        prechecked_tx,
    ));
    let (mut messages, mut last_sequence, mut attested) = (0, 0, 0);
    // The attestations whose own message has not folded yet as a signed orchestrator event.
    let mut unconfirmed: BTreeSet<u64> = attestations.sequences().collect();
    let mut broken = None;
    while let Some((read, prechecked)) = prechecked_rx.recv().await {
        last_sequence = read.last().map_or(last_sequence, |message| message.sequence);
        let (folder, keyring) = (projections.clone(), Arc::clone(keyring));
        let (read, outcomes) = crate::on_blocking_pool(move || {
            let stream_messages: Vec<_> = read.iter().map(HistoryMessage::as_stream_message).collect();
            let outcomes = folder.apply_prechecked(&stream_messages, prechecked?, keyring.as_ref());
            Ok::<_, ProjectionError>((read, outcomes?))
        })
        .await?;
        for (message, applied) in read.iter().zip(&outcomes) {
            attested += u64::from(attestations.attested(message.sequence));
            if !unconfirmed.remove(&message.sequence) {
                continue;
            }
            if !matches!(
                applied.outcome,
                Outcome::Recorded(AuditKind::SignaturesVerified) | Outcome::Duplicate
            ) {
                broken.get_or_insert(Broken::Unsigned {
                    sequence: message.sequence,
                });
            }
        }
        messages += read.len() as u64;
        progress(messages, total);
        if broken.is_some() {
            break;
        }
    }
    // Stops the stages still running, and waits for them to let go of the projections.
    drop(prechecked_rx);
    let read = crate::joined(reading).await?;
    crate::joined(prechecking).await;
    if let Some(broken) = broken.or(read.err()) {
        return Ok(Err(broken));
    }
    if let Some(&sequence) = unconfirmed.first() {
        return Ok(Err(Broken::Unsigned { sequence }));
    }
    projections.flush().await?;
    Ok(Ok(ReplayReport {
        messages,
        last_sequence,
        digest: projections.digest()?,
        attested,
        restarted: None,
    }))
}

/// Reads the history in batches of [`REPLAY_BATCH`], up to the last message stored at or before
/// `until` when given, into `batches`, checking the attested runs' digests as it goes: `Err`
/// from the first that does not hold, and it reads no further. Stops early when nobody takes
/// the batches any more.
async fn read_batches(
    mut reader: HistoryReader,
    until: Option<DateTime<Utc>>,
    mut check: DigestCheck,
    batches: mpsc::Sender<Vec<HistoryMessage>>,
) -> anyhow::Result<Result<(), Broken>> {
    let mut batch = Vec::with_capacity(REPLAY_BATCH);
    loop {
        let next = reader.next().await?;
        let ended = match &next {
            None => true,
            Some(message) => until.is_some_and(|until| message.published > until),
        };
        if !ended && let Some(message) = next {
            if let Err(broken) = check.add(&message.as_stream_message()) {
                return Ok(Err(broken));
            }
            batch.push(message);
        }
        if batch.len() == REPLAY_BATCH || (ended && !batch.is_empty()) {
            let read = std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH));
            if batches.send(read).await.is_err() {
                return Ok(Ok(()));
            }
        }
        if ended {
            return Ok(check.finish());
        }
    }
}

/// Prechecks each batch from `batches` on the blocking pool ([`Projections::precheck_attested`])
/// into `prechecked`, in order.
async fn precheck_batches(
    projections: Projections,
    attestations: Arc<Attestations>,
    mut batches: mpsc::Receiver<Vec<HistoryMessage>>,
    prechecked: mpsc::Sender<PrecheckedBatch>,
) {
    while let Some(read) = batches.recv().await {
        let (prechecking, attestations) = (projections.clone(), Arc::clone(&attestations));
        let checked = crate::on_blocking_pool(move || {
            let stream_messages: Vec<_> = read.iter().map(HistoryMessage::as_stream_message).collect();
            let checked = prechecking.precheck_attested(&stream_messages, &attestations);
            (read, checked)
        })
        .await;
        if prechecked.send(checked).await.is_err() {
            return;
        }
    }
}
