//! Liveness: each device's heartbeat, the last one per device in a JetStream KV bucket
//! ([`crate::subject::LIVENESS_BUCKET`], key = device id), never on the history.
//!
//! The agent puts one at every processing cycle; the orchestrator keeps the server's time of
//! each device's last one (the KV entry's, not the device's clock), so silent devices are known
//! at any fleet size while the history grows only with real changes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::RotationId;

/// What a device says when it beats: the value of its key in the liveness bucket, as JSON.
/// Small by design: the bucket refuses a value over [`crate::subject::MAX_HEARTBEAT_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// When the agent sent it, on the device's clock (informative: the centre dates a heartbeat
    /// by the server's time of the entry).
    pub at: DateTime<Utc>,
    /// The agent's version (its crate version).
    pub agent_version: String,
    /// The rotation whose password the account has, as the device knows it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_rotation: Option<RotationId>,
}

impl Heartbeat {
    /// The value put in the bucket.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a heartbeat serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_round_trips_and_fits_the_bucket() {
        let heartbeat = Heartbeat {
            at: Utc::now(),
            agent_version: "0.0.0".to_owned(),
            current_rotation: Some(RotationId::new()),
        };
        let json = heartbeat.to_json();
        assert!(json.len() < usize::try_from(crate::subject::MAX_HEARTBEAT_BYTES).expect("positive") / 4);
        let back: Heartbeat = serde_json::from_slice(&json).expect("parses");
        assert_eq!(back, heartbeat);
    }
}
