//! The orchestrator's signing key: an Ed25519 key that signs every orchestrator event, so the
//! fold can tell the orchestrator's own events from ones anybody else published on
//! `laps.audit.>`.
//!
//! The secret key lives in `data_dir/orchestrator.key` (owner-only, base64, beside `escrow.key`);
//! its public key is recorded on the stream as `orchestrator_key_created`, signed by itself. Like
//! the escrow key, it is made only at a first start, when neither the file nor the history has
//! one, and a start whose file does not hold the recorded key is refused: a new key would make
//! this orchestrator's events quarantined by every fold.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use fleetlaps_proto::audit::{AuditEvent, AuditKind, OrchestratorKeyCreated};
use fleetlaps_proto::signature::OrchestratorSigningKey;
use secrecy::ExposeSecret;

use crate::Config;
use crate::bus::{History, Journal};
use crate::escrow;

/// The orchestrator key file's name in the data directory.
pub const KEY_FILE: &str = "orchestrator.key";

/// The orchestrator key file: `data_dir/orchestrator.key`.
pub fn key_path(config: &Config) -> PathBuf {
    config.data_dir.join(KEY_FILE)
}

/// Reads the key file, if there is one; a file readable by others, or not a key, is an error.
pub fn read(path: &Path) -> anyhow::Result<Option<OrchestratorSigningKey>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = escrow::read_owner_only(path, "orchestrator key")?;
    OrchestratorSigningKey::from_base64(&text)
        .map(Some)
        .with_context(|| format!("orchestrator key {}: expected 32 bytes of base64", path.display()))
}

/// Reads the orchestrator key and checks it against the history, before any other orchestrator
/// event is recorded: creates and records one when there is none anywhere, records the file's
/// key when the history has none (a first start that stopped before it recorded), and refuses,
/// naming the file, the recorded key and the fix, when the history names a key the file does
/// not hold.
pub async fn open(config: &Config, history: &History) -> anyhow::Result<Arc<OrchestratorSigningKey>> {
    let path = key_path(config);
    let held = read(&path)?;
    let recorded = history
        .last_audit_event(AuditKind::OrchestratorKeyCreated)
        .await
        .context("reading the last orchestrator_key_created event of the history")?
        .and_then(|(_, envelope)| match envelope.event {
            AuditEvent::OrchestratorKeyCreated(body) => Some((body.public_key, envelope.time)),
            _ => None,
        });
    match (held, recorded) {
        (Some(key), Some((public_key, _))) if key.public_key().to_string() == public_key => Ok(Arc::new(key)),
        (held, Some((public_key, recorded_at))) => {
            let problem = if held.is_some() {
                format!(
                    "orchestrator key {} does not hold the orchestrator key the history recorded",
                    path.display()
                )
            } else {
                format!("orchestrator key {} is missing", path.display())
            };
            anyhow::bail!(
                "{problem}: the history recorded orchestrator public key {public_key} at {}, and every \
                 orchestrator event must be signed with it, so no new key was made. Restore {} from your \
                 backup of it (it is kept beside {})",
                recorded_at.to_rfc3339(),
                path.display(),
                escrow::KEY_FILE
            )
        }
        (Some(key), None) => {
            let key = Arc::new(key);
            tracing::info!(orchestrator_public_key = %key.public_key(), "recording the orchestrator key in the history");
            record(history, &key).await?;
            Ok(key)
        }
        (None, None) => {
            let key = Arc::new(OrchestratorSigningKey::generate());
            escrow::write_owner_only_atomically(&path, key.to_base64().expose_secret().as_bytes())
                .with_context(|| format!("writing orchestrator key {}", path.display()))?;
            tracing::info!(path = %path.display(), orchestrator_public_key = %key.public_key(), "orchestrator key created; back this file up");
            record(history, &key).await?;
            Ok(key)
        }
    }
}

/// Records `key`'s public half on the history, signed by itself.
async fn record(history: &History, key: &Arc<OrchestratorSigningKey>) -> anyhow::Result<()> {
    history
        .journal(Arc::clone(key))
        .append(AuditEvent::OrchestratorKeyCreated(OrchestratorKeyCreated {
            public_key: key.public_key().to_string(),
        }))
        .await
        .context("recording the orchestrator key in the history")?;
    Ok(())
}
