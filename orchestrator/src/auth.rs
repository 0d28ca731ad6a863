//! Principals, bearer tokens and scopes.
//!
//! Scopes are named after Microsoft Graph's where Graph has them, so an operator who knows
//! `DeviceLocalCredential.Read.All` knows what a token with it can do.
//!
//! Tokens are kept only as SHA-256 digests: those of the config (`[[tokens]]`, with
//! `token_sha256`), the bootstrap admin token (from the config or `FLEETLAPS_BOOTSTRAP_ADMIN_TOKEN`,
//! hashed at start), and those created through the API, which live in the history as
//! `token_created` events and in the projections. A token is 32 random bytes, so a plain SHA-256
//! is as strong as a slow hash would be.

use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use fleetlaps_proto::api;
use fleetlaps_proto::audit::TokenId;
use rand_core::{OsRng, RngCore};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::TokenConfig;
use crate::projection::{ProjectionError, Projections, TokenKind, TokenUnusable};

/// The prefix of tokens the orchestrator makes, so they can be recognised (by secret scanners too).
pub const TOKEN_PREFIX: &str = "flp_";
/// The prefix of enrollment tokens: distinct, so one is never mistaken for an API token.
pub const ENROLLMENT_TOKEN_PREFIX: &str = "fle_";

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read the device directory.
    DeviceRead,
    /// Read credential metadata (backup and expiry times), not passwords.
    ReadBasic,
    /// Read credential metadata and passwords.
    ReadPasswords,
    /// Ask a device to rotate now.
    Rotate,
    /// Declare a breach.
    BreachDeclare,
    /// Read the audit history.
    AuditRead,
    /// Manage tokens.
    Admin,
    /// Give a token scopes the creator does not hold.
    TokenGrant,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Self; 8] = [
        Self::DeviceRead,
        Self::ReadBasic,
        Self::ReadPasswords,
        Self::Rotate,
        Self::BreachDeclare,
        Self::AuditRead,
        Self::Admin,
        Self::TokenGrant,
    ];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceRead => api::SCOPE_DEVICE_READ,
            Self::ReadBasic => api::SCOPE_READ_BASIC,
            Self::ReadPasswords => api::SCOPE_READ_PASSWORDS,
            Self::Rotate => api::SCOPE_ROTATE,
            Self::BreachDeclare => api::SCOPE_BREACH_DECLARE,
            Self::AuditRead => api::SCOPE_AUDIT_READ,
            Self::Admin => api::SCOPE_ADMIN,
            Self::TokenGrant => api::SCOPE_TOKEN_GRANT,
        }
    }

    /// The scope with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == name)
    }

    /// Parses scope names, naming the first unknown one and the allowed names.
    pub fn parse_all(names: &[String]) -> Result<Vec<Self>, String> {
        names
            .iter()
            .map(|name| {
                Self::from_name(name).ok_or_else(|| {
                    format!(
                        "unknown scope {name:?}; allowed: {}",
                        Self::ALL.map(Self::as_str).join(", ")
                    )
                })
            })
            .collect()
    }

    /// Whether holding `self` grants `wanted`: reading passwords includes reading their
    /// metadata, as in Graph. `Admin` manages tokens; it does not include the other scopes, and
    /// `Token.Grant` grants only itself.
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
    /// The token's holder: what the audit records.
    pub name: String,
    /// The token's id: the API's for tokens made through it, [`static_token_id`] for the
    /// config's and the bootstrap admin's.
    pub token_id: TokenId,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Whether any of the principal's scopes grants `wanted`.
    pub fn has(&self, wanted: Scope) -> bool {
        self.scopes.iter().any(|scope| scope.grants(wanted))
    }

    /// Whether the principal may create a token holding `scope`: one it holds itself, or any
    /// with `Token.Grant`. So an `Admin` without `DeviceLocalCredential.Read.All` cannot make
    /// itself a token that reads passwords.
    pub fn may_grant(&self, scope: Scope) -> bool {
        self.has(Scope::TokenGrant) || self.has(scope)
    }
}

/// Why a presented token is not accepted. Messages never quote the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token has this value.
    #[error("the bearer token is not valid")]
    Unknown,
    /// The token expired.
    #[error("the bearer token expired at {0}")]
    Expired(DateTime<Utc>),
    /// The token was revoked.
    #[error("the bearer token was revoked at {0}")]
    Revoked(DateTime<Utc>),
}

/// A token from the config, by digest.
struct StaticToken {
    digest: [u8; 32],
    principal: Principal,
    expires_at: Option<DateTime<Utc>>,
}

/// The known tokens: the config's and the bootstrap admin's by digest, and those of the
/// projections.
pub struct TokenStore {
    statics: Vec<StaticToken>,
    projections: Projections,
}

/// The principal name of the bootstrap admin token.
pub const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";

impl TokenStore {
    /// The config's tokens (already validated), the bootstrap admin token and its expiry if
    /// given, and the tokens the projections hold.
    pub fn new(
        tokens: &[TokenConfig],
        bootstrap_admin: Option<(&SecretString, Option<DateTime<Utc>>)>,
        projections: Projections,
    ) -> Self {
        let mut statics: Vec<StaticToken> = tokens
            .iter()
            .filter_map(|token| {
                let digest = parse_digest(&token.token_sha256)?;
                Some(StaticToken {
                    digest,
                    principal: Principal {
                        name: token.name.clone(),
                        token_id: static_token_id(&digest),
                        scopes: token.scopes.iter().filter_map(|name| Scope::from_name(name)).collect(),
                    },
                    expires_at: token.expires_at,
                })
            })
            .collect();
        if let Some((token, expires_at)) = bootstrap_admin {
            let digest = digest(token.expose_secret());
            statics.push(StaticToken {
                digest,
                principal: Principal {
                    name: BOOTSTRAP_ADMIN.to_owned(),
                    token_id: static_token_id(&digest),
                    scopes: vec![Scope::Admin, Scope::TokenGrant],
                },
                expires_at,
            });
        }
        Self { statics, projections }
    }

    /// The names of the config's tokens and the bootstrap admin's, which tokens made through the
    /// API may not take.
    pub fn static_names(&self) -> impl Iterator<Item = &str> {
        self.statics.iter().map(|entry| entry.principal.name.as_str())
    }

    /// The principal holding `token` at `now`.
    pub fn authenticate(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<Result<Principal, AuthError>, ProjectionError> {
        let presented = digest(token);
        // Every static entry is compared, in constant time.
        let mut found = None;
        for entry in &self.statics {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        if let Some(entry) = found {
            return Ok(match entry.expires_at {
                Some(expiry) if expiry <= now => Err(AuthError::Expired(expiry)),
                _ => Ok(entry.principal.clone()),
            });
        }
        // A lookup by digest: timing can reveal at most something about the digest of a
        // 256-bit random value, which helps no one guess a token.
        // An enrollment token is not an API token, whatever it is presented as.
        let Some(record) = self
            .projections
            .token_by_digest(&hex(&presented))?
            .filter(|record| record.kind == TokenKind::Api)
        else {
            return Ok(Err(AuthError::Unknown));
        };
        match record.usable_at(now) {
            Ok(()) => {}
            Err(TokenUnusable::Revoked(at)) => return Ok(Err(AuthError::Revoked(at))),
            // An API token has no use count.
            Err(TokenUnusable::Expired(at)) => return Ok(Err(AuthError::Expired(at))),
            // An API token has no use count; were one ever given, used up is not valid.
            Err(TokenUnusable::UsedUp { .. }) => return Ok(Err(AuthError::Unknown)),
        }
        Ok(Ok(Principal {
            name: record.name,
            token_id: record.token_id,
            scopes: record.scopes.iter().filter_map(|name| Scope::from_name(name)).collect(),
        }))
    }
}

/// The id of a token from the config (or the bootstrap admin's), by its SHA-256: stable across
/// restarts, so the audit names the same token each time, without revealing its digest.
pub fn static_token_id(token_sha256: &[u8; 32]) -> TokenId {
    let mut hasher = Sha256::new();
    hasher.update(b"fleetlaps static token id\n");
    hasher.update(token_sha256);
    let derived: [u8; 32] = hasher.finalize().into();
    let mut id = [0u8; 16];
    id.copy_from_slice(&derived[..16]);
    TokenId::derived(id)
}

/// The token of a `Bearer <token>` credential; the scheme is case-insensitive (RFC 9110 §11.1).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A fresh API token: the prefix and 32 random bytes, URL-safe base64.
pub fn generate_token() -> SecretString {
    generate_prefixed(TOKEN_PREFIX)
}

/// A fresh enrollment token: its own prefix and 32 random bytes, URL-safe base64.
pub fn generate_enrollment_token() -> SecretString {
    generate_prefixed(ENROLLMENT_TOKEN_PREFIX)
}

fn generate_prefixed(prefix: &str) -> SecretString {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let token = format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    token.into()
}

/// The hex SHA-256 of a token, as `token_sha256` holds it.
pub fn token_sha256(token: &str) -> String {
    hex(&digest(token))
}

/// Whether `text` is a hex SHA-256 (64 hex digits, lower case).
pub fn is_sha256_hex(text: &str) -> bool {
    parse_digest(text).is_some()
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// `bytes` in lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir, tokens: &[TokenConfig], bootstrap: Option<&str>) -> TokenStore {
        let projections = Projections::open(&dir.path().join("db")).expect("opens");
        let bootstrap = bootstrap.map(|token| SecretString::from(token.to_owned()));
        TokenStore::new(tokens, bootstrap.as_ref().map(|token| (token, None)), projections)
    }

    #[test]
    fn read_passwords_includes_read_basic_but_not_the_reverse_and_admin_nothing_else() {
        assert!(Scope::ReadPasswords.grants(Scope::ReadBasic));
        assert!(!Scope::ReadBasic.grants(Scope::ReadPasswords));
        for scope in Scope::ALL {
            assert_eq!(Scope::Admin.grants(scope), scope == Scope::Admin, "{scope}");
            assert_eq!(Scope::TokenGrant.grants(scope), scope == Scope::TokenGrant, "{scope}");
            assert_eq!(Scope::from_name(scope.as_str()), Some(scope));
        }
    }

    #[test]
    fn config_tokens_authenticate_by_digest_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Utc::now();
        let store = store(
            &dir,
            &[
                TokenConfig {
                    name: "helpdesk".to_owned(),
                    token_sha256: token_sha256("t0ken"),
                    scopes: vec![api::SCOPE_READ_BASIC.to_owned()],
                    expires_at: None,
                },
                TokenConfig {
                    name: "old".to_owned(),
                    token_sha256: token_sha256("old-token"),
                    scopes: vec![api::SCOPE_READ_BASIC.to_owned()],
                    expires_at: Some(now - chrono::Duration::seconds(1)),
                },
            ],
            Some("boot"),
        );
        let principal = store.authenticate("t0ken", now).expect("store").expect("known");
        assert_eq!(principal.name, "helpdesk");
        assert!(principal.has(Scope::ReadBasic));
        assert!(!principal.has(Scope::ReadPasswords));
        assert_eq!(
            store.authenticate("other", now).expect("store"),
            Err(AuthError::Unknown)
        );
        assert!(matches!(
            store.authenticate("old-token", now).expect("store"),
            Err(AuthError::Expired(_))
        ));
        let admin = store.authenticate("boot", now).expect("store").expect("bootstrap");
        assert_eq!(
            (admin.name.as_str(), admin.scopes.as_slice()),
            (BOOTSTRAP_ADMIN, &[Scope::Admin, Scope::TokenGrant][..])
        );
        // Static tokens have stable ids of their own.
        let again = store.authenticate("t0ken", now).expect("store").expect("known");
        assert_eq!(principal.token_id, again.token_id);
        assert_ne!(principal.token_id, admin.token_id);
    }

    #[test]
    fn a_principal_grants_only_scopes_it_holds_unless_it_holds_token_grant() {
        let admin = Principal {
            name: "admin".to_owned(),
            token_id: TokenId::new(),
            scopes: vec![Scope::Admin, Scope::ReadPasswords],
        };
        assert!(admin.may_grant(Scope::ReadPasswords));
        assert!(admin.may_grant(Scope::ReadBasic), "Read.All includes ReadBasic");
        assert!(!admin.may_grant(Scope::Rotate));
        assert!(!admin.may_grant(Scope::TokenGrant));
        let granter = Principal {
            scopes: vec![Scope::Admin, Scope::TokenGrant],
            ..admin
        };
        for scope in Scope::ALL {
            assert!(granter.may_grant(scope), "{scope}");
        }
    }

    #[test]
    fn the_bootstrap_admin_token_expires_when_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        let projections = Projections::open(&dir.path().join("db")).expect("opens");
        let token = SecretString::from("a-bootstrap-admin-token".to_owned());
        let expiry = Utc::now();
        let store = TokenStore::new(&[], Some((&token, Some(expiry))), projections);
        assert_eq!(
            store
                .authenticate("a-bootstrap-admin-token", expiry - chrono::Duration::seconds(1))
                .expect("store")
                .map(|principal| principal.name),
            Ok(BOOTSTRAP_ADMIN.to_owned())
        );
        assert_eq!(
            store.authenticate("a-bootstrap-admin-token", expiry).expect("store"),
            Err(AuthError::Expired(expiry))
        );
    }

    #[test]
    fn generated_tokens_are_prefixed_random_and_hash_to_hex() {
        let first = generate_token();
        let second = generate_token();
        assert!(first.expose_secret().starts_with(TOKEN_PREFIX));
        assert_eq!(first.expose_secret().len(), TOKEN_PREFIX.len() + 43);
        assert_ne!(first.expose_secret(), second.expose_secret());
        let hash = token_sha256(first.expose_secret());
        assert!(is_sha256_hex(&hash), "{hash}");
        assert!(!is_sha256_hex("ABC"));
        assert!(!is_sha256_hex(&hash.to_uppercase()));
    }
}
