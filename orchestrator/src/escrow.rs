//! The escrow keyring: the keys that open the passwords devices back up, and the files they live
//! in.
//!
//! The key file (`data_dir/escrow.key`, or `escrow_key_file`) is owner-only (0600) and holds one
//! key per line in base64, the current key first, then the retired ones (kept so that backups
//! sealed to them still open); a one-line file is a keyring without retired keys. It is rewritten
//! atomically (a temporary file, fsync, rename), so a crash leaves the old keyring or the new one.
//! Public halves are given to agents; secret halves never leave this process.
//!
//! Whether the keyring is the one the history expects is decided by [`check_against_history`]:
//! a key is never made up while the history names one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::{EscrowKeyCreated, EscrowKeyReason};
use fleetlaps_proto::seal::{EscrowPublicKey, EscrowSecretKey, SealError, SealedBox};
use zeroize::Zeroizing;

/// The escrow key file's name in the data directory.
pub const KEY_FILE: &str = "escrow.key";

/// The escrow keys this orchestrator holds: the current one, which devices seal to, and the
/// retired ones, which still open older backups.
///
/// Invariant: no key appears twice. `Debug` shows public keys only.
pub struct EscrowKeyring {
    /// The key new backups are sealed to.
    current: EscrowSecretKey,
    /// Earlier keys, newest first.
    retired: Vec<EscrowSecretKey>,
    /// The public halves of the current key then the retired ones, worked out once: every
    /// backup is checked against them.
    public_keys: Vec<EscrowPublicKey>,
}

/// The escrow key the history names as current: the last `escrow_key_created` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedKey {
    /// Its public key.
    pub public_key: EscrowPublicKey,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
}

/// What start-up must do about the escrow key, given the key file and the history.
#[derive(Debug)]
pub enum KeyCheck {
    /// The key file holds the recorded key as its current one: go.
    Matches,
    /// Neither a key file nor a record: make a key, write it, record it.
    Create,
    /// Record the key file's current key (`escrow_key_created` with this body), then go: a key
    /// made before keys were recorded, or a rotation that stopped before it recorded its key.
    Record(EscrowKeyCreated),
    /// The history names a key the key file does not hold: refuse to start.
    Refuse(RefusedKey),
}

/// Why the key file does not fit the history: the refusal's facts, for its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedKey {
    /// The key the history names.
    pub recorded: RecordedKey,
    /// Whether there is a key file at all.
    pub file_exists: bool,
}

impl EscrowKeyring {
    /// A keyring of one key.
    pub fn new(current: EscrowSecretKey) -> Self {
        Self::of(current, Vec::new())
    }

    /// A keyring of `current` and `retired` (newest first), with their public halves.
    fn of(current: EscrowSecretKey, retired: Vec<EscrowSecretKey>) -> Self {
        let public_keys = std::iter::once(&current)
            .chain(&retired)
            .map(EscrowSecretKey::public_key)
            .collect();
        Self {
            current,
            retired,
            public_keys,
        }
    }

    /// A keyring of one new random key.
    pub fn generate() -> Self {
        Self::new(EscrowSecretKey::generate())
    }

    /// The current key's public half: what devices seal to.
    pub fn public_key(&self) -> EscrowPublicKey {
        self.public_keys[0]
    }

    /// The retired keys' public halves, newest first.
    pub fn retired_public_keys(&self) -> Vec<EscrowPublicKey> {
        self.public_keys[1..].to_vec()
    }

    /// Whether the keyring holds the secret half of `public_key`, current or retired.
    pub fn holds(&self, public_key: &EscrowPublicKey) -> bool {
        self.public_keys.contains(public_key)
    }

    /// A new keyring whose current key is new and whose retired keys are this one's keys.
    pub fn rotated(self) -> Self {
        let mut retired = Vec::with_capacity(self.retired.len() + 1);
        retired.push(self.current);
        retired.extend(self.retired);
        Self::of(EscrowSecretKey::generate(), retired)
    }

    /// Opens `sealed` with whichever key opens it, the current one first.
    pub fn open(&self, sealed: &SealedBox, context: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let mut last_error = None;
        for key in self.keys() {
            match key.open(sealed, context) {
                Ok(opened) => return Ok(opened),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("a keyring holds at least its current key"))
    }

    /// Every key, the current one first.
    fn keys(&self) -> impl Iterator<Item = &EscrowSecretKey> {
        std::iter::once(&self.current).chain(&self.retired)
    }

    /// Reads the keyring at `path`; `Ok(None)` when there is no file. A file readable by others,
    /// or one that is not base64 keys of 32 bytes, one a line, is refused.
    pub fn read(path: &Path) -> anyhow::Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let text = read_owner_only(path, "escrow key")?;
        let mut keys = Vec::new();
        for (index, line) in text.lines().map(str::trim).enumerate() {
            if line.is_empty() {
                continue;
            }
            let key = parse_secret_key(line).with_context(|| {
                format!(
                    "escrow key {} line {}: expected 32 bytes of base64",
                    path.display(),
                    index + 1
                )
            })?;
            if keys
                .iter()
                .any(|held: &EscrowSecretKey| held.public_key() == key.public_key())
            {
                anyhow::bail!(
                    "escrow key {} holds the same key twice (line {})",
                    path.display(),
                    index + 1
                );
            }
            keys.push(key);
        }
        let mut keys = keys.into_iter();
        let current = keys
            .next()
            .with_context(|| format!("escrow key {} is empty: expected 32 bytes of base64", path.display()))?;
        Ok(Some(Self::of(current, keys.collect())))
    }

    /// Writes the keyring to `path` atomically, owner-only: a temporary file beside it, synced,
    /// then renamed over it, and the directory synced.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = Zeroizing::new(String::new());
        for key in self.keys() {
            text.push_str(&STANDARD.encode(key.to_bytes().as_slice()));
            text.push('\n');
        }
        write_owner_only_atomically(path, text.as_bytes())
            .with_context(|| format!("writing escrow key {}", path.display()))
    }
}

impl std::fmt::Debug for EscrowKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EscrowKeyring")
            .field("current", &self.public_key().to_string())
            .field(
                "retired",
                &self
                    .retired_public_keys()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The key file the config names: `escrow_key_file`, or `data_dir/escrow.key`.
pub fn key_path(config: &crate::Config) -> PathBuf {
    config
        .escrow_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join(KEY_FILE))
}

/// Decides what start-up does about the escrow key (see [`KeyCheck`]). Never [`KeyCheck::Create`]
/// while the history names a key.
pub fn check_against_history(keyring: Option<&EscrowKeyring>, recorded: Option<&RecordedKey>) -> KeyCheck {
    match (keyring, recorded) {
        (None, None) => KeyCheck::Create,
        (Some(keyring), None) => KeyCheck::Record(EscrowKeyCreated {
            public_key: keyring.public_key(),
            previous_public_key: None,
            reason: EscrowKeyReason::Created,
        }),
        (Some(keyring), Some(recorded)) if keyring.public_key() == recorded.public_key => KeyCheck::Matches,
        (Some(keyring), Some(recorded)) if keyring.retired_public_keys().contains(&recorded.public_key) => {
            KeyCheck::Record(EscrowKeyCreated {
                public_key: keyring.public_key(),
                previous_public_key: Some(recorded.public_key),
                reason: EscrowKeyReason::Rotated,
            })
        }
        (keyring, Some(recorded)) => KeyCheck::Refuse(RefusedKey {
            recorded: recorded.clone(),
            file_exists: keyring.is_some(),
        }),
    }
}

/// The message of a start refused by [`KeyCheck::Refuse`]: what is wrong, and how to fix it.
pub fn refusal_message(refused: &RefusedKey, path: &Path) -> String {
    let problem = if refused.file_exists {
        format!(
            "escrow key {} does not hold the escrow key the history recorded",
            path.display()
        )
    } else {
        format!("escrow key {} is missing", path.display())
    };
    format!(
        "{problem}: the history recorded escrow public key {} at {}, and every stored password is sealed to it, \
         so no new key was made. Restore {} from your backup of it; if the key is lost, run \
         `fleetlaps-orchestrator recover --config <config> --recovery-key FILE` with the offline recovery key",
        refused.recorded.public_key,
        refused.recorded.recorded_at.to_rfc3339(),
        path.display()
    )
}

/// Creates an offline recovery key pair: writes the secret key to `path` (owner-only; an existing
/// file is never overwritten) and returns the public key, for `escrow_recovery_public_key`.
pub fn create_recovery_key(path: &Path) -> anyhow::Result<EscrowPublicKey> {
    let key = EscrowSecretKey::generate();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating recovery key {} (an existing file is never overwritten)",
                path.display()
            )
        })?;
    let text = Zeroizing::new(format!("{}\n", STANDARD.encode(key.to_bytes().as_slice())));
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing recovery key {}", path.display()))?;
    Ok(key.public_key())
}

/// Reads a recovery secret key written by [`create_recovery_key`] (owner-only).
pub fn read_recovery_key(path: &Path) -> anyhow::Result<EscrowSecretKey> {
    let text = read_owner_only(path, "recovery key")?;
    parse_secret_key(text.trim())
        .with_context(|| format!("recovery key {}: expected 32 bytes of base64", path.display()))
}

/// Reads a secret file, refusing one that group or others may read.
pub(crate) fn read_owner_only(path: &Path, what: &str) -> anyhow::Result<Zeroizing<String>> {
    let mode = fs::metadata(path)
        .with_context(|| format!("reading {what} {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{what} {} is readable by others (mode {:o}); allowed: owner-only, run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(Zeroizing::new(
        fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))?,
    ))
}

fn parse_secret_key(text: &str) -> Option<EscrowSecretKey> {
    let bytes = Zeroizing::new(STANDARD.decode(text).ok()?);
    let array = <[u8; 32]>::try_from(bytes.as_slice()).ok()?;
    Some(EscrowSecretKey::from_bytes(array))
}

pub(crate) fn write_owner_only_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = parent.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        // `mode` applies only to a new file: a leftover temporary file is made owner-only too.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        fs::File::open(parent)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests;
