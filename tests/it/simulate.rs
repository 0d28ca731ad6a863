//! The fleet simulator (`fleetlaps-agent simulate`): many simulated devices in one process,
//! against a real nats-server (as the simulator's own nkey user) and the real orchestrator. Every
//! device enrolls, backs up its password and holds the one the orchestrator returns; devices
//! stopped and started again resume with their own identity and state.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetlaps_agent::account::{Account, AccountBackend, FileAccounts};
use fleetlaps_agent::clock::SystemClock;
use fleetlaps_agent::identity::Identity;
use fleetlaps_agent::simulate::{EnrollmentSettings, Simulation, SimulationOptions};
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::ids::DeviceId;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::apps::{ADMIN_TOKEN, OPERATOR_TOKEN, TestOrchestrator, binary, create_enrollment_token};
use crate::harness::{NatsOptions, TestNats, wait_until};

/// A safety net only: a loaded machine is slow, and nothing here measures time.
const FLEET_TIMEOUT: Duration = Duration::from_secs(300);

/// A nats-server run the production way, with the simulator's user (`--simulator-nkey`).
pub(crate) fn nats_with_simulator() -> TestNats {
    TestNats::start_with(NatsOptions {
        simulator: true,
        ..NatsOptions::default()
    })
}

/// The simulator's config: its directory, NATS as the simulator's user, file accounts hashed
/// with the fewest rounds SHA-512 crypt allows (the fleet's devices share the test's cores).
pub(crate) fn simulator_config(nats: &TestNats, state_dir: &Path) -> String {
    let seed = nats.simulator_seed_file().expect("a server with the simulator's user");
    format!(
        r#"
state_dir = "{state_dir}"
processing_interval_secs = 3600
password_hash_rounds = 1000
[nats]
url = "{url}"
ack_timeout_secs = 10
nkey_seed_file = "{seed}"
[account]
backend = "file"
path = "{state_dir}/unused"
"#,
        state_dir = state_dir.display(),
        url = nats.url(),
        seed = seed.display(),
    )
}

/// A fleet of `devices` simulated in this process from `config` (a [`simulator_config`]),
/// enrolled with `orchestrator` by one enrollment token, not started.
pub(crate) async fn enrolled_fleet(orchestrator: &TestOrchestrator, devices: usize, config: &str) -> Simulation {
    let (token, _) = create_enrollment_token(orchestrator, json!({"name": "simulated", "maxUses": devices})).await;
    let config = fleetlaps_agent::Config::from_toml(config).expect("a valid config");
    Simulation::prepare(
        config,
        SimulationOptions {
            devices,
            enrollment: Some(EnrollmentSettings {
                orchestrator_url: orchestrator.base_url.clone(),
                token: secrecy::SecretString::from(token),
                ca_file: Some(PathBuf::from(&orchestrator.tls_certificate)),
                insecure_http: false,
            }),
            enroll_concurrency: 16,
            clock: Arc::new(SystemClock),
            show_progress: false,
        },
    )
    .await
    .expect("the fleet enrolls")
}

/// Starts every device of `simulation` and waits until each has backed up a password.
pub(crate) async fn start_until_backed_up(simulation: &mut Simulation) {
    simulation.start_all().await.expect("the fleet starts");
    tokio::time::timeout(FLEET_TIMEOUT, simulation.wait_until_all_backed_up())
        .await
        .expect("every device backs up in time")
        .expect("the states are readable");
}

/// A fleet of `devices` simulated in this process from `config` (a [`simulator_config`]),
/// enrolled with `orchestrator`, started, and every device backed up.
pub(crate) async fn backed_up_fleet(orchestrator: &TestOrchestrator, devices: usize, config: &str) -> Simulation {
    let mut simulation = enrolled_fleet(orchestrator, devices, config).await;
    start_until_backed_up(&mut simulation).await;
    simulation
}

/// The devices the orchestrator knows, as `(id, displayName)`, every page of them.
async fn known_devices(orchestrator: &TestOrchestrator) -> Vec<(DeviceId, String)> {
    orchestrator
        .directory()
        .await
        .iter()
        .map(|device| {
            (
                DeviceId::parse(device["id"].as_str().expect("an id")).expect("a device id"),
                device["displayName"].as_str().expect("a name").to_owned(),
            )
        })
        .collect()
}

/// How many times the one enrollment token was used.
async fn enrollment_token_uses(orchestrator: &TestOrchestrator) -> u64 {
    let tokens: Value = orchestrator
        .get("/v1.0/fleetlaps/enrollmentTokens", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .expect("json");
    tokens["value"][0]["uses"].as_u64().expect("a use count")
}

/// Asks the orchestrator to rotate `device_id`'s password (Intune's action).
async fn request_rotation(orchestrator: &TestOrchestrator, device_id: &DeviceId) {
    let response = orchestrator
        .http
        .post(format!(
            "{}/v1.0/deviceManagement/managedDevices/{device_id}/rotateLocalAdminPassword",
            orchestrator.base_url
        ))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status(), StatusCode::NO_CONTENT, "rotating {device_id}");
}

/// A simulated device as the binary leaves it on disk: its identity and account file.
struct DeviceOnDisk {
    device_id: DeviceId,
    accounts: FileAccounts,
}

impl DeviceOnDisk {
    /// The device named `name`, once its identity is saved.
    fn load(state_dir: &Path, name: &str) -> Option<Self> {
        let dir = state_dir.join("devices").join(name);
        let identity = Identity::load(&dir).expect("readable")?;
        Some(Self {
            device_id: identity.device_id,
            accounts: FileAccounts::new(dir.join("accounts")),
        })
    }

    /// The managed account: the orchestrator's policy names none, so the UID 0 account.
    fn account(&self) -> Account {
        self.accounts.resolve(None).expect("the managed account")
    }

    /// The managed account's hash, once the simulator has made the account file.
    fn hash(&self) -> Option<String> {
        let account = self.accounts.resolve(None).ok()?;
        Some(self.accounts.password_hash(&account).expect("readable"))
    }
}

/// Runs `fleetlaps-agent simulate` with `args` after the config, logging to `log`.
fn spawn_simulator(config: &Path, args: &[&str], token: Option<&str>, log: &Path) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(binary("fleetlaps-agent"));
    command
        .arg("--config")
        .arg(config)
        .arg("simulate")
        .args(args)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("FLEETLAPS_") || name.starts_with("LAPS_") {
            command.env_remove(name.as_ref());
        }
    }
    if let Some(token) = token {
        command.env("LAPS_ENROLLMENT_TOKEN", token);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("the simulator's log");
    command.stderr(log);
    command.spawn().expect("starting fleetlaps-agent simulate")
}

/// Stops the simulator as a service stop does (SIGTERM) and checks it exited cleanly.
async fn stop_simulator(mut child: tokio::process::Child, log: &Path) {
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(FLEET_TIMEOUT, child.wait())
        .await
        .expect("the simulator stops")
        .expect("waited");
    assert!(
        status.success(),
        "the simulator failed: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[tokio::test]
async fn the_simulator_binary_enrolls_a_fleet_that_backs_up_and_a_restart_reuses_every_identity() {
    // Arrange: one enrollment token for the whole fleet.
    const DEVICES: usize = 200;
    let nats = nats_with_simulator();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let (token, _) = create_enrollment_token(&orchestrator, json!({"name": "fleet", "maxUses": DEVICES})).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("simulator");
    let config = dir.path().join("simulator.toml");
    std::fs::write(&config, simulator_config(&nats, &state_dir)).expect("writing the config");
    let log = dir.path().join("simulator.log");
    let certificate = orchestrator.tls_certificate.to_str().expect("utf-8");
    let devices = DEVICES.to_string();

    // Act
    let simulator = spawn_simulator(
        &config,
        &[
            "--devices",
            &devices,
            "--orchestrator",
            &orchestrator.base_url,
            "--ca",
            certificate,
        ],
        Some(&token),
        &log,
    );

    // Assert: the orchestrator knows every device, each under its simulated name.
    let known = wait_until(
        "the orchestrator knows every simulated device",
        FLEET_TIMEOUT,
        || async {
            let known = known_devices(&orchestrator).await;
            (known.len() == DEVICES).then_some(known)
        },
    )
    .await;
    // An identity is saved once the orchestrator's answer arrives, a moment after it recorded
    // the enrollment.
    let fleet = wait_until("every simulated identity is saved", FLEET_TIMEOUT, || async {
        (1..=DEVICES)
            .map(|index| DeviceOnDisk::load(&state_dir, &format!("sim-{index:05}")))
            .collect::<Option<Vec<_>>>()
    })
    .await;
    let devices_dir_mode = std::fs::metadata(state_dir.join("devices"))
        .expect("the devices' directory")
        .permissions()
        .mode();
    assert_eq!(devices_dir_mode & 0o077, 0, "the identities are kept owner-only");
    for (index, device) in fleet.iter().enumerate() {
        let name = &known.iter().find(|(id, _)| *id == device.device_id).expect("known").1;
        assert_eq!(*name, format!("sim-{:05}", index + 1));
    }
    // Every account gets a password only once its backup is confirmed stored; each is the
    // password the orchestrator returns for that device.
    wait_until("every simulated account has a password", FLEET_TIMEOUT, || async {
        fleet
            .iter()
            .all(|device| device.hash().is_some_and(|hash| hash.starts_with("$6$")))
            .then_some(())
    })
    .await;
    for device in &fleet {
        let passwords = orchestrator.wait_for_passwords(&device.device_id, 1).await;
        assert!(
            device
                .accounts
                .verify_password(&device.account(), &passwords[0])
                .expect("readable"),
            "{} holds the password the orchestrator returns",
            device.device_id
        );
    }
    stop_simulator(simulator, &log).await;

    // Act: start it again, without a token: every identity is reused.
    let simulator = spawn_simulator(&config, &["--devices", &devices], None, &log);
    let sample: Vec<&DeviceOnDisk> = fleet.iter().step_by(40).collect();
    let before: Vec<Option<String>> = sample.iter().map(|device| device.hash()).collect();
    for device in &sample {
        request_rotation(&orchestrator, &device.device_id).await;
    }

    // Assert: the restarted devices take the rotation as the same devices; nothing re-enrolled.
    for (device, before) in sample.iter().zip(&before) {
        wait_until("a restarted device rotated", FLEET_TIMEOUT, || async {
            (device.hash() != *before).then_some(())
        })
        .await;
        let newest = orchestrator.wait_for_passwords(&device.device_id, 2).await.remove(0);
        assert!(
            device
                .accounts
                .verify_password(&device.account(), &newest)
                .expect("readable")
        );
    }
    assert_eq!(known_devices(&orchestrator).await.len(), DEVICES);
    assert_eq!(enrollment_token_uses(&orchestrator).await, DEVICES as u64);
    stop_simulator(simulator, &log).await;
}

#[tokio::test]
async fn devices_stopped_while_a_rotation_is_requested_take_it_when_started_again_with_their_own_state() {
    // Arrange: a fleet, simulated in this process, all backed up.
    const DEVICES: usize = 100;
    let nats = nats_with_simulator();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let (token, _) = create_enrollment_token(&orchestrator, json!({"name": "fleet", "maxUses": DEVICES})).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("simulator");
    let prepare = |enrollment: Option<EnrollmentSettings>| {
        let config = fleetlaps_agent::Config::from_toml(&simulator_config(&nats, &state_dir)).expect("a valid config");
        Simulation::prepare(
            config,
            SimulationOptions {
                devices: DEVICES,
                enrollment,
                enroll_concurrency: 8,
                clock: Arc::new(SystemClock),
                show_progress: false,
            },
        )
    };
    let mut simulation = prepare(Some(EnrollmentSettings {
        orchestrator_url: orchestrator.base_url.clone(),
        token: secrecy::SecretString::from(token),
        ca_file: Some(PathBuf::from(&orchestrator.tls_certificate)),
        insecure_http: false,
    }))
    .await
    .expect("the fleet enrolls");
    start_until_backed_up(&mut simulation).await;
    let device_ids = simulation.device_ids();
    let first_hashes: Vec<String> = device_ids
        .iter()
        .map(|device_id| simulation.password_hash(device_id).expect("readable"))
        .collect();
    let (stopped, running) = device_ids.split_at(DEVICES / 10);

    // Act: a tenth of the fleet stops; a rotation is requested for every device.
    simulation.stop(stopped).await.expect("the devices stop");
    for device_id in &device_ids {
        request_rotation(&orchestrator, device_id).await;
    }

    // Assert: the running devices rotate to the password the orchestrator returns; the stopped
    // ones keep theirs.
    for (device_id, first) in running.iter().zip(&first_hashes[stopped.len()..]) {
        wait_until("a running device rotated", FLEET_TIMEOUT, || async {
            (simulation.password_hash(device_id).expect("readable") != *first).then_some(())
        })
        .await;
    }
    for device_id in running.iter().step_by(15) {
        let newest = orchestrator.wait_for_passwords(device_id, 2).await.remove(0);
        assert!(simulation.verify_password(device_id, &newest).expect("readable"));
    }
    for (device_id, first) in stopped.iter().zip(&first_hashes) {
        assert!(!simulation.is_running(device_id));
        assert_eq!(simulation.password_hash(device_id).expect("readable"), *first);
    }

    // Act: the stopped devices start again.
    simulation.start(stopped).await.expect("the devices start");

    // Assert: each takes the rotation it missed, as the same device, from its own state.
    for (device_id, first) in stopped.iter().zip(&first_hashes) {
        wait_until("a restarted device rotated", FLEET_TIMEOUT, || async {
            (simulation.password_hash(device_id).expect("readable") != *first).then_some(())
        })
        .await;
        let passwords = orchestrator.wait_for_passwords(device_id, 2).await;
        assert!(simulation.verify_password(device_id, &passwords[0]).expect("readable"));
        assert!(!simulation.verify_password(device_id, &passwords[1]).expect("readable"));
    }
    // What `fleetlaps-agent status` would show of one: the same device, nothing pending.
    let status = match simulation.request(&stopped[0], ControlRequest::Status).await {
        Ok(ControlResponse::Status(report)) => report,
        other => panic!("status answered {other:?}"),
    };
    assert_eq!(status.device_id, stopped[0].to_string());
    assert!(status.pending_rotation.is_none() && status.outbox_pending == 0);
    assert_eq!(known_devices(&orchestrator).await.len(), DEVICES);
    assert_eq!(enrollment_token_uses(&orchestrator).await, DEVICES as u64);

    // And a simulation prepared again on the same directory needs no enrollment at all.
    simulation.stop_all().await.expect("the fleet stops");
    drop(simulation);
    let again = prepare(None).await.expect("every identity is reused");
    assert_eq!(again.device_ids(), device_ids);
}
