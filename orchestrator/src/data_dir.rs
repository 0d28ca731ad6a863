//! The data directory's lock: one process at a time owns a data directory (its projections and
//! escrow key), so two orchestrators never share one, and `escrow rotate` or `recover` never
//! change a key under a running orchestrator.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "orchestrator.lock";

/// An exclusive lock on `data_dir/orchestrator.lock`, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    /// The locked file; the lock goes with it.
    _file: fs::File,
    /// Its path, for messages.
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock of `data_dir` (creating the directory if needed), or fails at once, naming
    /// the lock file, if another process holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        ensure_owner_only(data_dir)?;
        let path = data_dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(fs::TryLockError::WouldBlock) => anyhow::bail!(
                "data dir {} is in use: another fleetlaps-orchestrator (run, escrow rotate or recover) holds {}; \
                 stop it first",
                data_dir.display(),
                path.display()
            ),
            Err(fs::TryLockError::Error(err)) => Err(err).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `data_dir` owner-only (0700, with any missing parents), or makes an existing one
/// owner-only, saying so: it holds the escrow key, the projections and the TLS key.
fn ensure_owner_only(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if !data_dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    }
    let mode = fs::metadata(data_dir)
        .with_context(|| format!("reading data dir {}", data_dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).with_context(|| {
            format!(
                "data dir {} is open to other users (mode {:o}) and could not be made owner-only; run `chmod 700 {}` as its owner",
                data_dir.display(),
                mode & 0o777,
                data_dir.display()
            )
        })?;
        tracing::warn!(
            data_dir = %data_dir.display(),
            was = format!("{:o}", mode & 0o777),
            "the data dir was open to other users; made it owner-only (700)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_data_dir_is_created_owner_only_and_one_open_to_others_is_made_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("var").join("fleetlaps");
        drop(DataDirLock::acquire(&data_dir).unwrap());
        assert_eq!(fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777, 0o700);

        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o755)).unwrap();
        drop(DataDirLock::acquire(&data_dir).unwrap());
        assert_eq!(fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_data_dir_is_locked_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).expect_err("already held");
        assert!(err.to_string().contains("is in use"), "{err}");
        assert!(err.to_string().contains(LOCK_FILE), "{err}");
        drop(held);
        DataDirLock::acquire(dir.path()).expect("free again once dropped");
    }
}
