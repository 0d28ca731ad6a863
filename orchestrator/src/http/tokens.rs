//! Hashed tokens made through the API, of both kinds, managed by principals with `Admin`: API
//! tokens here, enrollment tokens in [`super::enrollment`], which shares [`issue`],
//! [`list_records`] and [`revoke_record`] with this module.
//!
//! - `POST /v1.0/fleetlaps/tokens` with a [`TokenRequest`]: records a `token_created` event
//!   holding the token's SHA-256 and answers 201 with the token, shown this once. Each scope
//!   must be one the creator holds, unless it holds `Token.Grant` (403 naming the scope).
//! - `GET /v1.0/fleetlaps/tokens`: the tokens made through the API, without secrets, paged
//!   (`$top`, `$skiptoken`, `@odata.nextLink`).
//! - `DELETE /v1.0/fleetlaps/tokens/{tokenId}`: records a `token_revoked` event; 204.
//!
//! Names are unique among the usable tokens of a kind (409 otherwise), so the audit's name
//! stands for one holder; the audit records the token's id beside it too. Creations are
//! serialized by [`AppState::token_issuance`], so two concurrent requests cannot both take a
//! name. Both changes wait until the projections show them, so a revoked token is refused, and
//! a new one accepted, by the time the answer arrives.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use fleetlaps_proto::api::{BearerToken, CreatedToken, ODataCollection, TokenInfo, TokenRequest};
use fleetlaps_proto::audit::{AuditEvent, TokenCreated, TokenId, TokenRevoked};
use secrecy::{ExposeSecret, SecretString};

use super::AppState;
use super::auth::Authenticated;
use super::error::ApiError;
use super::odata::{self, QueryOptions};
use crate::auth::{self, Principal, Scope};
use crate::projection::{TokenKind, TokenRecord};

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
    let name = parse_name(&request.name)?;
    if request.scopes.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "scopes is empty; allowed: one or more of {}",
            Scope::ALL.map(Scope::as_str).join(", ")
        )));
    }
    let scopes = Scope::parse_all(&request.scopes).map_err(ApiError::BadRequest)?;
    // No escalation: a creator gives only what it holds, unless it holds Token.Grant.
    if let Some(scope) = scopes.iter().find(|scope| !principal.0.may_grant(**scope)) {
        return Err(ApiError::CannotGrant(*scope));
    }
    let now = Utc::now();
    if let Some(expiry) = request.expires_date_time.filter(|expiry| *expiry <= now) {
        return Err(ApiError::BadRequest(format!(
            "expiresDateTime {expiry} is in the past; allowed: a time after now, or none"
        )));
    }
    let scope_names = request.scopes.clone();
    let expires_at = request.expires_date_time;
    let (token, record) = issue(&state, TokenKind::Api, &name, &principal.0, |token_id, token_sha256| {
        AuditEvent::TokenCreated(TokenCreated {
            token_id,
            name: name.clone(),
            scopes: scope_names,
            expires_at,
            token_sha256,
            created_by: principal.0.name.clone(),
            created_by_token_id: Some(principal.0.token_id),
        })
    })
    .await?;
    let info = info(&record);
    tracing::info!(token_id = %record.token_id, holder = %info.name, scopes = ?info.scopes, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: BearerToken::new(token.expose_secret().to_owned()),
            info,
        }),
    ))
}

/// Lists the tokens made through the API, oldest first, one page at a time.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    options: QueryOptions,
) -> Result<Json<ODataCollection<TokenInfo>>, ApiError> {
    let (page, next_link) = list_records(&state, &principal, TokenKind::Api, LIST_PATH, &options)?;
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: page.iter().map(info).collect(),
        next_link,
    }))
}

/// Revokes a token. Revoking a revoked token changes nothing and answers 204 again.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    principal: Authenticated,
    Path(token_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    revoke_record(&state, &principal, TokenKind::Api, &token_id, |token_id, by| {
        AuditEvent::TokenRevoked(TokenRevoked {
            token_id,
            revoked_by: by.name.clone(),
            revoked_by_token_id: Some(by.token_id),
        })
    })
    .await
}

/// A token name: trimmed, 1 to [`NAME_MAX`] printable characters.
pub(super) fn parse_name(raw: &str) -> Result<String, ApiError> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > NAME_MAX || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "name {raw:?}: allowed 1 to {NAME_MAX} printable characters"
        )));
    }
    Ok(name.to_owned())
}

/// Makes a token of `kind` named `name`: refuses a name a usable token of the kind has, records
/// the event `created` builds from the new id and digest, and returns the token (to be shown
/// this once) with its record as the projections show it.
pub(super) async fn issue(
    state: &AppState,
    kind: TokenKind,
    name: &str,
    creator: &Principal,
    created: impl FnOnce(TokenId, String) -> AuditEvent,
) -> Result<(SecretString, TokenRecord), ApiError> {
    // Held until the projections show the new token, so no other creation takes the name.
    let _issuing = state.token_issuance.lock().await;
    let now = Utc::now();
    let name_taken = state
        .projections
        .tokens(kind)?
        .iter()
        .any(|token| token.name == name && token.usable_at(now).is_ok())
        || (kind == TokenKind::Api && state.tokens.static_names().any(|static_name| static_name == name));
    if name_taken {
        return Err(ApiError::NameTaken {
            kind: kind.describe(),
            name: name.to_owned(),
        });
    }
    let token = match kind {
        TokenKind::Api => auth::generate_token(),
        TokenKind::Enrollment => auth::generate_enrollment_token(),
    };
    let token_id = TokenId::new();
    let event = created(token_id, auth::token_sha256(token.expose_secret()));
    if !state.record_visible(event).await? {
        // The token exists from here on, but without the projections showing it the name rule
        // cannot hold: say so rather than hand out a token that may not work yet.
        tracing::warn!(%token_id, by = %creator.name, "the new {} is recorded but not yet in the projections", kind.describe());
        return Err(ApiError::NotYetVisible);
    }
    let record = state.projections.token(&token_id)?.ok_or(ApiError::NotYetVisible)?;
    Ok((token, record))
}

/// One page of the tokens of `kind`, oldest first (ids are time-ordered), for a principal with
/// `Admin`, and the link to the next page of `path` when more follow (`$top`, `$skiptoken`: the
/// last token id of the page).
pub(super) fn list_records(
    state: &AppState,
    principal: &Authenticated,
    kind: TokenKind,
    path: &str,
    options: &QueryOptions,
) -> Result<(Vec<TokenRecord>, Option<String>), ApiError> {
    principal.require(Scope::Admin)?;
    options.allow_only(&["$top", "$skiptoken"], &format!("the {} list", kind.describe()))?;
    let page_size = options.page_size()?;
    let after = options.skip_token_as(TokenId::parse)?;
    let tokens = state
        .projections
        .tokens(kind)?
        .into_iter()
        .filter(|token| after.is_none_or(|after| token.token_id > after));
    Ok(odata::page(tokens, page_size, |last: &TokenRecord| {
        odata::next_link(path, options, &[], page_size, &last.token_id.to_string())
    }))
}

/// Revokes the token of `kind` with id `token_id` by recording the event `revoked` builds, and
/// answers once the projections show it. A revoked token answers 204 again, unchanged.
pub(super) async fn revoke_record(
    state: &AppState,
    principal: &Authenticated,
    kind: TokenKind,
    token_id: &str,
    revoked: impl FnOnce(TokenId, &Principal) -> AuditEvent,
) -> Result<StatusCode, ApiError> {
    principal.require(Scope::Admin)?;
    let token_id = TokenId::parse(token_id).map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let record = state
        .projections
        .token(&token_id)?
        .filter(|record| record.kind == kind)
        .ok_or_else(|| ApiError::TokenNotFound {
            kind: kind.describe(),
            id: token_id.to_string(),
        })?;
    if record.revoked_at.is_some() {
        return Ok(StatusCode::NO_CONTENT);
    }
    if !state.record_visible(revoked(token_id, &principal.0)).await? {
        return Err(ApiError::NotYetVisible);
    }
    tracing::info!(%token_id, name = %record.name, "{} revoked", kind.describe());
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
