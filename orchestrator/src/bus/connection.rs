//! The connection to NATS: credentials and TLS as the config says, and what the server told us
//! about itself (its version, hence the durability it can give), for `/healthz`.

use std::path::Path;

use async_nats::jetstream;

use super::BusError;
use crate::config::{Config, NatsCredentials};
use crate::nats_auth::{NkeySeed, SYNC_ALWAYS_SINCE, parse_server_version};

/// Connects to NATS as `config` says: as the nkey user in `nats.nkey_seed_file` (or with no
/// credentials at all only when `insecure_nats = true`), over TLS for a `tls://` URL or when
/// `nats.ca_file` is set, trusting that CA. Replies come on the shared `_INBOX`, which only the
/// orchestrator's NATS user may read.
pub async fn connect(config: &Config) -> Result<(jetstream::Context, NatsStatus), BusError> {
    let url = config.nats.url.as_str();
    let credentials = config.nats_credentials().map_err(|err| BusError::Connect {
        url: url.to_owned(),
        source: err.into(),
    })?;
    let mut options = async_nats::ConnectOptions::new().name("fleetlaps-orchestrator");
    match &credentials {
        NatsCredentials::Nkey(path) => {
            let seed = NkeySeed::read_file(path)?;
            tracing::info!(nkey = %seed.public_key(), "connecting to NATS as this nkey user");
            options = options.nkey(seed.expose_secret().to_owned());
        }
        NatsCredentials::Insecure => {
            tracing::warn!(
                "connecting to NATS without credentials (insecure_nats = true): anyone who reaches the server can \
                 publish on the history; set nats.nkey_seed_file for production"
            );
        }
    }
    if let Some(ca_file) = &config.nats.ca_file {
        options = with_ca(options, ca_file);
    }
    let tls = url.starts_with("tls://") || config.nats.ca_file.is_some();
    if !tls {
        tracing::warn!(%url, "the NATS connection is not encrypted: use a tls:// URL unless the server is on this host");
    }
    let client = options.connect(url).await.map_err(|err| BusError::Connect {
        url: url.to_owned(),
        source: err.into(),
    })?;
    let status = NatsStatus {
        client: Some(client.clone()),
        tls,
        insecure: credentials == NatsCredentials::Insecure,
    };
    let facts = status.facts();
    tracing::info!(server_version = %facts.server_version, tls, "connected to NATS");
    Ok((jetstream::new(client), status))
}

/// Trusts only the CA in `ca_file` for the server's certificate, and requires TLS.
fn with_ca(options: async_nats::ConnectOptions, ca_file: &Path) -> async_nats::ConnectOptions {
    options.add_root_certificates(ca_file.to_owned()).require_tls(true)
}

/// The live connection, for reporting on it.
#[derive(Clone)]
pub struct NatsStatus {
    /// The client; `None` only in tests of the HTTP layer, which run without NATS.
    client: Option<async_nats::Client>,
    /// Whether the connection is TLS (`tls://`, or `nats.ca_file` set, which requires it).
    tls: bool,
    /// Whether it was made without credentials (`insecure_nats = true`).
    insecure: bool,
}

/// What `/healthz` says about NATS: plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsFacts {
    /// The server's version as it announced it (`2.9.10`), or `unknown`.
    pub server_version: String,
    /// Whether the connection is encrypted.
    pub tls: bool,
    /// Whether the orchestrator connected without credentials (`insecure_nats = true`).
    pub insecure: bool,
    /// Whether the client is connected now.
    pub connected: bool,
    /// The durability this server version can give an acknowledged publish, in words.
    pub durability: &'static str,
}

impl NatsStatus {
    /// A status for tests of the HTTP layer, with no server behind it.
    pub fn detached() -> Self {
        Self {
            client: None,
            tls: false,
            insecure: false,
        }
    }

    /// What is known now: the server's version comes from its latest `INFO`, so an upgraded
    /// server shows once the client has reconnected to it.
    pub fn facts(&self) -> NatsFacts {
        let (server_version, connected) = match &self.client {
            Some(client) => (
                client.server_info().version,
                client.connection_state() == async_nats::connection::State::Connected,
            ),
            None => (String::new(), false),
        };
        let durability = durability_of(&server_version);
        NatsFacts {
            server_version: if server_version.is_empty() {
                "unknown".to_owned()
            } else {
                server_version
            },
            tls: self.tls,
            insecure: self.insecure,
            connected,
            durability,
        }
    }
}

/// What a nats-server of `version` can promise about a publish it acknowledged, on one node.
/// The orchestrator cannot read the server's `sync_interval`, so for 2.10 and later it says what
/// the server supports, not what it is configured to do.
pub fn durability_of(version: &str) -> &'static str {
    match parse_server_version(version) {
        Some(version) if version >= SYNC_ALWAYS_SINCE => {
            "this server can write to disk (fsync) before it acknowledges, when its config sets \
             jetstream { sync_interval: always } (fleetlaps-orchestrator nats-config renders it for 2.10 and \
             later); the orchestrator cannot see that setting"
        }
        Some(_) => {
            "acknowledged before written to disk: this server (before 2.10) syncs its store about every 2 \
             minutes, so a host crash can lose what it acknowledged since; upgrade to nats-server 2.10 or later \
             with sync_interval: always, or run three replicas"
        }
        None => "unknown: the server's version was not announced",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_2_10_are_acknowledged_before_written_to_disk() {
        assert_eq!(parse_server_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_server_version("v2.10.0-beta.1"), Some((2, 10)));
        assert_eq!(parse_server_version("2.10"), Some((2, 10)));
        assert_eq!(parse_server_version(""), None);
        assert!(durability_of("2.9.10").starts_with("acknowledged before written to disk"));
        assert!(durability_of("2.10.0").contains("sync_interval: always"));
        assert!(durability_of("2.15.1").contains("fsync"));
        assert!(durability_of("").starts_with("unknown"));
    }
}
