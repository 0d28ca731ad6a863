//! Request metrics and the Prometheus endpoint.
//!
//! Every API request is counted by its route *pattern* (`/v1.0/directory/deviceLocalCredentials/{deviceId}`),
//! never its path, so no device id becomes a label value; requests no route matches share the
//! route label `unmatched`. The middleware also opens the request span that handlers and
//! [`super::ApiError`] log into.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument as _;

use crate::metrics::Metrics;

/// Where the metrics are served, on the metrics listener.
pub(super) const PATH: &str = "/metrics";

/// The route label of requests no route matched.
const UNMATCHED: &str = "unmatched";

/// Prometheus' text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Runs the request inside a span and records its count, status and latency.
pub(super) async fn track_requests(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_owned(), |matched| matched.as_str().to_owned());
    let span = tracing::info_span!("http_request", method = %request.method(), %route, status = tracing::field::Empty);
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("status", status.as_u16());
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), status.as_str()])
        .inc();
    metrics
        .http_request_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Renders every metric in the text exposition format, on the blocking pool: the fleet metrics
/// read every device record, which takes a while in a large fleet, and the API's requests must
/// not wait behind it.
pub(super) async fn render(State(metrics): State<Metrics>) -> Response {
    let text = crate::on_blocking_pool(move || metrics.render()).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}
