//! The orchestrator's configuration: one typed [`Config`], layered from a TOML file and then
//! `FLEETLAPS_`-prefixed environment variables (`FLEETLAPS_NATS__URL` sets `nats.url`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Everything the orchestrator needs to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the sled projections and the escrow key live.
    pub data_dir: PathBuf,
    /// The escrow key, supplied as a file (owner-only, one key of 32 bytes in base64 a line, the
    /// current one first); without it the keys live in `data_dir/escrow.key`, created at first
    /// start. Back it up: the history records its public key, and the orchestrator refuses to
    /// start without it.
    #[serde(default)]
    pub escrow_key_file: Option<PathBuf>,
    /// The public half of an offline recovery key (`fleetlaps-orchestrator escrow recovery-key`
    /// prints it): devices seal every backup to it as well, so `fleetlaps-orchestrator recover`
    /// can rebuild the credentials if the escrow key is lost.
    #[serde(default)]
    pub escrow_recovery_public_key: Option<String>,
    /// The NATS server with JetStream.
    pub nats: NatsConfig,
    /// Connect to NATS without credentials, to a server that admits anyone (development only).
    /// Without it a config with no `nats.nkey_seed_file` is refused; with it the orchestrator
    /// warns at start and `/healthz` says so.
    #[serde(default)]
    pub insecure_nats: bool,
    /// The Graph-compatible API. Its defaults ask for no transport, so a config without `[http]`
    /// is refused: the API serves TLS, or plain HTTP only when asked for.
    #[serde(default)]
    pub http: HttpConfig,
    /// The Prometheus endpoint, on its own listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Bearer tokens allowed to call the API, by digest (more are made through the API).
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// A token with the `Admin` scope, to create the first tokens with. Prefer the environment
    /// (`FLEETLAPS_BOOTSTRAP_ADMIN_TOKEN`) to the file; it is hashed at start and never stored.
    #[serde(default)]
    pub bootstrap_admin_token: Option<SecretString>,
    /// When the bootstrap admin token stops working (RFC 3339), if it should
    /// (`FLEETLAPS_BOOTSTRAP_ADMIN_TOKEN_EXPIRES_AT`). Removing `bootstrap_admin_token` from the
    /// config refuses it from the next start on.
    #[serde(default)]
    pub bootstrap_admin_token_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The LAPS policy sent to devices when they enroll, under LAPS names; it wins over a
    /// device's local `[policy]` (as LAPS's CSP policy wins over local configuration). Without
    /// it, devices keep their local policy.
    #[serde(default)]
    pub policy: Option<fleetlaps_proto::policy::PolicySettings>,
    /// The quarantine's bound.
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// Breach campaigns: how fast their waves command devices.
    #[serde(default)]
    pub campaigns: CampaignsConfig,
    /// The history: how often the orchestrator attests the signatures it verified.
    #[serde(default)]
    pub history: HistoryConfig,
    /// The detectors: breach signals the orchestrator raises itself from what the fleet reports.
    #[serde(default)]
    pub detectors: DetectorsConfig,
    /// Monitoring of the fleet: when a device counts as silent.
    #[serde(default)]
    pub monitoring: MonitoringConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[monitoring]`: what the orchestrator calls a silent device.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringConfig {
    /// A device is silent when its last heartbeat, or its enrollment when it never beat, is older
    /// than this many seconds (1 to 2,592,000, 30 days). The default, 3 hours, is three of the
    /// agent's default hourly cycles, each of which beats.
    #[serde(default = "default_silent_after_secs")]
    pub silent_after_secs: u64,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            silent_after_secs: default_silent_after_secs(),
        }
    }
}

impl MonitoringConfig {
    /// How long without a heartbeat makes a device silent.
    pub fn silent_after(&self) -> Duration {
        Duration::from_secs(self.silent_after_secs)
    }
}

/// The allowed `monitoring.silent_after_secs`.
const SILENT_AFTER_SECS: std::ops::RangeInclusive<u64> = 1..=2_592_000;

fn default_silent_after_secs() -> u64 {
    3 * 3600
}

/// `[detectors]`: each detector's mode and thresholds, and what a detection's campaign gets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorsConfig {
    /// How long, after a detection's last evidence event, the same detector ignores new evidence
    /// about the same subject (the fleet, a device, a principal): 0 to 10,080 minutes (a week),
    /// default 60.
    #[serde(default = "default_cooldown_minutes")]
    pub cooldown_minutes: u32,
    /// The deadline of a campaign a detector starts, from the detection: 5 to 129,600 minutes (90
    /// days), default 240.
    #[serde(default = "default_campaign_deadline_minutes")]
    pub campaign_deadline_minutes: u32,
    /// `[detectors.lateral_movement]`: the managed account authenticating on `devices` or more
    /// distinct devices within `window_minutes`.
    #[serde(default)]
    pub lateral_movement: DetectorSettings,
    /// `[detectors.repeated_failures]`: `failures` or more failed authentications on one device
    /// within `window_minutes` (an aggregated report counts its `count`).
    #[serde(default)]
    pub repeated_failures: DetectorSettings,
    /// `[detectors.read_then_spread]`: a password read by a principal, then authentications on
    /// `devices` or more distinct devices within `window_minutes` after it.
    #[serde(default)]
    pub read_then_spread: DetectorSettings,
}

impl Default for DetectorsConfig {
    fn default() -> Self {
        Self {
            cooldown_minutes: default_cooldown_minutes(),
            campaign_deadline_minutes: default_campaign_deadline_minutes(),
            lateral_movement: DetectorSettings::default(),
            repeated_failures: DetectorSettings::default(),
            read_then_spread: DetectorSettings::default(),
        }
    }
}

/// One detector's settings; the threshold that does not apply to it is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSettings {
    /// `off` (the default), `alert` (record a detection) or `campaign` (record it and declare a
    /// breach of the devices involved).
    #[serde(default)]
    pub mode: DetectorMode,
    /// Distinct devices (lateral movement, read then spread): 2 to 10,000; defaults 5 and 3.
    #[serde(default)]
    pub devices: Option<u32>,
    /// Failed attempts (repeated failures): 2 to 1,000,000; default 20.
    #[serde(default)]
    pub failures: Option<u64>,
    /// The window: 1 to 1,440 minutes; default 10 (30 for read then spread).
    #[serde(default)]
    pub window_minutes: Option<u32>,
}

/// What a detector does when it fires.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorMode {
    /// Nothing: it does not watch.
    #[default]
    Off,
    /// Records a detection (`breach_detected`) on the history.
    Alert,
    /// Records a detection and declares a breach of the devices involved.
    Campaign,
}

/// A detector's validated thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorThresholds {
    /// What it does when it fires.
    pub mode: DetectorMode,
    /// How much evidence fires it: distinct devices, or failed attempts.
    pub threshold: u64,
    /// How close together the evidence must be.
    pub window: Duration,
}

/// The allowed `detectors.*.window_minutes`.
const DETECTOR_WINDOW_MINUTES: std::ops::RangeInclusive<u32> = 1..=1_440;
/// The allowed `detectors.*.devices`.
const DETECTOR_DEVICES: std::ops::RangeInclusive<u32> = 2..=10_000;
/// The allowed `detectors.repeated_failures.failures`.
const DETECTOR_FAILURES: std::ops::RangeInclusive<u64> = 2..=1_000_000;
/// The allowed `detectors.cooldown_minutes`.
const DETECTOR_COOLDOWN_MINUTES: std::ops::RangeInclusive<u32> = 0..=10_080;
/// The allowed `detectors.campaign_deadline_minutes`.
const DETECTOR_DEADLINE_MINUTES: std::ops::RangeInclusive<u32> = 5..=129_600;

fn default_cooldown_minutes() -> u32 {
    60
}

fn default_campaign_deadline_minutes() -> u32 {
    240
}

impl DetectorsConfig {
    /// The thresholds of `detector`, validated; errors name the key and its allowed range.
    pub fn thresholds(&self, detector: fleetlaps_proto::breach::Detector) -> anyhow::Result<DetectorThresholds> {
        use fleetlaps_proto::breach::Detector;
        let (settings, default_window) = match detector {
            Detector::LateralMovement => (&self.lateral_movement, 10),
            Detector::RepeatedFailures => (&self.repeated_failures, 10),
            Detector::ReadThenSpread => (&self.read_then_spread, 30),
        };
        let key = format!("detectors.{}", detector.as_str());
        let window_minutes = settings.window_minutes.unwrap_or(default_window);
        if !DETECTOR_WINDOW_MINUTES.contains(&window_minutes) {
            anyhow::bail!(
                "invalid config: {key}.window_minutes = {window_minutes}: allowed {} to {}",
                DETECTOR_WINDOW_MINUTES.start(),
                DETECTOR_WINDOW_MINUTES.end()
            );
        }
        let threshold = if detector == Detector::RepeatedFailures {
            if settings.devices.is_some() {
                anyhow::bail!("invalid config: {key}.devices: allowed only failures and window_minutes");
            }
            let failures = settings.failures.unwrap_or(20);
            if !DETECTOR_FAILURES.contains(&failures) {
                anyhow::bail!(
                    "invalid config: {key}.failures = {failures}: allowed {} to {}",
                    DETECTOR_FAILURES.start(),
                    DETECTOR_FAILURES.end()
                );
            }
            failures
        } else {
            if settings.failures.is_some() {
                anyhow::bail!("invalid config: {key}.failures: allowed only devices and window_minutes");
            }
            let devices = settings
                .devices
                .unwrap_or(if detector == Detector::LateralMovement { 5 } else { 3 });
            if !DETECTOR_DEVICES.contains(&devices) {
                anyhow::bail!(
                    "invalid config: {key}.devices = {devices}: allowed {} to {}",
                    DETECTOR_DEVICES.start(),
                    DETECTOR_DEVICES.end()
                );
            }
            u64::from(devices)
        };
        Ok(DetectorThresholds {
            mode: settings.mode,
            threshold,
            window: Duration::from_secs(u64::from(window_minutes) * 60),
        })
    }

    /// How long a detection silences its detector for its subject.
    pub fn cooldown(&self) -> Duration {
        Duration::from_secs(u64::from(self.cooldown_minutes) * 60)
    }

    /// How long a detector's campaign has.
    pub fn campaign_deadline(&self) -> Duration {
        Duration::from_secs(u64::from(self.campaign_deadline_minutes) * 60)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for detector in fleetlaps_proto::breach::Detector::ALL {
            self.thresholds(detector)?;
        }
        if !DETECTOR_COOLDOWN_MINUTES.contains(&self.cooldown_minutes) {
            anyhow::bail!(
                "invalid config: detectors.cooldown_minutes = {}: allowed {} to {}",
                self.cooldown_minutes,
                DETECTOR_COOLDOWN_MINUTES.start(),
                DETECTOR_COOLDOWN_MINUTES.end()
            );
        }
        if !DETECTOR_DEADLINE_MINUTES.contains(&self.campaign_deadline_minutes) {
            anyhow::bail!(
                "invalid config: detectors.campaign_deadline_minutes = {}: allowed {} to {}",
                self.campaign_deadline_minutes,
                DETECTOR_DEADLINE_MINUTES.start(),
                DETECTOR_DEADLINE_MINUTES.end()
            );
        }
        Ok(())
    }
}

/// `[campaigns]`: how breach campaigns command their devices.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignsConfig {
    /// Rotate commands a campaign sends per second, in waves (1 to 100,000): a whole fleet
    /// rotating at once can overload what the devices share (the directory, NATS, the
    /// orchestrator). Each wave is recorded on the history before it is sent.
    #[serde(default = "default_wave_devices_per_second")]
    pub wave_devices_per_second: u32,
}

impl Default for CampaignsConfig {
    fn default() -> Self {
        Self {
            wave_devices_per_second: default_wave_devices_per_second(),
        }
    }
}

/// The allowed `campaigns.wave_devices_per_second`.
const WAVE_DEVICES_PER_SECOND: std::ops::RangeInclusive<u32> = 1..=100_000;

fn default_wave_devices_per_second() -> u32 {
    500
}

/// `[history]`: what the orchestrator records of its own work on the history.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    /// Messages folded between two `signatures_verified` attestations (100 to 1,000,000): a
    /// replay takes the orchestrator's word for the signatures of the messages attested
    /// instead of checking each again ([`crate::attestation`]); the ones folded since the last
    /// attestation it checks itself.
    #[serde(default = "default_signatures_verified_every")]
    pub signatures_verified_every: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            signatures_verified_every: default_signatures_verified_every(),
        }
    }
}

/// The allowed `history.signatures_verified_every`.
const SIGNATURES_VERIFIED_EVERY: std::ops::RangeInclusive<u64> = 100..=1_000_000;

fn default_signatures_verified_every() -> u64 {
    10_000
}

/// `[quarantine]`: how many refused messages the projections keep.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineConfig {
    /// The most records kept (1 to 1,000,000): when full, the oldest is dropped and counted
    /// (`@fleetlaps.droppedCount`, `fleetlaps_quarantine_dropped_total`). A rebuild by replay
    /// keeps the same records only with the same bound.
    #[serde(default = "default_quarantine_max_entries")]
    pub max_entries: u64,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        Self {
            max_entries: default_quarantine_max_entries(),
        }
    }
}

/// How to reach NATS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server URL, `nats://host:port`.
    pub url: String,
    /// The durable consumer's name; replicas of one orchestrator share none, so each has its own.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// A file holding the orchestrator's nkey seed (`SU…`), for a nats-server that requires
    /// authentication (see `packaging/nats-server.conf`). It must be owner-only (mode 0600 or
    /// 0400); `fleetlaps-orchestrator nkey --seed-file <file>` creates one.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// The CA certificate (PEM) the NATS server's certificate must chain to. With it the
    /// connection must be TLS (a `tls://` URL, or a `nats://` one whose server offers TLS); without
    /// it a `tls://` URL trusts the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// How the orchestrator authenticates to NATS: the validated form of `nats.nkey_seed_file` and
/// `insecure_nats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsCredentials {
    /// An nkey user, its seed in this file.
    Nkey(PathBuf),
    /// None, asked for with `insecure_nats = true`.
    Insecure,
}

/// The API listener. Exactly one of `tls` and `plain_http = true` must be set; [`Self::transport`]
/// checks that and gives the validated choice.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to bind; port 0 picks a free one.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// `[http.tls]`: the certificate the API serves.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The least seconds between two rotation requests for one device (more get 429).
    #[serde(default = "default_rotate_min_interval_secs")]
    pub rotate_min_interval_secs: u64,
    /// Serve plain HTTP, without TLS. Passwords and tokens then cross the network in clear, so it
    /// is never a default: only for a TLS-terminating proxy on the same host, or tests.
    #[serde(default)]
    pub plain_http: bool,
    /// The API's origin as its clients reach it (`https://host[:port]`), when that is not what
    /// they address here: behind a TLS-terminating proxy. Absolute links (`@odata.nextLink`) are
    /// made on it; without it they are made on the origin a client addressed over TLS, and are
    /// relative over plain HTTP. See [`Self::public_url`].
    #[serde(default)]
    pub public_url: Option<String>,
    /// Seconds a client has, from its first byte, to send a whole request head (and, over TLS,
    /// from connecting to finish the handshake); a client sending its headers byte by byte is cut
    /// off then. See [`HttpLimits`].
    #[serde(default = "default_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may stay open sending nothing between requests (or not reading its
    /// answer) before it is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Seconds a request may take, reading its body included, before it is answered 503; at least
    /// 20, longer than the API's own waits.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Connections served at once; further ones wait in the kernel's backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections served at once from one IP address; a further one is closed at once.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
}

/// `[http.tls]`: either a certificate and key from PEM files, or `self_signed = true`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (PEM), the server's certificate first.
    pub cert_file: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1); must not be readable by others.
    pub key_file: Option<PathBuf>,
    /// Make a self-signed certificate at first start in `data_dir/tls/`, and reuse it later.
    #[serde(default)]
    pub self_signed: bool,
    /// Names and addresses the self-signed certificate is valid for, besides `localhost`,
    /// `127.0.0.1`, `::1` and the host name.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// How the API is served: the validated form of [`HttpConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiTransport {
    /// HTTPS.
    Tls(TlsSource),
    /// Plain HTTP, asked for with `http.plain_http = true`.
    PlainHttp,
}

/// Where the API's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// A certificate chain and its key, from PEM files.
    Files {
        /// `http.tls.cert_file`.
        cert_file: PathBuf,
        /// `http.tls.key_file`.
        key_file: PathBuf,
    },
    /// A self-signed certificate kept in the data directory.
    SelfSigned {
        /// `http.tls.subject_alt_names`: names beyond the local ones; each a DNS name or an IP
        /// address.
        subject_alt_names: Vec<String>,
    },
}

/// What the API grants one client: the validated form of the limits in [`HttpConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// `http.header_read_timeout_secs`.
    pub header_read_timeout: Duration,
    /// `http.idle_timeout_secs`.
    pub idle_timeout: Duration,
    /// `http.request_timeout_secs`.
    pub request_timeout: Duration,
    /// `http.max_connections`.
    pub max_connections: usize,
    /// `http.max_connections_per_address`; never more than `max_connections`.
    pub max_connections_per_address: usize,
}

/// The metrics listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
}

/// One API bearer token, by digest, and what it may do.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token: recorded as the principal.
    pub name: String,
    /// The token's SHA-256, 64 lower-case hex digits (`fleetlaps-orchestrator hash-token`).
    pub token_sha256: String,
    /// Scopes, such as `DeviceLocalCredential.Read.All`.
    pub scopes: Vec<String>,
    /// When it stops working, if ever (RFC 3339).
    #[serde(default)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Log output.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` for people, `json` for collectors.
    #[serde(default)]
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
            tls: None,
            rotate_min_interval_secs: default_rotate_min_interval_secs(),
            plain_http: false,
            public_url: None,
            header_read_timeout_secs: default_header_read_timeout_secs(),
            idle_timeout_secs: default_idle_timeout_secs(),
            request_timeout_secs: default_request_timeout_secs(),
            max_connections: default_max_connections(),
            max_connections_per_address: default_max_connections_per_address(),
        }
    }
}

impl HttpConfig {
    /// How the API is served; fails, naming the settings, unless exactly one of TLS (from files
    /// or self-signed) and plain HTTP is asked for.
    pub fn transport(&self) -> anyhow::Result<ApiTransport> {
        const ALLOWED: &str = "allowed: [http.tls] with self_signed = true, [http.tls] with cert_file and \
                               key_file (PEM), or http.plain_http = true";
        let tls = match (&self.tls, self.plain_http) {
            (None, false) => {
                anyhow::bail!("invalid config: http: the API serves TLS unless plain HTTP is asked for; {ALLOWED}")
            }
            (Some(_), true) => {
                anyhow::bail!("invalid config: http: both [http.tls] and http.plain_http = true are set; {ALLOWED}")
            }
            (None, true) => return Ok(ApiTransport::PlainHttp),
            (Some(tls), false) => tls,
        };
        let source = match (tls.self_signed, &tls.cert_file, &tls.key_file) {
            (true, None, None) => TlsSource::SelfSigned {
                subject_alt_names: tls.subject_alt_names.clone(),
            },
            (false, Some(cert_file), Some(key_file)) => TlsSource::Files {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            },
            (true, _, _) => anyhow::bail!(
                "invalid config: http.tls: self_signed = true and cert_file/key_file are both set; \
                 allowed: self_signed = true, or cert_file and key_file"
            ),
            (false, None, None) => anyhow::bail!(
                "invalid config: http.tls: no certificate; allowed: self_signed = true, or cert_file and key_file"
            ),
            (false, _, _) => anyhow::bail!(
                "invalid config: http.tls: cert_file and key_file go together; allowed: both, or self_signed = true"
            ),
        };
        if let TlsSource::Files { .. } = source
            && !tls.subject_alt_names.is_empty()
        {
            anyhow::bail!(
                "invalid config: http.tls.subject_alt_names: only with self_signed = true; \
                 a certificate from cert_file carries its own names"
            );
        }
        for name in &tls.subject_alt_names {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                anyhow::bail!(
                    "invalid config: http.tls.subject_alt_names: {name:?}: allowed: a DNS name or an IP address"
                );
            }
        }
        Ok(ApiTransport::Tls(source))
    }

    /// `public_url`, checked: an `http://` or `https://` origin (a host and maybe a port, no
    /// path, query or user), without a trailing slash.
    pub fn public_url(&self) -> anyhow::Result<Option<String>> {
        let Some(text) = &self.public_url else {
            return Ok(None);
        };
        let invalid = |why: &str| {
            anyhow::anyhow!(
                "invalid config: http.public_url = {text:?}: {why}; allowed: the origin clients reach the API at, \
                 https://host or https://host:port (http:// only where clients really use plain HTTP)"
            )
        };
        let uri: axum::http::Uri = text.parse().map_err(|_| invalid("not a URL"))?;
        let Some(scheme @ ("https" | "http")) = uri.scheme_str() else {
            return Err(invalid("the scheme is not https or http"));
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("it names a user"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid("it has a path or a query (the API's paths start at /v1.0)"));
        }
        Ok(Some(format!("{scheme}://{authority}")))
    }

    /// The connection and timeout limits; fails, naming the setting and its allowed range, when
    /// one is out of range.
    pub fn limits(&self) -> anyhow::Result<HttpLimits> {
        let seconds = |name: &str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(Duration::from_secs(value))
            } else {
                Err(anyhow::anyhow!(
                    "invalid config: http.{name} = {value}: allowed {min} to {max} seconds"
                ))
            }
        };
        let header_read_timeout = seconds("header_read_timeout_secs", self.header_read_timeout_secs, 1, 300)?;
        let idle_timeout = seconds("idle_timeout_secs", self.idle_timeout_secs, 1, 3600)?;
        let request_timeout = seconds(
            "request_timeout_secs",
            self.request_timeout_secs,
            MIN_REQUEST_TIMEOUT_SECS,
            3600,
        )?;
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            anyhow::bail!(
                "invalid config: http.max_connections = {}: allowed 1 to {MAX_CONNECTIONS}",
                self.max_connections
            );
        }
        if !(1..=self.max_connections).contains(&self.max_connections_per_address) {
            anyhow::bail!(
                "invalid config: http.max_connections_per_address = {}: allowed 1 to http.max_connections ({})",
                self.max_connections_per_address,
                self.max_connections
            );
        }
        Ok(HttpLimits {
            header_read_timeout,
            idle_timeout,
            request_timeout,
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
        })
    }
}

/// The least `http.request_timeout_secs` allowed: longer than the API's own waits (JetStream's
/// ack, 5 s, then the projections, 10 s), so that a handler ends them with its own answer (such as
/// "recorded but not yet visible") and is never dropped between recording an event and
/// finishing what goes with it.
const MIN_REQUEST_TIMEOUT_SECS: u64 = 20;

/// The most `http.max_connections` allowed: far beyond what one process serves well, it only
/// catches typing mistakes.
const MAX_CONNECTIONS: usize = 1 << 20;

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9184)),
        }
    }
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_rotate_min_interval_secs() -> u64 {
    300
}

fn default_header_read_timeout_secs() -> u64 {
    10
}

fn default_idle_timeout_secs() -> u64 {
    60
}

fn default_request_timeout_secs() -> u64 {
    30
}

fn default_max_connections() -> usize {
    1024
}

fn default_max_connections_per_address() -> usize {
    64
}

fn default_quarantine_max_entries() -> u64 {
    crate::projection::QUARANTINE_DEFAULT_MAX_ENTRIES
}

fn default_consumer() -> String {
    "orchestrator".to_owned()
}

impl Config {
    /// How to authenticate to NATS; fails, naming the settings, unless exactly one of
    /// `nats.nkey_seed_file` and `insecure_nats = true` is set.
    pub fn nats_credentials(&self) -> anyhow::Result<NatsCredentials> {
        const ALLOWED: &str = "allowed: nats.nkey_seed_file = \"<file>\" (`fleetlaps-orchestrator nkey --seed-file \
                               <file>` creates one), or insecure_nats = true for a nats-server that admits anyone \
                               (development only)";
        match (&self.nats.nkey_seed_file, self.insecure_nats) {
            (Some(path), false) => Ok(NatsCredentials::Nkey(path.clone())),
            (None, true) => Ok(NatsCredentials::Insecure),
            (None, false) => anyhow::bail!(
                "invalid config: nats: no credentials; the orchestrator connects to NATS only as an nkey user \
                 unless told otherwise; {ALLOWED}"
            ),
            (Some(_), true) => {
                anyhow::bail!("invalid config: both nats.nkey_seed_file and insecure_nats = true are set; {ALLOWED}")
            }
        }
    }

    /// Reads the file at `path`, then applies `FLEETLAPS_*` environment variables over it, except
    /// the agent's own `FLEETLAPS_AGENT_*` (both programs run on the orchestrator's host).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            anyhow::bail!("config file {} does not exist", path.display());
        }
        let config: Self = Figment::new()
            .merge(Toml::file(path))
            .merge(
                Env::prefixed("FLEETLAPS_")
                    .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("agent_"))
                    .split("__"),
            )
            .extract()
            .map_err(|err| anyhow::anyhow!("invalid config {}: {err}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a config from TOML text alone (tests and tools).
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|err| anyhow::anyhow!("invalid config: {err}"))?;
        config.validate()?;
        Ok(config)
    }

    /// The validated `[policy]`, if there is one.
    pub fn policy(&self) -> anyhow::Result<Option<fleetlaps_proto::policy::Policy>> {
        self.policy
            .as_ref()
            .map(|settings| {
                fleetlaps_proto::policy::Policy::from_settings(settings)
                    .map_err(|err| anyhow::anyhow!("invalid config: policy: {err}"))
            })
            .transpose()
    }

    /// The offline recovery public key, validated.
    pub fn escrow_recovery_public_key(&self) -> anyhow::Result<Option<fleetlaps_proto::seal::EscrowPublicKey>> {
        self.escrow_recovery_public_key
            .as_deref()
            .map(|text| {
                text.trim().parse().map_err(|err| {
                    anyhow::anyhow!(
                        "invalid config: escrow_recovery_public_key: {err}; allowed: the 43-character public key \
                         `fleetlaps-orchestrator escrow recovery-key --out FILE` prints"
                    )
                })
            })
            .transpose()
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.policy()?;
        self.escrow_recovery_public_key()?;
        for token in &self.tokens {
            if let Err(problem) = crate::auth::Scope::parse_all(&token.scopes) {
                anyhow::bail!("invalid config: tokens.scopes of token {:?}: {problem}", token.name);
            }
            if !crate::auth::is_sha256_hex(&token.token_sha256) {
                anyhow::bail!(
                    "invalid config: tokens.token_sha256 of token {:?}: allowed: 64 lower-case hex digits, the \
                     SHA-256 of the token (`fleetlaps-orchestrator hash-token`)",
                    token.name
                );
            }
        }
        if self
            .bootstrap_admin_token
            .as_ref()
            .is_some_and(|token| token.expose_secret().len() < 20)
        {
            anyhow::bail!("invalid config: bootstrap_admin_token: allowed: at least 20 characters");
        }
        if self.bootstrap_admin_token.is_none() && self.bootstrap_admin_token_expires_at.is_some() {
            anyhow::bail!(
                "invalid config: bootstrap_admin_token_expires_at is set but bootstrap_admin_token is not; allowed: \
                 an expiry only for a bootstrap admin token"
            );
        }
        if self.nats.consumer.is_empty()
            || !self
                .nats
                .consumer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            anyhow::bail!(
                "invalid config: nats.consumer = {:?}: allowed 1 or more of A-Z, a-z, 0-9, '-' and '_'",
                self.nats.consumer
            );
        }
        let range = crate::projection::QUARANTINE_MAX_ENTRIES_RANGE;
        if !range.contains(&self.quarantine.max_entries) {
            anyhow::bail!(
                "invalid config: quarantine.max_entries = {}: allowed {} to {}",
                self.quarantine.max_entries,
                range.start(),
                range.end()
            );
        }
        if !SIGNATURES_VERIFIED_EVERY.contains(&self.history.signatures_verified_every) {
            anyhow::bail!(
                "invalid config: history.signatures_verified_every = {}: allowed {} to {}",
                self.history.signatures_verified_every,
                SIGNATURES_VERIFIED_EVERY.start(),
                SIGNATURES_VERIFIED_EVERY.end()
            );
        }
        if !WAVE_DEVICES_PER_SECOND.contains(&self.campaigns.wave_devices_per_second) {
            anyhow::bail!(
                "invalid config: campaigns.wave_devices_per_second = {}: allowed {} to {}",
                self.campaigns.wave_devices_per_second,
                WAVE_DEVICES_PER_SECOND.start(),
                WAVE_DEVICES_PER_SECOND.end()
            );
        }
        if !SILENT_AFTER_SECS.contains(&self.monitoring.silent_after_secs) {
            anyhow::bail!(
                "invalid config: monitoring.silent_after_secs = {}: allowed {} to {} seconds",
                self.monitoring.silent_after_secs,
                SILENT_AFTER_SECS.start(),
                SILENT_AFTER_SECS.end()
            );
        }
        self.detectors.validate()?;
        self.http.transport()?;
        self.http.limits()?;
        self.http.public_url()?;
        self.nats_credentials()?;
        if !(self.nats.url.starts_with("nats://") || self.nats.url.starts_with("tls://")) {
            anyhow::bail!(
                "invalid config: nats.url = {:?}: allowed: tls://host:port (TLS) or nats://host:port",
                self.nats.url
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal config with `extra` appended.
    fn config_with(extra: &str) -> anyhow::Result<Config> {
        Config::from_toml(&format!(
            "data_dir = \"/tmp/x\"\n[nats]\nurl = \"nats://127.0.0.1:4222\"\nnkey_seed_file = \"/x/nk\"\n{extra}"
        ))
    }

    #[test]
    fn the_public_url_is_an_origin_and_anything_else_is_refused_naming_it() {
        let public_url = |value: &str| {
            config_with(&format!("[http]\nplain_http = true\npublic_url = {value:?}\n"))
                .map(|config| config.http.public_url().expect("validated"))
        };
        assert_eq!(
            public_url("https://laps.example.org").expect("valid").as_deref(),
            Some("https://laps.example.org")
        );
        assert_eq!(
            public_url("https://laps.example.org:8443/").expect("valid").as_deref(),
            Some("https://laps.example.org:8443")
        );
        for refused in [
            "laps.example.org",
            "ftp://laps.example.org",
            "https://laps.example.org/v1.0",
            "https://laps.example.org/?a=b",
            "https://user@laps.example.org",
            "https://",
        ] {
            let err = public_url(refused).expect_err(refused).to_string();
            assert!(
                err.contains("http.public_url") && err.contains("allowed"),
                "{refused}: {err}"
            );
        }
        let unset = config_with("[http]\nplain_http = true\n").expect("valid");
        assert_eq!(unset.http.public_url().expect("valid"), None);
    }

    #[test]
    fn a_minimal_config_takes_defaults() {
        let config = config_with("[http.tls]\nself_signed = true\n").expect("valid");
        assert_eq!(config.nats.consumer, "orchestrator");
        assert_eq!(config.http.listen.port(), 8080);
        assert_eq!(
            config.http.transport().expect("valid"),
            ApiTransport::Tls(TlsSource::SelfSigned {
                subject_alt_names: Vec::new()
            })
        );
    }

    #[test]
    fn the_api_transport_is_tls_from_files_self_signed_or_explicit_plain_http() {
        let files = config_with("[http.tls]\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/k.pem\"\n").expect("valid");
        assert_eq!(
            files.http.transport().expect("valid"),
            ApiTransport::Tls(TlsSource::Files {
                cert_file: PathBuf::from("/etc/c.pem"),
                key_file: PathBuf::from("/etc/k.pem"),
            })
        );
        let named =
            config_with("[http.tls]\nself_signed = true\nsubject_alt_names = [\"laps.example\", \"10.0.0.5\"]\n")
                .expect("valid");
        assert_eq!(
            named.http.transport().expect("valid"),
            ApiTransport::Tls(TlsSource::SelfSigned {
                subject_alt_names: vec!["laps.example".to_owned(), "10.0.0.5".to_owned()]
            })
        );
        let plain = config_with("[http]\nplain_http = true\n").expect("valid");
        assert_eq!(plain.http.transport().expect("valid"), ApiTransport::PlainHttp);
    }

    #[test]
    fn the_http_limits_default_to_server_values_and_can_be_set() {
        let defaults = config_with("[http]\nplain_http = true\n").expect("valid");
        assert_eq!(
            defaults.http.limits().expect("valid"),
            HttpLimits {
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                request_timeout: Duration::from_secs(30),
                max_connections: 1024,
                max_connections_per_address: 64,
            }
        );
        let set = config_with(
            "[http]\nplain_http = true\nheader_read_timeout_secs = 2\nidle_timeout_secs = 5\n\
             request_timeout_secs = 20\nmax_connections = 10\nmax_connections_per_address = 10\n",
        )
        .expect("valid");
        assert_eq!(
            set.http.limits().expect("valid"),
            HttpLimits {
                header_read_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(20),
                max_connections: 10,
                max_connections_per_address: 10,
            }
        );
    }

    #[test]
    fn http_limits_out_of_range_are_refused_naming_the_setting_and_the_range() {
        let refused = |lines: &str| {
            config_with(&format!("[http]\nplain_http = true\n{lines}\n"))
                .expect_err(lines)
                .to_string()
        };
        let err = refused("header_read_timeout_secs = 0");
        assert!(
            err.contains("http.header_read_timeout_secs = 0: allowed 1 to 300 seconds"),
            "{err}"
        );
        let err = refused("idle_timeout_secs = 3601");
        assert!(
            err.contains("http.idle_timeout_secs = 3601: allowed 1 to 3600 seconds"),
            "{err}"
        );
        let err = refused("request_timeout_secs = 19");
        assert!(
            err.contains("http.request_timeout_secs = 19: allowed 20 to 3600 seconds"),
            "{err}"
        );
        let err = refused("max_connections = 0");
        assert!(err.contains("http.max_connections = 0: allowed 1 to 1048576"), "{err}");
        let err = refused("max_connections = 8\nmax_connections_per_address = 9");
        assert!(
            err.contains("http.max_connections_per_address = 9: allowed 1 to http.max_connections (8)"),
            "{err}"
        );
        let err = refused("max_connections_per_address = 0");
        assert!(err.contains("http.max_connections_per_address = 0"), "{err}");
        // A negative number is not a count at all: serde names the key.
        let err = refused("max_connections = -1");
        assert!(err.contains("max_connections"), "{err}");
    }

    #[test]
    fn a_config_asking_for_neither_tls_nor_plain_http_or_for_both_is_refused_naming_the_settings() {
        for (extra, expected) in [
            ("", "the API serves TLS unless plain HTTP is asked for"),
            (
                "[http]\nlisten = \"127.0.0.1:0\"\n",
                "the API serves TLS unless plain HTTP is asked for",
            ),
            (
                "[http]\nplain_http = false\n",
                "the API serves TLS unless plain HTTP is asked for",
            ),
            (
                "[http]\nplain_http = true\n[http.tls]\nself_signed = true\n",
                "both [http.tls] and http.plain_http = true",
            ),
            (
                "[http.tls]\nself_signed = true\ncert_file = \"c\"\nkey_file = \"k\"\n",
                "self_signed = true and cert_file/key_file are both set",
            ),
            ("[http.tls]\n", "http.tls: no certificate"),
            ("[http.tls]\ncert_file = \"c\"\n", "cert_file and key_file go together"),
            (
                "[http.tls]\ncert_file = \"c\"\nkey_file = \"k\"\nsubject_alt_names = [\"a\"]\n",
                "subject_alt_names: only with self_signed = true",
            ),
            (
                "[http.tls]\nself_signed = true\nsubject_alt_names = [\"not a name\"]\n",
                "\"not a name\": allowed: a DNS name or an IP address",
            ),
        ] {
            let err = config_with(extra).expect_err(extra);
            let message = err.to_string();
            assert!(message.contains(expected), "{extra:?}: {message}");
        }
        let err = config_with("").expect_err("no transport");
        assert!(
            err.to_string()
                .contains("allowed: [http.tls] with self_signed = true, [http.tls] with cert_file and key_file (PEM), or http.plain_http = true"),
            "{err}"
        );
        let err = config_with("[http.tls]\nself_signed = true\ncertfile = \"c\"\n").expect_err("unknown field");
        assert!(err.to_string().contains("certfile"), "{err}");
    }

    #[test]
    fn unknown_fields_scopes_and_bad_digests_are_named() {
        let err = Config::from_toml(
            "data_dir = \"/x\"\nbogus = 1\n[nats]\nurl = \"nats://n:4222\"\nnkey_seed_file = \"/x/nk\"\n",
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("bogus"), "{err}");
        let digest = "0".repeat(64);
        let err = Config::from_toml(&format!(
            "data_dir = \"/x\"\n[nats]\nurl = \"nats://n:4222\"\nnkey_seed_file = \"/x/nk\"\n[http]\nplain_http = true\n[[tokens]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\nscopes = [\"Everything\"]\n"
        ))
        .expect_err("unknown scope");
        assert!(err.to_string().contains("unknown scope \"Everything\""), "{err}");
        assert!(err.to_string().contains("Audit.Read.All"), "{err}");
        let err = Config::from_toml(
            "data_dir = \"/x\"\n[nats]\nurl = \"nats://n:4222\"\nnkey_seed_file = \"/x/nk\"\n[http]\nplain_http = true\n[[tokens]]\nname = \"a\"\ntoken_sha256 = \"plaintext\"\nscopes = []\n",
        )
        .expect_err("not a digest");
        assert!(err.to_string().contains("tokens.token_sha256 of token \"a\""), "{err}");
        let err = Config::from_toml(
            "data_dir = \"/x\"\nbootstrap_admin_token = \"short\"\n[nats]\nurl = \"nats://n:4222\"\nnkey_seed_file = \"/x/nk\"\n[http]\nplain_http = true\n",
        )
        .expect_err("too short");
        assert!(
            err.to_string().contains("bootstrap_admin_token: allowed: at least 20"),
            "{err}"
        );
    }

    #[test]
    fn the_policy_is_optional_and_validated_with_laps_names() {
        let none = config_with("[http]\nplain_http = true\n").expect("valid");
        assert!(none.policy().expect("valid").is_none());
        let some = config_with("[http]\nplain_http = true\n[policy]\nPasswordLength = 20\n").expect("valid");
        assert_eq!(some.policy().expect("valid").expect("present").password_length(), 20);
        let err = config_with("[http]\nplain_http = true\n[policy]\nPasswordLength = 7\n").expect_err("range");
        assert!(err.to_string().contains("PasswordLength = 7: allowed 8 to 64"), "{err}");
    }

    #[test]
    fn the_campaign_wave_rate_defaults_to_five_hundred_and_is_refused_out_of_range() {
        let plain = "[http]\nplain_http = true\n";
        assert_eq!(
            config_with(plain).expect("valid").campaigns.wave_devices_per_second,
            500
        );
        for bad in ["0", "100001"] {
            let err = config_with(&format!("{plain}[campaigns]\nwave_devices_per_second = {bad}\n")).expect_err(bad);
            assert!(
                err.to_string().contains(&format!(
                    "campaigns.wave_devices_per_second = {bad}: allowed 1 to 100000"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn a_device_is_silent_after_three_hours_by_default_and_the_threshold_is_refused_out_of_range() {
        let plain = "[http]\nplain_http = true\n";
        let config = config_with(plain).expect("valid");
        assert_eq!(config.monitoring.silent_after(), Duration::from_secs(3 * 3600));
        let set = config_with(&format!("{plain}[monitoring]\nsilent_after_secs = 600\n")).expect("valid");
        assert_eq!(set.monitoring.silent_after(), Duration::from_secs(600));
        for bad in ["0", "2592001"] {
            let err = config_with(&format!("{plain}[monitoring]\nsilent_after_secs = {bad}\n")).expect_err(bad);
            assert!(
                err.to_string().contains(&format!(
                    "monitoring.silent_after_secs = {bad}: allowed 1 to 2592000 seconds"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn detectors_are_off_by_default_and_out_of_range_settings_are_refused_by_name() {
        use fleetlaps_proto::breach::Detector;
        let plain = "[http]\nplain_http = true\n";
        let config = config_with(plain).expect("valid");
        for detector in Detector::ALL {
            assert_eq!(
                config.detectors.thresholds(detector).expect("valid").mode,
                DetectorMode::Off
            );
        }
        let on = config_with(&format!(
            "{plain}[detectors]\ncooldown_minutes = 0\n[detectors.lateral_movement]\nmode = \"campaign\"\ndevices = 3\nwindow_minutes = 5\n"
        ))
        .expect("valid");
        let lateral = on.detectors.thresholds(Detector::LateralMovement).expect("valid");
        assert_eq!(
            (lateral.mode, lateral.threshold, lateral.window),
            (DetectorMode::Campaign, 3, Duration::from_secs(300))
        );
        for (table, bad, message) in [
            (
                "lateral_movement",
                "devices = 1",
                "detectors.lateral_movement.devices = 1: allowed 2 to 10000",
            ),
            (
                "read_then_spread",
                "window_minutes = 0",
                "detectors.read_then_spread.window_minutes = 0: allowed 1 to 1440",
            ),
            (
                "repeated_failures",
                "failures = 1",
                "detectors.repeated_failures.failures = 1: allowed 2 to 1000000",
            ),
            (
                "repeated_failures",
                "devices = 3",
                "detectors.repeated_failures.devices: allowed only failures",
            ),
            (
                "lateral_movement",
                "mode = \"loud\"",
                "found `loud`, expected `one of `off`, `alert`, `campaign``",
            ),
        ] {
            let err = config_with(&format!("{plain}[detectors.{table}]\n{bad}\n")).expect_err(bad);
            assert!(err.to_string().contains(message), "{err}");
        }
        let err = config_with(&format!("{plain}[detectors]\ncampaign_deadline_minutes = 1\n")).expect_err("short");
        assert!(
            err.to_string()
                .contains("detectors.campaign_deadline_minutes = 1: allowed 5 to 129600"),
            "{err}"
        );
    }

    #[test]
    fn the_quarantine_bound_defaults_to_ten_thousand_and_is_refused_out_of_range() {
        let plain = "[http]\nplain_http = true\n";
        assert_eq!(config_with(plain).expect("valid").quarantine.max_entries, 10_000);
        let small = config_with(&format!("{plain}[quarantine]\nmax_entries = 1\n")).expect("valid");
        assert_eq!(small.quarantine.max_entries, 1);
        for bad in ["0", "1000001"] {
            let err = config_with(&format!("{plain}[quarantine]\nmax_entries = {bad}\n")).expect_err(bad);
            assert!(
                err.to_string()
                    .contains(&format!("quarantine.max_entries = {bad}: allowed 1 to 1000000")),
                "{err}"
            );
        }
    }

    #[test]
    fn attestations_default_to_every_ten_thousand_messages_and_are_refused_out_of_range() {
        let plain = "[http]\nplain_http = true\n";
        assert_eq!(
            config_with(plain).expect("valid").history.signatures_verified_every,
            10_000
        );
        let often = config_with(&format!("{plain}[history]\nsignatures_verified_every = 100\n")).expect("valid");
        assert_eq!(often.history.signatures_verified_every, 100);
        for bad in ["99", "1000001"] {
            let err = config_with(&format!("{plain}[history]\nsignatures_verified_every = {bad}\n")).expect_err(bad);
            assert!(
                err.to_string().contains(&format!(
                    "history.signatures_verified_every = {bad}: allowed 100 to 1000000"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn the_recovery_public_key_is_optional_and_validated() {
        let with_key = |key: &str| {
            Config::from_toml(&format!(
                "data_dir = \"/x\"\nescrow_recovery_public_key = \"{key}\"\n[nats]\nurl = \"nats://n:4222\"\nnkey_seed_file = \"/x/nk\"\n[http]\nplain_http = true\n"
            ))
        };
        let public_key = fleetlaps_proto::seal::EscrowSecretKey::generate().public_key();
        let config = with_key(&public_key.to_string()).expect("valid");
        assert_eq!(config.escrow_recovery_public_key().expect("valid"), Some(public_key));
        let err = with_key("not-a-key").expect_err("refused");
        assert!(
            err.to_string().contains("escrow_recovery_public_key") && err.to_string().contains("recovery-key"),
            "{err}"
        );
        let none = config_with("[http]\nplain_http = true\n").expect("valid");
        assert!(none.escrow_recovery_public_key().expect("valid").is_none());
    }

    #[test]
    fn nats_credentials_are_required_unless_insecure_nats_is_asked_for() {
        let with = |top: &str, nats: &str| {
            Config::from_toml(&format!(
                "data_dir = \"/x\"\n{top}\n[nats]\nurl = \"tls://n:4222\"\n{nats}\n[http]\nplain_http = true\n"
            ))
        };
        let nkey = with("", "nkey_seed_file = \"/x/nk\"\nca_file = \"/x/ca.pem\"").expect("valid");
        assert_eq!(
            nkey.nats_credentials().expect("valid"),
            NatsCredentials::Nkey(PathBuf::from("/x/nk"))
        );
        assert_eq!(nkey.nats.ca_file, Some(PathBuf::from("/x/ca.pem")));
        let insecure = with("insecure_nats = true", "").expect("valid");
        assert_eq!(insecure.nats_credentials().expect("valid"), NatsCredentials::Insecure);

        let err = with("", "").expect_err("no credentials");
        let message = err.to_string();
        assert!(message.contains("nats: no credentials"), "{message}");
        assert!(
            message.contains("allowed: nats.nkey_seed_file") && message.contains("or insecure_nats = true"),
            "{message}"
        );
        let err = with("insecure_nats = false", "").expect_err("no credentials");
        assert!(err.to_string().contains("nats: no credentials"), "{err}");
        let err = with("insecure_nats = true", "nkey_seed_file = \"/x/nk\"").expect_err("both");
        assert!(
            err.to_string()
                .contains("both nats.nkey_seed_file and insecure_nats = true"),
            "{err}"
        );
        let err = Config::from_toml(
            "data_dir = \"/x\"\n[nats]\nurl = \"http://n:4222\"\nnkey_seed_file = \"/x/nk\"\n[http]\nplain_http = true\n",
        )
        .expect_err("scheme");
        assert!(
            err.to_string()
                .contains("allowed: tls://host:port (TLS) or nats://host:port"),
            "{err}"
        );
    }

    #[test]
    fn token_secrets_are_redacted_in_debug() {
        let config = Config::from_toml(
            "data_dir = \"/x\"\nbootstrap_admin_token = \"s3cr3t-bootstrap-token\"\n[nats]\nurl = \"nats://n:4222\"\nnkey_seed_file = \"/x/nk\"\n[http]\nplain_http = true\n",
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("s3cr3t-bootstrap-token"));
    }
}
