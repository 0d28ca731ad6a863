//! The password hash: what the agent stores with a pending rotation and writes to the account,
//! never the password itself.

use std::fmt;

use fleetlaps_proto::password::Password;
use serde::{Deserialize, Serialize};

/// A SHA-512 crypt hash of a password (`$6$salt$hash`), in the format of `/etc/shadow`.
///
/// It is what the agent stores with a pending rotation and what it writes to the account:
/// never the password. `Debug` hides it all the same.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// Hashes a password with a fresh random salt.
    pub fn new(password: &Password) -> Self {
        let params = sha_crypt::Sha512Params::default();
        let hash = sha_crypt::sha512_simple(password.expose(), &params)
            .expect("SHA-512 crypt with default parameters and an OS salt does not fail");
        Self(hash)
    }

    /// The crypt string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `password` hashes to this.
    pub fn matches(&self, password: &Password) -> bool {
        sha_crypt::sha512_check(password.expose(), &self.0).is_ok()
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(***)")
    }
}
