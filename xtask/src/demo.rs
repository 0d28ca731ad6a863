//! `cargo xtask demo`: a JetStream server and a small fleet on loopback, under `target/demo/`.
//!
//! This module sets up what every demo needs (a fresh directory, nats-server, release binaries)
//! and hands over to [`fleet::run`], which starts the orchestrator and agents.

mod fleet;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::tools::{self, ChildGuard, Interrupt, NATS_SERVER};

/// How long nats-server may take to accept connections (it recovers no streams: the store is new).
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the fleet part of the demo gets to work with.
#[derive(Debug)]
pub(crate) struct DemoEnv {
    /// `target/demo/`, created empty for this run: everything the demo writes goes below it.
    pub(crate) root: PathBuf,
    /// The running JetStream server, `nats://127.0.0.1:<port>`.
    pub(crate) nats_url: String,
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

fn set_up_and_run(interrupt: Interrupt, keep_running: bool) -> anyhow::Result<()> {
    tools::step("ensure system tools: nats-server");
    tools::ensure_system_tools(&[NATS_SERVER])?;
    let nats_server = NATS_SERVER.path()?;

    let root = tools::target_dir().join("demo");
    tools::step(&format!("fresh demo directory {}", root.display()));
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;

    let port = tools::free_loopback_port()?;
    let nats_url = format!("nats://127.0.0.1:{port}");
    let log_path = root.join("nats.log");
    tools::step(&format!(
        "start nats-server with JetStream at {nats_url} (log: {})",
        log_path.display()
    ));
    let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log_for_stderr = log.try_clone().context("duplicating the log file handle")?;
    // Dropped last (declared before the fleet's guards), so the fleet shuts down against a live server.
    let mut nats = ChildGuard::spawn(
        "nats-server",
        Command::new(nats_server)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(root.join("nats"))
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

    let env = DemoEnv {
        root,
        nats_url,
        bin_dir: tools::target_dir().join("release"),
        interrupt,
        keep_running,
    };
    fleet::run(&env)
}
