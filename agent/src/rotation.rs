//! The processing cycle and the rotation: a state machine persisted in sled,
//! pending → backed up → applied → confirmed.
//!
//! The order never changes: generate → record the rotation as pending, with the new password's
//! hash and its sealed backup, in one flushed batch → publish the backup and wait for
//! JetStream's ack → only then write the hash to the account → record the commit and publish it.
//! The backup is kept until the orchestrator confirms it stored it, and re-sent (same event id)
//! until then, because a single 2.9 nats-server acknowledges before it syncs to disk.
//!
//! Invariant: the account's password is always one the orchestrator holds, current or pending.
//! Recovery after a crash at any point compares the account's stored hash with the pending
//! rotation's hash and rolls forward: it finishes the backup, writes the hash if it is not
//! there yet, and commits. No plaintext password is needed for that, so none is kept.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use fleetlaps_proto::command::{Command, CommandAction, CommandId};
use fleetlaps_proto::control::StatusReport;
use fleetlaps_proto::event::{
    AccountMissing, CommandExecuted, Event, PasswordBackedUp, PasswordRotated, PolicyApplied, RotationFailed,
    RotationReason, RotationStage, sealing_context,
};
use fleetlaps_proto::ids::{DeviceName, RotationId};
use fleetlaps_proto::password;
use fleetlaps_proto::policy::{BackupDirectory, Policy, PolicySource};
use fleetlaps_proto::seal::{self, EscrowPublicKey};

use crate::account::{Account, AccountBackend, AccountError, PasswordHash};
use crate::bus::{PublishError, Publisher};
use crate::clock::Clock;
use crate::fault;
use crate::state::{AgentState, CurrentCredential, PendingRotation, StateError};

/// Why a cycle did not finish. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    /// The agent's own state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The managed account could not be found or changed.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The backup could not be stored; the account keeps its password.
    #[error("backup not stored, account left unchanged: {0}")]
    Backup(#[source] PublishError),
    /// Too many events wait for NATS: rotating would risk losing one, so the agent does not.
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

/// Limits and timings of the cycle.
#[derive(Debug, Clone, Copy)]
pub struct ProcessorSettings {
    /// At most this many events wait in the outbox before rotations stop.
    pub outbox_limit: usize,
    /// A backup not confirmed by the orchestrator within this time is sent again.
    pub backup_confirmation_timeout: chrono::Duration,
    /// `fleetlaps-agent reset` is refused when the previous one is more recent than this.
    pub reset_min_interval: chrono::Duration,
}

/// Everything a cycle needs.
pub struct Processor {
    /// Durable state and outbox.
    pub(crate) state: AgentState,
    /// JetStream.
    pub(crate) publisher: Publisher,
    /// Where the account's password lives.
    pub(crate) backend: Arc<dyn AccountBackend>,
    /// Now.
    pub(crate) clock: Arc<dyn Clock>,
    /// The policy in force.
    pub(crate) policy: Policy,
    /// Where it came from.
    pub(crate) policy_source: PolicySource,
    /// This device's host name.
    pub(crate) device_name: DeviceName,
    /// The key backups are sealed to.
    pub(crate) escrow: EscrowPublicKey,
    /// Limits and timings.
    pub(crate) settings: ProcessorSettings,
    /// The error of the last cycle, if it failed (for `status`).
    pub(crate) last_error: Option<String>,
}

impl Processor {
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

    /// Runs one processing cycle (LAPS 10003 … 10004/10005): finishes a pending rotation, sends
    /// what waits, re-sends unconfirmed backups, and rotates when the password is missing or
    /// expired, or when `force` says so.
    #[tracing::instrument(skip_all, fields(device_id = %self.state.device_id()))]
    pub async fn process(&mut self, force: Option<RotationReason>) -> Result<CycleOutcome, CycleError> {
        tracing::debug!(event_code = 10003, ?force, "policy processing started");
        let outcome = self.process_inner(force, None).await;
        match &outcome {
            Ok(outcome) => {
                tracing::info!(event_code = 10004, ?outcome, "policy processing succeeded");
                // A cycle with nothing due succeeds even while the outbox is at its bound; the
                // stop of rotations stays in `status` until the outbox drains.
                let pending = self.state.outbox_len();
                self.last_error = (pending >= self.settings.outbox_limit).then(|| {
                    CycleError::OutboxFull {
                        pending,
                        limit: self.settings.outbox_limit,
                    }
                    .to_string()
                });
            }
            Err(err) => {
                tracing::warn!(event_code = 10005, error = %err, "policy processing failed");
                self.last_error = Some(err.to_string());
            }
        }
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
        outcome.map(Some)
    }

    /// What `fleetlaps-agent status` shows.
    pub fn status(&self) -> Result<StatusReport, CycleError> {
        let current = self.state.current()?;
        let managed_account = self.backend.resolve(self.policy.administrator_account_name()).ok();
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
            unconfirmed_backups: self.state.unconfirmed_backups()?.len(),
            post_authentication_reset_at: None,
            connected: self.publisher.is_connected(),
            last_error: self.last_error.clone(),
        })
    }

    /// Forgets a backup the orchestrator confirmed storing.
    pub async fn confirmed(&self, event_id: &fleetlaps_proto::ids::EventId) -> Result<(), CycleError> {
        if self.state.backup_confirmed(event_id).await? {
            tracing::debug!(%event_id, "backup confirmed stored by the orchestrator");
        }
        Ok(())
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

        let current = self.state.current()?;
        let now = self.clock.now();
        let wanted_account = self.policy.administrator_account_name();
        let due = match &current {
            None => Some(RotationReason::Initial),
            Some(current) if wanted_account.is_some_and(|name| *name != current.account_name) => {
                Some(RotationReason::Initial)
            }
            Some(current) if now >= current.expires_at => Some(RotationReason::Expired),
            Some(_) => None,
        };
        match (force.or(due), current) {
            (None, Some(current)) => Ok(CycleOutcome::NotDue {
                expires_at: current.expires_at,
            }),
            (reason, _) => self.rotate(reason.unwrap_or(RotationReason::Initial), command_id).await,
        }
    }

    async fn rotate(
        &mut self,
        reason: RotationReason,
        command_id: Option<CommandId>,
    ) -> Result<CycleOutcome, CycleError> {
        let pending_events = self.state.outbox_len();
        if pending_events >= self.settings.outbox_limit {
            let err = CycleError::OutboxFull {
                pending: pending_events,
                limit: self.settings.outbox_limit,
            };
            tracing::error!(error = %err, "rotation stopped: the outbox is full");
            self.report_failure(None, RotationStage::Prepare, &err).await?;
            return Err(err);
        }
        let account = match self.resolve_account().await {
            Ok(account) => account,
            Err(err) => {
                if let CycleError::Account(AccountError::Missing(account)) = &err {
                    tracing::error!(event_code = 10013, %account, "managed account not found");
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
                    self.report_failure(None, RotationStage::Prepare, &err).await?;
                }
                return Err(err);
            }
        };
        let password = password::generate(
            self.policy.password_complexity(),
            self.policy.password_length(),
            self.policy.passphrase_length(),
        );
        let password_hash = PasswordHash::new(&password);
        let rotation_id = RotationId::new();
        let now = self.clock.now();
        let expires_at = now + self.policy.password_age();
        let sealed_password = seal::seal(
            &self.escrow,
            password.expose().as_bytes(),
            &sealing_context(self.state.device_id(), &rotation_id),
        );
        drop(password);
        let backup = Event::PasswordBackedUp(PasswordBackedUp {
            rotation_id,
            device_name: self.device_name.clone(),
            account_name: account.name.clone(),
            account_uid: Some(account.uid),
            sealed_password,
            expires_at,
            reason,
        });
        let pending = |backup_sequence| PendingRotation {
            rotation_id,
            account_name: account.name.clone(),
            reason,
            started_at: now,
            expires_at,
            backup_sequence,
            password_hash,
            command_id,
        };
        let (pending, _backup) = self.state.begin_rotation(now, pending, backup).await?;
        tracing::info!(%rotation_id, ?reason, account = %account.name, "rotation started");
        fault::point("after_pending");
        self.roll_forward(pending).await
    }

    /// Takes a pending rotation to its end: its backup acknowledged by JetStream, its hash on
    /// the account, its commit recorded. Safe to call again after a crash at any step.
    async fn roll_forward(&mut self, pending: PendingRotation) -> Result<CycleOutcome, CycleError> {
        // Until JetStream has the backup, the account must not change.
        if let Err(err) = self.drain().await {
            if self.state.in_outbox(pending.backup_sequence)? {
                tracing::warn!(error = %err, rotation_id = %pending.rotation_id, "backup not acknowledged; account left unchanged");
                return Err(CycleError::Backup(err));
            }
            // The backup went through; a later event is what waits.
            tracing::warn!(error = %err, "outbox not drained; will retry");
        }
        fault::point("after_backup");

        let account = self.resolve_account().await?;
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
                self.report_failure(Some(pending.rotation_id), RotationStage::Apply, &err)
                    .await?;
                return Err(err);
            }
        }
        fault::point("after_apply");

        let now = self.clock.now();
        let current = CurrentCredential {
            rotation_id: pending.rotation_id,
            account_name: pending.account_name.clone(),
            applied_at: now,
            expires_at: pending.expires_at,
        };
        let rotated = Event::PasswordRotated(PasswordRotated {
            rotation_id: pending.rotation_id,
            account_name: pending.account_name.clone(),
        });
        self.state.complete_rotation(now, &current, rotated).await?;
        if let Some(command_id) = pending.command_id {
            let executed = Event::CommandExecuted(CommandExecuted {
                command_id,
                rotation_id: Some(pending.rotation_id),
                error: None,
            });
            self.state.record_command(&command_id, now, executed).await?;
        }
        fault::point("after_commit");
        tracing::info!(rotation_id = %pending.rotation_id, expires_at = %pending.expires_at, "password rotated");
        self.drain_quietly().await;
        Ok(CycleOutcome::Rotated {
            rotation_id: pending.rotation_id,
            reason: pending.reason,
        })
    }

    async fn resolve_account(&self) -> Result<Account, CycleError> {
        let backend = Arc::clone(&self.backend);
        let name = self.policy.administrator_account_name().cloned();
        Ok(tokio::task::spawn_blocking(move || backend.resolve(name.as_ref())).await??)
    }

    async fn report_failure(
        &self,
        rotation_id: Option<RotationId>,
        stage: RotationStage,
        err: &CycleError,
    ) -> Result<(), CycleError> {
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
            if let Err(err) = self.state.backup_resent(&backup.envelope.id, now).await {
                tracing::error!(error = %err, "recording a re-sent backup failed");
            }
        }
    }

    /// Publishes the outbox in order, removing each event once acknowledged; stops at the first
    /// failure so that order is kept.
    async fn drain(&self) -> Result<(), PublishError> {
        loop {
            let envelope = match self.state.outbox_first() {
                Ok(Some(envelope)) => envelope,
                Ok(None) => return Ok(()),
                Err(err) => {
                    tracing::error!(error = %err, "reading the outbox failed");
                    return Ok(());
                }
            };
            self.publisher.publish(&envelope).await?;
            if let Err(err) = self.state.acknowledged(envelope.sequence).await {
                tracing::error!(error = %err, "removing an acknowledged event from the outbox failed");
                return Ok(());
            }
        }
    }

    async fn drain_quietly(&self) {
        if let Err(err) = self.drain().await {
            tracing::warn!(error = %err, pending = self.state.outbox_len(), "outbox not drained; will retry");
        }
    }
}

impl Processor {
    /// Publishes what waits in the outbox, logging (not returning) a failure; the loop retries.
    /// For events queued outside a cycle, such as those of [`crate::postauth`].
    pub(crate) async fn publish_outbox(&self) {
        self.drain_quietly().await;
    }
}
