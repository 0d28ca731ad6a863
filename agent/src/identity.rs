//! The device's identity, made by `fleetlaps-agent enroll` and kept in `state_dir/identity.json`
//! (mode 0600): the device id the orchestrator gave, the Ed25519 key its events are signed
//! with, the escrow public key its passwords are sealed to, and the orchestrator's policy, if it
//! sent one.
//!
//! The secret key never appears in `Debug` output, logs or errors. A file that group or others
//! may read is refused, as a leaked key lets anyone sign this device's events.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::policy::Policy;
use fleetlaps_proto::seal::EscrowPublicKey;
use fleetlaps_proto::signature::DeviceSigningKey;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

/// The identity file's name in the state directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// Who this device is to the orchestrator.
#[derive(Clone)]
pub struct Identity {
    /// The id the orchestrator gave at enrollment.
    pub device_id: DeviceId,
    /// Signs every event this device publishes. Never shown.
    pub signing_key: DeviceSigningKey,
    /// The key passwords are sealed to.
    pub escrow_public_key: EscrowPublicKey,
    /// The offline recovery key passwords are also sealed to, if the orchestrator has one.
    pub escrow_recovery_public_key: Option<EscrowPublicKey>,
    /// The orchestrator's policy, if it sent one: it wins over the local `[policy]`.
    pub policy: Option<Policy>,
}

/// The file's layout. Private to the agent: only this module reads and writes it (writing goes
/// through [`IdentityExport`], since a `SecretString` does not serialise by itself).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    device_id: DeviceId,
    /// Standard base64 of the Ed25519 secret key.
    secret_key: SecretString,
    escrow_public_key: EscrowPublicKey,
    #[serde(default)]
    escrow_recovery_public_key: Option<EscrowPublicKey>,
    #[serde(default)]
    policy: Option<Policy>,
}

impl Identity {
    /// Where the identity of the agent with this state directory lives.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(IDENTITY_FILE)
    }

    /// Reads the identity in `state_dir`; `Ok(None)` when the device has not enrolled.
    pub fn load(state_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(state_dir);
        let metadata = match fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is accessible by group or others (mode {:04o}); allowed: 0600, run `chmod 600 {}`",
                path.display(),
                mode & 0o7777,
                path.display()
            );
        }
        let text =
            SecretString::from(fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?);
        // serde's messages can quote values; the file holds a secret, so only the position is told.
        let file: IdentityFile = serde_json::from_str(text.expose_secret()).map_err(|err| {
            anyhow::anyhow!(
                "{} is not an identity written by `fleetlaps-agent enroll` (error at line {} column {})",
                path.display(),
                err.line(),
                err.column()
            )
        })?;
        let signing_key = DeviceSigningKey::from_base64(file.secret_key.expose_secret())
            .with_context(|| format!("{}: secret_key", path.display()))?;
        Ok(Some(Self {
            device_id: file.device_id,
            signing_key,
            escrow_public_key: file.escrow_public_key,
            escrow_recovery_public_key: file.escrow_recovery_public_key,
            policy: file.policy,
        }))
    }

    /// Writes the identity to `state_dir` (made owner-only if it does not exist), mode 0600.
    /// Refuses to replace an existing identity.
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<PathBuf> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
        let path = Self::path(state_dir);
        let file = IdentityFile {
            device_id: self.device_id.clone(),
            secret_key: self.signing_key.to_base64(),
            escrow_public_key: self.escrow_public_key,
            escrow_recovery_public_key: self.escrow_recovery_public_key,
            policy: self.policy.clone(),
        };
        let text = SecretString::from(
            serde_json::to_string_pretty(&IdentityExport(&file)).expect("an identity serialises") + "\n",
        );
        let mut handle = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        handle
            .write_all(text.expose_secret().as_bytes())
            .and_then(|()| handle.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Serialises an [`IdentityFile`] with its secret: `SecretString` does not serialise on its own.
struct IdentityExport<'a>(&'a IdentityFile);

impl Serialize for IdentityExport<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let file = self.0;
        let mut state = serializer.serialize_struct("IdentityFile", 5)?;
        state.serialize_field("device_id", &file.device_id)?;
        state.serialize_field("secret_key", file.secret_key.expose_secret())?;
        state.serialize_field("escrow_public_key", &file.escrow_public_key)?;
        state.serialize_field("escrow_recovery_public_key", &file.escrow_recovery_public_key)?;
        state.serialize_field("policy", &file.policy)?;
        state.end()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id)
            .field("signing_key", &self.signing_key)
            .field("escrow_public_key", &self.escrow_public_key.to_string())
            .field("policy", &self.policy.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            device_id: DeviceId::parse("dev-1").expect("valid"),
            signing_key: DeviceSigningKey::generate(),
            escrow_public_key: fleetlaps_proto::seal::EscrowSecretKey::generate().public_key(),
            escrow_recovery_public_key: None,
            policy: Some(Policy::default()),
        }
    }

    #[test]
    fn an_identity_is_saved_owner_only_read_back_and_never_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_dir = dir.path().join("state");
        let identity = identity();
        let path = identity.save(&state_dir).expect("saved");
        assert_eq!(fs::metadata(&path).expect("exists").permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(&state_dir).expect("exists").permissions().mode() & 0o777,
            0o700
        );
        let back = Identity::load(&state_dir).expect("readable").expect("present");
        assert_eq!(back.device_id, identity.device_id);
        assert_eq!(back.signing_key.public_key(), identity.signing_key.public_key());
        assert_eq!(back.policy, identity.policy);
        assert!(identity.save(&state_dir).is_err(), "an identity is never overwritten");
        assert!(Identity::load(dir.path()).expect("no file").is_none());
    }

    #[test]
    fn the_secret_key_is_not_in_debug_and_a_readable_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = identity();
        let secret = identity.signing_key.to_base64();
        assert!(!format!("{identity:?}").contains(secret.expose_secret()));
        let path = identity.save(dir.path()).expect("saved");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Identity::load(dir.path()).expect_err("refused");
        assert!(err.to_string().contains("mode 0644"), "{err}");
        assert!(!format!("{err:#}").contains(secret.expose_secret()));
    }
}
