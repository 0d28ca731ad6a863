//! Breaches and their campaigns.
//!
//! - `POST /v1.0/fleetlaps/breaches` (`Breach.Declare`) with a [`BreachRequest`]: resolves the
//!   scope to devices now, records `breach_declared` and the devices (`breach_targeted`, in
//!   chunks), wakes the [`crate::campaigns`] runner, and answers 201 with the campaign.
//! - `GET /v1.0/fleetlaps/breaches` (`Breach.Declare` or `Audit.Read.All`): every campaign, paged.
//! - `GET /v1.0/fleetlaps/breaches/{breachId}`: one campaign with its progress: targeted,
//!   commanded, rotated, failed, offline-waiting, and the stragglers.
//! - `POST /v1.0/fleetlaps/breaches/{breachId}/cancel` (`Breach.Declare`): records
//!   `breach_ended` (cancelled); commands already sent stay with their devices.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use fleetlaps_proto::api::{BreachInfo, BreachRequest, ODataCollection};
use fleetlaps_proto::audit::AuditEvent;
use fleetlaps_proto::breach::{BreachEnded, BreachId, BreachOutcome, BreachSource};

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use super::odata::{self, QueryOptions};
use crate::auth::Scope;
use crate::campaigns::{self, BreachSignal, SignalError, info};
use crate::projection::CampaignRecord;

/// The collection's route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/breaches";
/// One campaign's route.
pub(super) const ITEM_PATH: &str = "/v1.0/fleetlaps/breaches/{breachId}";
/// The cancel action's route.
pub(super) const CANCEL_PATH: &str = "/v1.0/fleetlaps/breaches/{breachId}/cancel";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/breaches";
/// The most stragglers `show` names.
const STRAGGLERS_SHOWN: usize = 100;

/// Declares a breach.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn declare(
    State(state): State<AppState>,
    principal: Authenticated,
    body: Bytes,
) -> Result<(StatusCode, Json<BreachInfo>), ApiError> {
    principal.require(Scope::BreachDeclare)?;
    let request: BreachRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "the body is not a breach signal ({err}); expected {{\"reason\": \"…\", \"deadline\": \"RFC 3339\", \
             \"scope\": {{\"kind\": \"all\"}} or {{\"kind\": \"devices\", \"deviceIds\": […]}} or {{\"kind\": \
             \"readBy\", \"principal\": \"…\", \"since\": \"RFC 3339\"}} or {{\"kind\": \"authenticatedSince\", \
             \"since\": \"RFC 3339\"}}}}"
        ))
    })?;
    let signal = BreachSignal {
        reason: request.reason,
        deadline: request.deadline,
        scope: request.scope,
        declared_by: principal.0.name.clone(),
        declared_by_token_id: Some(principal.0.token_id),
        source: BreachSource::Api,
    };
    let campaign = campaigns::declare(&state.projections, state.journal.as_ref(), signal)
        .await
        .map_err(|err| match err {
            SignalError::Invalid(message) => ApiError::BadRequest(message),
            SignalError::Projection(err) => ApiError::Projection(err),
            SignalError::Journal(err) => ApiError::AuditUnavailable(err),
            SignalError::NotYetVisible => ApiError::NotYetVisible,
        })?;
    state.campaign_wake.notify_one();
    Ok((StatusCode::CREATED, Json(info(&campaign))))
}

/// Lists the campaigns, oldest first, one page at a time.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    options: QueryOptions,
) -> Result<Json<ODataCollection<BreachInfo>>, ApiError> {
    require_reader(&principal)?;
    options.allow_only(&["$top", "$skiptoken"], "the breach list")?;
    let page_size = options.page_size()?;
    let after = options.skip_token_as(BreachId::parse)?;
    let campaigns = state
        .projections
        .campaigns()?
        .into_iter()
        .filter(|campaign| after.is_none_or(|after| campaign.breach_id > after));
    let (page, next_link) = odata::page(campaigns, page_size, |last: &CampaignRecord| {
        odata::next_link(LIST_PATH, &options, &[], page_size, &last.breach_id.to_string())
    });
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: page.iter().map(info).collect(),
        next_link,
    }))
}

/// One campaign with its progress.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn get(
    State(state): State<AppState>,
    principal: Authenticated,
    Path(breach_id): Path<String>,
) -> Result<Json<BreachInfo>, ApiError> {
    require_reader(&principal)?;
    let campaign = campaign(&state, &breach_id)?;
    let mut shown = info(&campaign);
    let progress = if campaign.rotated >= campaign.target_count {
        // Every target rotated: nothing to look for among them.
        Progress::default()
    } else {
        // One read per target, and one per unrotated device: off the request threads.
        let projections = state.projections.clone();
        let breach_id = campaign.breach_id;
        crate::on_blocking_pool(move || progress(&projections, &breach_id)).await?
    };
    shown.failed = Some(progress.failed);
    shown.offline_waiting = Some(progress.offline_waiting);
    shown.stragglers = Some(progress.stragglers);
    Ok(Json(shown))
}

/// What a campaign's unrotated targets are waiting on.
#[derive(Default)]
struct Progress {
    /// Commanded, and failed since.
    failed: u32,
    /// Commanded, and not heard from since.
    offline_waiting: u32,
    /// The first [`STRAGGLERS_SHOWN`] not rotated yet, by device id.
    stragglers: Vec<fleetlaps_proto::ids::DeviceId>,
}

/// Reads every target of the campaign, and the device of every unrotated one.
fn progress(projections: &crate::projection::Projections, breach_id: &BreachId) -> Result<Progress, ApiError> {
    let mut progress = Progress::default();
    for target in projections.campaign_targets(breach_id)? {
        if target.rotated_at.is_some() {
            continue;
        }
        if progress.stragglers.len() < STRAGGLERS_SHOWN {
            progress.stragglers.push(target.device_id.clone());
        }
        let (Some(commanded_at), Some(device)) = (target.commanded_at, projections.device(&target.device_id)?) else {
            continue;
        };
        if device
            .last_failure
            .as_ref()
            .is_some_and(|failure| failure.time >= commanded_at)
        {
            progress.failed += 1;
        } else if device.last_seen < commanded_at {
            progress.offline_waiting += 1;
        }
    }
    Ok(progress)
}

/// Cancels a running campaign.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    principal: Authenticated,
    Path(breach_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Scope::BreachDeclare)?;
    let campaign = campaign(&state, &breach_id)?;
    if !campaign.state.is_active() {
        return Err(ApiError::BreachEnded {
            id: campaign.breach_id.to_string(),
            state: campaign.state.as_str(),
        });
    }
    let ended = AuditEvent::BreachEnded(BreachEnded {
        breach_id: campaign.breach_id,
        outcome: BreachOutcome::Cancelled {
            by: principal.0.name.clone(),
            by_token_id: Some(principal.0.token_id),
        },
    });
    if !state.record_visible(ended).await? {
        return Err(ApiError::NotYetVisible);
    }
    tracing::info!(breach_id = %campaign.breach_id, "campaign cancelled");
    Ok(StatusCode::NO_CONTENT)
}

/// Reading campaigns takes `Breach.Declare` or `Audit.Read.All`.
fn require_reader(principal: &Authenticated) -> Result<(), ApiError> {
    if principal.0.has(Scope::AuditRead) {
        return Ok(());
    }
    principal.require(Scope::BreachDeclare)
}

/// The campaign with the id in the path.
fn campaign(state: &AppState, breach_id: &str) -> Result<CampaignRecord, ApiError> {
    let breach_id = BreachId::parse(breach_id).map_err(|err| ApiError::BadRequest(err.to_string()))?;
    state
        .projections
        .campaign(&breach_id)?
        .ok_or_else(|| ApiError::BreachNotFound(breach_id.to_string()))
}
