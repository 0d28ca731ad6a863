//! The applications under test, started for real: the orchestrator and agents run in this
//! process (their libraries' `App`, on port 0, with temporary directories), and the command-line
//! tools run as the built binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use fleetlaps_agent::account::{Account, AccountBackend, FileAccounts};
use fleetlaps_agent::clock::ShiftedClock;
use fleetlaps_agent::fault::Faults;
use fleetlaps_proto::api::{DeviceLocalCredentialInfo, ODataCollection};
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::ids::{AccountName, DeviceId};
use fleetlaps_proto::password::Password;
use fleetlaps_proto::seal::EscrowPublicKey;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::harness::{TestNats, init_tracing, wait_until};

/// The token with `DeviceLocalCredential.Read.All`.
pub const READ_TOKEN: &str = "test-read-token";
/// The token with `DeviceLocalCredential.ReadBasic.All` only.
pub const READ_BASIC_TOKEN: &str = "test-read-basic-token";
/// The token with `DeviceLocalCredential.Rotate`, `Audit.Read.All` and `Device.Read.All`.
pub const OPERATOR_TOKEN: &str = "test-operator-token";
/// The bootstrap admin token (`Admin`).
pub const ADMIN_TOKEN: &str = "test-bootstrap-admin-token";

/// A running orchestrator.
pub struct TestOrchestrator {
    /// The API's base URL, `https://127.0.0.1:<port>`.
    pub base_url: String,
    /// The API's self-signed certificate (in `data_dir/tls/`), which [`Self::http`] and
    /// [`Self::lapsctl`] trust.
    pub tls_certificate: PathBuf,
    /// The metrics endpoint's URL.
    pub metrics_url: String,
    /// The key agents seal to.
    pub escrow_public_key: EscrowPublicKey,
    /// Each device's last heartbeat, as the running orchestrator watches it.
    pub liveness: fleetlaps_orchestrator::liveness::Liveness,
    /// Its data directory (projections and escrow key); kept across restarts.
    pub data_dir: PathBuf,
    /// How it reaches NATS; kept across restarts.
    nats: NatsAccess,
    /// The top-level config lines it was started with; a restart uses them again, so a test may
    /// change them in between.
    pub extra_config: String,
    /// Extra lines of the `[http]` table; kept across restarts.
    http_config: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Owns `data_dir` unless the test supplied one.
    _dir: Option<TempDir>,
    /// For the API calls of the helpers.
    pub http: reqwest::Client,
}

/// How a test orchestrator or agent reaches NATS.
#[derive(Debug, Clone)]
pub struct NatsAccess {
    /// The server's URL, `nats://` or `tls://`.
    pub url: String,
    /// The nkey seed file to authenticate with; without it the orchestrator is configured with
    /// `insecure_nats = true`.
    pub nkey_seed_file: Option<PathBuf>,
    /// The CA of the server's certificate, with TLS.
    pub ca_file: Option<PathBuf>,
}

impl NatsAccess {
    /// The orchestrator's access to `nats`: its nkey user on a server started the production
    /// way, none (`insecure_nats = true`) on one started without authentication.
    pub fn orchestrator(nats: &TestNats) -> Self {
        Self {
            url: nats.url(),
            nkey_seed_file: nats.orchestrator_seed_file().map(Path::to_owned),
            ca_file: nats.ca_file().map(Path::to_owned),
        }
    }

    /// The `[nats]` lines after `url`, and the top-level `insecure_nats` line, for the
    /// orchestrator's config.
    fn orchestrator_lines(&self) -> (String, String) {
        let mut nats_lines = String::new();
        if let Some(path) = &self.nkey_seed_file {
            nats_lines.push_str(&format!("nkey_seed_file = \"{}\"\n", path.display()));
        }
        if let Some(path) = &self.ca_file {
            nats_lines.push_str(&format!("ca_file = \"{}\"\n", path.display()));
        }
        let insecure = if self.nkey_seed_file.is_none() {
            "insecure_nats = true".to_owned()
        } else {
            String::new()
        };
        (nats_lines, insecure)
    }
}

impl TestOrchestrator {
    /// Starts an orchestrator on `nats` with a fresh data directory, authenticating as the
    /// server's orchestrator user (or with `insecure_nats = true` on a server without
    /// authentication).
    pub async fn spawn(nats: &TestNats) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-orchestrator-")
            .tempdir()
            .expect("tempdir");
        let mut orchestrator = Self::spawn_in(nats, dir.path()).await;
        orchestrator._dir = Some(dir);
        orchestrator
    }

    /// Starts an orchestrator on `nats` with a fresh data directory, authenticating with the
    /// nkey seed in `nkey_seed_file` (`nats.nkey_seed_file`).
    pub async fn spawn_with_nkey(nats: &TestNats, nkey_seed_file: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-orchestrator-")
            .tempdir()
            .expect("tempdir");
        let access = NatsAccess {
            nkey_seed_file: Some(nkey_seed_file.to_owned()),
            ..NatsAccess::orchestrator(nats)
        };
        let mut orchestrator = Self::try_spawn(access, dir.path(), "")
            .await
            .expect("orchestrator starts");
        orchestrator._dir = Some(dir);
        orchestrator
    }

    /// Starts an orchestrator on `nats` with a fresh data directory and `extra_config`, top-level
    /// config lines such as `escrow_recovery_public_key = "…"`.
    pub async fn spawn_with_config(nats: &TestNats, extra_config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-orchestrator-")
            .tempdir()
            .expect("tempdir");
        let mut orchestrator = Self::try_spawn(NatsAccess::orchestrator(nats), dir.path(), extra_config)
            .await
            .expect("orchestrator starts");
        orchestrator._dir = Some(dir);
        orchestrator
    }

    /// Starts an orchestrator on `nats` with a fresh data directory and `http_config`, lines of
    /// its `[http]` table such as `idle_timeout_secs = 2`.
    pub async fn spawn_with_http_config(nats: &TestNats, http_config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-orchestrator-")
            .tempdir()
            .expect("tempdir");
        let mut orchestrator =
            Self::try_spawn_with_http_config(NatsAccess::orchestrator(nats), dir.path(), "", http_config)
                .await
                .expect("orchestrator starts");
        orchestrator._dir = Some(dir);
        orchestrator
    }

    /// Starts an orchestrator on `nats` with the data directory `data_dir`.
    pub async fn spawn_in(nats: &TestNats, data_dir: &Path) -> Self {
        Self::try_spawn(NatsAccess::orchestrator(nats), data_dir, "")
            .await
            .expect("orchestrator starts")
    }

    /// The config file the orchestrator runs with, written in its data directory, for the
    /// `fleetlaps-orchestrator` binary's subcommands.
    pub fn config_path(&self) -> PathBuf {
        config_path(&self.data_dir)
    }

    /// Starts an orchestrator reaching NATS as `nats` says, on `data_dir`, with `extra_config`
    /// as top-level config lines, and waits until it is healthy (its projections caught up with
    /// the stream); the error is `App::build`'s.
    pub async fn try_spawn(nats: NatsAccess, data_dir: &Path, extra_config: &str) -> anyhow::Result<Self> {
        Self::try_spawn_with_http_config(nats, data_dir, extra_config, "").await
    }

    /// [`Self::try_spawn`] with `http_config` as extra lines of the `[http]` table.
    async fn try_spawn_with_http_config(
        nats: NatsAccess,
        data_dir: &Path,
        extra_config: &str,
        http_config: &str,
    ) -> anyhow::Result<Self> {
        let orchestrator = Self::try_start(nats, data_dir, extra_config, http_config).await?;
        orchestrator.wait_until_healthy().await;
        Ok(orchestrator)
    }

    /// [`Self::try_spawn_with_http_config`] without waiting for health: it serves, but may
    /// still be catching up.
    pub async fn try_start(
        nats: NatsAccess,
        data_dir: &Path,
        extra_config: &str,
        http_config: &str,
    ) -> anyhow::Result<Self> {
        init_tracing();
        let (nats_lines, insecure_line) = nats.orchestrator_lines();
        // The test's own bootstrap admin token, when it names one, replaces the default.
        let bootstrap_line = if extra_config
            .lines()
            .any(|line| line.trim_start().starts_with("bootstrap_admin_token ="))
        {
            String::new()
        } else {
            format!("bootstrap_admin_token = \"{ADMIN_TOKEN}\"")
        };
        let text = format!(
            r#"
data_dir = "{data_dir}"
{bootstrap_line}
{insecure_line}
{extra_config}
[nats]
url = "{nats_url}"
{nats_lines}
[http]
listen = "127.0.0.1:0"
{http_config}
[http.tls]
self_signed = true
[metrics]
listen = "127.0.0.1:0"
[[tokens]]
name = "investigator"
token_sha256 = "{read}"
scopes = ["DeviceLocalCredential.Read.All"]
[[tokens]]
name = "helpdesk"
token_sha256 = "{read_basic}"
scopes = ["DeviceLocalCredential.ReadBasic.All"]
[[tokens]]
name = "operator"
token_sha256 = "{operator}"
scopes = ["DeviceLocalCredential.Rotate", "Audit.Read.All", "Device.Read.All"]
"#,
            data_dir = data_dir.display(),
            nats_url = nats.url,
            read = fleetlaps_orchestrator::auth::token_sha256(READ_TOKEN),
            read_basic = fleetlaps_orchestrator::auth::token_sha256(READ_BASIC_TOKEN),
            operator = fleetlaps_orchestrator::auth::token_sha256(OPERATOR_TOKEN),
        );
        std::fs::create_dir_all(data_dir).expect("creating the data directory");
        std::fs::write(config_path(data_dir), &text).expect("writing the orchestrator's config");
        let config = fleetlaps_orchestrator::Config::from_toml(&text).expect("test config is valid");
        let app = fleetlaps_orchestrator::App::build(config).await?;
        let base_url = app.api_url();
        let tls_certificate = app
            .tls_certificate_path()
            .expect("the test orchestrator serves TLS")
            .to_owned();
        let metrics_url = format!("http://{}/metrics", app.metrics_addr());
        let escrow_public_key = app.escrow_public_key();
        let liveness = app.liveness();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stop.await;
        }));
        Ok(Self {
            base_url,
            http: trusting_client(&tls_certificate),
            tls_certificate,
            metrics_url,
            escrow_public_key,
            liveness,
            data_dir: data_dir.to_owned(),
            nats,
            extra_config: extra_config.to_owned(),
            http_config: http_config.to_owned(),
            shutdown: Some(shutdown),
            task: Some(task),
            _dir: None,
        })
    }

    /// Stops it and waits until it has released its data directory.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("orchestrator task does not panic")
                .expect("orchestrator stops cleanly");
        }
    }

    /// Stops it abruptly, wherever it is, without draining anything: its task is aborted, as
    /// a kill would end the process (destructors run, but no step is completed).
    pub async fn kill(&mut self) {
        self.shutdown.take();
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Starts it again on the same data directory after [`Self::kill`], once the killed
    /// instance has let go of it (its tasks end a moment after the abort).
    pub async fn restart_after_kill(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Err(err) = self.try_restart().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the killed orchestrator still holds its data directory: {err:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops it and starts it again on the same data directory.
    pub async fn restart(&mut self) {
        self.try_restart().await.expect("orchestrator starts");
    }

    /// Stops it (if running) and tries to start it again on the same data directory; on an
    /// error it stays stopped, and may be tried again.
    pub async fn try_restart(&mut self) -> anyhow::Result<()> {
        self.restart_without_waiting().await?;
        self.wait_until_healthy().await;
        Ok(())
    }

    /// Stops it and starts it again on the same data directory, without waiting for its
    /// projections to catch up (to watch what it does meanwhile).
    pub async fn restart_without_waiting(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        // The stopped orchestrator has let go of its data directory's lock, but a process that
        // another test of this binary forks at that moment holds a copy of the lock's descriptor
        // until it execs: a start refused for that alone is tried again, briefly.
        let mut attempts = 0;
        let started = loop {
            match Self::try_start(self.nats.clone(), &self.data_dir, &self.extra_config, &self.http_config).await {
                Err(err) if attempts < 50 && format!("{err:#}").contains("is in use") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                started => break started?,
            }
        };
        let dir = self._dir.take();
        *self = started;
        self._dir = dir;
        Ok(())
    }

    /// Waits until `/healthz` answers 200: the projections have caught up with the stream as it
    /// was at start, and the consumer folds.
    pub async fn wait_until_healthy(&self) {
        wait_until_healthy(&self.http, &self.base_url).await;
    }

    /// Waits until the projections hold every message the events stream has now (a backlog of
    /// thousands takes a while on a loaded machine).
    pub async fn wait_until_folded(&self, nats: &TestNats) {
        let jetstream = async_nats::jetstream::new(nats.client().await);
        let mut stream = jetstream
            .get_stream(fleetlaps_proto::subject::EVENTS_STREAM)
            .await
            .expect("events stream");
        let last = stream.info().await.expect("stream info").state.last_sequence;
        wait_until(
            "the projections hold every message",
            Duration::from_secs(120),
            || async { (self.metric("fleetlaps_projection_last_sequence").await >= last as f64).then_some(()) },
        )
        .await;
    }

    /// Stops it and deletes its projections, which its next start rebuilds from the history.
    pub async fn delete_projections(&mut self) {
        self.stop().await;
        std::fs::remove_dir_all(self.data_dir.join("projections")).expect("deleting the projections");
    }

    /// Revokes the API token `id` as `revoker`, expecting 204.
    pub async fn revoke_token(&self, revoker: &str, id: &str) {
        let revoked = self
            .request(
                reqwest::Method::DELETE,
                &format!("/v1.0/fleetlaps/tokens/{id}"),
                revoker,
                None,
            )
            .await;
        assert_eq!(revoked.status(), reqwest::StatusCode::NO_CONTENT);
    }

    /// Runs the `lapsctl` binary against this orchestrator (`--url`, and `--ca` with its
    /// certificate) with `args` after those.
    pub async fn lapsctl(&self, args: &[&str]) -> Output {
        let certificate = self.tls_certificate.to_str().expect("a UTF-8 temporary path");
        let mut all_args = vec!["--url", self.base_url.as_str(), "--ca", certificate];
        all_args.extend_from_slice(args);
        run("lapsctl", &all_args).await
    }

    /// `method` on the API with a bearer token and an optional JSON body.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("the API answers")
    }

    /// Creates an API token as `creator` with `body` (`name`, `scopes`); returns the token and
    /// its id.
    pub async fn create_token(&self, creator: &str, body: serde_json::Value) -> (String, String) {
        let created = self
            .request(reqwest::Method::POST, "/v1.0/fleetlaps/tokens", creator, Some(body))
            .await;
        assert_eq!(created.status(), reqwest::StatusCode::CREATED);
        let created: serde_json::Value = created.json().await.expect("json");
        (
            created["token"].as_str().expect("the token").to_owned(),
            created["id"].as_str().expect("an id").to_owned(),
        )
    }

    /// `GET` on the API with an optional bearer token.
    pub async fn get(&self, path_and_query: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path_and_query}", self.base_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the API answers")
    }

    /// The device's credential info with passwords, read with the Read.All token. Each read is
    /// audited; while the audit history is unavailable (NATS reconnecting: 503) it asks again.
    pub async fn credentials(&self, device_id: &DeviceId) -> Option<DeviceLocalCredentialInfo> {
        let path = format!("/v1.0/directory/deviceLocalCredentials/{device_id}?$select=credentials");
        let response = wait_until(
            "the API answers a password read (not 503)",
            Duration::from_secs(30),
            || async {
                let response = self.get(&path, Some(READ_TOKEN)).await;
                (response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(response)
            },
        )
        .await;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        let status = response.status();
        let body = response.text().await.expect("an answer's body");
        assert_eq!(status, reqwest::StatusCode::OK, "credentials request failed: {body}");
        Some(serde_json::from_str(&body).expect("deviceLocalCredentialInfo"))
    }

    /// The passwords the orchestrator holds for the device, newest first.
    pub async fn passwords(&self, device_id: &DeviceId) -> Vec<Password> {
        let Some(info) = self.credentials(device_id).await else {
            return Vec::new();
        };
        info.credentials
            .unwrap_or_default()
            .iter()
            .map(|credential| credential.password_base64.decode().expect("passwordBase64 decodes"))
            .collect()
    }

    /// Waits until the orchestrator holds at least `count` passwords for the device, and
    /// returns them, newest first.
    pub async fn wait_for_passwords(&self, device_id: &DeviceId, count: usize) -> Vec<Password> {
        wait_until(
            &format!("the orchestrator holds {count} password(s) of {device_id}"),
            Duration::from_secs(30),
            || async {
                let passwords = self.passwords(device_id).await;
                (passwords.len() >= count).then_some(passwords)
            },
        )
        .await
    }

    /// Waits until the device's newest password is none of `known`, and returns it: the centre
    /// answers with three credentials at most, so a new backup shows as a new newest one.
    pub async fn wait_for_new_password(&self, device_id: &DeviceId, known: &[&Password]) -> Password {
        self.wait_for_new_password_within(device_id, known, Duration::from_secs(30))
            .await
    }

    /// [`Self::wait_for_new_password`] with another safety net: after a NATS outage the
    /// consumer's retry pauses add up on a loaded machine.
    pub async fn wait_for_new_password_within(
        &self,
        device_id: &DeviceId,
        known: &[&Password],
        timeout: Duration,
    ) -> Password {
        wait_until(
            &format!("the orchestrator holds a new password of {device_id}"),
            timeout,
            || async {
                let newest = self.passwords(device_id).await.into_iter().next()?;
                (!known.iter().any(|password| password.expose() == newest.expose())).then_some(newest)
            },
        )
        .await
    }

    /// Every device's metadata, read with the ReadBasic token.
    pub async fn devices(&self) -> Vec<DeviceLocalCredentialInfo> {
        let response = self
            .get("/v1.0/directory/deviceLocalCredentials", Some(READ_BASIC_TOKEN))
            .await;
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let page: ODataCollection<DeviceLocalCredentialInfo> = response.json().await.expect("collection");
        page.value
    }

    /// Every device's entry in the directory (`/v1.0/devices`), every page of it, following
    /// Graph's server-driven paging (`@odata.nextLink`) to the last page.
    pub async fn directory(&self) -> Vec<serde_json::Value> {
        let mut devices = Vec::new();
        let mut path = "/v1.0/devices".to_owned();
        loop {
            let response = self.get(&path, Some(OPERATOR_TOKEN)).await;
            assert_eq!(response.status(), reqwest::StatusCode::OK);
            let page: serde_json::Value = response.json().await.expect("json");
            devices.extend(page["value"].as_array().expect("a collection").iter().cloned());
            match page["@odata.nextLink"].as_str() {
                Some(next) => path = self.next_path(next),
                None => return devices,
            }
        }
    }

    /// The path and query of `next_link`, an `@odata.nextLink` this orchestrator answered with,
    /// which must be absolute on the origin the test's client addressed, as Graph's are.
    pub fn next_path(&self, next_link: &str) -> String {
        next_link
            .strip_prefix(self.base_url.as_str())
            .filter(|path| path.starts_with('/'))
            .unwrap_or_else(|| panic!("the next link {next_link} is not absolute on {}", self.base_url))
            .to_owned()
    }

    /// The metrics listener as `host:port`, what Prometheus scrapes.
    pub fn metrics_target(&self) -> String {
        self.metrics_url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned()
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(&self.metrics_url)
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("text")
    }

    /// The value of one sample line of the metrics (`name{labels}`); panics when there is none, so
    /// a test reading a renamed or missing metric fails rather than reading 0.
    pub async fn metric(&self, sample: &str) -> f64 {
        let metrics = self.metrics().await;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no sample {sample} in the metrics:\n{metrics}"))
    }
}

impl Drop for TestOrchestrator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The account every test agent manages.
pub const MANAGED_ACCOUNT: &str = "lapsadmin";

/// Options for a test agent.
pub struct AgentOptions {
    /// Its host name.
    pub device_name: String,
    /// Seconds between cycles.
    pub processing_interval_secs: u64,
    /// Extra `[policy]` lines.
    pub policy: String,
    /// Manage this real Linux account through the `linux` backend instead of `lapsadmin` in a
    /// file-backed database.
    pub linux_account: Option<String>,
    /// Extra top-level settings (`key = value` lines), such as `reset_min_interval_secs = 0`.
    pub settings: String,
    /// Text appended at the end of `agent.toml`, after `[policy]`: whole tables, such as
    /// `[post_authentication]`.
    pub extra_config: String,
    /// Authenticate to NATS with the nkey seed in this file (`nats.nkey_seed_file`); the test
    /// then admits the device to the server itself, or not. Without it, on a server started the
    /// production way ([`TestNats::start`]), the agent gets a seed of its own and the server
    /// admits the device once it is enrolled.
    pub nkey_seed_file: Option<PathBuf>,
    /// Failures to inject into the in-process agent (the `fault-injection` feature).
    pub faults: Faults,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            device_name: "device-1".to_owned(),
            processing_interval_secs: 3600,
            policy: String::new(),
            linux_account: None,
            settings: String::new(),
            extra_config: String::new(),
            nkey_seed_file: None,
            faults: Faults::none(),
        }
    }
}

/// A running agent managing `lapsadmin` in a file-backed account database.
pub struct TestAgent {
    /// Its device id.
    pub device_id: DeviceId,
    /// Its state directory (sled state, control socket).
    pub state_dir: PathBuf,
    /// Its config file, for the command-line tools.
    pub config_path: PathBuf,
    /// Its account database.
    pub accounts: FileAccounts,
    /// Its clock, which tests move forward.
    pub clock: Arc<ShiftedClock>,
    nats_url: String,
    /// The CA of the server's certificate, with TLS (`nats.ca_file`).
    nats_ca_file: Option<PathBuf>,
    options_policy: String,
    linux_account: Option<String>,
    settings: String,
    extra_config: String,
    nkey_seed_file: Option<PathBuf>,
    faults: Faults,
    device_name: String,
    interval: u64,
    /// Where the running agent serves its metrics, when its config has `[metrics] listen`.
    metrics_addr: Option<std::net::SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

impl TestAgent {
    /// Starts an agent with default options.
    pub async fn spawn(nats: &TestNats, orchestrator: &TestOrchestrator) -> Self {
        Self::spawn_with(nats, orchestrator, AgentOptions::default()).await
    }

    /// Starts an agent.
    pub async fn spawn_with(nats: &TestNats, orchestrator: &TestOrchestrator, options: AgentOptions) -> Self {
        let mut agent = Self::enrolled(nats, orchestrator, options).await;
        agent.start().await;
        agent
    }

    /// Enrolls an agent without starting it ([`Self::start_in_process`] starts it).
    pub async fn enrolled(nats: &TestNats, orchestrator: &TestOrchestrator, options: AgentOptions) -> Self {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-agent-")
            .tempdir()
            .expect("tempdir");
        let accounts_path = dir.path().join("accounts");
        let accounts = FileAccounts::create(&accounts_path, &[("root", 0), (MANAGED_ACCOUNT, 1001)])
            .expect("creating the account database");
        let state_dir = dir.path().join("state");
        let identity = enroll(orchestrator, &state_dir, &options.device_name).await;
        let nkey_seed_file = match options.nkey_seed_file {
            Some(path) => Some(path),
            // The production way: a seed of its own, admitted as an operator would once enrolled.
            None if nats.orchestrator_seed_file().is_some() => {
                let path = dir.path().join("nats.nk");
                let key = fleetlaps_orchestrator::nats_auth::ensure_seed_file(&path).expect("the agent's seed");
                nats.admit_device(&identity.device_id, key);
                Some(path)
            }
            None => None,
        };
        Self {
            device_id: identity.device_id,
            state_dir,
            config_path: dir.path().join("agent.toml"),
            accounts,
            clock: Arc::new(ShiftedClock::default()),
            nats_url: nats.url(),
            nats_ca_file: nats.ca_file().map(Path::to_owned),
            options_policy: options.policy,
            linux_account: options.linux_account,
            settings: options.settings,
            extra_config: options.extra_config,
            nkey_seed_file,
            faults: options.faults,
            device_name: options.device_name,
            interval: options.processing_interval_secs,
            metrics_addr: None,
            shutdown: None,
            task: None,
            _dir: dir,
        }
    }

    fn config_text(&self) -> String {
        let (account, managed) = match &self.linux_account {
            Some(name) => ("backend = \"linux\"".to_owned(), name.clone()),
            None => (
                format!(
                    "backend = \"file\"\npath = \"{}\"",
                    self.state_dir
                        .parent()
                        .expect("has a parent")
                        .join("accounts")
                        .display()
                ),
                MANAGED_ACCOUNT.to_owned(),
            ),
        };
        let mut nkey_line = self
            .nkey_seed_file
            .as_ref()
            .map(|path| format!("nkey_seed_file = \"{}\"\n", path.display()))
            .unwrap_or_default();
        if let Some(path) = &self.nats_ca_file {
            nkey_line.push_str(&format!("ca_file = \"{}\"\n", path.display()));
        }
        format!(
            r#"
device_name = "{device_name}"
state_dir = "{state_dir}"
processing_interval_secs = {interval}
{settings}
[nats]
url = "{nats_url}"
ack_timeout_secs = 2
{nkey_line}
[account]
{account}
[policy]
AdministratorAccountName = "{managed}"
{policy}
{extra_config}
"#,
            device_name = self.device_name,
            state_dir = self.state_dir.display(),
            interval = self.interval,
            nats_url = self.nats_url,
            policy = self.options_policy,
            settings = self.settings,
            extra_config = self.extra_config,
        )
    }

    async fn start(&mut self) {
        let text = self.config_text();
        std::fs::write(&self.config_path, &text).expect("writing agent.toml");
        // The text alone: the test run's own FLEETLAPS_AGENT_* variables must not leak in.
        let config = fleetlaps_agent::Config::from_toml(&text).expect("test agent config is valid");
        let app = fleetlaps_agent::App::build_with(config, self.clock.clone(), self.faults.clone())
            .await
            .expect("agent starts");
        assert_eq!(app.device_id(), self.device_id, "the agent runs as the enrolled device");
        self.metrics_addr = app.metrics_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        self.shutdown = Some(shutdown);
        self.task = Some(tokio::spawn(app.run_until(async move {
            let _ = stop.await;
        })));
    }

    /// Stops the in-process agent and runs the `fleetlaps-agent` binary on the same config and
    /// state instead, with `LAPS_TEST_KILL_AT` set to `kill_at` when given (the agent then
    /// kills itself with SIGKILL at that point of a rotation). The caller owns the process.
    pub async fn run_binary(&mut self, kill_at: Option<&str>) -> tokio::process::Child {
        self.run_binary_with_env(kill_at, &[]).await
    }

    /// As [`Self::run_binary`], with the environment variables `env` exported as well.
    pub async fn run_binary_with_env(&mut self, kill_at: Option<&str>, env: &[(&str, &str)]) -> tokio::process::Child {
        self.stop().await;
        std::fs::write(&self.config_path, self.config_text()).expect("writing agent.toml");
        let mut command = tokio::process::Command::new(binary("fleetlaps-agent"));
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .kill_on_drop(true);
        command.stdout(std::process::Stdio::null());
        // Only what the test sets: nothing of the test run's FLEETLAPS_* or LAPS_TEST_* leaks in.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("FLEETLAPS_") || name.starts_with("LAPS_") {
                command.env_remove(name.as_ref());
            }
        }
        // Its log, at debug level, kept beside the state for the tests that read or scan it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.binary_log_path())
            .expect("opening the agent's log file");
        command.env("RUST_LOG", "debug").stderr(log);
        if let Some(point) = kill_at {
            command.env(fleetlaps_agent::fault::KILL_AT_VARIABLE, point);
        }
        command.envs(env.iter().copied());
        command.spawn().expect("starting fleetlaps-agent")
    }

    /// The log of every run of the agent as a binary, in the agent's directory.
    pub fn binary_log_path(&self) -> PathBuf {
        self.state_dir
            .parent()
            .expect("the agent's directory")
            .join("agent-binary.log")
    }

    /// The URL of the running agent's metrics, when its config asks for a listener
    /// (`[metrics] listen = "127.0.0.1:0"` in [`AgentOptions::extra_config`]).
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_addr.map(|address| format!("http://{address}/metrics"))
    }

    /// Starts the agent in this process again (after [`Self::run_binary`]).
    pub async fn start_in_process(&mut self) {
        self.start().await;
    }

    /// The agent's status, through the control socket.
    pub async fn status(&self) -> fleetlaps_proto::control::StatusReport {
        match self.control(ControlRequest::Status).await {
            ControlResponse::Status(report) => *report,
            other => panic!("status answered {other:?}"),
        }
    }

    /// Stops the agent and waits until it has released its state.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("agent task does not panic")
                .expect("agent stops cleanly");
        }
    }

    /// Stops the agent and starts it again on the same state.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// Sends a control request, as `fleetlaps-agent reset` / `process-now` do.
    pub async fn control(&self, request: ControlRequest) -> ControlResponse {
        fleetlaps_agent::control::send(&self.state_dir, &request)
            .await
            .expect("control socket answers")
    }

    /// A second device made from a copy of this one (a cloned golden image): the same identity
    /// and state, its own directory, account database and clock. This agent is stopped for the
    /// copy; neither is started.
    pub async fn cloned(&mut self) -> Self {
        assert!(
            self.linux_account.is_none(),
            "two copies cannot share one real Linux account"
        );
        self.stop().await;
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-agent-clone-")
            .tempdir()
            .expect("tempdir");
        let original = self.state_dir.parent().expect("the agent's directory");
        std::fs::copy(original.join("accounts"), dir.path().join("accounts")).expect("copying the account database");
        let state_dir = dir.path().join("state");
        crate::harness::copy_dir(&self.state_dir, &state_dir);
        // A clone of the machine holds its NATS seed too.
        let nkey_seed_file = self.nkey_seed_file.as_ref().map(|seed| {
            let copy = dir.path().join("nats.nk");
            std::fs::copy(seed, &copy).expect("copying the NATS seed");
            copy
        });
        Self {
            device_id: self.device_id.clone(),
            state_dir,
            config_path: dir.path().join("agent.toml"),
            accounts: FileAccounts::new(dir.path().join("accounts")),
            clock: Arc::new(ShiftedClock::default()),
            nats_url: self.nats_url.clone(),
            nats_ca_file: self.nats_ca_file.clone(),
            options_policy: self.options_policy.clone(),
            linux_account: None,
            settings: self.settings.clone(),
            extra_config: self.extra_config.clone(),
            nkey_seed_file,
            faults: self.faults.clone(),
            device_name: self.device_name.clone(),
            interval: self.interval,
            metrics_addr: None,
            shutdown: None,
            task: None,
            _dir: dir,
        }
    }

    /// A copy of the whole device as a VM snapshot holds it: the agent's state directory (its
    /// identity, sled state) and the managed account's password hash. Stops the agent first.
    pub async fn snapshot(&mut self) -> DeviceSnapshot {
        self.stop().await;
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-device-snapshot-")
            .tempdir()
            .expect("tempdir");
        crate::harness::copy_dir(&self.state_dir, &dir.path().join("state"));
        let account_hash = self.account_hash();
        DeviceSnapshot { dir, account_hash }
    }

    /// Restores the device from `snapshot`: the state directory, and the account's password
    /// hash when `with_account` (a full-device rollback) or not (the state directory alone
    /// restored from an older backup). The agent must be stopped.
    pub fn restore(&mut self, snapshot: &DeviceSnapshot, with_account: bool) {
        assert!(self.task.is_none(), "stop the agent before restoring it");
        std::fs::remove_dir_all(&self.state_dir).expect("removing the state directory");
        crate::harness::copy_dir(&snapshot.dir.path().join("state"), &self.state_dir);
        if with_account {
            self.set_account_hash(&snapshot.account_hash);
        }
    }

    /// Deletes the agent's sled state, keeping its enrolled identity (an operator who wiped the
    /// state directory but kept `identity.json`). The agent must be stopped.
    pub fn delete_state_keeping_identity(&mut self) {
        assert!(self.task.is_none(), "stop the agent before deleting its state");
        std::fs::remove_dir_all(self.state_dir.join("state")).expect("removing the sled state");
    }

    /// Makes the enrolled identity name `key` as the escrow key to seal to, as if the device had
    /// enrolled with another orchestrator. The agent must be stopped.
    pub fn seal_to(&self, key: &fleetlaps_proto::seal::EscrowPublicKey) {
        assert!(self.task.is_none(), "stop the agent before changing its identity");
        let path = fleetlaps_agent::identity::Identity::path(&self.state_dir);
        let mut identity: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("reading the identity")).expect("json");
        identity["escrow_public_key"] = key.to_string().into();
        std::fs::write(&path, identity.to_string()).expect("writing the identity");
    }

    /// The managed account's stored hash, as the account database holds it.
    pub fn account_hash(&self) -> String {
        let backend = self.backend();
        let account = backend
            .resolve(Some(&self.managed_name()))
            .expect("the managed account exists");
        backend
            .password_hash(&account)
            .expect("the account database is readable")
    }

    fn set_account_hash(&self, hash: &str) {
        let backend = self.backend();
        let account = backend
            .resolve(Some(&self.managed_name()))
            .expect("the managed account exists");
        let hash: fleetlaps_agent::password_hash::PasswordHash =
            serde_json::from_value(serde_json::Value::String(hash.to_owned())).expect("a crypt string");
        backend
            .set_password_hash(&account, &hash)
            .expect("the account database is writable");
    }

    fn managed_name(&self) -> AccountName {
        AccountName::parse(self.linux_account.as_deref().unwrap_or(MANAGED_ACCOUNT)).expect("a valid name")
    }

    fn backend(&self) -> Arc<dyn AccountBackend> {
        match &self.linux_account {
            Some(_) => Arc::new(fleetlaps_agent::account::LinuxAccounts::default()),
            None => Arc::new(self.accounts.clone()),
        }
    }

    /// Waits until `password` is the managed account's password: the agent applies a password
    /// only after the orchestrator confirmed its backup, so a moment after the API shows it.
    pub async fn wait_until_has(&self, password: &Password) {
        wait_until(
            "the account has the backed-up password",
            Duration::from_secs(30),
            || async { self.has_password(password).then_some(()) },
        )
        .await;
    }

    /// Waits until `password` is on the account and nothing waits: no pending rotation, an
    /// empty outbox. A backup is stored before its rotation commits, so a test that copies,
    /// stops or cuts off a device right after seeing the backup must wait for this first.
    pub async fn wait_until_settled_with(&self, password: &Password) {
        self.wait_until_has(password).await;
        wait_until("the agent has nothing pending", Duration::from_secs(30), || async {
            let status = self.status().await;
            (status.pending_rotation.is_none() && status.outbox_pending == 0).then_some(())
        })
        .await;
    }

    /// The nkey seed file the agent connects to NATS with, if any.
    pub fn nkey_seed_file(&self) -> Option<&Path> {
        self.nkey_seed_file.as_deref()
    }

    /// Whether `password` is the managed account's password right now.
    pub fn has_password(&self, password: &Password) -> bool {
        if let Some(user) = &self.linux_account {
            return crate::linux::account_holds(user, password);
        }
        let account = Account {
            name: AccountName::parse(MANAGED_ACCOUNT).expect("valid"),
            uid: 1001,
        };
        self.accounts
            .verify_password(&account, password)
            .expect("account database readable")
    }
}

/// A copy of a device taken by [`TestAgent::snapshot`].
pub struct DeviceSnapshot {
    /// Holds `state/`, the copy of the state directory.
    dir: TempDir,
    /// The managed account's password hash then.
    account_hash: String,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Creates an enrollment token through the API as the bootstrap admin; returns the token and
/// its id.
pub async fn create_enrollment_token(orchestrator: &TestOrchestrator, body: serde_json::Value) -> (String, String) {
    let response = orchestrator
        .http
        .post(format!("{}/v1.0/fleetlaps/enrollmentTokens", orchestrator.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("the API answers");
    assert_eq!(
        response.status(),
        reqwest::StatusCode::CREATED,
        "creating an enrollment token"
    );
    let created: serde_json::Value = response.json().await.expect("json");
    (
        created["token"].as_str().expect("the token").to_owned(),
        created["id"].as_str().expect("an id").to_owned(),
    )
}

/// Enrolls a device whose state lives in `state_dir` for real: the bootstrap admin creates a
/// single-use enrollment token over the API, and the agent library enrolls over HTTPS trusting
/// the orchestrator's certificate.
pub async fn enroll(
    orchestrator: &TestOrchestrator,
    state_dir: &Path,
    device_name: &str,
) -> fleetlaps_agent::identity::Identity {
    // Named after the device, and unique: names are unique among usable enrollment tokens.
    let name = format!("{device_name}-{}", fleetlaps_proto::audit::TokenId::new());
    let (token, _) = create_enrollment_token(orchestrator, serde_json::json!({"name": name})).await;
    enroll_with(orchestrator, state_dir, device_name, &token)
        .await
        .expect("the device enrolls")
}

/// Enrolls with `token` through the agent library, trusting the orchestrator's certificate.
pub async fn enroll_with(
    orchestrator: &TestOrchestrator,
    state_dir: &Path,
    device_name: &str,
    token: &str,
) -> anyhow::Result<fleetlaps_agent::identity::Identity> {
    fleetlaps_agent::enroll::enroll(fleetlaps_agent::enroll::EnrollOptions {
        orchestrator_url: &orchestrator.base_url,
        token: &secrecy::SecretString::from(token.to_owned()),
        ca_file: Some(&orchestrator.tls_certificate),
        device_name: fleetlaps_proto::ids::DeviceName::parse(device_name).expect("a valid device name"),
        state_dir,
        insecure_http: false,
        tags: Vec::new(),
    })
    .await
}

/// The path of a workspace binary built next to this test binary.
///
/// # Panics
///
/// If it is not built, naming the command that builds it.
pub fn binary(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/it-<hash> → target/<profile>/<name>
    let path = test_binary
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// Where a test orchestrator's config file is written: in its data directory.
fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("orchestrator.toml")
}

/// An HTTP client that trusts only `certificate` (PEM), as `lapsctl --ca` does.
pub fn trusting_client(certificate: &Path) -> reqwest::Client {
    let pem = std::fs::read(certificate).expect("reading the API's certificate");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM certificate"))
        .tls_built_in_root_certs(false)
        .build()
        .expect("an HTTP client")
}

/// Runs a workspace binary with arguments and returns its output, without blocking the runtime
/// (the orchestrator and agents it talks to run on it).
pub async fn run(name: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(binary(name))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|err| panic!("running {name}: {err}"))
}

/// Runs a workspace binary from a test that starts no server in-process.
pub fn run_blocking(name: &str, args: &[&str]) -> Output {
    Command::new(binary(name))
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("running {name}: {err}"))
}

/// The device's events of `kind` in the stream, oldest first.
pub async fn device_events(
    nats: &TestNats,
    device_id: &DeviceId,
    kind: fleetlaps_proto::event::EventKind,
) -> Vec<fleetlaps_proto::event::Envelope> {
    stream_payloads(nats, &fleetlaps_proto::subject::device_event(device_id, kind))
        .await
        .iter()
        .map(|payload| fleetlaps_proto::event::Envelope::from_json(payload).expect("a valid envelope"))
        .collect()
}

/// The payloads of the events stream's messages on `filter_subject`, oldest first.
pub async fn stream_payloads(nats: &TestNats, filter_subject: &str) -> Vec<Vec<u8>> {
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let stream = jetstream
        .get_stream(fleetlaps_proto::subject::EVENTS_STREAM)
        .await
        .expect("events stream");
    let mut consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter_subject.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let pending = consumer.info().await.expect("consumer info").num_pending;
    let mut messages = consumer.messages().await.expect("messages");
    let mut payloads = Vec::new();
    for _ in 0..pending {
        let message = futures::StreamExt::next(&mut messages)
            .await
            .expect("a pending message")
            .expect("a message");
        payloads.push(message.payload.to_vec());
    }
    payloads
}

/// Publishes `count` messages that are not events (quarantined when folded), so a rebuild of
/// the projections takes a while.
pub async fn publish_noise(nats: &TestNats, count: usize) {
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let mut acks = Vec::new();
    for n in 0..count {
        let ack = jetstream
            .publish(
                format!("laps.events.filler-{}.noise", n / 1_000),
                format!("not an event {n}").into(),
            )
            .await
            .expect("published");
        acks.push(ack);
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in acks {
        ack.await.expect("stored");
    }
}

/// The device's rotations (`password_rotated`) dated at or after `since`.
pub async fn rotations_since(nats: &TestNats, device_id: &DeviceId, since: chrono::DateTime<chrono::Utc>) -> usize {
    device_events(nats, device_id, fleetlaps_proto::event::EventKind::PasswordRotated)
        .await
        .iter()
        .filter(|envelope| envelope.time >= since)
        .count()
}

/// Waits until the API at `base_url` answers `/healthz` with 200 (its projections caught up
/// with the events recorded at start); each request must be answered.
pub async fn wait_until_healthy(http: &reqwest::Client, base_url: &str) {
    wait_until(
        "the orchestrator is healthy (/healthz 200)",
        Duration::from_secs(60),
        || async {
            let response = http
                .get(format!("{base_url}/healthz"))
                .send()
                .await
                .expect("the API answers");
            (response.status() == reqwest::StatusCode::OK).then_some(())
        },
    )
    .await;
}
