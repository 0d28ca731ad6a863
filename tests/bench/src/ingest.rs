//! Ingest (pre-filled): signed device events are put on the events stream while the orchestrator
//! is stopped (their publishing timed: the publish rate); the baseline reads them with a plain
//! JetStream pull consumer, then the orchestrator is started and timed until its projections hold
//! the stream's last sequence.
//!
//! Ingest (live): with the orchestrator running and caught up, as many events again are
//! published, and the orchestrator is timed from the first publish until its projections hold
//! the last one: whether it keeps up with what the stream accepts.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use indicatif::ProgressBar;

use crate::fleet::{Device, Orchestrator};
use crate::report::{Quantity, Row};

const BENCHMARK: &str = "ingest (pre-filled)";
const LIVE_BENCHMARK: &str = "ingest (live)";
/// Acknowledgements awaited together while pre-filling.
const PUBLISH_WINDOW: usize = 512;
/// Messages a pull of the baseline asks for.
const FETCH_BATCH: usize = 1_000;
/// How often the orchestrator's position is read while it catches up.
const POLL: Duration = Duration::from_millis(50);
/// How long the orchestrator may take to catch up before the benchmark gives up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The stream's last sequence, read as the orchestrator's user.
pub(crate) async fn last_sequence(reader: &jetstream::Context) -> anyhow::Result<u64> {
    let mut stream = reader
        .get_stream(fleetlaps_proto::subject::EVENTS_STREAM)
        .await
        .context("looking up the events stream")?;
    Ok(stream
        .info()
        .await
        .context("reading the events stream's info")?
        .state
        .last_sequence)
}

/// Publishes `events` signed events, round robin over `devices`, with acks awaited in windows.
pub(crate) async fn prefill(
    simulator: &jetstream::Context,
    devices: &mut [Device],
    events: u64,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    progress.set_length(events);
    let mut pending = Vec::with_capacity(PUBLISH_WINDOW);
    for index in 0..events {
        let device = &mut devices[index as usize % devices.len()];
        pending.push(device.next_event()?.send(simulator).await?);
        if pending.len() == PUBLISH_WINDOW || index + 1 == events {
            for ack in pending.drain(..) {
                ack.await.context("awaiting JetStream's ack of a pre-filled event")?;
            }
            progress.set_position(index + 1);
        }
    }
    Ok(())
}

/// The baseline: reads the messages after `from` up to `to` with a plain pull consumer, in
/// batches, acknowledging each batch's last message (ack all). Returns the time taken.
pub(crate) async fn raw_read(
    reader: &jetstream::Context,
    from: u64,
    to: u64,
    progress: &ProgressBar,
) -> anyhow::Result<Duration> {
    let stream = reader
        .get_stream(fleetlaps_proto::subject::EVENTS_STREAM)
        .await
        .context("looking up the events stream")?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from + 1,
            },
            ack_policy: consumer::AckPolicy::All,
            ..Default::default()
        })
        .await
        .context("creating the baseline's pull consumer")?;
    progress.set_length(to - from);
    let started = Instant::now();
    let mut read = 0;
    while read < to - from {
        let mut batch = consumer
            .fetch()
            .max_messages(FETCH_BATCH)
            .messages()
            .await
            .context("pulling a batch")?;
        let mut last = None;
        while let Some(message) = batch.next().await {
            last = Some(message.map_err(|err| anyhow::anyhow!("reading a pulled message: {err}"))?);
            read += 1;
        }
        match last {
            Some(message) => message
                .ack()
                .await
                .map_err(|err| anyhow::anyhow!("acknowledging a batch: {err}"))?,
            None => bail!("the stream ran dry after {read} of {} messages", to - from),
        }
        progress.set_position(read);
    }
    let elapsed = started.elapsed();
    let name = consumer.cached_info().name.clone();
    stream
        .delete_consumer(&name)
        .await
        .context("deleting the baseline's consumer")?;
    Ok(elapsed)
}

/// A process's CPU time (user + system) so far, from `/proc/<pid>/stat`.
pub(crate) fn cpu_time(pid: u32, ticks_per_second: f64) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The fields after the command name (in parentheses): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .with_context(|| format!("{path} has no field {}", index + 3))
    };
    Ok(Duration::from_secs_f64((ticks(11)? + ticks(12)?) / ticks_per_second))
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 if it cannot be asked.
pub(crate) fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// What the orchestrator's catch-up took.
pub(crate) struct CatchUp {
    /// From its start to its projections holding the last sequence.
    pub(crate) elapsed: Duration,
    /// Its CPU time (user + system) over that span.
    pub(crate) cpu: Duration,
    /// Its metrics at the end, for notes.
    pub(crate) metrics: String,
}

/// Starts the orchestrator (stopped until now) and waits until its
/// `fleetlaps_projection_last_sequence` reaches `to`, scraping its metrics every [`POLL`]. The
/// orchestrator is left running.
pub(crate) async fn catch_up(
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    from: u64,
    to: u64,
    progress: &ProgressBar,
) -> anyhow::Result<(crate::fleet::ChildGuard, CatchUp)> {
    let ticks = ticks_per_second();
    progress.set_length(to - from);
    let started = Instant::now();
    let mut child = orchestrator.spawn()?;
    loop {
        child
            .ensure_running()
            .context("the orchestrator stopped while catching up")?;
        if let Ok(Some(sequence)) = orchestrator.metric(http, metric_names::PROJECTION_LAST_SEQUENCE).await {
            let sequence = sequence as u64;
            progress.set_position(sequence.saturating_sub(from).min(to - from));
            if sequence >= to {
                break;
            }
        }
        if started.elapsed() > CATCH_UP_TIMEOUT {
            bail!("the orchestrator did not catch up within {CATCH_UP_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time(child.id(), ticks)?;
    let metrics = http
        .get(&orchestrator.metrics_url)
        .send()
        .await
        .context("scraping the metrics")?
        .text()
        .await
        .context("reading the metrics")?;
    Ok((child, CatchUp { elapsed, cpu, metrics }))
}

/// What the live ingest took.
pub(crate) struct Live {
    /// From the first publish to the last acknowledgement.
    pub(crate) publish: Duration,
    /// From the first publish to the orchestrator's projections holding the last event.
    pub(crate) caught_up: Duration,
    /// The orchestrator's CPU time (user + system) over that span.
    pub(crate) cpu: Duration,
}

/// Publishes `events` more events with the orchestrator `child` running on a stream whose last
/// sequence is `from`, and times both the publishing and the orchestrator's folding them.
pub(crate) async fn live(
    orchestrator: &Orchestrator,
    child: &mut crate::fleet::ChildGuard,
    http: &reqwest::Client,
    simulator: &jetstream::Context,
    devices: &mut [Device],
    (from, events): (u64, u64),
    progress: &ProgressBar,
) -> anyhow::Result<Live> {
    let ticks = ticks_per_second();
    let to = from + events;
    let cpu_before = cpu_time(child.id(), ticks)?;
    let started = Instant::now();
    let publishing = async {
        prefill(simulator, devices, events, progress).await?;
        anyhow::Ok(started.elapsed())
    };
    let folding = async {
        loop {
            if let Ok(Some(sequence)) = orchestrator.metric(http, metric_names::PROJECTION_LAST_SEQUENCE).await
                && sequence as u64 >= to
            {
                return anyhow::Ok(started.elapsed());
            }
            if started.elapsed() > CATCH_UP_TIMEOUT {
                bail!("the orchestrator did not fold the live events within {CATCH_UP_TIMEOUT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    };
    let (publish, caught_up) = tokio::try_join!(publishing, folding)?;
    child
        .ensure_running()
        .context("the orchestrator stopped during the live ingest")?;
    let cpu = cpu_time(child.id(), ticks)?.saturating_sub(cpu_before);
    Ok(Live {
        publish,
        caught_up,
        cpu,
    })
}

/// The names of the orchestrator's metrics the bench reads (kept in step with
/// `fleetlaps_orchestrator::metrics`, which the bench does not link).
pub(crate) mod metric_names {
    /// Gauge: the stream sequence of the last message folded in.
    pub(crate) const PROJECTION_LAST_SEQUENCE: &str = "fleetlaps_projection_last_sequence";
    /// Counter: messages refused into the quarantine, by reason.
    pub(crate) const EVENTS_QUARANTINED_TOTAL: &str = "fleetlaps_events_quarantined_total";
    /// Counter: backups confirmed to their devices, by outcome.
    pub(crate) const BACKUPS_CONFIRMED_TOTAL: &str = "fleetlaps_backups_confirmed_total";
}

/// The sum of every sample of `name`, whatever its labels.
pub(crate) fn sum_samples(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}')?.1
            } else {
                rest
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The timings the ingest rows are made of.
pub(crate) struct Timings<'a> {
    /// Events per run (pre-filled, then again live).
    pub(crate) events: u64,
    /// Publishing the pre-filled events (signed, acknowledged in windows).
    pub(crate) publish: Duration,
    /// The raw pull consumer reading them.
    pub(crate) raw: Duration,
    /// The orchestrator catching up on them.
    pub(crate) catch_up: &'a CatchUp,
    /// The live run.
    pub(crate) live: &'a Live,
}

/// The report's rows and notes.
pub(crate) fn rows(timings: &Timings<'_>) -> (Vec<Row>, Vec<String>) {
    let Timings {
        events,
        publish,
        raw,
        catch_up,
        live,
    } = *timings;
    let rate = |duration: Duration| Quantity::EventsPerSecond(events as f64 / duration.as_secs_f64());
    let rows = vec![
        Row::new(
            BENCHMARK,
            "orchestrator start to caught up",
            rate(catch_up.elapsed),
            "raw JetStream pull consumer",
            rate(raw),
            "ratio ≥ 0.5",
        ),
        Row::new(
            BENCHMARK,
            "orchestrator start to caught up",
            rate(catch_up.elapsed),
            "signed publishes acknowledged (pre-fill)",
            rate(publish),
            "ratio ≥ 1",
        ),
        Row::new(
            LIVE_BENCHMARK,
            "first publish to folded",
            rate(live.caught_up),
            "the same publishes acknowledged",
            rate(live.publish),
            "ratio ≈ 1 (keeps up)",
        ),
    ];
    let quarantined = sum_samples(&catch_up.metrics, metric_names::EVENTS_QUARANTINED_TOTAL);
    let notes = vec![
        format!(
            "Ingest: {events} events; the orchestrator caught up in {:.2} s (process start included), \
             the raw consumer read them in {:.3} s.",
            catch_up.elapsed.as_secs_f64(),
            raw.as_secs_f64()
        ),
        format!(
            "Ingest: the orchestrator used {:.2} s of CPU (user + system, start included): {:.1} µs per event.",
            catch_up.cpu.as_secs_f64(),
            catch_up.cpu.as_secs_f64() * 1e6 / events as f64
        ),
        format!(
            "Ingest (live): {events} more events published in {:.2} s with the orchestrator running; it \
             had folded the last one {:.2} s after the first was sent, using {:.1} µs of CPU per event.",
            live.publish.as_secs_f64(),
            live.caught_up.as_secs_f64(),
            live.cpu.as_secs_f64() * 1e6 / events as f64
        ),
        format!("Ingest: events quarantined by the orchestrator since it was first started: {quarantined}."),
    ];
    (rows, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_samples_are_summed() {
        let text = "# TYPE x counter\nx{reason=\"a\"} 2\nx{reason=\"b\"} 3\nxy 100\n";
        assert_eq!(sum_samples(text, "x"), 5.0);
        assert_eq!(sum_samples(text, "absent"), 0.0);
    }
}
