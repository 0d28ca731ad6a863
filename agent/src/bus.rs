//! The agent's side of NATS: publishing events to JetStream and waiting for the ack.
//!
//! Boundary: the only module of the agent that knows async-nats.
//!
//! Every subject used here is one the device's NATS user is allowed on a server with
//! permissions (`orchestrator/packaging/nats-server.conf`): its own event subjects, its own
//! key in the liveness bucket, its own commands and confirmations, a direct get of its own last
//! command, and replies on its own inbox prefix. A new NATS call here needs a new permission there.
//!
//! The fleet simulator ([`crate::simulate`]) runs many devices over one [`SharedConnection`]:
//! each device's [`Publisher`] publishes and reads as the real agent's does, and its live
//! confirmations and commands come from the connection's two wildcard subscriptions, routed by
//! the subject's device id, rather than from two subscriptions per device (a connection may hold
//! at most `max_subscriptions`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, message::PublishMessage};
use fleetlaps_proto::api::SIGNATURE_HEADER;
use fleetlaps_proto::command::{BackupConfirmation, Command, CurrentPasswordVersion};
use fleetlaps_proto::event::Envelope;
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::liveness::Heartbeat;
use fleetlaps_proto::nkey::UserSeed;
use fleetlaps_proto::signature::DeviceSigningKey;
use fleetlaps_proto::subject;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{broadcast, mpsc};

/// A publish that was not acknowledged.
#[derive(Debug, thiserror::Error)]
#[error("publishing {kind} event to JetStream: {source}")]
pub struct PublishError {
    /// The kind of event that was not published.
    kind: &'static str,
    /// Why.
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// How the agent connects to NATS.
pub struct ConnectSettings<'a> {
    /// The server URL, `tls://host:port` or `nats://host:port`.
    pub url: &'a str,
    /// The CA the server's certificate must chain to (`nats.ca_file`); TLS is then required.
    pub ca_file: Option<&'a Path>,
    /// How long to wait for JetStream to acknowledge a publish.
    pub ack_timeout: Duration,
    /// This device: replies come on its own inbox prefix, the only one its NATS user may read.
    pub device_id: &'a DeviceId,
    /// The file holding the device's nkey seed, when the server requires authentication.
    pub nkey_seed_file: Option<&'a Path>,
    /// The enrolled key every event is signed with.
    pub signing_key: DeviceSigningKey,
}

/// Publishes envelopes to JetStream, each with its event id as `Nats-Msg-Id` and its signature
/// in the `Fleetlaps-Signature` header.
#[derive(Clone)]
pub struct Publisher {
    jetstream: jetstream::Context,
    /// Signs `subject + "\n" + payload` of every event; Ed25519 is deterministic, so a re-sent
    /// event carries the same signature.
    signing_key: DeviceSigningKey,
    /// Where [`Self::listen`] gets the device's confirmations and commands from.
    inbound: Inbound,
}

/// Where a publisher's live confirmations and commands come from.
#[derive(Clone)]
enum Inbound {
    /// Two subscriptions of its own, on its own connection (the agent).
    Own,
    /// The router of a connection shared by simulated devices.
    Shared(Arc<Router>),
}

/// How the simulator's shared connection reaches NATS.
pub struct SharedConnectSettings<'a> {
    /// The server URL, `tls://host:port` or `nats://host:port`.
    pub url: &'a str,
    /// The CA the server's certificate must chain to; TLS is then required.
    pub ca_file: Option<&'a Path>,
    /// How long to wait for JetStream to acknowledge a publish.
    pub ack_timeout: Duration,
    /// The simulator user's nkey seed (`nats-config --simulator-nkey`), when the server requires
    /// authentication.
    pub nkey_seed_file: Option<&'a Path>,
}

/// One NATS connection for a whole simulated fleet, with the inbox prefix
/// [`subject::SIMULATOR_INBOX_PREFIX`]. [`Self::publisher`] makes each device's publisher on it.
/// Dropping the last clone stops the routing of confirmations and commands.
#[derive(Clone)]
pub struct SharedConnection {
    jetstream: jetstream::Context,
    /// Each device's live confirmations and commands, by device id.
    router: Arc<Router>,
    /// The task that routes them; aborted when the last clone is dropped.
    _routing: Arc<AbortOnDrop>,
}

impl SharedConnection {
    /// Connects as `settings` say, in the background like [`Publisher::connect`], and
    /// subscribes once to every device's confirmations and commands.
    pub async fn connect(settings: SharedConnectSettings<'_>) -> anyhow::Result<Self> {
        let SharedConnectSettings {
            url,
            ca_file,
            ack_timeout,
            nkey_seed_file,
        } = settings;
        let (options, nkey) = connect_options(ca_file, nkey_seed_file)?;
        if let Some(nkey) = nkey {
            tracing::info!(%nkey, "connecting to NATS as the simulator's nkey user");
        }
        let client =
            connect_in_background(options, "fleetlaps-simulator", subject::SIMULATOR_INBOX_PREFIX, url).await?;
        let confirmations = client.subscribe(subject::CONFIRMATIONS_WILDCARD).await?;
        let commands = client.subscribe(subject::DEVICE_COMMANDS_WILDCARD).await?;
        let router = Arc::new(Router::default());
        let routing = tokio::spawn(Arc::clone(&router).route(confirmations, commands));
        Ok(Self {
            jetstream: jetstream::ContextBuilder::new().timeout(ack_timeout).build(client),
            router,
            _routing: Arc::new(AbortOnDrop(routing)),
        })
    }

    /// A device's publisher on this connection, signing with `signing_key`.
    pub fn publisher(&self, signing_key: DeviceSigningKey) -> Publisher {
        Publisher {
            jetstream: self.jetstream.clone(),
            signing_key,
            inbound: Inbound::Shared(Arc::clone(&self.router)),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands each device the messages of a shared connection's wildcard subscriptions that name it.
#[derive(Default)]
struct Router {
    /// The listening devices. A device stopped leaves its entry until a message for it finds
    /// the receiver gone, or it listens again (its new entry replaces the old).
    routes: Mutex<HashMap<DeviceId, Route>>,
}

/// Where one device's messages go.
#[derive(Clone)]
struct Route {
    confirmations: broadcast::Sender<BackupConfirmation>,
    commands: mpsc::Sender<Command>,
}

impl Router {
    fn listen(&self, device_id: &DeviceId, route: Route) {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device_id.clone(), route);
    }

    fn route_of(&self, device_id: &DeviceId) -> Option<Route> {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device_id)
            .cloned()
    }

    /// Forgets `device_id`'s route if its command receiver is gone (the device stopped).
    fn forget_if_stopped(&self, device_id: &DeviceId) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if routes.get(device_id).is_some_and(|route| route.commands.is_closed()) {
            routes.remove(device_id);
        }
    }

    async fn route(self: Arc<Self>, mut confirmations: async_nats::Subscriber, mut commands: async_nats::Subscriber) {
        loop {
            tokio::select! {
                Some(message) = confirmations.next() => {
                    let Some(route) = subject::parse_device_inbound(&message.subject).and_then(|id| self.route_of(&id)) else {
                        continue;
                    };
                    match serde_json::from_slice::<BackupConfirmation>(&message.payload) {
                        // Nobody listening right now is fine: the state knows what waits.
                        Ok(confirmation) => { let _ = route.confirmations.send(confirmation); }
                        Err(err) => tracing::warn!(error = %err, "malformed backup confirmation ignored"),
                    }
                }
                Some(message) = commands.next() => {
                    let Some(device_id) = subject::parse_device_inbound(&message.subject) else {
                        continue;
                    };
                    let Some(route) = self.route_of(&device_id) else {
                        continue;
                    };
                    match serde_json::from_slice::<Command>(&message.payload) {
                        // Never wait for one device: a command it misses is its last command,
                        // which it reads every cycle.
                        Ok(command) => match route.commands.try_send(command) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => self.forget_if_stopped(&device_id),
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                tracing::warn!(%device_id, "command queue full; the device reads its last command next cycle");
                            }
                        },
                        Err(err) => tracing::warn!(error = %err, "malformed command ignored"),
                    }
                }
                else => return,
            }
        }
    }
}

/// The connection options for a CA file (TLS required) and an nkey seed file, and the nkey's
/// public key when there is one; fails only when the seed file cannot be used.
fn connect_options(
    ca_file: Option<&std::path::Path>,
    nkey_seed_file: Option<&std::path::Path>,
) -> anyhow::Result<(async_nats::ConnectOptions, Option<String>)> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(ca_file) = ca_file {
        options = options.add_root_certificates(ca_file.to_owned()).require_tls(true);
    }
    let mut nkey = None;
    if let Some(path) = nkey_seed_file {
        let seed = read_seed_file(path).with_context(|| format!("nats.nkey_seed_file {}", path.display()))?;
        nkey = Some(seed.public_key().to_owned());
        options = options.nkey(seed.expose_secret().to_owned());
    }
    Ok((options, nkey))
}

impl Publisher {
    /// Connects as `settings` say. The connection is made in the background and re-made after
    /// losses, so an agent starts (and keeps its account untouched) while NATS is unreachable,
    /// and also while the server refuses its nkey: a device not yet enrolled gets in once the
    /// server's config lists it. Fails only when the seed file cannot be used.
    pub async fn connect(settings: ConnectSettings<'_>) -> anyhow::Result<Self> {
        let ConnectSettings {
            url,
            ca_file,
            ack_timeout,
            device_id,
            nkey_seed_file,
            signing_key,
        } = settings;
        let (options, nkey) = connect_options(ca_file, nkey_seed_file)?;
        if let Some(nkey) = nkey {
            // The line an operator enrols the device from: `--device <device_id>=<nkey>`.
            tracing::info!(%device_id, %nkey, "connecting to NATS as this device's nkey user");
        } else {
            tracing::warn!(
                "no nats.nkey_seed_file: connecting to NATS without credentials, which only a server that admits \
                 anyone accepts"
            );
        }
        let client = connect_in_background(
            options,
            "fleetlaps-agent",
            &subject::device_inbox_prefix(device_id),
            url,
        )
        .await?;
        let jetstream = jetstream::ContextBuilder::new().timeout(ack_timeout).build(client);
        Ok(Self {
            jetstream,
            signing_key,
            inbound: Inbound::Own,
        })
    }

    /// Publishes one envelope, signed, and waits for JetStream's acknowledgement.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let kind = envelope.event.kind();
        let error = |source: Box<dyn std::error::Error + Send + Sync>| PublishError {
            kind: kind.as_str(),
            source,
        };
        let subject = subject::device_event(&envelope.device_id, kind);
        let payload = envelope.to_json();
        let signature = self.signing_key.sign(&subject, &payload);
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(envelope.id.to_string())
            .header(SIGNATURE_HEADER, signature.as_str());
        let ack = self
            .jetstream
            .send_publish(subject, message)
            .await
            .map_err(|err| error(err.into()))?;
        ack.await.map_err(|err| error(err.into()))?;
        Ok(())
    }

    /// Puts `device_id`'s heartbeat in the liveness bucket and waits for JetStream's ack: a
    /// JetStream publish on the device's own key (`$KV.LAPS_LIVENESS.<device_id>`), which its
    /// NATS user may publish to, rather than a KV API call, which it may not make.
    pub async fn heartbeat(&self, device_id: &DeviceId, heartbeat: &Heartbeat) -> anyhow::Result<()> {
        let subject = subject::device_heartbeat(device_id);
        let ack = self
            .jetstream
            .publish(subject, heartbeat.to_json().into())
            .await
            .with_context(|| format!("putting the heartbeat in {}", subject::LIVENESS_BUCKET))?;
        ack.await
            .with_context(|| format!("putting the heartbeat in {}", subject::LIVENESS_BUCKET))?;
        Ok(())
    }

    /// Forwards the orchestrator's backup confirmations for `device_id` to `confirmations` (every
    /// receiver subscribed then sees each) and its rotate commands to `commands`, until the
    /// command receiver is dropped. Subscriptions are re-made by the client after a
    /// reconnection; what was missed while offline is found with [`Self::last_command`] and
    /// [`Self::password_version`].
    pub async fn listen(
        &self,
        device_id: &DeviceId,
        confirmations_out: broadcast::Sender<BackupConfirmation>,
        commands_out: mpsc::Sender<Command>,
    ) -> anyhow::Result<()> {
        if let Inbound::Shared(router) = &self.inbound {
            router.listen(
                device_id,
                Route {
                    confirmations: confirmations_out,
                    commands: commands_out,
                },
            );
            return Ok(());
        }
        let client = self.jetstream.client();
        let mut confirmations = client.subscribe(subject::device_confirmations(device_id)).await?;
        let mut commands = client.subscribe(subject::device_commands(device_id)).await?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(message) = confirmations.next() => {
                        match serde_json::from_slice::<BackupConfirmation>(&message.payload) {
                            // Nobody listening right now is fine: the state knows what waits.
                            Ok(confirmation) => { let _ = confirmations_out.send(confirmation); }
                            Err(err) => tracing::warn!(error = %err, "malformed backup confirmation ignored"),
                        }
                    }
                    Some(message) = commands.next() => {
                        match serde_json::from_slice::<Command>(&message.payload) {
                            Ok(command) => {
                                if commands_out.send(command).await.is_err() {
                                    return;
                                }
                            }
                            Err(err) => tracing::warn!(error = %err, "malformed command ignored"),
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(())
    }

    /// The last command kept for `device_id` in the commands stream, if any. `Ok(None)` also
    /// when the stream does not exist yet (no command was ever issued).
    ///
    /// A direct get, whose API subject names the message's subject
    /// (`$JS.API.DIRECT.GET.LAPS_COMMANDS.laps.commands.<device_id>`), so the server can allow
    /// each device its own and nothing else; `STREAM.MSG.GET` carries the subject in its payload,
    /// beyond what permissions see. On a replicated stream any replica answers and may lag a
    /// moment behind the leader: a command missed that way is found at the next cycle, and
    /// live ones arrive through [`Self::listen`] anyway.
    pub async fn last_command(&self, device_id: &DeviceId) -> anyhow::Result<Option<Command>> {
        use jetstream::stream::DirectGetErrorKind;
        let stream = self.jetstream.get_stream_no_info(subject::COMMANDS_STREAM).await?;
        match stream
            .direct_get_last_for_subject(subject::device_commands(device_id))
            .await
        {
            Ok(message) => Ok(Some(serde_json::from_slice(&message.payload)?)),
            Err(err) => match err.kind() {
                DirectGetErrorKind::NotFound => Ok(None),
                // Nobody answers direct gets on a stream that does not exist (yet).
                DirectGetErrorKind::ErrorResponse(status, _) if status == async_nats::StatusCode::NO_RESPONDERS => {
                    Ok(None)
                }
                _ => Err(err.into()),
            },
        }
    }

    /// The centre's current password version of `device_id`, if it published one (`Ok(None)`
    /// also when the stream does not exist yet). A direct get on the device's own subject, the
    /// only one its NATS user may ask for.
    pub async fn password_version(&self, device_id: &DeviceId) -> anyhow::Result<Option<CurrentPasswordVersion>> {
        use jetstream::stream::DirectGetErrorKind;
        let stream = self
            .jetstream
            .get_stream_no_info(subject::PASSWORD_VERSIONS_STREAM)
            .await?;
        match stream
            .direct_get_last_for_subject(subject::device_password_version(device_id))
            .await
        {
            Ok(message) => Ok(Some(serde_json::from_slice(&message.payload)?)),
            Err(err) => match err.kind() {
                DirectGetErrorKind::NotFound => Ok(None),
                DirectGetErrorKind::ErrorResponse(status, _) if status == async_nats::StatusCode::NO_RESPONDERS => {
                    Ok(None)
                }
                _ => Err(err.into()),
            },
        }
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.jetstream.client().connection_state() == async_nats::connection::State::Connected
    }
}

/// Connects with `options` in the background (retrying for ever, reconnecting after losses),
/// with replies on `inbox_prefix`.
async fn connect_in_background(
    options: async_nats::ConnectOptions,
    name: &str,
    inbox_prefix: &str,
    url: &str,
) -> anyhow::Result<async_nats::Client> {
    options
        .name(name)
        .custom_inbox_prefix(inbox_prefix)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 200).min(2_000)))
        .connect(url)
        .await
        .map_err(|err| anyhow::anyhow!("connecting to NATS at {url}: {err}"))
}

/// Reads the nkey user seed in `path`, refusing a file that group or others may access. Errors
/// name the file, never its content.
fn read_seed_file(path: &Path) -> anyhow::Result<UserSeed> {
    let mode = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{} is accessible by group or others (mode {:04o}); allowed: 0600 or 0400, run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    let text = SecretString::from(fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?);
    UserSeed::parse(text.expose_secret()).map_err(|_| {
        anyhow::anyhow!(
            "{} does not hold a user nkey seed (58 characters starting with SU)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_seed(dir: &Path, mode: u32) -> std::path::PathBuf {
        let path = dir.join("device.nk");
        let seed = nkeys::KeyPair::new_user().seed().expect("a new pair has a seed");
        fs::write(&path, format!("{seed}\n")).expect("written");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn an_owner_only_seed_file_is_read_and_its_seed_is_not_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        for mode in [0o600, 0o400] {
            let path = write_seed(dir.path(), mode);
            let seed = read_seed_file(&path).expect("readable");
            assert!(seed.public_key().starts_with('U'));
            assert!(!format!("{seed:?}").contains(seed.expose_secret()));
            fs::remove_file(&path).expect("removed");
        }
    }

    #[test]
    fn a_seed_file_others_may_read_is_refused_naming_the_file_and_the_allowed_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_seed(dir.path(), 0o644);
        let err = read_seed_file(&path).expect_err("refused");
        let message = format!("{err:#}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("mode 0644"), "{message}");
        assert!(message.contains("allowed: 0600 or 0400"), "{message}");
    }

    #[test]
    fn a_file_without_a_user_seed_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("device.nk");
        fs::write(&path, "SUnot-really-a-seed\n").expect("written");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = read_seed_file(&path).expect_err("refused");
        let message = format!("{err:#}");
        assert!(message.contains("does not hold a user nkey seed"), "{message}");
        assert!(!message.contains("not-really"), "{message}");
    }
}
