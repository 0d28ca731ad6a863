//! The escrow key against the history: the check at every start, `escrow rotate` and `recover`.
//! Every escrow record and resealed password is signed with the orchestrator key
//! ([`crate::orchestrator_key`]), checked first, as at start.
//!
//! The history holds the public half of every escrow key (`escrow_key_created`); the key file
//! holds the secret halves. Start-up compares the two and never makes a key while the history
//! names one, so an operator who wiped the data directory hears about it instead of getting a
//! new key that opens none of the stored passwords.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use fleetlaps_proto::audit::{AuditEvent, AuditKind, EscrowKeyCreated, EscrowKeyReason, PasswordResealed};
use fleetlaps_proto::event::{Envelope, Event, EventKind, sealing_context};
use fleetlaps_proto::ids::{DeviceId, RotationId};
use fleetlaps_proto::seal::{self, EscrowPublicKey, SealedBox};
use fleetlaps_proto::signature::OrchestratorSigningKey;

use crate::Config;
use crate::bus::{self, History, Journal};
use crate::data_dir::DataDirLock;
use crate::escrow::{self, EscrowKeyring, KeyCheck, RecordedKey};
use crate::orchestrator_key;
use crate::projection::{Outcome, Projections, SealCheck};

/// What `recover` did.
#[derive(Debug)]
pub struct RecoveryReport {
    /// The new escrow public key the credentials are sealed to now.
    pub public_key: EscrowPublicKey,
    /// The lost key it replaces.
    pub lost_public_key: EscrowPublicKey,
    /// Devices with at least one credential recovered.
    pub devices_recovered: usize,
    /// Credentials sealed again to the new key.
    pub credentials_recovered: usize,
    /// Credentials that could not be recovered, and why.
    pub unrecoverable: Vec<Unrecoverable>,
}

/// A credential `recover` could not open.
#[derive(Debug)]
pub struct Unrecoverable {
    /// Its device.
    pub device_id: DeviceId,
    /// The stream sequence of its backup.
    pub backup_stream_sequence: u64,
    /// Why: no recovery box, or one that does not open with the recovery key.
    pub reason: &'static str,
}

/// Reads the escrow keyring and checks it against the history (see [`escrow::KeyCheck`]):
/// creates and records a key when there is none anywhere, records a key the history lacks, and
/// refuses, saying how to fix it, when the history names a key the key file does not hold.
/// Its records are signed with `signing_key`.
pub async fn open_keyring(
    config: &Config,
    history: &History,
    signing_key: &Arc<OrchestratorSigningKey>,
) -> anyhow::Result<EscrowKeyring> {
    let path = escrow::key_path(config);
    let keyring = EscrowKeyring::read(&path)?;
    let recorded = recorded_key(history).await?;
    match escrow::check_against_history(keyring.as_ref(), recorded.as_ref()) {
        KeyCheck::Matches => Ok(keyring.expect("a key that matches the history exists")),
        KeyCheck::Refuse(refused) => Err(anyhow::anyhow!(escrow::refusal_message(&refused, &path))),
        KeyCheck::Record(created) => {
            tracing::info!(escrow_public_key = %created.public_key, reason = ?created.reason, "recording the escrow key in the history");
            record(history, signing_key, created).await?;
            Ok(keyring.expect("a key to record exists"))
        }
        KeyCheck::Create => {
            if let Some(supplied) = &config.escrow_key_file {
                anyhow::bail!(
                    "escrow_key_file {} does not exist; allowed: an existing owner-only file of keys in base64, \
                     or no escrow_key_file to keep the key in data_dir",
                    supplied.display()
                );
            }
            let created = EscrowKeyring::generate();
            created.write(&path)?;
            tracing::info!(path = %path.display(), escrow_public_key = %created.public_key(), "escrow key created; back this file up");
            record(
                history,
                signing_key,
                EscrowKeyCreated {
                    public_key: created.public_key(),
                    previous_public_key: None,
                    reason: EscrowKeyReason::Created,
                },
            )
            .await?;
            Ok(created)
        }
    }
}

/// `fleetlaps-orchestrator escrow rotate`: with no orchestrator running on the data directory,
/// checks the keyring as start-up does, makes a new current key (the old ones retired, so older
/// backups still open), writes the keyring, records the new key and returns it. Devices seal to
/// it from their next rotation, once an orchestrator tells them.
pub async fn rotate(config: &Config) -> anyhow::Result<EscrowPublicKey> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let (jetstream, _) = bus::connect(config).await?;
    let history = History::open(&jetstream).await?;
    let signing_key = orchestrator_key::open(config, &history).await?;
    let keyring = open_keyring(config, &history, &signing_key).await?;
    let previous = keyring.public_key();
    let rotated = keyring.rotated();
    let path = escrow::key_path(config);
    // Written before it is recorded: a crash in between leaves a keyring whose retired key is
    // the recorded one, which the next start records.
    rotated.write(&path)?;
    record(
        &history,
        &signing_key,
        EscrowKeyCreated {
            public_key: rotated.public_key(),
            previous_public_key: Some(previous),
            reason: EscrowKeyReason::Rotated,
        },
    )
    .await?;
    Ok(rotated.public_key())
}

/// `fleetlaps-orchestrator recover`: break-glass, when the escrow key is lost. With no
/// orchestrator running on the data directory, folds the whole history as start-up would (into a
/// scratch store), opens each accepted backup's copy sealed to the offline recovery key, seals it
/// to a new escrow key, records each as `password_resealed` and then the new key as
/// `escrow_key_created` (recovered). `progress` hears (messages read, total).
pub async fn recover(
    config: &Config,
    recovery_key_file: &Path,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<RecoveryReport> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let recovery_key = escrow::read_recovery_key(recovery_key_file)?;
    if let Some(configured) = config.escrow_recovery_public_key()?
        && configured != recovery_key.public_key()
    {
        anyhow::bail!(
            "recovery key {} is not the one the config names (escrow_recovery_public_key = {configured}): \
             backups were sealed to that one",
            recovery_key_file.display()
        );
    }
    let (jetstream, _) = bus::connect(config).await?;
    let history = History::open(&jetstream).await?;
    let signing_key = orchestrator_key::open(config, &history).await?;
    let Some(recorded) = recorded_key(&history).await? else {
        anyhow::bail!("the history records no escrow key: nothing to recover");
    };
    let path = escrow::key_path(config);
    let keyring = match EscrowKeyring::read(&path)? {
        Some(keyring) if keyring.holds(&recorded.public_key) => anyhow::bail!(
            "{} holds the escrow key the history recorded ({}): nothing to recover; start the orchestrator",
            path.display(),
            recorded.public_key
        ),
        // A recovery that stopped after writing its new key: seal to that key again.
        Some(keyring) => keyring,
        None => {
            let keyring = EscrowKeyring::generate();
            keyring.write(&path)?;
            keyring
        }
    };

    let backups = accepted_backups(config, &history, &mut progress).await?;
    let journal = history.journal(Arc::clone(&signing_key));
    let new_public_key = keyring.public_key();
    let mut report = RecoveryReport {
        public_key: new_public_key,
        lost_public_key: recorded.public_key,
        devices_recovered: 0,
        credentials_recovered: 0,
        unrecoverable: Vec::new(),
    };
    let mut devices = std::collections::BTreeSet::new();
    for ((device_id, backup_stream_sequence), backup) in backups {
        let context = sealing_context(&device_id, &backup.rotation_id);
        let opened = match &backup.recovery_sealed_password {
            None => Err("no copy sealed to the recovery key"),
            Some(sealed) => recovery_key
                .open(sealed, &context)
                .map_err(|_| "its copy does not open with this recovery key"),
        };
        let opened = match opened {
            Ok(opened) => opened,
            Err(reason) => {
                report.unrecoverable.push(Unrecoverable {
                    device_id,
                    backup_stream_sequence,
                    reason,
                });
                continue;
            }
        };
        let sealed_password = seal::seal(&new_public_key, &opened, &context);
        drop(opened);
        journal
            .append(AuditEvent::PasswordResealed(PasswordResealed {
                device_id: device_id.clone(),
                backup_stream_sequence,
                sealed_password,
            }))
            .await
            .context("recording a resealed password")?;
        report.credentials_recovered += 1;
        devices.insert(device_id);
    }
    report.devices_recovered = devices.len();
    record(
        &history,
        &signing_key,
        EscrowKeyCreated {
            public_key: new_public_key,
            previous_public_key: Some(recorded.public_key),
            reason: EscrowKeyReason::Recovered,
        },
    )
    .await?;
    Ok(report)
}

/// A backup the fold accepted, as `recover` needs it.
struct AcceptedBackup {
    /// Its rotation, part of its sealing context.
    rotation_id: RotationId,
    /// Its copy sealed to the recovery key, if the device had one.
    recovery_sealed_password: Option<SealedBox>,
}

/// The fold's check during a recovery: no escrow key is held, so a backup sealed to a key the
/// history recorded is accepted (as the fold does for a lost key), and one that names no key (an
/// older agent's) is taken as the live fold took it, since it cannot be tried.
struct WithoutEscrowKeys;

impl SealCheck for WithoutEscrowKeys {
    fn holds(&self, _: &EscrowPublicKey) -> bool {
        false
    }

    fn opens(&self, _: &SealedBox, _: &[u8]) -> bool {
        true
    }
}

/// Folds the whole history into a scratch store beside the projections and returns every
/// backup the fold accepted, by device and stream sequence.
async fn accepted_backups(
    config: &Config,
    history: &History,
    progress: &mut impl FnMut(u64, u64),
) -> anyhow::Result<BTreeMap<(DeviceId, u64), AcceptedBackup>> {
    let scratch = config.data_dir.join("recovery-scratch");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    let projections =
        Projections::open(&scratch).with_context(|| format!("opening sled db at {}", scratch.display()))?;
    let mut reader = history.reader().await?;
    let total = reader.total();
    let mut read = 0;
    let mut backups = BTreeMap::new();
    while let Some(message) = reader.next().await? {
        let applied = projections.apply(message.as_stream_message(), &WithoutEscrowKeys)?;
        if applied.outcome == Outcome::Applied(EventKind::PasswordBackedUp)
            && let Ok(envelope) = Envelope::from_json(&message.payload)
            && let Event::PasswordBackedUp(body) = envelope.event
        {
            backups.insert(
                (envelope.device_id, message.sequence),
                AcceptedBackup {
                    rotation_id: body.rotation_id,
                    recovery_sealed_password: body.recovery_sealed_password,
                },
            );
        }
        read += 1;
        progress(read, total);
    }
    drop(projections);
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    Ok(backups)
}

/// The escrow key the history names as current.
async fn recorded_key(history: &History) -> anyhow::Result<Option<RecordedKey>> {
    let last = history
        .last_audit_event(AuditKind::EscrowKeyCreated)
        .await
        .context("reading the last escrow_key_created event of the history")?;
    Ok(last.and_then(|(_, envelope)| match envelope.event {
        AuditEvent::EscrowKeyCreated(body) => Some(RecordedKey {
            public_key: body.public_key,
            recorded_at: envelope.time,
        }),
        _ => None,
    }))
}

async fn record(
    history: &History,
    signing_key: &Arc<OrchestratorSigningKey>,
    created: EscrowKeyCreated,
) -> anyhow::Result<()> {
    history
        .journal(Arc::clone(signing_key))
        .append(AuditEvent::EscrowKeyCreated(created))
        .await
        .context("recording the escrow key in the history")?;
    Ok(())
}
