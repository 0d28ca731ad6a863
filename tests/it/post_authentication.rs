//! LAPS post-authentication actions through real PAM: a throwaway user, a PAM service made from
//! the shipped `agent/packaging/pam.d/fleetlaps` snippet (its hook pointed at the built agent and
//! the test agent's config), and `pamtester` to authenticate.
//!
//! These tests need root (`useradd`, `/etc/pam.d`, `chpasswd`) and Debian's `pamtester`, as CI
//! runs them. The logoff command is a recorder; the terminate command is the real default,
//! `pkill -KILL -u {user}`, which only reaches the throwaway user's processes. Nothing reboots or
//! logs out the machine.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetlaps_proto::control::{ControlRequest, ControlResponse, StatusReport};
use fleetlaps_proto::event::{Envelope, Event, EventKind};
use fleetlaps_proto::password::Password;
use tempfile::TempDir;

use crate::apps::{AgentOptions, TestAgent, TestOrchestrator, binary, device_events as events};
use crate::harness::{TestNats, wait_until};
use crate::linux::{LinuxUser, pamtester, unused_name};

/// The shipped PAM snippet, whose stack the tests' PAM services use.
const PAM_SNIPPET: &str = include_str!("../../agent/packaging/pam.d/fleetlaps");
/// The hook command as the snippet writes it.
const SNIPPET_HOOK: &str = "/usr/bin/fleetlaps-agent --config /etc/fleetlaps/agent.toml";
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
                // A reset with the orchestrator away gives up waiting for its confirmation soon.
                settings: "backup_confirmation_wait_secs = 2".to_owned(),
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
        self.user.wait_until_holds(&newest).await;
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
async fn with_the_orchestrator_away_a_post_authentication_reset_keeps_the_password_and_retries_until_done() {
    // Arrange: a login schedules a reset; the orchestrator goes away before it is due.
    let mut fixture = Fixture::start(1).await;
    let first = fixture.wait_for_password(1).await;
    assert!(fixture.pam.authenticates(&fixture.user.name, &first).await);
    fixture.wait_for_events(EventKind::AuthenticationSucceeded).await;
    fixture.orchestrator.stop().await;

    // Act: the delay passes; the reset cannot be confirmed.
    fixture.let_the_delay_pass().await;

    // Assert: reported as failed, the account keeps its password, the reset stays scheduled.
    let failed = fixture
        .wait_for_events(EventKind::PostAuthenticationActionsFailed)
        .await;
    let Event::PostAuthenticationActionsFailed(failure) = &failed[0].event else {
        unreachable!("filtered by kind")
    };
    assert!(failure.error.contains("has not confirmed"), "{}", failure.error);
    assert!(fixture.user.holds(&first), "no confirmation, no change");
    assert!(fixture.status().await.post_authentication_reset_at.is_some());

    // The orchestrator back and the retry due: the reset completes and the centre returns it.
    fixture.orchestrator.restart().await;
    fixture.let_the_delay_pass().await;
    fixture
        .wait_for_events(EventKind::PostAuthenticationActionsSucceeded)
        .await;
    let newest = fixture
        .orchestrator
        .wait_for_new_password(&fixture.agent.device_id, &[&first])
        .await;
    fixture.user.wait_until_holds(&newest).await;
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
    user.set_password(&password).await;
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

/// A PAM service for one test, in `/etc/pam.d`: the shipped snippet with its hook pointed at the
/// built agent binary and the test agent's config. Removed on drop.
pub(crate) struct PamService {
    /// The service name, `fleetlaps-test-` and a fresh random suffix.
    pub(crate) name: String,
}

impl PamService {
    /// Installs the snippet's stack with `hook` in place of `/usr/bin/fleetlaps-agent --config …`.
    pub(crate) fn install(hook: &str) -> Self {
        assert_eq!(
            PAM_SNIPPET.matches(SNIPPET_HOOK).count(),
            2,
            "the snippet has two hooks"
        );
        let stack = PAM_SNIPPET.replace(SNIPPET_HOOK, hook);
        let name = format!("fleetlaps-test-{}", unused_name());
        std::fs::write(Path::new("/etc/pam.d").join(&name), stack)
            .unwrap_or_else(|err| panic!("writing /etc/pam.d/{name} (the tests must run as root): {err}"));
        Self { name }
    }

    /// Whether this service accepts `password` for `user`.
    pub(crate) async fn authenticates(&self, user: &str, password: &Password) -> bool {
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
pub(crate) fn hook_command(agent_config: &Path) -> String {
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
