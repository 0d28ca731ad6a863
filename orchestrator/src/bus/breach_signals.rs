//! Breach signals over NATS: requests on `laps.breaches.declare` (see
//! [`fleetlaps_proto::subject::BREACH_SIGNALS`]), each answered on its reply subject. Only the
//! NATS side lives here: what a signal means is the `answer` function's.

use std::future::Future;

use async_nats::HeaderMap;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::BusError;

/// Answers every request on `subject` with `answer(headers, payload)`, one at a time, until
/// `shutdown` is cancelled. A request without a reply subject is dropped (there is nobody to
/// tell), and so is one whose answer cannot be sent (the sender asks again).
pub async fn serve_requests<F, Fut>(
    client: async_nats::Client,
    subject: &'static str,
    answer: F,
    shutdown: CancellationToken,
) -> Result<(), BusError>
where
    F: Fn(Option<HeaderMap>, bytes::Bytes) -> Fut,
    Fut: Future<Output = Vec<u8>>,
{
    let mut requests = client.subscribe(subject).await.map_err(|err| BusError::Stream {
        source: format!("subscribing to {subject}: {err}").into(),
    })?;
    loop {
        let request = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            request = requests.next() => request,
        };
        let Some(request) = request else {
            tracing::warn!(subject, "the subscription ended");
            return Ok(());
        };
        let Some(reply) = request.reply.clone() else {
            tracing::debug!(subject, "a request without a reply subject was dropped");
            continue;
        };
        let body = answer(request.headers, request.payload).await;
        if let Err(err) = client.publish(reply, body.into()).await {
            tracing::warn!(subject, error = %err, "answering a request failed");
        }
    }
}
