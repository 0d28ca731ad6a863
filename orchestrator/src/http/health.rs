//! The health probe: `GET /healthz`, unauthenticated. 200 with `status: ok` once the
//! projections have caught up with the history since start and while the consumer folds; 503 with
//! `status: catching_up` or `unhealthy` (and the consumer's error) otherwise. Besides `status`, it
//! says how the orchestrator reaches NATS and what the server can promise about what it
//! acknowledged.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// Where the probe is served.
pub(super) const PATH: &str = "/healthz";

/// Answers `{"status":…,"projections":{…},"nats":{…}}`. `projections` gives the applied and
/// start sequences and the consumer's error while it fails; `nats` names the server's version,
/// whether the connection is encrypted and authenticated, and the durability that version gives an
/// acknowledged event; with `insecure_nats = true` it carries a warning.
pub(super) async fn get(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let report = state.health.report();
    let status = report.status();
    let mut projections = json!({
        "appliedSequence": report.applied,
        "startSequence": report.start_horizon,
        "caughtUp": report.caught_up,
    });
    if let Some(failure) = &report.consumer_failure {
        projections["consumerError"] = json!(failure);
    }
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
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({ "status": status, "projections": projections, "nats": nats })),
    )
}
