//! The orchestrator key projection: the public key every orchestrator event must be signed with,
//! from `orchestrator_key_created` events.

use chrono::{DateTime, Utc};
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
