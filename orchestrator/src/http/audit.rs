//! The audit history, for investigators (`Audit.Read.All`): who read which device's passwords
//! (which versions, from where, with which client and reason), who made or revoked which token,
//! who asked which device to rotate.
//!
//! `GET /v1.0/fleetlaps/auditEvents`, oldest first, optionally `?deviceId=…` and `?kind=…`, in
//! pages of `$top` (default and most 500) after `$skiptoken` (a history position).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use fleetlaps_proto::api::{AuditEntry, ODataCollection};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, AuditKind};

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use crate::auth::Scope;

/// The route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/auditEvents";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/auditEvents";
/// The largest page.
const PAGE_MAX: usize = 500;
/// The query parameters this route takes.
const PARAMETERS: &str = "deviceId, kind, $top, $skiptoken";

/// Lists the audit history.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    Query(parameters): Query<HashMap<String, String>>,
) -> Result<Json<ODataCollection<AuditEntry>>, ApiError> {
    principal.require(Scope::AuditRead)?;
    if let Some(unknown) = parameters
        .keys()
        .find(|key| !["deviceId", "kind", "$top", "$skiptoken"].contains(&key.as_str()))
    {
        return Err(ApiError::BadRequest(format!(
            "unknown query parameter {unknown:?}; allowed: {PARAMETERS}"
        )));
    }
    let kind = parameters
        .get("kind")
        .map(|name| {
            AuditKind::from_name(name).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "kind {name:?}: allowed: {}",
                    AuditKind::ALL.map(AuditKind::as_str).join(", ")
                ))
            })
        })
        .transpose()?;
    let device = parameters.get("deviceId");
    let top = match parameters.get("$top") {
        None => PAGE_MAX,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|top| (1..=PAGE_MAX).contains(top))
            .ok_or_else(|| ApiError::BadRequest(format!("$top {text:?}: allowed 1 to {PAGE_MAX}")))?,
    };
    let mut after = match parameters.get("$skiptoken") {
        None => 0,
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest(format!("$skiptoken {text:?}: allowed: a history position")))?,
    };
    let mut page = Vec::new();
    let mut more = false;
    // Scan in chunks until the page is full or the history ends.
    'scan: loop {
        let chunk = state.projections.audit(after, PAGE_MAX)?;
        let Some((last, _)) = chunk.last() else { break };
        let last = *last;
        for (sequence, envelope) in chunk {
            if kind.is_some_and(|kind| envelope.event.kind() != kind)
                || device.is_some_and(|device| device_of(&envelope.event) != Some(device.as_str()))
            {
                continue;
            }
            if page.len() == top {
                more = true;
                break 'scan;
            }
            page.push(entry(sequence, &envelope));
        }
        after = last;
    }
    let next_link = match (more, page.last()) {
        (true, Some(last)) => {
            let mut link = format!("{LIST_PATH}?$top={top}&$skiptoken={}", last.sequence);
            if let Some(kind) = kind {
                link.push_str(&format!("&kind={kind}"));
            }
            if let Some(device) = device {
                link.push_str(&format!("&deviceId={device}"));
            }
            Some(link)
        }
        _ => None,
    };
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: page,
        next_link,
    }))
}

/// The device an event is about, if it is about one.
fn device_of(event: &AuditEvent) -> Option<&str> {
    match event {
        AuditEvent::PasswordRead(body) => Some(body.device_id.as_str()),
        AuditEvent::RotationRequested(body) => Some(body.device_id.as_str()),
        AuditEvent::DeviceEnrolled(body) => Some(body.device_id.as_str()),
        AuditEvent::DeviceCloneDetected(body) => Some(body.device_id.as_str()),
        AuditEvent::PasswordResealed(body) => Some(body.device_id.as_str()),
        AuditEvent::EscrowKeyCreated(_)
        | AuditEvent::OrchestratorKeyCreated(_)
        | AuditEvent::TokenCreated(_)
        | AuditEvent::TokenRevoked(_)
        | AuditEvent::EnrollmentTokenCreated(_)
        | AuditEvent::EnrollmentTokenRevoked(_) => None,
    }
}

fn entry(sequence: u64, envelope: &AuditEnvelope) -> AuditEntry {
    let body = match serde_json::to_value(&envelope.event) {
        Ok(serde_json::Value::Object(mut fields)) => fields.remove("body").unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    AuditEntry {
        sequence,
        id: envelope.id.to_string(),
        time: envelope.time,
        kind: envelope.event.kind().as_str().to_owned(),
        body,
    }
}
