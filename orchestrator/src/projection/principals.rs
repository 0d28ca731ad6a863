//! The principals projection: API tokens created and revoked through the API, folded from the
//! orchestrator's own `token_created` and `token_revoked` events, and the audit history.

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::TokenId;
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
