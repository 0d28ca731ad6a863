//! The processing cycle and the rotation: a state machine persisted in sled,
//! pending → backed up → confirmed by the orchestrator → applied → committed.
//!
//! The order never changes: generate → record the rotation as pending, with the new password's
//! hash and its sealed backup, in one flushed batch → publish the backup and wait for
//! JetStream's ack → wait until the ORCHESTRATOR confirms it stored the backup durably and can
//! open it → only then write the hash to the account → record the commit and publish it.
//! JetStream's ack alone is not enough: a single 2.9 nats-server acknowledges before it syncs,
//! and a backup the orchestrator refuses (a schema it does not read, a key it does not hold)
//! would be a password nobody can return.
//!
//! Invariant (end to end): the account's password is always one the orchestrator holds and can
//! open. Recovery after a crash at any point compares the account's stored hash with the pending
//! rotation's hash and rolls forward; no plaintext password is needed for that, so none is kept.
//! A refused backup is abandoned with the account untouched; an unconfirmed one keeps the
//! rotation pending (the account untouched) until the orchestrator answers.
//!
//! The outbox bound (`outbox_limit`) covers every event kind and never blocks a backup: reports
//! (authentications, policy, failures, command outcomes) are queued only while two places stay
//! free, and are otherwise dropped and counted (`status` shows `OutboxDropped`); a rotation
//! begins only while those two places are free, for its backup and its commit, which are always
//! queued. So a flood of reports with NATS away can neither grow the outbox past the bound nor
//! stop a rotation; see [`crate::state`] for the rule.
//!
//! Image rollback: every cycle compares the device's state with the centre's current password
//! version (LAPS's `msLAPS-CurrentPasswordVersion`). When the centre has seen events this state
//! never emitted, the device was restored from an older copy: it starts a higher generation,
//! reports the rollback (LAPS 10015) and rotates at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::command::{
    BackupConfirmation, BackupOutcome, BackupRefusal, Command, CommandAction, CommandId, CurrentPasswordVersion,
};
use fleetlaps_proto::control::StatusReport;
use fleetlaps_proto::event::{
    AccountMissing, Envelope, Event, ImageRollbackDetected, PasswordBackedUp, PasswordRotated, PolicyApplied,
    RotationFailed, RotationReason, RotationStage, sealing_context,
};
use fleetlaps_proto::ids::{AccountName, DeviceName, EventId, RotationId};
use fleetlaps_proto::liveness::Heartbeat;
use fleetlaps_proto::password;
use fleetlaps_proto::policy::{BackupDirectory, Policy, PolicySource};
use fleetlaps_proto::seal::{self, EscrowPublicKey};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

use crate::account::{Account, AccountBackend, AccountError};
use crate::bus::{PublishError, Publisher};
use crate::clock::Clock;
use crate::config::ProcessorSettings;
use crate::fault::Faults;
use crate::metrics::{self, Metrics, RotationOutcome};
use crate::password_hash::PasswordHash;
use crate::state::{AgentState, CurrentCredential, OUTBOX_RESERVED, PendingRotation, RefusedBackup, StateError};

/// How long a rotation waiting for its confirmation first waits before it also reads the
/// centre's password version, in case the live confirmation was missed; each later wait is twice
/// the one before, up to [`CONFIRMATION_POLL_MAX`] ([`confirmation_poll`]).
const CONFIRMATION_POLL: Duration = Duration::from_secs(1);
/// The longest wait between two reads of the centre's password version during one rotation.
const CONFIRMATION_POLL_MAX: Duration = Duration::from_secs(8);

/// How long a rotation waits, after its `attempt`-th read of the centre's password version (the
/// first is 0), before it reads it again: [`CONFIRMATION_POLL`] doubled at each attempt, at most
/// [`CONFIRMATION_POLL_MAX`], less up to half of it chosen by the backup's event id (random
/// bits). So the devices a campaign commanded at once, all waiting on a busy centre, neither
/// read every second nor all in the same instant; the live confirmation answers most at once.
fn confirmation_poll(attempt: u32, event_id: &EventId) -> Duration {
    let full = CONFIRMATION_POLL
        .saturating_mul(1 << attempt.min(16))
        .min(CONFIRMATION_POLL_MAX);
    let bytes = event_id.as_bytes();
    let spread = f64::from(u16::from_be_bytes([bytes[14], bytes[15]])) / f64::from(u16::MAX);
    full.mul_f64(1.0 - spread / 2.0)
}

/// Why a cycle did not finish. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    /// The agent's own state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The managed account could not be found or changed.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The backup could not be handed to JetStream; the account keeps its password.
    #[error("backup not stored, account left unchanged: {0}")]
    Backup(#[source] PublishError),
    /// JetStream has the backup, but the orchestrator has not confirmed storing it yet.
    #[error(
        "backup of rotation {rotation_id} sent, but the orchestrator has not confirmed storing it within \
         {waited_secs} s (is it running?); the account keeps its password, and the rotation completes once \
         the orchestrator confirms"
    )]
    Unconfirmed {
        /// The rotation that waits.
        rotation_id: RotationId,
        /// How long this cycle waited.
        waited_secs: u64,
    },
    /// The orchestrator refused the backup; the rotation is abandoned, the account untouched.
    #[error("the orchestrator refused the backup of rotation {rotation_id} ({reason}: {detail}); the account keeps its password{}",
        if reason.retry_helps() { "; it rotates again once it has learnt the orchestrator's current escrow key" }
        else { "; automatic rotations stop until the agent is upgraded and restarted, or `fleetlaps-agent reset`" })]
    Refused {
        /// The abandoned rotation.
        rotation_id: RotationId,
        /// Why.
        reason: BackupRefusal,
        /// The orchestrator's explanation.
        detail: String,
    },
    /// An earlier backup was refused, and a new one would be refused the same way.
    #[error(
        "automatic rotation stopped: the orchestrator refused the backup of rotation {rotation_id} at {at} \
         ({reason}: {detail}); fix the cause (upgrade the agent or the orchestrator, or re-enroll the device \
         with this orchestrator), then restart the agent or run `fleetlaps-agent reset`"
    )]
    RefusedBefore {
        /// The refused rotation.
        rotation_id: RotationId,
        /// Why.
        reason: BackupRefusal,
        /// The orchestrator's explanation.
        detail: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Too many essential events (backups, commits) wait for NATS to leave room for another
    /// rotation's: rotating would risk losing one, so the agent does not.
    #[error("the outbox holds {pending} events (limit {limit}): rotation stopped until NATS takes them")]
    OutboxFull {
        /// Events waiting.
        pending: usize,
        /// The configured bound.
        limit: usize,
    },
    /// `reset` was asked for too soon after the previous one.
    #[error("reset throttled: the last manual reset was at {last}; try again after {next}")]
    Throttled {
        /// The previous manual reset.
        last: DateTime<Utc>,
        /// When the next is allowed.
        next: DateTime<Utc>,
    },
    /// A blocking task failed.
    #[error("account task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a cycle did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleOutcome {
    /// `BackupDirectory` is 0: nothing is managed.
    Disabled,
    /// The password is not due; nothing changed.
    NotDue {
        /// When it will be.
        expires_at: DateTime<Utc>,
    },
    /// The account got a new, backed-up password.
    Rotated {
        /// The rotation.
        rotation_id: RotationId,
        /// Why.
        reason: RotationReason,
    },
}

/// What a processor is made of.
pub struct ProcessorParts {
    /// Durable state and outbox.
    pub state: AgentState,
    /// JetStream.
    pub publisher: Publisher,
    /// The orchestrator's live backup confirmations (see [`Publisher::listen`]).
    pub confirmations: broadcast::Sender<BackupConfirmation>,
    /// Where the account's password lives.
    pub backend: Arc<dyn AccountBackend>,
    /// Now.
    pub clock: Arc<dyn Clock>,
    /// The policy in force.
    pub policy: Policy,
    /// Where it came from.
    pub policy_source: PolicySource,
    /// This device's host name.
    pub device_name: DeviceName,
    /// The key backups are sealed to, as enrolled; replaced by the centre's current one.
    pub escrow: EscrowPublicKey,
    /// The offline recovery key backups are also sealed to, if the orchestrator has one.
    pub recovery: Option<EscrowPublicKey>,
    /// Limits and timings.
    pub settings: ProcessorSettings,
    /// Kill points a test armed; none in production.
    pub faults: Faults,
    /// Where rotations, backups and the outbox are counted.
    pub metrics: Metrics,
}

/// The cycle and the rotation, over the agent's state. Everything that changes the account goes
/// through its methods, so the rotation invariant lives in this file.
pub struct Processor {
    state: AgentState,
    publisher: Publisher,
    confirmations: broadcast::Sender<BackupConfirmation>,
    backend: Arc<dyn AccountBackend>,
    clock: Arc<dyn Clock>,
    policy: Policy,
    policy_source: PolicySource,
    device_name: DeviceName,
    /// The key new backups are sealed to: the enrolled one until the centre names another.
    escrow: EscrowPublicKey,
    recovery: Option<EscrowPublicKey>,
    settings: ProcessorSettings,
    faults: Faults,
    metrics: Metrics,
    /// The error of the last cycle, if it failed (for `status`).
    last_error: Option<String>,
}

/// The orchestrator's answer to one backup, as far as a wait got.
enum Answer {
    Stored,
    Refused { reason: BackupRefusal, detail: String },
    NotYet,
}

impl Processor {
    /// Assembles a processor.
    pub fn new(parts: ProcessorParts) -> Self {
        let ProcessorParts {
            state,
            publisher,
            confirmations,
            backend,
            clock,
            policy,
            policy_source,
            device_name,
            escrow,
            recovery,
            settings,
            faults,
            metrics,
        } = parts;
        Self {
            state,
            publisher,
            confirmations,
            backend,
            clock,
            policy,
            policy_source,
            device_name,
            escrow,
            recovery,
            settings,
            faults,
            metrics,
            last_error: None,
        }
    }

    /// The agent's metrics, for the modules that count what they report.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Puts this device's heartbeat in the liveness bucket (every cycle): never on the history,
    /// and never a reason for a cycle or a rotation to fail; a failure is logged and the next
    /// cycle beats again. Skipped while NATS is unreachable, so it never waits for an ack that
    /// cannot come.
    pub async fn heartbeat(&self) {
        if !self.publisher.is_connected() {
            tracing::debug!("not connected to NATS: no heartbeat this cycle");
            return;
        }
        let current_rotation = match self.state.current() {
            Ok(current) => current.map(|current| current.rotation_id),
            Err(err) => {
                tracing::warn!(error = %err, "reading the current rotation for the heartbeat failed");
                None
            }
        };
        let now = self.clock.now();
        let heartbeat = Heartbeat {
            at: now,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            current_rotation,
        };
        match self.publisher.heartbeat(self.state.device_id(), &heartbeat).await {
            Ok(()) => self.metrics.heartbeat_sent(now),
            Err(err) => tracing::warn!(error = %err, "heartbeat not sent; the next cycle beats again"),
        }
    }

    /// Sets the gauges read from the state: the outbox's length, the current password's times.
    fn observe_state(&self) {
        self.metrics.set_outbox_len(self.state.outbox_len());
        if let Ok(Some(current)) = self.state.current() {
            self.metrics
                .set_current_password(current.applied_at, current.expires_at);
        }
    }

    /// This device's id.
    pub fn device_id(&self) -> &fleetlaps_proto::ids::DeviceId {
        self.state.device_id()
    }

    /// This device's host name.
    pub fn device_name(&self) -> &DeviceName {
        &self.device_name
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Now, on the agent's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Whether work waits that a quick retry may finish: events in the outbox, a rotation
    /// pending, a backup not yet confirmed, a rotation owed after a rollback or after a refusal
    /// that a new backup can overcome.
    pub fn busy(&self) -> Result<bool, CycleError> {
        Ok(self.state.outbox_len() > 0
            || self.state.pending()?.is_some()
            || !self.state.unconfirmed_backups()?.is_empty()
            || self.state.rollback_due()?
            || self
                .state
                .backup_refused()?
                .is_some_and(|refused| self.retry_helps(&refused)))
    }

    /// Whether a new backup can succeed where `refused` failed: only an unopenable one, and only
    /// once the agent seals to another escrow key than the refused backup was sealed to.
    fn retry_helps(&self, refused: &RefusedBackup) -> bool {
        refused.reason.retry_helps() && refused.sealed_to != self.escrow
    }

    /// Reads a record another module keeps in the state (see [`AgentState::get_record`]).
    pub fn get_record<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CycleError> {
        Ok(self.state.get_record(key)?)
    }

    /// Writes such a record together with an event, durably (see [`AgentState::put_record`]).
    pub async fn put_record<T: Serialize>(
        &self,
        key: &str,
        record: Option<&T>,
        time: DateTime<Utc>,
        event: Option<Event>,
    ) -> Result<Option<Envelope>, CycleError> {
        Ok(self.state.put_record(key, record, time, event).await?)
    }

    /// Queues one event in the outbox, durably; `None` when the outbox was full and the event,
    /// not an essential one, was dropped (see [`crate::state`]).
    pub async fn emit(&self, time: DateTime<Utc>, event: Event) -> Result<Option<Envelope>, CycleError> {
        Ok(self.state.emit(time, event).await?)
    }

    /// The managed account: `AdministratorAccountName`, or the account with UID 0.
    pub async fn managed_account(&self) -> Result<Account, CycleError> {
        self.resolve_account(self.policy.administrator_account_name().cloned())
            .await
    }

    /// The account named `name`, or with UID 0 when `None`.
    pub async fn resolve_account(&self, name: Option<AccountName>) -> Result<Account, CycleError> {
        let backend = Arc::clone(&self.backend);
        Ok(tokio::task::spawn_blocking(move || backend.resolve(name.as_ref())).await??)
    }

    /// Queues the policy in force as an event (LAPS 10022).
    pub async fn announce_policy(&self) -> Result<(), CycleError> {
        let event = Event::PolicyApplied(PolicyApplied {
            device_name: self.device_name.clone(),
            source: self.policy_source,
            policy: self.policy.clone(),
        });
        self.state.emit(self.clock.now(), event).await?;
        self.drain_quietly().await;
        Ok(())
    }

    /// At start: forgets a refusal (the agent may have been upgraded since), and compares the
    /// state with the centre's current password version before anything is emitted, so a
    /// restored device starts its new generation at once.
    pub async fn start(&mut self) -> Result<(), CycleError> {
        self.state.clear_backup_refused().await?;
        self.observe_state();
        self.detect_rollback().await?;
        Ok(())
    }

    /// Runs one processing cycle (LAPS 10003 … 10004/10005): finishes a pending rotation, sends
    /// what waits, compares the state with the centre's, and rotates when the password is
    /// missing or expired, after a rollback, or when `force` says so.
    #[tracing::instrument(skip_all, fields(device_id = %self.state.device_id()))]
    pub async fn process(&mut self, force: Option<RotationReason>) -> Result<CycleOutcome, CycleError> {
        tracing::debug!(event_code = 10003, ?force, "policy processing started");
        let outcome = self.process_inner(force, None).await;
        match &outcome {
            Ok(outcome) => {
                tracing::info!(event_code = 10004, ?outcome, "policy processing succeeded");
                self.last_error = self.outbox_problem();
            }
            Err(err) => {
                tracing::warn!(event_code = 10005, error = %err, "policy processing failed");
                self.last_error = Some(err.to_string());
            }
        }
        self.observe_state();
        outcome
    }

    /// `fleetlaps-agent reset` (LAPS `Reset-LapsPassword`, 10014), throttled.
    pub async fn reset(&mut self) -> Result<CycleOutcome, CycleError> {
        let now = self.clock.now();
        if let Some(last) = self.state.last_manual_reset()? {
            let next = last + self.settings.reset_min_interval;
            if now < next {
                return Err(CycleError::Throttled { last, next });
            }
        }
        self.state.manual_reset_at(now).await?;
        tracing::info!(event_code = 10014, "password reset requested by an administrator");
        self.process(Some(RotationReason::Manual)).await
    }

    /// Executes a command from the orchestrator once: a command id already executed is skipped.
    pub async fn execute(&mut self, command: Command) -> Result<Option<CycleOutcome>, CycleError> {
        if command.device_id != *self.state.device_id() {
            tracing::warn!(command_id = %command.id, device_id = %command.device_id, "command for another device ignored");
            return Ok(None);
        }
        if self.state.command_executed(&command.id)? {
            return Ok(None);
        }
        let CommandAction::RotatePassword { reason } = &command.action;
        tracing::info!(command_id = %command.id, %reason, "rotate command received");
        let outcome = self
            .process_inner(Some(RotationReason::Command), Some(command.id))
            .await;
        if let Err(err) = &outcome {
            self.last_error = Some(err.to_string());
        }
        self.observe_state();
        outcome.map(Some)
    }

    /// What `fleetlaps-agent status` shows.
    pub fn status(&self) -> Result<StatusReport, CycleError> {
        let current = self.state.current()?;
        let managed_account = self.backend.resolve(self.policy.administrator_account_name()).ok();
        let refused = self.state.backup_refused()?;
        Ok(StatusReport {
            device_id: self.state.device_id().to_string(),
            device_name: self.device_name.to_string(),
            policy: self.policy.clone(),
            policy_source: self.policy_source,
            managed_account: managed_account.map(|account| format!("{} (uid {})", account.name, account.uid)),
            last_rotation: current.as_ref().map(|current| current.applied_at),
            expires_at: current.as_ref().map(|current| current.expires_at),
            pending_rotation: self.state.pending()?.map(|pending| pending.rotation_id.to_string()),
            outbox_pending: self.state.outbox_len(),
            outbox_dropped: self.state.outbox_dropped()?,
            unconfirmed_backups: self.state.unconfirmed_backups()?.len(),
            post_authentication_reset_at: None,
            connected: self.publisher.is_connected(),
            last_error: self.last_error.clone(),
            last_backup_refusal: refused.map(|refused| {
                format!(
                    "{}: {} (rotation {}, at {})",
                    refused.reason, refused.detail, refused.rotation_id, refused.at
                )
            }),
        })
    }

    /// Records a live confirmation that arrived outside a rotation's wait (a re-sent backup's).
    pub fn confirmed(&self, confirmation: &BackupConfirmation) -> Result<(), CycleError> {
        if confirmation.outcome == BackupOutcome::Stored && self.state.backup_confirmed(&confirmation.event_id)? {
            self.metrics.backup_answered(metrics::BackupOutcome::Stored);
            tracing::debug!(event_id = %confirmation.event_id, "backup confirmed stored by the orchestrator");
        }
        Ok(())
    }

    /// Starts forwarding the orchestrator's live confirmations (to every receiver) and commands
    /// (to `commands`).
    pub async fn listen(&self, commands: tokio::sync::mpsc::Sender<Command>) -> anyhow::Result<()> {
        self.publisher
            .listen(self.state.device_id(), self.confirmations.clone(), commands)
            .await
    }

    /// The last command kept for this device, if any (how an offline device catches up).
    pub async fn last_command(&self) -> anyhow::Result<Option<Command>> {
        self.publisher.last_command(self.state.device_id()).await
    }

    /// A receiver of the live confirmations, for the run loop.
    pub fn subscribe_confirmations(&self) -> broadcast::Receiver<BackupConfirmation> {
        self.confirmations.subscribe()
    }

    /// Publishes what waits in the outbox, logging (not returning) a failure; the loop retries.
    /// For events queued outside a cycle, such as those of [`crate::postauth`].
    pub async fn publish_outbox(&self) {
        self.drain_quietly().await;
    }

    async fn process_inner(
        &mut self,
        force: Option<RotationReason>,
        command_id: Option<CommandId>,
    ) -> Result<CycleOutcome, CycleError> {
        if self.policy.backup_directory() == BackupDirectory::Disabled {
            self.drain_quietly().await;
            return Ok(CycleOutcome::Disabled);
        }
        if let Some(pending) = self.state.pending()? {
            let outcome = self.roll_forward(pending).await?;
            if force.is_none() {
                return Ok(outcome);
            }
        }
        self.drain_quietly().await;
        self.resend_unconfirmed().await;
        self.detect_rollback().await?;

        let refused = self.state.backup_refused()?;
        if force.is_none()
            && let Some(refused) = &refused
            && !self.retry_helps(refused)
        {
            return Err(CycleError::RefusedBefore {
                rotation_id: refused.rotation_id,
                reason: refused.reason,
                detail: refused.detail.clone(),
                at: refused.at,
            });
        }
        let current = self.state.current()?;
        let now = self.clock.now();
        let wanted_account = self.policy.administrator_account_name();
        let due = if self.state.rollback_due()? {
            Some(RotationReason::Rollback)
        } else if let Some(refused) = refused {
            // Retrying helps (the key was unknown): the rotation is still owed.
            Some(refused.reason_for_retry)
        } else {
            match &current {
                None => Some(RotationReason::Initial),
                Some(current) if wanted_account.is_some_and(|name| *name != current.account_name) => {
                    Some(RotationReason::Initial)
                }
                Some(current) if now >= current.expires_at => Some(RotationReason::Expired),
                Some(_) => None,
            }
        };
        match (force.or(due), current) {
            (None, Some(current)) => Ok(CycleOutcome::NotDue {
                expires_at: current.expires_at,
            }),
            (reason, _) => self.rotate(reason.unwrap_or(RotationReason::Initial), command_id).await,
        }
    }

    /// Compares the state with the centre's current password version. When the centre has
    /// applied an event at or after the position this state would give its next one, the
    /// device was restored from an older copy (or its state from an older backup): it starts a
    /// new generation, after everything the centre saw, and owes a rotation at once. Also learns
    /// the escrow keys to seal to. Without an answer from the centre nothing changes.
    async fn detect_rollback(&mut self) -> Result<(), CycleError> {
        let version = match self.publisher.password_version(self.state.device_id()).await {
            Ok(Some(version)) => version,
            Ok(None) => return Ok(()),
            Err(err) => {
                tracing::debug!(error = %err, "reading the current password version failed; will retry");
                return Ok(());
            }
        };
        self.learn_escrow_keys(&version);
        let next = self.state.next_position()?;
        if version.position < next {
            return Ok(());
        }
        if version.clone_detected {
            // Another running copy of this device moves the centre's position too: being behind
            // it is no sign of a rollback, and branching would only make the copies leapfrog.
            tracing::warn!(
                local_position = %next,
                centre_position = %version.position,
                "the centre has seen another running copy of this device (a clone); re-enroll one of them"
            );
            return Ok(());
        }
        let new_generation = (version.position.generation + 1).max(next.generation + 1);
        let local_rotation_id = self.state.current()?.map(|current| current.rotation_id);
        tracing::warn!(
            event_code = 10015,
            local_position = %next,
            centre_position = %version.position,
            ?local_rotation_id,
            centre_rotation_id = ?version.rotation_id,
            "image rollback detected: the centre has seen events this state never emitted; rotating at once"
        );
        let event = Event::ImageRollbackDetected(ImageRollbackDetected {
            local_rotation_id,
            centre_rotation_id: version.rotation_id,
            local_position: fleetlaps_proto::command::DevicePosition {
                generation: next.generation,
                sequence: next.sequence.saturating_sub(1),
            },
            centre_position: version.position,
            new_generation,
        });
        self.state
            .start_generation(new_generation, self.clock.now(), event)
            .await?;
        self.drain_quietly().await;
        Ok(())
    }

    fn learn_escrow_keys(&mut self, version: &CurrentPasswordVersion) {
        if version.escrow_public_key != self.escrow {
            tracing::info!(escrow_public_key = %version.escrow_public_key, "the orchestrator's escrow key changed; new backups are sealed to it");
            self.escrow = version.escrow_public_key;
        }
        self.recovery = version.escrow_recovery_public_key;
    }

    async fn rotate(
        &mut self,
        reason: RotationReason,
        command_id: Option<CommandId>,
    ) -> Result<CycleOutcome, CycleError> {
        // Room for this rotation's backup and commit. Reports never take those places (see
        // `state`), so only essential events still waiting can refuse a rotation here.
        let pending_events = self.state.outbox_len();
        if pending_events.saturating_add(OUTBOX_RESERVED) > self.settings.outbox_limit {
            let err = CycleError::OutboxFull {
                pending: pending_events,
                limit: self.settings.outbox_limit,
            };
            tracing::error!(error = %err, "rotation stopped: the outbox is full");
            self.report_failure(reason, None, RotationStage::Prepare, &err).await?;
            return Err(err);
        }
        let account = match self.managed_account().await {
            Ok(account) => account,
            Err(err) => {
                if let CycleError::Account(AccountError::Missing(account)) = &err {
                    tracing::error!(event_code = 10013, %account, "managed account not found");
                    self.metrics.rotation_ended(reason, RotationOutcome::Failed);
                    self.state
                        .emit(
                            self.clock.now(),
                            Event::AccountMissing(AccountMissing {
                                account: account.clone(),
                            }),
                        )
                        .await?;
                    self.drain_quietly().await;
                } else {
                    self.report_failure(reason, None, RotationStage::Prepare, &err).await?;
                }
                return Err(err);
            }
        };
        let password = password::generate(
            self.policy.password_complexity(),
            self.policy.password_length(),
            self.policy.passphrase_length(),
        );
        let password_hash = PasswordHash::new(&password, self.settings.password_hash_rounds);
        let rotation_id = RotationId::new();
        let now = self.clock.now();
        let expires_at = now + self.policy.password_age();
        let context = sealing_context(self.state.device_id(), &rotation_id);
        let sealed_password = seal::seal(&self.escrow, password.expose().as_bytes(), &context);
        let recovery_sealed_password = self
            .recovery
            .map(|recovery| seal::seal(&recovery, password.expose().as_bytes(), &context));
        drop(password);
        let backup = Event::PasswordBackedUp(PasswordBackedUp {
            rotation_id,
            device_name: self.device_name.clone(),
            account_name: account.name.clone(),
            account_uid: Some(account.uid),
            sealed_password,
            escrow_public_key: Some(self.escrow),
            recovery_sealed_password,
            expires_at,
            reason,
        });
        let pending = |backup_sequence, backup_event_id| PendingRotation {
            rotation_id,
            account_name: account.name.clone(),
            reason,
            started_at: now,
            expires_at,
            backup_sequence,
            backup_event_id: Some(backup_event_id),
            password_hash,
            command_id,
        };
        let (pending, _backup) = self.state.begin_rotation(now, pending, backup).await?;
        tracing::info!(%rotation_id, ?reason, account = %account.name, "rotation started");
        self.faults.point("after_pending");
        self.roll_forward(pending).await
    }

    /// Takes a pending rotation to its end: its backup acknowledged by JetStream and confirmed
    /// by the orchestrator, its hash on the account, its commit recorded. Safe to call again
    /// after a crash at any step.
    async fn roll_forward(&mut self, pending: PendingRotation) -> Result<CycleOutcome, CycleError> {
        // Until the orchestrator holds the backup and can open it, the account must not change;
        // nor while the outbox cannot be read or updated, even for a backup already confirmed:
        // a store that cannot record an ack would not record the commit either.
        let mut confirmations = self.confirmations.subscribe();
        // A backup still in the outbox leaves now, after the subscription: its live confirmation
        // is missed only through a broken connection, or when JetStream drops the backup as a
        // copy of one sent before a crash, so the centre's version is read only once the first
        // poll passes without it.
        let sent_now = self.state.in_outbox(pending.backup_sequence)?;
        self.drain_through(&pending).await?;
        if let Some(backup_event_id) = pending.backup_event_id
            && !self.state.backup_is_confirmed(&backup_event_id)?
        {
            self.resend_unconfirmed().await;
            self.faults.point("after_backup");
            match self.await_answer(&backup_event_id, &mut confirmations, sent_now).await {
                Answer::Stored => {
                    self.metrics.backup_answered(metrics::BackupOutcome::Stored);
                    self.state.backup_confirmed(&backup_event_id)?;
                    tracing::info!(event_code = 10029, rotation_id = %pending.rotation_id, "the orchestrator confirmed storing the backup");
                }
                Answer::Refused { reason, detail } => {
                    self.metrics.backup_answered(metrics::BackupOutcome::Refused(reason));
                    return Err(self.abandon(&pending, backup_event_id, reason, detail).await?);
                }
                Answer::NotYet => {
                    self.metrics.backup_answered(metrics::BackupOutcome::Unconfirmed);
                    return Err(CycleError::Unconfirmed {
                        rotation_id: pending.rotation_id,
                        waited_secs: self.settings.backup_confirmation_wait.as_secs(),
                    });
                }
            }
            self.faults.point("after_confirmation");
        }

        let account = self.resolve_account(Some(pending.account_name.clone())).await?;
        let backend = Arc::clone(&self.backend);
        let hash = pending.password_hash.clone();
        let applied = tokio::task::spawn_blocking(move || -> Result<bool, AccountError> {
            if backend.password_hash(&account)? == hash.as_str() {
                // A crash came after the write: it is there already.
                return Ok(false);
            }
            backend.set_password_hash(&account, &hash)?;
            Ok(true)
        })
        .await?;
        match applied {
            Ok(true) => {
                tracing::info!(event_code = 10020, rotation_id = %pending.rotation_id, account = %pending.account_name, "local account updated with the new password")
            }
            Ok(false) => {
                tracing::info!(rotation_id = %pending.rotation_id, "the account already has the pending password; committing")
            }
            Err(err) => {
                let err = CycleError::from(err);
                tracing::error!(event_code = 10019, error = %err, "setting the new password failed");
                self.report_failure(pending.reason, Some(pending.rotation_id), RotationStage::Apply, &err)
                    .await?;
                return Err(err);
            }
        }
        self.faults.point("after_apply");

        let now = self.clock.now();
        let current = CurrentCredential {
            rotation_id: pending.rotation_id,
            account_name: pending.account_name.clone(),
            applied_at: now,
            expires_at: pending.expires_at,
        };
        let rotated = PasswordRotated {
            rotation_id: pending.rotation_id,
            account_name: pending.account_name.clone(),
            command_id: pending.command_id,
        };
        self.state.complete_rotation(now, &current, rotated).await?;
        self.faults.point("after_commit");
        self.metrics.rotation_ended(pending.reason, RotationOutcome::Succeeded);
        self.metrics.set_current_password(now, pending.expires_at);
        tracing::info!(rotation_id = %pending.rotation_id, expires_at = %pending.expires_at, "password rotated");
        self.drain_quietly().await;
        Ok(CycleOutcome::Rotated {
            rotation_id: pending.rotation_id,
            reason: pending.reason,
        })
    }

    /// Publishes the outbox at least through the pending rotation's backup. A failure to read
    /// or update the outbox is an error like a failure to publish: either way the backup may
    /// not have left, so the account must not change.
    async fn drain_through(&self, pending: &PendingRotation) -> Result<(), CycleError> {
        match self.drain().await {
            Ok(()) => Ok(()),
            Err(DrainError::State(err)) => {
                tracing::error!(error = %err, rotation_id = %pending.rotation_id, "the outbox could not be read or updated; account left unchanged");
                Err(err.into())
            }
            Err(DrainError::Publish(err)) => {
                if self.state.in_outbox(pending.backup_sequence)? {
                    tracing::warn!(error = %err, rotation_id = %pending.rotation_id, "backup not acknowledged; account left unchanged");
                    return Err(CycleError::Backup(err));
                }
                // The backup went through; a later event is what waits.
                tracing::warn!(error = %err, "outbox not drained; will retry");
                Ok(())
            }
        }
    }

    /// Waits for the orchestrator's answer to the backup `event_id`: a live confirmation, or
    /// the newest backup's answer in the centre's password version (for one missed while
    /// disconnected), for at most the configured wait. The version is read at once, and again
    /// at every poll, unless the backup was `sent_now` (after `confirmations` subscribed): then
    /// first at the first poll.
    async fn await_answer(
        &self,
        event_id: &EventId,
        confirmations: &mut broadcast::Receiver<BackupConfirmation>,
        sent_now: bool,
    ) -> Answer {
        let deadline = tokio::time::Instant::now() + self.settings.backup_confirmation_wait;
        let answer = |confirmation: &BackupConfirmation| match &confirmation.outcome {
            BackupOutcome::Stored => Answer::Stored,
            BackupOutcome::Refused { reason, detail } => Answer::Refused {
                reason: *reason,
                detail: detail.clone(),
            },
        };
        let mut read_version = !sent_now;
        let mut listening = true;
        for attempt in 0.. {
            if read_version {
                match self.publisher.password_version(self.state.device_id()).await {
                    Ok(Some(version)) => {
                        if let Some(latest) = version
                            .latest_backup
                            .as_ref()
                            .filter(|latest| latest.event_id == *event_id)
                        {
                            return answer(latest);
                        }
                    }
                    Ok(None) => {}
                    Err(err) => tracing::debug!(error = %err, "reading the current password version failed"),
                }
            }
            read_version = true;
            let poll = tokio::time::Instant::now() + confirmation_poll(attempt, event_id);
            loop {
                tokio::select! {
                    received = confirmations.recv(), if listening => match received {
                        Ok(confirmation) if confirmation.event_id == *event_id => return answer(&confirmation),
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => listening = false,
                    },
                    () = tokio::time::sleep_until(poll.min(deadline)) => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Answer::NotYet
    }

    /// Gives up a rotation whose backup the orchestrator refused: the account never had the
    /// password. Reports the failure (LAPS 10005) and returns the error to show.
    async fn abandon(
        &mut self,
        pending: &PendingRotation,
        backup_event_id: EventId,
        reason: BackupRefusal,
        detail: String,
    ) -> Result<CycleError, CycleError> {
        let err = CycleError::Refused {
            rotation_id: pending.rotation_id,
            reason,
            detail: detail.clone(),
        };
        tracing::error!(event_code = 10005, error = %err, "backup refused by the orchestrator; account left unchanged");
        self.metrics.rotation_ended(pending.reason, RotationOutcome::Failed);
        let refused = RefusedBackup {
            rotation_id: pending.rotation_id,
            reason,
            detail,
            at: self.clock.now(),
            reason_for_retry: pending.reason,
            sealed_to: self.escrow,
        };
        let failed = Event::RotationFailed(RotationFailed {
            rotation_id: Some(pending.rotation_id),
            stage: RotationStage::Backup,
            error: err.to_string(),
        });
        self.state.abandon_rotation(&backup_event_id, &refused, failed).await?;
        if reason.retry_helps() {
            // The centre may have a new escrow key: learn it before the next attempt.
            if let Ok(Some(version)) = self.publisher.password_version(self.state.device_id()).await {
                self.learn_escrow_keys(&version);
            }
        }
        self.drain_quietly().await;
        Ok(err)
    }

    /// Reports a failed rotation (LAPS 10005) and counts it under `reason`.
    async fn report_failure(
        &self,
        reason: RotationReason,
        rotation_id: Option<RotationId>,
        stage: RotationStage,
        err: &CycleError,
    ) -> Result<(), CycleError> {
        self.metrics.rotation_ended(reason, RotationOutcome::Failed);
        let error = err.to_string();
        tracing::error!(%error, ?stage, "rotation failed");
        let event = Event::RotationFailed(RotationFailed {
            rotation_id,
            stage,
            error,
        });
        self.state.emit(self.clock.now(), event).await?;
        self.drain_quietly().await;
        Ok(())
    }

    /// Sends again the backups the orchestrator has not confirmed in time. Each keeps its event
    /// id, so JetStream or the orchestrator recognises a copy that did arrive.
    async fn resend_unconfirmed(&self) {
        let now = self.clock.now();
        let backups = match self.state.unconfirmed_backups() {
            Ok(backups) => backups,
            Err(err) => {
                tracing::error!(error = %err, "reading unconfirmed backups failed");
                return;
            }
        };
        for backup in backups {
            let in_outbox = self.state.in_outbox(backup.envelope.sequence).unwrap_or(true);
            if in_outbox || now < backup.last_sent + self.settings.backup_confirmation_timeout {
                continue;
            }
            tracing::info!(event_id = %backup.envelope.id, "backup not confirmed in time; sending it again");
            if let Err(err) = self.publisher.publish(&backup.envelope).await {
                tracing::warn!(error = %err, "re-sending a backup failed; will retry");
                return;
            }
            if let Err(err) = self.state.backup_resent(&backup.envelope.id, now) {
                tracing::error!(error = %err, "recording a re-sent backup failed");
            }
        }
    }

    /// Publishes the outbox in order, removing each event once acknowledged; stops at the first
    /// failure so that order is kept.
    async fn drain(&self) -> Result<(), DrainError> {
        let drained = async {
            while let Some(envelope) = self.state.outbox_first().map_err(DrainError::State)? {
                self.publisher.publish(&envelope).await.map_err(DrainError::Publish)?;
                self.state.acknowledged(&envelope).map_err(DrainError::State)?;
            }
            Ok(())
        }
        .await;
        self.metrics.set_outbox_len(self.state.outbox_len());
        drained
    }

    /// What status should say about events still waiting after a cycle drained what it could:
    /// NATS did not take them.
    fn outbox_problem(&self) -> Option<String> {
        let pending = self.state.outbox_len();
        if pending.saturating_add(OUTBOX_RESERVED) > self.settings.outbox_limit {
            Some(
                CycleError::OutboxFull {
                    pending,
                    limit: self.settings.outbox_limit,
                }
                .to_string(),
            )
        } else if pending > 0 {
            Some(format!(
                "{pending} events wait in the outbox: NATS has not acknowledged them yet"
            ))
        } else {
            None
        }
    }

    async fn drain_quietly(&self) {
        if let Err(err) = self.drain().await {
            tracing::warn!(error = %err, pending = self.state.outbox_len(), "outbox not drained; will retry");
        }
    }
}

/// Why the outbox was not drained.
#[derive(Debug, thiserror::Error)]
enum DrainError {
    /// NATS did not acknowledge an event.
    #[error(transparent)]
    Publish(PublishError),
    /// The outbox could not be read or updated.
    #[error(transparent)]
    State(StateError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waits_between_version_reads_double_up_to_the_most_and_are_spread_by_event_id() {
        let ids: Vec<EventId> = (0..200).map(|_| EventId::new()).collect();
        for id in &ids {
            let waits: Vec<Duration> = (0..8).map(|attempt| confirmation_poll(attempt, id)).collect();
            assert!(
                waits[0] >= CONFIRMATION_POLL / 2 && waits[0] <= CONFIRMATION_POLL,
                "{waits:?}"
            );
            for pair in waits.windows(2).take(3) {
                let ratio = pair[1].as_secs_f64() / pair[0].as_secs_f64();
                assert!((ratio - 2.0).abs() < 1e-6, "doubles: {waits:?}");
            }
            for wait in &waits[3..] {
                assert!(
                    *wait <= CONFIRMATION_POLL_MAX && *wait >= CONFIRMATION_POLL_MAX / 2,
                    "at most the most: {waits:?}"
                );
            }
            assert_eq!(confirmation_poll(u32::MAX, id), waits[7], "no overflow");
        }
        let firsts: std::collections::BTreeSet<Duration> = ids.iter().map(|id| confirmation_poll(0, id)).collect();
        assert!(firsts.len() > 100, "spread over the devices: {} distinct", firsts.len());
    }
}
