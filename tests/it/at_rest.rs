//! No plaintext at rest or in the logs: after a whole run (backups, resets, a rotation asked
//! through the API, reads through the API and `lapsctl`, a real Linux account reset after a PAM
//! login and by the agent run as a binary), none of the generated passwords, in any
//! encoding the system uses, nor an API token made and used in the run, occurs in any file under
//! the orchestrator's data directory, the nats-server's store or log, the agent's directory (state
//! and simulated account database, and the log of its runs as a binary), or in the logs of the
//! orchestrator and the agent (kept at debug level by the harness). A file that cannot be read
//! fails the scan.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fleetlaps_proto::api::PasswordBase64;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::password::Password;

use crate::apps::{ADMIN_TOKEN, AgentOptions, OPERATOR_TOKEN, READ_TOKEN, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, captured_logs, wait_until};
use crate::linux::LinuxUser;
use crate::post_authentication::{PamService, hook_command};

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("scanning {}: {err}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|err| panic!("scanning {}: {err}", dir.display()));
            let path = entry.path();
            let kind = entry
                .file_type()
                .unwrap_or_else(|err| panic!("scanning {}: {err}", path.display()));
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                files.push(path);
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
    // A real Linux account: logged in to through PAM (a post-authentication reset), then reset
    // by the agent run as a binary, whose log is kept beside its state.
    let user = LinuxUser::create().await;
    let options = AgentOptions {
        device_name: "rest-linux".to_owned(),
        linux_account: Some(user.name.clone()),
        settings: "reset_min_interval_secs = 0".to_owned(),
        policy: "PostAuthenticationResetDelay = 1\nPostAuthenticationActions = 1".to_owned(),
        ..AgentOptions::default()
    };
    let mut linux_agent = TestAgent::spawn_with(&nats, &orchestrator, options).await;
    let first = orchestrator
        .wait_for_passwords(&linux_agent.device_id, 1)
        .await
        .remove(0);
    user.wait_until_holds(&first).await;
    let pam = PamService::install(&hook_command(&linux_agent.config_path));
    assert!(
        pam.authenticates(&user.name, &first).await,
        "PAM accepts the backed-up password"
    );
    wait_until("the authentication schedules a reset", TIMEOUT, || async {
        linux_agent.status().await.post_authentication_reset_at.map(|_| ())
    })
    .await;
    linux_agent.clock.advance(chrono::Duration::hours(2));
    let _cycle = linux_agent.control(ControlRequest::ProcessNow).await;
    let after_login = orchestrator
        .wait_for_new_password(&linux_agent.device_id, &[&first])
        .await;
    user.wait_until_holds(&after_login).await;
    let mut binary = linux_agent.run_binary(None).await;
    wait_until("the agent binary answers", TIMEOUT, || async {
        fleetlaps_agent::control::send(&linux_agent.state_dir, &ControlRequest::Status)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let answer = linux_agent.control(ControlRequest::Reset).await;
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    let from_binary = orchestrator
        .wait_for_new_password(&linux_agent.device_id, &[&first, &after_login])
        .await;
    user.wait_until_holds(&from_binary).await;
    binary.kill().await.expect("stopping the agent binary");
    drop(pam);
    passwords.extend(
        [first, after_login, from_binary]
            .iter()
            .map(|password| password.expose().to_owned()),
    );
    agents.push(linux_agent);

    assert!(
        passwords.len() >= 11,
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
            let bytes = std::fs::read(&file).unwrap_or_else(|err| panic!("scanning {}: {err}", file.display()));
            places.push((file.display().to_string(), bytes));
        }
    }
    assert!(scanned > 10, "the data directories hold the run's files: {scanned}");
    let binary_log = std::fs::read_to_string(agents[2].binary_log_path()).expect("the agent binary's log");
    assert!(
        binary_log.contains("DEBUG"),
        "the agent binary logged at debug level: {binary_log}"
    );
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
