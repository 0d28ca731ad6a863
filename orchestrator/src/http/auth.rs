//! The bearer-token extractor: turns `Authorization: Bearer <token>` into a [`Principal`], and
//! [`RequestContext`]: what the audit records of a request besides its principal.

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
        // A token is looked up in the projections: not before they have caught up, or a token
        // revoked on the history could still pass.
        state.health.authority()?;
        Ok(Self(state.tokens.authenticate(token, chrono::Utc::now())??))
    }
}

/// What the audit records of a request: Graph's client headers, the reason the caller gave, and
/// the address it came from. Values are cut to a bounded length.
pub(super) struct RequestContext {
    /// Graph's `ocp-client-name`.
    pub(super) client_name: Option<String>,
    /// Graph's `ocp-client-version`.
    pub(super) client_version: Option<String>,
    /// The `x-fleetlaps-reason` header.
    pub(super) reason: Option<String>,
    /// The peer address of the connection.
    pub(super) source_address: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let header = |name: &str, limit: usize| {
            let value = parts.headers.get(name)?.to_str().ok()?.trim();
            (!value.is_empty()).then(|| value.chars().take(limit).collect::<String>())
        };
        Ok(Self {
            client_name: header(CLIENT_NAME_HEADER, 64),
            client_version: header(CLIENT_VERSION_HEADER, 64),
            reason: header(fleetlaps_proto::api::REASON_HEADER, 200),
            source_address: parts
                .extensions
                .get::<axum::extract::ConnectInfo<super::PeerAddr>>()
                .map(|info| info.0.0.ip().to_string()),
        })
    }
}

/// Graph's optional client headers, recorded with each audited request when present.
pub(super) const CLIENT_NAME_HEADER: &str = "ocp-client-name";
/// See [`CLIENT_NAME_HEADER`].
pub(super) const CLIENT_VERSION_HEADER: &str = "ocp-client-version";

pub(super) use crate::auth::bearer_token;

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
