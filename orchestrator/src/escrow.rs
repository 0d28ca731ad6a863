//! The escrow key: the one key that opens the passwords devices back up.
//!
//! Created on first start in the data directory with owner-only permissions (0600), or read from
//! there afterwards; or supplied as a file (`escrow_key_file`, owner-only, 32 bytes of base64),
//! which is then never created. Its public half is given to agents; the secret half never leaves
//! this process.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use fleetlaps_proto::seal::EscrowSecretKey;

/// The escrow key file's name in the data directory.
pub const KEY_FILE: &str = "escrow.key";

/// The escrow key the config names: `escrow_key_file`, which must exist, or `data_dir/escrow.key`,
/// created if missing.
pub fn open(config: &crate::Config) -> anyhow::Result<EscrowSecretKey> {
    match &config.escrow_key_file {
        Some(path) => {
            if !path.exists() {
                anyhow::bail!(
                    "escrow_key_file {} does not exist; allowed: an existing owner-only file of 32 bytes in base64, \
                     or no escrow_key_file to keep the key in data_dir",
                    path.display()
                );
            }
            load_or_create(path)
        }
        None => load_or_create(&config.data_dir.join(KEY_FILE)),
    }
}

/// Reads the escrow key from `path`, or creates one there if the file does not exist.
pub fn load_or_create(path: &Path) -> anyhow::Result<EscrowSecretKey> {
    if path.exists() {
        let mode = fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "escrow key {} is readable by others (mode {:o}); allowed: owner-only, run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
        let text = fs::read_to_string(path).with_context(|| format!("reading escrow key {}", path.display()))?;
        let bytes = STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .with_context(|| format!("escrow key {}: expected 32 bytes of base64", path.display()))?;
        return Ok(EscrowSecretKey::from_bytes(bytes));
    }
    let key = EscrowSecretKey::generate();
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating escrow key {}", path.display()))?;
    file.write_all(STANDARD.encode(key.to_bytes().as_slice()).as_bytes())?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "escrow key created");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_owner_only_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let created = load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let loaded = load_or_create(&path).unwrap();
        assert_eq!(created.public_key(), loaded.public_key());
    }

    #[test]
    fn a_supplied_key_file_is_used_and_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let supplied = dir.path().join("supplied.key");
        let config = |file: &Path| {
            crate::Config::from_toml(&format!(
                "data_dir = \"{}\"\nescrow_key_file = \"{}\"\n[nats]\nurl = \"n\"\n[http]\nplain_http = true\n",
                dir.path().join("data").display(),
                file.display()
            ))
            .unwrap()
        };
        let err = open(&config(&supplied)).expect_err("a missing supplied key is not made up");
        assert!(err.to_string().contains("does not exist"), "{err}");
        let made = load_or_create(&supplied).unwrap();
        assert_eq!(open(&config(&supplied)).unwrap().public_key(), made.public_key());
        assert!(!dir.path().join("data").join(KEY_FILE).exists());
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).expect_err("refused");
        assert!(err.to_string().contains("readable by others"), "{err}");
    }
}
