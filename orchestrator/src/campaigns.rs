//! Breach campaigns: [`declare`], which every breach signal goes through (the API, and later the
//! NATS subject and the detectors), and [`CampaignRunner`], which drives every running campaign
//! from the projections, once a second and whenever a breach is declared.
//!
//! A declaration resolves the signal's scope to devices now and records them with it
//! (`breach_declared`, then `breach_targeted` in chunks), so a replay rebuilds the same campaign.
//!
//! Each step, for each running campaign: every device rotated → `breach_ended` (completed); past
//! its deadline → `breach_ended` naming the stragglers; otherwise the next wave, at most
//! `campaigns.wave_devices_per_second` devices not yet commanded, is recorded on the history
//! (`breach_wave_commanded`) and then sent, one rotate command per device on `LAPS_COMMANDS`,
//! where a device that is offline finds it when it returns. A device already waiting on a command
//! another running campaign sent after this breach was declared is counted on that command
//! (`covered_by`), so overlapping campaigns do not rotate it twice for one breach.
//!
//! Invariants: a wave is recorded before it is sent; the runner acts only with authority (the
//! projections caught up since start), so a restart never repeats a wave; after a restart it sends
//! again every command its campaigns recorded and are still waiting on (the same command ids, which
//! a device executes at most once), so a crash between recording and sending loses nothing.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::{AuditEvent, TokenId};
use fleetlaps_proto::breach::{
    BreachCommand, BreachDeclared, BreachEnded, BreachId, BreachOutcome, BreachScope, BreachSource, BreachTargeted,
    BreachWaveCommanded, DEVICES_PER_EVENT,
};
use fleetlaps_proto::command::{Command, CommandAction, CommandId};
use fleetlaps_proto::ids::DeviceId;
use futures::StreamExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusError, Journal};
use crate::health::Health;
use crate::projection::{CampaignRecord, CampaignState, CampaignTarget, ProjectionError, Projections};

/// How often the runner looks at the campaigns when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);
/// How many commands of a wave are on their way to the commands stream at once.
const COMMANDS_IN_FLIGHT: usize = 128;
/// How long the runner waits for the projections to show a wave it recorded.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a step of the runner failed; it is tried again at the next tick.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// The projections could not be read.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The history could not record a campaign event.
    #[error("recording a campaign event")]
    Journal(#[source] BusError),
}

/// A breach signal, from whichever source.
#[derive(Debug, Clone)]
pub struct BreachSignal {
    /// Why, for people.
    pub reason: String,
    /// When every device should have rotated.
    pub deadline: DateTime<Utc>,
    /// Which devices.
    pub scope: BreachScope,
    /// Who declares it (a token's name, or a detector's).
    pub declared_by: String,
    /// The id of the token that declares it, if a token does.
    pub declared_by_token_id: Option<TokenId>,
    /// Where it came from.
    pub source: BreachSource,
}

/// Why a breach signal was not declared.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The signal is not valid: the message names what was wrong and what is allowed.
    #[error("{0}")]
    Invalid(String),
    /// The projections could not be read.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The history could not record it.
    #[error("recording the breach")]
    Journal(#[source] BusError),
    /// Recorded, but the projections did not show it in time.
    #[error("the breach is recorded but not yet visible")]
    NotYetVisible,
}

/// The longest reason.
const REASON_MAX: usize = 500;
/// The latest deadline, from now.
const DEADLINE_MAX_DAYS: i64 = 90;

/// Validates a breach signal, resolves its scope to the devices it names now, records the breach
/// and its devices on the history, and returns its campaign once the projections show it. The
/// caller wakes the runner.
pub async fn declare(
    projections: &Projections,
    journal: &dyn Journal,
    signal: BreachSignal,
) -> Result<CampaignRecord, SignalError> {
    let reason = signal.reason.trim();
    if reason.is_empty() || reason.chars().count() > REASON_MAX || reason.chars().any(char::is_control) {
        return Err(SignalError::Invalid(format!(
            "reason: allowed 1 to {REASON_MAX} printable characters"
        )));
    }
    let now = Utc::now();
    if signal.deadline <= now || signal.deadline > now + chrono::Duration::days(DEADLINE_MAX_DAYS) {
        return Err(SignalError::Invalid(format!(
            "deadline {} is not allowed: allowed a time after now and within {DEADLINE_MAX_DAYS} days",
            signal.deadline
        )));
    }
    let targets = resolve(projections, &signal.scope, now)?;
    if targets.is_empty() {
        return Err(SignalError::Invalid(format!(
            "no device matches the scope ({}): a breach needs at least one device",
            signal.scope.describe()
        )));
    }
    let breach_id = BreachId::new();
    let declared = AuditEvent::BreachDeclared(BreachDeclared {
        breach_id,
        reason: reason.to_owned(),
        deadline: signal.deadline,
        scope: signal.scope,
        target_count: u32::try_from(targets.len()).unwrap_or(u32::MAX),
        declared_by: signal.declared_by,
        declared_by_token_id: signal.declared_by_token_id,
        source: signal.source,
    });
    journal.append(declared).await.map_err(SignalError::Journal)?;
    let targets: Vec<DeviceId> = targets.into_iter().collect();
    let mut last_sequence = 0;
    for chunk in targets.chunks(DEVICES_PER_EVENT) {
        last_sequence = journal
            .append(AuditEvent::BreachTargeted(BreachTargeted {
                breach_id,
                device_ids: chunk.to_vec(),
            }))
            .await
            .map_err(SignalError::Journal)?;
    }
    if !projections.wait_for_sequence(last_sequence, VISIBLE_TIMEOUT).await {
        return Err(SignalError::NotYetVisible);
    }
    let campaign = projections.campaign(&breach_id)?.ok_or(SignalError::NotYetVisible)?;
    tracing::info!(%breach_id, devices = campaign.target_count, "breach declared");
    Ok(campaign)
}

/// The devices a scope names now, each once, by id.
fn resolve(
    projections: &Projections,
    scope: &BreachScope,
    now: DateTime<Utc>,
) -> Result<BTreeSet<DeviceId>, SignalError> {
    let not_future = |since: DateTime<Utc>| {
        if since > now {
            Err(SignalError::Invalid(format!(
                "since {since} is in the future; allowed: a time up to now"
            )))
        } else {
            Ok(())
        }
    };
    Ok(match scope {
        BreachScope::All => projections
            .devices()?
            .into_iter()
            .map(|device| device.device_id)
            .collect(),
        BreachScope::Devices { device_ids } => {
            // The declaration records its scope: a list longer than this would not fit in one
            // event of the history.
            if device_ids.len() > DEVICES_PER_EVENT {
                return Err(SignalError::Invalid(format!(
                    "deviceIds holds {} devices; allowed: at most {DEVICES_PER_EVENT} (scope a larger set by tags, or \
                     declare it as several breaches)",
                    device_ids.len()
                )));
            }
            for device_id in device_ids {
                if projections.device(device_id)?.is_none() {
                    return Err(SignalError::Invalid(format!(
                        "device {device_id} is not enrolled; allowed: ids of enrolled devices"
                    )));
                }
            }
            device_ids.iter().cloned().collect()
        }
        BreachScope::Tags { tags } => {
            if tags.is_empty() {
                return Err(SignalError::Invalid(
                    "tags is empty; allowed: one or more device tags".to_owned(),
                ));
            }
            projections
                .devices()?
                .into_iter()
                .filter(|device| device.tags.iter().any(|tag| tags.contains(tag)))
                .map(|device| device.device_id)
                .collect()
        }
        BreachScope::ReadBy { principal, since } => {
            not_future(*since)?;
            if principal.trim().is_empty() {
                return Err(SignalError::Invalid(
                    "principal is empty; allowed: the name of a token that reads passwords".to_owned(),
                ));
            }
            projections.devices_read_by(principal, *since)?
        }
        BreachScope::AuthenticatedSince { since } => {
            not_future(*since)?;
            projections
                .devices()?
                .into_iter()
                .filter(|device| device.last_authentication.is_some_and(|at| at >= *since))
                .map(|device| device.device_id)
                .collect()
        }
    })
}

/// Takes breach signals sent over NATS ([`fleetlaps_proto::subject::BREACH_SIGNALS`]): each
/// carries a bearer token, checked as the API checks one (authority first, then the token, then
/// `Breach.Declare`), and goes through [`declare`] like the API's.
pub struct SignalDesk {
    /// Where scopes are resolved and campaigns read.
    pub projections: Projections,
    /// Where breaches are recorded.
    pub journal: Arc<dyn Journal>,
    /// The tokens a signal may carry.
    pub tokens: Arc<crate::auth::TokenStore>,
    /// Whether the projections may be trusted for tokens yet.
    pub health: Arc<Health>,
    /// Wakes the runner after a declaration.
    pub wake: Arc<Notify>,
}

impl SignalDesk {
    /// The answer to one signal: the campaign (`BreachInfo`), or an OData error naming what was
    /// wrong.
    pub async fn answer(&self, headers: Option<async_nats::HeaderMap>, payload: bytes::Bytes) -> Vec<u8> {
        let answer = match self.take(headers.as_ref(), &payload).await {
            Ok(campaign) => serde_json::to_vec(&info(&campaign)),
            Err((code, message)) => {
                tracing::warn!(%code, %message, "a breach signal over NATS was refused");
                serde_json::to_vec(&fleetlaps_proto::api::ODataError::new(code, message))
            }
        };
        answer.expect("answers serialise")
    }

    async fn take(
        &self,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Result<CampaignRecord, (&'static str, String)> {
        let unauthorised = |message: String| ("InvalidAuthenticationToken", message);
        self.health
            .authority()
            .map_err(|err| ("ServiceUnavailable", err.to_string()))?;
        let token = headers
            .and_then(|headers| headers.get("Authorization"))
            .and_then(|value| crate::auth::bearer_token(value.as_str()).map(str::to_owned))
            .ok_or_else(|| unauthorised("the signal has no `Authorization: Bearer <token>` header".to_owned()))?;
        let principal = self
            .tokens
            .authenticate(&token, Utc::now())
            .map_err(|err| ("InternalServerError", err.to_string()))?
            .map_err(|err| unauthorised(err.to_string()))?;
        if !principal.has(crate::auth::Scope::BreachDeclare) {
            return Err((
                "Authorization_RequestDenied",
                "insufficient privileges to complete the operation: it requires the Breach.Declare scope".to_owned(),
            ));
        }
        let request: fleetlaps_proto::api::BreachRequest = serde_json::from_slice(payload).map_err(|err| {
            (
                "Request_BadRequest",
                format!("the payload is not a breach signal ({err}); expected {{\"reason\", \"deadline\", \"scope\"}}"),
            )
        })?;
        let signal = BreachSignal {
            reason: request.reason,
            deadline: request.deadline,
            scope: request.scope,
            declared_by: principal.name,
            declared_by_token_id: Some(principal.token_id),
            source: BreachSource::Nats,
        };
        let campaign = declare(&self.projections, self.journal.as_ref(), signal)
            .await
            .map_err(|err| match err {
                SignalError::Invalid(message) => ("Request_BadRequest", message),
                other => ("ServiceUnavailable", other.to_string()),
            })?;
        self.wake.notify_one();
        Ok(campaign)
    }
}

/// A campaign as the API and the NATS answers show it.
pub fn info(campaign: &CampaignRecord) -> fleetlaps_proto::api::BreachInfo {
    fleetlaps_proto::api::BreachInfo {
        id: campaign.breach_id.to_string(),
        reason: campaign.reason.clone(),
        scope: campaign.scope.clone(),
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

/// Drives the running campaigns.
pub struct CampaignRunner {
    /// Where campaigns and their devices are read.
    projections: Projections,
    /// Where campaign events are recorded and commands sent.
    journal: Arc<dyn Journal>,
    /// Whether the projections may be acted on.
    health: Arc<Health>,
    /// At most this many devices per wave, one wave per tick.
    wave_devices_per_second: u32,
    /// Woken when a breach is declared.
    wake: Arc<Notify>,
}

impl CampaignRunner {
    /// A runner over these parts; `wake` is notified by the API after each declaration.
    pub fn new(
        projections: Projections,
        journal: Arc<dyn Journal>,
        health: Arc<Health>,
        wave_devices_per_second: u32,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            projections,
            journal,
            health,
            wave_devices_per_second,
            wake,
        }
    }

    /// Runs until `shutdown` is cancelled. A failed step is logged and tried again.
    pub async fn run(self, shutdown: CancellationToken) {
        // Campaigns whose recorded, unrotated commands this process has sent again.
        let mut resent = HashSet::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
                () = self.wake.notified() => {}
            }
            // Stale projections would repeat a wave: act only once they have caught up.
            if self.health.authority().is_err() {
                continue;
            }
            if let Err(err) = self.step(&mut resent).await {
                tracing::warn!(error = %err, "a campaign step failed; it is tried again");
            }
        }
    }

    /// One look at every running campaign.
    async fn step(&self, resent: &mut HashSet<BreachId>) -> Result<(), CampaignError> {
        for campaign in self.projections.campaigns()? {
            if campaign.state != CampaignState::Running {
                continue;
            }
            // The targets are read only when a step needs them: a campaign whose every device
            // is commanded waits for rotations, and the fold counts those in its record (a
            // fleet-wide campaign has a target per device).
            if resent.insert(campaign.breach_id) {
                let targets = self.projections.campaign_targets(&campaign.breach_id)?;
                self.resend_waiting(&campaign, &targets, resent).await;
            }
            if campaign.all_rotated() {
                tracing::info!(breach_id = %campaign.breach_id, devices = campaign.target_count, "campaign completed");
                self.end(&campaign, BreachOutcome::Completed).await?;
                continue;
            }
            if Utc::now() >= campaign.deadline {
                let targets = self.projections.campaign_targets(&campaign.breach_id)?;
                let stragglers: Vec<DeviceId> = targets
                    .iter()
                    .filter(|target| target.rotated_at.is_none())
                    .map(|target| target.device_id.clone())
                    .collect();
                tracing::warn!(
                    breach_id = %campaign.breach_id,
                    stragglers = stragglers.len(),
                    "campaign deadline passed with devices not rotated"
                );
                let outcome = BreachOutcome::DeadlinePassed {
                    straggler_count: u32::try_from(stragglers.len()).unwrap_or(u32::MAX),
                    stragglers: stragglers.into_iter().take(DEVICES_PER_EVENT).collect(),
                };
                self.end(&campaign, outcome).await?;
                continue;
            }
            if campaign.commanded < campaign.target_count {
                let targets = self.projections.campaign_targets(&campaign.breach_id)?;
                self.next_wave(&campaign, &targets, resent).await?;
            }
        }
        Ok(())
    }

    /// Records and sends the next wave of `campaign`.
    async fn next_wave(
        &self,
        campaign: &CampaignRecord,
        targets: &[CampaignTarget],
        resent: &mut HashSet<BreachId>,
    ) -> Result<(), CampaignError> {
        let budget = usize::try_from(self.wave_devices_per_second).unwrap_or(usize::MAX);
        let mut wave = Vec::new();
        for target in targets
            .iter()
            .filter(|target| target.command_id.is_none() && target.rotated_at.is_none())
            .take(budget)
        {
            let command = match self.covering_command(campaign, &target.device_id)? {
                Some((other, command_id)) => BreachCommand {
                    device_id: target.device_id.clone(),
                    command_id,
                    covered_by: Some(other),
                },
                None => BreachCommand {
                    device_id: target.device_id.clone(),
                    command_id: CommandId::new(),
                    covered_by: None,
                },
            };
            wave.push(command);
        }
        for chunk in wave.chunks(DEVICES_PER_EVENT) {
            // Recorded first: a command nobody can trace back to its breach is never sent.
            let sequence = self
                .journal
                .append(AuditEvent::BreachWaveCommanded(BreachWaveCommanded {
                    breach_id: campaign.breach_id,
                    commands: chunk.to_vec(),
                }))
                .await
                .map_err(CampaignError::Journal)?;
            tracing::info!(breach_id = %campaign.breach_id, devices = chunk.len(), "campaign wave recorded");
            if !self.send(campaign, chunk).await {
                // Sent again at the next step, with the same ids.
                resent.remove(&campaign.breach_id);
            }
            // The next step must see this wave, or it would command these devices again.
            self.projections.wait_for_sequence(sequence, VISIBLE_TIMEOUT).await;
        }
        Ok(())
    }

    /// Another running campaign's command, sent at or after `campaign` was declared and still
    /// waited on, that `device_id` will rotate for: the rotation counts for both.
    fn covering_command(
        &self,
        campaign: &CampaignRecord,
        device_id: &DeviceId,
    ) -> Result<Option<(BreachId, CommandId)>, CampaignError> {
        for other in self.projections.device_campaigns(device_id)? {
            if other == campaign.breach_id {
                continue;
            }
            if !self
                .projections
                .campaign(&other)?
                .is_some_and(|other| other.state.is_active())
            {
                continue;
            }
            let Some(target) = self.projections.campaign_target(&other, device_id)? else {
                continue;
            };
            if target.covered_by.is_none()
                && target.waiting()
                && target.commanded_at.is_some_and(|at| at >= campaign.declared_at)
                && let Some(command_id) = target.command_id
            {
                return Ok(Some((other, command_id)));
            }
        }
        Ok(None)
    }

    /// Sends again the commands `campaign` recorded and is still waiting on (after a restart,
    /// or a failed send): the same ids, so no device executes one twice.
    async fn resend_waiting(
        &self,
        campaign: &CampaignRecord,
        targets: &[CampaignTarget],
        resent: &mut HashSet<BreachId>,
    ) {
        let waiting: Vec<BreachCommand> = targets
            .iter()
            .filter(|target| target.waiting() && target.covered_by.is_none())
            .filter_map(|target| {
                Some(BreachCommand {
                    device_id: target.device_id.clone(),
                    command_id: target.command_id?,
                    covered_by: None,
                })
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        tracing::info!(breach_id = %campaign.breach_id, devices = waiting.len(), "sending the campaign's waiting commands again");
        if !self.send(campaign, &waiting).await {
            resent.remove(&campaign.breach_id);
        }
    }

    /// Sends the commands of `commands` that this campaign sends itself, many at once (each
    /// waits for its own acknowledgement, not for the one before); returns whether every one
    /// reached the commands stream.
    async fn send(&self, campaign: &CampaignRecord, commands: &[BreachCommand]) -> bool {
        let reason = format!("breach {}: {}", campaign.breach_id, campaign.reason);
        let sends: Vec<_> = commands
            .iter()
            .filter(|command| command.covered_by.is_none())
            .map(|command| {
                self.journal.command(Command {
                    id: command.command_id,
                    device_id: command.device_id.clone(),
                    issued_at: Utc::now(),
                    action: CommandAction::RotatePassword { reason: reason.clone() },
                })
            })
            .collect();
        let sent = futures::stream::iter(sends)
            .buffer_unordered(COMMANDS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await;
        let mut all_sent = true;
        for err in sent.into_iter().filter_map(Result::err) {
            tracing::warn!(breach_id = %campaign.breach_id, error = %err, "sending a campaign command failed; sent again later");
            all_sent = false;
        }
        all_sent
    }

    /// Records how `campaign` ended.
    async fn end(&self, campaign: &CampaignRecord, outcome: BreachOutcome) -> Result<(), CampaignError> {
        let sequence = self
            .journal
            .append(AuditEvent::BreachEnded(BreachEnded {
                breach_id: campaign.breach_id,
                outcome,
            }))
            .await
            .map_err(CampaignError::Journal)?;
        self.projections.wait_for_sequence(sequence, VISIBLE_TIMEOUT).await;
        Ok(())
    }
}
