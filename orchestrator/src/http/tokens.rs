//! API tokens, managed by principals with the `Admin` scope.
//!
//! - `POST /v1.0/fleetlaps/tokens` with a [`TokenRequest`]: records a `token_created` event
//!   holding the token's SHA-256 and answers 201 with the token, shown this once.
//! - `GET /v1.0/fleetlaps/tokens`: every token made through the API, without secrets.
//! - `DELETE /v1.0/fleetlaps/tokens/{tokenId}`: records a `token_revoked` event; 204.
//!
//! Both changes wait until the projections show them, so a revoked token is refused, and a new
//! one accepted, by the time the answer arrives.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use fleetlaps_proto::api::{BearerToken, CreatedToken, ODataCollection, TokenInfo, TokenRequest};
use fleetlaps_proto::audit::{AuditEvent, TokenCreated, TokenId, TokenRevoked};
use secrecy::ExposeSecret;

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use crate::auth::{self, Scope};
use crate::projection::TokenRecord;

/// The collection's route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/tokens";
/// One token's route.
pub(super) const ITEM_PATH: &str = "/v1.0/fleetlaps/tokens/{tokenId}";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/tokens";
/// The longest token name.
const NAME_MAX: usize = 64;

/// Creates a token.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn create(
    State(state): State<AppState>,
    principal: Authenticated,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    principal.require(Scope::Admin)?;
    let request: TokenRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "the body is not a token request ({err}); expected {{\"name\": \"…\", \"scopes\": [\"…\"], \
             \"expiresDateTime\": \"RFC 3339, optional\"}}"
        ))
    })?;
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > NAME_MAX || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "name {:?}: allowed 1 to {NAME_MAX} printable characters",
            request.name
        )));
    }
    if request.scopes.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "scopes is empty; allowed: one or more of {}",
            Scope::ALL.map(Scope::as_str).join(", ")
        )));
    }
    Scope::parse_all(&request.scopes).map_err(ApiError::BadRequest)?;
    let now = Utc::now();
    if let Some(expiry) = request.expires_date_time.filter(|expiry| *expiry <= now) {
        return Err(ApiError::BadRequest(format!(
            "expiresDateTime {expiry} is in the past; allowed: a time after now, or none"
        )));
    }
    let token = auth::generate_token();
    let created = TokenCreated {
        token_id: TokenId::new(),
        name: name.to_owned(),
        scopes: request.scopes.clone(),
        expires_at: request.expires_date_time,
        token_sha256: auth::token_sha256(token.expose_secret()),
        created_by: principal.0.name.clone(),
    };
    let token_id = created.token_id;
    // The token exists from here on: answer with it even if it takes a moment to work.
    if !state.record_visible(AuditEvent::TokenCreated(created)).await? {
        tracing::warn!(%token_id, "the new token is recorded but not yet in the projections");
    }
    let record = state.projections.token(&token_id)?;
    let info = match record {
        Some(record) => info(&record),
        None => TokenInfo {
            id: token_id.to_string(),
            name: name.to_owned(),
            scopes: request.scopes,
            created_date_time: now,
            created_by: principal.0.name.clone(),
            expires_date_time: request.expires_date_time,
            revoked_date_time: None,
        },
    };
    tracing::info!(%token_id, holder = %info.name, scopes = ?info.scopes, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: BearerToken::new(token.expose_secret().to_owned()),
            info,
        }),
    ))
}

/// Lists the tokens made through the API, oldest first.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
) -> Result<Json<ODataCollection<TokenInfo>>, ApiError> {
    principal.require(Scope::Admin)?;
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: state.projections.tokens()?.iter().map(info).collect(),
        next_link: None,
    }))
}

/// Revokes a token. Revoking a revoked token changes nothing and answers 204 again.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    principal: Authenticated,
    Path(token_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Scope::Admin)?;
    let token_id = TokenId::parse(&token_id).map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let record = state
        .projections
        .token(&token_id)?
        .ok_or_else(|| ApiError::TokenNotFound(token_id.to_string()))?;
    if record.revoked_at.is_some() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let revoked = AuditEvent::TokenRevoked(TokenRevoked {
        token_id,
        revoked_by: principal.0.name.clone(),
    });
    if !state.record_visible(revoked).await? {
        return Err(ApiError::NotYetVisible);
    }
    tracing::info!(%token_id, holder = %record.name, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}

fn info(record: &TokenRecord) -> TokenInfo {
    TokenInfo {
        id: record.token_id.to_string(),
        name: record.name.clone(),
        scopes: record.scopes.clone(),
        created_date_time: record.created_at,
        created_by: record.created_by.clone(),
        expires_date_time: record.expires_at,
        revoked_date_time: record.revoked_at,
    }
}
