//! The bearer-token extractor: turns `Authorization: Bearer <token>` into a [`Principal`].

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::auth::{Principal, Scope};

/// The principal that presented a valid bearer token. Extracting it rejects the request with a
/// 401 otherwise, so a handler that takes one never runs unauthenticated.
pub(super) struct Authenticated(pub(super) Principal);

impl Authenticated {
    /// Fails with a 403 naming `wanted` unless the principal holds it (or a scope that grants it).
    pub(super) fn require(&self, wanted: Scope) -> Result<(), ApiError> {
        if self.0.has(wanted) {
            Ok(())
        } else {
            Err(ApiError::MissingScope(wanted))
        }
    }
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header_value = parts.headers.get(header::AUTHORIZATION).ok_or(ApiError::MissingToken)?;
        let token = header_value
            .to_str()
            .ok()
            .and_then(bearer_token)
            .ok_or(ApiError::MalformedToken)?;
        state.tokens.authenticate(token).map(Self).ok_or(ApiError::UnknownToken)
    }
}

/// The token of a `Bearer <token>` credential; the scheme is case-insensitive (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials_are_recognised() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
}
