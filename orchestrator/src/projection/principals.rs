//! The principals projection: the hashed tokens made through the API, one [`TokenRecord`] per
//! token of either kind (API tokens folded from `token_created`/`token_revoked`, enrollment
//! tokens from `enrollment_token_created`/`enrollment_token_revoked`, with the uses
//! `device_enrolled` counts); and the keys devices enrolled with.

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::{DeviceEnrolled, EnrollmentTokenCreated, TokenCreated, TokenId};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::signature::DevicePublicKey;
use serde::{Deserialize, Serialize};

/// What a token is for: calling the API as a principal, or enrolling devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A bearer token for the API, with scopes.
    Api,
    /// A token devices enroll with, with a use count.
    Enrollment,
}

impl TokenKind {
    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Api => "token",
            Self::Enrollment => "enrollment token",
        }
    }
}

/// One hashed token made through the API, of either kind, as the history describes it. Holds
/// the token's SHA-256, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's id.
    pub token_id: TokenId,
    /// API token or enrollment token.
    pub kind: TokenKind,
    /// Its holder (an API token: the principal the audit records) or purpose (an enrollment
    /// token: a batch of devices, a site).
    pub name: String,
    /// Its scopes, by name, as created (unknown names grant nothing); none for an enrollment
    /// token.
    pub scopes: Vec<String>,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// When it was created (the event's time).
    pub created_at: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// The id of the token that created it, when the history names it.
    pub created_by_token_id: Option<TokenId>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// How many times it may be used, if it is counted (enrollment tokens).
    pub max_uses: Option<u32>,
    /// How many times it was used (`device_enrolled` events naming it).
    pub uses: u32,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// The id of the token that revoked it, when the history names it.
    pub revoked_by_token_id: Option<TokenId>,
}

/// Why a known token does not work now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUnusable {
    /// Revoked at this time.
    Revoked(DateTime<Utc>),
    /// Expired at this time.
    Expired(DateTime<Utc>),
    /// Used as many times as it may be.
    UsedUp {
        /// Its limit.
        max_uses: u32,
    },
}

impl TokenRecord {
    /// The record a `token_created` event makes.
    pub fn api(created: &TokenCreated, time: DateTime<Utc>) -> Self {
        Self {
            token_id: created.token_id,
            kind: TokenKind::Api,
            name: created.name.clone(),
            scopes: created.scopes.clone(),
            token_sha256: created.token_sha256.clone(),
            created_at: time,
            created_by: created.created_by.clone(),
            created_by_token_id: created.created_by_token_id,
            expires_at: created.expires_at,
            max_uses: None,
            uses: 0,
            revoked_at: None,
            revoked_by: None,
            revoked_by_token_id: None,
        }
    }

    /// The record an `enrollment_token_created` event makes.
    pub fn enrollment(created: &EnrollmentTokenCreated, time: DateTime<Utc>) -> Self {
        Self {
            token_id: created.token_id,
            kind: TokenKind::Enrollment,
            name: created.name.clone(),
            scopes: Vec::new(),
            token_sha256: created.token_sha256.clone(),
            created_at: time,
            created_by: created.created_by.clone(),
            created_by_token_id: created.created_by_token_id,
            expires_at: Some(created.expires_at),
            max_uses: Some(created.max_uses),
            uses: 0,
            revoked_at: None,
            revoked_by: None,
            revoked_by_token_id: None,
        }
    }

    /// Revoked at `time` by `by` (and the token `by_token_id`); a token revoked before keeps its
    /// first revocation.
    pub fn revoke(&mut self, time: DateTime<Utc>, by: &str, by_token_id: Option<TokenId>) {
        if self.revoked_at.is_none() {
            self.revoked_at = Some(time);
            self.revoked_by = Some(by.to_owned());
            self.revoked_by_token_id = by_token_id;
        }
    }

    /// A device enrolled with it (`device_enrolled`). The API reserves uses before it records an
    /// enrollment; the fold only counts.
    pub fn count_use(&mut self) {
        self.uses = self.uses.saturating_add(1);
    }

    /// Whether it works at `now`: not revoked, not expired, not used up. Revocation is named
    /// first, then expiry, then uses.
    pub fn usable_at(&self, now: DateTime<Utc>) -> Result<(), TokenUnusable> {
        if let Some(revoked) = self.revoked_at {
            return Err(TokenUnusable::Revoked(revoked));
        }
        if let Some(expiry) = self.expires_at.filter(|expiry| *expiry <= now) {
            return Err(TokenUnusable::Expired(expiry));
        }
        match self.max_uses {
            Some(max_uses) if self.uses >= max_uses => Err(TokenUnusable::UsedUp { max_uses }),
            _ => Ok(()),
        }
    }
}

impl EnrolledKeyRecord {
    /// The record a `device_enrolled` event makes; refused when it does not name a usable
    /// Ed25519 public key.
    pub fn enrolled(body: &DeviceEnrolled, time: DateTime<Utc>) -> Result<Self, String> {
        DevicePublicKey::parse(&body.public_key).map_err(|err| format!("device_enrolled: {err}"))?;
        Ok(Self {
            device_id: body.device_id.clone(),
            public_key: body.public_key.clone(),
            enrollment_token_id: body.enrollment_token_id,
            enrolled_at: time,
        })
    }
}

/// The key a device enrolled with: its events must be signed with the matching secret key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledKeyRecord {
    /// The device.
    pub device_id: DeviceId,
    /// Its Ed25519 public key, standard base64.
    pub public_key: String,
    /// The enrollment token it presented.
    pub enrollment_token_id: TokenId,
    /// When it enrolled (the event's time).
    pub enrolled_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrollment(max_uses: u32, expires_at: DateTime<Utc>) -> TokenRecord {
        TokenRecord::enrollment(
            &EnrollmentTokenCreated {
                token_id: TokenId::new(),
                name: "batch".to_owned(),
                max_uses,
                expires_at,
                token_sha256: "ab".repeat(32),
                created_by: "admin".to_owned(),
                created_by_token_id: None,
            },
            Utc::now(),
        )
    }

    #[test]
    fn a_token_is_unusable_once_revoked_expired_or_used_up_and_revocation_is_named_first() {
        let now = Utc::now();
        let mut token = enrollment(2, now + chrono::Duration::hours(1));
        assert_eq!(token.usable_at(now), Ok(()));
        token.uses = 2;
        assert_eq!(token.usable_at(now), Err(TokenUnusable::UsedUp { max_uses: 2 }));
        let later = now + chrono::Duration::hours(2);
        assert_eq!(
            token.usable_at(later),
            Err(TokenUnusable::Expired(now + chrono::Duration::hours(1)))
        );
        token.revoked_at = Some(now);
        assert_eq!(token.usable_at(later), Err(TokenUnusable::Revoked(now)));
    }

    #[test]
    fn a_revocation_is_kept_at_its_first_and_uses_are_counted() {
        let now = Utc::now();
        let mut token = enrollment(3, now + chrono::Duration::hours(1));
        token.count_use();
        token.count_use();
        assert_eq!(token.uses, 2);
        let by = TokenId::new();
        token.revoke(now, "admin", Some(by));
        token.revoke(now + chrono::Duration::hours(1), "other", None);
        assert_eq!(
            (token.revoked_at, token.revoked_by.as_deref(), token.revoked_by_token_id),
            (Some(now), Some("admin"), Some(by))
        );
    }

    #[test]
    fn an_enrolled_key_must_be_a_usable_public_key() {
        let body = |public_key: String| DeviceEnrolled {
            device_id: fleetlaps_proto::ids::DeviceId::parse("dev-1").unwrap(),
            device_name: fleetlaps_proto::ids::DeviceName::parse("host-1").unwrap(),
            public_key,
            enrollment_token_id: TokenId::new(),
            tags: Vec::new(),
        };
        let key = fleetlaps_proto::signature::DeviceSigningKey::generate()
            .public_key()
            .to_string();
        assert!(EnrolledKeyRecord::enrolled(&body(key), Utc::now()).is_ok());
        assert!(EnrolledKeyRecord::enrolled(&body("nope".to_owned()), Utc::now()).is_err());
    }

    #[test]
    fn an_api_token_has_no_use_count_and_may_never_expire() {
        let token = TokenRecord::api(
            &TokenCreated {
                token_id: TokenId::new(),
                name: "auditor".to_owned(),
                scopes: vec!["Audit.Read.All".to_owned()],
                expires_at: None,
                token_sha256: "cd".repeat(32),
                created_by: "admin".to_owned(),
                created_by_token_id: None,
            },
            Utc::now(),
        );
        assert_eq!(token.kind, TokenKind::Api);
        assert_eq!(token.max_uses, None);
        assert_eq!(token.usable_at(Utc::now() + chrono::Duration::days(3650)), Ok(()));
    }
}
