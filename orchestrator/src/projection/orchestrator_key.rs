//! The orchestrator key projection: the public key every orchestrator event must be signed with,
//! from `orchestrator_key_created` events.

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::OrchestratorKeyCreated;
use fleetlaps_proto::signature::OrchestratorPublicKey;
use serde::{Deserialize, Serialize};

/// The orchestrator's recorded public key (never its secret key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrchestratorKeyRecord {
    /// The Ed25519 public key, standard base64 of its 32 bytes.
    pub public_key: String,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// The stream sequence of its `orchestrator_key_created` event.
    pub stream_sequence: u64,
}

impl OrchestratorKeyRecord {
    /// The record an `orchestrator_key_created` event, at stream `sequence`, makes; refused when
    /// it does not name a usable Ed25519 public key.
    pub fn recorded(body: &OrchestratorKeyCreated, time: DateTime<Utc>, sequence: u64) -> Result<Self, String> {
        OrchestratorPublicKey::parse(&body.public_key).map_err(|err| format!("orchestrator_key_created: {err}"))?;
        Ok(Self {
            public_key: body.public_key.clone(),
            recorded_at: time,
            stream_sequence: sequence,
        })
    }
}

#[cfg(test)]
mod tests {
    use fleetlaps_proto::signature::OrchestratorSigningKey;

    use super::*;

    #[test]
    fn only_a_usable_public_key_is_recorded() {
        let key = OrchestratorSigningKey::generate().public_key().to_string();
        let record = OrchestratorKeyRecord::recorded(
            &OrchestratorKeyCreated {
                public_key: key.clone(),
            },
            Utc::now(),
            1,
        )
        .expect("a usable key");
        assert_eq!((record.public_key, record.stream_sequence), (key, 1));
        let refused = OrchestratorKeyRecord::recorded(
            &OrchestratorKeyCreated {
                public_key: "not a key".to_owned(),
            },
            Utc::now(),
            2,
        );
        assert!(refused.is_err_and(|detail| detail.starts_with("orchestrator_key_created")));
    }
}
