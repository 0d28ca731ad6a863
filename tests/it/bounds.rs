//! Bounded inputs: the quarantine keeps at most `quarantine.max_entries` messages and counts what
//! it drops; every collection pages with `$top`, `$skiptoken` and `@odata.nextLink`.

use std::time::Duration;

use async_nats::jetstream;
use reqwest::StatusCode;
use serde_json::Value;

use crate::apps::{ADMIN_TOKEN, TestOrchestrator};
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
        next = page["@odata.nextLink"].as_str().map(str::to_owned);
        pages.push(page);
    }
    pages
}

#[tokio::test]
async fn a_full_quarantine_keeps_the_newest_entries_counts_the_dropped_ones_and_pages() {
    // Arrange: a quarantine that keeps 3 entries.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(&nats, "quarantine = { max_entries = 3 }").await;
    let jetstream = jetstream::new(nats.client().await);

    // Act: 7 malformed messages.
    for index in 0..7 {
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
    wait_until("all 7 are quarantined", Duration::from_secs(30), || async {
        (orchestrator
            .metric("fleetlaps_events_quarantined_total{reason=\"malformed\"}")
            .await
            == 7.0)
            .then_some(())
    })
    .await;

    // Assert: the newest 3 are listed, the 4 older ones counted as dropped.
    let response = orchestrator.get("/v1.0/fleetlaps/quarantine", Some(ADMIN_TOKEN)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let whole: Value = response.json().await.expect("json");
    let listed = whole["value"].as_array().expect("a list").clone();
    assert_eq!(listed.len(), 3, "{whole}");
    assert_eq!(whole["@fleetlaps.droppedCount"], 4, "{whole}");
    assert_eq!(whole["@fleetlaps.maxEntries"], 3, "{whole}");
    assert_eq!(whole["@fleetlaps.droppedCountByReason"]["malformed"], 4, "{whole}");
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
        4.0
    );
    assert_eq!(orchestrator.metric("fleetlaps_quarantine_entries").await, 3.0);

    // Pages of one follow their next links to the end and hold the same entries.
    let pages = all_pages(&orchestrator, "/v1.0/fleetlaps/quarantine?$top=1", ADMIN_TOKEN).await;
    assert_eq!(pages.len(), 3, "{pages:?}");
    let paged: Vec<Value> = pages
        .iter()
        .flat_map(|page| page["value"].as_array().expect("a list").clone())
        .collect();
    assert_eq!(paged, listed);
    let too_big = orchestrator
        .get("/v1.0/fleetlaps/quarantine?$top=1001", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(too_big.status(), StatusCode::BAD_REQUEST);

    // lapsctl lists them and says how many were dropped.
    let json = orchestrator
        .lapsctl(&["--token", ADMIN_TOKEN, "quarantine", "-o", "json"])
        .await;
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let entries: Value = serde_json::from_slice(&json.stdout).expect("lapsctl -o json");
    assert_eq!(entries.as_array().map(Vec::len), Some(3), "{entries}");
    let table = orchestrator.lapsctl(&["--token", ADMIN_TOKEN, "quarantine"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("4 older entries were dropped: the quarantine keeps the newest 3"),
        "{table}"
    );
}
