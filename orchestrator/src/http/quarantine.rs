//! The quarantine, for admins: `GET /v1.0/fleetlaps/quarantine` lists the stream messages the
//! projections refused (forged, malformed, unopenable, from unknown devices, …), oldest first,
//! with their reason and position, never their payload.
//!
//! It pages like every collection (`$top`, `$skiptoken` = the last stream sequence seen,
//! `@odata.nextLink`). The quarantine keeps at most `quarantine.max_entries` messages; each page
//! says so in `@fleetlaps.maxEntries`, and how many older ones were dropped to keep that bound in
//! `@fleetlaps.droppedCount` (and `@fleetlaps.droppedCountByReason`).

use axum::Json;
use axum::extract::State;
use fleetlaps_proto::api::{QuarantineCollection, QuarantineEntry};

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use super::odata::{self, QueryOptions};
use crate::auth::Scope;

/// The route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/quarantine";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/quarantine";

/// Lists one page of the quarantine.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    options: QueryOptions,
) -> Result<Json<QuarantineCollection>, ApiError> {
    principal.require(Scope::Admin)?;
    options.allow_only(&["$top", "$skiptoken"], "the quarantine")?;
    let page_size = options.page_size()?;
    let after = options
        .skip_token_as(|token| {
            token
                .parse::<u64>()
                .map_err(|_| format!("{token:?}: allowed: a stream sequence"))
        })?
        .unwrap_or(0);
    let records = state.projections.quarantine_after(after, page_size.saturating_add(1))?;
    let (page, next_link) = odata::page(records, page_size, |last| {
        odata::next_link(LIST_PATH, &options, &[], page_size, &last.stream_sequence.to_string())
    });
    let dropped = state.projections.quarantine_dropped()?;
    Ok(Json(QuarantineCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: page
            .into_iter()
            .map(|record| QuarantineEntry {
                stream_sequence: record.stream_sequence,
                subject: record.subject,
                reason: record.reason.as_str().to_owned(),
                detail: record.detail,
                received_date_time: record.received_at,
            })
            .collect(),
        next_link,
        max_entries: state.projections.quarantine_max_entries(),
        dropped_count: dropped.iter().map(|(_, count)| count).sum(),
        dropped_count_by_reason: dropped
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .map(|(reason, count)| (reason.as_str().to_owned(), count))
            .collect(),
    }))
}
