//! The audit history, for investigators (`Audit.Read.All`): who read which device's passwords
//! (which versions, from where, with which client and reason), who made or revoked which token,
//! who asked which device to rotate.
//!
//! `GET /v1.0/fleetlaps/auditEvents`, oldest first, optionally `?deviceId=…`, `?kind=…`,
//! `?principal=…` (what one person did: read, asked, made, revoked, declared) and `?since=…`
//! (RFC 3339), in
//! pages like every collection (`$top`, `$skiptoken` = the last history position seen,
//! `@odata.nextLink`).

use std::collections::{HashMap, VecDeque};

use axum::Json;
use axum::extract::{Query, State};
use fleetlaps_proto::api::{AuditEntry, ODataCollection};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, AuditKind};

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use super::odata::{self, QueryOptions};
use crate::auth::Scope;
use crate::projection::{ProjectionError, Projections};

/// The route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/auditEvents";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/auditEvents";
/// How many history entries are read from the store at a time while looking for matches.
const SCAN_CHUNK: usize = 500;
/// The query parameters this route takes besides OData's.
const PARAMETERS: &str = "deviceId, kind, principal, since, $top, $skiptoken";

/// Lists one page of the audit history.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    options: QueryOptions,
    Query(parameters): Query<HashMap<String, String>>,
) -> Result<Json<ODataCollection<AuditEntry>>, ApiError> {
    principal.require(Scope::AuditRead)?;
    options.allow_only(&["$top", "$skiptoken"], "the audit history")?;
    if let Some(unknown) = parameters
        .keys()
        .find(|key| !["deviceId", "kind", "principal", "since", "$top", "$skiptoken"].contains(&key.as_str()))
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
    let acting = parameters.get("principal");
    let since = parameters
        .get("since")
        .map(|text| odata::time_parameter("since", text))
        .transpose()?;
    let page_size = options.page_size()?;
    let after = options.skip_token_position()?;
    let matching = history_after(&state.projections, after)
        .filter(|entry| {
            entry.as_ref().map_or(true, |(_, envelope)| {
                kind.is_none_or(|kind| envelope.event.kind() == kind)
                    && device.is_none_or(|device| device_of(&envelope.event) == Some(device.as_str()))
                    && acting.is_none_or(|acting| principal_of(&envelope.event) == Some(acting.as_str()))
                    && since.is_none_or(|since| envelope.time >= since)
            })
        })
        .take(page_size.saturating_add(1))
        .collect::<Result<Vec<_>, _>>()?;
    let mut link_parameters = Vec::new();
    if let Some(kind) = kind {
        link_parameters.push(("kind", kind.as_str()));
    }
    if let Some(device) = device {
        link_parameters.push(("deviceId", device.as_str()));
    }
    if let Some(acting) = acting {
        link_parameters.push(("principal", acting.as_str()));
    }
    if let Some(since) = parameters.get("since") {
        link_parameters.push(("since", since.as_str()));
    }
    let (page, next_link) = odata::page(matching, page_size, |(sequence, _)| {
        odata::next_link(LIST_PATH, &options, &link_parameters, page_size, &sequence.to_string())
    });
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: page
            .iter()
            .map(|(sequence, envelope)| entry(*sequence, envelope))
            .collect(),
        next_link,
    }))
}

/// The history after position `after`, oldest first, read from the store a chunk at a time.
fn history_after(
    projections: &Projections,
    mut after: u64,
) -> impl Iterator<Item = Result<(u64, AuditEnvelope), ProjectionError>> + '_ {
    let mut chunk = VecDeque::new();
    let mut exhausted = false;
    std::iter::from_fn(move || {
        if chunk.is_empty() && !exhausted {
            match projections.audit(after, SCAN_CHUNK) {
                Ok(next) => {
                    exhausted = next.len() < SCAN_CHUNK;
                    if let Some((last, _)) = next.last() {
                        after = *last;
                    }
                    chunk.extend(next);
                }
                Err(err) => {
                    exhausted = true;
                    return Some(Err(err));
                }
            }
        }
        chunk.pop_front().map(Ok)
    })
}

/// The principal who did what an event records, if a person (a token) did it.
fn principal_of(event: &AuditEvent) -> Option<&str> {
    match event {
        AuditEvent::PasswordRead(body) => Some(&body.principal),
        AuditEvent::RotationRequested(body) => Some(&body.principal),
        AuditEvent::TokenCreated(body) => Some(&body.created_by),
        AuditEvent::TokenRevoked(body) => Some(&body.revoked_by),
        AuditEvent::EnrollmentTokenCreated(body) => Some(&body.created_by),
        AuditEvent::EnrollmentTokenRevoked(body) => Some(&body.revoked_by),
        AuditEvent::DeviceTagsSet(body) => Some(&body.set_by),
        AuditEvent::BreachDeclared(body) => Some(&body.declared_by),
        AuditEvent::BreachEnded(body) => match &body.outcome {
            fleetlaps_proto::breach::BreachOutcome::Cancelled { by, .. } => Some(by),
            _ => None,
        },
        AuditEvent::DeviceEnrolled(_)
        | AuditEvent::DeviceCloneDetected(_)
        | AuditEvent::EscrowKeyCreated(_)
        | AuditEvent::PasswordResealed(_)
        | AuditEvent::OrchestratorKeyCreated(_)
        | AuditEvent::BreachTargeted(_)
        | AuditEvent::BreachWaveCommanded(_)
        | AuditEvent::BreachDetected(_)
        | AuditEvent::SignaturesVerified(_) => None,
    }
}

/// The device an event is about, if it is about one.
fn device_of(event: &AuditEvent) -> Option<&str> {
    match event {
        AuditEvent::PasswordRead(body) => Some(body.device_id.as_str()),
        AuditEvent::RotationRequested(body) => Some(body.device_id.as_str()),
        AuditEvent::DeviceEnrolled(body) => Some(body.device_id.as_str()),
        AuditEvent::DeviceCloneDetected(body) => Some(body.device_id.as_str()),
        AuditEvent::PasswordResealed(body) => Some(body.device_id.as_str()),
        AuditEvent::DeviceTagsSet(body) => Some(body.device_id.as_str()),
        AuditEvent::EscrowKeyCreated(_)
        | AuditEvent::OrchestratorKeyCreated(_)
        | AuditEvent::TokenCreated(_)
        | AuditEvent::TokenRevoked(_)
        | AuditEvent::EnrollmentTokenCreated(_)
        | AuditEvent::EnrollmentTokenRevoked(_)
        // A campaign names many devices; an investigation finds them in its timeline.
        | AuditEvent::BreachDeclared(_)
        | AuditEvent::BreachTargeted(_)
        | AuditEvent::BreachWaveCommanded(_)
        | AuditEvent::BreachEnded(_)
        | AuditEvent::BreachDetected(_)
        | AuditEvent::SignaturesVerified(_) => None,
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
