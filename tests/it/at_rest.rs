//! No plaintext at rest or in the logs: after a whole run (backups, resets, a rotation asked
//! through the API, reads through the API and `lapsctl`), none of the generated passwords, in any
//! encoding the system uses, nor an API token made and used in the run, occurs in any file under
//! the orchestrator's data directory, the nats-server's store or log, the agent's directory (state
//! and simulated account database), or in the logs of the orchestrator and the agent (kept at
//! debug level by the harness).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fleetlaps_proto::api::PasswordBase64;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::password::Password;

use crate::apps::{ADMIN_TOKEN, AgentOptions, OPERATOR_TOKEN, READ_TOKEN, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, captured_logs};

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(kind) if kind.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files
}

/// The forms a password could take in a file or a log line: itself, JSON-escaped, and as Graph's
/// `passwordBase64`.
fn encodings(password: &Password) -> Vec<Vec<u8>> {
    let json = serde_json::to_string(password.expose()).expect("a string serialises");
    vec![
        password.expose().as_bytes().to_vec(),
        json.trim_matches('"').as_bytes().to_vec(),
        PasswordBase64::encode(password.expose()).expose().as_bytes().to_vec(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[tokio::test]
async fn no_generated_password_is_in_any_data_directory_or_log_after_a_whole_run() {
    // Arrange: a fleet of two, each rotating several times, by every path.
    let mut nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut passwords = BTreeSet::new();
    let mut agents = Vec::new();
    for index in 1..=2 {
        let options = AgentOptions {
            device_name: format!("rest-{index}"),
            settings: "reset_min_interval_secs = 0".to_owned(),
            ..AgentOptions::default()
        };
        let agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
        let mut count = 1;
        orchestrator.wait_for_passwords(&agent.device_id, count).await;
        for _ in 0..2 {
            let answer = agent.control(ControlRequest::Reset).await;
            assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
            count += 1;
            let seen = orchestrator.wait_for_passwords(&agent.device_id, count.min(3)).await;
            passwords.extend(seen.iter().map(|password| password.expose().to_owned()));
        }
        let rotate = orchestrator
            .http
            .post(format!(
                "{}/v1.0/deviceManagement/managedDevices/{}/rotateLocalAdminPassword",
                orchestrator.base_url, agent.device_id
            ))
            .bearer_auth(OPERATOR_TOKEN)
            .send()
            .await
            .expect("the API answers");
        assert_eq!(rotate.status(), reqwest::StatusCode::NO_CONTENT);
        crate::harness::wait_until(
            "the requested rotation is backed up",
            std::time::Duration::from_secs(30),
            || async {
                let newest = orchestrator.passwords(&agent.device_id).await;
                (!newest.is_empty() && !passwords.contains(newest[0].expose())).then_some(newest)
            },
        )
        .await
        .iter()
        .for_each(|password| {
            passwords.insert(password.expose().to_owned());
        });
        let shown = orchestrator
            .lapsctl(&[
                "--token",
                READ_TOKEN,
                "get-password",
                "--device",
                &format!("rest-{index}"),
                "--include-passwords",
                "--as-plain-text",
            ])
            .await;
        assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
        agents.push(agent);
    }
    assert!(
        passwords.len() >= 8,
        "every rotation made a password: {}",
        passwords.len()
    );
    // A token made through the API, and used: only its hash may be kept.
    let created: serde_json::Value = orchestrator
        .http
        .post(format!("{}/v1.0/fleetlaps/tokens", orchestrator.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"name": "reader", "scopes": ["DeviceLocalCredential.Read.All"]}))
        .send()
        .await
        .expect("the API answers")
        .json()
        .await
        .expect("the created token");
    let api_token = created["token"].as_str().expect("the token").to_owned();
    let read = orchestrator
        .get(
            &format!(
                "/v1.0/directory/deviceLocalCredentials/{}?$select=credentials",
                agents[0].device_id
            ),
            Some(&api_token),
        )
        .await;
    assert_eq!(read.status(), reqwest::StatusCode::OK);

    // Act: stop everything, so that what is at rest is on disk.
    let agent_dirs: Vec<PathBuf> = agents
        .iter()
        .map(|agent| agent.state_dir.parent().expect("the agent's directory").to_owned())
        .collect();
    for agent in &mut agents {
        agent.stop().await;
    }
    orchestrator.stop().await;
    nats.stop();

    // Assert
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    let mut scanned = 0;
    for dir in [orchestrator.data_dir.clone(), nats.store_dir().to_owned()]
        .into_iter()
        .chain(agent_dirs)
    {
        for file in files_under(&dir) {
            scanned += 1;
            places.push((file.display().to_string(), std::fs::read(&file).unwrap_or_default()));
        }
    }
    assert!(scanned > 10, "the data directories hold the run's files: {scanned}");
    places.push((
        "the nats-server log".to_owned(),
        std::fs::read(nats.log_path()).expect("the nats-server log"),
    ));
    let logs = captured_logs();
    assert!(
        logs.contains("passwords disclosed") && logs.contains("rotation requested"),
        "the logs of this run are captured"
    );
    places.push(("the logs".to_owned(), logs.into_bytes()));
    for (place, bytes) in &places {
        assert!(!contains(bytes, api_token.as_bytes()), "the API token is in {place}");
    }
    for password in &passwords {
        let password = Password::new(password.clone());
        for encoded in encodings(&password) {
            for (place, bytes) in &places {
                assert!(
                    !contains(bytes, &encoded),
                    "a generated password (or its encoding) is in {place}"
                );
            }
        }
    }
}
