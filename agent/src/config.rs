//! The agent's configuration: one typed [`Config`], layered from a TOML file and then
//! `FLEETLAPS_AGENT_`-prefixed environment variables (`FLEETLAPS_AGENT_NATS__URL` sets
//! `nats.url`). The prefix is the agent's own: the orchestrator reads `FLEETLAPS_*`, and both
//! run on the orchestrator's own host.
//!
//! A leaf: it depends on no other module of the agent but [`crate::password_hash`] (for
//! [`HashRounds`]).
//!
//! The `[policy]` table holds LAPS settings under their LAPS names; it is the local policy
//! source (LAPS: local configuration), validated on load. A policy the orchestrator sent at
//! enrollment wins over it, as LAPS's CSP policy wins over local configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use fleetlaps_proto::ids::DeviceName;
use fleetlaps_proto::policy::{Policy, PolicySettings};
use fleetlaps_proto::seal::EscrowPublicKey;
use serde::Deserialize;

use crate::password_hash::HashRounds;

/// Everything the agent needs to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The device's host name as reported; defaults to the kernel's host name.
    #[serde(default)]
    pub device_name: Option<DeviceName>,
    /// Where the agent keeps its state (sled) and its control socket. Owner-only.
    pub state_dir: PathBuf,
    /// The orchestrator's escrow public key: passwords leave the device sealed to it. Optional:
    /// enrollment gives it (in the identity); when both are present they must be equal.
    #[serde(default)]
    pub escrow_public_key: Option<EscrowPublicKey>,
    /// Seconds between processing cycles (LAPS: one hour).
    #[serde(default = "default_processing_interval_secs")]
    pub processing_interval_secs: u64,
    /// At most this many events wait in the outbox (3 or more): reports beyond `outbox_limit - 2`
    /// are dropped and counted, so the last two places are always free for a rotation's backup and
    /// commit.
    #[serde(default = "default_outbox_limit")]
    pub outbox_limit: usize,
    /// Seconds after which a backup the orchestrator has not confirmed storing is sent again.
    #[serde(default = "default_backup_confirmation_timeout_secs")]
    pub backup_confirmation_timeout_secs: u64,
    /// Seconds a rotation waits for the orchestrator to confirm its backup before the cycle
    /// gives up, leaving the account unchanged; the next cycle waits again.
    #[serde(default = "default_backup_confirmation_wait_secs")]
    pub backup_confirmation_wait_secs: u64,
    /// `fleetlaps-agent reset` is refused within this many seconds of the previous one.
    #[serde(default = "default_reset_min_interval_secs")]
    pub reset_min_interval_secs: u64,
    /// The SHA-512 crypt rounds of the hashes written to the account (1,000 to 999,999,999;
    /// glibc's 5,000 by default). See [`HashRounds`].
    #[serde(default)]
    pub password_hash_rounds: HashRounds,
    /// The NATS server.
    pub nats: NatsConfig,
    /// Which account database the agent manages.
    pub account: AccountConfig,
    /// The local LAPS policy.
    #[serde(default)]
    pub policy: PolicySettings,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// How the post-authentication actions end sessions, reboot and terminate processes.
    #[serde(default)]
    pub post_authentication: PostAuthConfig,
    /// The agent's own metrics listener; none without `listen`.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: where the agent serves its own Prometheus metrics (`GET /metrics`), if anywhere.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The address to serve on, such as `127.0.0.1:9465`; absent, no listener is opened. Plain
    /// HTTP: keep it on loopback or a management network (it shows counters and times, never a
    /// password).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// How to reach NATS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server URL, `nats://host:port`.
    pub url: String,
    /// Seconds to wait for JetStream to acknowledge a publish.
    #[serde(default = "default_ack_timeout_secs")]
    pub ack_timeout_secs: u64,
    /// A file holding this device's nkey seed (`SU…`), for a nats-server that requires
    /// authentication. It must be owner-only (mode 0600 or 0400). The server's config lists the
    /// device's id with the seed's public key, which the agent logs when it connects.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// The CA certificate (PEM) the NATS server's certificate must chain to. With it the
    /// connection must be TLS (a `tls://` URL, or a `nats://` one whose server offers TLS);
    /// without it a `tls://` URL trusts the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// The account database behind the managed account.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum AccountConfig {
    /// A file of `name:uid:hash` lines, for simulated fleets and tests.
    File {
        /// The file.
        path: PathBuf,
    },
    /// The machine's own accounts: `/etc/passwd`, `/etc/shadow`, and `chpasswd -e` to write.
    Linux {
        /// The user database.
        #[serde(default = "default_passwd")]
        passwd: PathBuf,
        /// The shadow database, which holds the hashes.
        #[serde(default = "default_shadow")]
        shadow: PathBuf,
        /// The program that stores a hash; it reads `name:hash` lines on its standard input.
        #[serde(default = "default_chpasswd")]
        chpasswd: PathBuf,
    },
}

/// The commands behind LAPS `PostAuthenticationActions`, run as argv (no shell) with `{user}`
/// replaced by the managed account's name. A non-zero exit is a failure, and the actions are
/// retried `retry_after_secs` later.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostAuthConfig {
    /// Ends the account's sessions (actions 3 and 11).
    #[serde(default = "default_logoff_command")]
    pub logoff_command: Vec<String>,
    /// Restarts the device (action 5).
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    /// Kills the account's remaining processes (action 11). Exit code 1 means "no process
    /// matched", as `pkill` says it, and counts as success.
    #[serde(default = "default_terminate_command")]
    pub terminate_command: Vec<String>,
    /// Seconds between attempts after a failure (LAPS retries until the reset succeeds).
    #[serde(default = "default_retry_after_secs")]
    pub retry_after_secs: u64,
    /// Failed authentications as the managed account are reported at most twice per this many
    /// seconds: the first at once, the others counted and reported together (1 to 86400).
    #[serde(default = "default_failure_report_interval_secs")]
    pub failure_report_interval_secs: u64,
}

impl Default for PostAuthConfig {
    fn default() -> Self {
        Self {
            logoff_command: default_logoff_command(),
            reboot_command: default_reboot_command(),
            terminate_command: default_terminate_command(),
            retry_after_secs: default_retry_after_secs(),
            failure_report_interval_secs: default_failure_report_interval_secs(),
        }
    }
}

impl PostAuthConfig {
    /// The time between attempts after a failure.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs(self.retry_after_secs)
    }

    /// The window in which failed authentications are counted into one report.
    pub fn failure_report_interval(&self) -> chrono::Duration {
        chrono::Duration::seconds(i64::try_from(self.failure_report_interval_secs).unwrap_or(i64::MAX))
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, command) in [
            ("logoff_command", &self.logoff_command),
            ("reboot_command", &self.reboot_command),
            ("terminate_command", &self.terminate_command),
        ] {
            if command.first().is_none_or(String::is_empty) {
                anyhow::bail!("post_authentication.{name} is empty: give a program and its arguments");
            }
        }
        if self.retry_after_secs == 0 || self.retry_after_secs > 86_400 {
            anyhow::bail!(
                "post_authentication.retry_after_secs = {}: allowed 1 to 86400 seconds",
                self.retry_after_secs
            );
        }
        if !(1..=86_400).contains(&self.failure_report_interval_secs) {
            anyhow::bail!(
                "post_authentication.failure_report_interval_secs = {}: allowed 1 to 86400 seconds",
                self.failure_report_interval_secs
            );
        }
        Ok(())
    }
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

fn default_processing_interval_secs() -> u64 {
    3600
}

fn default_failure_report_interval_secs() -> u64 {
    60
}

fn default_outbox_limit() -> usize {
    crate::state::DEFAULT_OUTBOX_LIMIT
}

fn default_backup_confirmation_timeout_secs() -> u64 {
    60
}

fn default_backup_confirmation_wait_secs() -> u64 {
    20
}

fn default_reset_min_interval_secs() -> u64 {
    60
}

fn default_ack_timeout_secs() -> u64 {
    5
}

fn default_passwd() -> PathBuf {
    PathBuf::from("/etc/passwd")
}

fn default_shadow() -> PathBuf {
    PathBuf::from("/etc/shadow")
}

fn default_chpasswd() -> PathBuf {
    PathBuf::from("/usr/sbin/chpasswd")
}

fn default_logoff_command() -> Vec<String> {
    ["loginctl", "terminate-user", "{user}"].map(str::to_owned).to_vec()
}

fn default_reboot_command() -> Vec<String> {
    ["systemctl", "reboot"].map(str::to_owned).to_vec()
}

fn default_terminate_command() -> Vec<String> {
    ["pkill", "-KILL", "-u", "{user}"].map(str::to_owned).to_vec()
}

fn default_retry_after_secs() -> u64 {
    300
}

/// The prefix of the environment variables that override the agent's config file.
pub const ENV_PREFIX: &str = "FLEETLAPS_AGENT_";

/// Limits and timings of the processing cycle.
#[derive(Debug, Clone, Copy)]
pub struct ProcessorSettings {
    /// At most this many events wait in the outbox; see [`crate::state`] for who may take the
    /// last places.
    pub outbox_limit: usize,
    /// A backup not confirmed by the orchestrator within this time is sent again.
    pub backup_confirmation_timeout: chrono::Duration,
    /// How long a rotation waits for the orchestrator's confirmation in one cycle.
    pub backup_confirmation_wait: Duration,
    /// `fleetlaps-agent reset` is refused when the previous one is more recent than this.
    pub reset_min_interval: chrono::Duration,
    /// The rounds of the hash a rotation writes.
    pub password_hash_rounds: HashRounds,
}

impl Config {
    /// Reads the file at `path`, then applies `FLEETLAPS_AGENT_*` environment variables over it,
    /// and validates the policy.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            anyhow::bail!("config file {} does not exist", path.display());
        }
        let config: Self = Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"))
            .extract()
            .map_err(|err| anyhow::anyhow!("invalid config {}: {err}", path.display()))?;
        config
            .validate()
            .map_err(|err| anyhow::anyhow!("invalid config {}: {err}", path.display()))?;
        Ok(config)
    }

    /// Parses a config from TOML text alone (tests and tools).
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|err| anyhow::anyhow!("invalid config: {err}"))?;
        config
            .validate()
            .map_err(|err| anyhow::anyhow!("invalid config: {err}"))?;
        Ok(config)
    }

    /// The validated local policy.
    pub fn policy(&self) -> anyhow::Result<Policy> {
        Ok(Policy::from_settings(&self.policy)?)
    }

    /// The time between processing cycles.
    pub fn processing_interval(&self) -> Duration {
        Duration::from_secs(self.processing_interval_secs)
    }

    /// The cycle's limits and timings.
    pub fn processor_settings(&self) -> ProcessorSettings {
        ProcessorSettings {
            outbox_limit: self.outbox_limit,
            backup_confirmation_timeout: chrono::Duration::seconds(
                i64::try_from(self.backup_confirmation_timeout_secs).unwrap_or(i64::MAX),
            ),
            backup_confirmation_wait: Duration::from_secs(self.backup_confirmation_wait_secs),
            reset_min_interval: chrono::Duration::seconds(
                i64::try_from(self.reset_min_interval_secs).unwrap_or(i64::MAX),
            ),
            password_hash_rounds: self.password_hash_rounds,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.policy()?;
        self.post_authentication.validate()?;
        let least = crate::state::OUTBOX_RESERVED + 1;
        if !(least..=10_000_000).contains(&self.outbox_limit) {
            anyhow::bail!(
                "outbox_limit = {}: allowed {least} to 10000000 events (two places are kept for a rotation's backup and commit)",
                self.outbox_limit
            );
        }
        if !(1..=86_400).contains(&self.backup_confirmation_timeout_secs) {
            anyhow::bail!(
                "backup_confirmation_timeout_secs = {}: allowed 1 to 86400 seconds",
                self.backup_confirmation_timeout_secs
            );
        }
        if !(1..=3_600).contains(&self.backup_confirmation_wait_secs) {
            anyhow::bail!(
                "backup_confirmation_wait_secs = {}: allowed 1 to 3600 seconds",
                self.backup_confirmation_wait_secs
            );
        }
        if self.reset_min_interval_secs > 86_400 {
            anyhow::bail!(
                "reset_min_interval_secs = {}: allowed 0 to 86400 seconds",
                self.reset_min_interval_secs
            );
        }
        if self.processing_interval_secs == 0 || self.processing_interval_secs > 86_400 {
            anyhow::bail!(
                "processing_interval_secs = {}: allowed 1 to 86400 seconds",
                self.processing_interval_secs
            );
        }
        if self.nats.ack_timeout_secs == 0 || self.nats.ack_timeout_secs > 300 {
            anyhow::bail!(
                "nats.ack_timeout_secs = {}: allowed 1 to 300 seconds",
                self.nats.ack_timeout_secs
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The base point of Curve25519 (9): a valid public key.
    const BASE: &str = r#"
state_dir = "/tmp/agent"
escrow_public_key = "CQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
[nats]
url = "nats://127.0.0.1:4222"
[account]
backend = "file"
path = "/tmp/shadow"
"#;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = include_str!("../packaging/agent.toml");
        let config = Config::from_toml(example).expect("the example parses");
        assert!(config.escrow_public_key.is_none(), "enrollment gives the escrow key");
        let policy = config.policy().expect("the example's policy is valid");
        assert_eq!(policy.post_authentication_actions().value(), 3);
        assert!(matches!(config.account, AccountConfig::Linux { .. }));
        assert_eq!(config.post_authentication.terminate_command[0], "pkill");
    }

    #[test]
    fn a_minimal_config_takes_laps_defaults() {
        let config = Config::from_toml(BASE).expect("valid");
        assert_eq!(config.processing_interval(), Duration::from_secs(3600));
        assert_eq!(config.policy().expect("valid").password_length(), 14);
    }

    #[test]
    fn password_hash_rounds_default_to_glibcs_and_out_of_range_ones_are_named() {
        assert_eq!(
            Config::from_toml(BASE).unwrap().password_hash_rounds,
            HashRounds::DEFAULT
        );
        let least = Config::from_toml(&BASE.replace("[nats]", "password_hash_rounds = 1000\n[nats]")).unwrap();
        assert_eq!(least.processor_settings().password_hash_rounds.get(), 1000);
        let err = Config::from_toml(&BASE.replace("[nats]", "password_hash_rounds = 500\n[nats]")).unwrap_err();
        assert!(
            err.to_string()
                .contains("password_hash_rounds = 500: allowed 1000 to 999999999"),
            "{err}"
        );
    }

    #[test]
    fn an_out_of_range_policy_names_the_setting_and_range() {
        let err = Config::from_toml(&format!("{BASE}[policy]\nPasswordLength = 7\n")).expect_err("refused");
        assert!(err.to_string().contains("PasswordLength = 7: allowed 8 to 64"), "{err}");
        let err = Config::from_toml(&format!("{BASE}[policy]\nPasswordComplexity = 9\n")).expect_err("refused");
        assert!(
            err.to_string().contains("PasswordComplexity = 9: allowed 1 to 8"),
            "{err}"
        );
    }

    #[test]
    fn post_authentication_commands_default_and_can_be_replaced() {
        let config = Config::from_toml(BASE).expect("valid");
        assert_eq!(
            config.post_authentication.terminate_command,
            ["pkill", "-KILL", "-u", "{user}"]
        );
        assert_eq!(config.post_authentication.retry_after(), Duration::from_secs(300));
        assert_eq!(config.post_authentication.failure_report_interval_secs, 60);
        let err = Config::from_toml(&format!(
            "{BASE}[post_authentication]\nfailure_report_interval_secs = 0\n"
        ))
        .expect_err("refused");
        assert!(
            err.to_string()
                .contains("post_authentication.failure_report_interval_secs = 0: allowed 1 to 86400 seconds"),
            "{err}"
        );
        let text = format!("{BASE}[post_authentication]\nlogoff_command = [\"true\"]\nretry_after_secs = 5\n");
        let config = Config::from_toml(&text).expect("valid");
        assert_eq!(config.post_authentication.logoff_command, ["true"]);
        assert_eq!(config.post_authentication.reboot_command, ["systemctl", "reboot"]);
        let err =
            Config::from_toml(&format!("{BASE}[post_authentication]\nreboot_command = []\n")).expect_err("refused");
        assert!(
            err.to_string().contains("post_authentication.reboot_command is empty"),
            "{err}"
        );
    }

    #[test]
    fn the_linux_backend_defaults_to_the_system_files() {
        let config =
            Config::from_toml(&BASE.replace("backend = \"file\"\npath = \"/tmp/shadow\"", "backend = \"linux\""))
                .expect("valid");
        let AccountConfig::Linux {
            passwd,
            shadow,
            chpasswd,
        } = config.account
        else {
            panic!("the linux backend: {:?}", config.account);
        };
        assert_eq!(passwd, Path::new("/etc/passwd"));
        assert_eq!(shadow, Path::new("/etc/shadow"));
        assert_eq!(chpasswd, Path::new("/usr/sbin/chpasswd"));
    }

    #[test]
    fn unknown_fields_and_bad_keys_are_named() {
        let err = Config::from_toml(&format!("{BASE}[policy]\nPasswordLenght = 12\n")).expect_err("refused");
        assert!(err.to_string().contains("PasswordLenght"), "{err}");
        let err = Config::from_toml(&BASE.replace("CQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "short"))
            .expect_err("refused");
        assert!(err.to_string().contains("escrow public key"), "{err}");
    }

    #[test]
    fn the_metrics_listener_is_off_unless_an_address_is_given() {
        assert_eq!(Config::from_toml(BASE).expect("valid").metrics.listen, None);
        let config = Config::from_toml(&format!("{BASE}[metrics]\nlisten = \"127.0.0.1:9465\"\n")).expect("valid");
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9465".parse().expect("an address"))
        );
        let err = Config::from_toml(&format!("{BASE}[metrics]\nlisten = \"localhost\"\n")).expect_err("refused");
        assert!(err.to_string().contains("metrics.listen"), "{err}");
        let err = Config::from_toml(&format!("{BASE}[metrics]\nport = 9465\n")).expect_err("refused");
        assert!(err.to_string().contains("port"), "{err}");
    }
}
