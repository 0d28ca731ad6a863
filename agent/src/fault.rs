//! Fault injection for the crash and failure tests, compiled in only with the cargo feature
//! `fault-injection` (the integration tests turn it on; a release build of the agent has none of
//! it, and then [`Faults`] is an empty value whose checks do nothing).
//!
//! Two kinds of fault:
//! - a kill point: on reaching the named step of a rotation, the agent kills itself with
//!   SIGKILL, as a power cut would. The binary arms it from `LAPS_TEST_KILL_AT`; the crash tests
//!   stop the agent at every step and check that a restart always rolls forward;
//! - a failure point: a state-store operation fails as a sled I/O error would, so tests can show
//!   that such an error never lets the account change.

/// The environment variable that arms a kill point in the binary (with the feature only). Not
/// `FLEETLAPS_AGENT_`-prefixed, so the config layer never reads it as a setting.
pub const KILL_AT_VARIABLE: &str = "LAPS_TEST_KILL_AT";

/// The kill points, in the order a rotation reaches them.
pub const POINTS: [&str; 5] = [
    "after_pending",
    "after_backup",
    "after_confirmation",
    "after_apply",
    "after_commit",
];

/// A state-store operation on a backup event that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// Reading a backup, the oldest event of the outbox, to publish it.
    OutboxRead,
    /// Recording JetStream's ack of a backup (removing it from the outbox).
    OutboxAck,
}

/// An injected failure, reported as a state-store error.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("injected fault at {0:?}")]
pub struct InjectedFault(pub FailPoint);

/// The faults armed in one agent. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    kill_at: Option<String>,
    #[cfg(feature = "fault-injection")]
    fail_at: Option<FailPoint>,
}

impl Faults {
    /// No fault: what a production agent always has.
    pub fn none() -> Self {
        Self::default()
    }

    /// The faults the environment arms (`LAPS_TEST_KILL_AT`), with the feature; none without it.
    pub fn from_environment() -> Self {
        #[cfg(feature = "fault-injection")]
        {
            Self {
                kill_at: std::env::var(KILL_AT_VARIABLE).ok(),
                fail_at: None,
            }
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            Self::none()
        }
    }

    /// Makes the state-store operation `point` fail every time.
    #[cfg(feature = "fault-injection")]
    pub fn failing_at(point: FailPoint) -> Self {
        Self {
            kill_at: None,
            fail_at: Some(point),
        }
    }

    /// Dies here if the kill point `point` is armed.
    pub(crate) fn point(&self, point: &str) {
        #[cfg(feature = "fault-injection")]
        if self.kill_at.as_deref() == Some(point) {
            tracing::warn!(point, "fault injection: killing the agent");
            // SIGKILL through the `kill` command: no unsafe code, and no chance to clean up.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            // The signal is delivered asynchronously; never go on past the point.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = point;
    }

    /// Fails if the failure point `point` is armed.
    pub(crate) fn check(&self, point: FailPoint) -> Result<(), InjectedFault> {
        #[cfg(feature = "fault-injection")]
        if self.fail_at == Some(point) {
            return Err(InjectedFault(point));
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = point;
        Ok(())
    }
}
