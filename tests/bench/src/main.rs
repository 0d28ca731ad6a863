//! `fleetlaps-bench`: the benchmarks `cargo xtask bench` runs against a real nats-server and the
//! release orchestrator, each figure beside a baseline measured in the same run.
//!
//! Layout:
//! - `api`: the Graph API under `wrk` (by id, `$filter` by name, audited reads) against
//!   `/healthz`.
//! - `fleet`: the bench's nats-server and orchestrator, enrollment, signed device events.
//! - `writes`: lone API writes (tokens, enrollment tokens, enrollments) against JetStream publishes.
//! - `footprint`: memory of the agent, a simulated device and the orchestrator; storage per device
//!   and per event.
//! - `ingest`: the orchestrator catching up on a pre-filled stream against a raw pull consumer.
//! - `replay`: `fleetlaps-orchestrator replay` of the whole stream against an ordered consumer.
//! - `rotation`: a breach campaign over a simulated fleet against a campaign of one device.
//! - `report`: figures, ratios, percentiles, `report.md` and `report.json`.
//!
//! Benchmarks are not tests: nothing here asserts a timing.

mod api;
mod fleet;
mod footprint;
mod ingest;
mod replay;
mod report;
mod rotation;
mod writes;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::fleet::{ChildGuard, Nats, Orchestrator};
use crate::report::Report;

/// Runs the fleetlaps benchmarks and writes `report.md` and `report.json`.
#[derive(Debug, Parser)]
#[command(name = "fleetlaps-bench", version, about)]
struct Args {
    /// Where the release binaries are (`fleetlaps-orchestrator`, `fleetlaps-agent`).
    #[arg(long)]
    bin_dir: PathBuf,
    /// The agent as shipped to devices (`cargo build --profile device -p fleetlaps-agent`), whose
    /// memory the footprint measures; the release `fleetlaps-agent` of `--bin-dir` by default.
    /// The simulated fleets always run the release build.
    #[arg(long)]
    device_agent: Option<PathBuf>,
    /// Where the report goes; the run's servers work in `<out>/work`, emptied first.
    #[arg(long)]
    out: PathBuf,
    /// Run only these benchmarks (comma-separated), in the usual order; all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Benchmark>,
    /// Signed device events pre-filled for the ingest benchmark.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Enrolled devices the ingest events are spread over.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Repetitions of each lone write (and of the baseline publish).
    #[arg(long, default_value_t = 50)]
    writes: usize,
    /// Fleet sizes the API is measured at (comma-separated, ascending); the full figure
    /// is `--api-sizes 1000,100000` (enrolling 100,000 devices takes a while).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    api_sizes: Vec<u32>,
    /// Seconds each `wrk` run of the API benchmark lasts.
    #[arg(long, default_value_t = 5)]
    api_secs: u64,
    /// Simulated devices of the footprint's "many" fleet (its "few" fleet has 10).
    #[arg(long, default_value_t = 1_000)]
    footprint_simulated: u32,
    /// Devices enrolled to measure the orchestrator's and sled's growth per device.
    #[arg(long, default_value_t = 2_000)]
    footprint_devices: u32,
    /// Devices `fleetlaps-agent simulate` runs for the fleet-wide rotation.
    #[arg(long, default_value_t = 10_000)]
    rotation_devices: u32,
    /// Keep the rotation's simulated devices' state (sled and account files) under the run's
    /// directory, on the disk the orchestrator and nats-server use, rather than in memory
    /// (`/dev/shm`): see the rotation's note.
    #[arg(long)]
    simulated_state_on_disk: bool,
    /// Messages on the events stream the replay rebuilds from: the stream is topped up to this
    /// many with signed device events (the figure is 1,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    replay_events: u64,
    /// The nats-server executable (by default from PATH, then /usr/sbin).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// The wrk executable (by default from PATH).
    #[arg(long)]
    wrk: Option<PathBuf>,
}

/// The benchmarks, in the order a run takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Benchmark {
    /// Lone API writes against JetStream publishes.
    Writes,
    /// The orchestrator catching up on a pre-filled stream against a raw pull consumer.
    Ingest,
    /// The Graph API under `wrk` against `/healthz`.
    Api,
    /// A breach campaign over a simulated fleet against a campaign of one device.
    Rotation,
    /// Memory of the agent, a simulated device and the orchestrator; storage per device and event.
    Footprint,
    /// Rebuilding every projection from the stream against an ordered consumer.
    Replay,
}

impl Args {
    /// Whether `benchmark` is to run.
    fn wants(&self, benchmark: Benchmark) -> bool {
        self.only.is_empty() || self.only.contains(&benchmark)
    }
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
pub(crate) fn bar(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0).with_message(message);
    if let Ok(style) = ProgressStyle::with_template("{msg:32} [{bar:40}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `program` from PATH or /usr/sbin, where Debian puts servers; the error names the Debian
/// package to install.
fn find_program(program: &str, package: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!("{program} not found on PATH nor in /usr/sbin: install the Debian package `{package}`")
        })
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
    let agent_binary = args.bin_dir.join("fleetlaps-agent");
    anyhow::ensure!(
        agent_binary.is_file() || !(args.wants(Benchmark::Rotation) || args.wants(Benchmark::Footprint)),
        "{} is missing: build it with `cargo build --release -p fleetlaps-agent`",
        agent_binary.display()
    );
    let device_agent = args.device_agent.clone().unwrap_or_else(|| agent_binary.clone());
    anyhow::ensure!(
        device_agent.is_file() || !args.wants(Benchmark::Footprint),
        "{} is missing: build it with `cargo build --profile device -p fleetlaps-agent`",
        device_agent.display()
    );
    let nats_server = match &args.nats_server {
        Some(path) => path.clone(),
        None => find_program("nats-server", "nats-server")?,
    };
    let wrk = match &args.wrk {
        Some(path) => path.clone(),
        None if args.wants(Benchmark::Api) => find_program("wrk", "wrk")?,
        None => PathBuf::from("wrk"),
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

    let context = Bench {
        args,
        orchestrator: &orchestrator,
        http: &http,
        simulator: &simulator,
        reader: &reader,
        work: &work,
        wrk: &wrk,
        nats: &nats,
        agent_binary: &agent_binary,
        device_agent: &device_agent,
    };
    let (rows, notes) = benchmarks(&context).await?;
    let report = Report {
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        parameters: serde_json::json!({
            "events": args.events,
            "devices": args.devices,
            "writes": args.writes,
            "only": args.only.iter().map(|benchmark| format!("{benchmark:?}").to_lowercase()).collect::<Vec<_>>(),
            "api_sizes": args.api_sizes,
            "api_secs": args.api_secs,
            "replay_events": args.replay_events,
            "rotation_devices": args.rotation_devices,
            "simulated_state_on_disk": args.simulated_state_on_disk,
            "footprint_simulated": args.footprint_simulated,
            "footprint_devices": args.footprint_devices,
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

/// What every benchmark may need: the arguments, the servers and the clients.
struct Bench<'a> {
    /// The command line.
    args: &'a Args,
    /// The orchestrator's config and how to start it.
    orchestrator: &'a Orchestrator,
    /// The HTTP client for the API and the metrics.
    http: &'a reqwest::Client,
    /// JetStream as the fleet simulator's user, to publish as any device.
    simulator: &'a async_nats::jetstream::Context,
    /// JetStream as the orchestrator's user, to read the events stream.
    reader: &'a async_nats::jetstream::Context,
    /// The run's working directory.
    work: &'a std::path::Path,
    /// `wrk`'s executable.
    wrk: &'a std::path::Path,
    /// The nats-server, for the fleet simulators' user.
    nats: &'a Nats,
    /// `fleetlaps-agent`'s executable.
    agent_binary: &'a std::path::Path,
    /// The agent as shipped to devices, for the footprint.
    device_agent: &'a std::path::Path,
}

/// Starts the orchestrator into `slot` unless it is running there already.
async fn ensure_started<'a>(slot: &'a mut Option<ChildGuard>, bench: &Bench<'_>) -> anyhow::Result<&'a mut ChildGuard> {
    if slot.is_none() {
        *slot = Some(bench.orchestrator.start(bench.http).await?);
    }
    slot.as_mut().context("the orchestrator was just started")
}

/// Runs the chosen benchmarks in order with the servers up; the orchestrator stops before this
/// returns.
async fn benchmarks(bench: &Bench<'_>) -> anyhow::Result<(Vec<report::Row>, Vec<String>)> {
    let args = bench.args;
    let mut running: Option<ChildGuard> = None;
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    if args.wants(Benchmark::Writes) {
        ensure_started(&mut running, bench).await?;
        let (more_rows, more_notes) = lone_writes(bench).await?;
        rows.extend(more_rows);
        notes.extend(more_notes);
    }
    if args.wants(Benchmark::Ingest) {
        ensure_started(&mut running, bench).await?;
        let (more_rows, more_notes) = ingest(bench, &mut running).await?;
        rows.extend(more_rows);
        notes.extend(more_notes);
    }
    if args.wants(Benchmark::Api) {
        ensure_started(&mut running, bench).await?;
        let options = api::ApiOptions {
            wrk: bench.wrk,
            sizes: &args.api_sizes,
            duration: Duration::from_secs(args.api_secs),
            work: bench.work,
        };
        let (more_rows, more_notes) = api::run(bench.orchestrator, bench.http, bench.simulator, bench.reader, &options)
            .await
            .context("API under load")?;
        rows.extend(more_rows);
        notes.extend(more_notes);
    }
    if args.wants(Benchmark::Rotation) {
        let orchestrator_pid = ensure_started(&mut running, bench).await?.id();
        let simulators = rotation::Simulators {
            agent_binary: bench.agent_binary,
            nats: bench.nats,
            work: bench.work,
        };
        let (more_rows, more_notes) = rotation::run(
            &simulators,
            bench.orchestrator,
            orchestrator_pid,
            bench.http,
            args.rotation_devices,
            args.simulated_state_on_disk,
        )
        .await
        .context("fleet-wide rotation")?;
        rows.extend(more_rows);
        notes.extend(more_notes);
    }
    if args.wants(Benchmark::Footprint) {
        let process = ensure_started(&mut running, bench).await?;
        let simulators = rotation::Simulators {
            agent_binary: bench.agent_binary,
            nats: bench.nats,
            work: bench.work,
        };
        let clients = footprint::Clients {
            simulator: bench.simulator,
            reader: bench.reader,
        };
        let options = footprint::FootprintOptions {
            simulated_devices: args.footprint_simulated,
            enrolled_devices: args.footprint_devices,
        };
        let (more_rows, more_notes) = footprint::run(
            &simulators,
            bench.device_agent,
            bench.orchestrator,
            process,
            bench.http,
            &clients,
            &options,
        )
        .await
        .context("footprint")?;
        rows.extend(more_rows);
        notes.extend(more_notes);
    }
    if args.wants(Benchmark::Replay) {
        ensure_started(&mut running, bench).await?;
        let (more_rows, more_notes) = replay(bench, &mut running).await.context("replay")?;
        rows.extend(more_rows);
        notes.extend(more_notes);
    }
    if let Some(mut child) = running.take() {
        child.stop().context("stopping the orchestrator")?;
    }
    Ok((rows, notes))
}

/// The replay benchmark: enrolls devices for its events, stops the orchestrator, tops the
/// stream up, lets the orchestrator fold it all (attesting the signatures it verifies, as a live
/// one does) and stops it for good, reads the stream with an ordered consumer, then runs
/// `fleetlaps-orchestrator replay` on it, taking the attestations, then checking every signature.
async fn replay(
    bench: &Bench<'_>,
    running: &mut Option<ChildGuard>,
) -> anyhow::Result<(Vec<report::Row>, Vec<String>)> {
    let (orchestrator, http, reader) = (bench.orchestrator, bench.http, bench.reader);
    let progress = bar("replay: enrolling devices");
    let mut devices = orchestrator
        .enroll_many(http, "bench-replay", 0, REPLAY_DEVICES, &progress)
        .await?;
    progress.finish();
    wait_caught_up(orchestrator, http, reader).await?;
    if let Some(mut child) = running.take() {
        child
            .stop()
            .context("stopping the orchestrator before topping the stream up")?;
    }
    let progress = bar("replay: topping the stream up");
    let last = replay::top_up(
        bench.simulator,
        reader,
        &mut devices,
        bench.args.replay_events,
        &progress,
    )
    .await
    .context("topping the events stream up")?;
    progress.finish();
    eprintln!("bench: the orchestrator folds the {last} messages");
    ensure_started(running, bench).await?;
    wait_caught_up(orchestrator, http, reader).await?;
    if let Some(mut child) = running.take() {
        child.stop().context("stopping the orchestrator before replaying")?;
    }
    let progress = bar("baseline: ordered consumer");
    let (baseline_messages, baseline) = replay::ordered_read(reader, &progress)
        .await
        .context("baseline: reading the stream in order")?;
    progress.finish();
    eprintln!("bench: replaying the stream with fleetlaps-orchestrator replay");
    let replayed = replay::replay(orchestrator, bench.work, &[])?;
    eprintln!("bench: replaying the stream with fleetlaps-orchestrator replay --verify-every-signature");
    let checked = replay::replay(orchestrator, bench.work, &["--verify-every-signature"])?;
    let (stream_bytes, _) = footprint::stream_state(reader).await?;
    Ok(replay::rows(
        &replayed,
        &checked,
        baseline_messages,
        baseline,
        stream_bytes,
    ))
}

/// Devices the replay's events are spread over.
const REPLAY_DEVICES: u32 = 100;

/// The lone writes benchmark, with the orchestrator running.
async fn lone_writes(bench: &Bench<'_>) -> anyhow::Result<(Vec<report::Row>, Vec<String>)> {
    let (orchestrator, http) = (bench.orchestrator, bench.http);
    // A device for the baseline's publishes; enrolling it also opens the HTTP connection.
    let token = orchestrator.create_enrollment_token(http, "bench-baseline", 1).await?;
    let mut baseline_device = orchestrator.enroll(http, &token, "bench-baseline").await?;
    let progress = bar("lone writes");
    let result = writes::run(
        orchestrator,
        http,
        bench.simulator,
        &mut baseline_device,
        bench.args.writes,
        &progress,
    )
    .await
    .context("lone writes")?;
    progress.finish();
    Ok(result)
}

/// The ingest benchmark: enrolls its devices with the orchestrator running, stops it, pre-fills
/// the stream, reads it raw, then starts the orchestrator again (left running in `running`),
/// times its catch-up, then times it folding events published live.
async fn ingest(
    bench: &Bench<'_>,
    running: &mut Option<ChildGuard>,
) -> anyhow::Result<(Vec<report::Row>, Vec<String>)> {
    let (args, orchestrator, http, reader) = (bench.args, bench.orchestrator, bench.http, bench.reader);
    let progress = bar("enrolling ingest devices");
    let mut devices = orchestrator
        .enroll_many(http, "bench-ingest", 0, args.devices, &progress)
        .await?;
    progress.finish();
    wait_caught_up(orchestrator, http, reader).await?;
    if let Some(mut child) = running.take() {
        child.stop().context("stopping the orchestrator before pre-filling")?;
    }

    let from = ingest::last_sequence(reader).await?;
    let progress = bar("pre-filling the events stream");
    let publish_started = std::time::Instant::now();
    ingest::prefill(bench.simulator, &mut devices, args.events, &progress)
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
    let (child, catch_up) = ingest::catch_up(orchestrator, http, from, to, &progress)
        .await
        .context("ingest")?;
    progress.finish();
    let mut child = child;
    let progress = bar("live: publishing and folding");
    let live = ingest::live(
        orchestrator,
        &mut child,
        http,
        bench.simulator,
        &mut devices,
        (to, args.events),
        &progress,
    )
    .await
    .context("live ingest")?;
    progress.finish();
    *running = Some(child);
    Ok(ingest::rows(&ingest::Timings {
        events: args.events,
        publish,
        raw,
        catch_up: &catch_up,
        live: &live,
    }))
}

/// Waits until the running orchestrator has folded everything on the stream (the enrollments
/// and the baseline's events), so the ingest starts from the enrolled state; gives up after a
/// minute without progress.
pub(crate) async fn wait_caught_up(
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    reader: &async_nats::jetstream::Context,
) -> anyhow::Result<()> {
    let last = ingest::last_sequence(reader).await?;
    let (mut before, mut still) = (0.0, 0);
    while still < 3_000 {
        let folded = orchestrator
            .metric(http, ingest::metric_names::PROJECTION_LAST_SEQUENCE)
            .await?
            .unwrap_or_default();
        if folded as u64 >= last {
            return Ok(());
        }
        still = if folded > before { 0 } else { still + 1 };
        before = folded;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the orchestrator stopped short of the stream's sequence {last}: no progress for a minute")
}
