//! The fleet part of the demo: the orchestrator and three agents (file-backed accounts), started
//! against the demo's nats-server, then a walk-through of what fleetlaps does.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::DemoEnv;
use crate::tools::{self, ChildGuard};

/// The devices of the demo fleet.
const DEVICES: [&str; 3] = ["demo-01", "demo-02", "demo-03"];
/// The account each device manages.
const MANAGED_ACCOUNT: &str = "lapsadmin";
/// How long the fleet may take to back up its first passwords.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the orchestrator and the agents, walks through a retrieval and a rotation, and returns
/// (or, with `--keep-running`, waits for Ctrl-C). Every process stops when its guard drops.
pub(crate) fn run(env: &DemoEnv, nats_server: &ChildGuard) -> anyhow::Result<()> {
    let admin_token = random_token()?;
    let http_port = tools::free_loopback_port()?;
    let metrics_port = tools::free_loopback_port()?;
    let orchestrator_dir = env.root.join("orchestrator");
    fs::create_dir_all(&orchestrator_dir)?;
    let orchestrator_config = orchestrator_dir.join("orchestrator.toml");
    write_private(
        &orchestrator_config,
        &format!(
            r#"data_dir = "{data}"
[nats]
url = "{nats}"
nkey_seed_file = "{seed}"
[http]
listen = "127.0.0.1:{http_port}"
[http.tls]
self_signed = true
[metrics]
listen = "127.0.0.1:{metrics_port}"
[monitoring]
silent_after_secs = {SILENT_AFTER_SECS}
"#,
            data = orchestrator_dir.join("data").display(),
            nats = env.nats_url,
            seed = env.nats.orchestrator_seed.display(),
        ),
    )?;
    let base_url = format!("https://127.0.0.1:{http_port}");
    // The orchestrator makes this self-signed certificate at first start; lapsctl trusts it.
    let certificate = orchestrator_dir.join("data").join("tls").join("cert.pem");

    tools::step(&format!(
        "start the orchestrator: API {base_url} (self-signed certificate {}), metrics http://127.0.0.1:{metrics_port}/metrics",
        certificate.display()
    ));
    let mut orchestrator = ChildGuard::spawn(
        "orchestrator",
        Command::new(env.bin_dir.join("fleetlaps-orchestrator"))
            .args(["run", "--config"])
            .arg(&orchestrator_config)
            // The bootstrap admin token: from the environment, hashed at start, never stored.
            .env("FLEETLAPS_BOOTSTRAP_ADMIN_TOKEN", &admin_token)
            .stdout(log_file(&orchestrator_dir.join("orchestrator.log"))?)
            .stderr(log_file(&orchestrator_dir.join("orchestrator.log"))?),
    )?;
    tools::wait_until_listening(
        SocketAddr::from((Ipv4Addr::LOCALHOST, http_port)),
        Duration::from_secs(30),
        &mut orchestrator,
        &env.interrupt,
    )
    .with_context(|| {
        format!(
            "the orchestrator did not start; see {}",
            orchestrator_dir.join("orchestrator.log").display()
        )
    })?;
    // Prometheus first, as in production: it sees every backup and rotation of the walk-through.
    let prometheus = super::monitoring::start(env, metrics_port)?;

    let admin = Lapsctl {
        binary: env.bin_dir.join("lapsctl"),
        base_url: base_url.clone(),
        certificate: certificate.clone(),
        token: admin_token,
    };
    tools::step(
        "the bootstrap admin makes one enrollment token for the three devices (lapsctl enrollment-token create)",
    );
    let created = admin.stdout(&[
        "enrollment-token",
        "create",
        "--name",
        "demo-fleet",
        "--max-uses",
        "3",
        "--expires-in-hours",
        "1",
        "-o",
        "json",
    ])?;
    let created: serde_json::Value =
        serde_json::from_str(&created).context("lapsctl enrollment-token create printed no JSON")?;
    let enrollment_token = created[0]["Token"]
        .as_str()
        .context("lapsctl enrollment-token create printed no Token")?
        .to_owned();

    let mut agents = Vec::new();
    let mut agent_configs = Vec::new();
    let mut admitted = Vec::new();
    for device in DEVICES {
        let device_dir = env.root.join("agents").join(device);
        fs::create_dir_all(&device_dir)?;
        let accounts = device_dir.join("accounts");
        write_private(&accounts, &format!("root:0:!\n{MANAGED_ACCOUNT}:1001:!\n"))?;
        let device_seed = device_dir.join("nats.nk");
        let device_key = super::make_nkey(&env.bin_dir.join("fleetlaps-orchestrator"), &device_seed)?;
        let config = device_dir.join("agent.toml");
        write_private(
            &config,
            &format!(
                r#"device_name = "{device}"
state_dir = "{state}"
processing_interval_secs = {HEARTBEAT_SECS}
[nats]
url = "{nats}"
nkey_seed_file = "{seed}"
[account]
backend = "file"
path = "{accounts}"
[policy]
AdministratorAccountName = "{MANAGED_ACCOUNT}"
PasswordAgeDays = 30
PasswordComplexity = 4
PasswordLength = 14
"#,
                state = device_dir.join("state").display(),
                nats = env.nats_url,
                seed = device_seed.display(),
                accounts = accounts.display(),
            ),
        )?;
        tools::step(&format!(
            "enroll {device} (fleetlaps-agent enroll --orchestrator {base_url} --ca …)"
        ));
        // The token goes in the environment, so other local users cannot read it on the command
        // line; errors name the command without its environment, which holds the token.
        let enrolled = Command::new(env.bin_dir.join("fleetlaps-agent"))
            .arg("--config")
            .arg(&config)
            .args(["enroll", "--orchestrator", &base_url, "--ca"])
            .arg(&certificate)
            .env("LAPS_ENROLLMENT_TOKEN", &enrollment_token)
            .output()
            .context("running fleetlaps-agent enroll")?;
        anyhow::ensure!(
            enrolled.status.success(),
            "fleetlaps-agent enroll for {device} failed: {}",
            String::from_utf8_lossy(&enrolled.stderr).trim()
        );
        let enrolled = String::from_utf8_lossy(&enrolled.stdout);
        print!("{enrolled}");
        let device_id = enrolled
            .strip_prefix("enrolled as device ")
            .and_then(|rest| rest.split_whitespace().next())
            .context("fleetlaps-agent enroll did not print the device id")?;
        // As an operator enrolls a device on NATS: render the config again with it, and reload.
        admitted.push(format!("{device_id}={device_key}"));
        tools::step(&format!(
            "admit {device} to NATS: nats-config --device {device_id}=<its nkey>, then reload nats-server (SIGHUP)"
        ));
        env.nats.admit(&admitted, nats_server.id())?;
        tools::step(&format!("start agent {device} (accounts in {})", accounts.display()));
        agents.push(ChildGuard::spawn(
            format!("agent {device}"),
            Command::new(env.bin_dir.join("fleetlaps-agent"))
                .arg("--config")
                .arg(&config)
                .arg("run")
                .stdout(log_file(&device_dir.join("agent.log"))?)
                .stderr(log_file(&device_dir.join("agent.log"))?),
        )?);
        agent_configs.push(config);
    }

    print!("{}", admin.stdout(&["enrollment-token", "list"])?);
    tools::step("the bootstrap admin makes a token for the demo's operator (lapsctl token create)");
    let created = admin.stdout(&[
        "token",
        "create",
        "--name",
        "demo-operator",
        "--scope",
        "DeviceLocalCredential.Read.All",
        "--scope",
        "DeviceLocalCredential.Rotate",
        "--scope",
        "Audit.Read.All",
        "--scope",
        "Device.Read.All",
        "--scope",
        "Breach.Declare",
        "-o",
        "json",
    ])?;
    let created: serde_json::Value = serde_json::from_str(&created).context("lapsctl token create printed no JSON")?;
    let token = created[0]["Token"]
        .as_str()
        .context("lapsctl token create printed no Token")?
        .to_owned();
    print!("{}", admin.stdout(&["token", "list"])?);
    // Made now, while the admin's token is at hand.
    let simulator_token = simulator_enrollment_token(&admin)?;
    let lapsctl = Lapsctl {
        token: token.clone(),
        ..admin
    };
    tools::step("wait until every device has backed up a password");
    let deadline = Instant::now() + BACKUP_TIMEOUT;
    for device in DEVICES {
        loop {
            // The metadata alone (no password read to audit): a device known to the centre has a
            // password expiration time once its first backup is stored.
            let output = lapsctl.run(&["get-password", "--device", device, "-o", "json"])?;
            let backed_up = output.status.success()
                && serde_json::from_slice::<serde_json::Value>(&output.stdout)
                    .is_ok_and(|entries| entries[0]["PasswordExpirationTime"].is_string());
            if backed_up {
                break;
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{device} did not back up a password within {BACKUP_TIMEOUT:?}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            env.interrupt.sleep(Duration::from_millis(250))?;
        }
    }
    print!("{}", lapsctl.stdout(&["get-password", "--device", DEVICES[0]])?);

    tools::step(&format!(
        "retrieve {}'s password with lapsctl and check it against the device's account",
        DEVICES[0]
    ));
    let password = lapsctl.password(DEVICES[0])?;
    check_password(&env.bin_dir, &agent_configs[0], &password)?;
    println!(
        "lapsctl returned {}'s password, and the device's account accepts it",
        DEVICES[0]
    );

    tools::step(&format!(
        "rotate {}'s password now from the centre (lapsctl rotate, Intune's \"Rotate local admin password\")",
        DEVICES[1]
    ));
    let before = lapsctl.password(DEVICES[1])?;
    print!(
        "{}",
        lapsctl.stdout(&["rotate", "--device", DEVICES[1], "--reason", "demo"])?
    );
    // The orchestrator has the backup once it has consumed it from the stream: poll for it.
    let deadline = Instant::now() + BACKUP_TIMEOUT;
    let after = loop {
        let newest = lapsctl.password(DEVICES[1])?;
        if newest != before {
            break newest;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the orchestrator did not receive the new backup in time"
        );
        env.interrupt.sleep(Duration::from_millis(250))?;
    };
    check_password(&env.bin_dir, &agent_configs[1], &after)?;
    println!(
        "{} has a new password, backed up before it was set; the history keeps the previous one:",
        DEVICES[1]
    );
    print!(
        "{}",
        lapsctl.stdout(&["get-password", "--device", DEVICES[1], "--include-passwords"])?
    );

    tools::step("the audit history: every password read and the rotation request (lapsctl audit)");
    let audit = lapsctl.stdout(&["audit", "--kind", "rotation_requested"])?;
    print!("{audit}");
    let reads = lapsctl.stdout(&["audit", "--kind", "password_read", "-o", "json"])?;
    let reads: serde_json::Value = serde_json::from_str(&reads).context("lapsctl audit printed no JSON")?;
    println!(
        "{} password reads recorded, each before its answer left the orchestrator",
        reads.as_array().map_or(0, Vec::len)
    );

    tools::step(&format!(
        "a simulated fleet of {SIMULATED_DEVICES} devices joins: fleetlaps-agent simulate, one process, each device with its own \
         identity, account and state, on the agent's own rotation code"
    ));
    let mut simulator = start_simulator(env, &lapsctl, &simulator_token)?;
    println!(
        "{SIMULATED_DEVICES} simulated devices enrolled and backed up (log: {})",
        env.root.join("simulator").join("simulator.log").display()
    );

    tools::step(
        "a breach: the security team rotates the whole fleet at once (lapsctl breach declare --all, then watch)",
    );
    let before: Vec<String> = DEVICES
        .iter()
        .map(|device| lapsctl.password(device))
        .collect::<anyhow::Result<_>>()?;
    let declared = lapsctl.stdout(&[
        "breach",
        "declare",
        "--all",
        "--reason",
        "demo: phished administrator",
        "--deadline-in-hours",
        "1",
        "-o",
        "json",
    ])?;
    let declared: serde_json::Value =
        serde_json::from_str(&declared).context("lapsctl breach declare printed no JSON")?;
    let breach_id = declared[0]["Id"]
        .as_str()
        .context("lapsctl breach declare printed no Id")?
        .to_owned();
    // The progress bar draws on this terminal.
    let watched = Command::new(&lapsctl.binary)
        .args(["--url", &lapsctl.base_url])
        .arg("--ca")
        .arg(&lapsctl.certificate)
        .args(["breach", "watch", &breach_id])
        .env("LAPSCTL_TOKEN", &lapsctl.token)
        .status()
        .context("running lapsctl breach watch")?;
    anyhow::ensure!(watched.success(), "lapsctl breach watch failed");
    for ((device, config), old) in DEVICES.iter().zip(&agent_configs).zip(&before) {
        let new = lapsctl.password(device)?;
        anyhow::ensure!(new != *old, "{device} still has its pre-breach password");
        check_password(&env.bin_dir, config, &new)?;
    }
    println!("every device has a new password, and each account accepts the one the centre returns");
    if let Some(status) = simulator.exit_status()? {
        anyhow::bail!("the fleet simulator exited early ({status})");
    }

    tools::step("metrics");
    println!("The orchestrator's metrics: http://127.0.0.1:{metrics_port}/metrics");
    // Two scrapes after the campaign, so Prometheus has seen its end.
    env.interrupt.sleep(Duration::from_secs(5))?;
    prometheus.show()?;

    let silent = DEVICES[2];
    tools::step(&format!(
        "a device goes silent: agent {silent} stops; after monitoring.silent_after_secs = {SILENT_AFTER_SECS} without a \
         heartbeat the orchestrator counts it silent, and Prometheus fires FleetlapsDevicesSilent"
    ));
    agents[2].stop().with_context(|| format!("stopping agent {silent}"))?;
    prometheus.wait_for_alert("FleetlapsDevicesSilent", &env.interrupt)?;
    prometheus.show_silent()?;
    println!("Logs and state: {}", env.root.display());
    for (guard, config) in agents.iter_mut().zip(&agent_configs).take(2) {
        if let Some(status) = guard.exit_status()? {
            anyhow::bail!("{} exited early ({status}); config {}", guard.name(), config.display());
        }
    }

    if env.keep_running {
        tools::step("the fleet keeps running: press Ctrl-C to stop");
        println!(
            "Prometheus: {} (its alerts at {}/alerts)",
            prometheus.url, prometheus.url
        );
        println!(
            "try: {} --url {base_url} --ca {} --token {token} get-password --device {} --include-passwords --as-plain-text",
            lapsctl.binary.display(),
            certificate.display(),
            DEVICES[2]
        );
        loop {
            env.interrupt.sleep(Duration::from_secs(1))?;
        }
    }
    tools::step("shut down");
    drop(agents);
    orchestrator.stop().context("stopping the orchestrator")?;
    Ok(())
}

/// Seconds between the agents' cycles, each of which puts a heartbeat.
const HEARTBEAT_SECS: u64 = 5;
/// How long without a heartbeat makes a demo device silent.
const SILENT_AFTER_SECS: u64 = 15;

/// How many devices the demo's fleet simulator simulates.
const SIMULATED_DEVICES: u32 = 300;
/// How long the simulated fleet may take to enroll and back up.
const SIMULATOR_TIMEOUT: Duration = Duration::from_secs(300);
/// What the simulator logs once every device is backed up.
const SIMULATOR_READY: &str = "every simulated device is backed up";

/// An enrollment token for the simulated fleet.
fn simulator_enrollment_token(admin: &Lapsctl) -> anyhow::Result<String> {
    let max_uses = SIMULATED_DEVICES.to_string();
    let created = admin.stdout(&[
        "enrollment-token",
        "create",
        "--name",
        "demo-simulator",
        "--max-uses",
        &max_uses,
        "-o",
        "json",
    ])?;
    let created: serde_json::Value =
        serde_json::from_str(&created).context("lapsctl enrollment-token create printed no JSON")?;
    Ok(created[0]["Token"]
        .as_str()
        .context("lapsctl enrollment-token create printed no Token")?
        .to_owned())
}

/// Writes the simulator's config (`target/demo/simulator/`), starts `fleetlaps-agent simulate`
/// against the demo, and waits until every simulated device is backed up.
fn start_simulator(env: &DemoEnv, lapsctl: &Lapsctl, token: &str) -> anyhow::Result<ChildGuard> {
    let dir = env.root.join("simulator");
    fs::create_dir_all(&dir)?;
    let config = dir.join("simulator.toml");
    write_private(
        &config,
        &format!(
            r#"state_dir = "{state}"
processing_interval_secs = {HEARTBEAT_SECS}
[nats]
url = "{nats}"
nkey_seed_file = "{seed}"
[account]
backend = "file"
path = "{state}/unused"
"#,
            state = dir.join("state").display(),
            nats = env.nats_url,
            seed = env.nats.simulator_seed.display(),
        ),
    )?;
    let log = dir.join("simulator.log");
    let mut simulator = ChildGuard::spawn(
        "fleet simulator",
        Command::new(env.bin_dir.join("fleetlaps-agent"))
            .arg("--config")
            .arg(&config)
            .args(["simulate", "--devices", &SIMULATED_DEVICES.to_string()])
            .args(["--orchestrator", &lapsctl.base_url])
            .arg("--ca")
            .arg(&lapsctl.certificate)
            .env("LAPS_ENROLLMENT_TOKEN", token)
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?),
    )?;
    let deadline = Instant::now() + SIMULATOR_TIMEOUT;
    loop {
        if fs::read_to_string(&log).is_ok_and(|text| text.contains(SIMULATOR_READY)) {
            return Ok(simulator);
        }
        if let Some(status) = simulator.exit_status()? {
            anyhow::bail!("the fleet simulator exited ({status}); see {}", log.display());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the simulated fleet was not backed up within {SIMULATOR_TIMEOUT:?}; see {}",
            log.display()
        );
        env.interrupt.sleep(Duration::from_millis(500))?;
    }
}

/// The admin CLI, pointed at the demo's orchestrator.
struct Lapsctl {
    binary: PathBuf,
    base_url: String,
    /// The orchestrator's self-signed certificate, passed as `--ca`.
    certificate: PathBuf,
    token: String,
}

impl Lapsctl {
    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.binary)
            .args(["--url", &self.base_url])
            .arg("--ca")
            .arg(&self.certificate)
            .args(args)
            .env("LAPSCTL_TOKEN", &self.token)
            .output()
            .with_context(|| format!("running {}", self.binary.display()))
    }

    fn stdout(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.run(args)?;
        anyhow::ensure!(
            output.status.success(),
            "lapsctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The newest password of `device`, in plain text.
    fn password(&self, device: &str) -> anyhow::Result<String> {
        let json = self.stdout(&[
            "get-password",
            "--device",
            device,
            "--include-passwords",
            "--as-plain-text",
            "-o",
            "json",
        ])?;
        let entries: serde_json::Value = serde_json::from_str(&json).context("lapsctl -o json printed no JSON")?;
        entries[0]["Password"]
            .as_str()
            .map(str::to_owned)
            .context("lapsctl printed no Password")
    }
}

/// Asks the agent's account backend whether `password` is the managed account's.
fn check_password(bin_dir: &Path, config: &Path, password: &str) -> anyhow::Result<()> {
    let mut child = Command::new(bin_dir.join("fleetlaps-agent"))
        .arg("--config")
        .arg(config)
        .arg("check-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running fleetlaps-agent check-password")?;
    child
        .stdin
        .take()
        .context("stdin is piped")?
        .write_all(password.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn log_file(path: &Path) -> anyhow::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Writes a file only its owner can read: configs hold tokens, account files hold hashes.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// A random API token for this demo run, from the kernel's CSPRNG.
fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}
