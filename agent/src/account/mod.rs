//! Account backends: where the managed account's password really lives.
//!
//! The agent finds the managed account (by name, or the UID 0 account when
//! `AdministratorAccountName` is unset, as LAPS finds the built-in administrator by its RID),
//! sets its password, and can check whether a candidate is the account's password.
//! Backends never create accounts: LAPS does not either.

mod file;

pub use file::FileAccounts;

use fleetlaps_proto::ids::AccountName;
use fleetlaps_proto::password::Password;

/// The managed account, as found in the account database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its name.
    pub name: AccountName,
    /// Its numeric id.
    pub uid: u32,
}

/// Why an account operation failed. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The named account does not exist (LAPS does not create it).
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

/// An account database.
pub trait AccountBackend: Send + Sync + 'static {
    /// Finds the managed account: `name`, or the account with UID 0 when `None`.
    fn resolve(&self, name: Option<&AccountName>) -> Result<Account, AccountError>;

    /// Sets the account's password.
    fn set_password(&self, account: &Account, password: &Password) -> Result<(), AccountError>;

    /// Whether `password` is the account's password.
    fn verify_password(&self, account: &Account, password: &Password) -> Result<bool, AccountError>;
}
