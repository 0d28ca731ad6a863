//! Graph's device directory and Intune's "Rotate local admin password" action.
//!
//! - `GET /v1.0/devices` (`Device.Read.All`): every device the history knows, in Graph's `device`
//!   shape (`id`, `deviceId`, `displayName`, `operatingSystem`, `approximateLastSignInDateTime`:
//!   the time of its newest event), plus `tags` and `lastHeartbeatDateTime`: when the device last
//!   said it was alive (its last heartbeat in the liveness bucket, by the server's time; `null`
//!   when it never did since the bucket was made) and `isSilent`: whether that heartbeat, or its
//!   enrollment when it never beat, is older than `monitoring.silent_after_secs`; ordered by id,
//!   in pages like every collection (`$top`, `$skiptoken` = the last id seen).
//! - `GET /v1.0/devices/{deviceId}` (`Device.Read.All`): one device in the same shape, or 404 in
//!   the OData error shape when the history knows no such device.
//! - `POST /v1.0/deviceManagement/managedDevices/{deviceId}/rotateLocalAdminPassword`
//!   (`DeviceLocalCredential.Rotate`): records a `rotation_requested` event, then sends the device
//!   a rotate command, kept in JetStream until it takes it; answers 204 like Intune, with the
//!   command's id in `x-fleetlaps-command-id`. Asked again for the same device within
//!   `http.rotate_min_interval_secs`, it answers 429 with `Retry-After`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use fleetlaps_proto::api::{COMMAND_ID_HEADER, DeviceTagsRequest, ODataCollection};
use fleetlaps_proto::audit::{AuditEvent, DeviceTagsSet, RotationRequested};
use fleetlaps_proto::command::{Command, CommandAction, CommandId};
use fleetlaps_proto::ids::{DeviceId, DeviceTag};
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Authenticated, RequestContext};
use super::device_local_credentials::DevicePath;
use super::error::ApiError;
use super::odata::{self, QueryOptions};
use crate::auth::Scope;
use crate::projection::{DeviceRecord, DeviceState};

/// The directory's route.
pub(super) const LIST_PATH: &str = "/v1.0/devices";
/// One device's route.
pub(super) const DEVICE_PATH: &str = "/v1.0/devices/{deviceId}";
/// A device's tags' route.
pub(super) const TAGS_PATH: &str = "/v1.0/fleetlaps/devices/{deviceId}/tags";
/// The rotate action's route.
pub(super) const ROTATE_PATH: &str = "/v1.0/deviceManagement/managedDevices/{deviceId}/rotateLocalAdminPassword";

/// `@odata.context` of the directory.
const COLLECTION_CONTEXT: &str = "$metadata#devices";
/// `@odata.context` of one device.
const ENTITY_CONTEXT: &str = "$metadata#devices/$entity";

/// Lists the devices, ordered by id, one page at a time.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    options: QueryOptions,
) -> Result<Json<ODataCollection<Value>>, ApiError> {
    principal.require(Scope::DeviceRead)?;
    options.allow_only(&["$top", "$skiptoken"], "the device directory")?;
    let page_size = options.page_size()?;
    let after = options.skip_token_as(DeviceId::parse)?;
    // The page and one more, to know whether another page follows.
    let devices: Vec<DeviceRecord> = state
        .projections
        .devices_after(after.as_ref())
        .take(page_size.saturating_add(1))
        .collect::<Result<_, _>>()?;
    let (page, next_link) = odata::page(devices, page_size, |last: &DeviceRecord| {
        odata::next_link(LIST_PATH, &options, &[], page_size, last.device_id.as_str())
    });
    let now = Utc::now();
    let value = page
        .iter()
        .map(|device| directory_entry(&state, device, now))
        .collect::<Result<_, ApiError>>()?;
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value,
        next_link,
    }))
}

/// One device of the directory.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name, %device_id))]
pub(super) async fn get_one(
    State(state): State<AppState>,
    principal: Authenticated,
    DevicePath(device_id): DevicePath,
    options: QueryOptions,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::DeviceRead)?;
    options.allow_only(&[], "a single device")?;
    let device = state
        .projections
        .device(&device_id)?
        .ok_or(ApiError::DeviceNotFound(device_id))?;
    let mut entry = directory_entry(&state, &device, Utc::now())?;
    entry["@odata.context"] = json!(ENTITY_CONTEXT);
    Ok(Json(entry))
}

/// `device`'s entry in the directory, silent or not at `now`.
fn directory_entry(state: &AppState, device: &DeviceRecord, now: chrono::DateTime<Utc>) -> Result<Value, ApiError> {
    let is_silent = state.liveness.state(&state.projections, &device.standing(), now)? == DeviceState::Silent;
    Ok(json!({
        "id": device.device_id,
        "deviceId": device.device_id,
        "displayName": device.device_name,
        "operatingSystem": "Linux",
        "approximateLastSignInDateTime": device.last_seen,
        "tags": device.tags,
        "lastHeartbeatDateTime": state.liveness.last_seen(&device.device_id),
        "isSilent": is_silent,
    }))
}

/// Sets a device's tags, replacing the ones it had (`Admin`): records `device_tags_set` and
/// answers with the tags once the projections show them.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name, %device_id))]
pub(super) async fn set_tags(
    State(state): State<AppState>,
    principal: Authenticated,
    DevicePath(device_id): DevicePath,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::Admin)?;
    let request: DeviceTagsRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "the body is not a device's tags ({err}); expected {{\"tags\": [\"site:paris\", …]}}"
        ))
    })?;
    check_tags(&request.tags)?;
    state
        .projections
        .device(&device_id)?
        .ok_or_else(|| ApiError::DeviceNotFound(device_id.clone()))?;
    let set = AuditEvent::DeviceTagsSet(DeviceTagsSet {
        device_id: device_id.clone(),
        tags: request.tags.clone(),
        set_by: principal.0.name.clone(),
        set_by_token_id: Some(principal.0.token_id),
    });
    if !state.record_visible(set).await? {
        return Err(ApiError::NotYetVisible);
    }
    Ok(Json(json!({ "id": device_id, "tags": request.tags })))
}

/// Refuses more tags than a device may have.
pub(super) fn check_tags(tags: &[DeviceTag]) -> Result<(), ApiError> {
    if tags.len() > DeviceTag::MAX_PER_DEVICE {
        return Err(ApiError::BadRequest(format!(
            "{} tags: allowed at most {}",
            tags.len(),
            DeviceTag::MAX_PER_DEVICE
        )));
    }
    Ok(())
}

/// Asks one device to rotate its password now.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name, %device_id))]
pub(super) async fn rotate(
    State(state): State<AppState>,
    principal: Authenticated,
    DevicePath(device_id): DevicePath,
    context: RequestContext,
) -> Result<Response, ApiError> {
    principal.require(Scope::Rotate)?;
    state
        .projections
        .device(&device_id)?
        .ok_or_else(|| ApiError::DeviceNotFound(device_id.clone()))?;
    let now = Utc::now();
    reserve(&state, &device_id, now)?;
    let command = Command {
        id: CommandId::new(),
        device_id: device_id.clone(),
        issued_at: now,
        action: CommandAction::RotatePassword {
            reason: match &context.reason {
                Some(reason) => format!("requested by {}: {reason}", principal.0.name),
                None => format!("requested by {}", principal.0.name),
            },
        },
    };
    let requested = AuditEvent::RotationRequested(RotationRequested {
        command_id: command.id,
        device_id: device_id.clone(),
        principal: principal.0.name.clone(),
        principal_token_id: Some(principal.0.token_id),
        reason: context.reason,
    });
    // Recorded first: a rotation nobody can trace back to its requester is never sent.
    if let Err(err) = state.record(requested).await {
        release(&state, &device_id, now);
        return Err(err);
    }
    if let Err(err) = state.journal.command(command.clone()).await {
        release(&state, &device_id, now);
        return Err(ApiError::CommandUnavailable(err));
    }
    tracing::info!(command_id = %command.id, "rotation requested");
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        COMMAND_ID_HEADER,
        HeaderValue::from_str(&command.id.to_string()).expect("a command id is a valid header value"),
    );
    Ok(response)
}

/// Takes the device's rotate slot at `now`, or refuses with the seconds until it is free. The
/// last request is the later of this process's memory and the history's (which survives
/// restarts but lags by the consumer's delay).
fn reserve(state: &AppState, device_id: &DeviceId, now: chrono::DateTime<Utc>) -> Result<(), ApiError> {
    let interval = chrono::Duration::from_std(state.rotate_min_interval).unwrap_or(chrono::Duration::MAX);
    let recorded = state.projections.last_rotation_request(device_id)?;
    let mut requests = state
        .rotate_requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let last = requests.get(device_id).copied().max(recorded);
    if let Some(last) = last {
        let next = last + interval;
        if now < next {
            let wait = (next - now).num_milliseconds();
            let retry_after_secs = u64::try_from((wait + 999) / 1000).unwrap_or(1).max(1);
            return Err(ApiError::Throttled {
                what: format!("a rotation of device {device_id} was requested at {last}"),
                retry_after_secs,
            });
        }
    }
    requests.insert(device_id.clone(), now);
    Ok(())
}

/// Gives the slot back after a request that did not go through.
fn release(state: &AppState, device_id: &DeviceId, reserved_at: chrono::DateTime<Utc>) {
    let mut requests = state
        .rotate_requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if requests.get(device_id) == Some(&reserved_at) {
        requests.remove(device_id);
    }
}
