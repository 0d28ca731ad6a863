//! `fleetlaps-bench`: the benchmarks `cargo xtask bench` runs against a real nats-server and the
//! release orchestrator, each figure beside a baseline measured in the same run.
//!
//! Layout:
//! - `fleet`: the bench's nats-server and orchestrator, enrollment, signed device events.
//! - `writes`: lone API writes (tokens, enrollment tokens, enrollments) against JetStream publishes.
//! - `ingest`: the orchestrator catching up on a pre-filled stream against a raw pull consumer.
//! - `report`: figures, ratios, percentiles, `report.md` and `report.json`.
//!
//! Benchmarks are not tests: nothing here asserts a timing.

mod fleet;
mod ingest;
mod report;
mod writes;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::fleet::{Nats, Orchestrator};
use crate::report::Report;

/// Runs the fleetlaps benchmarks and writes `report.md` and `report.json`.
#[derive(Debug, Parser)]
#[command(name = "fleetlaps-bench", version, about)]
struct Args {
    /// Where the release binaries are (`fleetlaps-orchestrator`).
    #[arg(long)]
    bin_dir: PathBuf,
    /// Where the report goes; the run's servers work in `<out>/work`, emptied first.
    #[arg(long)]
    out: PathBuf,
    /// Signed device events pre-filled for the ingest benchmark.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Enrolled devices the ingest events are spread over.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Repetitions of each lone write (and of the baseline publish).
    #[arg(long, default_value_t = 50)]
    writes: usize,
    /// The nats-server executable (by default from PATH, then /usr/sbin).
    #[arg(long)]
    nats_server: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fleetlaps-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress bar for one phase.
fn bar(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0).with_message(message);
    if let Ok(style) = ProgressStyle::with_template("{msg:32} [{bar:40}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `nats-server` from PATH or /usr/sbin, where Debian puts it.
fn find_nats_server() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .context("nats-server not found on PATH nor in /usr/sbin: install the Debian package `nats-server`")
}

async fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.devices > 0 && args.events > 0 && args.writes > 0,
        "--devices, --events and --writes must be positive"
    );
    let started = chrono::Utc::now();
    let work = args.out.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let orchestrator_binary = args.bin_dir.join("fleetlaps-orchestrator");
    anyhow::ensure!(
        orchestrator_binary.is_file(),
        "{} is missing: build it with `cargo build --release -p fleetlaps-orchestrator`",
        orchestrator_binary.display()
    );
    let nats_server = match &args.nats_server {
        Some(path) => path.clone(),
        None => find_nats_server()?,
    };

    eprintln!("bench: servers and logs in {}", work.display());
    let nats = Nats::start(&orchestrator_binary, &nats_server, &work).await?;
    let orchestrator = Orchestrator::configure(&orchestrator_binary, &nats, &work)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let simulator = nats.simulator().await?;
    let reader = nats.orchestrator_user().await?;

    let (rows, notes) = benchmarks(args, &orchestrator, &http, &simulator, &reader).await?;
    let report = Report {
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        parameters: serde_json::json!({
            "events": args.events,
            "devices": args.devices,
            "writes": args.writes,
            "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        }),
        rows,
        notes,
    };
    report.write(&args.out)?;
    print!("{}", report.markdown());
    eprintln!(
        "bench: wrote {} and {}",
        args.out.join("report.md").display(),
        args.out.join("report.json").display()
    );
    nats.stop().context("stopping nats-server")
}

/// Runs both benchmarks with the servers up; the orchestrator stops before this returns.
async fn benchmarks(
    args: &Args,
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    simulator: &async_nats::jetstream::Context,
    reader: &async_nats::jetstream::Context,
) -> anyhow::Result<(Vec<report::Row>, Vec<String>)> {
    let mut running = orchestrator.start(http).await?;

    // A device for the baseline's publishes; enrolling it also opens the HTTP connection.
    let token = orchestrator.create_enrollment_token(http, "bench-baseline", 1).await?;
    let mut baseline_device = orchestrator.enroll(http, &token, "bench-baseline").await?;
    let progress = bar("lone writes");
    let (mut rows, mut notes) = writes::run(
        orchestrator,
        http,
        simulator,
        &mut baseline_device,
        args.writes,
        &progress,
    )
    .await
    .context("lone writes")?;
    progress.finish();

    let progress = bar("enrolling ingest devices");
    progress.set_length(u64::from(args.devices));
    let token = orchestrator
        .create_enrollment_token(http, "bench-ingest", args.devices)
        .await?;
    let mut devices = Vec::new();
    for index in 0..args.devices {
        devices.push(
            orchestrator
                .enroll(http, &token, &format!("bench-ingest-{index}"))
                .await?,
        );
        progress.inc(1);
    }
    progress.finish();
    wait_caught_up(orchestrator, http, reader).await?;
    running.stop().context("stopping the orchestrator before pre-filling")?;

    let from = ingest::last_sequence(reader).await?;
    let progress = bar("pre-filling the events stream");
    let publish_started = std::time::Instant::now();
    ingest::prefill(simulator, &mut devices, args.events, &progress)
        .await
        .context("pre-filling the events stream")?;
    let publish = publish_started.elapsed();
    progress.finish();
    let to = ingest::last_sequence(reader).await?;
    anyhow::ensure!(
        to - from == args.events,
        "pre-filled {} messages, expected {}",
        to - from,
        args.events
    );

    let progress = bar("baseline: raw pull consumer");
    let raw = ingest::raw_read(reader, from, to, &progress)
        .await
        .context("baseline: reading the stream")?;
    progress.finish();
    let progress = bar("orchestrator catching up");
    let (mut running, catch_up) = ingest::catch_up(orchestrator, http, from, to, &progress)
        .await
        .context("ingest")?;
    progress.finish();
    let progress = bar("live: publishing and folding");
    let live = ingest::live(
        orchestrator,
        &mut running,
        http,
        simulator,
        &mut devices,
        (to, args.events),
        &progress,
    )
    .await
    .context("live ingest")?;
    progress.finish();
    running.stop().context("stopping the orchestrator")?;
    let (ingest_rows, ingest_notes) = ingest::rows(&ingest::Timings {
        events: args.events,
        publish,
        raw,
        catch_up: &catch_up,
        live: &live,
    });
    rows.extend(ingest_rows);
    notes.extend(ingest_notes);
    Ok((rows, notes))
}

/// Waits until the running orchestrator has folded everything on the stream (the enrollments
/// and the baseline's events), so the ingest starts from the enrolled state.
async fn wait_caught_up(
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    reader: &async_nats::jetstream::Context,
) -> anyhow::Result<()> {
    let last = ingest::last_sequence(reader).await?;
    for _ in 0..3_000 {
        let folded = orchestrator
            .metric(http, ingest::metric_names::PROJECTION_LAST_SEQUENCE)
            .await?
            .unwrap_or_default();
        if folded as u64 >= last {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the orchestrator did not fold the stream's sequence {last} within a minute")
}
