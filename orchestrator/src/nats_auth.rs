//! NATS credentials: the nats-server configuration that gives the orchestrator and each device
//! exactly the subjects they use, and the nkey seed files both sides connect with.
//!
//! nats-server 2.9's static configuration cannot derive a permission from the connecting user
//! (there are no templates outside operator/JWT mode), so every device gets its own user entry,
//! written out here from its id and nkey public key ([`ServerConfig::render`], behind
//! `fleetlaps-orchestrator nats-config`). The shipped `packaging/nats-server.conf` is the
//! rendering of [`ServerConfig::example`]; a unit test keeps the two equal.
//!
//! What a device may do, and why each subject is there:
//! - publish `laps.events.<device_id>.>`: its own events, and nobody else's;
//! - publish `$JS.API.DIRECT.GET.LAPS_COMMANDS.laps.commands.<device_id>`: read its own last
//!   command. The subject names the message asked for, so the permission can be per device;
//!   `$JS.API.STREAM.MSG.GET` carries the subject in its payload and is therefore not allowed;
//! - publish `$JS.API.DIRECT.GET.LAPS_PASSWORD_VERSIONS.laps.password_version.<device_id>`: read
//!   the centre's current password version of itself (rollback detection, missed confirmations,
//!   the escrow key to seal to); only the orchestrator may write it;
//! - publish `$KV.LAPS_LIVENESS.<device_id>`: put its own heartbeat in the liveness bucket, a
//!   JetStream publish on its own key, which needs no JetStream API permission; nobody else's;
//! - subscribe `laps.commands.<device_id>` and `laps.confirmations.<device_id>`: live commands
//!   and backup confirmations;
//! - subscribe `_INBOX_<device_id>.>`: replies (JetStream acks, the direct get's answer). The
//!   agent connects with that inbox prefix ([`subject::device_inbox_prefix`]); a device on the
//!   shared `_INBOX` would never see an ack.
//!
//! For test and bench fleets only, `nats-config --simulator-nkey` adds one more user: the fleet
//! simulator's (`fleetlaps-agent simulate`, many devices over one connection), allowed the union
//! of every device's subjects ([`simulator_permissions`]). It can publish as any device and read
//! every device's commands and confirmations, so it must never be rendered for production;
//! events still count only when signed by their device's enrolled key.
//!
//! Invariant: a seed never appears in `Debug` output, logs or error messages; errors name the
//! file or the device, never the text that was refused.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fleetlaps_proto::ids::{DeviceId, IdError};
use fleetlaps_proto::nkey::UserSeed;
use fleetlaps_proto::subject;
use nkeys::{KeyPair, KeyPairType};
use secrecy::{ExposeSecret, SecretString};

/// Where nats-server listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4222";

/// JetStream's store directory unless told otherwise (Debian's package creates none). The server
/// keeps its streams in a `jetstream` directory inside it.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/nats-server";

/// The largest message a client may publish (`max_payload`), server-wide: room for every
/// orchestrator message, and above the events stream's own bound
/// ([`subject::MAX_EVENT_BYTES`]), so an oversized event is refused by the stream, which says
/// why, rather than by closing the connection.
pub const DEFAULT_MAX_PAYLOAD: u32 = 256 * 1024;

/// The most client connections the server takes unless told otherwise: one per device and a
/// few for the orchestrator; raise it (`--max-connections`) for a larger fleet.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

/// The most subscriptions one connection may hold. An agent holds three (its inbox, its
/// commands, its confirmations); the orchestrator a handful. The bound keeps one device's
/// credentials from exhausting the server's memory with subscriptions.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: u32 = 1_000;

/// The most JetStream file storage the server may use, in bytes, unless told otherwise.
pub const DEFAULT_MAX_FILE_STORE_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// The first nats-server release with `jetstream { sync_interval: always }`.
pub const SYNC_ALWAYS_SINCE: (u64, u64) = (2, 10);

/// The JetStream API prefix (the default domain).
const JS_API: &str = "$JS.API";

/// A refused input to the renderer.
#[derive(Debug, thiserror::Error)]
pub enum NatsAuthError {
    /// Not an nkey user public key. The refused text is not repeated: it may be a seed.
    #[error(
        "{owner}: not an nkey user public key (56 characters of base32 starting with U, as \
         `fleetlaps-orchestrator nkey` prints it; a seed, starting with S, is never given here)"
    )]
    InvalidPublicKey {
        /// Whose key it was meant to be.
        owner: String,
    },
    /// A device entry without `=`.
    #[error("device entry {position}: expected DEVICE_ID=NKEY_PUBLIC_KEY")]
    MalformedDevice {
        /// Which entry: `--device` number or `file:line`.
        position: String,
    },
    /// A device id that is not one subject token.
    #[error("device entry {position}")]
    InvalidDeviceId {
        /// Which entry.
        position: String,
        /// Why.
        #[source]
        source: IdError,
    },
    /// The same device twice.
    #[error("device {0} is listed twice")]
    DuplicateDevice(DeviceId),
    /// Two users with one key: nats-server would let either act as the other.
    #[error("{first} and {second} have the same nkey; each needs its own")]
    SharedNkey {
        /// The first holder.
        first: String,
        /// The second holder.
        second: String,
    },
    /// A listen address or store directory that cannot be written into the file as is.
    #[error("{setting} {value:?}: allowed a non-empty value without quotes, backslashes or control characters")]
    InvalidSetting {
        /// Which setting.
        setting: &'static str,
        /// The refused value.
        value: String,
    },
}

/// A problem with an nkey seed file.
#[derive(Debug, thiserror::Error)]
pub enum SeedFileError {
    /// The file could not be read.
    #[error("reading nkey seed file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Group or others may access it.
    #[error(
        "nkey seed file {} is accessible by group or others (mode {mode:04o}); allowed: 0600 or 0400, \
         run `chmod 600 {}`",
        .path.display(),
        .path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds something else. Its content is not repeated.
    #[error("nkey seed file {} does not hold a user nkey seed (58 characters starting with SU)", .path.display())]
    NotASeed {
        /// The file.
        path: PathBuf,
    },
    /// A new seed file could not be written.
    #[error("creating nkey seed file {}", .path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// An nkey user public key (`U…`): what nats-server's config names a user by. Not a secret.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NkeyPublicKey(String);

impl NkeyPublicKey {
    /// Parses a user public key; `owner` names whose it is, for the error.
    pub fn parse(value: &str, owner: &str) -> Result<Self, NatsAuthError> {
        let value = value.trim();
        match KeyPair::from_public_key(value) {
            Ok(key) if key.key_pair_type() == KeyPairType::User => Ok(Self(value.to_owned())),
            _ => Err(NatsAuthError::InvalidPublicKey {
                owner: owner.to_owned(),
            }),
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NkeyPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NkeyPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An nkey user seed read from a file, with its public key. The seed is redacted in `Debug`.
#[derive(Debug)]
pub struct NkeySeed {
    /// The seed, parsed.
    seed: UserSeed,
    /// Its public half, which the server's config lists.
    public_key: NkeyPublicKey,
}

impl NkeySeed {
    /// Reads the seed in `path`, refusing a file that group or others may access.
    pub fn read_file(path: &Path) -> Result<Self, SeedFileError> {
        let read_error = |source| SeedFileError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = fs::metadata(path).map_err(read_error)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SeedFileError::Permissions {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        let text = SecretString::from(fs::read_to_string(path).map_err(read_error)?);
        let seed =
            UserSeed::parse(text.expose_secret()).map_err(|_| SeedFileError::NotASeed { path: path.to_owned() })?;
        Ok(Self {
            public_key: NkeyPublicKey(seed.public_key().to_owned()),
            seed,
        })
    }

    /// The seed, to hand to the NATS client. Do not log it.
    pub fn expose_secret(&self) -> &str {
        self.seed.expose_secret()
    }

    /// The public key the server's config must list.
    pub fn public_key(&self) -> &NkeyPublicKey {
        &self.public_key
    }
}

/// Returns the public key of the seed in `path`, first creating the file (mode 0600) with a new
/// user seed if it does not exist.
pub fn ensure_seed_file(path: &Path) -> Result<NkeyPublicKey, SeedFileError> {
    if path.exists() {
        return Ok(NkeySeed::read_file(path)?.public_key().clone());
    }
    let create_error = |source| SeedFileError::Create {
        path: path.to_owned(),
        source,
    };
    let key = KeyPair::new_user();
    let seed = SecretString::from(
        key.seed()
            .map_err(|_| create_error(io::Error::other("the new key pair has no seed")))?,
    );
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create_error)?;
    file.write_all(format!("{}\n", seed.expose_secret()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(create_error)?;
    Ok(NkeyPublicKey(key.public_key()))
}

/// One enrolled device: its id and the public key of the seed it connects with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUser {
    /// The device, as its agent reports it (`fleetlaps-agent status`).
    pub device_id: DeviceId,
    /// The public key of the device's seed.
    pub nkey: NkeyPublicKey,
}

impl DeviceUser {
    /// Parses `DEVICE_ID=NKEY_PUBLIC_KEY`; `position` names the entry in errors.
    pub fn parse(entry: &str, position: &str) -> Result<Self, NatsAuthError> {
        let Some((device_id, nkey)) = entry.trim().split_once('=') else {
            return Err(NatsAuthError::MalformedDevice {
                position: position.to_owned(),
            });
        };
        let device_id = DeviceId::parse(device_id.trim()).map_err(|source| NatsAuthError::InvalidDeviceId {
            position: position.to_owned(),
            source,
        })?;
        let nkey = NkeyPublicKey::parse(nkey, &format!("device {device_id}"))?;
        Ok(Self { device_id, nkey })
    }
}

impl FromStr for DeviceUser {
    type Err = NatsAuthError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        Self::parse(
            entry,
            entry.split_once('=').map_or("(no id)", |(device_id, _)| device_id),
        )
    }
}

/// Parses a devices file: one `DEVICE_ID=NKEY_PUBLIC_KEY` per line; blank lines and lines
/// starting with `#` are skipped. `name` names the file in errors.
pub fn parse_devices_file(text: &str, name: &str) -> Result<Vec<DeviceUser>, NatsAuthError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|(index, line)| DeviceUser::parse(line, &format!("{name}:{}", index + 1)))
        .collect()
}

/// What one user may publish and subscribe to; everything else is denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to (JetStream API calls are publishes too).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// The orchestrator's permissions: manage and read its streams (and the liveness bucket's) and their consumers, issue
/// commands, confirm backups, record audit events, receive replies on the shared `_INBOX`, and
/// take breach signals and answer them.
/// Not allowed: deleting or purging a stream (the events stream is the history) and publishing
/// device events.
pub fn orchestrator_permissions() -> Permissions {
    let mut publish = Vec::new();
    for stream in [
        subject::EVENTS_STREAM,
        subject::COMMANDS_STREAM,
        subject::PASSWORD_VERSIONS_STREAM,
        subject::LIVENESS_STREAM,
    ] {
        publish.extend([
            format!("{JS_API}.STREAM.INFO.{stream}"),
            format!("{JS_API}.STREAM.CREATE.{stream}"),
            format!("{JS_API}.STREAM.UPDATE.{stream}"),
            format!("{JS_API}.STREAM.MSG.GET.{stream}"),
            format!("{JS_API}.DIRECT.GET.{stream}"),
            format!("{JS_API}.DIRECT.GET.{stream}.>"),
            format!("{JS_API}.CONSUMER.CREATE.{stream}"),
            format!("{JS_API}.CONSUMER.CREATE.{stream}.>"),
            format!("{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.*"),
            format!("{JS_API}.CONSUMER.INFO.{stream}.*"),
            format!("{JS_API}.CONSUMER.DELETE.{stream}.*"),
            format!("{JS_API}.CONSUMER.NAMES.{stream}"),
            format!("{JS_API}.CONSUMER.LIST.{stream}"),
            format!("{JS_API}.CONSUMER.MSG.NEXT.{stream}.*"),
            format!("$JS.ACK.{stream}.>"),
        ]);
    }
    publish.extend([
        "laps.commands.*".to_owned(),
        "laps.confirmations.*".to_owned(),
        subject::PASSWORD_VERSIONS_WILDCARD.to_owned(),
        subject::AUDIT_WILDCARD.to_owned(),
        // Answers to breach signals.
        format!("{}.>", subject::BREACH_SIGNALS_INBOX_PREFIX),
    ]);
    Permissions {
        publish,
        subscribe: vec!["_INBOX.>".to_owned(), subject::BREACH_SIGNALS.to_owned()],
    }
}

/// A breach signal sender's permissions (a SIEM, a script): send signals, read their answers;
/// nothing else. It still needs a token holding `Breach.Declare` in each signal.
pub fn signal_sender_permissions() -> Permissions {
    Permissions {
        publish: vec![subject::BREACH_SIGNALS.to_owned()],
        subscribe: vec![format!("{}.>", subject::BREACH_SIGNALS_INBOX_PREFIX)],
    }
}

/// One device's permissions: its own events and heartbeat out; its own commands, confirmations
/// and replies in.
pub fn device_permissions(device_id: &DeviceId) -> Permissions {
    let commands = subject::device_commands(device_id);
    Permissions {
        publish: vec![
            format!("laps.events.{device_id}.>"),
            subject::device_heartbeat(device_id),
            format!("{JS_API}.DIRECT.GET.{}.{commands}", subject::COMMANDS_STREAM),
            format!(
                "{JS_API}.DIRECT.GET.{}.{}",
                subject::PASSWORD_VERSIONS_STREAM,
                subject::device_password_version(device_id)
            ),
        ],
        subscribe: vec![
            format!("{}.>", subject::device_inbox_prefix(device_id)),
            commands,
            subject::device_confirmations(device_id),
        ],
    }
}

/// The fleet simulator's permissions (`fleetlaps-agent simulate`), for test and bench fleets
/// only: the union of every device's, by wildcards, so devices the simulator enrolls later need
/// no re-rendering; replies on its own inbox prefix ([`subject::SIMULATOR_INBOX_PREFIX`]).
/// Never for production: its holder may publish as any device and read every device's commands
/// and confirmations (though not sign as a device: that needs the device's enrolled key).
pub fn simulator_permissions() -> Permissions {
    Permissions {
        publish: vec![
            "laps.events.*.>".to_owned(),
            format!("$KV.{}.*", subject::LIVENESS_BUCKET),
            format!(
                "{JS_API}.DIRECT.GET.{}.{}",
                subject::COMMANDS_STREAM,
                subject::DEVICE_COMMANDS_WILDCARD
            ),
            format!(
                "{JS_API}.DIRECT.GET.{}.laps.password_version.*",
                subject::PASSWORD_VERSIONS_STREAM
            ),
        ],
        subscribe: vec![
            format!("{}.>", subject::SIMULATOR_INBOX_PREFIX),
            subject::DEVICE_COMMANDS_WILDCARD.to_owned(),
            subject::CONFIRMATIONS_WILDCARD.to_owned(),
        ],
    }
}

/// The server's certificate and key for TLS, as PEM files nats-server reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain (PEM), the server's first.
    pub cert_file: PathBuf,
    /// Its private key (PEM), readable by the user nats-server runs as only.
    pub key_file: PathBuf,
}

/// Limits on what clients may do, where nats-server 2.9's static configuration offers them.
/// There are no per-user connection limits outside operator/JWT mode; the per-connection
/// subscription bound and the events stream's message size bound each device instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// `max_payload`: the largest message a client may publish, in bytes.
    pub max_payload: u32,
    /// `max_connections`: the most client connections at once.
    pub max_connections: u32,
    /// `max_subscriptions`: the most subscriptions per connection.
    pub max_subscriptions: u32,
    /// `jetstream { max_file_store }`: the most disk JetStream may use, in bytes.
    pub max_file_store: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_subscriptions: MAX_SUBSCRIPTIONS_PER_CONNECTION,
            max_file_store: DEFAULT_MAX_FILE_STORE_BYTES,
        }
    }
}

/// The whole nats-server configuration: where it listens, TLS, JetStream, limits and every user.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where clients connect, `host:port`.
    pub listen: String,
    /// JetStream's store directory.
    pub store_dir: PathBuf,
    /// The nats-server version the file is for, `(major, minor)`: from 2.10 on, the store is
    /// synced before every acknowledgement (`sync_interval: always`), which 2.9 does not know.
    pub server_version: (u64, u64),
    /// TLS for client connections; without it clients connect in clear (nkeys still
    /// authenticate, but do not encrypt).
    pub tls: Option<ServerTlsFiles>,
    /// Limits on clients.
    pub limits: ServerLimits,
    /// The orchestrator's public key.
    pub orchestrator: NkeyPublicKey,
    /// Every enrolled device; rendered sorted by id.
    pub devices: Vec<DeviceUser>,
    /// The fleet simulator's public key (`--simulator-nkey`), for test and bench fleets only:
    /// its user may act for every device ([`simulator_permissions`]). `None` in production.
    pub simulator: Option<NkeyPublicKey>,
}

impl ServerConfig {
    /// The values `packaging/nats-server.conf` is rendered from. Nobody holds the seeds of these
    /// keys (they were thrown away), so the shipped file admits no one until it is re-rendered.
    pub fn example() -> Self {
        let key = |value: &str| NkeyPublicKey::parse(value, "example").expect("the example keys are valid");
        let device = |device_id: &str, nkey: &str| DeviceUser {
            device_id: DeviceId::parse(device_id).expect("the example device ids are valid"),
            nkey: key(nkey),
        };
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            store_dir: PathBuf::from(DEFAULT_STORE_DIR),
            server_version: SYNC_ALWAYS_SINCE,
            tls: Some(ServerTlsFiles {
                cert_file: PathBuf::from("/etc/nats-server/tls/server.pem"),
                key_file: PathBuf::from("/etc/nats-server/tls/server-key.pem"),
            }),
            limits: ServerLimits::default(),
            orchestrator: key(EXAMPLE_ORCHESTRATOR_NKEY),
            devices: vec![
                device(EXAMPLE_DEVICES[0].0, EXAMPLE_DEVICES[0].1),
                device(EXAMPLE_DEVICES[1].0, EXAMPLE_DEVICES[1].1),
            ],
            simulator: None,
        }
    }

    /// The configuration file's text, with comments for the operator.
    pub fn render(&self) -> Result<String, NatsAuthError> {
        let listen = quoted_setting("listen", &self.listen)?;
        let store_dir = quoted_setting("store_dir", &self.store_dir.to_string_lossy())?;
        let mut authorization = render_authorization(&self.orchestrator, &self.devices)?;
        if let Some(simulator) = &self.simulator {
            let holders = std::iter::once((&self.orchestrator, "the orchestrator".to_owned())).chain(
                self.devices
                    .iter()
                    .map(|device| (&device.nkey, format!("device {}", device.device_id))),
            );
            for (nkey, holder) in holders {
                if nkey == simulator {
                    return Err(NatsAuthError::SharedNkey {
                        first: holder,
                        second: "the simulator".to_owned(),
                    });
                }
            }
            let end = authorization
                .rfind("  ]\n}\n")
                .expect("render_authorization ends with the users list");
            authorization.insert_str(end, &render_simulator_user(simulator));
        }
        let tls = match &self.tls {
            Some(files) => format!(
                "# Clients connect with tls:// URLs and trust the CA that issued this certificate
# (nats.ca_file on both sides). The key must be readable by the nats user only.
tls {{
  cert_file: {cert_file}
  key_file: {key_file}
  timeout: 5
}}
",
                cert_file = quoted_setting("tls cert_file", &files.cert_file.to_string_lossy())?,
                key_file = quoted_setting("tls key_file", &files.key_file.to_string_lossy())?,
            ),
            None => "# No TLS: nkeys authenticate but do not encrypt. Render with --tls-cert and --tls-key
# when clients connect over networks you do not trust.
"
            .to_owned(),
        };
        let sync = if self.server_version >= SYNC_ALWAYS_SINCE {
            "  # Write every message to disk (fsync) before acknowledging it, so an acknowledged event
  # survives a crash of the host (nats-server 2.10 and later; the default syncs every 2 minutes).
  sync_interval: always
"
        } else {
            "  # nats-server before 2.10 acknowledges a message before it writes it to disk and syncs
  # about every 2 minutes: a host crash can lose acknowledged events. 2.10 and later can sync
  # before acknowledging; render this file with --server-version 2.10 (or later) for them.
"
        };
        let ServerLimits {
            max_payload,
            max_connections,
            max_subscriptions,
            max_file_store,
        } = self.limits;
        Ok(format!(
            "{HEADER}
# Rendered for nats-server {major}.{minor} (nats-config --server-version, else what
# `nats-server --version` says); a server older than the file is for refuses to start with it.

# Clients connect here.
listen: {listen}

{tls}
# Limits on clients. No per-user connection limits exist in a static configuration; each
# connection may hold at most max_subscriptions subscriptions, and the events stream refuses
# any message over {max_event} bytes (its max_msg_size, set by the orchestrator).
max_payload: {max_payload}
max_connections: {max_connections}
max_subscriptions: {max_subscriptions}

# JetStream keeps the history (LAPS_EVENTS), each device's last command (LAPS_COMMANDS), the
# centre's current password version of each device (LAPS_PASSWORD_VERSIONS) and each device's
# last heartbeat (the KV bucket LAPS_LIVENESS), in
# a jetstream directory inside store_dir. Debian's package does not enable it; this block does.
# The directory must belong to the user nats-server runs as:
# `install -d -o nats -g nats -m 0700 {store_dir_plain}`.
jetstream {{
  store_dir: {store_dir}
  max_file_store: {max_file_store}
{sync}}}

{authorization}",
            major = self.server_version.0,
            minor = self.server_version.1,
            max_event = subject::MAX_EVENT_BYTES,
            store_dir_plain = self.store_dir.display(),
        ))
    }
}

/// The `authorization { users = [...] }` block for the orchestrator and `devices` (sorted by
/// id). Fails on a duplicate device or a key used twice.
pub fn render_authorization(orchestrator: &NkeyPublicKey, devices: &[DeviceUser]) -> Result<String, NatsAuthError> {
    let mut devices: Vec<&DeviceUser> = devices.iter().collect();
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let mut holders: std::collections::BTreeMap<&NkeyPublicKey, String> = std::collections::BTreeMap::new();
    holders.insert(orchestrator, "the orchestrator".to_owned());
    for pair in devices.windows(2) {
        if pair[0].device_id == pair[1].device_id {
            return Err(NatsAuthError::DuplicateDevice(pair[0].device_id.clone()));
        }
    }
    for device in &devices {
        let holder = format!("device {}", device.device_id);
        if let Some(first) = holders.insert(&device.nkey, holder.clone()) {
            return Err(NatsAuthError::SharedNkey { first, second: holder });
        }
    }
    let mut text = String::from(
        "# Every user, by nkey. A user may publish and subscribe only to the subjects listed for it.
authorization {
  users = [
    # The orchestrator: creates, checks and reads LAPS_EVENTS, LAPS_COMMANDS,
    # LAPS_PASSWORD_VERSIONS and the liveness bucket (KV_LAPS_LIVENESS) and their consumers,
    # issues commands, confirms backups, publishes password versions and records its own audit
    # events. It may not delete or purge a stream, nor publish device events or heartbeats.
",
    );
    text.push_str(&render_user(orchestrator, &orchestrator_permissions()));
    text.push_str(
        "
    # Devices, one user each (nats-server 2.9 cannot template permissions on the user).
    # A device publishes only laps.events.<its id>.> and its own heartbeat
    # ($KV.LAPS_LIVENESS.<its id>), reads only its own command (live, or the
    # last one with a JetStream direct get on its own subject), its own password version (a
    # direct get on its own subject) and its own backup confirmations,
    # and gets replies only on its own inbox prefix _INBOX_<its id>, which the agent connects
    # with. It cannot publish commands, confirmations or audit events, nor call any other
    # JetStream API (no stream or consumer to create, delete or purge).
",
    );
    for device in devices {
        text.push_str(&render_device_user(device));
    }
    text.push_str("  ]\n}\n");
    Ok(text)
}

/// One device's user entry, with a comment naming the device: the unit to add to the `users`
/// list when enrolling a device by hand.
pub fn render_device_user(device: &DeviceUser) -> String {
    format!(
        "\n    # Device {}.\n{}",
        device.device_id,
        render_user(&device.nkey, &device_permissions(&device.device_id))
    )
}

/// The fleet simulator's user entry, with the warning that goes with it.
pub fn render_simulator_user(nkey: &NkeyPublicKey) -> String {
    format!(
        "
    # The fleet simulator (fleetlaps-agent simulate), rendered by --simulator-nkey.
    # FOR TEST AND BENCH FLEETS ONLY, NEVER IN PRODUCTION: it may publish as any device and read
    # every device's commands and confirmations (its events count only when signed by their
    # device's enrolled key). Render the file again without --simulator-nkey to remove it.
{}",
        render_user(nkey, &simulator_permissions())
    )
}

/// The values behind [`ServerConfig::example`].
const EXAMPLE_ORCHESTRATOR_NKEY: &str = "UDZLF75ANO7UMERQCPWVPUP7AL4ERQKFF5OEAUVCOJGCIXYPTWLZUD6O";
const EXAMPLE_DEVICES: [(&str, &str); 2] = [
    (
        "0b6e5c1a-3f7d-4e2b-9a8c-1d2e3f4a5b6c",
        "UC3C6ATYWI4YJZV4HRGQ74ADALO6JNTXZYXPX6HIIWWFWISCVXFP4ISB",
    ),
    (
        "7c9d1e2f-4a5b-4c6d-8e7f-9a0b1c2d3e4f",
        "UCU42CFS4OTKKLI2XXUZRAIYK75G76XSAMVDHAS2T5HX377GMLHGGA5B",
    ),
];

/// The file's opening comment.
const HEADER: &str = "# nats-server configuration for fleetlaps: nats-server 2.9 or later, static configuration
# (no operator/JWT mode).
#
# Rendered by `fleetlaps-orchestrator nats-config`. Render it again to enrol a device rather than
# editing it by hand: every device's permissions are written out in full. The file shipped as
# packaging/nats-server.conf is the rendering of example values, and nobody holds the seeds of
# its keys, so it admits no one until it is rendered for your fleet.
#
# Install it where nats-server reads its configuration (Debian: /etc/nats-server.conf, readable
# by the nats user) and apply a new rendering with `systemctl reload nats-server` (SIGHUP):
# clients stay connected, and a device's agent, which retries while refused, gets in.
#
# Authentication: the orchestrator and every device connect with an nkey. The client signs the
# server's nonce with its seed, so no secret crosses the network and this file holds only public
# keys. Each side names its seed in `nats.nkey_seed_file` (mode 0600 or 0400);
# `fleetlaps-orchestrator nkey --seed-file <file>` creates one and prints its public key.
# A client without a listed key is refused: there is no anonymous user.
#
# nkeys authenticate but do not encrypt: with --tls-cert and --tls-key the file has a tls block,
# and clients use tls:// URLs with nats.ca_file naming the CA.
";

/// `major.minor` of a nats-server version such as `2.9.10`, `v2.10.0-beta` or `2.10`.
pub fn parse_server_version(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim().trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts.next()?.chars().take_while(char::is_ascii_digit).collect();
    Some((major, minor.parse().ok()?))
}

/// The version of the `nats-server` on `PATH` (or in `/usr/sbin`, where Debian puts it), from
/// `nats-server --version` (`nats-server: v2.9.10`).
pub fn installed_server_version() -> anyhow::Result<(u64, u64)> {
    let candidates = ["nats-server", "/usr/sbin/nats-server"];
    for program in candidates {
        let Ok(output) = std::process::Command::new(program).arg("--version").output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&output.stdout);
        let version = text.rsplit(' ').next().unwrap_or_default();
        return parse_server_version(version)
            .ok_or_else(|| anyhow::anyhow!("`{program} --version` printed {:?}: pass --server-version", text.trim()));
    }
    anyhow::bail!(
        "nats-server is not installed here, so its version is unknown: pass --server-version (such as 2.9 or 2.10)"
    )
}

/// `"value"`, refusing what would need escaping in nats-server's format.
fn quoted_setting(setting: &'static str, value: &str) -> Result<String, NatsAuthError> {
    if value.is_empty() || value.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Err(NatsAuthError::InvalidSetting {
            setting,
            value: value.to_owned(),
        });
    }
    Ok(format!("\"{value}\""))
}

fn render_user(nkey: &NkeyPublicKey, permissions: &Permissions) -> String {
    let list = |subjects: &[String]| -> String {
        subjects
            .iter()
            .map(|subject| format!("            \"{subject}\"\n"))
            .collect()
    };
    format!(
        "    {{
      nkey: \"{nkey}\"
      permissions: {{
        publish: {{
          allow: [
{publish}          ]
        }}
        subscribe: {{
          allow: [
{subscribe}          ]
        }}
      }}
    }}
",
        publish = list(&permissions.publish),
        subscribe = list(&permissions.subscribe),
    )
}

#[cfg(test)]
mod tests;
