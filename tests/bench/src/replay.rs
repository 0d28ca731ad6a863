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
/// stopped, so nothing is appended meanwhile); the messages it reports and the time from its start
/// to its exit. Its own progress bar shows on this terminal.
pub(crate) fn replay(orchestrator: &Orchestrator, work: &std::path::Path) -> anyhow::Result<(u64, Duration)> {
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
    let _ = std::fs::remove_dir_all(&out);
    Ok((messages, elapsed))
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

/// The report's rows and notes.
pub(crate) fn rows(
    messages: u64,
    replayed: Duration,
    baseline_messages: u64,
    baseline: Duration,
) -> (Vec<Row>, Vec<String>) {
    let rate = |count: u64, duration: Duration| Quantity::EventsPerSecond(count as f64 / duration.as_secs_f64());
    let row = Row::new(
        BENCHMARK,
        &format!("fleetlaps-orchestrator replay, {messages} messages"),
        rate(messages, replayed),
        "ordered consumer reading the same stream",
        rate(baseline_messages, baseline),
        "ratio ≥ 0.5",
    );
    let notes = vec![format!(
        "Replay: {messages} messages rebuilt into fresh projections in {:.1} s (process start, connection and \
         final flush included); the ordered consumer read {baseline_messages} in {:.1} s.",
        replayed.as_secs_f64(),
        baseline.as_secs_f64()
    )];
    (vec![row], notes)
}
