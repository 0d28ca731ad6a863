//! Requests and answers on the agent's local control socket.
//!
//! The socket (a Unix stream socket in the agent's state directory, owner-only) carries one JSON
//! request per line and one JSON answer per line. It is how `fleetlaps-agent reset`,
//! `process-now`, `status` and the PAM hook reach the running agent.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::AuthenticationOutcome;
use crate::policy::{Policy, PolicySource};

/// What a local administrator (or the PAM hook) asks the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Rotate the password now (LAPS `Reset-LapsPassword`).
    Reset,
    /// Run a processing cycle now (LAPS `Invoke-LapsPolicyProcessing`).
    ProcessNow,
    /// Report the agent's state (LAPS `Get-LapsDiagnostics`).
    Status,
    /// PAM saw an authentication (sent by `fleetlaps-agent pam-hook`).
    Authentication(AuthenticationReport),
}

/// One authentication, as `pam_exec` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthenticationReport {
    /// `PAM_USER`.
    pub user: String,
    /// `PAM_SERVICE`.
    pub service: String,
    /// `PAM_RHOST`, if set.
    pub remote_host: Option<String>,
    /// `PAM_TTY`, if set.
    pub tty: Option<String>,
    /// Whether the authentication succeeded.
    pub outcome: AuthenticationOutcome,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Done; the message says what happened.
    Done {
        /// What happened, for a person.
        message: String,
    },
    /// Not done; the message says why.
    Refused {
        /// Why, for a person.
        message: String,
    },
    /// The answer to [`ControlRequest::Status`].
    Status(Box<StatusReport>),
}

/// What `fleetlaps-agent status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// This device's id.
    pub device_id: String,
    /// This device's host name.
    pub device_name: String,
    /// The policy in force.
    pub policy: Policy,
    /// Where it came from.
    pub policy_source: PolicySource,
    /// The managed account, if it was found.
    pub managed_account: Option<String>,
    /// When the password was last rotated.
    pub last_rotation: Option<DateTime<Utc>>,
    /// When the current password expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// A rotation in progress, if any.
    pub pending_rotation: Option<String>,
    /// Events waiting in the outbox for JetStream.
    pub outbox_pending: usize,
    /// Reports dropped because the outbox was full (its last places are kept for backups).
    #[serde(default)]
    pub outbox_dropped: u64,
    /// Backups sent but not yet confirmed stored by the orchestrator.
    pub unconfirmed_backups: usize,
    /// A post-authentication reset scheduled, if any.
    pub post_authentication_reset_at: Option<DateTime<Utc>>,
    /// Whether the NATS connection is up.
    pub connected: bool,
    /// The last error of a processing cycle, if the last cycle failed.
    pub last_error: Option<String>,
    /// The orchestrator's refusal of the last backup, if it was refused: the reason and why.
    #[serde(default)]
    pub last_backup_refusal: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        assert_eq!(
            serde_json::to_string(&ControlRequest::Reset).expect("json"),
            r#"{"request":"reset"}"#
        );
        let answer: ControlResponse =
            serde_json::from_str(r#"{"outcome":"done","message":"rotated"}"#).expect("parses");
        assert_eq!(
            answer,
            ControlResponse::Done {
                message: "rotated".to_owned()
            }
        );
        let report = ControlRequest::Authentication(AuthenticationReport {
            user: "lapsadmin".to_owned(),
            service: "sshd".to_owned(),
            remote_host: Some("10.0.0.1".to_owned()),
            tty: None,
            outcome: AuthenticationOutcome::Success,
        });
        let json = serde_json::to_string(&report).expect("json");
        assert_eq!(serde_json::from_str::<ControlRequest>(&json).expect("parses"), report);
    }
}
