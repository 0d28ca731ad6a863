//! A test-only fault-injection switch: when `LAPS_TEST_KILL_AT` names a point of the rotation,
//! the agent kills itself with SIGKILL on reaching it, as a power cut would. (The variable is not
//! `FLEETLAPS_`-prefixed, so the config layer does not read it as a setting.)
//!
//! The crash tests use it to stop the agent at every state transition and check that a restart
//! always rolls forward without losing a password. Unset, it costs one environment lookup.

/// The environment variable that arms the switch.
pub const KILL_AT_VARIABLE: &str = "LAPS_TEST_KILL_AT";

/// The points the switch knows, in the order a rotation reaches them.
pub const POINTS: [&str; 4] = ["after_pending", "after_backup", "after_apply", "after_commit"];

/// Dies here if the switch names `point`.
pub(crate) fn point(point: &str) {
    if std::env::var(KILL_AT_VARIABLE).is_ok_and(|armed| armed == point) {
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
}
