//! The quarantine, for admins: `GET /v1.0/fleetlaps/quarantine` lists every stream message the
//! projections refused (forged, malformed, unopenable, from unknown devices, …), oldest first,
//! with its reason and position, never its payload.

use axum::Json;
use axum::extract::State;
use fleetlaps_proto::api::{ODataCollection, QuarantineEntry};

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use crate::auth::Scope;

/// The route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/quarantine";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/quarantine";

/// Lists the quarantine.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
) -> Result<Json<ODataCollection<QuarantineEntry>>, ApiError> {
    principal.require(Scope::Admin)?;
    let value = state
        .projections
        .quarantine()?
        .into_iter()
        .map(|record| QuarantineEntry {
            stream_sequence: record.stream_sequence,
            subject: record.subject,
            reason: record.reason.as_str().to_owned(),
            detail: record.detail,
            received_date_time: record.received_at,
        })
        .collect();
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value,
        next_link: None,
    }))
}
