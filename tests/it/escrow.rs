//! The escrow key's life: recorded in the history, so a lost key file stops the orchestrator
//! instead of being silently replaced; rotated with old backups still opening; and recovered with
//! the offline recovery key when it is lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetlaps_proto::command::CurrentPasswordVersion;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::{Event, EventKind};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::password::Password;
use fleetlaps_proto::seal::EscrowPublicKey;

use crate::apps::{AgentOptions, READ_TOKEN, TestAgent, TestOrchestrator, device_events, run};
use crate::harness::{TestNats, wait_until};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Settings that keep waits short.
fn quick(device_name: &str) -> AgentOptions {
    AgentOptions {
        device_name: device_name.to_owned(),
        settings: "reset_min_interval_secs = 0\nbackup_confirmation_wait_secs = 2".to_owned(),
        ..AgentOptions::default()
    }
}

fn key_file(orchestrator: &TestOrchestrator) -> PathBuf {
    orchestrator.data_dir.join("escrow.key")
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// Starts an agent and waits until its first password is backed up and on its account.
async fn agent_with_password(
    nats: &TestNats,
    orchestrator: &TestOrchestrator,
    device_name: &str,
) -> (TestAgent, Password) {
    let agent = TestAgent::spawn_with(nats, orchestrator, quick(device_name)).await;
    let password = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    agent.wait_until_has(&password).await;
    (agent, password)
}

/// The device's password version as the centre published it last.
async fn password_version(nats: &TestNats, device_id: &DeviceId) -> Option<CurrentPasswordVersion> {
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let stream = jetstream
        .get_stream(fleetlaps_proto::subject::PASSWORD_VERSIONS_STREAM)
        .await
        .ok()?;
    let message = stream
        .direct_get_last_for_subject(fleetlaps_proto::subject::device_password_version(device_id))
        .await
        .ok()?;
    serde_json::from_slice(&message.payload).ok()
}

/// The escrow key the device's newest backup event names.
async fn newest_backup_key(nats: &TestNats, device_id: &DeviceId) -> Option<EscrowPublicKey> {
    let backups = device_events(nats, device_id, EventKind::PasswordBackedUp).await;
    match &backups.last()?.event {
        Event::PasswordBackedUp(body) => body.escrow_public_key,
        _ => None,
    }
}

/// The device's newest password once the API can open it (after a restart the projections are
/// rebuilt by replay, and a credential opens once its resealed box is folded in).
async fn newest_openable_password(orchestrator: &TestOrchestrator, device_id: &DeviceId) -> Password {
    let path = format!("/v1.0/directory/deviceLocalCredentials/{device_id}?$select=credentials");
    wait_until(
        &format!("the API returns an openable password of {device_id}"),
        TIMEOUT,
        || async {
            let response = orchestrator.get(&path, Some(READ_TOKEN)).await;
            if response.status() != reqwest::StatusCode::OK {
                return None;
            }
            let info: fleetlaps_proto::api::DeviceLocalCredentialInfo = response.json().await.ok()?;
            info.credentials?
                .first()
                .map(|credential| credential.password_base64.decode().expect("passwordBase64 decodes"))
        },
    )
    .await
}

#[tokio::test]
async fn with_its_escrow_key_file_deleted_the_orchestrator_refuses_to_start_naming_the_file_the_key_and_the_fix_and_starts_once_it_is_restored()
 {
    // Arrange
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let recorded_key = orchestrator.escrow_public_key;
    let (agent, password) = agent_with_password(&nats, &orchestrator, "device-1").await;
    orchestrator.stop().await;
    let key_file = key_file(&orchestrator);
    let backup = orchestrator.data_dir.with_extension("escrow-key-backup");
    std::fs::rename(&key_file, &backup).expect("moving the key file away");

    // Act
    let refused = orchestrator.try_restart().await.expect_err("no key, no start");

    // Assert: the message names the file, the recorded key and the fix; no key was made up.
    let message = format!("{refused:#}");
    assert!(
        message.contains(&format!("{} is missing", key_file.display())),
        "{message}"
    );
    assert!(message.contains(&recorded_key.to_string()), "{message}");
    assert!(
        message.contains(&format!("Restore {}", key_file.display())),
        "{message}"
    );
    assert!(message.contains("fleetlaps-orchestrator recover"), "{message}");
    assert!(!key_file.exists(), "no key is created while the history names one");

    // The binary says the same and fails.
    let output = run(
        "fleetlaps-orchestrator",
        &["run", "--config", path_arg(&orchestrator.config_path())],
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&recorded_key.to_string()) && stderr.contains("Restore"),
        "{stderr}"
    );
    assert!(!key_file.exists());

    // Restored: it starts, with the same key, and returns the password.
    std::fs::rename(&backup, &key_file).expect("restoring the key file");
    orchestrator.try_restart().await.expect("starts with its key restored");
    assert_eq!(orchestrator.escrow_public_key, recorded_key);
    let passwords = orchestrator.passwords(&agent.device_id).await;
    assert_eq!(passwords[0].expose(), password.expose());
}

#[tokio::test]
async fn after_escrow_rotate_new_backups_are_sealed_to_the_new_key_and_old_passwords_still_open() {
    // Arrange
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let old_key = orchestrator.escrow_public_key;
    let (agent, before_rotation) = agent_with_password(&nats, &orchestrator, "device-1").await;
    assert_eq!(newest_backup_key(&nats, &agent.device_id).await, Some(old_key));
    orchestrator.stop().await;

    // Act
    let output = run(
        "fleetlaps-orchestrator",
        &["escrow", "rotate", "--config", path_arg(&orchestrator.config_path())],
    )
    .await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let new_key: EscrowPublicKey = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("rotate prints the new public key");
    orchestrator.restart().await;

    // Assert: the centre serves the new key and tells the device, whose next backup uses it.
    assert_ne!(new_key, old_key);
    assert_eq!(orchestrator.escrow_public_key, new_key);
    wait_until("the device's password version names the new key", TIMEOUT, || async {
        password_version(&nats, &agent.device_id)
            .await
            .filter(|version| version.escrow_public_key == new_key)
    })
    .await;
    let answer = agent.control(ControlRequest::Reset).await;
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    let after_rotation = orchestrator
        .wait_for_new_password(&agent.device_id, &[&before_rotation])
        .await;
    agent.wait_until_has(&after_rotation).await;
    assert_eq!(newest_backup_key(&nats, &agent.device_id).await, Some(new_key));
    let passwords = orchestrator.passwords(&agent.device_id).await;
    assert_eq!(passwords.len(), 2);
    assert_eq!(passwords[0].expose(), after_rotation.expose(), "opens with the new key");
    assert_eq!(
        passwords[1].expose(),
        before_rotation.expose(),
        "still opens with the old key"
    );
    let key_lines = std::fs::read_to_string(key_file(&orchestrator)).expect("the keyring");
    assert_eq!(key_lines.lines().count(), 2, "the new key and the retired one");
}

#[tokio::test]
async fn escrow_rotate_refuses_while_the_orchestrator_runs_on_its_data_dir() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let key_before = std::fs::read(key_file(&orchestrator)).expect("the key file");

    // Act
    let output = run(
        "fleetlaps-orchestrator",
        &["escrow", "rotate", "--config", path_arg(&orchestrator.config_path())],
    )
    .await;

    // Assert
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is in use") && stderr.contains("stop it first"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(key_file(&orchestrator)).expect("the key file"),
        key_before
    );
}

#[tokio::test]
async fn with_the_escrow_key_and_projections_lost_recover_with_the_recovery_key_returns_every_devices_current_password()
{
    // Arrange: an offline recovery key, configured before the devices enroll.
    let nats = TestNats::start();
    let ceremony = tempfile::tempdir().expect("tempdir");
    let recovery_key_file = ceremony.path().join("recovery.key");
    let output = run(
        "fleetlaps-orchestrator",
        &["escrow", "recovery-key", "--out", path_arg(&recovery_key_file)],
    )
    .await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let recovery_public_key = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let mut orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        &format!("escrow_recovery_public_key = \"{recovery_public_key}\""),
    )
    .await;
    let lost_key = orchestrator.escrow_public_key;
    let (first, _) = agent_with_password(&nats, &orchestrator, "device-1").await;
    let (second, _) = agent_with_password(&nats, &orchestrator, "device-2").await;
    let identity: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fleetlaps_agent::identity::Identity::path(&second.state_dir)).expect("the identity"),
    )
    .expect("json");
    assert_eq!(
        identity["escrow_recovery_public_key"], recovery_public_key,
        "enrollment gives the recovery key"
    );
    // One more rotation, so the current password is not the first one.
    let answer = first.control(ControlRequest::Reset).await;
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    let current = orchestrator.wait_for_passwords(&first.device_id, 2).await.remove(0);
    first.wait_until_has(&current).await;

    // The escrow key and the projections are lost.
    orchestrator.delete_projections().await;
    std::fs::remove_file(key_file(&orchestrator)).expect("deleting the escrow key");

    // Act
    let output = run(
        "fleetlaps-orchestrator",
        &[
            "recover",
            "--config",
            path_arg(&orchestrator.config_path()),
            "--recovery-key",
            path_arg(&recovery_key_file),
        ],
    )
    .await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("recovered 3 credential(s) of 2 device(s)"), "{stdout}");
    assert!(!stdout.contains("not recovered"), "{stdout}");
    orchestrator.try_restart().await.expect("starts with the recovered key");

    // Assert: a new key, and every device's current password back.
    assert_ne!(orchestrator.escrow_public_key, lost_key);
    for agent in [&first, &second] {
        let password = newest_openable_password(&orchestrator, &agent.device_id).await;
        assert!(
            agent.has_password(&password),
            "the centre returns {}'s current password",
            agent.device_id
        );
    }
    assert_eq!(
        orchestrator.passwords(&first.device_id).await.len(),
        2,
        "the history opens too"
    );

    // Nothing left to recover: the key file holds the recorded key.
    orchestrator.stop().await;
    let again = run(
        "fleetlaps-orchestrator",
        &[
            "recover",
            "--config",
            path_arg(&orchestrator.config_path()),
            "--recovery-key",
            path_arg(&recovery_key_file),
        ],
    )
    .await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("nothing to recover"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
