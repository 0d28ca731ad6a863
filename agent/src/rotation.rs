//! The processing cycle and the rotation, in the order that never loses a password:
//! generate → record the rotation as pending with its sealed backup (sled, flushed) → publish the
//! backup and wait for JetStream's ack → only then set the account's password → record the
//! commit and publish it.
//!
//! Invariant: the account's password is always one the orchestrator holds, current or pending.
//! If the backup cannot be published, the account is not touched and the same backup (same
//! event id, so JetStream deduplicates it) is published again at the next cycle.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use fleetlaps_proto::event::{
    Event, PasswordBackedUp, PasswordRotated, PolicyApplied, RotationFailed, RotationReason, RotationStage,
    sealing_context,
};
use fleetlaps_proto::ids::{DeviceName, RotationId};
use fleetlaps_proto::password::{self, Password};
use fleetlaps_proto::policy::{BackupDirectory, Policy, PolicySource};
use fleetlaps_proto::seal::{self, EscrowPublicKey};

use crate::account::{Account, AccountBackend, AccountError};
use crate::bus::{PublishError, Publisher};
use crate::clock::Clock;
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
    /// The plaintext of the pending rotation's password while this process has it. Held only in
    /// memory: after a restart it is gone, and the pending rotation is replaced by a new one.
    pub(crate) in_flight: Option<(RotationId, Password)>,
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

    /// Runs one processing cycle: finishes a pending rotation, sends what waits in the outbox,
    /// and rotates when the password is missing or expired, or when `force` says so.
    #[tracing::instrument(skip_all, fields(device_id = %self.state.device_id()))]
    pub async fn process(&mut self, mut force: Option<RotationReason>) -> Result<CycleOutcome, CycleError> {
        if self.policy.backup_directory() == BackupDirectory::Disabled {
            self.drain_quietly().await;
            return Ok(CycleOutcome::Disabled);
        }
        if let Some(pending) = self.state.pending()? {
            // Its backup goes first: until JetStream has it, the account must not change.
            self.drain().await.map_err(CycleError::Backup)?;
            match self.in_flight.take() {
                Some((rotation_id, password)) if rotation_id == pending.rotation_id => {
                    return self.apply(pending, password).await;
                }
                _ => {
                    self.abandon(&pending).await?;
                    force = force.or(Some(pending.reason));
                }
            }
        }
        self.drain_quietly().await;

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
            (reason, _) => self.rotate(reason.unwrap_or(RotationReason::Initial)).await,
        }
    }

    async fn rotate(&mut self, reason: RotationReason) -> Result<CycleOutcome, CycleError> {
        let account = match self.resolve_account().await {
            Ok(account) => account,
            Err(err) => {
                self.report_failure(None, RotationStage::Prepare, &err).await?;
                return Err(err);
            }
        };
        let password = password::generate(
            self.policy.password_complexity(),
            self.policy.password_length(),
            self.policy.passphrase_length(),
        );
        let rotation_id = RotationId::new();
        let now = self.clock.now();
        let expires_at = now + self.policy.password_age();
        let sealed_password = seal::seal(
            &self.escrow,
            password.expose().as_bytes(),
            &sealing_context(self.state.device_id(), &rotation_id),
        );
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
        };
        let (pending, _backup) = self.state.begin_rotation(now, pending, backup).await?;
        tracing::info!(%rotation_id, ?reason, account = %account.name, "rotation started");
        if let Err(err) = self.drain().await {
            // The pending rotation and its password wait for the next cycle.
            self.in_flight = Some((rotation_id, password));
            tracing::warn!(error = %err, %rotation_id, "backup not acknowledged; account left unchanged");
            return Err(CycleError::Backup(err));
        }
        self.apply(pending, password).await
    }

    /// Sets the pending rotation's password on the account. Called only once its backup has
    /// left the outbox, that is, once JetStream acknowledged it.
    async fn apply(&mut self, pending: PendingRotation, password: Password) -> Result<CycleOutcome, CycleError> {
        debug_assert!(
            !self.state.in_outbox(pending.backup_sequence)?,
            "backup acknowledged before apply"
        );
        let applied = match self.resolve_account().await {
            Ok(account) => {
                let backend = Arc::clone(&self.backend);
                let password = password.clone();
                tokio::task::spawn_blocking(move || backend.set_password(&account, &password))
                    .await?
                    .map_err(CycleError::from)
            }
            Err(err) => Err(err),
        };
        if let Err(err) = applied {
            // Keep the pending rotation and its password: the next cycle tries again.
            self.in_flight = Some((pending.rotation_id, password));
            self.report_failure(Some(pending.rotation_id), RotationStage::Apply, &err)
                .await?;
            return Err(err);
        }
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
        tracing::info!(
            rotation_id = %pending.rotation_id,
            account = %pending.account_name,
            expires_at = %pending.expires_at,
            "password rotated"
        );
        self.drain_quietly().await;
        Ok(CycleOutcome::Rotated {
            rotation_id: pending.rotation_id,
            reason: pending.reason,
        })
    }

    /// Drops a pending rotation whose password this process no longer knows (it restarted):
    /// the account still has the previous password, or the pending one, and the orchestrator
    /// holds both; the new rotation that follows makes the state plain again.
    async fn abandon(&self, pending: &PendingRotation) -> Result<(), CycleError> {
        tracing::warn!(rotation_id = %pending.rotation_id, "pending rotation's password was lost in a restart; a new rotation replaces it");
        let failed = Event::RotationFailed(RotationFailed {
            rotation_id: Some(pending.rotation_id),
            stage: RotationStage::Apply,
            error: "the agent restarted before applying this password; a new rotation replaces it".to_owned(),
        });
        self.state.abandon_rotation(self.clock.now(), failed).await?;
        Ok(())
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
