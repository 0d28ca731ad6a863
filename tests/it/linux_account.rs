//! The `linux` account backend on this machine's real accounts: a throwaway user gets the
//! password the orchestrator backed up, and PAM (through `pamtester`) agrees.
//!
//! These tests need root (`useradd`, `chpasswd`, reading `/etc/shadow`), as CI runs them, and
//! Debian's `pamtester`. They only ever change the password of a user they created.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleetlaps_agent::account::{AccountBackend, LinuxAccounts};
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::ids::AccountName;
use fleetlaps_proto::password::Password;
use tokio::io::AsyncWriteExt;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, wait_until};

/// `useradd`'s exit status when the name is taken.
const USERADD_NAME_IN_USE: i32 = 9;

/// A local user that exists for one test: created with `useradd`, removed with `userdel` on drop.
///
/// It has no home directory and a `nologin` shell, so nobody can use it even while it exists.
struct LinuxUser {
    /// Its name: `flt` and 8 random hex digits, a valid Linux user name.
    name: String,
}

impl LinuxUser {
    /// Creates a user with a fresh name.
    ///
    /// # Panics
    ///
    /// If `useradd` fails (the tests must run as root).
    async fn create() -> Self {
        for _ in 0..5 {
            let name = unused_name();
            let output = tokio::process::Command::new("useradd")
                .args(["--no-create-home", "--shell", "/usr/sbin/nologin", &name])
                .output()
                .await
                .unwrap_or_else(|err| panic!("running useradd (the tests need the passwd package): {err}"));
            if output.status.success() {
                return Self { name };
            }
            // A user left behind by a killed test run may hold the name: take another.
            if output.status.code() != Some(USERADD_NAME_IN_USE) {
                panic!(
                    "useradd {name} failed ({}); the tests must run as root: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        panic!("useradd found every name taken, 5 times in a row");
    }
}

impl Drop for LinuxUser {
    fn drop(&mut self) {
        // Drop cannot await. By now the test is over and its agent stopped, so blocking the
        // runtime for a moment holds nothing up.
        match std::process::Command::new("userdel").arg(&self.name).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "userdel {} failed ({}): {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(err) => eprintln!("running userdel {}: {err}", self.name),
        }
    }
}

/// A user name no test has used in this process: `flt` and 8 hex digits, random across runs.
fn unused_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded randomly per process, so the hash differs between runs.
    let random = RandomState::new().hash_one((std::process::id(), count));
    format!("flt{:08x}", random & 0xffff_ffff)
}

/// Whether PAM's `login` service accepts `password` for `user`, as `echo PW | pamtester login
/// USER authenticate` answers it.
///
/// # Panics
///
/// If pamtester is not installed, or it fails for another reason than a refused password.
async fn pam_authenticates(user: &str, password: &Password) -> bool {
    let mut child = tokio::process::Command::new("pamtester")
        .args(["login", user, "authenticate"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("running pamtester: {err}; install Debian's pamtester or run cargo xtask test"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(format!("{}\n", password.expose()).as_bytes())
        .await
        .expect("writing the password to pamtester");
    drop(stdin);
    let output = child.wait_with_output().await.expect("pamtester runs");
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "pamtester login {user} authenticate failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

/// Waits until the user's `/etc/shadow` entry holds `password`. The orchestrator may store a
/// backup before the agent, which only changes the account once the backup is safe, has done so.
async fn wait_until_account_holds(user: &str, password: &Password) {
    let backend = LinuxAccounts::default();
    let account = backend
        .resolve(Some(&AccountName::parse(user).expect("valid name")))
        .expect("the test user exists");
    wait_until(
        &format!("account {user} holds the backed-up password"),
        Duration::from_secs(30),
        || async {
            backend
                .verify_password(&account, password)
                .expect("/etc/shadow is readable")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_real_account_gets_the_backed_up_password_and_pam_accepts_only_the_new_one() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let user = LinuxUser::create().await;
    let agent = TestAgent::spawn_with(
        &nats,
        &orchestrator,
        AgentOptions {
            linux_account: Some(user.name.clone()),
            ..Default::default()
        },
    )
    .await;
    let first = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
    wait_until_account_holds(&user.name, &first).await;
    assert!(
        pam_authenticates(&user.name, &first).await,
        "PAM accepts the first backed-up password"
    );

    // Act
    let answer = agent.control(ControlRequest::Reset).await;

    // Assert
    assert!(matches!(answer, ControlResponse::Done { .. }), "{answer:?}");
    let passwords = orchestrator.wait_for_passwords(&agent.device_id, 2).await;
    let (newest, previous) = (&passwords[0], &passwords[1]);
    assert_eq!(
        previous.expose(),
        first.expose(),
        "the history keeps the first password"
    );
    assert_ne!(newest.expose(), first.expose(), "the reset made a new password");
    wait_until_account_holds(&user.name, newest).await;
    assert!(
        pam_authenticates(&user.name, newest).await,
        "PAM accepts the new password"
    );
    assert!(
        !pam_authenticates(&user.name, previous).await,
        "PAM refuses the previous password"
    );
}

#[tokio::test]
async fn an_unknown_account_is_refused_with_a_clear_error() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let name = unused_name();
    let agent = TestAgent::spawn_with(
        &nats,
        &orchestrator,
        AgentOptions {
            linux_account: Some(name.clone()),
            ..Default::default()
        },
    )
    .await;

    // Act
    let answer = agent.control(ControlRequest::ProcessNow).await;

    // Assert
    assert!(
        matches!(&answer, ControlResponse::Refused { message } if message.contains(&name) && message.contains("does not exist")),
        "{answer:?}"
    );
    assert!(
        orchestrator.passwords(&agent.device_id).await.is_empty(),
        "the orchestrator holds no password for an account that does not exist"
    );
}
