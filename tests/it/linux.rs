//! Real Linux accounts for the tests: throwaway users made with `useradd`, PAM through Debian's
//! `pamtester`, and `/etc/shadow` read through the agent's own `linux` backend.
//!
//! Everything here needs root, as CI runs the tests. Only users created here are ever changed.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleetlaps_agent::account::{AccountBackend, LinuxAccounts};
use fleetlaps_proto::ids::AccountName;
use fleetlaps_proto::password::Password;
use tokio::io::AsyncWriteExt;

use crate::harness::wait_until;

/// `useradd`'s exit status when the name is taken.
const USERADD_NAME_IN_USE: i32 = 9;

/// A local user that exists for one test: created with `useradd`, removed with `userdel` on drop.
///
/// It has no home directory and a `nologin` shell, so nobody can use it even while it exists.
pub struct LinuxUser {
    /// Its name: `flt` and 8 random hex digits, a valid Linux user name.
    pub name: String,
}

impl LinuxUser {
    /// Creates a user with a fresh name.
    ///
    /// # Panics
    ///
    /// If `useradd` fails (the tests must run as root).
    pub async fn create() -> Self {
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

    /// Sets the user's password with `chpasswd`, `user:password` on its standard input.
    pub async fn set_password(&self, password: &Password) {
        let mut chpasswd = tokio::process::Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .expect("running chpasswd");
        let mut stdin = chpasswd.stdin.take().expect("stdin is piped");
        stdin
            .write_all(format!("{}:{}\n", self.name, password.expose()).as_bytes())
            .await
            .expect("writing to chpasswd");
        drop(stdin);
        assert!(
            chpasswd.wait().await.expect("chpasswd runs").success(),
            "chpasswd failed"
        );
    }

    /// Whether the user's `/etc/shadow` entry holds `password`.
    pub fn holds(&self, password: &Password) -> bool {
        account_holds(&self.name, password)
    }

    /// Waits until the user's `/etc/shadow` entry holds `password`. The orchestrator may store
    /// a backup before the agent, which only changes the account once the backup is safe, has.
    pub async fn wait_until_holds(&self, password: &Password) {
        wait_until(
            &format!("account {} holds the backed-up password", self.name),
            Duration::from_secs(30),
            || async { self.holds(password).then_some(()) },
        )
        .await;
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

/// Whether the `/etc/shadow` entry of `user` holds `password`.
///
/// # Panics
///
/// If the user does not exist or `/etc/shadow` cannot be read.
pub fn account_holds(user: &str, password: &Password) -> bool {
    let backend = LinuxAccounts::default();
    let account = backend
        .resolve(Some(&AccountName::parse(user).expect("valid name")))
        .expect("the test user exists");
    backend
        .verify_password(&account, password)
        .expect("/etc/shadow is readable")
}

/// A user name no test has used in this process: `flt` and 8 hex digits, random across runs.
pub fn unused_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded randomly per process, so the hash differs between runs.
    let random = RandomState::new().hash_one((std::process::id(), count));
    format!("flt{:08x}", random & 0xffff_ffff)
}

/// Whether PAM's `service` accepts `password` for `user`, as `echo PW | pamtester SERVICE USER
/// authenticate` answers it.
///
/// # Panics
///
/// If pamtester is not installed, or it fails for another reason than a refused password.
pub async fn pamtester(service: &str, user: &str, password: &Password) -> bool {
    let mut child = tokio::process::Command::new("pamtester")
        .args([service, user, "authenticate"])
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
            "pamtester {service} {user} authenticate failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}
