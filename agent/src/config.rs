//! The agent's configuration: one typed [`Config`], layered from a TOML file and then
//! `FLEETLAPS_`-prefixed environment variables (`FLEETLAPS_NATS__URL` sets `nats.url`).
//!
//! The `[policy]` table holds LAPS settings under their LAPS names; it is the local policy
//! source (LAPS: local configuration), validated on load.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use fleetlaps_proto::ids::DeviceName;
use fleetlaps_proto::policy::{Policy, PolicySettings};
use fleetlaps_proto::seal::EscrowPublicKey;
use serde::Deserialize;

/// Everything the agent needs to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The device's host name as reported; defaults to the kernel's host name.
    #[serde(default)]
    pub device_name: Option<DeviceName>,
    /// Where the agent keeps its state (sled) and its control socket. Owner-only.
    pub state_dir: PathBuf,
    /// The orchestrator's escrow public key: passwords leave the device sealed to it.
    pub escrow_public_key: EscrowPublicKey,
    /// Seconds between processing cycles (LAPS: one hour).
    #[serde(default = "default_processing_interval_secs")]
    pub processing_interval_secs: u64,
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

fn default_ack_timeout_secs() -> u64 {
    5
}

impl Config {
    /// Reads the file at `path`, then applies `FLEETLAPS_*` environment variables over it, and
    /// validates the policy.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            anyhow::bail!("config file {} does not exist", path.display());
        }
        let config: Self = Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed("FLEETLAPS_").split("__"))
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

    fn validate(&self) -> anyhow::Result<()> {
        self.policy()?;
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
    fn a_minimal_config_takes_laps_defaults() {
        let config = Config::from_toml(BASE).expect("valid");
        assert_eq!(config.processing_interval(), Duration::from_secs(3600));
        assert_eq!(config.policy().expect("valid").password_length(), 14);
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
    fn unknown_fields_and_bad_keys_are_named() {
        let err = Config::from_toml(&format!("{BASE}[policy]\nPasswordLenght = 12\n")).expect_err("refused");
        assert!(err.to_string().contains("PasswordLenght"), "{err}");
        let err = Config::from_toml(&BASE.replace("CQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "short"))
            .expect_err("refused");
        assert!(err.to_string().contains("escrow public key"), "{err}");
    }
}
