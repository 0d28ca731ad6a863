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
        fs::create_dir_all(data_dir).with_context(|| format!("creating data dir {}", data_dir.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
