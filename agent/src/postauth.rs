//! LAPS post-authentication actions: once someone has authenticated as the managed account its
//! password counts as used, and `PostAuthenticationResetDelay` hours later the agent resets it
//! and carries out `PostAuthenticationActions` (end the account's sessions, terminate its
//! remaining processes, or restart the device).
//!
//! `pam_exec` runs `fleetlaps-agent pam-hook`, which reports each authentication over the control
//! socket. [`PostAuth::on_authentication`] records it (LAPS 10041) and the schedule in one write.
//! When the deadline comes, [`PostAuth::run_due`] reports the start (10042), rotates through the
//! [`Processor`], runs the configured commands, and reports success (10044, the schedule cleared
//! in the same write) or failure (10043, the next attempt moved `retry_after_secs` later: LAPS
//! retries until the reset succeeds).
//!
//! Failed authentications schedule nothing and are aggregated ([`crate::failure_window`]): the
//! first after a quiet spell is reported at once (10041's failure counterpart), the rest of its
//! window together, so a flood of failures sends a bounded number of events. A success is
//! reported and schedules the reset each time, as before: it needs the managed password.
//!
//! Invariant: the schedule lives under `p/schedule` and the failure window under `p/failures` in
//! the agent's state, so they survive a restart, and every change to them is written together
//! with the event that reports it.
//! Boundary: this module runs the configured commands as argv, never through a shell; it has no
//! say in who can log in (the PAM stack decides that whatever the hook answers).

use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::control::{AuthenticationReport, ControlResponse};
use fleetlaps_proto::event::{
    self, AuthenticationObserved, AuthenticationOutcome, Event, PostAuthenticationActionsFailed, RotationReason,
};
use fleetlaps_proto::ids::AccountName;
use fleetlaps_proto::policy::{BackupDirectory, PostAuthenticationActions};
use serde::{Deserialize, Serialize};

use crate::config::PostAuthConfig;
use crate::failure_window::{self, FailedAuthentication, FailureWindow};
use crate::rotation::{CycleError, CycleOutcome, Processor};
use crate::state::{AgentState, StateError};

/// The state key of the schedule.
const SCHEDULE_KEY: &str = "p/schedule";
/// The state key of the failed authentications counted and not yet reported.
const FAILURES_KEY: &str = "p/failures";
/// How long one action command may run before it counts as failed (and is killed).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The post-authentication schedule, persisted in the agent's state under `p/schedule` so it
/// survives restarts, and the commands that carry out the actions.
pub struct PostAuth {
    /// The reset waiting to run, if any; always what the state holds, except that after a write
    /// failed `next_attempt_at` is already moved on, so a broken store cannot make a busy loop.
    schedule: Option<Schedule>,
    /// The failed authentications counted and not yet reported; what the state holds, except
    /// after a write failed when the window ended (then it is closed, its count lost).
    failures: Option<FailureWindow>,
    /// The commands and the retry interval.
    config: PostAuthConfig,
}

/// A post-authentication reset waiting to run, as stored under `p/schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Schedule {
    /// The account that was used: the one whose sessions and processes the actions end.
    account_name: AccountName,
    /// When the reset is due: the deadline of the earliest authentication not yet followed by a
    /// reset.
    reset_at: DateTime<Utc>,
    /// When to try next: `reset_at` at first, then `retry_after_secs` after each failure.
    next_attempt_at: DateTime<Utc>,
    /// How many attempts have failed.
    failed_attempts: u32,
    /// Whether 10042 was reported; it is reported once per schedule.
    started: bool,
    /// Whether this schedule's reset rotated the password: a retry then only repeats the other
    /// actions.
    password_reset: bool,
    /// Whether the reboot command was run. Found set at the next attempt, the reboot is taken as
    /// done: a device that rebooted must not rotate and reboot again, in a loop.
    reboot_issued: bool,
}

/// Why an attempt at the post-authentication actions failed. Messages never hold a password.
#[derive(Debug, thiserror::Error)]
enum ActionError {
    /// The rotation failed.
    #[error("password not reset: {0}")]
    Reset(#[source] CycleError),
    /// The cycle ran but did not rotate.
    #[error("password not reset: the processing cycle did not rotate it")]
    NotRotated,
    /// A command could not be started or did not finish in time.
    #[error("{action} command `{command}` failed: {detail}")]
    Command {
        /// `logoff`, `reboot` or `terminate`.
        action: &'static str,
        /// The command line, for a person.
        command: String,
        /// What went wrong.
        detail: String,
    },
    /// The schedule could not be written.
    #[error(transparent)]
    State(#[from] CycleError),
}

/// One of the configured commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// End the account's sessions.
    Logoff,
    /// Restart the device.
    Reboot,
    /// Kill the account's remaining processes.
    Terminate,
}

impl PostAuth {
    /// Loads the schedule from the agent's state.
    pub fn load(state: &AgentState, config: PostAuthConfig) -> Result<Self, StateError> {
        let schedule = state.get_record(SCHEDULE_KEY)?;
        let failures = state.get_record(FAILURES_KEY)?;
        Ok(Self {
            schedule,
            failures,
            config,
        })
    }

    /// Handles a report from the PAM hook. Ignores (answers Done "not the managed account")
    /// users other than the managed account.
    ///
    /// A success is recorded (LAPS 10041) together with the schedule, in one write: the reset is
    /// due `PostAuthenticationResetDelay` from `now`, or at an earlier deadline already scheduled;
    /// with a delay of 0 (disabled) nothing is scheduled. A failure is counted in the failure
    /// window, reported at once only when it opens one (see [`crate::failure_window`]), and
    /// schedules nothing. Returns the answer for the hook.
    pub async fn on_authentication(
        &mut self,
        report: AuthenticationReport,
        processor: &Processor,
        now: DateTime<Utc>,
    ) -> Result<ControlResponse, CycleError> {
        let AuthenticationReport {
            user,
            service,
            remote_host,
            tty,
            outcome,
        } = report;
        if processor.policy().backup_directory() == BackupDirectory::Disabled {
            return Ok(done("BackupDirectory is 0: the agent manages no account".to_owned()));
        }
        let account_name = managed_account(processor).await?;
        if user != account_name.as_str() {
            return Ok(done("not the managed account".to_owned()));
        }
        match outcome {
            AuthenticationOutcome::Success => {
                let delay = processor.policy().post_authentication_reset_delay();
                let schedule = schedule_after_authentication(self.schedule.clone(), &account_name, now, delay);
                let reset_deadline = delay.and(schedule.as_ref()).map(|schedule| schedule.reset_at);
                let event = Event::AuthenticationSucceeded(AuthenticationObserved {
                    account_name: account_name.clone(),
                    service,
                    remote_host,
                    tty,
                    reset_deadline,
                    count: 1,
                    first_at: None,
                    last_at: None,
                });
                processor
                    .put_record(SCHEDULE_KEY, schedule.as_ref(), now, Some(event))
                    .await?;
                self.schedule = schedule;
                tracing::info!(account = %account_name, ?reset_deadline, "authentication as the managed account");
                Ok(done(match reset_deadline {
                    Some(deadline) => {
                        format!("authentication as {account_name} recorded; its password will be reset at {deadline}")
                    }
                    None => format!(
                        "authentication as {account_name} recorded; PostAuthenticationResetDelay is 0: no reset scheduled"
                    ),
                }))
            }
            AuthenticationOutcome::Failure => {
                let failure = FailedAuthentication {
                    account_name: account_name.clone(),
                    service,
                    remote_host,
                    tty,
                };
                let (window, report) = failure_window::on_failure(
                    self.failures.clone(),
                    failure,
                    now,
                    self.config.failure_report_interval(),
                );
                let reported = report.as_ref().map(|report| report.count);
                let queued = processor
                    .put_record(
                        FAILURES_KEY,
                        window.as_ref(),
                        now,
                        report.map(Event::AuthenticationFailed),
                    )
                    .await?;
                if let (Some(count), Some(_)) = (reported, queued) {
                    processor.metrics().failed_logins_reported(count);
                }
                self.failures = window;
                match reported {
                    Some(count) => {
                        tracing::info!(account = %account_name, count, "failed authentications as the managed account");
                    }
                    None => {
                        tracing::debug!(account = %account_name, "failed authentication as the managed account counted")
                    }
                }
                Ok(done(format!("failed authentication as {account_name} recorded")))
            }
        }
    }

    /// When the next attempt at the actions is due, if one is scheduled.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.schedule.as_ref().map(|schedule| schedule.next_attempt_at)
    }

    /// When the loop must wake for [`Self::run_due`]: the next attempt at the actions, or the end
    /// of the failure window, whichever comes first.
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        let window_ends = failure_window::ends_at(self.failures.as_ref(), self.config.failure_report_interval());
        match (self.next_deadline(), window_ends) {
            (Some(deadline), Some(ends)) => Some(deadline.min(ends)),
            (deadline, ends) => deadline.or(ends),
        }
    }

    /// Once the failure window has ended: closes it, reporting the failures it counted, if any.
    async fn report_failures_due(&mut self, processor: &Processor, now: DateTime<Utc>) -> Result<(), CycleError> {
        let (window, report) =
            failure_window::on_tick(self.failures.clone(), now, self.config.failure_report_interval());
        if window == self.failures {
            return Ok(());
        }
        if let Some(report) = &report {
            tracing::info!(account = %report.account_name, count = report.count, "failed authentications as the managed account");
        }
        let reported = report.as_ref().map(|report| report.count);
        let written = processor
            .put_record(
                FAILURES_KEY,
                window.as_ref(),
                now,
                report.map(Event::AuthenticationFailed),
            )
            .await;
        // Even when the write failed: a window kept open past its end would wake the loop at once,
        // again and again.
        self.failures = window;
        if let (Some(count), Some(_)) = (reported, written?) {
            processor.metrics().failed_logins_reported(count);
        }
        processor.publish_outbox().await;
        Ok(())
    }

    /// At or after the deadline: reports the start (LAPS 10042), resets the password through
    /// `processor`, then runs the actions of `PostAuthenticationActions`: 1 nothing more; 3 the
    /// logoff command; 5 the reboot command; 11 the logoff and then the terminate command.
    ///
    /// Success is reported (10044) together with clearing the schedule. A failure of the reset
    /// or of a command is reported (10043, with the attempt number and the error) together with
    /// the schedule, whose next attempt moves `retry_after_secs` later; a retry after a
    /// successful reset repeats only the commands. Returns an error only when the state could not
    /// be written. Before the deadline it does nothing.
    pub async fn run_due(&mut self, processor: &mut Processor, now: DateTime<Utc>) -> Result<(), CycleError> {
        self.report_failures_due(processor, now).await?;
        let Some(mut schedule) = self.schedule.clone() else {
            return Ok(());
        };
        if now < schedule.next_attempt_at {
            return Ok(());
        }
        let retry_after = chrono::Duration::from_std(self.config.retry_after()).unwrap_or(chrono::Duration::MAX);
        if let Some(in_memory) = &mut self.schedule {
            in_memory.next_attempt_at = now + retry_after;
        }
        if processor.policy().backup_directory() == BackupDirectory::Disabled {
            tracing::info!("BackupDirectory is 0: the post-authentication reset is dropped");
            processor.put_record::<Schedule>(SCHEDULE_KEY, None, now, None).await?;
            self.schedule = None;
            return Ok(());
        }
        let actions = processor.policy().post_authentication_actions();
        let body = event::PostAuthenticationActions {
            account_name: schedule.account_name.clone(),
            actions: actions.value(),
        };
        if !schedule.started {
            schedule.started = true;
            let started = Event::PostAuthenticationActionsStarted(body.clone());
            processor
                .put_record(SCHEDULE_KEY, Some(&schedule), now, Some(started))
                .await?;
            tracing::info!(account = %schedule.account_name, actions = actions.value(), "post-authentication actions start");
        }
        let outcome = self.carry_out(&mut schedule, actions, processor).await;
        let now = processor.now();
        match outcome {
            Ok(()) => {
                let succeeded = Event::PostAuthenticationActionsSucceeded(body);
                processor
                    .put_record::<Schedule>(SCHEDULE_KEY, None, now, Some(succeeded))
                    .await?;
                self.schedule = None;
                tracing::info!(account = %schedule.account_name, actions = actions.value(), "post-authentication actions succeeded");
            }
            Err(err) => {
                schedule.failed_attempts = schedule.failed_attempts.saturating_add(1);
                schedule.next_attempt_at = now + retry_after;
                let error = err.to_string();
                tracing::warn!(
                    account = %schedule.account_name,
                    attempt = schedule.failed_attempts,
                    next_attempt_at = %schedule.next_attempt_at,
                    %error,
                    "post-authentication actions failed; will retry"
                );
                let failed = Event::PostAuthenticationActionsFailed(PostAuthenticationActionsFailed {
                    account_name: schedule.account_name.clone(),
                    actions: actions.value(),
                    attempt: schedule.failed_attempts,
                    error,
                });
                processor
                    .put_record(SCHEDULE_KEY, Some(&schedule), now, Some(failed))
                    .await?;
                self.schedule = Some(schedule);
            }
        }
        processor.publish_outbox().await;
        Ok(())
    }

    /// One attempt: the reset unless this schedule already did it, then the commands.
    async fn carry_out(
        &self,
        schedule: &mut Schedule,
        actions: PostAuthenticationActions,
        processor: &mut Processor,
    ) -> Result<(), ActionError> {
        if !schedule.password_reset {
            match processor.process(Some(RotationReason::PostAuthentication)).await {
                Ok(CycleOutcome::Rotated { .. }) => {}
                Ok(_) => return Err(ActionError::NotRotated),
                Err(err) => return Err(ActionError::Reset(err)),
            }
            schedule.password_reset = true;
            // A restart from here on must not rotate again for this schedule.
            processor
                .put_record(SCHEDULE_KEY, Some(&*schedule), processor.now(), None)
                .await?;
        }
        let account_name = schedule.account_name.clone();
        match actions {
            PostAuthenticationActions::ResetPassword => Ok(()),
            PostAuthenticationActions::ResetPasswordAndLogoff => self.run(Action::Logoff, &account_name).await,
            PostAuthenticationActions::ResetPasswordLogoffAndTerminateProcesses => {
                self.run(Action::Logoff, &account_name).await?;
                if is_uid_zero(processor, &account_name).await {
                    // Every system daemon, this agent included, runs as UID 0.
                    tracing::warn!(account = %account_name, "the managed account has UID 0: its processes are not terminated");
                    return Ok(());
                }
                self.run(Action::Terminate, &account_name).await
            }
            PostAuthenticationActions::ResetPasswordAndReboot => {
                if schedule.reboot_issued {
                    tracing::info!("the reboot command ran before the agent restarted: the reboot is done");
                    return Ok(());
                }
                schedule.reboot_issued = true;
                processor
                    .put_record(SCHEDULE_KEY, Some(&*schedule), processor.now(), None)
                    .await?;
                let rebooted = self.run(Action::Reboot, &account_name).await;
                if rebooted.is_err() {
                    schedule.reboot_issued = false;
                }
                rebooted
            }
        }
    }

    async fn run(&self, action: Action, account_name: &AccountName) -> Result<(), ActionError> {
        let template = match action {
            Action::Logoff => &self.config.logoff_command,
            Action::Reboot => &self.config.reboot_command,
            Action::Terminate => &self.config.terminate_command,
        };
        run_command(action, template, account_name).await
    }
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Self::Logoff => "logoff",
            Self::Reboot => "reboot",
            Self::Terminate => "terminate",
        }
    }

    /// Whether a command that failed this way only found nothing to do.
    fn nothing_to_do(self, exit_code: Option<i32>, stderr: &str) -> bool {
        match self {
            // pkill: "1: no processes matched".
            Self::Terminate => exit_code == Some(1),
            // loginctl terminate-user: "User … is not logged in or lingering".
            Self::Logoff => stderr.contains("not logged in"),
            Self::Reboot => false,
        }
    }
}

/// The schedule after a successful authentication at `now`: the reset is due `delay` from now,
/// or earlier when an earlier one is already scheduled. The password was used again, so a reset
/// this schedule already did no longer counts. With no delay (PostAuthenticationResetDelay 0,
/// disabled) nothing new is scheduled and an existing schedule is kept as it is.
fn schedule_after_authentication(
    existing: Option<Schedule>,
    account_name: &AccountName,
    now: DateTime<Utc>,
    delay: Option<chrono::Duration>,
) -> Option<Schedule> {
    let Some(delay) = delay else {
        return existing;
    };
    let reset_at = now + delay;
    Some(match existing {
        Some(schedule) => Schedule {
            account_name: account_name.clone(),
            reset_at: schedule.reset_at.min(reset_at),
            next_attempt_at: schedule.next_attempt_at.min(reset_at),
            password_reset: false,
            reboot_issued: false,
            ..schedule
        },
        None => Schedule {
            account_name: account_name.clone(),
            reset_at,
            next_attempt_at: reset_at,
            failed_attempts: 0,
            started: false,
            password_reset: false,
            reboot_issued: false,
        },
    })
}

/// The managed account's name: `AdministratorAccountName`, or the UID 0 account's name.
async fn managed_account(processor: &Processor) -> Result<AccountName, CycleError> {
    if let Some(name) = processor.policy().administrator_account_name() {
        return Ok(name.clone());
    }
    Ok(processor.managed_account().await?.name)
}

/// Whether `account_name` is (or cannot be shown not to be) an account with UID 0.
async fn is_uid_zero(processor: &Processor, account_name: &AccountName) -> bool {
    match processor.resolve_account(Some(account_name.clone())).await {
        Ok(account) => account.uid == 0,
        // An account that is gone has no processes left; `pkill -u` then finds none.
        Err(CycleError::Account(crate::account::AccountError::Missing(_))) => false,
        Err(_) => true,
    }
}

/// Runs one configured command with `{user}` replaced by the account name.
async fn run_command(action: Action, template: &[String], account_name: &AccountName) -> Result<(), ActionError> {
    let argv: Vec<String> = template
        .iter()
        .map(|arg| arg.replace("{user}", account_name.as_str()))
        .collect();
    let command_line = argv.join(" ");
    let failed = |detail: String| ActionError::Command {
        action: action.name(),
        command: command_line.clone(),
        detail,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(failed("the command is empty".to_owned()));
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => return Err(failed(format!("cannot start it: {err}"))),
        Err(_) => return Err(failed(format!("still running after {COMMAND_TIMEOUT:?}"))),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() || action.nothing_to_do(output.status.code(), &stderr) {
        tracing::info!(action = action.name(), command = %command_line, "post-authentication action done");
        return Ok(());
    }
    let stderr = stderr.trim();
    Err(failed(if stderr.is_empty() {
        format!("{}", output.status)
    } else {
        format!("{}: {stderr}", output.status)
    }))
}

fn done(message: String) -> ControlResponse {
    ControlResponse::Done { message }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn account() -> AccountName {
        AccountName::parse("lapsadmin").expect("valid")
    }

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, hour, 0, 0)
            .single()
            .expect("valid time")
    }

    #[test]
    fn a_first_authentication_schedules_the_reset_after_the_delay() {
        let schedule = schedule_after_authentication(None, &account(), at(1), Some(chrono::Duration::hours(2)))
            .expect("scheduled");
        assert_eq!((schedule.reset_at, schedule.next_attempt_at), (at(3), at(3)));
        assert!(!schedule.started && !schedule.password_reset);
    }

    #[test]
    fn a_later_authentication_keeps_the_earlier_deadline() {
        let delay = Some(chrono::Duration::hours(2));
        let first = schedule_after_authentication(None, &account(), at(1), delay);
        let second = schedule_after_authentication(first, &account(), at(2), delay).expect("scheduled");
        assert_eq!(second.reset_at, at(3));
        // A shorter delay (the policy changed) brings the deadline forward.
        let third = schedule_after_authentication(Some(second), &account(), at(2), Some(chrono::Duration::minutes(30)))
            .expect("scheduled");
        assert_eq!(third.reset_at, at(2) + chrono::Duration::minutes(30));
    }

    #[test]
    fn an_authentication_after_a_reset_that_is_being_retried_needs_a_new_reset() {
        let failing = Schedule {
            account_name: account(),
            reset_at: at(3),
            next_attempt_at: at(5),
            failed_attempts: 2,
            started: true,
            password_reset: true,
            reboot_issued: false,
        };
        let schedule =
            schedule_after_authentication(Some(failing), &account(), at(4), Some(chrono::Duration::hours(1)))
                .expect("scheduled");
        assert!(!schedule.password_reset);
        assert_eq!((schedule.reset_at, schedule.next_attempt_at), (at(3), at(5)));
        assert_eq!(schedule.failed_attempts, 2);
    }

    #[test]
    fn a_delay_of_zero_schedules_nothing() {
        assert_eq!(schedule_after_authentication(None, &account(), at(1), None), None);
        let existing = schedule_after_authentication(None, &account(), at(1), Some(chrono::Duration::hours(1)));
        assert_eq!(
            schedule_after_authentication(existing.clone(), &account(), at(1), None),
            existing
        );
    }

    #[tokio::test]
    async fn the_schedule_is_loaded_from_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = AgentState::open(
            dir.path(),
            &fleetlaps_proto::ids::DeviceId::parse("dev-1").expect("valid"),
        )
        .expect("state");
        let empty = PostAuth::load(&state, PostAuthConfig::default()).expect("loads");
        assert_eq!(empty.next_deadline(), None);
        let schedule = schedule_after_authentication(None, &account(), at(1), Some(chrono::Duration::hours(4)));
        state
            .put_record(SCHEDULE_KEY, schedule.as_ref(), at(1), None)
            .await
            .expect("written");
        let loaded = PostAuth::load(&state, PostAuthConfig::default()).expect("loads");
        assert_eq!(loaded.next_deadline(), Some(at(5)));
    }

    #[tokio::test]
    async fn commands_get_the_user_and_their_exit_codes_are_judged_per_action() {
        let dir = tempfile::tempdir().expect("tempdir");
        let calls = dir.path().join("calls");
        let record = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo logoff {{user}} >> {}", calls.display()),
        ];
        run_command(Action::Logoff, &record, &account()).await.expect("ran");
        assert_eq!(std::fs::read_to_string(&calls).expect("recorded"), "logoff lapsadmin\n");

        let exit_1 = ["sh", "-c", "exit 1"].map(str::to_owned);
        run_command(Action::Terminate, &exit_1, &account())
            .await
            .expect("pkill's 'no process matched' is success");
        let err = run_command(Action::Logoff, &exit_1, &account())
            .await
            .expect_err("a failure");
        assert_eq!(err.to_string(), "logoff command `sh -c exit 1` failed: exit status: 1");
        let not_logged_in = [
            "sh",
            "-c",
            "echo 'User lapsadmin is not logged in or lingering.' >&2; exit 1",
        ]
        .map(str::to_owned);
        run_command(Action::Logoff, &not_logged_in, &account())
            .await
            .expect("nobody to log off is success");
        let err = run_command(Action::Reboot, &["/nonexistent/reboot".to_owned()], &account())
            .await
            .expect_err("cannot start");
        assert!(err.to_string().contains("cannot start it"), "{err}");
    }
}
