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

use std::collections::BTreeSet;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use fleetlaps_proto::api::{BreachInfo, BreachRequest, ODataCollection};
use fleetlaps_proto::audit::AuditEvent;
use fleetlaps_proto::breach::{
    BreachDeclared, BreachEnded, BreachId, BreachOutcome, BreachScope, BreachSource, BreachTargeted, DEVICES_PER_EVENT,
};
use fleetlaps_proto::ids::DeviceId;

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use super::odata::{self, QueryOptions};
use crate::auth::Scope;
use crate::projection::CampaignRecord;

/// The collection's route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/breaches";
/// One campaign's route.
pub(super) const ITEM_PATH: &str = "/v1.0/fleetlaps/breaches/{breachId}";
/// The cancel action's route.
pub(super) const CANCEL_PATH: &str = "/v1.0/fleetlaps/breaches/{breachId}/cancel";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/breaches";
/// The longest reason.
const REASON_MAX: usize = 500;
/// The latest deadline, from now.
const DEADLINE_MAX_DAYS: i64 = 90;
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
    let reason = request.reason.trim();
    if reason.is_empty() || reason.chars().count() > REASON_MAX || reason.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "reason: allowed 1 to {REASON_MAX} printable characters"
        )));
    }
    let now = Utc::now();
    if request.deadline <= now || request.deadline > now + chrono::Duration::days(DEADLINE_MAX_DAYS) {
        return Err(ApiError::BadRequest(format!(
            "deadline {} is not allowed: allowed a time after now and within {DEADLINE_MAX_DAYS} days",
            request.deadline
        )));
    }
    let targets = resolve(&state, &request.scope, now)?;
    if targets.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "no device matches the scope ({}): a breach needs at least one device",
            request.scope.describe()
        )));
    }
    let breach_id = BreachId::new();
    let declared = AuditEvent::BreachDeclared(BreachDeclared {
        breach_id,
        reason: reason.to_owned(),
        deadline: request.deadline,
        scope: request.scope,
        target_count: u32::try_from(targets.len()).unwrap_or(u32::MAX),
        declared_by: principal.0.name.clone(),
        declared_by_token_id: Some(principal.0.token_id),
        source: BreachSource::Api,
    });
    state.record(declared).await?;
    let targets: Vec<DeviceId> = targets.into_iter().collect();
    let mut last_sequence = 0;
    for chunk in targets.chunks(DEVICES_PER_EVENT) {
        last_sequence = state
            .record(AuditEvent::BreachTargeted(BreachTargeted {
                breach_id,
                device_ids: chunk.to_vec(),
            }))
            .await?;
    }
    if !state
        .projections
        .wait_for_sequence(last_sequence, super::VISIBLE_TIMEOUT)
        .await
    {
        return Err(ApiError::NotYetVisible);
    }
    state.campaign_wake.notify_one();
    let campaign = state.projections.campaign(&breach_id)?.ok_or(ApiError::NotYetVisible)?;
    tracing::info!(%breach_id, devices = campaign.target_count, "breach declared");
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
    let (mut failed, mut offline_waiting) = (0, 0);
    let mut stragglers = Vec::new();
    for target in state.projections.campaign_targets(&campaign.breach_id)? {
        if target.rotated_at.is_some() {
            continue;
        }
        if stragglers.len() < STRAGGLERS_SHOWN {
            stragglers.push(target.device_id.clone());
        }
        let (Some(commanded_at), Some(device)) = (target.commanded_at, state.projections.device(&target.device_id)?)
        else {
            continue;
        };
        if device
            .last_failure
            .as_ref()
            .is_some_and(|failure| failure.time >= commanded_at)
        {
            failed += 1;
        } else if device.last_seen < commanded_at {
            offline_waiting += 1;
        }
    }
    shown.failed = Some(failed);
    shown.offline_waiting = Some(offline_waiting);
    shown.stragglers = Some(stragglers);
    Ok(Json(shown))
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

/// The devices a scope names now, each once, by id.
fn resolve(state: &AppState, scope: &BreachScope, now: chrono::DateTime<Utc>) -> Result<BTreeSet<DeviceId>, ApiError> {
    let not_future = |since: chrono::DateTime<Utc>| {
        if since > now {
            Err(ApiError::BadRequest(format!(
                "since {since} is in the future; allowed: a time up to now"
            )))
        } else {
            Ok(())
        }
    };
    Ok(match scope {
        BreachScope::All => state
            .projections
            .devices()?
            .into_iter()
            .map(|device| device.device_id)
            .collect(),
        BreachScope::Devices { device_ids } => {
            for device_id in device_ids {
                if state.projections.device(device_id)?.is_none() {
                    return Err(ApiError::BadRequest(format!(
                        "device {device_id} is not enrolled; allowed: ids of enrolled devices"
                    )));
                }
            }
            device_ids.iter().cloned().collect()
        }
        BreachScope::ReadBy { principal, since } => {
            not_future(*since)?;
            if principal.trim().is_empty() {
                return Err(ApiError::BadRequest(
                    "principal is empty; allowed: the name of a token that reads passwords".to_owned(),
                ));
            }
            state
                .projections
                .audit(0, usize::MAX)?
                .into_iter()
                .filter_map(|(_, envelope)| match envelope.event {
                    AuditEvent::PasswordRead(read) if read.principal == *principal && envelope.time >= *since => {
                        Some(read.device_id)
                    }
                    _ => None,
                })
                .collect()
        }
        BreachScope::AuthenticatedSince { since } => {
            not_future(*since)?;
            state
                .projections
                .devices()?
                .into_iter()
                .filter(|device| device.last_authentication.is_some_and(|at| at >= *since))
                .map(|device| device.device_id)
                .collect()
        }
    })
}

fn info(campaign: &CampaignRecord) -> BreachInfo {
    BreachInfo {
        id: campaign.breach_id.to_string(),
        reason: campaign.reason.clone(),
        scope: campaign.scope.describe(),
        state: campaign.state.as_str().to_owned(),
        declared_date_time: campaign.declared_at,
        declared_by: campaign.declared_by.clone(),
        deadline_date_time: campaign.deadline,
        ended_date_time: campaign.ended_at,
        targeted: campaign.targeted,
        commanded: campaign.commanded,
        rotated: campaign.rotated,
        failed: None,
        offline_waiting: None,
        stragglers: None,
    }
}
