//! The Graph-compatible API's authorisation, against a real orchestrator with a real device.

use reqwest::StatusCode;

use crate::apps::{READ_BASIC_TOKEN, READ_TOKEN, TestAgent, TestOrchestrator};
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
