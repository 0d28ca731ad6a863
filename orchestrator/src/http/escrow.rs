//! The escrow public key: `GET /fleetlaps/v1/escrow-public-key`, unauthenticated, because it is
//! public: agents seal passwords to it, and tools check that an agent was given the right one.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;

/// Where the key is served.
pub(super) const PATH: &str = "/fleetlaps/v1/escrow-public-key";

/// Answers `{"escrowPublicKey": "<key>"}`, in the text form agents' configs take.
#[tracing::instrument(skip_all)]
pub(super) async fn get_public_key(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "escrowPublicKey": state.escrow.public_key().to_string() }))
}
