//! Account backends: where the managed account's password really lives.
//!
//! The agent finds the managed account (by name, or the UID 0 account when
//! `AdministratorAccountName` is unset, as LAPS finds the built-in administrator by its RID),
//! reads its stored password hash, and stores a new hash.
//!
//! The agent hashes a new password itself ([`PasswordHash::new`] in [`crate::password_hash`],
//! SHA-512 crypt, as `/etc/shadow` holds it) and keeps that hash with the pending rotation. After a crash it
//! compares the account's stored hash with the pending one to know, exactly, whether the new
//! password reached the account, without ever keeping the password itself.
//! Backends never create accounts: LAPS does not either.
//!
//! Layout:
//! - `file`: [`FileAccounts`], a file of `name:uid:hash` lines for simulated fleets and tests.
//! - `linux`: [`LinuxAccounts`], the machine's `/etc/passwd` and `/etc/shadow`, written with `chpasswd -e`.

mod file;
mod linux;

pub use file::FileAccounts;
pub use linux::LinuxAccounts;

use std::sync::Arc;

use fleetlaps_proto::ids::AccountName;
use fleetlaps_proto::password::Password;

use crate::config::AccountConfig;
pub use crate::password_hash::PasswordHash;

/// The managed account, as found in the account database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its name.
    pub name: AccountName,
    /// Its numeric id.
    pub uid: u32,
}

/// Why an account operation failed. Messages never contain a password or a hash.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The managed account does not exist (LAPS does not create it).
    #[error("managed account {0} does not exist; create it or change AdministratorAccountName")]
    Missing(String),
    /// The account database could not be read or written.
    #[error("account database {path}: {detail}")]
    Database {
        /// Which database.
        path: String,
        /// What went wrong.
        detail: String,
    },
}

/// The account database that `config` names.
pub fn backend(config: &AccountConfig) -> Arc<dyn AccountBackend> {
    match config {
        AccountConfig::File { path } => Arc::new(FileAccounts::new(path)),
        AccountConfig::Linux {
            passwd,
            shadow,
            chpasswd,
        } => Arc::new(LinuxAccounts {
            passwd: passwd.clone(),
            shadow: shadow.clone(),
            chpasswd: chpasswd.clone(),
        }),
    }
}

/// An account database.
pub trait AccountBackend: Send + Sync + 'static {
    /// Finds the managed account: `name`, or the account with UID 0 when `None`.
    fn resolve(&self, name: Option<&AccountName>) -> Result<Account, AccountError>;

    /// The account's stored password hash, as stored (any crypt format, or `!`/`*` for none).
    fn password_hash(&self, account: &Account) -> Result<String, AccountError>;

    /// Stores `hash` as the account's password.
    fn set_password_hash(&self, account: &Account, hash: &PasswordHash) -> Result<(), AccountError>;

    /// Whether `password` is the account's password. Only SHA-512 crypt hashes (those this
    /// agent writes) can be checked; any other stored hash answers `false`.
    fn verify_password(&self, account: &Account, password: &Password) -> Result<bool, AccountError> {
        let stored = self.password_hash(account)?;
        Ok(stored.starts_with("$6$") && sha_crypt::sha512_check(password.expose(), &stored).is_ok())
    }
}

/// The managed account's entry among `entries`: the one named `name`, or with no name the one
/// with UID 0 — by UID, never by name, since the built-in administrator may be renamed, as LAPS
/// finds Windows' by its RID. `name_and_uid` reads an entry.
fn find_managed<'a, E>(
    entries: &'a [E],
    name: Option<&AccountName>,
    name_and_uid: impl Fn(&E) -> (&str, u32),
) -> Result<&'a E, AccountError> {
    let found = match name {
        Some(name) => entries.iter().find(|entry| name_and_uid(entry).0 == name.as_str()),
        None => entries.iter().find(|entry| name_and_uid(entry).1 == 0),
    };
    found.ok_or_else(|| {
        AccountError::Missing(name.map_or_else(|| "with UID 0".to_owned(), |name| name.as_str().to_owned()))
    })
}
