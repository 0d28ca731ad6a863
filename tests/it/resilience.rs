//! What happens when parts fail: NATS goes away, the orchestrator restarts or loses its projections,
//! garbage lands on the stream.

use std::time::Duration;

use async_nats::jetstream;
use fleetlaps_orchestrator::projection::Projections;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};

use crate::apps::{ADMIN_TOKEN, AgentOptions, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, wait_until};

#[tokio::test]
async fn with_nats_down_the_account_keeps_its_password_until_nats_is_back() {
    let mut nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let before = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_settled_with(&before).await;

    nats.stop();
    let answer = agent.control(ControlRequest::Reset).await;
    assert!(
        matches!(&answer, ControlResponse::Refused { message } if message.contains("backup not stored")),
        "{answer:?}"
    );
    assert!(
        agent.has_password(&before),
        "no backup, no change: the account keeps its password"
    );

    nats.restart();
    // The agent retries the same backup on its own once NATS is back, then applies it. A safety
    // net only: on a loaded machine the consumer's retry pauses after the outage add up.
    let passwords = wait_until("the retried backup is stored", Duration::from_secs(120), || async {
        let passwords = orchestrator.passwords(&agent.device_id).await;
        (passwords.len() >= 2).then_some(passwords)
    })
    .await;
    wait_until("the account has the new password", Duration::from_secs(30), || async {
        agent.has_password(&passwords[0]).then_some(())
    })
    .await;
    assert_eq!(passwords[1].expose(), before.expose());
}

#[tokio::test]
async fn a_pull_left_unanswered_by_a_stopped_nats_server_does_not_stall_the_consumer() {
    let mut nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let token = |name: &str| serde_json::json!({"name": name, "scopes": [fleetlaps_proto::api::SCOPE_READ_BASIC]});

    // NATS stops the moment a write is folded: as the consumer asks for what waits next, so the
    // server goes away holding that request unanswered. The outage outlasts a pull's wait.
    orchestrator.create_token(ADMIN_TOKEN, token("before-the-outage")).await;
    nats.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    nats.restart();

    // A token created now must be folded: the API answers 201 only once it is visible.
    // Each attempt is a new token: one the API answered 503 for was recorded all the same.
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let created = wait_until(
        "a token created after the outage is folded",
        Duration::from_secs(90),
        || async {
            let attempt = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body = token(&format!("after-the-outage-{attempt}"));
            let response = orchestrator
                .request(reqwest::Method::POST, "/v1.0/fleetlaps/tokens", ADMIN_TOKEN, Some(body))
                .await;
            (response.status() == reqwest::StatusCode::CREATED).then_some(response)
        },
    )
    .await;
    let created: serde_json::Value = created.json().await.expect("json");
    let token = created["token"].as_str().expect("the token");
    let listed = orchestrator
        .get("/v1.0/directory/deviceLocalCredentials", Some(token))
        .await;
    assert_eq!(listed.status(), reqwest::StatusCode::OK, "the new token works");
}

#[tokio::test]
async fn restarting_the_orchestrator_duplicates_nothing_and_a_deleted_projection_is_rebuilt_the_same() {
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut agents = Vec::new();
    for index in 1..=3 {
        let options = AgentOptions {
            device_name: format!("device-{index}"),
            ..AgentOptions::default()
        };
        agents.push(TestAgent::spawn_with(&nats, &orchestrator, options).await);
    }
    for agent in &agents {
        orchestrator.wait_for_passwords(&agent.device_id, 1).await;
        agent.control(ControlRequest::Reset).await;
        orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    }
    let devices_before = orchestrator.devices().await;
    // Every password read above is an audit event on the stream: wait until all are folded in.
    wait_for_the_whole_stream(&nats, &orchestrator).await;
    orchestrator.stop().await;
    let projections_dir = orchestrator.data_dir.join("projections");
    let digest_before = digest(&projections_dir);

    // Restart on the same sled directory: the same state, nothing applied twice.
    orchestrator.restart().await;
    assert_eq!(orchestrator.devices().await, devices_before);
    orchestrator.stop().await;
    assert_eq!(digest(&projections_dir), digest_before, "a restart changes nothing");

    // Delete the projections and restart: replaying the stream rebuilds the same state.
    std::fs::remove_dir_all(&projections_dir).expect("deleting the projections");
    orchestrator.restart().await;
    wait_until("the projections are rebuilt", Duration::from_secs(30), || async {
        (orchestrator.devices().await == devices_before).then_some(())
    })
    .await;
    wait_for_the_whole_stream(&nats, &orchestrator).await;
    orchestrator.stop().await;
    assert_eq!(
        digest(&projections_dir),
        digest_before,
        "the rebuilt projections equal the originals"
    );
}

#[tokio::test]
async fn malformed_events_are_counted_quarantined_acked_and_do_not_stop_the_consumer() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let client = nats.client().await;
    let jetstream = jetstream::new(client);
    for payload in [&b"not json at all"[..], br#"{"schema":1,"password":"hunter2"}"#] {
        jetstream
            .publish("laps.events.intruder.password_backed_up", payload.to_vec().into())
            .await
            .expect("published")
            .await
            .expect("acked");
    }
    wait_until("both are counted as malformed", Duration::from_secs(30), || async {
        (orchestrator
            .metric("fleetlaps_events_quarantined_total{reason=\"malformed\"}")
            .await
            == 2.0)
            .then_some(())
    })
    .await;

    // The consumer goes on: a real device's events still arrive.
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    // Acked: the durable consumer has nothing pending.
    wait_until("every message is acknowledged", Duration::from_secs(30), || async {
        let stream = jetstream.get_stream("LAPS_EVENTS").await.ok()?;
        let mut consumer = stream
            .get_consumer::<jetstream::consumer::pull::Config>("orchestrator")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await;
}

/// The digest of the projections in `dir`, opened after the orchestrator released them.
fn digest(dir: &std::path::Path) -> String {
    Projections::open(dir)
        .expect("projections open")
        .digest()
        .expect("digest")
}

/// Waits until the orchestrator has folded in every message of the events stream.
async fn wait_for_the_whole_stream(nats: &TestNats, orchestrator: &TestOrchestrator) {
    let jetstream = jetstream::new(nats.client().await);
    let mut stream = jetstream
        .get_stream(fleetlaps_proto::subject::EVENTS_STREAM)
        .await
        .expect("the events stream");
    let last = stream.info().await.expect("stream info").state.last_sequence;
    wait_until(
        "the orchestrator folds in the whole stream",
        Duration::from_secs(30),
        || async { (orchestrator.metric("fleetlaps_projection_last_sequence").await >= last as f64).then_some(()) },
    )
    .await;
}

/// A tmpfs mounted for one test (the test runs as root, like the Linux account tests); unmounted
/// when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-small-disk-")
            .tempdir()
            .expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        Self { dir }
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("creating the filler");
        let chunk = vec![0_u8; 1 << 20];
        loop {
            if let Err(err) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
                assert_eq!(err.raw_os_error(), Some(28), "the disk is full (ENOSPC): {err}");
                return path;
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_leaves_the_api_up_and_reported_unhealthy_and_a_restart_with_room_catches_up() {
    // Arrange: the data directory on a small disk, and an orchestrator serving from it.
    let nats = TestNats::start();
    let disk = SmallDisk::mount("64m");
    let data_dir = disk.dir.path().join("data");
    let mut orchestrator = TestOrchestrator::spawn_in(&nats, &data_dir).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    // Act: fill the disk, then give the consumer something to write.
    let filler = disk.fill();
    let jetstream = jetstream::new(nats.client().await);
    let mut last = 0;
    for n in 0..500 {
        last = jetstream
            .publish(format!("laps.events.disk-{n}.noise"), vec![b'x'; 2048].into())
            .await
            .expect("published")
            .await
            .expect("stored")
            .sequence;
    }

    // Assert: reported unhealthy, with the cause, while the API still serves what it holds.
    let health = wait_until(
        "/healthz reports the failing consumer",
        Duration::from_secs(60),
        || async {
            let response = orchestrator.get("/healthz", None).await;
            let body: serde_json::Value = response.json().await.ok()?;
            (body["status"] == "unhealthy").then_some(body)
        },
    )
    .await;
    let error = health["projections"]["consumerError"].as_str().unwrap_or_default();
    assert!(error.contains("No space left on device"), "{health}");
    assert_eq!(orchestrator.metric("fleetlaps_consumer_healthy").await, 0.0);
    assert_eq!(
        orchestrator.passwords(&agent.device_id).await.len(),
        1,
        "a password is still read"
    );

    // Act: make room, and restart (sled keeps its first write error until it is reopened).
    std::fs::remove_file(filler).expect("removing the filler");
    orchestrator.restart().await;

    // Assert: healthy, and everything published is folded.
    assert_eq!(orchestrator.metric("fleetlaps_consumer_healthy").await, 1.0);
    wait_until("the projections fold what waited", Duration::from_secs(60), || async {
        (orchestrator.metric("fleetlaps_projection_last_sequence").await >= last as f64).then_some(())
    })
    .await;
}
