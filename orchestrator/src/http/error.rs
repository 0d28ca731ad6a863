//! [`ApiError`]: every way a request can fail, and the OData error body each one becomes.

use std::fmt;

use axum::Json;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use fleetlaps_proto::api::ODataError;
use fleetlaps_proto::ids::{DeviceId, RotationId};
use fleetlaps_proto::seal::SealError;

use crate::auth::{AuthError, Scope};
use crate::bus::BusError;
use crate::projection::ProjectionError;

/// Why a request failed.
///
/// 4xx variants carry a message for the caller. 5xx variants answer with a generic message and
/// log their whole cause chain once, inside the request span, when they become a response.
/// No variant holds a password or a token.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `Authorization` header.
    #[error("the request has no access token: send `Authorization: Bearer <token>`")]
    MissingToken,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("the Authorization header is not of the form `Bearer <token>`")]
    MalformedToken,
    /// A bearer token that is unknown, expired or revoked.
    #[error("{0}")]
    TokenRejected(#[from] AuthError),
    /// An enrollment token that is unknown, expired, revoked or used up: says which.
    #[error("{0}")]
    EnrollmentRefused(String),
    /// The principal lacks a scope the request needs.
    #[error("insufficient privileges to complete the operation: it requires the {0} scope")]
    MissingScope(Scope),
    /// A malformed path parameter or query option value.
    #[error("{0}")]
    BadRequest(String),
    /// A query option, or a form of one, that this API does not implement.
    #[error("{0}")]
    UnsupportedQuery(String),
    /// No device with this id.
    #[error("device {0} was not found")]
    DeviceNotFound(DeviceId),
    /// No token of this kind with this id.
    #[error("{kind} {id} was not found")]
    TokenNotFound {
        /// "token" or "enrollment token".
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// No breach with this id.
    #[error("breach {0} was not found")]
    BreachNotFound(String),
    /// The campaign ended already.
    #[error("breach {id} has ended ({state}); allowed: cancelling a running campaign")]
    BreachEnded {
        /// The breach.
        id: String,
        /// How it ended.
        state: &'static str,
    },
    /// The principal asked for a token holding a scope it may not give.
    #[error("a token holding {0} can be created only by a principal that holds {0} itself, or Token.Grant")]
    CannotGrant(Scope),
    /// A usable token of the kind already has the name.
    #[error("a usable {kind} named {name:?} exists; allowed: a name no usable {kind} has (revoke the other first)")]
    NameTaken {
        /// "token" or "enrollment token".
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// Asked again too soon.
    #[error("{what}; retry after {retry_after_secs} seconds")]
    Throttled {
        /// What was refused and why.
        what: String,
        /// Seconds until it is allowed (the `Retry-After` header).
        retry_after_secs: u64,
    },
    /// The audit history could not record the request, so it was not carried out.
    #[error("the audit history is unavailable, so no password is disclosed and nothing is changed; try again later")]
    AuditUnavailable(#[source] BusError),
    /// The history could not be read (a device's events, for its timeline).
    #[error("the history is unavailable, so the device's events cannot be read; try again later")]
    HistoryUnavailable(#[source] BusError),
    /// A command could not be sent to the device.
    #[error("the command could not be sent to the device; try again later")]
    CommandUnavailable(#[source] BusError),
    /// The projections have not yet caught up with the history since start, so no token is
    /// trusted yet (a revoked one could still look valid).
    #[error("{0}")]
    CatchingUp(#[from] crate::health::CatchingUp),
    /// The history recorded the change but the projections did not show it in time.
    #[error("the change is recorded but not yet visible; read it again shortly")]
    NotYetVisible,
    /// No route has this path (the path, without the query).
    #[error("no resource at {0}")]
    NoRoute(String),
    /// The path exists but not with this method.
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(Method),
    /// The request was not answered within `http.request_timeout_secs` (its body arrived too
    /// slowly, or its handler waited too long).
    #[error("the request was not answered within {} seconds; try again later", .0.as_secs())]
    RequestTimeout(std::time::Duration),
    /// The projection store failed.
    #[error("reading the projections")]
    Projection(#[from] ProjectionError),
    /// A stored sealed password does not open with the escrow key.
    #[error("opening the sealed password of device {device_id} rotation {rotation_id}")]
    Unseal {
        /// The device whose credential it is.
        device_id: DeviceId,
        /// The rotation that made it.
        rotation_id: RotationId,
        /// Why it did not open.
        #[source]
        source: SealError,
    },
    /// A sealed password opened to bytes that are not UTF-8 text.
    #[error("the opened password of device {device_id} rotation {rotation_id} is not UTF-8")]
    PasswordNotUtf8 {
        /// The device whose credential it is.
        device_id: DeviceId,
        /// The rotation that made it.
        rotation_id: RotationId,
    },
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken | Self::MalformedToken | Self::TokenRejected(_) | Self::EnrollmentRefused(_) => {
                StatusCode::UNAUTHORIZED
            }
            Self::MissingScope(_) | Self::CannotGrant(_) => StatusCode::FORBIDDEN,
            Self::NameTaken { .. } | Self::BreachEnded { .. } => StatusCode::CONFLICT,
            Self::BadRequest(_) | Self::UnsupportedQuery(_) => StatusCode::BAD_REQUEST,
            Self::DeviceNotFound(_) | Self::TokenNotFound { .. } | Self::BreachNotFound(_) | Self::NoRoute(_) => {
                StatusCode::NOT_FOUND
            }
            Self::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            // Not a 500: the caller's request was fine, and the message says so.
            Self::AuditUnavailable(_)
            | Self::CommandUnavailable(_)
            | Self::HistoryUnavailable(_)
            | Self::NotYetVisible
            | Self::CatchingUp(_)
            | Self::RequestTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Projection(_) | Self::Unseal { .. } | Self::PasswordNotUtf8 { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The OData error code, as Microsoft Graph names it.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken | Self::MalformedToken | Self::TokenRejected(_) | Self::EnrollmentRefused(_) => {
                "InvalidAuthenticationToken"
            }
            Self::MissingScope(_) | Self::CannotGrant(_) => "Authorization_RequestDenied",
            Self::NameTaken { .. } => "Request_MultipleObjectsWithSameKeyValue",
            Self::BreachEnded { .. } => "Request_ResourceConflict",
            Self::BadRequest(_) | Self::MethodNotAllowed(_) => "Request_BadRequest",
            Self::UnsupportedQuery(_) => "Request_UnsupportedQuery",
            Self::DeviceNotFound(_) | Self::TokenNotFound { .. } | Self::BreachNotFound(_) | Self::NoRoute(_) => {
                "Request_ResourceNotFound"
            }
            Self::Throttled { .. } => "TooManyRequests",
            Self::RequestTimeout(_) => "RequestTimeout",
            Self::AuditUnavailable(_)
            | Self::CommandUnavailable(_)
            | Self::HistoryUnavailable(_)
            | Self::NotYetVisible
            | Self::CatchingUp(_) => "ServiceUnavailable",
            Self::Projection(_) | Self::Unseal { .. } | Self::PasswordNotUtf8 { .. } => "InternalServerError",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = if let Self::RequestTimeout(_) = self {
            tracing::warn!(error = %self, "request timed out");
            self.to_string()
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            // The message is meant for the caller; the cause is for the operator.
            tracing::warn!(error = %ErrorChain(&self), "request refused: a dependency is unavailable");
            self.to_string()
        } else if status.is_server_error() {
            // The caller learns nothing about the inside; the operator gets the whole chain, once.
            tracing::error!(error = %ErrorChain(&self), "request failed");
            "an internal error occurred; the server log has the details".to_owned()
        } else {
            self.to_string()
        };
        let body = Json(ODataError::new(self.code(), message));
        if status == StatusCode::UNAUTHORIZED {
            (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else if let Self::Throttled { retry_after_secs, .. } = self {
            (status, [(header::RETRY_AFTER, retry_after_secs.to_string())], body).into_response()
        } else if let Self::CatchingUp(_) = self {
            (
                status,
                [(header::RETRY_AFTER, CATCHING_UP_RETRY_AFTER_SECS.to_string())],
                body,
            )
                .into_response()
        } else {
            (status, body).into_response()
        }
    }
}

/// The `Retry-After` of a request refused while the projections catch up: short, since a
/// rebuild folds thousands of events a second.
pub(super) const CATCHING_UP_RETRY_AFTER_SECS: u64 = 2;

/// The fallback for paths no route matches.
pub(super) async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

/// The fallback for a known path called with a method it does not serve.
pub(super) async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method)
}

/// Displays an error and its sources, `outer: inner: innermost`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
