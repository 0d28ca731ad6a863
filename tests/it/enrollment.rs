//! Enrollment and signed device events: a device enrolls with an enrollment token over HTTPS and
//! gets an owner-only identity; tokens that are unknown, used up, expired or revoked are refused;
//! forged and replayed events are quarantined, counted and listed, and change nothing.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use chrono::Utc;
use fleetlaps_agent::identity::Identity;
use fleetlaps_proto::api::{DeviceLocalCredentialInfo, SIGNATURE_HEADER};
use fleetlaps_proto::event::{Envelope, Event, EventKind, PasswordBackedUp, RotationReason, sealing_context};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, EventId, RotationId};
use fleetlaps_proto::seal::seal;
use fleetlaps_proto::signature::DeviceSigningKey;
use fleetlaps_proto::subject;
use futures::StreamExt as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::apps::{
    ADMIN_TOKEN, AgentOptions, TestAgent, TestOrchestrator, binary, create_enrollment_token, enroll_with,
};
use crate::harness::{TestNats, wait_until};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn enrollment_gives_an_owner_only_identity_and_a_working_agent_and_run_without_one_refuses() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;

    // Act: TestAgent enrolls for real (token over the API, enrollment over HTTPS) and starts.
    let agent = TestAgent::spawn(&nats, &orchestrator).await;

    // Assert: a 0600 identity in an owner-only state directory, naming the agent's device id.
    let identity_path = Identity::path(&agent.state_dir);
    let mode = std::fs::metadata(&identity_path)
        .expect("identity.json")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let state_mode = std::fs::metadata(&agent.state_dir)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(state_mode & 0o077, 0, "the state directory is owner-only");
    let identity = Identity::load(&agent.state_dir).expect("readable").expect("enrolled");
    assert_eq!(identity.device_id, agent.device_id);
    assert_eq!(identity.escrow_public_key, orchestrator.escrow_public_key);
    let text = std::fs::read_to_string(&identity_path).expect("readable");
    assert!(text.contains(agent.device_id.as_str()));
    // The device works: its signed events are applied.
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let tokens: Value = orchestrator
        .get("/v1.0/fleetlaps/enrollmentTokens", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(tokens["value"][0]["uses"], 1);
    assert_eq!(tokens["value"][0]["maxUses"], 1);

    // The binary: `run` without an identity refuses with the command to run; `enroll` makes one.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_name = \"cli-host\"\nstate_dir = \"{}\"\n[nats]\nurl = \"{}\"\n[account]\nbackend = \"file\"\npath = \"{}\"\n",
            dir.path().join("state").display(),
            nats.url(),
            dir.path().join("accounts").display()
        ),
    )
    .expect("writing agent.toml");
    let config_arg = config.to_str().expect("utf-8");
    let refused = crate::apps::run("fleetlaps-agent", &["--config", config_arg, "run"]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not enrolled: run fleetlaps-agent enroll"), "{stderr}");
    let (token, _) = create_enrollment_token(&orchestrator, json!({"name": "cli"})).await;
    let enrolled = tokio::process::Command::new(binary("fleetlaps-agent"))
        .args([
            "--config",
            config_arg,
            "enroll",
            "--orchestrator",
            &orchestrator.base_url,
            "--ca",
        ])
        .arg(&orchestrator.tls_certificate)
        .env("LAPS_ENROLLMENT_TOKEN", &token)
        .output()
        .await
        .expect("runs");
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let identity = Identity::load(&dir.path().join("state"))
        .expect("readable")
        .expect("enrolled");
    assert!(String::from_utf8_lossy(&enrolled.stdout).contains(identity.device_id.as_str()));
    assert!(
        !String::from_utf8_lossy(&enrolled.stdout).contains(&token)
            && !String::from_utf8_lossy(&enrolled.stderr).contains(&token),
        "the token is never printed"
    );
}

#[tokio::test]
async fn enroll_refuses_a_plain_http_orchestrator_url_sending_nothing_unless_told_insecure_http() {
    // Arrange: a listener standing in for a plain-HTTP orchestrator, and an agent config.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.set_nonblocking(true).expect("non-blocking");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "device_name = \"cli-host\"\nstate_dir = \"{}\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\n[account]\nbackend = \"file\"\npath = \"{}\"\n",
            dir.path().join("state").display(),
            dir.path().join("accounts").display()
        ),
    )
    .expect("writing agent.toml");
    let enroll = |extra: &'static [&'static str]| {
        let mut command = tokio::process::Command::new(binary("fleetlaps-agent"));
        command
            .arg("--config")
            .arg(&config)
            .args(["enroll", "--orchestrator", &url])
            .args(extra)
            .env("LAPS_ENROLLMENT_TOKEN", "fle_not-sent-in-clear");
        command
    };

    // Act
    let refused = enroll(&[]).output().await.expect("runs");

    // Assert: refused naming the way out, and no connection was made (it would be queued).
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to send the enrollment token over plain HTTP") && stderr.contains("--insecure-http"),
        "{stderr}"
    );
    let no_connection = listener.accept().expect_err("no connection was made");
    assert_eq!(no_connection.kind(), std::io::ErrorKind::WouldBlock);

    // With --insecure-http the request is sent (this stand-in hangs up on it).
    listener.set_nonblocking(false).expect("blocking");
    let stand_in = std::thread::spawn(move || listener.accept().map(|(connection, _)| drop(connection)));
    let allowed = enroll(&["--insecure-http"]).output().await.expect("runs");
    let stderr = String::from_utf8_lossy(&allowed.stderr);
    assert!(!stderr.contains("refusing to send"), "{stderr}");
    stand_in.join().expect("the stand-in ran").expect("the agent connected");
}

#[tokio::test]
async fn bad_used_up_expired_and_revoked_enrollment_tokens_are_refused_with_401_naming_why() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = |name: &str| dir.path().join(name);

    // A token nobody made.
    let bad = enroll_with(&orchestrator, &state("bad"), "host-bad", "fle_not-a-real-token")
        .await
        .expect_err("refused");
    assert_refused(&bad, "the enrollment token is not valid");

    // A single-use token, used twice.
    let (single, _) = create_enrollment_token(&orchestrator, json!({"name": "single"})).await;
    enroll_with(&orchestrator, &state("first"), "host-first", &single)
        .await
        .expect("the first use enrolls");
    let used_up = enroll_with(&orchestrator, &state("second"), "host-second", &single)
        .await
        .expect_err("refused");
    assert_refused(&used_up, "the enrollment token is used up: 1 of 1");

    // A token that expires two seconds from now, used after that.
    let expires = Utc::now() + chrono::Duration::seconds(2);
    let (short, _) = create_enrollment_token(&orchestrator, json!({"name": "short", "expiresDateTime": expires})).await;
    wait_until("the short-lived token's expiry passes", TIMEOUT, || async {
        (Utc::now() > expires).then_some(())
    })
    .await;
    let expired = enroll_with(&orchestrator, &state("expired"), "host-expired", &short)
        .await
        .expect_err("refused");
    assert_refused(&expired, "the enrollment token expired at");

    // A token revoked with lapsctl.
    let created = orchestrator
        .lapsctl(&[
            "--token",
            ADMIN_TOKEN,
            "enrollment-token",
            "create",
            "--name",
            "revoked",
            "--max-uses",
            "5",
            "-o",
            "json",
        ])
        .await;
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let created: Value = serde_json::from_slice(&created.stdout).expect("json");
    let (revoked_token, revoked_id) = (
        created[0]["Token"].as_str().expect("token").to_owned(),
        created[0]["Id"].as_str().expect("id").to_owned(),
    );
    assert!(revoked_token.starts_with("fle_"));
    let revoke = orchestrator
        .lapsctl(&[
            "--token",
            ADMIN_TOKEN,
            "enrollment-token",
            "revoke",
            "--id",
            &revoked_id,
        ])
        .await;
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    let revoked = enroll_with(&orchestrator, &state("revoked"), "host-revoked", &revoked_token)
        .await
        .expect_err("refused");
    assert_refused(&revoked, "the enrollment token was revoked at");

    // The refusals are 401 on the wire too, and no identity or device was made by them.
    let response = orchestrator
        .http
        .post(format!("{}/fleetlaps/v1/enroll", orchestrator.base_url))
        .bearer_auth(&single)
        .json(&json!({"publicKey": DeviceSigningKey::generate().public_key().to_string(), "deviceName": "h"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let malformed = orchestrator
        .http
        .post(format!("{}/fleetlaps/v1/enroll", orchestrator.base_url))
        .bearer_auth(&single)
        .json(&json!({"publicKey": "not a key", "deviceName": "h"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    for name in ["bad", "second", "expired", "revoked"] {
        assert!(!Identity::path(&state(name)).exists(), "{name}: no identity");
    }
    let list = orchestrator
        .lapsctl(&["--token", ADMIN_TOKEN, "enrollment-token", "list", "-o", "json"])
        .await;
    let list: Value = serde_json::from_slice(&list.stdout).expect("json");
    let uses: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .map(|entry| entry["Uses"].as_str().expect("uses"))
        .collect();
    assert_eq!(uses, ["1/1", "0/1", "0/5"], "only the one enrollment counted");
}

fn assert_refused(err: &anyhow::Error, message: &str) {
    let text = format!("{err:#}");
    assert!(text.contains("HTTP 401"), "{text}");
    assert!(text.contains(message), "{text}");
}

#[tokio::test]
async fn forged_events_are_quarantined_counted_listed_and_change_nothing() {
    // Arrange: two enrolled devices, A with a backed-up password.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent_a = TestAgent::spawn(&nats, &orchestrator).await;
    let agent_b = TestAgent::spawn_with(
        &nats,
        &orchestrator,
        AgentOptions {
            device_name: "device-2".to_owned(),
            ..AgentOptions::default()
        },
    )
    .await;
    orchestrator.wait_for_passwords(&agent_a.device_id, 1).await;
    orchestrator.wait_for_passwords(&agent_b.device_id, 1).await;
    let before = state_of(&orchestrator, &agent_a.device_id).await;
    let key_a = Identity::load(&agent_a.state_dir)
        .expect("readable")
        .expect("enrolled")
        .signing_key;
    let jetstream = jetstream::new(nats.client().await);

    // Act 1: a backup for A, on A's subject, signed by a key that is not A's.
    let forged = backup_for(&orchestrator, &agent_a.device_id, 1_000);
    let subject_a = subject::device_event(&agent_a.device_id, EventKind::PasswordBackedUp);
    let payload = forged.to_json();
    let other_key = DeviceSigningKey::generate();
    publish(&jetstream, &subject_a, &payload, &other_key.sign(&subject_a, &payload)).await;

    // Act 2: an envelope naming device B, on A's subject, with A's valid signature.
    let naming_b = backup_for(&orchestrator, &agent_b.device_id, 1_000);
    let payload_b = naming_b.to_json();
    publish(&jetstream, &subject_a, &payload_b, &key_a.sign(&subject_a, &payload_b)).await;

    // Assert: counted by reason, listed in the quarantine, and A's state unchanged.
    wait_until("both are counted", TIMEOUT, || async {
        let forged = orchestrator
            .metric("fleetlaps_events_quarantined_total{reason=\"forged\"}")
            .await;
        let mismatch = orchestrator
            .metric("fleetlaps_events_quarantined_total{reason=\"subject_mismatch\"}")
            .await;
        (forged == 1.0 && mismatch == 1.0).then_some(())
    })
    .await;
    let reasons = quarantine_reasons(&orchestrator).await;
    assert_eq!(
        reasons,
        [
            ("forged".to_owned(), subject_a.clone()),
            ("subject_mismatch".to_owned(), subject_a.clone())
        ]
    );
    assert_eq!(state_of(&orchestrator, &agent_a.device_id).await, before);
    let forbidden = orchestrator
        .get("/v1.0/fleetlaps/quarantine", Some(crate::apps::READ_TOKEN))
        .await;
    assert_eq!(
        forbidden.status(),
        StatusCode::FORBIDDEN,
        "the quarantine is for admins only"
    );
    let listed = orchestrator
        .lapsctl(&["--token", ADMIN_TOKEN, "quarantine", "-o", "json"])
        .await;
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("lapsctl -o json");
    assert_eq!(
        (listed[0]["Reason"].as_str(), listed[0]["Subject"].as_str()),
        (Some("forged"), Some(subject_a.as_str()))
    );
}

#[tokio::test]
async fn a_replayed_device_event_is_recognised_by_its_id_counted_as_a_duplicate_and_changes_nothing() {
    // Arrange: a device with a backed-up password; its backup message as it is in the stream.
    let captured = captured(EventKind::PasswordBackedUp).await;
    let (orchestrator, agent) = (&captured.orchestrator, &captured.agent);
    let before = state_of(orchestrator, &agent.device_id).await;
    let duplicates_before = orchestrator
        .metric(r#"fleetlaps_events_ingested_total{kind="password_backed_up",outcome="duplicate"}"#)
        .await;

    // Act: the captured message, valid signature and all, published again with a new
    // Nats-Msg-Id so JetStream's deduplication lets it through (what an agent re-sending an
    // unconfirmed backup does, and what an attacker replaying one does).
    captured.publish_again().await;

    // Assert: recognised by its event id, counted, nothing quarantined, nothing changed.
    wait_until("the replay is counted as a duplicate", TIMEOUT, || async {
        (orchestrator
            .metric(r#"fleetlaps_events_ingested_total{kind="password_backed_up",outcome="duplicate"}"#)
            .await
            == duplicates_before + 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(quarantine_reasons(orchestrator).await, []);
    assert_eq!(state_of(orchestrator, &agent.device_id).await, before);
}

#[tokio::test]
async fn a_re_sent_report_is_a_duplicate_below_its_running_copys_mark_and_stays_out_of_the_timeline() {
    // Arrange: a settled device; its policy report as it is in the stream.
    let captured = captured(EventKind::PolicyApplied).await;
    let (orchestrator, agent) = (&captured.orchestrator, &captured.agent);
    let before = state_of(orchestrator, &agent.device_id).await;
    let duplicate = r#"fleetlaps_events_ingested_total{kind="policy_applied",outcome="duplicate"}"#;
    let duplicates_before = orchestrator.metric(duplicate).await;
    let (auditor, _) = orchestrator
        .create_token(
            crate::apps::ADMIN_TOKEN,
            json!({"name": "auditor", "scopes": ["Audit.Read.All"]}),
        )
        .await;

    // Act: the report again, as an agent re-sending it after a lost ack would.
    captured.publish_again().await;

    // Assert: a duplicate (reports keep no id: its running copy's mark is past it), nothing
    // changed, and the device's timeline shows the report once.
    wait_until("the copy is counted as a duplicate", TIMEOUT, || async {
        (orchestrator.metric(duplicate).await == duplicates_before + 1.0).then_some(())
    })
    .await;
    assert_eq!(quarantine_reasons(orchestrator).await, []);
    assert_eq!(state_of(orchestrator, &agent.device_id).await, before);
    let timeline = crate::investigations::timeline(orchestrator, &auditor, &agent.device_id).await;
    let reports = timeline.iter().filter(|entry| entry.kind == "policy_applied").count();
    assert_eq!(reports, 1, "{timeline:#?}");
}

/// A device with a backed-up password, settled (the agent has sent everything and the
/// orchestrator has applied all of it), and its first message of a kind as it is in the stream.
struct Captured {
    orchestrator: TestOrchestrator,
    agent: TestAgent,
    jetstream: jetstream::Context,
    /// The device's subject of that kind.
    subject: String,
    payload: Vec<u8>,
    signature: String,
    /// The server, stopped last (fields drop in order).
    _nats: TestNats,
}

impl Captured {
    /// The captured message, valid signature and all, published again with a new Nats-Msg-Id
    /// (so JetStream's deduplication lets it through).
    async fn publish_again(&self) {
        publish(&self.jetstream, &self.subject, &self.payload, &self.signature).await;
    }
}

async fn captured(kind: EventKind) -> Captured {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_settled_with(&first).await;
    orchestrator.wait_until_folded(&nats).await;
    let subject = subject::device_event(&agent.device_id, kind);
    let jetstream = jetstream::new(nats.client().await);
    let (payload, signature) = first_message(&jetstream, &subject).await;
    Captured {
        orchestrator,
        agent,
        jetstream,
        subject,
        payload,
        signature,
        _nats: nats,
    }
}

/// A device's credential info with passwords, and its directory entry: what a forged or
/// replayed event could change.
async fn state_of(orchestrator: &TestOrchestrator, device_id: &DeviceId) -> (DeviceLocalCredentialInfo, Value) {
    let info = orchestrator.credentials(device_id).await.expect("the device is known");
    let devices: Value = orchestrator
        .get("/v1.0/devices", Some(crate::apps::OPERATOR_TOKEN))
        .await
        .json()
        .await
        .expect("json");
    let entry = devices["value"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|entry| entry["id"] == device_id.as_str())
        .cloned()
        .expect("listed");
    (info, entry)
}

/// A plausible backup event for `device_id`, with a high sequence so only its signature or its
/// device can make it wrong.
fn backup_for(orchestrator: &TestOrchestrator, device_id: &DeviceId, sequence: u64) -> Envelope {
    let rotation_id = RotationId::new();
    Envelope::new(
        device_id.clone(),
        sequence,
        Utc::now(),
        Event::PasswordBackedUp(PasswordBackedUp {
            rotation_id,
            device_name: DeviceName::parse("forged-host").expect("valid"),
            account_name: AccountName::parse("lapsadmin").expect("valid"),
            account_uid: Some(1001),
            sealed_password: seal(
                &orchestrator.escrow_public_key,
                b"attacker-chosen",
                &sealing_context(device_id, &rotation_id),
            ),
            escrow_public_key: None,
            recovery_sealed_password: None,
            expires_at: Utc::now() + chrono::Duration::days(30),
            reason: RotationReason::Manual,
        }),
    )
}

/// Publishes raw bytes with a signature header and a fresh `Nats-Msg-Id`, and waits for the ack.
async fn publish(jetstream: &jetstream::Context, subject: &str, payload: &[u8], signature: &str) {
    jetstream
        .send_publish(
            subject.to_owned(),
            PublishMessage::build()
                .payload(payload.to_vec().into())
                .message_id(EventId::new().to_string())
                .header(SIGNATURE_HEADER, signature),
        )
        .await
        .expect("sent")
        .await
        .expect("JetStream stores it");
}

/// The payload and signature header of the first message on `subject`.
async fn first_message(jetstream: &jetstream::Context, subject: &str) -> (Vec<u8>, String) {
    let stream = jetstream
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("events stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let message = messages.next().await.expect("a message").expect("a message");
    let signature = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(SIGNATURE_HEADER))
        .map(|value| value.to_string())
        .expect("the agent signs its events");
    (message.payload.to_vec(), signature)
}

/// The reasons and subjects of the quarantine, as an admin lists them.
pub(crate) async fn quarantine_reasons(orchestrator: &TestOrchestrator) -> Vec<(String, String)> {
    let response = orchestrator.get("/v1.0/fleetlaps/quarantine", Some(ADMIN_TOKEN)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let list: Value = response.json().await.expect("json");
    let text = list.to_string();
    assert!(
        !text.contains("attacker-chosen") && !text.contains("sealed_password"),
        "payload-free: {text}"
    );
    list["value"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|entry| {
            (
                entry["reason"].as_str().expect("reason").to_owned(),
                entry["subject"].as_str().expect("subject").to_owned(),
            )
        })
        .collect()
}
