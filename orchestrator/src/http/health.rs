//! The liveness probe: `GET /healthz`, unauthenticated.

use axum::Json;
use serde_json::{Value, json};

/// Where the probe is served.
pub(super) const PATH: &str = "/healthz";

/// Answers `{"status":"ok"}` while the process serves requests.
pub(super) async fn get() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}
