//! The principals projection: API tokens created and revoked through the API, folded from the
//! orchestrator's own `token_created` and `token_revoked` events; enrollment tokens with their
//! use counts; and the keys devices enrolled with.

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::TokenId;
use fleetlaps_proto::ids::DeviceId;
use serde::{Deserialize, Serialize};

/// One API token, as the history describes it. Holds the token's SHA-256, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's id.
    pub token_id: TokenId,
    /// Its holder.
    pub name: String,
    /// Its scopes, by name, as created (unknown names grant nothing).
    pub scopes: Vec<String>,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// When it was created (the event's time).
    pub created_at: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
}

/// One enrollment token, as the history describes it. Holds the token's SHA-256, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenRecord {
    /// The token's id.
    pub token_id: TokenId,
    /// What it is for.
    pub name: String,
    /// How many devices may enroll with it.
    pub max_uses: u32,
    /// How many `device_enrolled` events name it.
    pub uses: u32,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// When it was created (the event's time).
    pub created_at: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
}

/// The key a device enrolled with: its events must be signed with the matching secret key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledKeyRecord {
    /// The device.
    pub device_id: DeviceId,
    /// Its Ed25519 public key, standard base64.
    pub public_key: String,
    /// The enrollment token it presented.
    pub enrollment_token_id: TokenId,
    /// When it enrolled (the event's time).
    pub enrolled_at: DateTime<Utc>,
}
