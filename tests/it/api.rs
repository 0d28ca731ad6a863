//! The Graph-compatible API's authorisation, against a real orchestrator with a real device, and its paging links.

use reqwest::StatusCode;

use crate::apps::{ADMIN_TOKEN, READ_BASIC_TOKEN, READ_TOKEN, TestAgent, TestOrchestrator, create_enrollment_token};
use crate::harness::TestNats;

#[tokio::test]
async fn scopes_decide_between_401_metadata_and_passwords() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let list = "/v1.0/directory/deviceLocalCredentials";
    let one = format!("/v1.0/directory/deviceLocalCredentials/{}", agent.device_id);
    let with_credentials = format!("{one}?$select=credentials");

    // No token, or a wrong one: 401 with Graph's error shape.
    for token in [None, Some("not-a-token")] {
        let response = orchestrator.get(&with_credentials, token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key("www-authenticate"));
        let body: serde_json::Value = response.json().await.expect("OData error");
        assert!(body["error"]["code"].is_string(), "{body}");
        assert_eq!(orchestrator.get(list, token).await.status(), StatusCode::UNAUTHORIZED);
    }

    // ReadBasic: metadata, but not the credentials.
    let response = orchestrator.get(&one, Some(READ_BASIC_TOKEN)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["deviceName"], "device-1");
    assert!(body.get("credentials").is_none());
    let response = orchestrator.get(&with_credentials, Some(READ_BASIC_TOKEN)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body = response.text().await.expect("text");
    assert!(body.contains("DeviceLocalCredential.Read.All"), "{body}");
    assert!(!body.contains("passwordBase64"));

    // Read.All: both.
    assert_eq!(orchestrator.get(list, Some(READ_TOKEN)).await.status(), StatusCode::OK);
    let response = orchestrator.get(&with_credentials, Some(READ_TOKEN)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(body["credentials"][0]["passwordBase64"].is_string(), "{body}");

    // Filtering by name finds the device; an unknown id is 404.
    let response = orchestrator
        .get(
            &format!("{list}?$filter=deviceName%20eq%20'device-1'"),
            Some(READ_BASIC_TOKEN),
        )
        .await;
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["value"][0]["id"], agent.device_id.as_str());
    assert_eq!(
        orchestrator
            .get(&format!("{list}/no-such-device"), Some(READ_TOKEN))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn next_links_are_absolute_on_the_origin_the_client_addressed() {
    // Arrange: two enrollment tokens, so that pages of one make two pages.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    for name in ["first", "second"] {
        create_enrollment_token(&orchestrator, serde_json::json!({ "name": name })).await;
    }
    let path = "/v1.0/fleetlaps/enrollmentTokens?$top=1";

    for origin in [
        orchestrator.base_url.clone(),
        orchestrator.base_url.replacen("127.0.0.1", "localhost", 1),
    ] {
        // Act
        let response = orchestrator
            .http
            .get(format!("{origin}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the API answers");

        // Assert: Graph's SDKs follow only absolute links, so the link names the origin asked.
        assert_eq!(response.status(), StatusCode::OK);
        let page: serde_json::Value = response.json().await.expect("json");
        let next = page["@odata.nextLink"].as_str().expect("a second page");
        assert!(
            next.starts_with(&format!("{origin}/v1.0/fleetlaps/enrollmentTokens?$top=1&$skiptoken=")),
            "{next}"
        );
        let second = orchestrator
            .http
            .get(next)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("the API answers");
        let second: serde_json::Value = second.json().await.expect("json");
        assert_eq!(second["value"].as_array().map(Vec::len), Some(1), "{second}");
        assert!(second.get("@odata.nextLink").is_none(), "{second}");
    }
}

#[tokio::test]
async fn next_links_start_at_the_public_url_when_one_is_configured() {
    // Arrange: behind a proxy, clients reach the API at another origin than this listener's.
    let nats = TestNats::start();
    let orchestrator =
        TestOrchestrator::spawn_with_http_config(&nats, "public_url = \"https://laps.example.org:8443/\"").await;
    for name in ["first", "second"] {
        create_enrollment_token(&orchestrator, serde_json::json!({ "name": name })).await;
    }

    // Act
    let page: serde_json::Value = orchestrator
        .get("/v1.0/fleetlaps/enrollmentTokens?$top=1", Some(ADMIN_TOKEN))
        .await
        .json()
        .await
        .expect("json");

    // Assert: the link is on the public origin, not on the address this request used.
    let next = page["@odata.nextLink"].as_str().expect("a second page");
    assert!(
        next.starts_with("https://laps.example.org:8443/v1.0/fleetlaps/enrollmentTokens?$top=1&$skiptoken="),
        "{next}"
    );
}
