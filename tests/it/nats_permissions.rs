//! NATS permissions for production: a nats-server running the renderer's config (an nkey user
//! for the orchestrator and one per device, see `orchestrator/packaging/nats-server.conf`).
//! The fleet still works end to end, and a device's credentials reach its own subjects only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::{Event, ServerError};
use fleetlaps_agent::bus::{ConnectSettings, Publisher};
use fleetlaps_orchestrator::bus::issue_command;
use fleetlaps_orchestrator::nats_auth::{DeviceUser, NkeyPublicKey, NkeySeed, ServerConfig, ensure_seed_file};
use fleetlaps_proto::command::{Command, CommandAction, CurrentPasswordVersion, DevicePosition};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::liveness::Heartbeat;
use fleetlaps_proto::seal::EscrowSecretKey;
use fleetlaps_proto::subject;
use futures::{FutureExt, StreamExt};
use tempfile::TempDir;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, wait_until};

/// How long a call that permissions should stop is given before it counts as unanswered. A
/// denied publish gets no reply at all (no "no responders" either): the server drops it.
const DENIED_WAIT: Duration = Duration::from_secs(1);
/// How long anything that should happen may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_agent_enrolled_by_a_config_reload_rotates_and_takes_commands_with_permissions_on() {
    // Arrange: the server knows only the orchestrator; the agent has its own seed.
    let keys = Keys::new();
    let (agent_seed, agent_key) = keys.create("agent");
    let mut nats = TestNats::start_with_config(server_config(&keys.orchestrator_key, Vec::new()));
    let orchestrator = TestOrchestrator::spawn_with_nkey(&nats, &keys.orchestrator_seed).await;
    let options = AgentOptions {
        nkey_seed_file: Some(agent_seed),
        ..AgentOptions::default()
    };
    let mut agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;

    // Not enrolled: the server refuses the agent, whose backup waits in its outbox.
    wait_until("the refused agent holds its backup", TIMEOUT, || async {
        let status = agent.status().await;
        (!status.connected && status.outbox_pending > 0).then_some(())
    })
    .await;
    // Enrolled over HTTPS, so the orchestrator knows the device, but no event reached it.
    assert!(
        orchestrator
            .devices()
            .await
            .iter()
            .all(|device| device.last_backup_date_time.is_none()),
        "nothing reached the orchestrator"
    );

    // Act: enrol the device as an operator would, by rendering the config again and reloading.
    let enrolled = DeviceUser {
        device_id: agent.device_id.clone(),
        nkey: agent_key,
    };
    nats.reload_config(server_config(&keys.orchestrator_key, vec![enrolled]));

    // Assert: the rotation completes with the password the API gives, and its backup is
    // confirmed (the device hears its confirmations).
    account_holds_newest_backup(&orchestrator, &agent, 1).await;
    wait_until("the agent has its backup confirmed", TIMEOUT, || async {
        let status = agent.status().await;
        let settled = status.connected && status.outbox_pending == 0 && status.unconfirmed_backups == 0;
        settled.then_some(())
    })
    .await;

    // A command reaches the running agent live, on its own command subject…
    let orchestrator_js = jetstream::new(connect(&nats, &keys.orchestrator_seed, None, &Violations::default()).await);
    issue_command(&orchestrator_js, &agent.device_id, rotate("live"))
        .await
        .expect("the orchestrator's user may issue commands");
    account_holds_newest_backup(&orchestrator, &agent, 2).await;

    // …and one issued while it is down is found by its direct get of its own last command.
    agent.stop().await;
    issue_command(&orchestrator_js, &agent.device_id, rotate("offline"))
        .await
        .expect("issued");
    agent.start_in_process().await;
    account_holds_newest_backup(&orchestrator, &agent, 3).await;
}

#[tokio::test]
async fn a_devices_credentials_cannot_act_as_the_orchestrator_or_reach_another_devices_subjects() {
    // Arrange: two enrolled devices; a command kept for each; device B listening.
    let keys = Keys::new();
    let (nats, [(device_a, seed_a), (device_b, seed_b)]) = two_devices(&keys);
    // The real orchestrator creates both streams and its durable consumer.
    let _orchestrator = TestOrchestrator::spawn_with_nkey(&nats, &keys.orchestrator_seed).await;
    let orchestrator_client = connect(&nats, &keys.orchestrator_seed, None, &Violations::default()).await;
    let orchestrator_js = jetstream::ContextBuilder::new()
        .timeout(DENIED_WAIT)
        .build(orchestrator_client.clone());
    issue_command(&orchestrator_js, &device_b, rotate("for b"))
        .await
        .expect("issued");

    let observer_b = connect(
        &nats,
        &seed_b,
        Some(subject::device_inbox_prefix(&device_b)),
        &Violations::default(),
    )
    .await;
    let mut confirmations_b = observer_b
        .subscribe(subject::device_confirmations(&device_b))
        .await
        .expect("device B may hear its confirmations");
    let mut commands_b = observer_b
        .subscribe(subject::device_commands(&device_b))
        .await
        .expect("device B may hear its commands");
    observer_b.flush().await.expect("flushed");

    let violations = Violations::default();
    let (device, device_js) = device_connection(&nats, &device_a, &seed_a, &violations).await;

    // Controls: with the same credentials, device A's own subjects work, so the refusals below
    // are the permissions, not a broken client.
    device_js
        .send_publish(
            format!("laps.events.{device_a}.probe"),
            PublishMessage::build().payload("probe".into()),
        )
        .await
        .expect("sent")
        .await
        .expect("JetStream acknowledges device A's own event");
    let publisher = connected_publisher(&nats, &device_a, &seed_a).await;
    let command_a = issue_command(&orchestrator_js, &device_a, rotate("for a"))
        .await
        .expect("issued");
    let found = publisher
        .last_command(&device_a)
        .await
        .expect("device A may read its own last command");
    assert_eq!(found.map(|command| command.id), Some(command_a.id));
    // The centre's current password version: the orchestrator writes one per device; device A
    // reads its own.
    for device_id in [&device_a, &device_b] {
        let version = CurrentPasswordVersion {
            device_id: device_id.clone(),
            rotation_id: None,
            position: DevicePosition {
                generation: 1,
                sequence: 7,
            },
            latest_backup: None,
            escrow_public_key: EscrowSecretKey::generate().public_key(),
            escrow_recovery_public_key: None,
            clone_detected: false,
        };
        orchestrator_js
            .publish(
                subject::device_password_version(device_id),
                serde_json::to_vec(&version).expect("serialises").into(),
            )
            .await
            .expect("sent")
            .await
            .expect("the orchestrator may write a password version");
    }
    let own_version = publisher
        .password_version(&device_a)
        .await
        .expect("device A may read its own password version");
    assert_eq!(own_version.map(|version| version.device_id), Some(device_a.clone()));

    // Publishing as the orchestrator (a command, an audit record) or as device B (an event):
    // no JetStream ack, a violation reported, and nothing stored.
    let forged = "forged by device-a";
    let stream_subjects = [
        (subject::COMMANDS_STREAM, subject::device_commands(&device_b)),
        (subject::EVENTS_STREAM, "laps.audit.password_read".to_owned()),
        (
            subject::EVENTS_STREAM,
            format!("laps.events.{device_b}.password_backed_up"),
        ),
    ];
    for (stream_name, forged_subject) in &stream_subjects {
        let ack = device_js
            .send_publish(forged_subject.clone(), PublishMessage::build().payload(forged.into()))
            .await
            .expect("sent");
        assert!(
            ack.await.is_err(),
            "JetStream acknowledged {forged_subject} from device A"
        );
        violations.wait_for("Publish", forged_subject).await;
        let stream = orchestrator_js
            .get_stream(stream_name)
            .await
            .expect("the stream exists");
        if let Ok(message) = stream.get_last_raw_message_by_subject(forged_subject).await {
            assert_ne!(
                message.payload.as_ref(),
                forged.as_bytes(),
                "{forged_subject} holds the forgery"
            );
        }
    }
    // A backup confirmation for device B (core NATS): B hears the orchestrator's next one, not it.
    device
        .publish(subject::device_confirmations(&device_b), forged.into())
        .await
        .expect("sent");
    device.flush().await.expect("flushed");
    violations
        .wait_for("Publish", &subject::device_confirmations(&device_b))
        .await;
    orchestrator_client
        .publish(subject::device_confirmations(&device_b), "from the orchestrator".into())
        .await
        .expect("the orchestrator may confirm");
    let heard = next_within(&mut confirmations_b).await;
    assert_eq!(heard.payload.as_ref(), b"from the orchestrator");
    // B's command subject carried no forgery either: the next command B hears is the orchestrator's.
    let next_b = issue_command(&orchestrator_js, &device_b, rotate("next for b"))
        .await
        .expect("issued");
    let heard: Command =
        serde_json::from_slice(&next_within(&mut commands_b).await.payload).expect("B hears a command");
    assert_eq!(heard.id, next_b.id);

    // Reading device B's commands: a live subscription is refused and hears nothing…
    let mut stolen = device
        .subscribe(subject::device_commands(&device_b))
        .await
        .expect("sent");
    let mut own_confirmations = device
        .subscribe(subject::device_confirmations(&device_a))
        .await
        .expect("device A may hear its confirmations");
    device.flush().await.expect("flushed");
    violations
        .wait_for("Subscription", &subject::device_commands(&device_b))
        .await;
    issue_command(&orchestrator_js, &device_b, rotate("unseen by a"))
        .await
        .expect("issued");
    orchestrator_client
        .publish(subject::device_confirmations(&device_a), "marker".into())
        .await
        .expect("published");
    // Messages reach one connection in order: once the marker is in, B's command would be too.
    assert_eq!(next_within(&mut own_confirmations).await.payload.as_ref(), b"marker");
    assert!(
        !matches!(stolen.next().now_or_never(), Some(Some(_))),
        "device A heard device B's command"
    );
    // …and the agent's own call for its last command, pointed at device B, gets no answer.
    let err = publisher
        .last_command(&device_b)
        .await
        .expect_err("device A read device B's last command");
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    // Nor does its read of device B's password version.
    let err = publisher
        .password_version(&device_b)
        .await
        .expect_err("device A read device B's password version");
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");

    // Nor does that direct get from the raw client (which records the server's violations), nor
    // any other JetStream API: reading B's command another way, managing streams and consumers.
    let direct_get_b = format!("$JS.API.DIRECT.GET.LAPS_COMMANDS.laps.commands.{device_b}");
    let last_of_b = format!(r#"{{"last_by_subj":"laps.commands.{device_b}"}}"#);
    let consumer_for_b = format!(
        r#"{{"stream_name":"LAPS_COMMANDS","config":{{"filter_subject":"laps.commands.{device_b}","ack_policy":"none"}}}}"#
    );
    let version_of_b = format!("$JS.API.DIRECT.GET.LAPS_PASSWORD_VERSIONS.laps.password_version.{device_b}");
    let forged_version = format!("laps.password_version.{device_a}");
    let api_calls = [
        (direct_get_b.as_str(), String::new()),
        (version_of_b.as_str(), String::new()),
        (forged_version.as_str(), "{}".to_owned()),
        ("$JS.API.DIRECT.GET.LAPS_COMMANDS", last_of_b.clone()),
        ("$JS.API.STREAM.MSG.GET.LAPS_COMMANDS", last_of_b),
        ("$JS.API.CONSUMER.CREATE.LAPS_COMMANDS", consumer_for_b),
        ("$JS.API.STREAM.INFO.LAPS_COMMANDS", String::new()),
        ("$JS.API.STREAM.DELETE.LAPS_EVENTS", String::new()),
        ("$JS.API.STREAM.PURGE.LAPS_EVENTS", String::new()),
        ("$JS.API.STREAM.DELETE.LAPS_COMMANDS", String::new()),
        ("$JS.API.CONSUMER.DELETE.LAPS_EVENTS.orchestrator", String::new()),
        (
            "$JS.API.STREAM.CREATE.LAPS_SHADOW",
            r#"{"name":"LAPS_SHADOW","subjects":["laps.commands.>"]}"#.to_owned(),
        ),
    ];
    let answers = futures::future::join_all(
        api_calls
            .iter()
            .map(|(api_subject, body)| device.request((*api_subject).to_owned(), body.clone().into())),
    )
    .await;
    for ((api_subject, _), answer) in api_calls.iter().zip(answers) {
        match answer {
            Err(err) if err.kind() == async_nats::RequestErrorKind::TimedOut => {}
            Err(err) => panic!("{api_subject}: expected no answer at all, got {err}"),
            Ok(message) => panic!(
                "{api_subject} answered device A: {}",
                String::from_utf8_lossy(&message.payload)
            ),
        }
        violations.wait_for("Publish", api_subject).await;
    }
    assert!(
        device_js.delete_stream(subject::EVENTS_STREAM).await.is_err(),
        "device A deleted the events stream"
    );

    // The history is intact, and not even the orchestrator's user may delete it.
    assert!(
        orchestrator_js.delete_stream(subject::EVENTS_STREAM).await.is_err(),
        "the orchestrator's user deleted the events stream"
    );
    let events = orchestrator_js
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("the events stream is kept");
    events
        .get_consumer::<jetstream::consumer::pull::Config>("orchestrator")
        .await
        .expect("the orchestrator's consumer is kept");
    assert!(
        orchestrator_js.get_stream("LAPS_SHADOW").await.is_err(),
        "device A created a stream"
    );
}

#[tokio::test]
async fn a_device_puts_only_its_own_heartbeat_and_cannot_read_the_liveness_bucket() {
    // Arrange: two enrolled devices; the real orchestrator creates the liveness bucket.
    let keys = Keys::new();
    let (nats, [(device_a, seed_a), (device_b, _)]) = two_devices(&keys);
    let orchestrator = TestOrchestrator::spawn_with_nkey(&nats, &keys.orchestrator_seed).await;
    let orchestrator_js = jetstream::new(connect(&nats, &keys.orchestrator_seed, None, &Violations::default()).await);
    let violations = Violations::default();
    let (device, device_js) = device_connection(&nats, &device_a, &seed_a, &violations).await;
    let heartbeat = Heartbeat {
        at: chrono::Utc::now(),
        agent_version: "test".to_owned(),
        current_rotation: None,
    };

    // Control: the agent's own call puts device A's heartbeat, which the orchestrator sees.
    let publisher = connected_publisher(&nats, &device_a, &seed_a).await;
    publisher
        .heartbeat(&device_a, &heartbeat)
        .await
        .expect("device A may put its own heartbeat");
    wait_until("the orchestrator sees device A's heartbeat", TIMEOUT, || async {
        orchestrator.liveness.last_seen(&device_a)
    })
    .await;

    // Act and assert: device A putting device B's heartbeat, by the agent's call or a raw
    // JetStream publish, gets no ack; the server reports the violation; B has no heartbeat.
    let err = publisher
        .heartbeat(&device_b, &heartbeat)
        .await
        .expect_err("device A put device B's heartbeat");
    assert!(format!("{err:#}").contains("LAPS_LIVENESS"), "{err:#}");
    let forged_subject = subject::device_heartbeat(&device_b);
    let ack = device_js
        .publish(forged_subject.clone(), heartbeat.to_json().into())
        .await
        .expect("sent");
    assert!(
        ack.await.is_err(),
        "JetStream acknowledged device B's heartbeat from device A"
    );
    violations.wait_for("Publish", &forged_subject).await;
    let bucket = orchestrator_js
        .get_stream(subject::LIVENESS_STREAM)
        .await
        .expect("the liveness bucket exists");
    assert!(
        bucket.get_last_raw_message_by_subject(&forged_subject).await.is_err(),
        "the bucket holds a heartbeat for device B"
    );
    assert_eq!(orchestrator.liveness.last_seen(&device_b), None);

    // Nor may a device read the bucket: no direct get, no consumer.
    let direct_get_b = format!("$JS.API.DIRECT.GET.{}.{forged_subject}", subject::LIVENESS_STREAM);
    let consumer = format!("$JS.API.CONSUMER.CREATE.{}", subject::LIVENESS_STREAM);
    for api_subject in [direct_get_b, consumer] {
        match device.request(api_subject.clone(), "{}".into()).await {
            Err(err) if err.kind() == async_nats::RequestErrorKind::TimedOut => {}
            Err(err) => panic!("{api_subject}: expected no answer at all, got {err}"),
            Ok(message) => panic!(
                "{api_subject} answered device A: {}",
                String::from_utf8_lossy(&message.payload)
            ),
        }
        violations.wait_for("Publish", &api_subject).await;
    }
}

/// Waits until the orchestrator holds `count` passwords for the agent and the newest is the
/// account's. The account changes only after the backup is acknowledged, so a moment later.
async fn account_holds_newest_backup(orchestrator: &TestOrchestrator, agent: &TestAgent, count: usize) {
    wait_until(
        &format!("the account holds the newest of {count} backed-up password(s)"),
        TIMEOUT,
        || async {
            let passwords = orchestrator.passwords(&agent.device_id).await;
            (passwords.len() >= count && agent.has_password(&passwords[0])).then_some(())
        },
    )
    .await;
}

/// A connection as `device_id`'s NATS user (its seed, its inbox prefix), and a JetStream context
/// on it that gives up on a denied request after [`DENIED_WAIT`].
async fn device_connection(
    nats: &TestNats,
    device_id: &DeviceId,
    seed: &Path,
    violations: &Violations,
) -> (async_nats::Client, jetstream::Context) {
    let device = connect(nats, seed, Some(subject::device_inbox_prefix(device_id)), violations).await;
    let device_js = jetstream::ContextBuilder::new()
        .timeout(DENIED_WAIT)
        .build(device.clone());
    (device, device_js)
}

/// The agent's own publisher for `device_id`, as that device's NATS user, connected.
async fn connected_publisher(nats: &TestNats, device_id: &DeviceId, seed: &Path) -> Publisher {
    let publisher = Publisher::connect(ConnectSettings {
        ca_file: None,
        url: &nats.url(),
        ack_timeout: DENIED_WAIT,
        device_id,
        nkey_seed_file: Some(seed),
        signing_key: fleetlaps_proto::signature::DeviceSigningKey::generate(),
    })
    .await
    .expect("the agent's publisher connects");
    wait_until("the agent's publisher is connected", TIMEOUT, || async {
        publisher.is_connected().then_some(())
    })
    .await;
    publisher
}

/// A nats-server configured the production way for the orchestrator of `keys` and two devices,
/// `device-a` and `device-b`, each with its own seed file.
fn two_devices(keys: &Keys) -> (TestNats, [(DeviceId, PathBuf); 2]) {
    let devices = ["device-a", "device-b"].map(|name| {
        let (seed, nkey) = keys.create(name);
        (DeviceId::parse(name).expect("valid"), seed, nkey)
    });
    let users = devices
        .iter()
        .map(|(device_id, _, nkey)| DeviceUser {
            device_id: device_id.clone(),
            nkey: nkey.clone(),
        })
        .collect();
    let nats = TestNats::start_with_config(server_config(&keys.orchestrator_key, users));
    (nats, devices.map(|(device_id, seed, _)| (device_id, seed)))
}

/// The orchestrator's seed and public key, and the devices' seed files, in a temporary directory.
struct Keys {
    /// The orchestrator's seed file.
    orchestrator_seed: PathBuf,
    /// Its public key, for the server's config.
    orchestrator_key: NkeyPublicKey,
    /// Holds the seed files.
    dir: TempDir,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-nkeys-")
            .tempdir()
            .expect("tempdir");
        let orchestrator_seed = dir.path().join("orchestrator.nk");
        let orchestrator_key = ensure_seed_file(&orchestrator_seed).expect("creating the orchestrator's seed");
        Self {
            orchestrator_seed,
            orchestrator_key,
            dir,
        }
    }

    /// A new seed file named after `name`, and its public key.
    fn create(&self, name: &str) -> (PathBuf, NkeyPublicKey) {
        let path = self.dir.path().join(format!("{name}.nk"));
        let key = ensure_seed_file(&path).expect("creating a seed");
        (path, key)
    }
}

/// The renderer's config for the harness's port and store directory.
fn server_config(
    orchestrator: &NkeyPublicKey,
    devices: Vec<DeviceUser>,
) -> impl Fn(u16, &Path) -> String + Send + Sync + 'static {
    let orchestrator = orchestrator.clone();
    move |port, store_dir| {
        ServerConfig {
            listen: format!("127.0.0.1:{port}"),
            store_dir: store_dir.to_owned(),
            server_version: fleetlaps_orchestrator::nats_auth::installed_server_version()
                .expect("nats-server's version"),
            tls: None,
            limits: fleetlaps_orchestrator::nats_auth::ServerLimits::default(),
            orchestrator: orchestrator.clone(),
            devices: devices.clone(),
            simulator: None,
        }
        .render()
        .expect("the config renders")
    }
}

/// The permission violations the server reported to one client.
#[derive(Clone, Default)]
struct Violations(Arc<Mutex<Vec<String>>>);

impl Violations {
    /// Waits until the server has reported that `operation` (`Publish` or `Subscription`) on
    /// exactly `subject` was refused.
    async fn wait_for(&self, operation: &str, subject: &str) {
        let expected = format!("Permissions Violation for {operation} to \"{subject}\"");
        wait_until(&format!("the server reports: {expected}"), TIMEOUT, || async {
            let seen = self.0.lock().expect("not poisoned");
            seen.iter().any(|message| message.contains(&expected)).then_some(())
        })
        .await;
    }
}

/// A raw client authenticated with the seed in `seed_file`, recording permission violations.
async fn connect(
    nats: &TestNats,
    seed_file: &Path,
    inbox_prefix: Option<String>,
    violations: &Violations,
) -> async_nats::Client {
    let seed = NkeySeed::read_file(seed_file).expect("readable seed");
    let recorded = violations.0.clone();
    let mut options = async_nats::ConnectOptions::with_nkey(seed.expose_secret().to_owned())
        .request_timeout(Some(DENIED_WAIT))
        .event_callback(move |event| {
            let recorded = recorded.clone();
            async move {
                if let Event::ServerError(ServerError::Other(message)) = event {
                    recorded.lock().expect("not poisoned").push(message);
                }
            }
        });
    if let Some(prefix) = inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    options.connect(nats.url()).await.expect("connects with its nkey")
}

/// The next message of `subscriber`, within [`TIMEOUT`].
async fn next_within(subscriber: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(TIMEOUT, subscriber.next())
        .await
        .expect("a message within the timeout")
        .expect("the subscription is open")
}

fn rotate(reason: &str) -> CommandAction {
    CommandAction::RotatePassword {
        reason: reason.to_owned(),
    }
}
