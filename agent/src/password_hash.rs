//! The password hash: what the agent stores with a pending rotation and writes to the account,
//! never the password itself.

use std::fmt;

use fleetlaps_proto::password::Password;
use serde::{Deserialize, Serialize};

/// The rounds of SHA-512 crypt in the hashes the agent writes: `password_hash_rounds` in the
/// agent's config. The default is glibc's (5,000, written without a `rounds=` field); the format
/// allows 1,000 to 999,999,999. More rounds make a stolen shadow file slower to crack and every
/// rotation slower to hash; a simulated fleet, where thousands of devices share one machine's
/// cores, may take the least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u64")]
pub struct HashRounds(u32);

impl HashRounds {
    /// glibc's default, and the agent's.
    pub const DEFAULT: Self = Self(5_000);
    /// The least the format allows.
    pub const MIN: u32 = 1_000;
    /// The most the format allows.
    pub const MAX: u32 = 999_999_999;

    /// The rounds, within [`Self::MIN`] to [`Self::MAX`].
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for HashRounds {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u64> for HashRounds {
    type Error = String;

    fn try_from(rounds: u64) -> Result<Self, Self::Error> {
        u32::try_from(rounds)
            .ok()
            .filter(|rounds| (Self::MIN..=Self::MAX).contains(rounds))
            .map(Self)
            .ok_or_else(|| {
                format!(
                    "password_hash_rounds = {rounds}: allowed {} to {} (SHA-512 crypt's range; the default is {})",
                    Self::MIN,
                    Self::MAX,
                    Self::DEFAULT.0
                )
            })
    }
}

/// A SHA-512 crypt hash of a password (`$6$salt$hash`), in the format of `/etc/shadow`.
///
/// It is what the agent stores with a pending rotation and what it writes to the account:
/// never the password. `Debug` hides it all the same.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// Hashes a password with a fresh random salt and `rounds` rounds.
    pub fn new(password: &Password, rounds: HashRounds) -> Self {
        let params = sha_crypt::Sha512Params::new(rounds.get() as usize)
            .expect("HashRounds holds only rounds SHA-512 crypt allows");
        let hash = sha_crypt::sha512_simple(password.expose(), &params)
            .expect("SHA-512 crypt with valid rounds and an OS salt does not fail");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rounds_write_glibcs_plain_format_and_others_name_their_rounds() {
        let password = Password::new("Correct-Horse-1".to_owned());
        let default = PasswordHash::new(&password, HashRounds::default());
        assert!(default.as_str().starts_with("$6$") && !default.as_str().contains("rounds="));
        assert!(default.matches(&password));
        let least = PasswordHash::new(&password, HashRounds::try_from(1_000).unwrap());
        assert!(least.as_str().starts_with("$6$rounds=1000$"), "{}", least.as_str());
        assert!(least.matches(&password));
        assert!(!least.matches(&Password::new("wrong".to_owned())));
    }

    #[test]
    fn rounds_outside_the_formats_range_are_refused_naming_the_range() {
        for rounds in [0, 999, 1_000_000_000, u64::MAX] {
            let err = HashRounds::try_from(rounds).unwrap_err();
            assert!(err.contains(&format!("password_hash_rounds = {rounds}")), "{err}");
            assert!(err.contains("allowed 1000 to 999999999"), "{err}");
        }
        assert_eq!(HashRounds::try_from(999_999_999).unwrap().get(), 999_999_999);
    }
}
