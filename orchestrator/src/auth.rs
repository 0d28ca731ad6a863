//! Principals, bearer tokens and scopes.
//!
//! Scopes are named after Microsoft Graph's where Graph has them, so an operator who knows
//! `DeviceLocalCredential.Read.All` knows what a token with it can do. Tokens are compared by
//! their SHA-256 digest in constant time; the plaintext token is never kept after start-up.

use std::fmt;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::TokenConfig;

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read credential metadata (backup and expiry times), not passwords.
    ReadBasic,
    /// Read credential metadata and passwords.
    ReadPasswords,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Self; 2] = [Self::ReadBasic, Self::ReadPasswords];

    /// The scope's Graph name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadBasic => fleetlaps_proto::api::SCOPE_READ_BASIC,
            Self::ReadPasswords => fleetlaps_proto::api::SCOPE_READ_PASSWORDS,
        }
    }

    /// The scope with this Graph name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == name)
    }

    /// Whether holding `self` grants `wanted`: reading passwords includes reading metadata.
    pub fn grants(self, wanted: Self) -> bool {
        self == wanted || (self == Self::ReadPasswords && wanted == Self::ReadBasic)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Someone who presented a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name from the config.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Whether any of the principal's scopes grants `wanted`.
    pub fn has(&self, wanted: Scope) -> bool {
        self.scopes.iter().any(|scope| scope.grants(wanted))
    }
}

/// The known tokens, by digest.
pub struct TokenStore {
    entries: Vec<([u8; 32], Principal)>,
}

impl TokenStore {
    /// Builds the store from the config, keeping only digests of the tokens.
    pub fn from_config(tokens: &[TokenConfig]) -> Self {
        let entries = tokens
            .iter()
            .map(|token| {
                let scopes = token.scopes.iter().filter_map(|name| Scope::from_name(name)).collect();
                (
                    digest(token.token.expose_secret()),
                    Principal {
                        name: token.name.clone(),
                        scopes,
                    },
                )
            })
            .collect();
        Self { entries }
    }

    /// The principal holding `token`, if any. Every entry is compared, in constant time.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let presented = digest(token);
        let mut found = None;
        for (known, principal) in &self.entries {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_passwords_includes_read_basic_but_not_the_reverse() {
        assert!(Scope::ReadPasswords.grants(Scope::ReadBasic));
        assert!(!Scope::ReadBasic.grants(Scope::ReadPasswords));
    }

    #[test]
    fn tokens_authenticate_by_value() {
        let store = TokenStore::from_config(&[TokenConfig {
            name: "helpdesk".to_owned(),
            token: "t0ken".to_owned().into(),
            scopes: vec![fleetlaps_proto::api::SCOPE_READ_BASIC.to_owned()],
        }]);
        let principal = store.authenticate("t0ken").expect("known");
        assert_eq!(principal.name, "helpdesk");
        assert!(principal.has(Scope::ReadBasic));
        assert!(!principal.has(Scope::ReadPasswords));
        assert_eq!(store.authenticate("other"), None);
    }
}
