//! Footprint: what fleetlaps costs in memory and storage.
//!
//! - The agent's resident memory (`VmRSS`, `VmHWM` from `/proc`), a real `fleetlaps-agent run`
//!   with a file-backed account (no root needed), idle and over a rotation (`fleetlaps-agent
//!   reset`); baseline: `sleep`, a process doing nothing.
//! - One simulated device's memory in `fleetlaps-agent simulate`: the RSS with many devices minus
//!   the RSS with few, divided by the difference; baseline: the real agent idle.
//! - The orchestrator's memory and sled bytes per device: RSS and data directory growth over
//!   enrollments, per 100,000 devices and per device; baseline: the stream's bytes for the same
//!   enrollments.
//! - sled bytes per event and stream bytes per event, over signed device events folded by the
//!   running orchestrator; baselines: the stream's bytes, and the event's own size.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use fleetlaps_proto::control::StatusReport;

use crate::fleet::{self, ChildGuard, Nats, Orchestrator};
use crate::report::{Quantity, Row};
use crate::rotation::{self, Simulators};

const BENCHMARK: &str = "footprint";

/// Simulated devices of the "few" fleet whose RSS is subtracted.
const FEW_SIMULATED: u32 = 10;
/// Signed device events folded to measure storage per event.
const STORAGE_EVENTS: u64 = 10_000;
/// How long the agent is left alone before its idle memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);
/// How long an agent may take to enroll, start and finish a rotation.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The benchmark's knobs, from the command line.
pub(crate) struct FootprintOptions {
    /// Simulated devices of the "many" fleet.
    pub(crate) simulated_devices: u32,
    /// Devices enrolled to measure the orchestrator's growth per device.
    pub(crate) enrolled_devices: u32,
}

/// The JetStream contexts the benchmark publishes and reads with.
pub(crate) struct Clients<'a> {
    /// As the fleet simulator's user, to publish as any device.
    pub(crate) simulator: &'a jetstream::Context,
    /// As the orchestrator's user, to read the events stream's state.
    pub(crate) reader: &'a jetstream::Context,
}

/// A process's memory from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// `VmRSS`: resident now.
    pub(crate) rss: u64,
    /// `VmHWM`: the most ever resident.
    pub(crate) peak: u64,
    /// `RssAnon`: the resident part that is the process's own (heap, stacks), not pages of files
    /// such as its executable, which the kernel maps around each page touched and may reclaim.
    pub(crate) anonymous: u64,
}

/// Reads `VmRSS`, `VmHWM` and `RssAnon` of `pid`.
pub(crate) fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
        anonymous: field("RssAnon:")?,
    })
}

/// The disk space used under `dir` (allocated blocks, as `du` counts them), in bytes.
pub(crate) fn disk_usage(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let metadata = entry
                .metadata()
                .with_context(|| format!("reading {}", entry.path().display()))?;
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total += metadata.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// The events stream's stored bytes and message count.
pub(crate) async fn stream_state(reader: &jetstream::Context) -> anyhow::Result<(u64, u64)> {
    let mut stream = reader
        .get_stream(fleetlaps_proto::subject::EVENTS_STREAM)
        .await
        .context("looking up the events stream")?;
    let state = stream
        .info()
        .await
        .context("reading the events stream's info")?
        .state
        .clone();
    Ok((state.bytes, state.messages))
}

/// Runs the benchmark with the orchestrator running (`orchestrator_process`).
pub(crate) async fn run(
    simulators: &Simulators<'_>,
    device_agent: &Path,
    orchestrator: &Orchestrator,
    orchestrator_process: &ChildGuard,
    http: &reqwest::Client,
    clients: &Clients<'_>,
    options: &FootprintOptions,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // The orchestrator and sled per device, and the stream's bytes for the same enrollments.
    let data_dir = orchestrator.data_dir();
    crate::wait_caught_up(orchestrator, http, clients.reader).await?;
    let before = (
        memory(orchestrator_process.id())?,
        disk_usage(&data_dir)?,
        stream_state(clients.reader).await?,
    );
    let progress = crate::bar("footprint: enrolling devices");
    let mut devices = orchestrator
        .enroll_many(http, "bench-footprint", 0, options.enrolled_devices, &progress)
        .await?;
    progress.finish();
    crate::wait_caught_up(orchestrator, http, clients.reader).await?;
    let after = (
        memory(orchestrator_process.id())?,
        disk_usage(&data_dir)?,
        stream_state(clients.reader).await?,
    );
    let enrolled = f64::from(options.enrolled_devices.max(1));
    let stream_per_device = (after.2.0 as f64 - before.2.0 as f64) / enrolled;
    let rss_per_device = (after.0.rss as f64 - before.0.rss as f64) / enrolled;
    rows.push(Row::new(
        BENCHMARK,
        "orchestrator RSS per 100,000 devices",
        Quantity::mebibytes(rss_per_device * 100_000.0),
        "stream bytes of their enrollments",
        Quantity::mebibytes(stream_per_device * 100_000.0),
        "—",
    ));
    rows.push(Row::new(
        BENCHMARK,
        "sled bytes per device",
        Quantity::Bytes((after.1 as f64 - before.1 as f64) / enrolled),
        "stream bytes per enrollment",
        Quantity::Bytes(stream_per_device),
        "—",
    ));
    notes.push(format!(
        "Footprint: {} devices enrolled one by one through the API (16 at a time); the orchestrator's RSS went from \
         {:.1} to {:.1} MiB (extrapolated linearly to 100,000 devices: a rough figure, as sled's cache and the \
         allocator grow in steps), its data directory from {:.1} to {:.1} MiB (disk blocks, as du counts them).",
        options.enrolled_devices,
        before.0.rss as f64 / 1048576.0,
        after.0.rss as f64 / 1048576.0,
        before.1 as f64 / 1048576.0,
        after.1 as f64 / 1048576.0,
    ));

    // sled and stream bytes per event, over failed-authentication events of those devices, in
    // two rounds: whether sled's disk keeps growing per event once its log has old versions to
    // reclaim.
    if !devices.is_empty() {
        let mut size = 0;
        let mut last = (disk_usage(&data_dir)?, stream_state(clients.reader).await?);
        for round in ["", ", a second round"] {
            let before = last;
            let progress = crate::bar("footprint: events for storage");
            progress.set_length(STORAGE_EVENTS);
            let mut acks = Vec::new();
            for index in 0..STORAGE_EVENTS {
                let device_index = index as usize % devices.len();
                let event = devices[device_index].next_event()?;
                size = event.size;
                acks.push(event.send(clients.simulator).await?);
                if acks.len() == 512 || index + 1 == STORAGE_EVENTS {
                    for ack in acks.drain(..) {
                        ack.await.context("awaiting JetStream's ack")?;
                    }
                    progress.set_position(index + 1);
                }
            }
            progress.finish();
            crate::wait_caught_up(orchestrator, http, clients.reader).await?;
            let after = (disk_usage(&data_dir)?, stream_state(clients.reader).await?);
            let events = (after.1.1 - before.1.1).max(1) as f64;
            let stream_per_event = (after.1.0 as f64 - before.1.0 as f64) / events;
            rows.push(Row::new(
                BENCHMARK,
                &format!("sled bytes per event{round}"),
                Quantity::Bytes((after.0 as f64 - before.0 as f64) / events),
                "stream bytes per event",
                Quantity::Bytes(stream_per_event),
                "—",
            ));
            if round.is_empty() {
                rows.push(Row::new(
                    BENCHMARK,
                    "stream bytes per event",
                    Quantity::Bytes(stream_per_event),
                    "the event's JSON payload",
                    Quantity::Bytes(size as f64),
                    "—",
                ));
            }
            last = after;
        }
        let (bytes, messages) = last.1;
        notes.push(format!(
            "Footprint: two rounds of {STORAGE_EVENTS} failed-authentication events folded; over the whole stream, \
             {} bytes per message ({messages} messages, {:.1} MiB).",
            bytes / messages.max(1),
            bytes as f64 / 1048576.0
        ));
    }

    // The real agent, idle and over a rotation.
    let sleeper = ChildGuard::spawn(
        "sleep",
        Command::new("sleep").arg("600"),
        &simulators.work.join("sleep.log"),
    )?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let floor = memory(sleeper.id())?;
    drop(sleeper);
    let agent = agent_memory(simulators, device_agent, orchestrator, http)
        .await
        .context("the agent's memory")?;
    rows.push(Row::new(
        BENCHMARK,
        "agent VmRSS idle",
        Quantity::mebibytes(agent.idle.rss as f64),
        "`sleep` VmRSS",
        Quantity::mebibytes(floor.rss as f64),
        "< 8 MB",
    ));
    rows.push(Row::new(
        BENCHMARK,
        "agent RssAnon idle (VmRSS without the executable's and libraries' file pages)",
        Quantity::mebibytes(agent.idle.anonymous as f64),
        "`sleep` RssAnon",
        Quantity::mebibytes(floor.anonymous as f64),
        "—",
    ));
    rows.push(Row::new(
        BENCHMARK,
        "agent VmRSS peak during a rotation",
        Quantity::mebibytes(agent.rotation_rss as f64),
        "`sleep` VmRSS",
        Quantity::mebibytes(floor.rss as f64),
        "—",
    ));
    rows.push(Row::new(
        BENCHMARK,
        "agent VmHWM after start and two rotations",
        Quantity::mebibytes(agent.after.peak as f64),
        "`sleep` VmHWM",
        Quantity::mebibytes(floor.peak as f64),
        "—",
    ));
    notes.push(format!(
        "Footprint: the agent (`fleetlaps-agent run` built as shipped to devices, {}; file-backed account, its own \
         nkey user) rotated at start and again on `fleetlaps-agent reset`; its VmRSS was sampled every 5 ms during \
         the second rotation ({} samples).",
        device_agent.display(),
        agent.samples
    ));

    // One simulated device.
    let progress = crate::bar("footprint: few simulated devices");
    let few = simulated_rss(
        simulators,
        orchestrator,
        http,
        "footprint-few",
        FEW_SIMULATED,
        &progress,
    )
    .await?;
    progress.finish();
    let progress = crate::bar("footprint: many simulated devices");
    let many = simulated_rss(
        simulators,
        orchestrator,
        http,
        "footprint-many",
        options.simulated_devices,
        &progress,
    )
    .await?;
    progress.finish();
    let per_device =
        (many as f64 - few as f64) / f64::from(options.simulated_devices.saturating_sub(FEW_SIMULATED).max(1));
    rows.push(Row::new(
        BENCHMARK,
        "one simulated device's RSS",
        Quantity::Bytes(per_device),
        "the real agent idle",
        Quantity::Bytes(agent.idle.rss as f64),
        "—",
    ));
    notes.push(format!(
        "Footprint: `fleetlaps-agent simulate` idle after every device backed up: {:.1} MiB with {FEW_SIMULATED} devices, \
         {:.1} MiB with {}.",
        few as f64 / 1048576.0,
        many as f64 / 1048576.0,
        options.simulated_devices
    ));
    Ok((rows, notes))
}

/// The agent's memory at points of its life.
struct AgentMemory {
    /// After its first rotation, left alone for [`IDLE_SETTLE`].
    idle: Memory,
    /// The most `VmRSS` sampled during the second rotation.
    rotation_rss: u64,
    /// Read after the second rotation (its `peak` is `VmHWM`).
    after: Memory,
    /// `VmRSS` samples taken during the second rotation.
    samples: usize,
}

/// Enrolls a real agent (`device_agent`, the executable as shipped to devices), admits its nkey
/// user to the nats-server, runs it until its first rotation is done, reads its memory idle, asks
/// it to rotate again and samples it meanwhile.
async fn agent_memory(
    simulators: &Simulators<'_>,
    device_agent: &Path,
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
) -> anyhow::Result<AgentMemory> {
    let dir = simulators.work.join("footprint-agent");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let state = dir.join("state");
    let accounts = dir.join("accounts");
    fleet::write_private(&accounts, "root:0:!\nlapsadmin:1001:!\n")?;
    let seed = dir.join("nats.nk");
    let nkey = fleet::make_nkey(orchestrator.binary(), &seed)?;
    let config = dir.join("agent.toml");
    fleet::write_private(
        &config,
        &format!(
            "device_name = \"bench-footprint-agent\"\nstate_dir = \"{state}\"\n\
             [nats]\nurl = \"{url}\"\nnkey_seed_file = \"{seed}\"\n\
             [account]\nbackend = \"file\"\npath = \"{accounts}\"\n\
             [policy]\nAdministratorAccountName = \"lapsadmin\"\nPasswordAgeDays = 30\n",
            state = state.display(),
            url = simulators.nats.url,
            seed = seed.display(),
            accounts = accounts.display(),
        ),
    )?;
    let token = orchestrator
        .create_enrollment_token(http, "bench-footprint-agent", 1)
        .await?;
    let agent = |args: &[&str]| -> anyhow::Result<String> {
        fleet::output_of(
            Command::new(device_agent)
                .arg("--config")
                .arg(&config)
                .args(args)
                .env("LAPS_ENROLLMENT_TOKEN", &token)
                .env_remove("RUST_LOG"),
            &format!("fleetlaps-agent {}", args.first().copied().unwrap_or_default()),
        )
    };
    let enrolled = agent(&["enroll", "--orchestrator", &orchestrator.base_url, "--insecure-http"])?;
    let device_id = enrolled
        .split_whitespace()
        .nth(3)
        .context("fleetlaps-agent enroll printed no device id")?
        .to_owned();
    admit(simulators.nats, &device_id, &nkey)?;
    let log = dir.join("agent.log");
    let mut process = ChildGuard::spawn(
        "fleetlaps-agent run",
        Command::new(device_agent)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env_remove("RUST_LOG"),
        &log,
    )?;
    let status = |process: &mut ChildGuard| -> anyhow::Result<Option<StatusReport>> {
        process
            .ensure_running()
            .with_context(|| format!("the agent stopped; see {}", log.display()))?;
        let Ok(text) = agent(&["status", "--json"]) else {
            return Ok(None);
        };
        Ok(Some(
            serde_json::from_str(&text).context("fleetlaps-agent status --json")?,
        ))
    };
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let first = loop {
        if let Some(report) = status(&mut process)?
            && let Some(rotated) = report.last_rotation
            && report.pending_rotation.is_none()
        {
            break rotated;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not rotate within {AGENT_TIMEOUT:?}; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle = memory(process.id())?;

    let reset = Command::new(device_agent)
        .arg("--config")
        .arg(&config)
        .arg("reset")
        .output()
        .context("running fleetlaps-agent reset")?;
    let mut rotation_rss = memory(process.id())?.rss;
    let mut samples = 1;
    anyhow::ensure!(
        reset.status.success(),
        "fleetlaps-agent reset failed: {}",
        String::from_utf8_lossy(&reset.stderr).trim()
    );
    let deadline = Instant::now() + AGENT_TIMEOUT;
    loop {
        rotation_rss = rotation_rss.max(memory(process.id())?.rss);
        samples += 1;
        if samples % 20 == 0
            && let Some(report) = status(&mut process)?
            && report.last_rotation.is_some_and(|rotated| rotated > first)
            && report.pending_rotation.is_none()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not rotate on reset within {AGENT_TIMEOUT:?}; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = memory(process.id())?;
    process.stop().context("stopping the agent")?;
    Ok(AgentMemory {
        idle,
        rotation_rss,
        after,
        samples,
    })
}

/// Admits one device's own nkey user to the bench's nats-server and gives it a moment to reload.
fn admit(nats: &Nats, device_id: &str, nkey: &str) -> anyhow::Result<()> {
    nats.admit(&[format!("{device_id}={nkey}")])?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Runs a fleet of `devices` simulated devices until each is backed up, lets it settle, reads its
/// RSS, and stops it.
async fn simulated_rss(
    simulators: &Simulators<'_>,
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    name: &str,
    devices: u32,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let state = simulators.work.join(name).join("state");
    let mut fleet = rotation::start_fleet(simulators, orchestrator, http, name, &state, devices, progress).await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss = memory(fleet.process.id())?.rss;
    fleet.process.stop().context("stopping the fleet simulator")?;
    Ok(rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_set_no_larger_than_its_peak() {
        let own = memory(std::process::id()).expect("/proc/<pid>/status is readable");
        assert!(own.rss > 0);
        assert!(own.peak >= own.rss, "{own:?}");
    }
}
