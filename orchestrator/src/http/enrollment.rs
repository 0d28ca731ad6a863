//! Enrollment: tokens an admin hands out, and the endpoint devices enroll through.
//!
//! - `POST /v1.0/fleetlaps/enrollmentTokens` (`Admin`) with an [`EnrollmentTokenRequest`]: records
//!   an `enrollment_token_created` event holding the token's SHA-256 and answers 201 with the
//!   token, shown this once. `maxUses` defaults to 1 (single-use), `expiresDateTime` to 24 hours
//!   from now.
//! - `GET /v1.0/fleetlaps/enrollmentTokens` (`Admin`): the enrollment tokens with their use
//!   counts, paged (`$top`, `$skiptoken`, `@odata.nextLink`).
//! - `DELETE /v1.0/fleetlaps/enrollmentTokens/{tokenId}` (`Admin`): records an
//!   `enrollment_token_revoked` event; 204.
//! - `POST /fleetlaps/v1/enroll` with the enrollment token as bearer and an [`EnrollmentRequest`]:
//!   records a `device_enrolled` event with a new device id and the device's public key, waits
//!   until the projections show it, and answers 201 with an [`EnrollmentResponse`]. A token that
//!   is unknown, expired, revoked or used up is refused with 401 naming which.
//!
//! Uses are reserved under [`AppState::enrollments_in_flight`] before the event is recorded, so
//! concurrent enrollments never exceed `maxUses`; a reservation whose enrollment the projections
//! already count is not counted again, even when the fold counts it while the reservations are
//! being counted, so none is refused while a use is left.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use chrono::Utc;
use fleetlaps_proto::api::{
    BearerToken, CreatedEnrollmentToken, EnrollmentRequest, EnrollmentResponse, EnrollmentTokenInfo,
    EnrollmentTokenRequest, ODataCollection,
};
use fleetlaps_proto::audit::{AuditEvent, DeviceEnrolled, EnrollmentTokenCreated, EnrollmentTokenRevoked, TokenId};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::signature::DevicePublicKey;
use secrecy::ExposeSecret;

use super::AppState;
use super::auth::{Authenticated, bearer_token};
use super::error::ApiError;
use super::odata::QueryOptions;
use super::tokens;
use crate::auth::{self, Scope};
use crate::projection::{TokenKind, TokenRecord, TokenUnusable};

/// The collection's route.
pub(super) const LIST_PATH: &str = "/v1.0/fleetlaps/enrollmentTokens";
/// One enrollment token's route.
pub(super) const ITEM_PATH: &str = "/v1.0/fleetlaps/enrollmentTokens/{tokenId}";
/// The devices' enrollment route.
pub(super) const ENROLL_PATH: &str = "/fleetlaps/v1/enroll";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#fleetlaps/enrollmentTokens";
/// The most devices one token may enroll.
const MAX_USES: u32 = 10_000;
/// How long a token works when the request does not say.
const DEFAULT_LIFETIME_HOURS: i64 = 24;

/// Creates an enrollment token.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn create(
    State(state): State<AppState>,
    principal: Authenticated,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), ApiError> {
    principal.require(Scope::Admin)?;
    let request: EnrollmentTokenRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "the body is not an enrollment token request ({err}); expected {{\"name\": \"…\", \"maxUses\": 1 to \
             {MAX_USES}, optional, \"expiresDateTime\": \"RFC 3339, optional\"}}"
        ))
    })?;
    let name = tokens::parse_name(&request.name)?;
    let max_uses = request.max_uses.unwrap_or(1);
    if !(1..=MAX_USES).contains(&max_uses) {
        return Err(ApiError::BadRequest(format!(
            "maxUses {max_uses}: allowed 1 to {MAX_USES}"
        )));
    }
    let now = Utc::now();
    let expires_at = request
        .expires_date_time
        .unwrap_or_else(|| now + chrono::Duration::hours(DEFAULT_LIFETIME_HOURS));
    if expires_at <= now {
        return Err(ApiError::BadRequest(format!(
            "expiresDateTime {expires_at} is in the past; allowed: a time after now"
        )));
    }
    let (token, record) = tokens::issue(
        &state,
        TokenKind::Enrollment,
        &name,
        &principal.0,
        |token_id, token_sha256| {
            AuditEvent::EnrollmentTokenCreated(EnrollmentTokenCreated {
                token_id,
                name: name.clone(),
                max_uses,
                expires_at,
                token_sha256,
                created_by: principal.0.name.clone(),
                created_by_token_id: Some(principal.0.token_id),
            })
        },
    )
    .await?;
    let info = info(&record);
    tracing::info!(token_id = %record.token_id, name = %info.name, max_uses, %expires_at, "enrollment token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollmentToken {
            token: BearerToken::new(token.expose_secret().to_owned()),
            info,
        }),
    ))
}

/// Lists the enrollment tokens, oldest first.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    options: QueryOptions,
) -> Result<Json<ODataCollection<EnrollmentTokenInfo>>, ApiError> {
    let (page, next_link) = tokens::list_records(&state, &principal, TokenKind::Enrollment, LIST_PATH, &options)?;
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: page.iter().map(info).collect(),
        next_link,
    }))
}

/// Revokes an enrollment token. Revoking a revoked token changes nothing and answers 204 again.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    principal: Authenticated,
    Path(token_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    tokens::revoke_record(&state, &principal, TokenKind::Enrollment, &token_id, |token_id, by| {
        AuditEvent::EnrollmentTokenRevoked(EnrollmentTokenRevoked {
            token_id,
            revoked_by: by.name.clone(),
            revoked_by_token_id: Some(by.token_id),
        })
    })
    .await
}

/// Enrolls a device: records its key under a new device id, and tells it its id, the escrow key
/// and the policy.
#[tracing::instrument(skip_all, fields(device_id))]
pub(super) async fn enroll(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<EnrollmentResponse>), ApiError> {
    let header_value = headers.get(header::AUTHORIZATION).ok_or(ApiError::MissingToken)?;
    let token = header_value
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or(ApiError::MalformedToken)?;
    let request: EnrollmentRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "the body is not an enrollment request ({err}); expected {{\"publicKey\": \"base64 Ed25519 public \
             key\", \"deviceName\": \"host name\"}}"
        ))
    })?;
    let public_key =
        DevicePublicKey::parse(&request.public_key).map_err(|err| ApiError::BadRequest(format!("publicKey: {err}")))?;
    super::devices::check_tags(&request.tags)?;
    // The token's uses and revocation live in the projections: not trusted before they caught up.
    state.health.authority()?;
    let device_id = DeviceId::new_random();
    tracing::Span::current().record("device_id", tracing::field::display(&device_id));
    let (token_id, reservation_id) = reserve(&state, &auth::token_sha256(token), &device_id)?;
    // Gives the use back however this request ends, a client hanging up included.
    let mut reservation = Reservation {
        state: state.clone(),
        token_id,
        id: reservation_id,
        recorded_at: None,
        released: false,
    };
    let enrolled = AuditEvent::DeviceEnrolled(DeviceEnrolled {
        device_id: device_id.clone(),
        device_name: request.device_name.clone(),
        public_key: public_key.to_string(),
        enrollment_token_id: token_id,
        tags: request.tags.clone(),
    });
    let sequence = match state.record(enrolled).await {
        Ok(sequence) => sequence,
        Err(err) => {
            reservation.release_now();
            return Err(err);
        }
    };
    reservation.recorded_at = Some(sequence);
    if state
        .projections
        .wait_for_sequence(sequence, super::VISIBLE_TIMEOUT)
        .await
    {
        // The projections count this use now.
        reservation.release_now();
    } else {
        // Kept reserved until the projections count it (the reservation's drop waits for that),
        // so the token is never used beyond its count, nor the use counted twice.
        tracing::warn!("the enrollment is recorded but not yet in the projections; its use stays reserved until it is");
    }
    tracing::info!(%token_id, device_name = %request.device_name, "device enrolled");
    Ok((
        StatusCode::CREATED,
        Json(EnrollmentResponse {
            device_id,
            escrow_public_key: state.escrow.public_key(),
            escrow_recovery_public_key: state.escrow_recovery_public_key,
            policy: state.policy.clone(),
        }),
    ))
}

/// The uses of enrollment tokens reserved by enrollments under way.
#[derive(Debug, Default)]
pub struct EnrollmentsInFlight {
    /// The id the next reservation gets.
    next_id: u64,
    /// By token, each reservation's id and the device it enrolls: the projections count the use
    /// once they hold that device's key.
    by_token: HashMap<TokenId, HashMap<u64, DeviceId>>,
}

impl EnrollmentsInFlight {
    /// How many uses are reserved, of every token.
    pub fn reserved(&self) -> usize {
        self.by_token.values().map(HashMap::len).sum()
    }
}

/// Takes one use of the enrollment token with this digest for `device_id`, or refuses naming
/// why; returns the token's id and the reservation's.
fn reserve(state: &AppState, token_sha256: &str, device_id: &DeviceId) -> Result<(TokenId, u64), ApiError> {
    let mut in_flight = state
        .enrollments_in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Read under the lock: a use leaves `in_flight` only once the projections count it.
    let read_token = || -> Result<Option<TokenRecord>, ApiError> {
        // An API token is not an enrollment token, whatever it is presented as.
        Ok(state
            .projections
            .token_by_digest(token_sha256)?
            .filter(|record| record.kind == TokenKind::Enrollment))
    };
    let not_yet_counted = |token_id: TokenId| -> Result<u32, ApiError> {
        let mut count = 0;
        for reserved_device in in_flight.by_token.get(&token_id).into_iter().flat_map(HashMap::values) {
            if state.projections.enrolled_key(reserved_device)?.is_none() {
                count += 1;
            }
        }
        Ok(count)
    };
    let Some((record, not_yet_counted)) = token_and_reserved(read_token, not_yet_counted)? else {
        return Err(ApiError::EnrollmentRefused(
            "the enrollment token is not valid".to_owned(),
        ));
    };
    match record.usable_at(Utc::now()) {
        Ok(()) => {}
        Err(TokenUnusable::Revoked(revoked)) => {
            return Err(ApiError::EnrollmentRefused(format!(
                "the enrollment token was revoked at {revoked}"
            )));
        }
        Err(TokenUnusable::Expired(expiry)) => {
            return Err(ApiError::EnrollmentRefused(format!(
                "the enrollment token expired at {expiry}"
            )));
        }
        Err(TokenUnusable::UsedUp { max_uses }) => {
            return Err(ApiError::EnrollmentRefused(format!(
                "the enrollment token is used up: {max_uses} of {max_uses} enrollments made"
            )));
        }
    }
    let max_uses = record.max_uses.unwrap_or(u32::MAX);
    if record.uses.saturating_add(not_yet_counted) >= max_uses {
        return Err(ApiError::EnrollmentRefused(format!(
            "the enrollment token is used up: {max_uses} of {max_uses} enrollments made"
        )));
    }
    let id = in_flight.next_id;
    in_flight.next_id += 1;
    in_flight
        .by_token
        .entry(record.token_id)
        .or_default()
        .insert(id, device_id.clone());
    Ok((record.token_id, id))
}

/// The enrollment token `read_token` reads, and how many of its uses are reserved by
/// enrollments the projections do not count yet (`not_yet_counted`), each enrollment counted
/// once: in the token's uses or as not yet counted, never both and never neither. An enrollment
/// folded between the two reads would be one or the other, so the reservations are counted
/// between two reads of the token's uses, and again whenever those differ.
fn token_and_reserved(
    read_token: impl Fn() -> Result<Option<TokenRecord>, ApiError>,
    not_yet_counted: impl Fn(TokenId) -> Result<u32, ApiError>,
) -> Result<Option<(TokenRecord, u32)>, ApiError> {
    loop {
        let Some(record) = read_token()? else {
            return Ok(None);
        };
        let reserved = not_yet_counted(record.token_id)?;
        if read_token()?.map(|again| again.uses) == Some(record.uses) {
            return Ok(Some((record, reserved)));
        }
    }
}

/// One reserved use of an enrollment token, given back when dropped: at once if nothing was
/// recorded, once the projections count the enrollment if it was, and after
/// [`super::VISIBLE_TIMEOUT`] if the request ended while the recording was in flight (it may or
/// may not have reached the history). So a client that hangs up never leaves a use taken.
struct Reservation {
    state: AppState,
    token_id: TokenId,
    /// Its id among the token's reservations.
    id: u64,
    /// The stream sequence of the recorded enrollment, once JetStream acknowledged it.
    recorded_at: Option<u64>,
    /// Whether the use was given back already.
    released: bool,
}

impl Reservation {
    /// Gives the use back now (nothing was recorded, or the projections count it).
    fn release_now(mut self) {
        release(&self.state, self.token_id, self.id);
        self.released = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (state, token_id, id, recorded_at) = (self.state.clone(), self.token_id, self.id, self.recorded_at);
        tokio::spawn(async move {
            match recorded_at {
                Some(sequence) => {
                    while !state
                        .projections
                        .wait_for_sequence(sequence, super::VISIBLE_TIMEOUT)
                        .await
                    {}
                }
                None => tokio::time::sleep(super::VISIBLE_TIMEOUT).await,
            }
            release(&state, token_id, id);
        });
    }
}

/// Gives back the reservation `id` of the token.
fn release(state: &AppState, token_id: TokenId, id: u64) {
    let mut in_flight = state
        .enrollments_in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(reservations) = in_flight.by_token.get_mut(&token_id) {
        reservations.remove(&id);
        if reservations.is_empty() {
            in_flight.by_token.remove(&token_id);
        }
    }
}

fn info(record: &TokenRecord) -> EnrollmentTokenInfo {
    EnrollmentTokenInfo {
        id: record.token_id.to_string(),
        name: record.name.clone(),
        max_uses: record.max_uses.unwrap_or(0),
        uses: record.uses,
        created_date_time: record.created_at,
        created_by: record.created_by.clone(),
        // Every enrollment token is made with an expiry.
        expires_date_time: record.expires_at.unwrap_or(record.created_at),
        revoked_date_time: record.revoked_at,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use fleetlaps_proto::audit::EnrollmentTokenCreated;

    use super::*;

    /// Whether the fold counts the reserved enrollment before or after its reservation is checked.
    #[derive(Clone, Copy, Debug)]
    enum FoldLands {
        BeforeTheCheck,
        AfterTheCheck,
    }

    #[test]
    fn an_enrollment_folded_while_its_reservation_is_counted_is_counted_once() {
        for lands in [FoldLands::BeforeTheCheck, FoldLands::AfterTheCheck] {
            // Arrange: a token with one enrollment recorded and not yet folded, its use reserved.
            let token = TokenRecord::enrollment(
                &EnrollmentTokenCreated {
                    token_id: TokenId::new(),
                    name: "batch".to_owned(),
                    max_uses: 2,
                    expires_at: Utc::now() + chrono::Duration::days(1),
                    token_sha256: "ab".repeat(32),
                    created_by: "admin".to_owned(),
                    created_by_token_id: None,
                },
                Utc::now(),
            );
            let (uses, enrolled, folded) = (Cell::new(0), Cell::new(false), Cell::new(false));
            let fold = || {
                if !folded.replace(true) {
                    uses.set(uses.get() + 1);
                    enrolled.set(true);
                }
            };
            let read_token = || {
                Ok(Some(TokenRecord {
                    uses: uses.get(),
                    ..token.clone()
                }))
            };
            // Act: the fold counts the enrollment during the first count of the reservations.
            let not_yet_counted = |_| {
                if matches!(lands, FoldLands::BeforeTheCheck) {
                    fold();
                }
                let count = u32::from(!enrolled.get());
                fold();
                Ok(count)
            };
            let (record, reserved) = token_and_reserved(read_token, not_yet_counted)
                .expect("read")
                .expect("the token");

            // Assert: the enrollment counts once, in the uses.
            assert_eq!((record.uses, reserved), (1, 0), "{lands:?}");
        }
    }
}
