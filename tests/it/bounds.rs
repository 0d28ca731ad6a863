//! Bounded inputs: the quarantine keeps at most `quarantine.max_entries` messages and counts what
//! it drops; every collection pages with `$top`, `$skiptoken` and `@odata.nextLink`; a flood of
//! failed authentications on a device becomes a bounded number of events; and the agent's outbox
//! stays within `outbox_limit` whatever it reports, while a backup still finds room.

use std::time::Duration;

use async_nats::jetstream;
use fleetlaps_proto::control::{AuthenticationReport, ControlRequest, ControlResponse};
use fleetlaps_proto::event::{AuthenticationOutcome, Event, EventKind};
use reqwest::StatusCode;
use serde_json::Value;

use crate::apps::{
    ADMIN_TOKEN, AgentOptions, MANAGED_ACCOUNT, OPERATOR_TOKEN, TestAgent, TestOrchestrator, device_events, enroll,
};
use crate::harness::{TestNats, wait_until};

/// Every page of the collection at `path`, followed through `@odata.nextLink`, as `token`.
async fn all_pages(orchestrator: &TestOrchestrator, path: &str, token: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut next = Some(path.to_owned());
    while let Some(link) = next {
        assert!(pages.len() < 100, "still paging after 100 pages");
        let response = orchestrator.get(&link, Some(token)).await;
        assert_eq!(response.status(), StatusCode::OK, "{link}");
        let page: Value = response.json().await.expect("a JSON collection");
        next = page["@odata.nextLink"]
            .as_str()
            .map(|link| orchestrator.next_path(link));
        pages.push(page);
    }
    pages
}

#[tokio::test]
async fn a_full_quarantine_keeps_the_newest_entries_counts_the_dropped_ones_and_pages() {
    // Arrange: a quarantine that keeps 101 entries: more than lapsctl's first page of 100.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(&nats, "quarantine = { max_entries = 101 }").await;
    let jetstream = jetstream::new(nats.client().await);

    // Act: 103 malformed messages.
    for index in 0..103 {
        jetstream
            .publish(
                "laps.events.intruder.password_backed_up",
                format!("not json {index}").into_bytes().into(),
            )
            .await
            .expect("published")
            .await
            .expect("acked");
    }
    wait_until("all 103 are quarantined", Duration::from_secs(30), || async {
        (orchestrator
            .metric("fleetlaps_events_quarantined_total{reason=\"malformed\"}")
            .await
            == 103.0)
            .then_some(())
    })
    .await;

    // Assert: the newest 101 are listed, the 2 older ones counted as dropped.
    let response = orchestrator
        .get("/v1.0/fleetlaps/quarantine?$top=1000", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let whole: Value = response.json().await.expect("json");
    let listed = whole["value"].as_array().expect("a list").clone();
    assert_eq!(listed.len(), 101, "{whole}");
    assert_eq!(whole["@fleetlaps.droppedCount"], 2, "{whole}");
    assert_eq!(whole["@fleetlaps.maxEntries"], 101, "{whole}");
    assert_eq!(whole["@fleetlaps.droppedCountByReason"]["malformed"], 2, "{whole}");
    assert!(whole.get("@odata.nextLink").is_none(), "one page: {whole}");
    let sequences: Vec<u64> = listed
        .iter()
        .map(|entry| entry["streamSequence"].as_u64().expect("a sequence"))
        .collect();
    assert!(
        sequences.windows(2).all(|pair| pair[0] < pair[1]),
        "oldest first: {sequences:?}"
    );
    assert_eq!(
        orchestrator
            .metric("fleetlaps_quarantine_dropped_total{reason=\"malformed\"}")
            .await,
        2.0
    );
    assert_eq!(orchestrator.metric("fleetlaps_quarantine_entries").await, 101.0);

    // Pages of 40 follow their next links to the end and hold the same entries.
    let pages = all_pages(&orchestrator, "/v1.0/fleetlaps/quarantine?$top=40", ADMIN_TOKEN).await;
    assert_eq!(pages.len(), 3, "40 + 40 + 21");
    let paged: Vec<Value> = pages
        .iter()
        .flat_map(|page| page["value"].as_array().expect("a list").clone())
        .collect();
    assert_eq!(paged, listed);
    let too_big = orchestrator
        .get("/v1.0/fleetlaps/quarantine?$top=1001", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(too_big.status(), StatusCode::BAD_REQUEST);

    // lapsctl lists them all, following the next link after its first page of 100, and says
    // how many were dropped.
    let json = orchestrator
        .lapsctl(&["--token", ADMIN_TOKEN, "quarantine", "-o", "json"])
        .await;
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let entries: Value = serde_json::from_slice(&json.stdout).expect("lapsctl -o json");
    assert_eq!(entries.as_array().map(Vec::len), Some(101));
    let table = orchestrator.lapsctl(&["--token", ADMIN_TOKEN, "quarantine"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("2 older entries were dropped: the quarantine keeps the newest 101"),
        "{table}"
    );
}

#[tokio::test]
async fn the_device_directory_and_the_audit_history_page_through_next_links() {
    // Arrange: three enrolled devices (and so several audit entries).
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let state_dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    for (index, state_dir) in state_dirs.iter().enumerate() {
        enroll(&orchestrator, state_dir.path(), &format!("host-{index}")).await;
    }
    let whole_directory = wait_until("three devices are listed", Duration::from_secs(30), || async {
        let response = orchestrator.get("/v1.0/devices", Some(OPERATOR_TOKEN)).await;
        let page: Value = response.json().await.ok()?;
        let devices = page["value"].as_array()?.clone();
        (devices.len() == 3).then_some(devices)
    })
    .await;

    // Act and assert: pages of one device, then of two, hold the same devices in the same order.
    for top in [1, 2] {
        let pages = all_pages(&orchestrator, &format!("/v1.0/devices?$top={top}"), OPERATOR_TOKEN).await;
        assert_eq!(pages.len(), 3_usize.div_ceil(top), "$top={top}");
        let paged: Vec<Value> = pages
            .iter()
            .flat_map(|page| page["value"].as_array().expect("a list").clone())
            .collect();
        assert_eq!(paged, whole_directory, "$top={top}");
    }
    let filtered = orchestrator
        .get("/v1.0/devices?$filter=displayName%20eq%20'x'", Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(
        filtered.status(),
        StatusCode::BAD_REQUEST,
        "an option it does not support"
    );

    // The audit history: every entry once, in order, one at a time, and by kind two at a time.
    let response = orchestrator
        .get("/v1.0/fleetlaps/auditEvents?$top=1000", Some(OPERATOR_TOKEN))
        .await;
    let whole: Value = response.json().await.expect("json");
    let history = whole["value"].as_array().expect("a list").clone();
    assert!(history.len() >= 8, "three tokens, three enrollments, two keys: {whole}");
    let pages = all_pages(&orchestrator, "/v1.0/fleetlaps/auditEvents?$top=1", OPERATOR_TOKEN).await;
    assert_eq!(pages.len(), history.len());
    let paged: Vec<Value> = pages
        .iter()
        .flat_map(|page| page["value"].as_array().expect("a list").clone())
        .collect();
    assert_eq!(paged, history);
    let enrolled = all_pages(
        &orchestrator,
        "/v1.0/fleetlaps/auditEvents?kind=device_enrolled&$top=2",
        OPERATOR_TOKEN,
    )
    .await;
    assert_eq!(enrolled.len(), 2, "2 + 1");
    let kinds: Vec<&str> = enrolled
        .iter()
        .flat_map(|page| page["value"].as_array().expect("a list"))
        .map(|entry| entry["kind"].as_str().expect("a kind"))
        .collect();
    assert_eq!(kinds, ["device_enrolled"; 3]);
}

/// A failed authentication as the managed account, as the PAM hook reports it.
fn failed_login() -> ControlRequest {
    ControlRequest::Authentication(AuthenticationReport {
        user: MANAGED_ACCOUNT.to_owned(),
        service: "sshd".to_owned(),
        remote_host: Some("203.0.113.9".to_owned()),
        tty: None,
        outcome: AuthenticationOutcome::Failure,
    })
}

/// The counts of the device's failed-authentication events on the stream.
async fn failure_counts(nats: &TestNats, agent: &TestAgent) -> Vec<u64> {
    device_events(nats, &agent.device_id, EventKind::AuthenticationFailed)
        .await
        .iter()
        .map(|envelope| match &envelope.event {
            Event::AuthenticationFailed(observed) => observed.count,
            other => panic!("not a failed authentication: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn ten_thousand_failed_logins_become_a_few_events_whose_counts_add_up() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;

    // Act: 10,000 failures through the control socket the PAM hook reports on, then the minute
    // of the failure window passes.
    for _ in 0..10_000 {
        match agent.control(failed_login()).await {
            ControlResponse::Done { .. } => {}
            other => panic!("the agent answered {other:?}"),
        }
    }
    agent.clock.advance(chrono::Duration::minutes(2));
    let _wake = agent.control(ControlRequest::Status).await;

    // Assert: a few events, whose counts add up to every failure.
    let counts = wait_until("every failure is reported", Duration::from_secs(60), || async {
        let counts = failure_counts(&nats, &agent).await;
        (counts.iter().sum::<u64>() == 10_000).then_some(counts)
    })
    .await;
    assert_eq!(counts[0], 1, "the first failure is reported at once: {counts:?}");
    assert!(
        counts.len() <= 4,
        "at most two events per window of a minute: {counts:?}"
    );
    assert_eq!(
        agent.status().await.outbox_pending,
        0,
        "everything reported was published"
    );
}

#[tokio::test]
async fn with_nats_away_reports_stay_within_the_outbox_bound_and_a_backup_still_finds_room() {
    // Arrange: an outbox of 5 places, settled, then NATS goes away.
    let mut nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let options = AgentOptions {
        settings: "outbox_limit = 5\nbackup_confirmation_wait_secs = 1".to_owned(),
        ..AgentOptions::default()
    };
    let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_settled_with(&first).await;
    nats.stop();

    // Act: more successful logins (each reported by an event) than the outbox has places for
    // reports, then a rotation.
    for _ in 0..5 {
        let login = ControlRequest::Authentication(AuthenticationReport {
            outcome: AuthenticationOutcome::Success,
            ..match failed_login() {
                ControlRequest::Authentication(report) => report,
                _ => unreachable!("failed_login is an authentication"),
            }
        });
        match agent.control(login).await {
            ControlResponse::Done { .. } => {}
            other => panic!("the agent answered {other:?}"),
        }
    }
    let reports = agent.status().await;
    let _answer = agent.control(ControlRequest::Reset).await;

    // Assert: the reports took the 3 places not kept for a backup and its commit, the others
    // were counted as dropped, and the rotation's backup is queued all the same.
    assert_eq!((reports.outbox_pending, reports.outbox_dropped), (3, 2), "{reports:?}");
    let status = agent.status().await;
    assert!(status.pending_rotation.is_some(), "the rotation began: {status:?}");
    assert_eq!(
        status.outbox_pending, 4,
        "its backup waits with the reports: {status:?}"
    );
    assert!(
        agent.has_password(&first),
        "the account waits for the backup's confirmation"
    );

    // NATS back: the rotation completes and the outbox drains.
    nats.restart();
    let second = orchestrator
        .wait_for_new_password_within(&agent.device_id, &[&first], Duration::from_secs(120))
        .await;
    agent.wait_until_settled_with(&second).await;
    let kept = device_events(&nats, &agent.device_id, EventKind::AuthenticationSucceeded).await;
    assert_eq!(kept.len(), 3, "the reports that were kept reached the stream");
}
