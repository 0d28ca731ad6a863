//! Microsoft's own Graph SDK for Python (`msgraph-sdk`, from PyPI) reads the Graph-compatible API
//! as it reads Microsoft Graph: `msgraph/graph_client.py` points a `GraphServiceClient` at a real
//! orchestrator whose devices backed up real passwords, and this test checks what the SDK decoded
//! against the orchestrator and the devices' accounts.
//!
//! The SDK lives in a virtual environment that `cargo xtask test` makes
//! (`<target>/tools/msgraph-venv`); `MSGRAPH_PYTHON_FOR_TESTS` names another Python that has it.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use fleetlaps_proto::password::Password;
use serde_json::{Value, json};

use crate::apps::{ADMIN_TOKEN, AgentOptions, MANAGED_ACCOUNT, READ_BASIC_TOKEN, TestAgent, TestOrchestrator};
use crate::harness::TestNats;

#[tokio::test]
async fn microsofts_msgraph_sdk_lists_pages_and_reads_device_local_credentials_and_devices() {
    // Arrange: two devices that backed up a password (two, so that pages of one make two pages),
    // and a token holding what a Graph application reading LAPS passwords is granted.
    let python = msgraph_python();
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut devices = Vec::new();
    for device_name in ["device-1", "device-2"] {
        let options = AgentOptions {
            device_name: device_name.to_owned(),
            ..AgentOptions::default()
        };
        let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
        let newest = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
        agent.wait_until_has(&newest).await;
        devices.push((device_name, agent, newest));
    }
    devices.sort_by(|(_, left, _), (_, right, _)| left.device_id.as_str().cmp(right.device_id.as_str()));
    let (token, _) = orchestrator
        .create_token(
            ADMIN_TOKEN,
            json!({"name": "graph-app", "scopes": ["Device.Read.All", "DeviceLocalCredential.Read.All"]}),
        )
        .await;
    let expected: Vec<Value> = devices
        .iter()
        .map(|(device_name, agent, _)| {
            json!({"id": agent.device_id, "deviceName": device_name, "accountName": MANAGED_ACCOUNT})
        })
        .collect();

    // Act
    let output = tokio::process::Command::new(&python)
        .arg(script_path())
        .arg(&orchestrator.base_url)
        .arg(&orchestrator.tls_certificate)
        .env("MSGRAPH_TEST_TOKEN", &token)
        .env("MSGRAPH_TEST_READ_BASIC_TOKEN", READ_BASIC_TOKEN)
        .env("MSGRAPH_TEST_EXPECTED", json!({ "devices": expected }).to_string())
        .output()
        .await
        .unwrap_or_else(|err| panic!("running {}: {err}", python.display()));

    // Assert: the script found every value it expected ...
    assert!(
        output.status.success(),
        "graph_client.py failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // ... and what the SDK decoded is what the orchestrator holds. Its output holds passwords, so
    // a failure names the field, never the output.
    let sdk: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("graph_client.py printed no JSON object on stdout: {err}"));
    let ids: Vec<&str> = devices.iter().map(|(_, agent, _)| agent.device_id.as_str()).collect();
    let credentials = &sdk["deviceLocalCredentials"];
    assert_eq!(
        credentials["ids"],
        json!(ids),
        "deviceLocalCredentials lists the enrolled devices"
    );
    assert_eq!(
        credentials["pagedIds"],
        json!(ids),
        "the PageIterator goes through every device"
    );
    assert_eq!(credentials["pagesOfOne"], 2, "$top=1 makes a page per device");
    assert_eq!(
        credentials["filteredIds"],
        json!([ids[1]]),
        "$filter=deviceName eq … finds one"
    );
    let api_metadata = orchestrator.devices().await;
    for (device_name, agent, newest) in &devices {
        let id = agent.device_id.as_str();
        let metadata = api_metadata
            .iter()
            .find(|info| info.id == agent.device_id)
            .expect("the API lists the device");
        assert_eq!(credentials["metadata"][id]["deviceName"], *device_name);
        assert_same_instant(
            &credentials["metadata"][id]["lastBackupDateTime"],
            metadata.last_backup_date_time.expect("a backup"),
            "lastBackupDateTime",
        );
        assert_same_instant(
            &credentials["metadata"][id]["refreshDateTime"],
            metadata.refresh_date_time.expect("a refresh time"),
            "refreshDateTime",
        );

        let api_credentials = orchestrator
            .credentials(&agent.device_id)
            .await
            .expect("the device's credentials")
            .credentials
            .expect("credentials");
        let sdk_credentials = credentials["credentials"][id]
            .as_array()
            .expect("the SDK's credentials");
        assert_eq!(sdk_credentials.len(), api_credentials.len(), "credentials of {id}");
        for (sdk_credential, api_credential) in sdk_credentials.iter().zip(&api_credentials) {
            assert_eq!(sdk_credential["accountName"], api_credential.account_name);
            assert_eq!(sdk_credential["accountSid"], json!(api_credential.account_sid));
            assert_same_instant(
                &sdk_credential["backupDateTime"],
                api_credential.backup_date_time,
                "backupDateTime",
            );
        }
        let sdk_newest = Password::new(
            sdk_credentials[0]["password"]
                .as_str()
                .expect("the decoded password")
                .to_owned(),
        );
        assert!(
            sdk_newest.expose() == newest.expose(),
            "the SDK's decoded passwordBase64 of {id} is not the password the Rust client read"
        );
        assert!(
            agent.has_password(&sdk_newest),
            "the SDK's decoded passwordBase64 of {id} is not the device's account's password"
        );
    }

    let directory = &sdk["devices"];
    assert_eq!(
        directory["pagedIds"],
        json!(ids),
        "devices pages go through every device"
    );
    assert_eq!(directory["pagesOfOne"], 2, "$top=1 makes a page per device");
    let api_directory = orchestrator.directory().await;
    for (device_name, agent, _) in &devices {
        let id = agent.device_id.as_str();
        let entry = api_directory
            .iter()
            .find(|entry| entry["id"] == id)
            .expect("the API lists the device");
        let device = &directory["devices"][id];
        assert_eq!(device["displayName"], *device_name);
        assert_eq!(device["operatingSystem"], "Linux");
        assert!(
            device["isSilent"].is_boolean(),
            "isSilent reaches the SDK's additional data"
        );
        let signed_in = entry["approximateLastSignInDateTime"]
            .as_str()
            .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
            .expect("approximateLastSignInDateTime");
        assert_same_instant(
            &device["approximateLastSignInDateTime"],
            signed_in.with_timezone(&Utc),
            "approximateLastSignInDateTime",
        );
    }

    // The errors are the SDK's ODataError, with Graph's codes.
    let errors = &sdk["errors"];
    for (case, status, code) in [
        ("unknownCredentials", 404, "Request_ResourceNotFound"),
        ("unknownDevice", 404, "Request_ResourceNotFound"),
        ("credentialsWithReadBasic", 403, "Authorization_RequestDenied"),
        ("devicesWithReadBasic", 403, "Authorization_RequestDenied"),
        ("unknownToken", 401, "InvalidAuthenticationToken"),
    ] {
        assert_eq!(errors[case]["status"], status, "{case}: {}", errors[case]);
        assert_eq!(errors[case]["code"], code, "{case}: {}", errors[case]);
    }
    let message = |case: &str| errors[case]["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message("credentialsWithReadBasic").contains("DeviceLocalCredential.Read.All"),
        "{}",
        message("credentialsWithReadBasic")
    );
    assert!(
        message("devicesWithReadBasic").contains("Device.Read.All"),
        "{}",
        message("devicesWithReadBasic")
    );
}

/// Asserts that `sdk`, a date-time the SDK decoded (Python's ISO format, to the microsecond), is
/// `api`, the orchestrator's, to the microsecond.
fn assert_same_instant(sdk: &Value, api: DateTime<Utc>, field: &str) {
    let decoded = sdk
        .as_str()
        .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
        .unwrap_or_else(|| panic!("{field}: the SDK decoded no date-time: {sdk}"));
    assert_eq!(
        decoded.timestamp_micros(),
        api.timestamp_micros(),
        "{field}: the SDK decoded {sdk}, the orchestrator holds {api}"
    );
}

/// The script the test runs, beside this module.
fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("it/msgraph/graph_client.py")
}

/// A Python with msgraph-sdk: `MSGRAPH_PYTHON_FOR_TESTS`, else the one `cargo xtask test`
/// installs (the pins of `msgraph/requirements.txt` in `<target>/tools/msgraph-venv`).
fn msgraph_python() -> PathBuf {
    crate::harness::installed_tool(
        "MSGRAPH_PYTHON_FOR_TESTS",
        "msgraph-venv",
        "bin/python",
        "--requirement tests/it/msgraph/requirements.txt",
    )
}
