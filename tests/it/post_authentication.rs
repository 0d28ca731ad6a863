//! LAPS post-authentication actions through real PAM: a throwaway user, a PAM service made from
//! the shipped `agent/packaging/pam.d/fleetlaps` snippet (its hook pointed at the built agent and
//! the test agent's config), and `pamtester` to authenticate.
//!
//! These tests need root (`useradd`, `/etc/pam.d`, `chpasswd`) and Debian's `pamtester`, as CI
//! runs them. The logoff command is a recorder; the terminate command is the real default,
//! `pkill -KILL -u {user}`, which only reaches the throwaway user's processes. Nothing reboots or
//! logs out the machine.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use fleetlaps_agent::account::{AccountBackend, LinuxAccounts};
use fleetlaps_proto::control::{ControlRequest, ControlResponse, StatusReport};
use fleetlaps_proto::event::{Envelope, Event, EventKind};
use fleetlaps_proto::ids::{AccountName, DeviceId};
use fleetlaps_proto::password::Password;
use fleetlaps_proto::subject;
use futures::StreamExt;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator, binary};
use crate::harness::{TestNats, wait_until};

/// The shipped PAM snippet, whose stack the tests' PAM services use.
const PAM_SNIPPET: &str = include_str!("../../agent/packaging/pam.d/fleetlaps");
/// The hook command as the snippet writes it.
const SNIPPET_HOOK: &str = "/usr/bin/fleetlaps-agent --config /etc/fleetlaps/agent.toml";
/// `useradd`'s exit status when the name is taken.
const USERADD_NAME_IN_USE: i32 = 9;
/// How long the tests wait for something the agent or the orchestrator does.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Everything one test needs: servers, a real user, an agent managing it, a PAM service that
/// reports to that agent, and the file the logoff recorder writes to.
struct Fixture {
    nats: TestNats,
    orchestrator: TestOrchestrator,
    // Dropped in this order: the PAM service, then the agent, then the user.
    pam: PamService,
    agent: TestAgent,
    user: LinuxUser,
    calls: PathBuf,
    _dir: TempDir,
}

impl Fixture {
    /// Starts everything with `PostAuthenticationActions = actions` and a one-hour delay.
    async fn start(actions: u8) -> Self {
        let nats = TestNats::start();
        let orchestrator = TestOrchestrator::spawn(&nats).await;
        let user = LinuxUser::create().await;
        let dir = tempfile::Builder::new()
            .prefix("fleetlaps-postauth-")
            .tempdir()
            .expect("tempdir");
        let calls = dir.path().join("calls");
        let agent = TestAgent::spawn_with(
            &nats,
            &orchestrator,
            AgentOptions {
                linux_account: Some(user.name.clone()),
                policy: format!("PostAuthenticationResetDelay = 1\nPostAuthenticationActions = {actions}"),
                extra_config: format!(
                    "[post_authentication]\nlogoff_command = [\"sh\", \"-c\", \"echo logoff {{user}} >> {}\"]\n",
                    calls.display()
                ),
                ..AgentOptions::default()
            },
        )
        .await;
        let pam = PamService::install(&hook_command(&agent.config_path));
        Self {
            nats,
            orchestrator,
            pam,
            agent,
            user,
            calls,
            _dir: dir,
        }
    }

    /// Waits until the orchestrator holds `count` passwords and the account has the newest.
    async fn wait_for_password(&self, count: usize) -> Password {
        let newest = self
            .orchestrator
            .wait_for_passwords(&self.agent.device_id, count)
            .await
            .remove(0);
        let backend = LinuxAccounts::default();
        let account = backend
            .resolve(Some(&AccountName::parse(&self.user.name).expect("valid name")))
            .expect("the test user exists");
        wait_until(
            &format!("account {} holds the newest backed-up password", self.user.name),
            TIMEOUT,
            || async {
                backend
                    .verify_password(&account, &newest)
                    .expect("/etc/shadow is readable")
                    .then_some(())
            },
        )
        .await;
        newest
    }

    /// Waits until the stream holds at least one event of `kind` from the agent, and returns them.
    async fn wait_for_events(&self, kind: EventKind) -> Vec<Envelope> {
        wait_until(&format!("the stream holds a {kind} event"), TIMEOUT, || async {
            let events = events(&self.nats, &self.agent.device_id, kind).await;
            (!events.is_empty()).then_some(events)
        })
        .await
    }

    async fn status(&self) -> StatusReport {
        match self.agent.control(ControlRequest::Status).await {
            ControlResponse::Status(report) => *report,
            other => panic!("status answered {other:?}"),
        }
    }

    /// Moves the agent's clock past the one-hour delay and wakes its loop.
    async fn let_the_delay_pass(&self) {
        self.agent.clock.advance(chrono::Duration::hours(2));
        // Any control request wakes the loop, which then finds the reset due; the answer is the
        // cycle's, not the reset's.
        let _answer = self.agent.control(ControlRequest::ProcessNow).await;
    }
}

#[tokio::test]
async fn pam_authentication_as_the_managed_account_schedules_a_reset_that_runs_after_the_delay() {
    // Arrange
    let fixture = Fixture::start(11).await;
    let first = fixture.wait_for_password(1).await;
    let mut leftover = tokio::process::Command::new("setpriv")
        .args([
            &format!("--reuid={}", fixture.user.name),
            &format!("--regid={}", fixture.user.name),
            "--clear-groups",
            "sleep",
            "300",
        ])
        .kill_on_drop(true)
        .spawn()
        .expect("running sleep as the test user with setpriv");

    // Act: log in with the backed-up password.
    assert!(
        fixture.pam.authenticates(&fixture.user.name, &first).await,
        "the snippet's stack accepts the account's password"
    );

    // Assert: the success is on the stream with its deadline, and nothing is reset yet.
    let succeeded = fixture.wait_for_events(EventKind::AuthenticationSucceeded).await;
    let Event::AuthenticationSucceeded(observed) = &succeeded[0].event else {
        panic!("not an authentication: {:?}", succeeded[0].event);
    };
    assert_eq!(observed.account_name.as_str(), fixture.user.name);
    assert_eq!(observed.service, fixture.pam.name);
    let deadline = observed.reset_deadline.expect("a reset is scheduled");
    assert_eq!(succeeded[0].code, Some(10041));
    assert_eq!(fixture.status().await.post_authentication_reset_at, Some(deadline));
    assert_eq!(fixture.orchestrator.passwords(&fixture.agent.device_id).await.len(), 1);

    // Act: the delay passes.
    fixture.let_the_delay_pass().await;

    // Assert: a new password, backed up and on the account; the old one no longer works.
    let second = fixture.wait_for_password(2).await;
    assert_ne!(second.expose(), first.expose());
    assert!(
        pam_login_accepts(&fixture.user.name, &second).await,
        "PAM accepts the new password"
    );
    assert!(
        !pam_login_accepts(&fixture.user.name, &first).await,
        "PAM refuses the used one"
    );
    let done = fixture
        .wait_for_events(EventKind::PostAuthenticationActionsSucceeded)
        .await;
    assert_eq!(done[0].code, Some(10044));
    assert_eq!(
        events(
            &fixture.nats,
            &fixture.agent.device_id,
            EventKind::PostAuthenticationActionsStarted
        )
        .await
        .len(),
        1
    );
    // Action 11: the sessions were ended and the leftover process was killed.
    assert_eq!(
        std::fs::read_to_string(&fixture.calls).expect("the logoff command ran"),
        format!("logoff {}\n", fixture.user.name)
    );
    let status = tokio::time::timeout(TIMEOUT, leftover.wait())
        .await
        .expect("the leftover process ended")
        .expect("waiting for it");
    assert_eq!(status.signal(), Some(9), "killed by pkill -KILL: {status}");
    assert_eq!(fixture.status().await.post_authentication_reset_at, None);
}

#[tokio::test]
async fn a_failed_authentication_is_reported_and_schedules_nothing() {
    // Arrange
    let fixture = Fixture::start(3).await;
    fixture.wait_for_password(1).await;

    // Act
    let wrong = Password::new("not-the-password".to_owned());
    assert!(
        !fixture.pam.authenticates(&fixture.user.name, &wrong).await,
        "the snippet's stack refuses a wrong password"
    );

    // Assert
    let failed = fixture.wait_for_events(EventKind::AuthenticationFailed).await;
    let Event::AuthenticationFailed(observed) = &failed[0].event else {
        panic!("not an authentication: {:?}", failed[0].event);
    };
    assert_eq!(observed.account_name.as_str(), fixture.user.name);
    assert_eq!(observed.reset_deadline, None);
    assert_eq!(fixture.status().await.post_authentication_reset_at, None);
    fixture.let_the_delay_pass().await;
    assert_eq!(fixture.status().await.post_authentication_reset_at, None);
    for kind in [
        EventKind::AuthenticationSucceeded,
        EventKind::PostAuthenticationActionsStarted,
    ] {
        assert!(
            events(&fixture.nats, &fixture.agent.device_id, kind).await.is_empty(),
            "{kind}"
        );
    }
    assert_eq!(fixture.orchestrator.passwords(&fixture.agent.device_id).await.len(), 1);
    assert!(!fixture.calls.exists(), "nobody was logged off");
}

#[tokio::test]
async fn the_schedule_survives_an_agent_restart() {
    // Arrange
    let mut fixture = Fixture::start(3).await;
    let first = fixture.wait_for_password(1).await;
    assert!(fixture.pam.authenticates(&fixture.user.name, &first).await);
    fixture.wait_for_events(EventKind::AuthenticationSucceeded).await;

    // Act
    fixture.agent.restart().await;
    fixture.let_the_delay_pass().await;

    // Assert
    let second = fixture.wait_for_password(2).await;
    assert_ne!(second.expose(), first.expose());
    fixture
        .wait_for_events(EventKind::PostAuthenticationActionsSucceeded)
        .await;
    assert_eq!(
        std::fs::read_to_string(&fixture.calls).expect("the logoff command ran"),
        format!("logoff {}\n", fixture.user.name)
    );
    assert_eq!(fixture.status().await.post_authentication_reset_at, None);
}

#[tokio::test]
async fn the_snippet_decides_as_pam_unix_alone_when_the_agent_is_down_or_the_hook_is_missing() {
    // Arrange: a user with a known password, and no agent at all.
    let user = LinuxUser::create().await;
    let password = Password::new("Correct-Horse-7".to_owned());
    let mut chpasswd = tokio::process::Command::new("chpasswd")
        .stdin(Stdio::piped())
        .spawn()
        .expect("running chpasswd");
    let mut stdin = chpasswd.stdin.take().expect("stdin is piped");
    stdin
        .write_all(format!("{}:{}\n", user.name, password.expose()).as_bytes())
        .await
        .expect("writing to chpasswd");
    drop(stdin);
    assert!(
        chpasswd.wait().await.expect("chpasswd runs").success(),
        "chpasswd failed"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nescrow_public_key = \"CQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\n\
             [nats]\nurl = \"nats://127.0.0.1:1\"\n[account]\nbackend = \"linux\"\n",
            dir.path().join("state").display()
        ),
    )
    .expect("writing agent.toml");
    let agent_down = PamService::install(&hook_command(&config));
    let hook_missing = PamService::install("/nonexistent/fleetlaps-agent");
    let wrong = Password::new("wrong".to_owned());

    for service in [&agent_down, &hook_missing] {
        // Act and Assert
        assert!(
            service.authenticates(&user.name, &password).await,
            "{} accepts",
            service.name
        );
        assert!(
            !service.authenticates(&user.name, &wrong).await,
            "{} refuses",
            service.name
        );
        assert!(
            !service.authenticates("flpa-nobody", &password).await,
            "{} refuses an unknown user",
            service.name
        );
    }
}

/// The device's events of `kind` in the stream, oldest first.
async fn events(nats: &TestNats, device_id: &DeviceId, kind: EventKind) -> Vec<Envelope> {
    let jetstream = jetstream::new(async_nats::connect(nats.url()).await.expect("connects"));
    let stream = jetstream
        .get_stream(subject::EVENTS_STREAM)
        .await
        .expect("events stream");
    let mut consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject::device_event(device_id, kind),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let pending = consumer.info().await.expect("consumer info").num_pending;
    let mut messages = consumer.messages().await.expect("messages");
    let mut envelopes = Vec::new();
    for _ in 0..pending {
        let message = messages.next().await.expect("a pending message").expect("a message");
        envelopes.push(Envelope::from_json(&message.payload).expect("a valid envelope"));
    }
    envelopes
}

/// A PAM service for one test, in `/etc/pam.d`: the shipped snippet with its hook pointed at the
/// built agent binary and the test agent's config. Removed on drop.
struct PamService {
    /// The service name, `fleetlaps-test-` and 8 random hex digits.
    name: String,
}

impl PamService {
    /// Installs the snippet's stack with `hook` in place of `/usr/bin/fleetlaps-agent --config …`.
    fn install(hook: &str) -> Self {
        assert_eq!(
            PAM_SNIPPET.matches(SNIPPET_HOOK).count(),
            2,
            "the snippet has two hooks"
        );
        let stack = PAM_SNIPPET.replace(SNIPPET_HOOK, hook);
        let name = format!("fleetlaps-test-{}", random_hex());
        std::fs::write(Path::new("/etc/pam.d").join(&name), stack)
            .unwrap_or_else(|err| panic!("writing /etc/pam.d/{name} (the tests must run as root): {err}"));
        Self { name }
    }

    /// Whether this service accepts `password` for `user`.
    async fn authenticates(&self, user: &str, password: &Password) -> bool {
        pamtester(&self.name, user, password).await
    }
}

impl Drop for PamService {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(Path::new("/etc/pam.d").join(&self.name)) {
            eprintln!("removing /etc/pam.d/{}: {err}", self.name);
        }
    }
}

/// The hook command for the agent whose config file is `agent_config`, as the snippet would run
/// the installed one.
fn hook_command(agent_config: &Path) -> String {
    format!(
        "{} --config {}",
        binary("fleetlaps-agent").display(),
        agent_config.display()
    )
}

/// Whether Debian's `login` service (no hook) accepts `password` for `user`.
async fn pam_login_accepts(user: &str, password: &Password) -> bool {
    pamtester("login", user, password).await
}

/// `echo PASSWORD | pamtester SERVICE USER authenticate`: true when it exits 0, false when 1.
async fn pamtester(service: &str, user: &str, password: &Password) -> bool {
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

/// A local user that exists for one test: created with `useradd`, removed with `userdel` on drop.
/// No home directory and a `nologin` shell.
struct LinuxUser {
    /// `flpa` and 8 random hex digits.
    name: String,
}

impl LinuxUser {
    async fn create() -> Self {
        for _ in 0..5 {
            let name = format!("flpa{}", random_hex());
            let output = tokio::process::Command::new("useradd")
                .args(["--no-create-home", "--shell", "/usr/sbin/nologin", &name])
                .output()
                .await
                .unwrap_or_else(|err| panic!("running useradd (the tests need the passwd package): {err}"));
            if output.status.success() {
                return Self { name };
            }
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
        // Drop cannot await; the test is over, so blocking for a moment holds nothing up.
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

/// 8 hex digits, different for every call in this process and random across runs.
fn random_hex() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded randomly per process.
    let random = RandomState::new().hash_one((std::process::id(), count));
    format!("{:08x}", random & 0xffff_ffff)
}
