//! The orchestrator's configuration: one typed [`Config`], layered from a TOML file and then
//! `FLEETLAPS_`-prefixed environment variables (`FLEETLAPS_NATS__URL` sets `nats.url`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

/// Everything the orchestrator needs to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the sled projections and the escrow key live.
    pub data_dir: PathBuf,
    /// The NATS server with JetStream.
    pub nats: NatsConfig,
    /// The Graph-compatible API.
    #[serde(default)]
    pub http: HttpConfig,
    /// The Prometheus endpoint, on its own listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Bearer tokens allowed to call the API.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
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
    /// The durable consumer's name; replicas of one orchestrator share none, so each has its own.
    #[serde(default = "default_consumer")]
    pub consumer: String,
}

/// The API listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
}

/// The metrics listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
}

/// One API bearer token and what it may do.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token: recorded as the principal.
    pub name: String,
    /// The token itself. Redacted in `Debug`.
    pub token: SecretString,
    /// Graph scopes, such as `DeviceLocalCredential.Read.All`.
    pub scopes: Vec<String>,
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
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9184)),
        }
    }
}

fn default_consumer() -> String {
    "orchestrator".to_owned()
}

impl Config {
    /// Reads the file at `path`, then applies `FLEETLAPS_*` environment variables over it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            anyhow::bail!("config file {} does not exist", path.display());
        }
        let config: Self = Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed("FLEETLAPS_").split("__"))
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

    fn validate(&self) -> anyhow::Result<()> {
        for token in &self.tokens {
            for scope in &token.scopes {
                if !crate::auth::Scope::ALL.iter().any(|known| known.as_str() == scope) {
                    anyhow::bail!(
                        "invalid config: tokens.scopes: unknown scope {scope:?} for token {:?}; allowed: {}",
                        token.name,
                        crate::auth::Scope::ALL.map(|s| s.as_str()).join(", ")
                    );
                }
            }
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_takes_defaults() {
        let config =
            Config::from_toml("data_dir = \"/tmp/x\"\n[nats]\nurl = \"nats://127.0.0.1:4222\"\n").expect("valid");
        assert_eq!(config.nats.consumer, "orchestrator");
        assert_eq!(config.http.listen.port(), 8080);
    }

    #[test]
    fn unknown_fields_and_scopes_are_named() {
        let err = Config::from_toml("data_dir = \"/x\"\nbogus = 1\n[nats]\nurl = \"n\"\n").expect_err("unknown field");
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Config::from_toml(
            "data_dir = \"/x\"\n[nats]\nurl = \"n\"\n[[tokens]]\nname = \"a\"\ntoken = \"t\"\nscopes = [\"Everything\"]\n",
        )
        .expect_err("unknown scope");
        assert!(err.to_string().contains("unknown scope \"Everything\""), "{err}");
    }

    #[test]
    fn token_secrets_are_redacted_in_debug() {
        let config = Config::from_toml(
            "data_dir = \"/x\"\n[nats]\nurl = \"n\"\n[[tokens]]\nname = \"a\"\ntoken = \"s3cr3t-token\"\nscopes = []\n",
        )
        .expect("valid");
        assert!(!format!("{config:?}").contains("s3cr3t-token"));
    }
}
