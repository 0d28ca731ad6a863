//! Replay: `fleetlaps-orchestrator replay` rebuilding every projection from the whole events
//! stream into a fresh directory, against the baseline of an ordered consumer reading the same
//! stream (what the replay reads it with) and doing nothing with the messages.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use indicatif::ProgressBar;

use crate::fleet::{Device, Orchestrator};
use crate::report::{Quantity, Row};

const BENCHMARK: &str = "replay";

/// Reads the whole events stream with an ordered consumer, as the replay does, and returns how
/// many messages it read and the time taken.
pub(crate) async fn ordered_read(
    reader: &jetstream::Context,
    progress: &ProgressBar,
) -> anyhow::Result<(u64, Duration)> {
    let stream = reader
        .get_stream(fleetlaps_proto::subject::EVENTS_STREAM)
        .await
        .context("looking up the events stream")?;
    let total = crate::ingest::last_sequence(reader).await?;
    progress.set_length(total);
    let started = Instant::now();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            // As the replay's reader asks (`HISTORY_PULL_EXPIRES`).
            max_expires: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .context("creating the baseline's ordered consumer")?;
    let mut messages = consumer
        .messages()
        .await
        .context("reading the baseline's ordered consumer")?;
    let mut read = 0;
    while read < total {
        let message = messages
            .next()
            .await
            .with_context(|| format!("the stream ran dry after {read} of {total} messages"))?
            .map_err(|err| anyhow::anyhow!("reading an ordered message: {err}"))?;
        let sequence = message
            .info()
            .map_err(|err| anyhow::anyhow!("a message's info: {err}"))?
            .stream_sequence;
        read += 1;
        if sequence >= total {
            break;
        }
        if read % 1_000 == 0 {
            progress.set_position(read);
        }
    }
    progress.set_position(read);
    Ok((read, started.elapsed()))
}

/// Runs `fleetlaps-orchestrator replay` into a fresh directory under `work` (the orchestrator
/// stopped, so nothing is appended meanwhile), with `args` besides; the messages it reports and
/// the time from its start to its exit. Its own progress bar shows on this terminal.
pub(crate) fn replay(orchestrator: &Orchestrator, work: &std::path::Path, args: &[&str]) -> anyhow::Result<Replayed> {
    let out = work.join("replay-projections");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    let started = Instant::now();
    let output = Command::new(orchestrator.binary())
        .args(["replay", "--config"])
        .arg(orchestrator.config_path())
        .arg("--out")
        .arg(&out)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running fleetlaps-orchestrator replay")?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "fleetlaps-orchestrator replay failed ({}): {}",
            output.status,
            stdout.trim()
        );
    }
    // "replayed N message(s), up to stream sequence S, into DIR"
    let messages = stdout
        .lines()
        .find_map(|line| line.strip_prefix("replayed "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .with_context(|| format!("fleetlaps-orchestrator replay printed no count: {}", stdout.trim()))?;
    // "signatures taken from the orchestrator's attestations: N of M message(s)"
    let attested = stdout
        .lines()
        .find_map(|line| line.strip_prefix("signatures taken from the orchestrator's attestations: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .with_context(|| {
            format!(
                "fleetlaps-orchestrator replay printed no attested count: {}",
                stdout.trim()
            )
        })?;
    let storage = Storage::read(&out)?;
    let _ = std::fs::remove_dir_all(&out);
    Ok(Replayed {
        messages,
        attested,
        elapsed,
        storage,
    })
}

/// What a replay did.
pub(crate) struct Replayed {
    /// The messages it folded.
    pub(crate) messages: u64,
    /// Those whose signatures it took from the orchestrator's attestations.
    pub(crate) attested: u64,
    /// From its start to its exit.
    pub(crate) elapsed: Duration,
    /// What the projections it built hold.
    pub(crate) storage: Storage,
}

/// The projections a replay built: their disk usage, and the keys and values they hold by key
/// prefix (what the fold keeps, apart from what sled's log has not reclaimed yet).
pub(crate) struct Storage {
    /// Allocated bytes of the directory, as `du` counts them.
    pub(crate) on_disk: u64,
    /// Key and value bytes, by key prefix (`d/`, `e/`, …), largest first.
    pub(crate) by_prefix: Vec<(String, u64)>,
}

impl Storage {
    /// Reads the projections under `dir` (no orchestrator may have them open).
    fn read(dir: &std::path::Path) -> anyhow::Result<Self> {
        let on_disk = crate::footprint::disk_usage(dir)?;
        let db = sled::open(dir).with_context(|| format!("opening the replayed projections in {}", dir.display()))?;
        let tree = db.open_tree("projections").context("opening the projections' tree")?;
        let mut totals = std::collections::BTreeMap::<String, u64>::new();
        for entry in tree.iter() {
            let (key, value) = entry.context("reading the replayed projections")?;
            let prefix = match key.iter().position(|&byte| byte == b'/') {
                Some(slash) => String::from_utf8_lossy(&key[..=slash]).into_owned(),
                None => String::from_utf8_lossy(&key).into_owned(),
            };
            *totals.entry(prefix).or_default() += (key.len() + value.len()) as u64;
        }
        let mut by_prefix: Vec<(String, u64)> = totals.into_iter().collect();
        by_prefix.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
        Ok(Self { on_disk, by_prefix })
    }

    /// Every key and value byte.
    fn held(&self) -> u64 {
        self.by_prefix.iter().map(|(_, bytes)| bytes).sum()
    }
}

/// Tops the stream up to `events` messages with signed events of `devices` (the orchestrator
/// must be stopped); returns the stream's last sequence.
pub(crate) async fn top_up(
    simulator: &jetstream::Context,
    reader: &jetstream::Context,
    devices: &mut [Device],
    events: u64,
    progress: &ProgressBar,
) -> anyhow::Result<u64> {
    let last = crate::ingest::last_sequence(reader).await?;
    if last < events {
        crate::ingest::prefill(simulator, devices, events - last, progress).await?;
    }
    crate::ingest::last_sequence(reader).await
}

/// The report's rows and notes: `replayed` taking the orchestrator's attestations, `checked`
/// checking every signature.
pub(crate) fn rows(
    replayed: &Replayed,
    checked: &Replayed,
    baseline_messages: u64,
    baseline: Duration,
    stream_bytes: u64,
) -> (Vec<Row>, Vec<String>) {
    let (messages, attested, storage) = (replayed.messages, replayed.attested, &replayed.storage);
    let (checked_messages, checked_elapsed) = (checked.messages, checked.elapsed);
    let replayed = replayed.elapsed;
    let rate = |count: u64, duration: Duration| Quantity::EventsPerSecond(count as f64 / duration.as_secs_f64());
    let row = Row::new(
        BENCHMARK,
        &format!("fleetlaps-orchestrator replay, {messages} messages"),
        rate(messages, replayed),
        "ordered consumer reading the same stream",
        rate(baseline_messages, baseline),
        "ratio ≥ 0.5",
    );
    let checked_row = Row::new(
        BENCHMARK,
        &format!("fleetlaps-orchestrator replay --verify-every-signature, {checked_messages} messages"),
        rate(checked_messages, checked_elapsed),
        "ordered consumer reading the same stream",
        rate(baseline_messages, baseline),
        "—",
    );
    let per_message = |bytes: u64| Quantity::Bytes(bytes as f64 / messages.max(1) as f64);
    let stream_per_message = per_message(stream_bytes);
    let rows = vec![
        row,
        checked_row,
        Row::new(
            BENCHMARK,
            "replayed projections on disk, per message",
            per_message(storage.on_disk),
            "stream bytes per message",
            stream_per_message,
            "—",
        ),
        Row::new(
            BENCHMARK,
            "replayed projections' keys and values, per message",
            per_message(storage.held()),
            "stream bytes per message",
            stream_per_message,
            "—",
        ),
    ];
    let breakdown: Vec<String> = storage
        .by_prefix
        .iter()
        .take(8)
        .map(|(prefix, bytes)| format!("`{prefix}` {:.1} B", *bytes as f64 / messages.max(1) as f64))
        .collect();
    let notes = vec![
        format!(
            "Replay: {messages} messages rebuilt into fresh projections in {:.1} s (process start, connection and \
             final flush included), {attested} of them on the orchestrator's attestations (it folded the stream \
             first, attesting every 10,000 messages); checking every signature, in {:.1} s; the ordered consumer \
             read {baseline_messages} in {:.1} s.",
            replayed.as_secs_f64(),
            checked_elapsed.as_secs_f64(),
            baseline.as_secs_f64()
        ),
        format!(
            "Replay: the rebuilt projections' keys and values per message, by key prefix (see `projection/keys.rs`): {}. \
             On disk is what sled's log holds besides: record versions it has not reclaimed yet.",
            breakdown.join(", ")
        ),
    ];
    (rows, notes)
}
