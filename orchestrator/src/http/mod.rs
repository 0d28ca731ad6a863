//! The Graph-compatible HTTP API and the metrics endpoint: the only module that knows axum.
//!
//! Layout:
//! - `device_local_credentials`: Graph's `/v1.0/directory/deviceLocalCredentials`, list and item.
//! - `devices`: Graph's `/v1.0/devices`, and Intune's rotate action on one device.
//! - `tokens`: creating, listing and revoking API tokens.
//! - `enrollment`: enrollment tokens, and the endpoint devices enroll through.
//! - `quarantine`: the refused stream messages, for admins.
//! - `audit`: the audit history, for investigators.
//! - `investigations`: a device's timeline and its password's exposure at an instant, for
//!   investigators.
//! - `breaches`: breach signals and their campaigns' progress.
//! - `escrow`: the escrow public key, for agents and tools.
//! - `health`: the liveness probe.
//! - `metrics`: the request metrics middleware and the `/metrics` endpoint.
//! - `auth`: the bearer-token extractor.
//! - `odata`: OData query options (`$filter`, `$select`, `$top`, `$skiptoken`).
//! - `error`: [`ApiError`], the one error type that becomes a response.
//! - `serve`: [`serve()`], which serves the API's connections over TLS or plain HTTP within the
//!   timeouts and connection caps of [`crate::config::HttpLimits`].

mod audit;
mod auth;
mod breaches;
mod device_local_credentials;
mod devices;
mod enrollment;
mod error;
mod escrow;
mod health;
mod investigations;
mod metrics;
mod odata;
mod quarantine;
mod serve;
mod tokens;

use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, post, put};
use fleetlaps_proto::seal::EscrowPublicKey;

use crate::auth::TokenStore;
use crate::bus::Journal;
use crate::metrics::Metrics;
use crate::projection::Projections;
use fleetlaps_proto::audit::AuditEvent;

pub use error::ApiError;

/// How long a recorded change may take to reach the projections before an answer says so.
const VISIBLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub use serve::{PeerAddr, ServeOptions, serve};

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The read side: devices and their sealed credentials.
    pub projections: Projections,
    /// Opens sealed passwords for authorised reads (with whichever key opens each); never leaves
    /// this process. Its current key is the one devices seal to.
    pub escrow: Arc<crate::escrow::EscrowKeyring>,
    /// The offline recovery key devices also seal to (`escrow_recovery_public_key`), if any.
    pub escrow_recovery_public_key: Option<EscrowPublicKey>,
    /// The bearer tokens allowed to call the API.
    pub tokens: Arc<TokenStore>,
    /// Request counts, latencies and disclosures are recorded here.
    pub metrics: Metrics,
    /// Where the orchestrator's own events are recorded (before a password is disclosed) and
    /// commands are sent.
    pub journal: Arc<dyn Journal>,
    /// Reads a device's own events from the history, for its timeline.
    pub device_events: Arc<dyn crate::bus::DeviceEvents>,
    /// The least time between two rotation requests for one device.
    pub rotate_min_interval: std::time::Duration,
    /// When each device's rotation was last requested through this process: the projections
    /// know it too, but only once the consumer has folded the request in.
    pub rotate_requests:
        Arc<std::sync::Mutex<std::collections::HashMap<fleetlaps_proto::ids::DeviceId, chrono::DateTime<chrono::Utc>>>>,
    /// The LAPS policy sent to devices at enrollment (`[policy]`), if any.
    pub policy: Option<fleetlaps_proto::policy::Policy>,
    /// Enrollments recorded by this process but not yet folded in, per enrollment token: counted
    /// with the projections' uses, so concurrent enrollments never exceed a token's `maxUses`.
    pub enrollments_in_flight: Arc<std::sync::Mutex<enrollment::EnrollmentsInFlight>>,
    /// The NATS connection, as `/healthz` reports it (server version, durability, TLS).
    pub nats: crate::bus::NatsStatus,
    /// Whether the projections may be trusted yet, and whether the consumer works.
    pub health: Arc<crate::health::Health>,
    /// Held while a token is made, from the check of its name until the projections show it, so
    /// two tokens of a kind never take one name.
    pub token_issuance: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the campaign runner after a breach is declared.
    pub campaign_wake: Arc<tokio::sync::Notify>,
    /// How long a request may take before it is answered 503 (`http.request_timeout_secs`).
    pub request_timeout: std::time::Duration,
    /// Each device's last heartbeat (`lastHeartbeatDateTime`).
    pub liveness: crate::liveness::Liveness,
}

impl AppState {
    /// Appends one of the orchestrator's events to the history and waits for JetStream's ack;
    /// returns its stream sequence. If the history cannot take it, the request fails with 503.
    async fn record(&self, event: AuditEvent) -> Result<u64, ApiError> {
        self.journal.append(event).await.map_err(ApiError::AuditUnavailable)
    }

    /// [`Self::record`], then waits until the projections show the event; returns whether they
    /// did within [`VISIBLE_TIMEOUT`].
    async fn record_visible(&self, event: AuditEvent) -> Result<bool, ApiError> {
        let sequence = self.record(event).await?;
        Ok(self.projections.wait_for_sequence(sequence, VISIBLE_TIMEOUT).await)
    }
}

/// The API: health, the escrow public key and Graph's `deviceLocalCredentials`.
///
/// Every request, matched or not, is counted by route pattern and status code; one that takes
/// longer than `state.request_timeout` is answered 503.
pub fn router(state: AppState) -> Router {
    let metrics = state.metrics.clone();
    let request_timeout = state.request_timeout;
    Router::new()
        .route(health::PATH, get(health::get))
        .route(escrow::PATH, get(escrow::get_public_key))
        .route(device_local_credentials::LIST_PATH, get(device_local_credentials::list))
        .route(device_local_credentials::ITEM_PATH, get(device_local_credentials::get))
        .route(devices::LIST_PATH, get(devices::list))
        .route(devices::DEVICE_PATH, get(devices::get_one))
        .route(devices::ROTATE_PATH, post(devices::rotate))
        .route(devices::TAGS_PATH, put(devices::set_tags))
        .route(tokens::LIST_PATH, get(tokens::list).post(tokens::create))
        .route(tokens::ITEM_PATH, delete(tokens::revoke))
        .route(audit::LIST_PATH, get(audit::list))
        .route(investigations::TIMELINE_PATH, get(investigations::timeline))
        .route(investigations::EXPOSURE_PATH, get(investigations::exposure))
        .route(enrollment::LIST_PATH, get(enrollment::list).post(enrollment::create))
        .route(enrollment::ITEM_PATH, delete(enrollment::revoke))
        .route(enrollment::ENROLL_PATH, post(enrollment::enroll))
        .route(quarantine::LIST_PATH, get(quarantine::list))
        .route(breaches::LIST_PATH, get(breaches::list).post(breaches::declare))
        .route(breaches::ITEM_PATH, get(breaches::get))
        .route(breaches::CANCEL_PATH, post(breaches::cancel))
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            request_timeout,
            serve::limit_request_time,
        ))
        .layer(axum::middleware::from_fn_with_state(metrics, metrics::track_requests))
}

/// The Prometheus endpoint, served on its own listener: `GET /metrics`.
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route(metrics::PATH, get(metrics::render))
        .with_state(metrics)
}

#[cfg(test)]
pub(crate) mod tests;
