//! A file-backed account database for simulated fleets and tests.
//!
//! One line per account, `name:uid:hash`, where the hash is SHA-512 crypt (`$6$…`, as in
//! `/etc/shadow`) or `!` for an account with no usable password. Writes go to a temporary file
//! that is synced and renamed over the old one, so a crash leaves either the old or the new file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use fleetlaps_proto::ids::AccountName;

use super::{Account, AccountBackend, AccountError, PasswordHash};

/// Accounts kept in one file.
#[derive(Debug, Clone)]
pub struct FileAccounts {
    /// The database file.
    path: PathBuf,
}

struct Entry {
    name: String,
    uid: u32,
    hash: String,
}

impl FileAccounts {
    /// Uses the database at `path`; it must exist when the agent resolves the account.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Creates a database holding `accounts` (name, uid), each without a usable password.
    pub fn create(path: &Path, accounts: &[(&str, u32)]) -> Result<Self, AccountError> {
        let backend = Self::new(path);
        let entries = accounts
            .iter()
            .map(|(name, uid)| Entry {
                name: (*name).to_owned(),
                uid: *uid,
                hash: "!".to_owned(),
            })
            .collect::<Vec<_>>();
        backend.write(&entries)?;
        Ok(backend)
    }

    fn error(&self, detail: impl std::fmt::Display) -> AccountError {
        AccountError::Database {
            path: self.path.display().to_string(),
            detail: detail.to_string(),
        }
    }

    fn read(&self) -> Result<Vec<Entry>, AccountError> {
        let text = fs::read_to_string(&self.path).map_err(|err| self.error(err))?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| {
                let mut fields = line.splitn(3, ':');
                match (fields.next(), fields.next().map(str::parse::<u32>), fields.next()) {
                    (Some(name), Some(Ok(uid)), Some(hash)) => Ok(Entry {
                        name: name.to_owned(),
                        uid,
                        hash: hash.to_owned(),
                    }),
                    _ => Err(self.error(format!("line {} is not name:uid:hash", index + 1))),
                }
            })
            .collect()
    }

    fn write(&self, entries: &[Entry]) -> Result<(), AccountError> {
        let temporary = self.path.with_extension("tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|err| self.error(err))?;
        for entry in entries {
            writeln!(file, "{}:{}:{}", entry.name, entry.uid, entry.hash).map_err(|err| self.error(err))?;
        }
        file.sync_all().map_err(|err| self.error(err))?;
        fs::rename(&temporary, &self.path).map_err(|err| self.error(err))?;
        Ok(())
    }
}

impl AccountBackend for FileAccounts {
    fn resolve(&self, name: Option<&AccountName>) -> Result<Account, AccountError> {
        let entries = self.read()?;
        let entry = super::find_managed(&entries, name, |entry| (entry.name.as_str(), entry.uid))?;
        let account_name = AccountName::parse(&entry.name).map_err(|err| self.error(err))?;
        Ok(Account {
            name: account_name,
            uid: entry.uid,
        })
    }

    fn password_hash(&self, account: &Account) -> Result<String, AccountError> {
        let entries = self.read()?;
        let entry = entries
            .iter()
            .find(|entry| entry.name == account.name.as_str())
            .ok_or_else(|| AccountError::Missing(account.name.as_str().to_owned()))?;
        Ok(entry.hash.clone())
    }

    fn set_password_hash(&self, account: &Account, hash: &PasswordHash) -> Result<(), AccountError> {
        let mut entries = self.read()?;
        let entry = entries
            .iter_mut()
            .find(|entry| entry.name == account.name.as_str())
            .ok_or_else(|| AccountError::Missing(account.name.as_str().to_owned()))?;
        hash.as_str().clone_into(&mut entry.hash);
        self.write(&entries)
    }
}

#[cfg(test)]
mod tests {
    use fleetlaps_proto::password::Password;

    use crate::password_hash::HashRounds;

    use super::*;

    #[test]
    fn set_then_verify_and_the_file_holds_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts");
        let backend = FileAccounts::create(&path, &[("root", 0), ("lapsadmin", 1001)]).unwrap();
        let account = backend
            .resolve(Some(&AccountName::parse("lapsadmin").unwrap()))
            .unwrap();
        assert_eq!(account.uid, 1001);
        let password = Password::new("Correct-Horse-1".to_owned());
        assert!(!backend.verify_password(&account, &password).unwrap());
        backend
            .set_password_hash(&account, &PasswordHash::new(&password, HashRounds::default()))
            .unwrap();
        assert!(backend.verify_password(&account, &password).unwrap());
        assert!(
            !backend
                .verify_password(&account, &Password::new("wrong".to_owned()))
                .unwrap()
        );
        assert!(!fs::read_to_string(&path).unwrap().contains("Correct-Horse-1"));
    }

    #[test]
    fn unset_name_means_uid_zero_and_missing_accounts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileAccounts::create(&dir.path().join("accounts"), &[("toor", 0)]).unwrap();
        assert_eq!(backend.resolve(None).unwrap().name.as_str(), "toor");
        let err = backend
            .resolve(Some(&AccountName::parse("ghost").unwrap()))
            .unwrap_err();
        assert!(matches!(err, AccountError::Missing(_)), "{err}");
    }
}
