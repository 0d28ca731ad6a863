//! NATS nkey user seeds, as the agent and the orchestrator read them from their seed files
//! (`nats.nkey_seed_file`). Reading the file, and refusing one others may read, is the caller's.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// A user nkey seed (`SU…`) and its public key (`U…`). The seed is redacted in `Debug`.
pub struct UserSeed {
    /// The seed. Never logged.
    seed: SecretString,
    /// Its public half, which the server's config lists.
    public_key: String,
}

/// Text that is not a user nkey seed. Its content is never repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a user nkey seed (58 characters starting with SU)")]
pub struct NotAUserSeed;

impl UserSeed {
    /// Parses a user seed; surrounding whitespace (a final newline) is ignored.
    pub fn parse(text: &str) -> Result<Self, NotAUserSeed> {
        let seed = text.trim();
        let key_pair = nkeys::KeyPair::from_seed(seed).map_err(|_| NotAUserSeed)?;
        if key_pair.key_pair_type() != nkeys::KeyPairType::User {
            return Err(NotAUserSeed);
        }
        Ok(Self {
            seed: SecretString::from(seed.to_owned()),
            public_key: key_pair.public_key(),
        })
    }

    /// The seed, to hand to the NATS client. Do not log it.
    pub fn expose_secret(&self) -> &str {
        self.seed.expose_secret()
    }

    /// The public key.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }
}

impl fmt::Debug for UserSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserSeed")
            .field("seed", &"***")
            .field("public_key", &self.public_key)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_seed_parses_to_its_public_key_and_is_not_shown() {
        let pair = nkeys::KeyPair::new_user();
        let seed = UserSeed::parse(&format!("{}\n", pair.seed().expect("a seed"))).expect("a user seed");
        assert_eq!(seed.public_key(), pair.public_key());
        assert!(!format!("{seed:?}").contains(seed.expose_secret()));
        let server = nkeys::KeyPair::new_server().seed().expect("a seed");
        assert_eq!(UserSeed::parse(&server).map(|_| ()), Err(NotAUserSeed));
        assert_eq!(UserSeed::parse("SUnot-a-seed").map(|_| ()), Err(NotAUserSeed));
    }
}
