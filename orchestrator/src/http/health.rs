//! The liveness probe: `GET /healthz`, unauthenticated. Besides `status`, it says how the
//! orchestrator reaches NATS and what the server can promise about what it acknowledged.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;

/// Where the probe is served.
pub(super) const PATH: &str = "/healthz";

/// Answers `{"status":"ok","nats":{…}}` while the process serves requests. `nats` names the
/// server's version, whether the connection is encrypted and authenticated, and the durability
/// that version gives an acknowledged event; with `insecure_nats = true` it carries a warning.
pub(super) async fn get(State(state): State<AppState>) -> Json<Value> {
    let facts = state.nats.facts();
    let mut nats = json!({
        "serverVersion": facts.server_version,
        "connected": facts.connected,
        "tls": facts.tls,
        "authenticated": !facts.insecure,
        "durability": facts.durability,
    });
    if facts.insecure {
        nats["warning"] = json!(
            "insecure_nats = true: connected to NATS without credentials; anyone who reaches the server can \
             publish on the history"
        );
    }
    Json(json!({ "status": "ok", "nats": nats }))
}
