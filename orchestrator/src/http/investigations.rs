//! Investigations of one device, for investigators (`Audit.Read.All`); reading them discloses no
//! password, and no password, sealed or not, is in their answers.
//!
//! - `GET /v1.0/fleetlaps/devices/{deviceId}/timeline`: every event of the device and every
//!   orchestrator event about it, in the history's order, in pages like every collection (`$top`,
//!   `$skiptoken` = the last entry's stream sequence).
//! - `GET /v1.0/fleetlaps/devices/{deviceId}/exposure?at=TIME`: which password version was valid
//!   on the device at that instant, who read it, when it was used and when it was rotated away.
//!
//! The work is in [`crate::investigations`]; this file checks the request and shapes the answer.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use fleetlaps_proto::api::{ExposureReport, ODataCollection, TimelineEntry};
use fleetlaps_proto::ids::DeviceId;

use super::AppState;
use super::auth::Authenticated;
use super::device_local_credentials::DevicePath;
use super::error::ApiError;
use super::odata::{self, QueryOptions};
use crate::auth::Scope;
use crate::investigations::{self, InvestigationError};

/// A device's timeline's route.
pub(super) const TIMELINE_PATH: &str = "/v1.0/fleetlaps/devices/{deviceId}/timeline";
/// A device's exposure report's route.
pub(super) const EXPOSURE_PATH: &str = "/v1.0/fleetlaps/devices/{deviceId}/exposure";

/// Lists one page of a device's timeline, oldest first.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name, %device_id))]
pub(super) async fn timeline(
    State(state): State<AppState>,
    principal: Authenticated,
    DevicePath(device_id): DevicePath,
    options: QueryOptions,
    Query(parameters): Query<HashMap<String, String>>,
) -> Result<Json<ODataCollection<TimelineEntry>>, ApiError> {
    principal.require(Scope::AuditRead)?;
    options.allow_only(&["$top", "$skiptoken"], "a device's timeline")?;
    only_parameters(&parameters, &["$top", "$skiptoken"])?;
    known_device(&state, &device_id)?;
    let page_size = options.page_size()?;
    let after = options.skip_token_position()?;
    let events = investigations::timeline_page(
        &state.projections,
        state.device_events.as_ref(),
        &device_id,
        after,
        page_size.saturating_add(1),
    )
    .await
    .map_err(api_error)?;
    let path = TIMELINE_PATH.replace("{deviceId}", device_id.as_str());
    let (page, next_link) = odata::page(events, page_size, |last| {
        odata::next_link(&path, &options, &[], page_size, &last.sequence.to_string())
    });
    Ok(Json(ODataCollection {
        context: format!("$metadata#fleetlaps/devices('{device_id}')/timeline"),
        value: page.iter().map(|event| event.entry(&device_id)).collect(),
        next_link,
    }))
}

/// Reports which password version was valid on the device at `?at=`, and its exposure.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name, %device_id))]
pub(super) async fn exposure(
    State(state): State<AppState>,
    principal: Authenticated,
    DevicePath(device_id): DevicePath,
    options: QueryOptions,
    Query(parameters): Query<HashMap<String, String>>,
) -> Result<Json<ExposureReport>, ApiError> {
    principal.require(Scope::AuditRead)?;
    options.allow_only(&[], "a device's exposure report")?;
    only_parameters(&parameters, &["at"])?;
    let at = parse_at(parameters.get("at").map(String::as_str))?;
    known_device(&state, &device_id)?;
    let report = investigations::exposure_at(&state.projections, state.device_events.as_ref(), &device_id, at)
        .await
        .map_err(api_error)?;
    Ok(Json(report))
}

/// Refuses a query parameter not in `allowed`, naming those that are.
fn only_parameters(parameters: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match parameters.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(unknown) => Err(ApiError::BadRequest(format!(
            "unknown query parameter {:?}; allowed: {}",
            unknown.chars().take(100).collect::<String>(),
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

/// The instant `?at=` names.
fn parse_at(text: Option<&str>) -> Result<DateTime<Utc>, ApiError> {
    let text = text
        .ok_or_else(|| ApiError::BadRequest(format!("the query parameter at is required: {}", odata::TIME_FORMAT)))?;
    odata::time_parameter("at", text)
}

/// Fails with 404 unless the device enrolled.
fn known_device(state: &AppState, device_id: &DeviceId) -> Result<(), ApiError> {
    state
        .projections
        .device(device_id)?
        .map(|_| ())
        .ok_or_else(|| ApiError::DeviceNotFound(device_id.clone()))
}

fn api_error(err: InvestigationError) -> ApiError {
    match err {
        InvestigationError::Projection(err) => ApiError::Projection(err),
        InvestigationError::History(err) => ApiError::HistoryUnavailable(err),
        too_long @ InvestigationError::TooLong { .. } => ApiError::BadRequest(too_long.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_must_be_an_rfc_3339_time() {
        assert_eq!(
            parse_at(Some("2026-11-24T13:05:00+01:00")).unwrap(),
            DateTime::parse_from_rfc3339("2026-11-24T12:05:00Z").unwrap()
        );
        for bad in [None, Some("yesterday"), Some("2026-11-24"), Some("")] {
            let err = parse_at(bad).expect_err("refused");
            assert!(matches!(err, ApiError::BadRequest(_)), "{err:?}");
            assert!(err.to_string().contains("RFC 3339"), "{err}");
        }
    }
}
