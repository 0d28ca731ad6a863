//! `fleetlaps-agent simulate`: a fleet of simulated devices in one process, against a real NATS
//! and a real orchestrator, for test and bench fleets.
//!
//! Each simulated device is a device to the orchestrator: its own enrolled [`Identity`] (device
//! id, signing key, escrow key, policy), its own file-backed account database
//! ([`FileAccounts`]), its own durable state and outbox, its own confirmations and commands, and
//! it runs the agent's own loop ([`crate::app`]) and rotation ([`crate::rotation`]); only the
//! control socket is replaced by [`Simulation::request`].
//! What the devices share, so that 10,000 of them fit on two cores:
//! - one sled database (`state_dir/state`), one tree per device, named by its device id
//!   ([`AgentState::open_in`]), rather than one database (and its threads) per device;
//! - one NATS connection ([`SharedConnection`]), as the simulator's own nkey user, which may act
//!   for every device (`fleetlaps-orchestrator nats-config --simulator-nkey`: test and bench
//!   fleets only, never production);
//! - the template [`Config`]: its policy, timings and NATS settings.
//!
//! On disk, under the config's `state_dir`: `devices/<name>/identity.json` (0600) and
//! `devices/<name>/accounts` for each device, named `sim-00001`, `sim-00002`, …; and `state/`, the
//! shared sled database. A simulation started again on the same directory reuses every identity
//! and state: only devices without an identity are enrolled, with one enrollment token
//! (`lapsctl enrollment-token create --max-uses N`).

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::ids::{DeviceId, DeviceName};
use fleetlaps_proto::password::Password;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use secrecy::SecretString;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::account::{Account, AccountBackend, FileAccounts};
use crate::app::{self, Agent, AgentParts};
use crate::bus::{SharedConnectSettings, SharedConnection};
use crate::clock::Clock;
use crate::config::{AccountConfig, Config};
use crate::control;
use crate::enroll::{self, EnrollOptions};
use crate::fault::Faults;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::state::{AgentState, StateDb};

/// The directory of the devices' identities and account databases, in `state_dir`.
const DEVICES_DIR: &str = "devices";
/// The shared sled database, in `state_dir`.
const STATE_DB: &str = "state";
/// The account database's file name in a device's directory.
const ACCOUNTS_FILE: &str = "accounts";
/// The accounts of a new simulated device: the built-in administrator (UID 0, managed when the
/// policy names no account) and `lapsadmin` (for policies that name it).
const ACCOUNTS: [(&str, u32); 2] = [("root", 0), ("lapsadmin", 1001)];
/// How often progress is read from the devices' states.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// What a simulation is made of, beside the template config.
pub struct SimulationOptions {
    /// How many devices: `sim-00001` to `sim-<devices>`.
    pub devices: usize,
    /// How devices without an identity enroll; `None` when all must be enrolled already.
    pub enrollment: Option<EnrollmentSettings>,
    /// At most this many enrollments at once (mind the API's `http.max_connections_per_address`).
    pub enroll_concurrency: usize,
    /// Every device's clock (tests move time forward).
    pub clock: Arc<dyn Clock>,
    /// Whether progress bars are drawn on standard error (they never are when it is not a
    /// terminal).
    pub show_progress: bool,
}

/// How devices enroll: as `fleetlaps-agent enroll` does, one request per device.
pub struct EnrollmentSettings {
    /// The orchestrator's API, `https://host:port`.
    pub orchestrator_url: String,
    /// An enrollment token with uses enough for every device to enroll.
    pub token: SecretString,
    /// The certificates to trust instead of the web roots.
    pub ca_file: Option<PathBuf>,
    /// Allow an `http://` URL (see `fleetlaps-agent enroll --insecure-http`).
    pub insecure_http: bool,
}

/// A simulated fleet: enrolled devices, each stopped or running.
pub struct Simulation {
    /// The template: policy, timings, NATS; its `state_dir` holds the simulation.
    config: Config,
    /// The shared state database, one tree per device.
    db: StateDb,
    /// The shared NATS connection.
    connection: SharedConnection,
    /// Every device's clock.
    clock: Arc<dyn Clock>,
    /// The devices, in name order.
    devices: Vec<SimulatedDevice>,
    /// Where each device is in `devices`.
    positions: HashMap<DeviceId, usize>,
    /// Whether progress bars are drawn.
    show_progress: bool,
    /// One registry for every device (no listener per device; the simulation serves none).
    metrics: Metrics,
}

/// One simulated device.
struct SimulatedDevice {
    /// Its host name, `sim-00001`.
    name: DeviceName,
    /// Its enrolled identity.
    identity: Identity,
    /// Its account database.
    accounts: FileAccounts,
    /// A handle on its state for reading progress; the running agent opens its own (each start
    /// is a new running copy, with its own instance id).
    state: AgentState,
    /// Set while it runs.
    running: Option<RunningDevice>,
}

/// A running device's agent task and the way to talk to it.
struct RunningDevice {
    /// Its control requests (what the control socket would carry).
    requests: mpsc::Sender<control::Request>,
    /// Stops it.
    shutdown: oneshot::Sender<()>,
    /// Its run loop.
    task: JoinHandle<anyhow::Result<()>>,
}

impl Simulation {
    /// Loads the devices' identities under the config's `state_dir`, enrolls those that have
    /// none (at most `enroll_concurrency` at once), and opens the shared state and NATS
    /// connection. No device runs yet ([`Self::start_all`]).
    ///
    /// Refuses a config whose `[account]` is not `backend = "file"`: a simulation never touches
    /// the machine's accounts.
    pub async fn prepare(config: Config, options: SimulationOptions) -> anyhow::Result<Self> {
        if !matches!(config.account, AccountConfig::File { .. }) {
            anyhow::bail!(
                "simulate needs [account] backend = \"file\": each simulated device gets its own account file under \
                 state_dir, and the machine's accounts are never touched"
            );
        }
        if options.devices == 0 {
            anyhow::bail!("--devices 0: simulate at least one device");
        }
        if let Some(listen) = config.metrics.listen {
            tracing::warn!(
                %listen,
                "[metrics] listen is ignored by simulate: the simulated devices open no metrics listener"
            );
        }
        let devices_dir = config.state_dir.join(DEVICES_DIR);
        // Owner-only, as an agent's state directory: it holds every device's signing key.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&devices_dir)
            .with_context(|| format!("creating {}", devices_dir.display()))?;
        let names = (1..=options.devices)
            .map(|index| DeviceName::parse(&format!("sim-{index:05}")).context("a simulated device name"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let identities = enroll_missing(&devices_dir, &names, &options).await?;

        let db_path = config.state_dir.join(STATE_DB);
        let db = StateDb::open(&db_path).with_context(|| format!("opening sled db {}", db_path.display()))?;
        let mut devices = Vec::with_capacity(names.len());
        let mut positions = HashMap::with_capacity(names.len());
        for (name, identity) in names.into_iter().zip(identities) {
            let dir = devices_dir.join(name.as_str());
            let accounts_path = dir.join(ACCOUNTS_FILE);
            let accounts = if accounts_path.exists() {
                FileAccounts::new(accounts_path)
            } else {
                FileAccounts::create(&accounts_path, &ACCOUNTS)?
            };
            let state = AgentState::open_in(&db, identity.device_id.as_str(), &identity.device_id)
                .with_context(|| format!("opening the state of {name}"))?;
            positions.insert(identity.device_id.clone(), devices.len());
            devices.push(SimulatedDevice {
                name,
                identity,
                accounts,
                state,
                running: None,
            });
        }
        let connection = SharedConnection::connect(SharedConnectSettings {
            url: &config.nats.url,
            ca_file: config.nats.ca_file.as_deref(),
            ack_timeout: Duration::from_secs(config.nats.ack_timeout_secs),
            nkey_seed_file: config.nats.nkey_seed_file.as_deref(),
        })
        .await?;
        Ok(Self {
            config,
            db,
            connection,
            clock: options.clock,
            devices,
            positions,
            show_progress: options.show_progress,
            metrics: Metrics::new(),
        })
    }

    /// Every device's id, in name order (`sim-00001` first).
    pub fn device_ids(&self) -> Vec<DeviceId> {
        self.devices
            .iter()
            .map(|device| device.identity.device_id.clone())
            .collect()
    }

    /// The host name of `device_id`, if it is one of the simulation's.
    pub fn device_name(&self, device_id: &DeviceId) -> Option<&DeviceName> {
        self.device(device_id).ok().map(|device| &device.name)
    }

    /// Whether `device_id` runs.
    pub fn is_running(&self, device_id: &DeviceId) -> bool {
        self.device(device_id).is_ok_and(|device| device.running.is_some())
    }

    /// Starts every device that is not running.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        let device_ids = self.device_ids();
        self.start(&device_ids).await
    }

    /// Starts the devices `device_ids` that are not running, each on its own state (what it
    /// did before it stopped) and with its own identity.
    pub async fn start(&mut self, device_ids: &[DeviceId]) -> anyhow::Result<()> {
        for device_id in device_ids {
            let position = self.position(device_id)?;
            if self.devices[position].running.is_some() {
                continue;
            }
            let device = &self.devices[position];
            let state = AgentState::open_in(&self.db, device_id.as_str(), device_id)
                .with_context(|| format!("opening the state of {}", device.name))?;
            let agent = Agent::assemble(
                &self.config,
                AgentParts {
                    identity: device.identity.clone(),
                    state,
                    publisher: self.connection.publisher(device.identity.signing_key.clone()),
                    backend: Arc::new(device.accounts.clone()),
                    device_name: device.name.clone(),
                    clock: Arc::clone(&self.clock),
                    faults: Faults::none(),
                    metrics: self.metrics.clone(),
                },
            )
            .with_context(|| format!("starting {}", device.name))?;
            let (requests, incoming_requests) = mpsc::channel(8);
            let (shutdown, stop) = oneshot::channel::<()>();
            let task = tokio::spawn(agent.run(incoming_requests, async move {
                let _ = stop.await;
            }));
            self.devices[position].running = Some(RunningDevice {
                requests,
                shutdown,
                task,
            });
        }
        Ok(())
    }

    /// Stops every running device.
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        let device_ids = self.device_ids();
        self.stop(&device_ids).await
    }

    /// Stops the running devices among `device_ids`, as a service stop does: each finishes
    /// what its loop is doing (a rotation waits for its confirmation at most
    /// `backup_confirmation_wait_secs`), and its state stays as it was left.
    pub async fn stop(&mut self, device_ids: &[DeviceId]) -> anyhow::Result<()> {
        let mut stopping = Vec::new();
        for device_id in device_ids {
            let position = self.position(device_id)?;
            if let Some(running) = self.devices[position].running.take() {
                // The loop may have ended already (an error); the task says so below.
                let _ = running.shutdown.send(());
                stopping.push((position, running.task));
            }
        }
        let results = futures::future::join_all(
            stopping
                .into_iter()
                .map(|(position, task)| async move { (position, task.await) }),
        )
        .await;
        for (position, result) in results {
            let name = &self.devices[position].name;
            result
                .with_context(|| format!("the agent of {name} panicked"))?
                .with_context(|| format!("the agent of {name} failed"))?;
        }
        Ok(())
    }

    /// Sends `request` to a running device, as `fleetlaps-agent reset`, `process-now` or
    /// `status` would through the control socket, and returns its answer.
    pub async fn request(&self, device_id: &DeviceId, request: ControlRequest) -> anyhow::Result<ControlResponse> {
        let device = self.device(device_id)?;
        let running = device
            .running
            .as_ref()
            .with_context(|| format!("{} is stopped", device.name))?;
        let (reply, answer) = oneshot::channel();
        running
            .requests
            .send((request, reply))
            .await
            .map_err(|_| anyhow::anyhow!("the agent of {} has stopped", device.name))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the agent of {} did not answer", device.name))
    }

    /// Whether the device's account has a password that was backed up and confirmed by the
    /// orchestrator (a rotation committed), from its state.
    pub fn is_backed_up(&self, device_id: &DeviceId) -> anyhow::Result<bool> {
        Ok(self.device(device_id)?.state.current()?.is_some())
    }

    /// How many devices are backed up ([`Self::is_backed_up`]).
    pub fn backed_up_count(&self) -> anyhow::Result<usize> {
        let mut count = 0;
        for device in &self.devices {
            if device.state.current()?.is_some() {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Waits until every device is backed up, drawing a progress bar when progress is shown.
    pub async fn wait_until_all_backed_up(&self) -> anyhow::Result<()> {
        let total = self.devices.len();
        let bar = self.progress_bar(total, "devices backed up");
        loop {
            let backed_up = self.backed_up_count()?;
            bar.set_position(backed_up as u64);
            if backed_up == total {
                bar.finish();
                tracing::info!(devices = total, "every simulated device is backed up");
                return Ok(());
            }
            tokio::time::sleep(PROGRESS_INTERVAL).await;
        }
    }

    /// The managed account's stored password hash on `device_id`, as its account file holds it.
    pub fn password_hash(&self, device_id: &DeviceId) -> anyhow::Result<String> {
        let device = self.device(device_id)?;
        let account = self.managed_account(device)?;
        Ok(device.accounts.password_hash(&account)?)
    }

    /// Whether `password` is the managed account's password on `device_id` (the SHA-512 crypt
    /// hash in its account file).
    pub fn verify_password(&self, device_id: &DeviceId, password: &Password) -> anyhow::Result<bool> {
        let device = self.device(device_id)?;
        let account = self.managed_account(device)?;
        Ok(device.accounts.verify_password(&account, password)?)
    }

    /// Starts every device, shows progress until all are backed up, runs until `shutdown`
    /// completes, then stops them all: `fleetlaps-agent simulate`.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.start_all().await?;
        tracing::info!(devices = self.devices.len(), "simulated devices started");
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            result = self.wait_until_all_backed_up() => {
                result?;
                shutdown.await;
            }
        }
        self.stop_all().await?;
        tracing::info!("simulated devices stopped");
        Ok(())
    }

    fn managed_account(&self, device: &SimulatedDevice) -> anyhow::Result<Account> {
        let (policy, _) = app::effective_policy(&self.config, &device.identity)?;
        Ok(device.accounts.resolve(policy.administrator_account_name())?)
    }

    fn position(&self, device_id: &DeviceId) -> anyhow::Result<usize> {
        self.positions
            .get(device_id)
            .copied()
            .with_context(|| format!("{device_id} is not a simulated device"))
    }

    fn device(&self, device_id: &DeviceId) -> anyhow::Result<&SimulatedDevice> {
        Ok(&self.devices[self.position(device_id)?])
    }

    fn progress_bar(&self, total: usize, message: &'static str) -> ProgressBar {
        progress_bar(self.show_progress, total, message)
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        for device in &mut self.devices {
            if let Some(running) = device.running.take() {
                running.task.abort();
            }
        }
    }
}

/// The identities of the devices `names` in `devices_dir`: those saved, and, for the others, new
/// ones from enrolling (at most `options.enroll_concurrency` at once).
async fn enroll_missing(
    devices_dir: &Path,
    names: &[DeviceName],
    options: &SimulationOptions,
) -> anyhow::Result<Vec<Identity>> {
    let mut identities: Vec<Option<Identity>> = Vec::with_capacity(names.len());
    for name in names {
        identities.push(Identity::load(&devices_dir.join(name.as_str()))?);
    }
    let missing: Vec<usize> = (0..names.len())
        .filter(|&position| identities[position].is_none())
        .collect();
    if !missing.is_empty() {
        let enrollment = options.enrollment.as_ref().with_context(|| {
            format!(
                "{} of {} simulated devices are not enrolled yet: give the orchestrator's URL and an enrollment \
                 token with at least {} uses",
                missing.len(),
                names.len(),
                missing.len()
            )
        })?;
        let bar = progress_bar(options.show_progress, missing.len(), "devices enrolled");
        let mut enrolled = futures::stream::iter(missing)
            .map(|position| {
                let name = names[position].clone();
                async move {
                    let state_dir = devices_dir.join(name.as_str());
                    let identity = enroll::enroll(EnrollOptions {
                        orchestrator_url: &enrollment.orchestrator_url,
                        token: &enrollment.token,
                        ca_file: enrollment.ca_file.as_deref(),
                        device_name: name.clone(),
                        state_dir: &state_dir,
                        insecure_http: enrollment.insecure_http,
                        tags: Vec::new(),
                    })
                    .await
                    .with_context(|| format!("enrolling simulated device {name}"))?;
                    anyhow::Ok((position, identity))
                }
            })
            .buffer_unordered(options.enroll_concurrency.max(1));
        while let Some(result) = enrolled.next().await {
            let (position, identity) = result?;
            identities[position] = Some(identity);
            bar.inc(1);
        }
        bar.finish();
    }
    Ok(identities
        .into_iter()
        .map(|identity| identity.expect("every missing identity was enrolled above"))
        .collect())
}

fn progress_bar(show: bool, total: usize, message: &'static str) -> ProgressBar {
    let target = if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total as u64), target).with_message(message);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn config(state_dir: &Path, account: &str) -> Config {
        Config::from_toml(&format!(
            "state_dir = \"{}\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\n[account]\n{account}\n",
            state_dir.display()
        ))
        .expect("a valid config")
    }

    fn options(devices: usize) -> SimulationOptions {
        SimulationOptions {
            devices,
            enrollment: None,
            enroll_concurrency: 4,
            clock: Arc::new(SystemClock),
            show_progress: false,
        }
    }

    #[tokio::test]
    async fn a_simulation_never_manages_the_machines_accounts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Simulation::prepare(config(dir.path(), "backend = \"linux\""), options(1))
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("backend = \"file\""), "{err}");
        assert!(!dir.path().join(DEVICES_DIR).exists(), "nothing was made");
    }

    #[tokio::test]
    async fn devices_not_enrolled_need_enrollment_settings_and_the_error_says_how_many() {
        let dir = tempfile::tempdir().expect("tempdir");
        let account = "backend = \"file\"\npath = \"/nonexistent\"";
        let err = Simulation::prepare(config(dir.path(), account), options(3))
            .await
            .err()
            .expect("refused");
        assert!(
            err.to_string()
                .contains("3 of 3 simulated devices are not enrolled yet"),
            "{err}"
        );
    }
}
