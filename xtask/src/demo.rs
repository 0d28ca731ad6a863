//! `cargo xtask demo`: a JetStream server and a small fleet on loopback, under `target/demo/`.
//!
//! This module sets up what every demo needs (a fresh directory, release binaries, nats-server
//! run the production way: the config `fleetlaps-orchestrator nats-config` renders, an nkey user
//! for the orchestrator and one per device) and hands over to [`fleet::run`], which starts the
//! orchestrator and agents.

mod fleet;
mod monitoring;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::tools::{self, ChildGuard, Interrupt, NATS_SERVER, PROMETHEUS, PROMTOOL};

/// How long nats-server may take to accept connections (it recovers no streams: the store is new).
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the fleet part of the demo gets to work with.
#[derive(Debug)]
pub(crate) struct DemoEnv {
    /// `target/demo/`, created empty for this run: everything the demo writes goes below it.
    pub(crate) root: PathBuf,
    /// The running JetStream server, `nats://127.0.0.1:<port>`.
    pub(crate) nats_url: String,
    /// Its configuration, which admits enrolled devices.
    pub(crate) nats: DemoNats,
    /// The release binaries: `fleetlaps-agent`, `fleetlaps-orchestrator`, `lapsctl`.
    pub(crate) bin_dir: PathBuf,
    /// Set on Ctrl-C or SIGTERM: loops poll it (or use [`Interrupt::sleep`]) and return, and the
    /// [`ChildGuard`]s are dropped, which stops the processes.
    pub(crate) interrupt: Interrupt,
    /// Stay up after the walk-through until Ctrl-C.
    pub(crate) keep_running: bool,
}

/// Runs the demo until it finishes, fails, or is interrupted (which is a clean exit).
pub(crate) fn run(keep_running: bool) -> anyhow::Result<()> {
    let interrupt = Interrupt::install()?;
    let result = set_up_and_run(interrupt.clone(), keep_running);
    // By now every guard is dropped, so every process the demo started has exited.
    if interrupt.is_set() {
        // After Ctrl-C, whatever failed failed because of the interruption.
        tools::step("demo stopped");
        return Ok(());
    }
    result
}

/// The demo's nats-server configuration: rendered by `fleetlaps-orchestrator nats-config`, with
/// the orchestrator's nkey user, once enrolled one per device, and the fleet simulator's user
/// (`--simulator-nkey`: the demo is a development fleet, never production).
#[derive(Debug)]
pub(crate) struct DemoNats {
    /// `fleetlaps-orchestrator`, which renders the config and makes nkeys.
    orchestrator_binary: PathBuf,
    /// The orchestrator's nkey seed file, for `nats.nkey_seed_file`.
    pub(crate) orchestrator_seed: PathBuf,
    /// Its public key.
    orchestrator_key: String,
    /// The fleet simulator's nkey seed file (`fleetlaps-agent simulate`).
    pub(crate) simulator_seed: PathBuf,
    /// Its public key.
    simulator_key: String,
    /// `127.0.0.1:<port>`.
    listen: String,
    /// JetStream's store.
    store_dir: PathBuf,
    /// The server's version, as `nats-server --version` gives it.
    server_version: String,
    /// Where the config is written.
    config_path: PathBuf,
}

impl DemoNats {
    /// Renders the config for `devices` (`DEVICE_ID=NKEY_PUBLIC_KEY`) into the config file.
    fn render(&self, devices: &[String]) -> anyhow::Result<()> {
        let mut command = Command::new(&self.orchestrator_binary);
        command
            .args(["nats-config", "--orchestrator-nkey", &self.orchestrator_key])
            .args(["--simulator-nkey", &self.simulator_key])
            .args(["--listen", &self.listen, "--server-version", &self.server_version])
            .arg("--store-dir")
            .arg(&self.store_dir);
        for device in devices {
            command.args(["--device", device]);
        }
        let output = command.output().context("running fleetlaps-orchestrator nats-config")?;
        anyhow::ensure!(
            output.status.success(),
            "fleetlaps-orchestrator nats-config failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        fs::write(&self.config_path, &output.stdout).with_context(|| format!("writing {}", self.config_path.display()))
    }

    /// Renders the config for `devices` and has the running server (`pid`) reload it, as
    /// `systemctl reload nats-server` does.
    pub(crate) fn admit(&self, devices: &[String], pid: u32) -> anyhow::Result<()> {
        self.render(devices)?;
        tools::run_step(Command::new("kill").args(["-HUP", &pid.to_string()]))
    }
}

/// A new nkey seed file at `path` (`fleetlaps-orchestrator nkey`); returns its public key.
pub(crate) fn make_nkey(orchestrator_binary: &Path, path: &Path) -> anyhow::Result<String> {
    let output = Command::new(orchestrator_binary)
        .args(["nkey", "--seed-file"])
        .arg(path)
        .output()
        .context("running fleetlaps-orchestrator nkey")?;
    anyhow::ensure!(
        output.status.success(),
        "fleetlaps-orchestrator nkey failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn set_up_and_run(interrupt: Interrupt, keep_running: bool) -> anyhow::Result<()> {
    tools::step("ensure system tools: nats-server, prometheus, promtool");
    tools::ensure_system_tools(&[NATS_SERVER, PROMETHEUS, PROMTOOL])?;
    let nats_server = NATS_SERVER.path()?;

    let root = tools::target_dir().join("demo");
    tools::step(&format!("fresh demo directory {}", root.display()));
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;

    tools::run_step(&mut tools::cargo_command([
        "build",
        "--release",
        "--bins",
        "-p",
        "fleetlaps-agent",
        "-p",
        "fleetlaps-orchestrator",
    ]))?;
    interrupt.check()?;
    let bin_dir = tools::target_dir().join("release");
    let orchestrator_binary = bin_dir.join("fleetlaps-orchestrator");

    let port = tools::free_loopback_port()?;
    let nats_url = format!("nats://127.0.0.1:{port}");
    let log_path = root.join("nats.log");
    fs::create_dir_all(root.join("nats"))?;
    let orchestrator_seed = root.join("nats").join("orchestrator.nk");
    let simulator_seed = root.join("nats").join("simulator.nk");
    let version_output = Command::new(&nats_server)
        .arg("--version")
        .output()
        .context("running nats-server --version")?;
    let demo_nats = DemoNats {
        orchestrator_key: make_nkey(&orchestrator_binary, &orchestrator_seed)?,
        simulator_key: make_nkey(&orchestrator_binary, &simulator_seed)?,
        simulator_seed,
        orchestrator_binary,
        orchestrator_seed,
        listen: format!("127.0.0.1:{port}"),
        store_dir: root.join("nats").join("store"),
        server_version: String::from_utf8_lossy(&version_output.stdout)
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_owned(),
        config_path: root.join("nats").join("nats-server.conf"),
    };
    demo_nats.render(&[])?;
    tools::step(&format!(
        "start nats-server with JetStream at {nats_url}, config {} rendered by `fleetlaps-orchestrator nats-config` \
         (nkey users only; log: {})",
        demo_nats.config_path.display(),
        log_path.display()
    ));
    let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log_for_stderr = log.try_clone().context("duplicating the log file handle")?;
    // Dropped last (declared before the fleet's guards), so the fleet shuts down against a live server.
    let mut nats = ChildGuard::spawn(
        "nats-server",
        Command::new(nats_server)
            .arg("-c")
            .arg(&demo_nats.config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr),
    )?;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    tools::wait_until_listening(address, NATS_READY_TIMEOUT, &mut nats, &interrupt).with_context(|| {
        format!(
            "waiting for nats-server; the end of {}:\n{}",
            log_path.display(),
            tools::log_tail(&log_path, 4096)
        )
    })?;

    let env = DemoEnv {
        root,
        nats_url,
        nats: demo_nats,
        bin_dir,
        interrupt,
        keep_running,
    };
    fleet::run(&env, &nats)
}
