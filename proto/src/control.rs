//! Requests and answers on the agent's local control socket.
//!
//! The socket (a Unix stream socket in the agent's state directory, owner-only) carries one JSON
//! request per line and one JSON answer per line. It is how `fleetlaps-agent reset` and
//! `process-now` reach the running agent.

use serde::{Deserialize, Serialize};

/// What a local administrator asks the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Rotate the password now (LAPS `Reset-LapsPassword`).
    Reset,
    /// Run a processing cycle now (LAPS `Invoke-LapsPolicyProcessing`).
    ProcessNow,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    }
}
