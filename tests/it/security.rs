//! The orchestrator's security on real NATS: audit before disclose, rotate now with its throttle,
//! tokens made and revoked through the API (and `lapsctl`), surviving a rebuild of the projections.

use std::time::Duration;

use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent};
use fleetlaps_proto::subject;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::apps::{
    ADMIN_TOKEN, OPERATOR_TOKEN, READ_TOKEN, TestAgent, TestOrchestrator, publish_noise, stream_payloads,
};
use crate::harness::{TestNats, wait_until};

/// Every orchestrator event on the stream, oldest first.
async fn audit_events(nats: &TestNats) -> Vec<AuditEnvelope> {
    stream_payloads(nats, subject::AUDIT_WILDCARD)
        .await
        .iter()
        .map(|payload| AuditEnvelope::from_json(payload).expect("a valid audit envelope"))
        .collect()
}

#[tokio::test]
async fn a_password_read_is_in_the_history_before_the_answer_and_refused_with_503_when_nats_is_down() {
    // Arrange
    let mut nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let password = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    let path = format!(
        "/v1.0/directory/deviceLocalCredentials/{}?$select=credentials",
        agent.device_id
    );
    let reads_before = audit_events(&nats).await.len();

    // Act: a read with Graph's client headers and a reason.
    let response = orchestrator
        .http
        .get(format!("{}{path}", orchestrator.base_url))
        .bearer_auth(READ_TOKEN)
        .header("ocp-client-name", "Get-LapsAADPassword")
        .header("ocp-client-version", "10.0.26100")
        .header("x-fleetlaps-reason", "INC-1234")
        .send()
        .await
        .expect("answers");

    // Assert: the read is already on the stream when the answer is in hand.
    assert_eq!(response.status(), StatusCode::OK);
    let history = audit_events(&nats).await;
    assert_eq!(history.len(), reads_before + 1, "exactly one more event: this read");
    let AuditEvent::PasswordRead(read) = &history.last().expect("the read").event else {
        panic!("not a read: {:?}", history.last());
    };
    assert_eq!(read.principal, "investigator");
    assert_eq!(read.device_id, agent.device_id);
    assert_eq!(read.rotation_ids.len(), 1);
    assert_eq!(read.client_name.as_deref(), Some("Get-LapsAADPassword"));
    assert_eq!(read.client_version.as_deref(), Some("10.0.26100"));
    assert_eq!(read.reason.as_deref(), Some("INC-1234"));
    assert_eq!(read.source_address.as_deref(), Some("127.0.0.1"));

    // Act: NATS goes away.
    nats.stop();
    let refused = orchestrator.get(&path, Some(READ_TOKEN)).await;

    // Assert: 503, and no password in the body.
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = refused.text().await.expect("a body");
    assert!(!body.contains("passwordBase64"), "{body}");
    assert!(!body.contains(password.expose()), "{body}");
    let encoded = fleetlaps_proto::api::PasswordBase64::encode(password.expose());
    assert!(!body.contains(encoded.expose()), "{body}");
    // Metadata is not a disclosure: still served.
    let metadata = orchestrator
        .get(
            &format!("/v1.0/directory/deviceLocalCredentials/{}", agent.device_id),
            Some(READ_TOKEN),
        )
        .await;
    assert_eq!(metadata.status(), StatusCode::OK);
}

#[tokio::test]
async fn rotate_now_reaches_the_device_and_a_second_request_is_throttled_with_retry_after() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    let rotate = format!(
        "/v1.0/deviceManagement/managedDevices/{}/rotateLocalAdminPassword",
        agent.device_id
    );

    // Act
    let response = orchestrator
        .request(reqwest::Method::POST, &rotate, OPERATOR_TOKEN, None)
        .await;

    // Assert: accepted, recorded, and the device rotates.
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let command_id = response.headers()["x-fleetlaps-command-id"]
        .to_str()
        .expect("text")
        .to_owned();
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    assert_ne!(passwords[0].expose(), first.expose());
    let requested = audit_events(&nats)
        .await
        .into_iter()
        .find_map(|envelope| match envelope.event {
            AuditEvent::RotationRequested(body) => Some(body),
            _ => None,
        })
        .expect("the request is in the history");
    assert_eq!(
        (requested.principal.as_str(), requested.command_id.to_string()),
        ("operator", command_id)
    );

    // Act: again at once.
    let again = orchestrator
        .request(reqwest::Method::POST, &rotate, OPERATOR_TOKEN, None)
        .await;

    // Assert
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = again.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!((1..=300).contains(&retry_after), "Retry-After {retry_after}");
    // The same through lapsctl, by the device's name.
    let throttled = orchestrator
        .lapsctl(&[
            "--token",
            OPERATOR_TOKEN,
            "rotate",
            "--device",
            "device-1",
            "--reason",
            "again",
        ])
        .await;
    assert!(!throttled.status.success());
    let stderr = String::from_utf8_lossy(&throttled.stderr);
    assert!(stderr.contains("retry after") && stderr.contains("429"), "{stderr}");
    // A reader cannot rotate.
    let forbidden = orchestrator
        .request(reqwest::Method::POST, &rotate, READ_TOKEN, None)
        .await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn tokens_made_and_revoked_through_the_api_work_at_once_and_survive_a_rebuild_of_the_projections() {
    // Arrange
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;

    // Act: the bootstrap admin makes an auditor token.
    let (token, id) = orchestrator
        .create_token(ADMIN_TOKEN, json!({"name": "auditor", "scopes": ["Audit.Read.All"]}))
        .await;

    // Assert: it works at once, for its scope only.
    let audit = orchestrator
        .request(reqwest::Method::GET, "/v1.0/fleetlaps/auditEvents", &token, None)
        .await;
    assert_eq!(audit.status(), StatusCode::OK);
    let audit: Value = audit.json().await.expect("json");
    // The history starts with the escrow key's record; the token's creation follows it.
    let token_created = audit["value"]
        .as_array()
        .and_then(|entries| entries.iter().find(|entry| entry["kind"] == "token_created"))
        .expect("the token's creation is in the history");
    assert_eq!(token_created["body"]["created_by"], "bootstrap-admin");
    let devices = orchestrator
        .request(reqwest::Method::GET, "/v1.0/devices", &token, None)
        .await;
    assert_eq!(devices.status(), StatusCode::FORBIDDEN);
    let listed = orchestrator
        .lapsctl(&["--token", ADMIN_TOKEN, "token", "list", "-o", "json"])
        .await;
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("lapsctl -o json");
    assert_eq!(listed[0]["Name"], "auditor");
    assert_eq!(listed[0]["Scopes"], "Audit.Read.All");

    // Act: revoke it, then delete the projections and rebuild them from the stream.
    orchestrator.revoke_token(ADMIN_TOKEN, &id).await;
    let refused = orchestrator
        .request(reqwest::Method::GET, "/v1.0/fleetlaps/auditEvents", &token, None)
        .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    orchestrator.delete_projections().await;
    orchestrator.restart().await;

    // Assert: the rebuilt projections know the token and its revocation.
    let list = wait_until(
        "the rebuilt projections list the token",
        Duration::from_secs(30),
        || async {
            let list: Value = orchestrator
                .request(reqwest::Method::GET, "/v1.0/fleetlaps/tokens", ADMIN_TOKEN, None)
                .await
                .json()
                .await
                .ok()?;
            (list["value"][0]["revokedDateTime"].is_string()).then_some(list)
        },
    )
    .await;
    assert_eq!(list["value"][0]["id"], id.as_str());
    assert!(!list.to_string().contains(&token), "the token itself is never listed");
    let still_refused = orchestrator
        .request(reqwest::Method::GET, "/v1.0/fleetlaps/auditEvents", &token, None)
        .await;
    assert_eq!(still_refused.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_token_revoked_before_a_rebuild_is_refused_during_and_after_the_rebuild() {
    // Arrange: a token, twenty thousand messages, then its revocation: a rebuild folds the
    // token's creation long before its revocation.
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let (token, id) = orchestrator
        .create_token(ADMIN_TOKEN, json!({"name": "departed", "scopes": ["Audit.Read.All"]}))
        .await;
    publish_noise(&nats, 20_000).await;
    orchestrator.wait_until_folded(&nats).await;
    orchestrator.revoke_token(ADMIN_TOKEN, &id).await;
    orchestrator.delete_projections().await;

    // Act: start on the empty projections and use the revoked token while they are rebuilt.
    orchestrator
        .restart_without_waiting()
        .await
        .expect("orchestrator starts");
    let statuses = std::sync::Mutex::new(Vec::new());
    let settled = wait_until(
        "the rebuild ends and the token is refused as revoked",
        Duration::from_secs(120),
        || async {
            let status = orchestrator
                .request(reqwest::Method::GET, "/v1.0/fleetlaps/auditEvents?$top=1", &token, None)
                .await
                .status();
            statuses.lock().expect("not poisoned").push(status);
            (status == StatusCode::UNAUTHORIZED).then_some(status)
        },
    )
    .await;

    // Assert: never let in; refused with 503 while catching up, then as revoked.
    let statuses = statuses.into_inner().expect("not poisoned");
    assert_eq!(settled, StatusCode::UNAUTHORIZED);
    assert!(
        !statuses.contains(&StatusCode::OK),
        "the revoked token was let in during the rebuild: {statuses:?}"
    );
    assert!(
        statuses.contains(&StatusCode::SERVICE_UNAVAILABLE),
        "no request fell in the rebuild: {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|status| [StatusCode::SERVICE_UNAVAILABLE, StatusCode::UNAUTHORIZED].contains(status)),
        "{statuses:?}"
    );
    orchestrator.wait_until_healthy().await;
    assert_eq!(orchestrator.metric("fleetlaps_projections_caught_up").await, 1.0);
}

#[tokio::test]
async fn a_principal_with_admin_but_without_read_all_cannot_create_a_token_holding_it() {
    // Arrange: the bootstrap admin (Admin and Token.Grant) makes a deputy with Admin alone.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let (deputy_token, deputy_id) = orchestrator
        .create_token(ADMIN_TOKEN, json!({"name": "deputy", "scopes": ["Admin"]}))
        .await;

    // Act: the deputy asks for a token that reads passwords, through the API and lapsctl.
    let refused = orchestrator
        .request(
            reqwest::Method::POST,
            "/v1.0/fleetlaps/tokens",
            &deputy_token,
            Some(json!({"name": "escalation", "scopes": ["DeviceLocalCredential.Read.All"]})),
        )
        .await;
    let by_lapsctl = orchestrator
        .lapsctl(&[
            "--token",
            &deputy_token,
            "token",
            "create",
            "--name",
            "escalation",
            "--scope",
            "DeviceLocalCredential.Read.All",
        ])
        .await;

    // Assert: refused, naming the scope; a scope it holds it may give, and the history names
    // the deputy's token id beside its name.
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("DeviceLocalCredential.Read.All")),
        "{body}"
    );
    assert!(!by_lapsctl.status.success());
    let stderr = String::from_utf8_lossy(&by_lapsctl.stderr);
    assert!(stderr.contains("403") && stderr.contains("Token.Grant"), "{stderr}");
    let own = orchestrator
        .request(
            reqwest::Method::POST,
            "/v1.0/fleetlaps/tokens",
            &deputy_token,
            Some(json!({"name": "second-deputy", "scopes": ["Admin"]})),
        )
        .await;
    assert_eq!(own.status(), StatusCode::CREATED);
    let created: Vec<_> = audit_events(&nats)
        .await
        .into_iter()
        .filter_map(|envelope| match envelope.event {
            AuditEvent::TokenCreated(created) => Some(created),
            _ => None,
        })
        .collect();
    let names: Vec<&str> = created.iter().map(|created| created.name.as_str()).collect();
    assert_eq!(names, ["deputy", "second-deputy"], "nothing else was made");
    assert_eq!(created[1].created_by, "deputy");
    assert_eq!(created[1].created_by_token_id.map(|id| id.to_string()), Some(deputy_id));
}

#[tokio::test]
async fn the_bootstrap_admin_token_expires_when_told_and_is_refused_once_removed_from_the_config() {
    // Arrange: a bootstrap admin token that expires in an hour makes an operator token.
    let nats = TestNats::start();
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        &format!("bootstrap_admin_token_expires_at = \"{}\"", in_an_hour.to_rfc3339()),
    )
    .await;
    let ops = orchestrator
        .request(
            reqwest::Method::POST,
            "/v1.0/fleetlaps/tokens",
            ADMIN_TOKEN,
            Some(json!({"name": "ops", "scopes": ["Admin"]})),
        )
        .await;
    assert_eq!(ops.status(), StatusCode::CREATED);
    let ops: Value = ops.json().await.expect("json");
    let ops_token = ops["token"].as_str().expect("the token").to_owned();
    assert_eq!(
        orchestrator
            .request(reqwest::Method::GET, "/v1.0/fleetlaps/tokens", ADMIN_TOKEN, None)
            .await
            .status(),
        StatusCode::OK
    );

    // Act: its expiry passes (set in the past), then it is replaced in the config.
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    orchestrator.extra_config = format!("bootstrap_admin_token_expires_at = \"{}\"", an_hour_ago.to_rfc3339());
    orchestrator.restart().await;
    let expired = orchestrator
        .request(reqwest::Method::GET, "/v1.0/fleetlaps/tokens", ADMIN_TOKEN, None)
        .await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
    let expired: Value = expired.json().await.expect("json");
    assert!(
        expired["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("expired")),
        "{expired}"
    );
    let replacement = "a-replacement-bootstrap-admin-token";
    orchestrator.extra_config = format!("bootstrap_admin_token = \"{replacement}\"");
    orchestrator.restart().await;

    // Assert: the removed token is refused, its replacement works, and what it made still does.
    assert_eq!(
        orchestrator
            .request(reqwest::Method::GET, "/v1.0/fleetlaps/tokens", ADMIN_TOKEN, None)
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        orchestrator
            .request(reqwest::Method::GET, "/v1.0/fleetlaps/tokens", replacement, None)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        orchestrator
            .request(reqwest::Method::GET, "/v1.0/fleetlaps/tokens", &ops_token, None)
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn lapsctl_waits_while_a_starting_orchestrator_catches_up_instead_of_failing() {
    // Arrange: a history long enough that a rebuild takes a moment.
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    publish_noise(&nats, 20_000).await;
    orchestrator.delete_projections().await;
    orchestrator
        .restart_without_waiting()
        .await
        .expect("orchestrator starts");
    assert_eq!(
        orchestrator.get("/healthz", None).await.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "still catching up"
    );

    // Act
    let listed = orchestrator.lapsctl(&["--token", ADMIN_TOKEN, "token", "list"]).await;

    // Assert: answered once caught up, not refused.
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert_eq!(orchestrator.get("/healthz", None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn lapsctl_audit_lists_everything_one_principal_did_since_a_time() {
    // Arrange: the investigator reads a password before and after an instant; someone else
    // reads it after.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = crate::apps::TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let (other, _) = orchestrator
        .create_token(
            ADMIN_TOKEN,
            json!({"name": "other-reader", "scopes": ["DeviceLocalCredential.Read.All"]}),
        )
        .await;
    let read_path = format!(
        "/v1.0/directory/deviceLocalCredentials/{}?$select=credentials",
        agent.device_id
    );
    assert_eq!(
        orchestrator.get(&read_path, Some(READ_TOKEN)).await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        orchestrator.get(&read_path, Some(READ_TOKEN)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        orchestrator.get(&read_path, Some(&other)).await.status(),
        StatusCode::OK
    );

    let audit = |filters: Vec<String>| {
        let orchestrator = &orchestrator;
        async move {
            let mut args = vec!["--token", OPERATOR_TOKEN, "audit", "-o", "json"];
            args.extend(filters.iter().map(String::as_str));
            let listed = orchestrator.lapsctl(&args).await;
            assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
            serde_json::from_slice::<Value>(&listed.stdout).expect("lapsctl -o json")
        }
    };
    let since_args = vec!["--since".to_owned(), since.to_rfc3339()];
    wait_until(
        "both reads after the instant are in the history",
        Duration::from_secs(30),
        || async {
            let all = audit(since_args.clone()).await;
            (all.as_array().map(Vec::len) == Some(2)).then_some(())
        },
    )
    .await;

    // Act
    let mut args = since_args.clone();
    args.extend(["--principal".to_owned(), "investigator".to_owned()]);
    let listed = audit(args).await;

    // Assert: the investigator's one read after the instant, and nothing else.
    let entries = listed.as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["Kind"], "password_read", "{listed}");
    assert_eq!(entries[0]["Principal"], "investigator", "{listed}");
    let bad = orchestrator
        .get("/v1.0/fleetlaps/auditEvents?since=yesterday", Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}
