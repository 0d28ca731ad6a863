//! Lone writes: each API write alone, one after another, against the running orchestrator, and
//! the latency of each; a device's backup alone, from its publish to the orchestrator's
//! confirmation; the baseline is a JetStream publish awaiting its ack on the same server.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use indicatif::ProgressBar;

use fleetlaps_proto::command::{BackupConfirmation, BackupOutcome};
use fleetlaps_proto::subject;
use futures::StreamExt as _;

use crate::fleet::{Device, Orchestrator};
use crate::report::{Quantity, Row, percentile};

const BENCHMARK: &str = "lone writes";
const TARGET: &str = "p50 < 10 ms";
/// How long a backup's confirmation may take before the benchmark gives up.
const CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Times `repetitions` runs of `operation`, one after another; their durations and results.
async fn time<T, F, Fut>(
    repetitions: usize,
    progress: &ProgressBar,
    mut operation: F,
) -> anyhow::Result<(Vec<Duration>, Vec<T>)>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut samples = Vec::with_capacity(repetitions);
    let mut results = Vec::with_capacity(repetitions);
    for index in 0..repetitions {
        let started = Instant::now();
        results.push(operation(index).await?);
        samples.push(started.elapsed());
        progress.inc(1);
    }
    Ok((samples, results))
}

/// p50 and p99 of `samples` as latencies.
fn p50_p99(samples: &[Duration]) -> anyhow::Result<[Quantity; 2]> {
    let p50 = percentile(samples, 50.0).context("no samples")?;
    let p99 = percentile(samples, 99.0).context("no samples")?;
    Ok([Quantity::latency(p50), Quantity::latency(p99)])
}

/// Runs the benchmark: `device` (enrolled) publishes the baseline's events, then API tokens,
/// enrollment tokens and enrollments are made `repetitions` times each, then `device` backs up
/// `repetitions` passwords, each after the previous one's confirmation. Returns the rows and
/// notes for the report.
pub(crate) async fn run(
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    simulator: &jetstream::Context,
    device: &mut Device,
    repetitions: usize,
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    progress.set_length(5 * repetitions as u64);

    let (baseline, sizes) = time(repetitions, progress, |_| {
        let event = device.next_event();
        async move {
            let event = event?;
            let size = event.size;
            event.send(simulator).await?.await.context("awaiting JetStream's ack")?;
            Ok(size)
        }
    })
    .await
    .context("baseline: JetStream publishes")?;
    let event_size = sizes.first().copied().unwrap_or_default();
    let (tokens, _) = time(repetitions, progress, |index| async move {
        orchestrator
            .create_token(http, &format!("bench-token-{index}"))
            .await
            .map(drop)
    })
    .await
    .context("creating API tokens")?;
    let (enrollment_token_samples, enrollment_tokens) = time(repetitions, progress, |index| async move {
        orchestrator
            .create_enrollment_token(http, &format!("bench-enrollment-{index}"), 1)
            .await
    })
    .await
    .context("creating enrollment tokens")?;
    let (enrollments, _) = time(repetitions, progress, |index| {
        let token = enrollment_tokens[index].clone();
        async move {
            orchestrator
                .enroll(http, &token, &format!("bench-lone-{index}"))
                .await
                .map(drop)
        }
    })
    .await
    .context("enrolling devices")?;

    let confirmations = backup_confirmations(simulator, device, repetitions, progress)
        .await
        .context("backups confirmed one at a time")?;

    let [base_p50, base_p99] = p50_p99(&baseline)?;
    let mut rows = Vec::new();
    for (figure, samples) in [
        ("POST /v1.0/fleetlaps/tokens", &tokens),
        ("POST /v1.0/fleetlaps/enrollmentTokens", &enrollment_token_samples),
        ("POST /fleetlaps/v1/enroll", &enrollments),
        ("a backup published to its confirmation received", &confirmations),
    ] {
        let [p50, p99] = p50_p99(samples)?;
        rows.push(Row::new(
            BENCHMARK,
            &format!("{figure} p50"),
            p50,
            "JetStream publish+ack p50",
            base_p50,
            TARGET,
        ));
        rows.push(Row::new(
            BENCHMARK,
            &format!("{figure} p99"),
            p99,
            "JetStream publish+ack p99",
            base_p99,
            "—",
        ));
    }
    let notes = vec![format!(
        "Lone writes: {repetitions} of each, one at a time over one keep-alive plain-HTTP connection; \
         the baseline publishes a signed device event of {event_size} bytes and awaits JetStream's ack. \
         A backup's time runs from its publish to the orchestrator's confirmation on the device's subject \
         (verified, trial-opened with the escrow key, flushed, then confirmed). \
         Percentiles are nearest rank: with fewer than 100 samples p99 is the slowest."
    )];
    Ok((rows, notes))
}

/// `device` publishes `repetitions` backups one at a time, each timed from its publish to the
/// orchestrator's confirmation that it stored it, received as the device receives it.
async fn backup_confirmations(
    jetstream: &jetstream::Context,
    device: &mut Device,
    repetitions: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Duration>> {
    let mut confirmations = jetstream
        .client()
        .subscribe(subject::device_confirmations(&device.id))
        .await
        .context("subscribing to the device's confirmations")?;
    let mut samples = Vec::with_capacity(repetitions);
    for _ in 0..repetitions {
        let backup = device.next_backup()?;
        let event_id = backup.event_id;
        let started = Instant::now();
        backup
            .send(jetstream)
            .await?
            .await
            .context("awaiting JetStream's ack")?;
        loop {
            let message = tokio::time::timeout(CONFIRMATION_TIMEOUT, confirmations.next())
                .await
                .with_context(|| format!("no confirmation of backup {event_id} within {CONFIRMATION_TIMEOUT:?}"))?
                .context("the confirmations' subscription ended")?;
            let confirmation: BackupConfirmation =
                serde_json::from_slice(&message.payload).context("a confirmation that does not decode")?;
            if confirmation.event_id != event_id {
                continue;
            }
            anyhow::ensure!(
                confirmation.outcome == BackupOutcome::Stored,
                "backup {event_id} was not stored: {:?}",
                confirmation.outcome
            );
            break;
        }
        samples.push(started.elapsed());
        progress.inc(1);
    }
    Ok(samples)
}
