//! Fleet-wide rotation: N devices simulated by `fleetlaps-agent simulate` (the agent's own rotation
//! code, one process), a breach declared on all of them through the API with the campaign's wave
//! rate unlimited, timed from the declaration to the campaign completed (every device's rotation
//! confirmed). The baseline is the same measurement for one of those devices alone: a campaign of
//! one device, the floor of a breach's round trip through the orchestrator, NATS and an agent.

use std::path::{Path, PathBuf};

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use fleetlaps_proto::api::{BreachInfo, BreachRequest, ODataCollection, SCOPE_BREACH_DECLARE};
use fleetlaps_proto::breach::BreachScope;
use fleetlaps_proto::ids::DeviceId;
use indicatif::ProgressBar;
use serde_json::Value;

use crate::fleet::{ChildGuard, Nats, Orchestrator};
use crate::report::{Quantity, Row};

const BENCHMARK: &str = "fleet-wide rotation";

/// What the simulator logs once every device is backed up.
const SIMULATOR_READY: &str = "every simulated device is backed up";
/// How long the simulated fleet may take to enroll and back up.
const SIMULATOR_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Devices per declared breach: `breach_declared` carries its scope's device ids, and the
/// orchestrator refuses a devices scope of more than `breach::DEVICES_PER_EVENT` (500) ids, so
/// the declaration fits in one event of the history; a bigger fleet is declared as several
/// breaches at once.
const DEVICES_PER_BREACH: usize = fleetlaps_proto::breach::DEVICES_PER_EVENT;
/// How many times the simulator is started before its enrollments count as failed.
const SIMULATOR_ATTEMPTS: u32 = 4;
/// The SHA-512 crypt rounds of the simulated devices' hashes: the least the format allows. Each
/// real device hashes its own password on its own cores (glibc's 5,000 rounds, about 2 ms); here
/// thousands of devices share the orchestrator's two, where 5,000 rounds were 70% of the
/// simulator's CPU in a rotation: a cost of the simulation, not of the system measured.
const SIMULATED_HASH_ROUNDS: u32 = 1_000;
/// How long a campaign may take before the benchmark gives up.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The simulated fleet, stopped when dropped.
pub(crate) struct SimulatedFleet {
    /// The `fleetlaps-agent simulate` process.
    pub(crate) process: ChildGuard,
    /// Its devices' ids, as the orchestrator lists them.
    pub(crate) device_ids: Vec<DeviceId>,
    /// Its log, named in errors.
    pub(crate) log: PathBuf,
}

/// Where and how fleet simulators run.
pub(crate) struct Simulators<'a> {
    /// `fleetlaps-agent`'s executable.
    pub(crate) agent_binary: &'a Path,
    /// The nats-server, whose simulator user the fleets connect as.
    pub(crate) nats: &'a Nats,
    /// The run's working directory; each fleet gets its own directory in it.
    pub(crate) work: &'a Path,
}

/// Writes the simulator's config under `work/<name>`, starts `fleetlaps-agent simulate` with
/// `devices` devices enrolled through the API and their state in `state`, and waits until every
/// one is backed up.
pub(crate) async fn start_fleet(
    simulators: &Simulators<'_>,
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    name: &str,
    state: &Path,
    devices: u32,
    progress: &ProgressBar,
) -> anyhow::Result<SimulatedFleet> {
    let Simulators {
        agent_binary,
        nats,
        work,
    } = simulators;
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("simulator.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{state}\"\npassword_hash_rounds = {SIMULATED_HASH_ROUNDS}\n[nats]\nurl = \"{url}\"\nnkey_seed_file = \"{seed}\"\n\
             [account]\nbackend = \"file\"\npath = \"{state}/unused\"\n",
            state = state.display(),
            url = nats.url,
            seed = nats.simulator_seed.display(),
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let backed_up_before = backups_confirmed(orchestrator, http).await?;
    let log = dir.join("simulator.log");
    progress.set_length(u64::from(devices));
    let deadline = Instant::now() + SIMULATOR_TIMEOUT;
    let mut attempt = 1;
    let process = 'attempts: loop {
        // A token for the devices not enrolled yet (a restarted simulator reuses the identities
        // it has), with the slack the orchestrator's double count needs, within its 10,000 uses.
        let missing = devices.saturating_sub(simulated_device_ids(state)?.len() as u32);
        let uses = missing.min(crate::fleet::MAX_TOKEN_USES);
        let token = orchestrator
            .create_enrollment_token(http, &format!("bench-{name}-{attempt}"), uses)
            .await?;
        let mut process = ChildGuard::spawn(
            "fleetlaps-agent simulate",
            Command::new(agent_binary)
                .arg("--config")
                .arg(&config)
                .args(["simulate", "--devices", &devices.to_string()])
                .args(["--orchestrator", &orchestrator.base_url, "--insecure-http"])
                .env("LAPS_ENROLLMENT_TOKEN", &token)
                .env_remove("RUST_LOG"),
            &log,
        )?;
        loop {
            if std::fs::read_to_string(&log).is_ok_and(|text| text.contains(SIMULATOR_READY)) {
                break 'attempts process;
            }
            if let Err(err) = process.ensure_running() {
                // A simulator that stopped (an enrollment refused, a lost connection) is started
                // again for the devices left, a few times.
                if attempt < SIMULATOR_ATTEMPTS {
                    eprintln!("bench: the fleet simulator stopped ({err:#}); starting it again for the devices left");
                    attempt += 1;
                    continue 'attempts;
                }
                return Err(err).with_context(|| format!("the fleet simulator stopped; see {}", log.display()));
            }
            if Instant::now() > deadline {
                bail!(
                    "the simulated fleet was not backed up within {SIMULATOR_TIMEOUT:?}; see {}",
                    log.display()
                );
            }
            let confirmed = backups_confirmed(orchestrator, http).await? - backed_up_before;
            progress.set_position((confirmed.max(0.0) as u64).min(u64::from(devices)));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    progress.set_position(u64::from(devices));
    let device_ids = simulated_device_ids(state)?;
    anyhow::ensure!(
        device_ids.len() == devices as usize,
        "the simulator's state holds {} device identities, expected {devices}",
        device_ids.len()
    );
    Ok(SimulatedFleet {
        process,
        device_ids,
        log,
    })
}

/// Where the rotation's simulated devices keep their state (their sled database and account
/// files): in memory, `/dev/shm`, when the machine has it, removed when dropped; else, or when
/// asked, under the run's directory, on the disk the orchestrator and nats-server write to.
///
/// Why memory: each of the 10,000 simulated devices stands for a machine with its own disk, yet
/// here all of them write to the one disk the centre uses. Measured on this bench's machine (3
/// December 2026), the simulator's writes there (its sled log and 10,000 account files) cost the
/// campaign about as much CPU as the orchestrator and nats-server together, in kernel time
/// charged to all three processes: 15–24 s for the campaign of 10,000 devices there, against
/// 9–12 s in memory. The orchestrator's and nats-server's data stay on disk either way.
enum SimulatedState {
    /// A directory in `/dev/shm`, removed when dropped.
    Memory(PathBuf),
    /// Under the run's directory.
    Disk(PathBuf),
}

impl SimulatedState {
    fn new(fleet_dir: &Path, on_disk: bool) -> anyhow::Result<Self> {
        let shm = Path::new("/dev/shm");
        if on_disk || !shm.is_dir() {
            return Ok(Self::Disk(fleet_dir.join("state")));
        }
        let dir = shm.join(format!("fleetlaps-bench-{}-rotation", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self::Memory(dir))
    }

    fn path(&self) -> &Path {
        match self {
            Self::Memory(dir) | Self::Disk(dir) => dir,
        }
    }

    /// What the report says of it.
    fn describe(&self) -> String {
        match self {
            Self::Memory(dir) => format!(
                "The simulated devices kept their state in memory ({}; each stands for a device with its own disk), \
                 the orchestrator and nats-server theirs on the run's disk; `--simulated-state-on-disk` puts the devices' \
                 on that disk too.",
                dir.display()
            ),
            Self::Disk(dir) => format!(
                "The simulated devices kept their state on the run's disk ({}), beside the orchestrator's and nats-server's.",
                dir.display()
            ),
        }
    }
}

impl Drop for SimulatedState {
    fn drop(&mut self) {
        if let Self::Memory(dir) = self
            && let Err(err) = std::fs::remove_dir_all(&*dir)
        {
            eprintln!("bench: removing {}: {err}", dir.display());
        }
    }
}

/// The orchestrator's count of confirmed backups, all outcomes.
async fn backups_confirmed(orchestrator: &Orchestrator, http: &reqwest::Client) -> anyhow::Result<f64> {
    let text = http
        .get(&orchestrator.metrics_url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("scraping {}", orchestrator.metrics_url))?
        .text()
        .await
        .context("reading the metrics")?;
    Ok(crate::ingest::sum_samples(
        &text,
        crate::ingest::metric_names::BACKUPS_CONFIRMED_TOTAL,
    ))
}

/// The ids of the simulator's enrolled devices, from the identity each keeps in
/// `state_dir/devices/<name>/identity.json` (its `device_id`), so only this fleet's devices count.
fn simulated_device_ids(state_dir: &Path) -> anyhow::Result<Vec<DeviceId>> {
    let devices_dir = state_dir.join("devices");
    let mut ids = Vec::new();
    if !devices_dir.exists() {
        return Ok(ids);
    }
    for entry in std::fs::read_dir(&devices_dir).with_context(|| format!("reading {}", devices_dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", devices_dir.display()))?
            .path()
            .join("identity.json");
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let identity: Value = serde_json::from_str(&text).with_context(|| format!("{} is no JSON", path.display()))?;
        let id = identity["device_id"]
            .as_str()
            .with_context(|| format!("{} has no device_id", path.display()))?;
        ids.push(DeviceId::parse(id).with_context(|| format!("device id {id} in {}", path.display()))?);
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Declares breaches on `device_ids`, [`DEVICES_PER_BREACH`] at a time, and waits until every
/// campaign has completed; the time from just before the first `POST` to the first poll (every
/// 50 ms, one listing of the campaigns) that shows them all completed, and the campaigns' last state.
pub(crate) async fn campaign(
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    token: &str,
    device_ids: &[DeviceId],
    progress: &ProgressBar,
) -> anyhow::Result<(Duration, Vec<BreachInfo>)> {
    progress.set_length(device_ids.len() as u64);
    let url = format!("{}/v1.0/fleetlaps/breaches", orchestrator.base_url);
    let started = Instant::now();
    let mut declared_ids = Vec::new();
    for chunk in device_ids.chunks(DEVICES_PER_BREACH) {
        let request = BreachRequest {
            reason: format!("fleetlaps-bench: {} devices", chunk.len()),
            deadline: Utc::now() + chrono::Duration::hours(1),
            scope: BreachScope::Devices {
                device_ids: chunk.to_vec(),
            },
        };
        let response = http
            .post(&url)
            .bearer_auth(token)
            .json(&request)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let text = response.text().await.context("reading the declaration's answer")?;
        if !status.is_success() {
            bail!(
                "POST {url}: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        let declared: BreachInfo = serde_json::from_str(&text).context("the declaration's answer does not decode")?;
        declared_ids.push(declared.id);
    }
    loop {
        // One listing per poll, not one request per campaign: a campaign's own page counts its
        // stragglers from every device it has not heard from, and at 20 campaigns polled every
        // 50 ms that alone took most of the orchestrator's CPU.
        let mut infos = Vec::with_capacity(declared_ids.len());
        let mut page = Some(format!("{url}?$top=1000"));
        while let Some(link) = page.take() {
            let listed: ODataCollection<BreachInfo> = http
                .get(&link)
                .bearer_auth(token)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .with_context(|| format!("GET {link}"))?
                .json()
                .await
                .with_context(|| format!("GET {link} does not decode"))?;
            infos.extend(listed.value.into_iter().filter(|info| declared_ids.contains(&info.id)));
            page = listed.next_link;
        }
        anyhow::ensure!(
            infos.len() == declared_ids.len(),
            "the breach list shows {} of the {} campaigns declared",
            infos.len(),
            declared_ids.len()
        );
        for info in &infos {
            match info.state.as_str() {
                "completed" | "declared" | "running" => {}
                other => bail!("the campaign {} ended {other}: {info:?}", info.id),
            }
        }
        progress.set_position(infos.iter().map(|info| u64::from(info.rotated)).sum());
        if infos.iter().all(|info| info.state == "completed") {
            return Ok((started.elapsed(), infos));
        }
        if started.elapsed() > CAMPAIGN_TIMEOUT {
            bail!("the campaigns did not complete within {CAMPAIGN_TIMEOUT:?}: {infos:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The CPU time (user + system) each of `processes` has used so far.
fn cpu_times(processes: &[(&str, u32)]) -> anyhow::Result<Vec<Duration>> {
    let ticks = crate::ingest::ticks_per_second();
    processes
        .iter()
        .map(|(name, pid)| crate::ingest::cpu_time(*pid, ticks).with_context(|| format!("the CPU time of {name}")))
        .collect()
}

/// Runs the benchmark: a fleet of `devices` simulated devices, one campaign of one device (the
/// baseline), then one of all of them. The devices' state is in memory unless `state_on_disk`
/// ([`SimulatedState`]).
pub(crate) async fn run(
    simulators: &Simulators<'_>,
    orchestrator: &Orchestrator,
    orchestrator_pid: u32,
    http: &reqwest::Client,
    devices: u32,
    state_on_disk: bool,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let progress = crate::bar("rotation: simulated fleet backed up");
    let state = SimulatedState::new(&simulators.work.join("rotation"), state_on_disk)?;
    let mut fleet = start_fleet(
        simulators,
        orchestrator,
        http,
        "rotation",
        state.path(),
        devices,
        &progress,
    )
    .await?;
    progress.finish();
    let token = orchestrator
        .create_token_with(http, "bench-rotation", &[SCOPE_BREACH_DECLARE])
        .await?;
    let progress = crate::bar("baseline: campaign of one device");
    let (one, _) = campaign(orchestrator, http, &token, &fleet.device_ids[..1], &progress)
        .await
        .context("baseline: a campaign of one device")?;
    progress.finish();
    let progress = crate::bar("campaign of the whole fleet");
    let processes = [
        ("the orchestrator", orchestrator_pid),
        ("the fleet simulator", fleet.process.id()),
        ("nats-server", simulators.nats.pid()),
    ];
    let cpu_before = cpu_times(&processes)?;
    let (all, infos) = campaign(orchestrator, http, &token, &fleet.device_ids, &progress)
        .await
        .with_context(|| format!("the fleet's campaign; the simulator's log is {}", fleet.log.display()))?;
    let cpu_used: Vec<Duration> = cpu_times(&processes)?
        .into_iter()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before))
        .collect();
    progress.finish();
    fleet
        .process
        .ensure_running()
        .with_context(|| format!("the fleet simulator; see {}", fleet.log.display()))?;
    fleet.process.stop().context("stopping the fleet simulator")?;
    let state_note = state.describe();
    drop(state);
    let row = Row::new(
        BENCHMARK,
        &format!("breach declared to campaign completed, {devices} devices"),
        Quantity::Seconds(all.as_secs_f64()),
        "the same for one device",
        Quantity::Seconds(one.as_secs_f64()),
        "< 10 s",
    );
    let rotated: u32 = infos.iter().map(|info| info.rotated).sum();
    let total_cpu: Duration = cpu_used.iter().sum();
    let mut rows = vec![row];
    for ((name, _), used) in processes.iter().zip(&cpu_used) {
        rows.push(Row::new(
            BENCHMARK,
            &format!("CPU of {name} per rotation, {devices} devices"),
            Quantity::Milliseconds(used.as_secs_f64() * 1000.0 / f64::from(rotated.max(1))),
            "CPU of the three processes per rotation",
            Quantity::Milliseconds(total_cpu.as_secs_f64() * 1000.0 / f64::from(rotated.max(1))),
            "—",
        ));
    }
    let commanded: u32 = infos.iter().map(|info| info.commanded).sum();
    let notes = vec![format!(
        "Rotation: {devices} devices simulated by one `fleetlaps-agent simulate` process (the agent's rotation code, \
         file-backed accounts, `password_hash_rounds = {SIMULATED_HASH_ROUNDS}`: the devices share this machine's cores), campaign wave rate 100,000 devices/s, declared as {} breach(es) of at most \
         {DEVICES_PER_BREACH} devices (the orchestrator takes at most 500 ids per devices scope, so the declaration fits in one event); \
         {rotated} rotated, {commanded} commanded. Completion is polled every 50 ms, so it may read up to 50 ms late; \
         {:.0} rotations/s overall. During the campaign the three processes used {:.1} s of CPU in {:.1} s ({:.2} of the \
         machine's {} cores): what one machine spends simulating the devices is in the simulator's share. {state_note}",
        infos.len(),
        f64::from(rotated) / all.as_secs_f64(),
        total_cpu.as_secs_f64(),
        all.as_secs_f64(),
        total_cpu.as_secs_f64() / all.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
    )];
    Ok((rows, notes))
}
