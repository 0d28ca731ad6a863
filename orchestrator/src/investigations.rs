//! Investigations of one device: its timeline (every event of the device and every
//! orchestrator event about it, in the history's order) and the exposure of its password at an
//! instant (which version was valid, who read it, when it was used, when it was rotated away).
//!
//! Where the events come from: the device's own events are read from the history on its subjects
//! (`laps.events.<device>.>`, [`DeviceEvents`]); the orchestrator events about it are found
//! through the projections' per-device index (`ad/`, [`Projections::device_audit`]), which the
//! fold writes in the same batch as the event. Both are merged by stream sequence, up to what
//! the projections have folded, so the timeline never shows what they do not know yet.
//!
//! Nothing is verified again: a device event counts only if the fold applied it at that very
//! stream sequence ([`Projections::event_sequence`]), so a forged, malformed or refused message on
//! the device's subjects, and a re-sent copy of an event, are left out. Every event is decoded
//! with the `proto` types; what the timeline shows of it is built field by field here, so no
//! password, sealed or not, ever leaves in an entry or a report.
//!
//! The exposure report is a pure function of the timeline ([`exposure`]), unit-tested without
//! NATS.

use chrono::{DateTime, SecondsFormat, Utc};
use fleetlaps_proto::api::{ExposedVersion, ExposureRead, ExposureReport, ExposureUse, PendingVersion, TimelineEntry};
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent};
use fleetlaps_proto::breach::BreachOutcome;
use fleetlaps_proto::event::{AuthenticationOutcome, Envelope, Event};
use fleetlaps_proto::ids::{DeviceId, RotationId};
use fleetlaps_proto::subject;
use serde_json::{Value, json};

use crate::bus::{BusError, DeviceEvents, HistoryMessage};
use crate::projection::{ProjectionError, Projections};

/// How many of a device's events an exposure report reads at most: far more than a device makes
/// in years (failed authentications are aggregated), and a bound on one request's work.
pub const EXPOSURE_MAX_EVENTS: usize = 200_000;

/// How many events are read from the history at a time while building an exposure report.
const EXPOSURE_CHUNK: usize = 1000;

/// Why an investigation could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum InvestigationError {
    /// The projections could not be read.
    #[error("reading the projections")]
    Projection(#[from] ProjectionError),
    /// The history could not be read.
    #[error("reading the device's events from the history")]
    History(#[source] BusError),
    /// The device's history is longer than an exposure report reads.
    #[error(
        "device {device_id} has more than {EXPOSURE_MAX_EVENTS} events, more than an exposure report reads; \
         read its timeline page by page instead"
    )]
    TooLong {
        /// The device.
        device_id: DeviceId,
    },
}

/// What one timeline event is: a device's own, or the orchestrator's about the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// An event the device published.
    Device(Envelope),
    /// An orchestrator event naming the device.
    Orchestrator(AuditEnvelope),
}

/// One event of a device's timeline, at its place in the history.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineEvent {
    /// Its stream sequence.
    pub sequence: u64,
    /// The event.
    pub recorded: Recorded,
}

impl TimelineEvent {
    /// When it happened, by the clock of who recorded it.
    pub fn time(&self) -> DateTime<Utc> {
        match &self.recorded {
            Recorded::Device(envelope) => envelope.time,
            Recorded::Orchestrator(envelope) => envelope.time,
        }
    }

    /// The event's kind, by its wire name.
    pub fn kind(&self) -> &'static str {
        match &self.recorded {
            Recorded::Device(envelope) => envelope.event.kind().as_str(),
            Recorded::Orchestrator(envelope) => envelope.event.kind().as_str(),
        }
    }

    /// The entry the API shows for it, as seen from `device_id`'s timeline (a campaign's wave
    /// shows that device's command only): its actor, a summary and its relevant fields, never a
    /// password, sealed or not.
    pub fn entry(&self, device_id: &DeviceId) -> TimelineEntry {
        let described = match &self.recorded {
            Recorded::Device(envelope) => describe_device_event(envelope),
            Recorded::Orchestrator(envelope) => describe_orchestrator_event(&envelope.event, device_id),
        };
        let id = match &self.recorded {
            Recorded::Device(envelope) => envelope.id.to_string(),
            Recorded::Orchestrator(envelope) => envelope.id.to_string(),
        };
        TimelineEntry {
            sequence: self.sequence,
            id,
            time: self.time(),
            kind: self.kind().to_owned(),
            actor: described.actor,
            actor_token_id: described.actor_token_id,
            summary: described.summary,
            fields: described.fields,
        }
    }

    /// Whether an exposure report looks at it: backups, rotations, reads and authentications.
    fn concerns_exposure(&self) -> bool {
        match &self.recorded {
            Recorded::Device(envelope) => matches!(
                envelope.event,
                Event::PasswordBackedUp(_)
                    | Event::PasswordRotated(_)
                    | Event::AuthenticationSucceeded(_)
                    | Event::AuthenticationFailed(_)
            ),
            Recorded::Orchestrator(envelope) => matches!(envelope.event, AuditEvent::PasswordRead(_)),
        }
    }
}

/// The actor, summary and fields of one entry.
struct Described {
    actor: String,
    actor_token_id: Option<String>,
    summary: String,
    fields: Value,
}

/// The actor of a device's own events.
const DEVICE_ACTOR: &str = "device";
/// The actor of what the orchestrator decided by itself.
const ORCHESTRATOR_ACTOR: &str = "orchestrator";

impl Described {
    fn by_device(summary: String, fields: Value) -> Self {
        Self {
            actor: DEVICE_ACTOR.to_owned(),
            actor_token_id: None,
            summary,
            fields,
        }
    }

    fn by_orchestrator(summary: String, fields: Value) -> Self {
        Self {
            actor: ORCHESTRATOR_ACTOR.to_owned(),
            actor_token_id: None,
            summary,
            fields,
        }
    }

    fn by_principal(
        principal: &str,
        token_id: Option<fleetlaps_proto::audit::TokenId>,
        summary: String,
        fields: Value,
    ) -> Self {
        Self {
            actor: principal.to_owned(),
            actor_token_id: token_id.map(|id| id.to_string()),
            summary,
            fields,
        }
    }
}

/// A value's serde name (an enum's `snake_case` variant), for summaries.
fn wire_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// A time in summaries: RFC 3339 in UTC, to the second.
fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Rotation ids, joined for a summary.
fn rotation_list(rotation_ids: &[RotationId]) -> String {
    rotation_ids
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A device event's entry. The sealed passwords of a backup are left out.
fn describe_device_event(envelope: &Envelope) -> Described {
    let mut described = match &envelope.event {
        Event::PolicyApplied(body) => Described::by_device(
            format!("policy applied from {}", body.source),
            json!({
                "device_name": body.device_name,
                "source": body.source,
                "policy": body.policy,
            }),
        ),
        Event::PasswordBackedUp(body) => Described::by_device(
            format!(
                "password backed up: rotation {} ({})",
                body.rotation_id,
                wire_name(&body.reason)
            ),
            json!({
                "rotation_id": body.rotation_id,
                "device_name": body.device_name,
                "account_name": body.account_name,
                "reason": body.reason,
                "expires_at": body.expires_at,
                "escrow_public_key": body.escrow_public_key,
                "with_recovery_copy": body.recovery_sealed_password.is_some(),
            }),
        ),
        Event::PasswordRotated(body) => Described::by_device(
            match &body.command_id {
                Some(command_id) => format!(
                    "rotation {} applied to {}: command {command_id} executed",
                    body.rotation_id, body.account_name
                ),
                None => format!("rotation {} applied to {}", body.rotation_id, body.account_name),
            },
            json!({"rotation_id": body.rotation_id, "account_name": body.account_name, "command_id": body.command_id}),
        ),
        Event::RotationFailed(body) => Described::by_device(
            format!("rotation failed at {}: {}", wire_name(&body.stage), body.error),
            json!({"rotation_id": body.rotation_id, "stage": body.stage, "error": body.error}),
        ),
        Event::AccountMissing(body) => Described::by_device(
            format!("managed account {} missing: nothing rotated", body.account),
            json!({"account": body.account}),
        ),
        Event::AuthenticationSucceeded(body) | Event::AuthenticationFailed(body) => {
            let outcome = if matches!(envelope.event, Event::AuthenticationSucceeded(_)) {
                "succeeded"
            } else {
                "failed"
            };
            let times = if body.count == 1 {
                String::new()
            } else {
                format!(" {} times", body.count)
            };
            let from = body
                .remote_host
                .as_deref()
                .map(|host| format!(" from {host}"))
                .unwrap_or_default();
            Described::by_device(
                format!(
                    "authentication as {} {outcome}{times} via {}{from}",
                    body.account_name, body.service
                ),
                json!({
                    "account_name": body.account_name,
                    "service": body.service,
                    "remote_host": body.remote_host,
                    "tty": body.tty,
                    "count": body.count,
                    "first_at": body.first_at,
                    "last_at": body.last_at,
                    "reset_deadline": body.reset_deadline,
                }),
            )
        }
        Event::PostAuthenticationActionsStarted(body) => Described::by_device(
            format!("post-authentication actions {} started", body.actions),
            json!({"account_name": body.account_name, "actions": body.actions}),
        ),
        Event::PostAuthenticationActionsSucceeded(body) => Described::by_device(
            format!("post-authentication actions {} succeeded", body.actions),
            json!({"account_name": body.account_name, "actions": body.actions}),
        ),
        Event::PostAuthenticationActionsFailed(body) => Described::by_device(
            format!(
                "post-authentication actions {} failed (attempt {}): {}",
                body.actions, body.attempt, body.error
            ),
            json!({
                "account_name": body.account_name,
                "actions": body.actions,
                "attempt": body.attempt,
                "error": body.error,
            }),
        ),
        Event::CommandExecuted(body) => {
            let summary = match (&body.error, &body.rotation_id) {
                (Some(error), _) => format!("command {} failed: {error}", body.command_id),
                (None, Some(rotation_id)) => format!("command {} executed: rotation {rotation_id}", body.command_id),
                (None, None) => format!("command {} executed", body.command_id),
            };
            Described::by_device(
                summary,
                json!({"command_id": body.command_id, "rotation_id": body.rotation_id, "error": body.error}),
            )
        }
        Event::ImageRollbackDetected(body) => Described::by_device(
            format!(
                "image rollback detected: the device was at {}, the centre had seen {}; generation {} follows",
                body.local_position, body.centre_position, body.new_generation
            ),
            json!({
                "local_rotation_id": body.local_rotation_id,
                "centre_rotation_id": body.centre_rotation_id,
                "local_position": body.local_position,
                "centre_position": body.centre_position,
                "new_generation": body.new_generation,
            }),
        ),
    };
    if let Value::Object(fields) = &mut described.fields {
        fields.insert("position".to_owned(), json!(envelope.position()));
        fields.insert("instance".to_owned(), json!(envelope.instance));
    }
    described
}

/// An orchestrator event's entry, as seen from `device_id`'s timeline. A reseal's sealed
/// password is left out.
fn describe_orchestrator_event(event: &AuditEvent, device_id: &DeviceId) -> Described {
    match event {
        AuditEvent::PasswordRead(body) => {
            let reason = body
                .reason
                .as_deref()
                .map(|reason| format!(" for {reason:?}"))
                .unwrap_or_default();
            let from = body
                .source_address
                .as_deref()
                .map(|address| format!(" from {address}"))
                .unwrap_or_default();
            Described::by_principal(
                &body.principal,
                body.principal_token_id,
                format!(
                    "password read by {}{reason}{from}: rotations {}",
                    body.principal,
                    rotation_list(&body.rotation_ids)
                ),
                json!({
                    "principal": body.principal,
                    "principal_token_id": body.principal_token_id,
                    "rotation_ids": body.rotation_ids,
                    "reason": body.reason,
                    "source_address": body.source_address,
                    "client_name": body.client_name,
                    "client_version": body.client_version,
                }),
            )
        }
        AuditEvent::RotationRequested(body) => Described::by_principal(
            &body.principal,
            body.principal_token_id,
            format!("rotation requested by {}: command {}", body.principal, body.command_id),
            json!({
                "principal": body.principal,
                "principal_token_id": body.principal_token_id,
                "command_id": body.command_id,
                "reason": body.reason,
            }),
        ),
        AuditEvent::DeviceEnrolled(body) => Described::by_device(
            format!(
                "enrolled as {} with enrollment token {}",
                body.device_name, body.enrollment_token_id
            ),
            json!({
                "device_name": body.device_name,
                "public_key": body.public_key,
                "enrollment_token_id": body.enrollment_token_id,
                "tags": body.tags,
            }),
        ),
        AuditEvent::DeviceTagsSet(body) => Described::by_principal(
            &body.set_by,
            body.set_by_token_id,
            format!(
                "tags set by {}: {}",
                body.set_by,
                body.tags
                    .iter()
                    .map(fleetlaps_proto::ids::DeviceTag::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            json!({"set_by": body.set_by, "set_by_token_id": body.set_by_token_id, "tags": body.tags}),
        ),
        AuditEvent::DeviceCloneDetected(body) => Described::by_orchestrator(
            format!(
                "clone detected: instance {} ran while instance {} did",
                body.source.instance, body.other.instance
            ),
            json!({"source": body.source, "other": body.other, "evidence_event_id": body.evidence_event_id}),
        ),
        AuditEvent::PasswordResealed(body) => Described::by_orchestrator(
            format!(
                "the backup at sequence {} was sealed again to the escrow key of a recovery",
                body.backup_stream_sequence
            ),
            json!({"backup_stream_sequence": body.backup_stream_sequence}),
        ),
        AuditEvent::BreachTargeted(body) => Described::by_orchestrator(
            format!("targeted by the campaign of breach {}", body.breach_id),
            json!({"breach_id": body.breach_id}),
        ),
        AuditEvent::BreachWaveCommanded(body) => {
            let command = body.commands.iter().find(|command| command.device_id == *device_id);
            let summary = match command {
                Some(command) => match &command.covered_by {
                    Some(other) => format!(
                        "breach {}: covered by breach {other}'s command {}",
                        body.breach_id, command.command_id
                    ),
                    None => format!(
                        "breach {} commanded a rotation: command {}",
                        body.breach_id, command.command_id
                    ),
                },
                None => format!("breach {} commanded a wave", body.breach_id),
            };
            Described::by_orchestrator(
                summary,
                json!({
                    "breach_id": body.breach_id,
                    "command_id": command.map(|command| command.command_id),
                    "covered_by": command.and_then(|command| command.covered_by),
                }),
            )
        }
        AuditEvent::BreachDetected(body) => Described::by_orchestrator(
            format!(
                "detector {} involved the device ({} devices)",
                body.detector, body.device_count
            ),
            json!({
                "detection_id": body.detection_id,
                "detector": body.detector,
                "device_count": body.device_count,
                "window_start": body.window_start,
                "window_end": body.window_end,
                "authentication_count": body.authentication_count,
                "principal": body.principal,
                "breach_id": body.breach_id,
            }),
        ),
        AuditEvent::BreachEnded(body) => {
            let summary = match &body.outcome {
                BreachOutcome::DeadlinePassed { .. } => format!(
                    "breach {} passed its deadline with the device not rotated",
                    body.breach_id
                ),
                BreachOutcome::Completed => format!("breach {} completed", body.breach_id),
                BreachOutcome::Cancelled { by, .. } => format!("breach {} cancelled by {by}", body.breach_id),
            };
            Described::by_orchestrator(
                summary,
                json!({"breach_id": body.breach_id, "outcome": wire_name(&body.outcome)}),
            )
        }
        // Not about one device, so in no device's index; shown by kind only if ever met.
        AuditEvent::TokenCreated(_)
        | AuditEvent::TokenRevoked(_)
        | AuditEvent::EnrollmentTokenCreated(_)
        | AuditEvent::EnrollmentTokenRevoked(_)
        | AuditEvent::EscrowKeyCreated(_)
        | AuditEvent::OrchestratorKeyCreated(_)
        | AuditEvent::BreachDeclared(_)
        | AuditEvent::SignaturesVerified(_) => {
            Described::by_orchestrator(event.kind().as_str().replace('_', " "), json!({}))
        }
    }
}

/// The device event a history message holds, if the fold applied it there: decoded with the
/// proto types, on the device's own subject, naming the device, and applied at exactly this
/// stream sequence (not refused, not a re-sent copy).
fn applied_device_event(
    projections: &Projections,
    device_id: &DeviceId,
    message: &HistoryMessage,
) -> Result<Option<Envelope>, ProjectionError> {
    let Some((subject_device, kind)) = subject::parse_device_event(&message.subject) else {
        return Ok(None);
    };
    let Ok(envelope) = Envelope::from_json(&message.payload) else {
        return Ok(None);
    };
    if subject_device != *device_id || envelope.device_id != *device_id || envelope.event.kind() != kind {
        return Ok(None);
    }
    let applied_here = if crate::projection::is_report(kind) {
        !projections.report_passed_over(device_id, message.sequence)?
    } else {
        projections.event_sequence(&envelope.id)? == Some(message.sequence)
    };
    Ok(applied_here.then_some(envelope))
}

/// At most `limit` events of `device_id`'s timeline after stream sequence `after`, oldest first:
/// its own events from the history and the orchestrator events about it from the projections,
/// merged by stream sequence, up to what the projections have folded.
pub async fn timeline_page(
    projections: &Projections,
    history: &dyn DeviceEvents,
    device_id: &DeviceId,
    after: u64,
    limit: usize,
) -> Result<Vec<TimelineEvent>, InvestigationError> {
    let until = projections.applied_sequence();
    let mut events = Vec::new();
    let mut cursor = after;
    while events.len() < limit && cursor < until {
        let wanted = limit - events.len();
        let messages = history
            .device_events(device_id, cursor, until, wanted)
            .await
            .map_err(InvestigationError::History)?;
        let audits = projections.device_audit(device_id, cursor, until, wanted)?;
        // A full chunk may stop short of `until`: beyond its last sequence, the other source's
        // events cannot be placed yet.
        let mut horizon = until;
        if messages.len() == wanted
            && let Some(last) = messages.last()
        {
            horizon = horizon.min(last.sequence);
        }
        if audits.len() == wanted
            && let Some((last, _)) = audits.last()
        {
            horizon = horizon.min(*last);
        }
        let mut chunk = Vec::new();
        for message in messages.iter().filter(|message| message.sequence <= horizon) {
            if let Some(envelope) = applied_device_event(projections, device_id, message)? {
                chunk.push(TimelineEvent {
                    sequence: message.sequence,
                    recorded: Recorded::Device(envelope),
                });
            }
        }
        chunk.extend(
            audits
                .into_iter()
                .filter(|(sequence, _)| *sequence <= horizon)
                .map(|(sequence, envelope)| TimelineEvent {
                    sequence,
                    recorded: Recorded::Orchestrator(envelope),
                }),
        );
        chunk.sort_by_key(|event| event.sequence);
        chunk.truncate(wanted);
        events.extend(chunk);
        cursor = horizon;
    }
    events.truncate(limit);
    Ok(events)
}

/// The exposure of `device_id`'s password at `at` ([`exposure`]), from the events of its whole
/// timeline that concern it, read a chunk at a time, at most [`EXPOSURE_MAX_EVENTS`].
pub async fn exposure_at(
    projections: &Projections,
    history: &dyn DeviceEvents,
    device_id: &DeviceId,
    at: DateTime<Utc>,
) -> Result<ExposureReport, InvestigationError> {
    let mut relevant = Vec::new();
    let mut after = 0;
    let mut read = 0usize;
    loop {
        let chunk = timeline_page(projections, history, device_id, after, EXPOSURE_CHUNK).await?;
        let Some(last) = chunk.last() else {
            break;
        };
        after = last.sequence;
        read += chunk.len();
        if read > EXPOSURE_MAX_EVENTS {
            return Err(InvestigationError::TooLong {
                device_id: device_id.clone(),
            });
        }
        let full = chunk.len() == EXPOSURE_CHUNK;
        relevant.extend(chunk.into_iter().filter(TimelineEvent::concerns_exposure));
        if !full {
            break;
        }
    }
    Ok(exposure(device_id, &relevant, at))
}

/// A backup or a rotation the device applied, at its place in the history.
#[derive(Debug, Clone, Copy)]
struct Step {
    sequence: u64,
    time: DateTime<Utc>,
    rotation_id: RotationId,
}

/// Which password version of `device_id` was valid at `at`, from its timeline (`events`, in
/// stream order; other kinds are ignored): the version whose rotation was applied last (in the
/// history's order) among those applied at or before `at`; every read that returned it; the
/// device's authentications after it was applied and before the next rotation the device applied;
/// and that next rotation, or none while it is still current. A newer backup made at or before
/// `at` but not applied by then is reported as pending.
pub fn exposure(device_id: &DeviceId, events: &[TimelineEvent], at: DateTime<Utc>) -> ExposureReport {
    let mut backups: Vec<Step> = Vec::new();
    let mut applied: Vec<Step> = Vec::new();
    for event in events {
        if let Recorded::Device(envelope) = &event.recorded {
            let step = |rotation_id: RotationId| Step {
                sequence: event.sequence,
                time: envelope.time,
                rotation_id,
            };
            match &envelope.event {
                Event::PasswordBackedUp(body) if !backups.iter().any(|b| b.rotation_id == body.rotation_id) => {
                    backups.push(step(body.rotation_id));
                }
                Event::PasswordRotated(body) => applied.push(step(body.rotation_id)),
                _ => {}
            }
        }
    }
    backups.sort_by_key(|step| step.sequence);
    applied.sort_by_key(|step| step.sequence);
    let backup_of = |rotation_id: RotationId| backups.iter().find(|backup| backup.rotation_id == rotation_id);
    let valid = applied
        .iter()
        .filter(|step| step.time <= at && backup_of(step.rotation_id).is_some())
        .max_by_key(|step| step.sequence)
        .copied();
    let applied_by_then = |rotation_id: RotationId| {
        applied
            .iter()
            .any(|step| step.rotation_id == rotation_id && step.time <= at)
    };
    let pending = backups
        .iter()
        .filter(|backup| backup.time <= at && !applied_by_then(backup.rotation_id))
        .filter(|backup| {
            valid
                .and_then(|valid| backup_of(valid.rotation_id))
                .is_none_or(|valid_backup| backup.sequence > valid_backup.sequence)
        })
        .max_by_key(|backup| backup.sequence)
        .map(|backup| PendingVersion {
            rotation_id: backup.rotation_id.to_string(),
            backed_up_date_time: backup.time,
            backed_up_sequence: backup.sequence,
            applied_date_time: applied
                .iter()
                .find(|step| step.rotation_id == backup.rotation_id)
                .map(|step| step.time),
        });
    let Some(valid) = valid else {
        let mut summary = format!(
            "no password version of device {device_id} was applied at or before {}",
            timestamp(at)
        );
        if let Some(pending) = &pending {
            summary.push_str(&format!(
                "; rotation {} was backed up at {} but not yet applied{}",
                pending.rotation_id,
                timestamp(pending.backed_up_date_time),
                applied_later(pending)
            ));
        }
        return ExposureReport {
            device_id: device_id.clone(),
            at,
            version: None,
            pending,
            reads: Vec::new(),
            uses: Vec::new(),
            summary,
        };
    };
    let backup = backup_of(valid.rotation_id).copied().unwrap_or(valid);
    let rotated_away = applied
        .iter()
        .find(|step| step.sequence > valid.sequence && step.rotation_id != valid.rotation_id)
        .copied();
    let before_rotated_away = |sequence: u64| rotated_away.is_none_or(|away| sequence < away.sequence);
    let mut reads = Vec::new();
    let mut uses = Vec::new();
    for event in events {
        match &event.recorded {
            Recorded::Orchestrator(envelope) => {
                if let AuditEvent::PasswordRead(read) = &envelope.event
                    && read.device_id == *device_id
                    && read.rotation_ids.contains(&valid.rotation_id)
                {
                    reads.push(ExposureRead {
                        sequence: event.sequence,
                        time: envelope.time,
                        principal: read.principal.clone(),
                        principal_token_id: read.principal_token_id.map(|id| id.to_string()),
                        reason: read.reason.clone(),
                        source_address: read.source_address.clone(),
                        client_name: read.client_name.clone(),
                        before_rotated_away: before_rotated_away(event.sequence),
                    });
                }
            }
            Recorded::Device(envelope) => {
                let (outcome, observed) = match &envelope.event {
                    Event::AuthenticationSucceeded(observed) => (AuthenticationOutcome::Success, observed),
                    Event::AuthenticationFailed(observed) => (AuthenticationOutcome::Failure, observed),
                    _ => continue,
                };
                if event.sequence > valid.sequence && before_rotated_away(event.sequence) {
                    uses.push(ExposureUse {
                        sequence: event.sequence,
                        time: envelope.time,
                        outcome: wire_name(&outcome),
                        count: observed.count,
                        service: observed.service.clone(),
                        remote_host: observed.remote_host.clone(),
                        tty: observed.tty.clone(),
                        first_date_time: observed.first_at,
                        last_date_time: observed.last_at,
                    });
                }
            }
        }
    }
    reads.sort_by_key(|read| read.sequence);
    uses.sort_by_key(|used| used.sequence);
    let mut summary = format!(
        "rotation {} was the password of device {device_id} at {}: backed up at {}, applied at {}, read {} times, \
         used in {} authentication reports, ",
        valid.rotation_id,
        timestamp(at),
        timestamp(backup.time),
        timestamp(valid.time),
        reads.len(),
        uses.len(),
    );
    match rotated_away {
        Some(away) => summary.push_str(&format!(
            "rotated away at {} by rotation {}",
            timestamp(away.time),
            away.rotation_id
        )),
        None => summary.push_str("still current"),
    }
    if let Some(pending) = &pending {
        summary.push_str(&format!(
            "; rotation {} was backed up at {} but not yet applied{}",
            pending.rotation_id,
            timestamp(pending.backed_up_date_time),
            applied_later(pending)
        ));
    }
    ExposureReport {
        device_id: device_id.clone(),
        at,
        version: Some(ExposedVersion {
            rotation_id: valid.rotation_id.to_string(),
            backed_up_date_time: backup.time,
            backed_up_sequence: backup.sequence,
            applied_date_time: valid.time,
            applied_sequence: valid.sequence,
            rotated_away_date_time: rotated_away.map(|away| away.time),
            rotated_away_sequence: rotated_away.map(|away| away.sequence),
            rotated_away_by: rotated_away.map(|away| away.rotation_id.to_string()),
        }),
        pending,
        reads,
        uses,
        summary,
    }
}

/// " (applied at T)" or " (never applied)", for a pending version's sentence.
fn applied_later(pending: &PendingVersion) -> String {
    match pending.applied_date_time {
        Some(time) => format!(" (applied at {})", timestamp(time)),
        None => " (never applied)".to_owned(),
    }
}

#[cfg(test)]
mod tests;
