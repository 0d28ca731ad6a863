//! The bench's fleet: its own nats-server (configured by `fleetlaps-orchestrator nats-config`, as
//! in production and in the demo), the release orchestrator, enrolled devices and their signed
//! events.

use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use chrono::Utc;
use fleetlaps_proto::api::{
    EnrollmentRequest, EnrollmentResponse, EnrollmentTokenRequest, SIGNATURE_HEADER, TokenRequest,
};
use fleetlaps_proto::event::{
    AuthenticationObserved, Envelope, Event, PasswordBackedUp, RotationReason, sealing_context,
};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, EventId, RotationId};
use fleetlaps_proto::seal::{EscrowPublicKey, seal};
use fleetlaps_proto::signature::DeviceSigningKey;
use fleetlaps_proto::subject;
use futures::{StreamExt as _, TryStreamExt as _};
use indicatif::ProgressBar;
use serde_json::Value;

/// A child process stopped (SIGTERM, then SIGKILL after a grace period) and reaped when dropped,
/// so no server outlives the bench, even on an error.
#[derive(Debug)]
pub(crate) struct ChildGuard {
    name: String,
    child: Child,
}

/// How long a child gets to exit after SIGTERM before it is killed.
const GRACE_PERIOD: Duration = Duration::from_secs(10);

impl ChildGuard {
    /// Spawns `command`, its output appended to `log`.
    pub(crate) fn spawn(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("duplicating a log file handle")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} ({})", command.get_program().to_string_lossy()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// The process id.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub(crate) fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self
            .child
            .try_wait()
            .with_context(|| format!("checking {}", self.name))?
        {
            Some(status) => bail!("{} exited ({status})", self.name),
            None => Ok(()),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within the grace period; reaps it.
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // The `kill` command sends SIGTERM without unsafe code (forbidden in the workspace).
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        if sent.is_ok_and(|status| status.success()) {
            let deadline = Instant::now() + GRACE_PERIOD;
            while Instant::now() < deadline {
                if self.child.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("bench: {} ignored SIGTERM for {GRACE_PERIOD:?}, killing it", self.name);
        }
        let _ = self.child.kill();
        self.child.wait().with_context(|| format!("reaping {}", self.name))?;
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("bench: could not stop {}: {err:#}", self.name);
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("reading the bound port")?.port())
}

/// Waits until `port` on 127.0.0.1 accepts connections, failing if `child` exits first.
pub(crate) async fn wait_listening(port: u16, child: &mut ChildGuard, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        child.ensure_running()?;
        if Instant::now() >= deadline {
            bail!("{} did not listen on {address} within {timeout:?}", child.name);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes `contents` to a new file only its owner may read (nkey seeds, configs).
pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs `program args…` and returns its standard output, or an error with its standard error.
pub(crate) fn output_of(command: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = command.output().with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The bench's nats-server and the nkey users it admits.
#[derive(Debug)]
pub(crate) struct Nats {
    /// `nats://127.0.0.1:<port>`.
    pub(crate) url: String,
    /// The orchestrator's nkey seed file.
    pub(crate) orchestrator_seed: PathBuf,
    /// The fleet simulator's nkey seed file: its user may publish as any device.
    pub(crate) simulator_seed: PathBuf,
    /// The running server, stopped when dropped.
    server: ChildGuard,
    /// How its config is rendered, to admit devices later.
    render: NatsConfig,
    /// Its config file, rewritten by [`Nats::admit`].
    config_path: PathBuf,
}

/// The arguments of `fleetlaps-orchestrator nats-config` for the bench's server.
#[derive(Debug)]
struct NatsConfig {
    orchestrator_binary: PathBuf,
    orchestrator_key: String,
    simulator_key: String,
    /// `127.0.0.1:<port>`.
    listen: String,
    /// nats-server's version, which decides the durability settings rendered.
    version: String,
    store_dir: PathBuf,
}

impl NatsConfig {
    /// The config: the orchestrator's and the simulator's users, and each of `devices`
    /// (`DEVICE_ID=NKEY_PUBLIC_KEY`).
    fn render(&self, devices: &[String]) -> anyhow::Result<String> {
        let mut command = Command::new(&self.orchestrator_binary);
        command
            .args(["nats-config", "--orchestrator-nkey", &self.orchestrator_key])
            .args(["--simulator-nkey", &self.simulator_key])
            .args(["--listen", &self.listen, "--server-version", &self.version])
            .arg("--store-dir")
            .arg(&self.store_dir);
        for device in devices {
            command.args(["--device", device]);
        }
        output_of(&mut command, "fleetlaps-orchestrator nats-config")
    }
}

/// Makes an nkey seed file at `path` with `fleetlaps-orchestrator nkey`; its public key.
pub(crate) fn make_nkey(orchestrator_binary: &Path, path: &Path) -> anyhow::Result<String> {
    let out = output_of(
        Command::new(orchestrator_binary)
            .args(["nkey", "--seed-file"])
            .arg(path),
        "fleetlaps-orchestrator nkey",
    )?;
    Ok(out.trim().to_owned())
}

impl Nats {
    /// Renders the config with `fleetlaps-orchestrator nats-config` (an orchestrator user and a
    /// simulator user) under `work`, and starts `nats_server` with it.
    pub(crate) async fn start(orchestrator_binary: &Path, nats_server: &Path, work: &Path) -> anyhow::Result<Self> {
        let dir = work.join("nats");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let orchestrator_seed = dir.join("orchestrator.nk");
        let simulator_seed = dir.join("simulator.nk");
        let orchestrator_key = make_nkey(orchestrator_binary, &orchestrator_seed)?;
        let simulator_key = make_nkey(orchestrator_binary, &simulator_seed)?;
        let version = output_of(Command::new(nats_server).arg("--version"), "nats-server --version")?;
        let version = version.trim().rsplit(' ').next().unwrap_or_default().to_owned();
        let port = free_port()?;
        let render = NatsConfig {
            orchestrator_binary: orchestrator_binary.to_owned(),
            orchestrator_key,
            simulator_key,
            listen: format!("127.0.0.1:{port}"),
            version,
            store_dir: dir.join("store"),
        };
        let config = render.render(&[])?;
        let config_path = dir.join("nats-server.conf");
        write_private(&config_path, &config)?;
        let log = work.join("nats-server.log");
        let mut server = ChildGuard::spawn(
            "nats-server",
            Command::new(nats_server).arg("-c").arg(&config_path),
            &log,
        )?;
        wait_listening(port, &mut server, Duration::from_secs(10))
            .await
            .with_context(|| format!("starting nats-server; see {}", log.display()))?;
        Ok(Self {
            url: format!("nats://127.0.0.1:{port}"),
            orchestrator_seed,
            simulator_seed,
            server,
            render,
            config_path,
        })
    }

    /// Admits devices' own nkey users (`DEVICE_ID=NKEY_PUBLIC_KEY`, as `nats-config --device`
    /// takes them): renders the config again with them and has the server reload it (SIGHUP).
    pub(crate) fn admit(&self, devices: &[String]) -> anyhow::Result<()> {
        let config = self.render.render(devices)?;
        write_private(&self.config_path, &config)?;
        output_of(
            Command::new("kill").args(["-HUP", &self.server.id().to_string()]),
            "kill -HUP nats-server",
        )?;
        Ok(())
    }

    /// Stops the server now (as dropping it does), reporting a failure.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        self.server.stop()
    }

    /// A connection as the nkey user of `seed_file`, with replies on `inbox_prefix`.
    pub(crate) async fn connect(&self, seed_file: &Path, inbox_prefix: &str) -> anyhow::Result<async_nats::Client> {
        let seed = fs::read_to_string(seed_file).with_context(|| format!("reading {}", seed_file.display()))?;
        async_nats::ConnectOptions::with_nkey(seed.trim().to_owned())
            .name("fleetlaps-bench")
            .custom_inbox_prefix(inbox_prefix)
            .connect(&self.url)
            .await
            .with_context(|| format!("connecting to NATS at {} as {}", self.url, seed_file.display()))
    }

    /// A JetStream context as the fleet simulator, which may publish as any device.
    pub(crate) async fn simulator(&self) -> anyhow::Result<jetstream::Context> {
        let client = self
            .connect(&self.simulator_seed, subject::SIMULATOR_INBOX_PREFIX)
            .await?;
        Ok(jetstream::new(client))
    }

    /// A JetStream context as the orchestrator's user, which may read the events stream. Use it
    /// only while the orchestrator is stopped.
    /// The nats-server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.server.id()
    }

    pub(crate) async fn orchestrator_user(&self) -> anyhow::Result<jetstream::Context> {
        let client = self.connect(&self.orchestrator_seed, "_INBOX").await?;
        Ok(jetstream::new(client))
    }
}

/// The release orchestrator's config and the secrets to start it with.
#[derive(Debug)]
pub(crate) struct Orchestrator {
    binary: PathBuf,
    /// Its working directory: the config, the log and `data/`.
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// The API, `http://127.0.0.1:<port>` (`plain_http`: TLS is not what is measured).
    pub(crate) base_url: String,
    http_port: u16,
    /// `http://127.0.0.1:<port>/metrics`.
    pub(crate) metrics_url: String,
    admin_token: String,
}

impl Orchestrator {
    /// Writes the config under `work/orchestrator`.
    pub(crate) fn configure(binary: &Path, nats: &Nats, work: &Path) -> anyhow::Result<Self> {
        let dir = work.join("orchestrator");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let http_port = free_port()?;
        let metrics_port = free_port()?;
        let config = dir.join("orchestrator.toml");
        write_private(
            &config,
            &format!(
                "data_dir = \"{data}\"\n[nats]\nurl = \"{url}\"\nnkey_seed_file = \"{seed}\"\n\
                 [http]\nlisten = \"127.0.0.1:{http_port}\"\nplain_http = true\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
                 [campaigns]\nwave_devices_per_second = 100000\n",
                data = dir.join("data").display(),
                url = nats.url,
                seed = nats.orchestrator_seed.display(),
            ),
        )?;
        Ok(Self {
            binary: binary.to_owned(),
            dir: dir.clone(),
            config,
            log: dir.join("orchestrator.log"),
            base_url: format!("http://127.0.0.1:{http_port}"),
            http_port,
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            admin_token: random_token()?,
        })
    }

    /// Starts `fleetlaps-orchestrator run` (without waiting for it to listen).
    pub(crate) fn spawn(&self) -> anyhow::Result<ChildGuard> {
        ChildGuard::spawn(
            "fleetlaps-orchestrator",
            Command::new(&self.binary)
                .args(["run", "--config"])
                .arg(&self.config)
                .env("FLEETLAPS_BOOTSTRAP_ADMIN_TOKEN", &self.admin_token)
                // Its default logging, as deployed, whatever the caller's environment.
                .env_remove("RUST_LOG"),
            &self.log,
        )
    }

    /// Starts it and waits until `GET /healthz` answers 200: its projections have caught up
    /// with the history (before, writes answer 503).
    pub(crate) async fn start(&self, http: &reqwest::Client) -> anyhow::Result<ChildGuard> {
        let mut child = self.spawn()?;
        let timeout = Duration::from_secs(60);
        wait_listening(self.http_port, &mut child, timeout)
            .await
            .with_context(|| format!("starting the orchestrator; see {}", self.log.display()))?;
        let url = format!("{}/healthz", self.base_url);
        let deadline = Instant::now() + timeout;
        loop {
            let healthy = http
                .get(&url)
                .send()
                .await
                .is_ok_and(|answer| answer.status().is_success());
            if healthy {
                return Ok(child);
            }
            child.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "GET {url} did not answer 200 within {timeout:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its metrics, scraped once: the value of the unlabelled sample `name`, if exposed.
    pub(crate) async fn metric(&self, http: &reqwest::Client, name: &str) -> anyhow::Result<Option<f64>> {
        let text = http
            .get(&self.metrics_url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("scraping {}", self.metrics_url))?
            .text()
            .await
            .context("reading the metrics")?;
        Ok(sample(&text, name))
    }

    /// `POST path` with the bootstrap admin token and a JSON body; the answer's JSON.
    pub(crate) async fn admin_post(
        &self,
        http: &reqwest::Client,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<Value> {
        post(http, &format!("{}{path}", self.base_url), &self.admin_token, body).await
    }

    /// `POST /v1.0/fleetlaps/tokens`: a new API token (read-only scope); its answer.
    pub(crate) async fn create_token(&self, http: &reqwest::Client, name: &str) -> anyhow::Result<Value> {
        let request = TokenRequest {
            name: name.to_owned(),
            scopes: vec!["DeviceLocalCredential.Read.All".to_owned()],
            expires_date_time: None,
        };
        self.admin_post(http, "/v1.0/fleetlaps/tokens", &request).await
    }

    /// `POST /v1.0/fleetlaps/enrollmentTokens`: a new enrollment token for `max_uses` devices.
    pub(crate) async fn create_enrollment_token(
        &self,
        http: &reqwest::Client,
        name: &str,
        max_uses: u32,
    ) -> anyhow::Result<String> {
        let request = EnrollmentTokenRequest {
            name: name.to_owned(),
            max_uses: Some(max_uses),
            expires_date_time: None,
        };
        let answer = self
            .admin_post(http, "/v1.0/fleetlaps/enrollmentTokens", &request)
            .await?;
        answer["token"]
            .as_str()
            .map(str::to_owned)
            .context("the enrollment token's creation answered no token")
    }

    /// `POST /fleetlaps/v1/enroll` as a device does (`fleetlaps-agent enroll`): a fresh key pair.
    pub(crate) async fn enroll(&self, http: &reqwest::Client, token: &str, name: &str) -> anyhow::Result<Device> {
        let signing_key = DeviceSigningKey::generate();
        let device_name = DeviceName::parse(name).with_context(|| format!("device name {name}"))?;
        let request = EnrollmentRequest {
            public_key: signing_key.public_key().to_string(),
            device_name: device_name.clone(),
            tags: Vec::new(),
        };
        let answer = post(http, &format!("{}/fleetlaps/v1/enroll", self.base_url), token, &request).await?;
        let answer: EnrollmentResponse =
            serde_json::from_value(answer).context("the enrollment answer does not decode")?;
        Ok(Device {
            id: answer.device_id,
            name: device_name,
            escrow_public_key: answer.escrow_public_key,
            signing_key,
            sequence: 0,
        })
    }

    /// Enrolls `count` devices named `<prefix>-<index>` (from `first`), 16 at a time, with an
    /// enrollment token per 10,000 or so; the devices in index order.
    pub(crate) async fn enroll_many(
        &self,
        http: &reqwest::Client,
        prefix: &str,
        first: u32,
        count: u32,
        progress: &ProgressBar,
    ) -> anyhow::Result<Vec<Device>> {
        progress.set_length(u64::from(count));
        let mut enrolled: Vec<(u32, Device)> = Vec::with_capacity(count as usize);
        let last = first + count;
        let mut chunk_first = first;
        while chunk_first < last {
            // One enrollment token per chunk: the orchestrator allows at most 10,000 uses each.
            let chunk_last = last.min(chunk_first + MAX_TOKEN_USES);
            let token = self
                .create_enrollment_token(http, &format!("{prefix}-{chunk_first}"), chunk_last - chunk_first)
                .await?;
            let chunk: Vec<(u32, Device)> = futures::stream::iter(chunk_first..chunk_last)
                .map(|index| {
                    let token = &token;
                    async move {
                        let device = self
                            .enroll(http, token, &format!("{prefix}-{index:06}"))
                            .await
                            .with_context(|| format!("enrolling device {prefix}-{index:06}"))?;
                        progress.inc(1);
                        anyhow::Ok((index, device))
                    }
                })
                .buffer_unordered(ENROLL_CONCURRENCY)
                .try_collect()
                .await?;
            enrolled.extend(chunk);
            chunk_first = chunk_last;
        }
        enrolled.sort_unstable_by_key(|(index, _)| *index);
        Ok(enrolled.into_iter().map(|(_, device)| device).collect())
    }

    /// A new API token with `scopes` (made with the bootstrap admin token); the token.
    pub(crate) async fn create_token_with(
        &self,
        http: &reqwest::Client,
        name: &str,
        scopes: &[&str],
    ) -> anyhow::Result<String> {
        let request = TokenRequest {
            name: name.to_owned(),
            scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
            expires_date_time: None,
        };
        let answer = self.admin_post(http, "/v1.0/fleetlaps/tokens", &request).await?;
        answer["token"]
            .as_str()
            .map(str::to_owned)
            .context("the token's creation answered no token")
    }

    /// The data directory (`data_dir`): the sled projections and the keys.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The config file, which `fleetlaps-orchestrator replay --config` reads too.
    pub(crate) fn config_path(&self) -> &Path {
        &self.config
    }

    /// The orchestrator's executable.
    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }
}

/// Enrollments sent at once by [`Orchestrator::enroll_many`], as `fleetlaps-agent simulate` does.
const ENROLL_CONCURRENCY: usize = 16;

/// The most uses the orchestrator gives one enrollment token (`maxUses`).
pub(crate) const MAX_TOKEN_USES: u32 = 10_000;

/// `POST url` with `token` as bearer; the answer's JSON, or an error with its status and body.
async fn post(http: &reqwest::Client, url: &str, token: &str, body: &impl serde::Serialize) -> anyhow::Result<Value> {
    let response = http
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the answer of POST {url}"))?;
    if !status.is_success() {
        bail!(
            "POST {url}: HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        );
    }
    serde_json::from_str(&text).with_context(|| format!("POST {url} answered no JSON"))
}

/// The value of the unlabelled sample `name` in Prometheus' text format.
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// A bearer token for the bootstrap admin: 32 random bytes from the kernel, as hex.
fn random_token() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// An enrolled device: its id, its key, and the sequence of its last event.
pub(crate) struct Device {
    /// The id the orchestrator gave it.
    pub(crate) id: DeviceId,
    /// The name it enrolled with, which `$filter=deviceName eq '…'` looks up.
    pub(crate) name: DeviceName,
    /// The key its backups are sealed to, as the enrollment answered.
    escrow_public_key: EscrowPublicKey,
    signing_key: DeviceSigningKey,
    sequence: u64,
}

/// A signed event ready to publish: its subject, payload and headers.
pub(crate) struct SignedEvent {
    subject: String,
    message: PublishMessage,
    /// The payload's size in bytes.
    pub(crate) size: usize,
    /// The event's id, which the orchestrator's confirmation of a backup names.
    pub(crate) event_id: EventId,
}

impl Device {
    /// Its next event: a failed authentication as the managed account, as the agent reports it.
    pub(crate) fn next_event(&mut self) -> anyhow::Result<SignedEvent> {
        self.sequence += 1;
        let event = Event::AuthenticationFailed(AuthenticationObserved {
            account_name: AccountName::parse("lapsadmin").context("account name")?,
            service: "sshd".to_owned(),
            remote_host: Some("192.0.2.10".to_owned()),
            tty: None,
            reset_deadline: None,
            count: 1,
            first_at: None,
            last_at: None,
        });
        self.signed(event)
    }

    /// Its next event: a backed-up password (random, sealed to the escrow key as the agent
    /// seals it), so the orchestrator holds a credential it can disclose.
    pub(crate) fn next_backup(&mut self) -> anyhow::Result<SignedEvent> {
        self.sequence += 1;
        let rotation_id = RotationId::new();
        // A random password is all the orchestrator needs to open; the rotation's UUID is one.
        let password = format!("bench-{rotation_id}");
        let event = Event::PasswordBackedUp(PasswordBackedUp {
            rotation_id,
            device_name: self.name.clone(),
            account_name: AccountName::parse("lapsadmin").context("account name")?,
            account_uid: Some(1001),
            sealed_password: seal(
                &self.escrow_public_key,
                password.as_bytes(),
                &sealing_context(&self.id, &rotation_id),
            ),
            escrow_public_key: Some(self.escrow_public_key),
            recovery_sealed_password: None,
            expires_at: Utc::now() + chrono::Duration::days(30),
            reason: RotationReason::Manual,
        });
        self.signed(event)
    }

    /// `event` as this device's, at its current sequence, signed with its key.
    fn signed(&self, event: Event) -> anyhow::Result<SignedEvent> {
        let envelope = Envelope::new(self.id.clone(), self.sequence, Utc::now(), event);
        let subject = subject::device_event(&self.id, envelope.event.kind());
        let payload = envelope.to_json();
        let signature = self.signing_key.sign(&subject, &payload);
        let size = payload.len();
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(envelope.id.to_string())
            .header(SIGNATURE_HEADER, signature.as_str());
        Ok(SignedEvent {
            subject,
            message,
            size,
            event_id: envelope.id,
        })
    }
}

impl SignedEvent {
    /// Sends it; the future resolves with JetStream's acknowledgement.
    pub(crate) async fn send(self, jetstream: &jetstream::Context) -> anyhow::Result<PublishAckFuture> {
        jetstream
            .send_publish(self.subject, self.message)
            .await
            .context("publishing a device event")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unlabelled_sample_is_read_and_a_longer_name_is_not_mistaken_for_it() {
        let text = "# HELP x y\nfleetlaps_projection_last_sequence_total 9\nfleetlaps_projection_last_sequence 1234\n";
        assert_eq!(sample(text, "fleetlaps_projection_last_sequence"), Some(1234.0));
        assert_eq!(sample(text, "absent"), None);
    }
}
