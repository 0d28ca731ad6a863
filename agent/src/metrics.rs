//! The agent's own Prometheus metrics, served on an optional listener (`[metrics] listen`): every
//! name is a constant here, prefixed `fleetlaps_agent_`, with its unit in the name.
//!
//! Labels come only from bounded sets: a rotation's trigger ([`RotationReason`]) and outcome
//! (`succeeded`, `failed`), a backup's outcome (`stored`, `unconfirmed` or the refusal's reason,
//! [`BackupRefusal`]). Never a device id, an account or error text.
//!
//! The listener is a tiny hand-written HTTP/1 responder, so the agent stays light: it answers
//! `GET /metrics` with the text format and closes the connection, answers anything else 404 or
//! 405, and serves a few connections at a time. The fleet simulator's devices share one registry,
//! which it does not serve.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::command::BackupRefusal;
use fleetlaps_proto::event::RotationReason;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Counter: rotations that ended, by `trigger` (the rotation's reason) and `outcome`
/// (`succeeded`: applied and committed; `failed`: reported as failed, the account unchanged or
/// not updated). A rotation waiting for its confirmation has not ended.
pub const ROTATIONS_TOTAL: &str = "fleetlaps_agent_rotations_total";
/// Counter: the orchestrator's answers to this device's backups as a rotation waited for them, by
/// `outcome`: `stored`, a refusal's reason, or `unconfirmed` (no answer within the wait).
pub const BACKUPS_TOTAL: &str = "fleetlaps_agent_backups_total";
/// Gauge: events waiting in the outbox for NATS to take them.
pub const OUTBOX_EVENTS: &str = "fleetlaps_agent_outbox_events";
/// Gauge: when the account last got a new, backed-up password (Unix seconds, the agent's clock).
pub const LAST_ROTATION_TIMESTAMP_SECONDS: &str = "fleetlaps_agent_last_rotation_timestamp_seconds";
/// Gauge: when the agent last put a heartbeat the server acknowledged (Unix seconds).
pub const LAST_HEARTBEAT_TIMESTAMP_SECONDS: &str = "fleetlaps_agent_last_heartbeat_timestamp_seconds";
/// Gauge: when the current password is due to be rotated (Unix seconds).
pub const PASSWORD_EXPIRY_TIMESTAMP_SECONDS: &str = "fleetlaps_agent_password_expiry_timestamp_seconds";
/// Counter: failed authentications as the managed account reported to the orchestrator (the sum
/// of the reports' counts).
pub const FAILED_LOGINS_REPORTED_TOTAL: &str = "fleetlaps_agent_failed_logins_reported_total";

/// The path the listener serves.
pub const PATH: &str = "/metrics";

/// A rotation's end: the `outcome` label of [`ROTATIONS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationOutcome {
    /// Applied and committed.
    Succeeded,
    /// Reported as failed.
    Failed,
}

impl RotationOutcome {
    /// Every outcome, so each label value exists from the start.
    pub const ALL: [Self; 2] = [Self::Succeeded, Self::Failed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// The orchestrator's answer to a backup as far as a rotation's wait got: the `outcome` label of
/// [`BACKUPS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupOutcome {
    /// Stored and trial-opened.
    Stored,
    /// Refused, for this reason.
    Refused(BackupRefusal),
    /// No answer within `backup_confirmation_wait_secs`.
    Unconfirmed,
}

impl BackupOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Refused(reason) => reason.as_str(),
            Self::Unconfirmed => "unconfirmed",
        }
    }
}

/// The agent's metrics: cheap to clone, one registry behind every clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    rotations: IntCounterVec,
    backups: IntCounterVec,
    outbox: IntGauge,
    last_rotation: IntGauge,
    last_heartbeat: IntGauge,
    password_expiry: IntGauge,
    failed_logins_reported: IntCounter,
}

impl Metrics {
    /// A registry with every metric, each label value at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        let rotations = IntCounterVec::new(
            Opts::new(ROTATIONS_TOTAL, "Rotations that ended, by trigger and outcome."),
            &["trigger", "outcome"],
        )
        .expect("metric definition is valid");
        let backups = IntCounterVec::new(
            Opts::new(
                BACKUPS_TOTAL,
                "The orchestrator's answers to this device's backups, by outcome.",
            ),
            &["outcome"],
        )
        .expect("metric definition is valid");
        let outbox = IntGauge::new(OUTBOX_EVENTS, "Events waiting in the outbox.").expect("metric definition is valid");
        let last_rotation = IntGauge::new(
            LAST_ROTATION_TIMESTAMP_SECONDS,
            "When the account last got a new, backed-up password (Unix seconds).",
        )
        .expect("metric definition is valid");
        let last_heartbeat = IntGauge::new(
            LAST_HEARTBEAT_TIMESTAMP_SECONDS,
            "When the last heartbeat was acknowledged (Unix seconds).",
        )
        .expect("metric definition is valid");
        let password_expiry = IntGauge::new(
            PASSWORD_EXPIRY_TIMESTAMP_SECONDS,
            "When the current password is due to be rotated (Unix seconds).",
        )
        .expect("metric definition is valid");
        let failed_logins_reported = IntCounter::new(
            FAILED_LOGINS_REPORTED_TOTAL,
            "Failed authentications as the managed account reported to the orchestrator.",
        )
        .expect("metric definition is valid");
        for trigger in RotationReason::ALL {
            for outcome in RotationOutcome::ALL {
                rotations.with_label_values(&[trigger.as_str(), outcome.as_str()]);
            }
        }
        let backup_outcomes = [BackupOutcome::Stored, BackupOutcome::Unconfirmed]
            .into_iter()
            .chain(BackupRefusal::ALL.map(BackupOutcome::Refused));
        for outcome in backup_outcomes {
            backups.with_label_values(&[outcome.as_str()]);
        }
        for collector in [
            Box::new(rotations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(backups.clone()),
            Box::new(outbox.clone()),
            Box::new(last_rotation.clone()),
            Box::new(last_heartbeat.clone()),
            Box::new(password_expiry.clone()),
            Box::new(failed_logins_reported.clone()),
        ] {
            registry.register(collector).expect("each metric is registered once");
        }
        Self {
            registry,
            rotations,
            backups,
            outbox,
            last_rotation,
            last_heartbeat,
            password_expiry,
            failed_logins_reported,
        }
    }

    /// Counts a rotation that ended.
    pub fn rotation_ended(&self, trigger: RotationReason, outcome: RotationOutcome) {
        self.rotations
            .with_label_values(&[trigger.as_str(), outcome.as_str()])
            .inc();
    }

    /// Counts the orchestrator's answer to a backup.
    pub fn backup_answered(&self, outcome: BackupOutcome) {
        self.backups.with_label_values(&[outcome.as_str()]).inc();
    }

    /// Sets the outbox's length.
    pub fn set_outbox_len(&self, events: usize) {
        self.outbox.set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// Sets the current password's rotation and expiry times.
    pub fn set_current_password(&self, applied_at: DateTime<Utc>, expires_at: DateTime<Utc>) {
        self.last_rotation.set(applied_at.timestamp());
        self.password_expiry.set(expires_at.timestamp());
    }

    /// Sets when the last heartbeat was acknowledged.
    pub fn heartbeat_sent(&self, at: DateTime<Utc>) {
        self.last_heartbeat.set(at.timestamp());
    }

    /// Counts failed authentications reported in one event.
    pub fn failed_logins_reported(&self, count: u64) {
        self.failed_logins_reported.inc_by(count);
    }

    /// Every metric in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text encoder writes UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The most connections served at once; others wait to be accepted.
const MAX_CONNECTIONS: usize = 4;
/// How long a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Binds the metrics listener at `listen` (port 0 picks a free port).
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|err| anyhow::anyhow!("binding metrics.listen {listen}: {err}"))
}

/// Serves `metrics` on `listener` until `shutdown` completes: `GET /metrics` gets the text
/// format, anything else 404 or 405; each connection is closed after one answer.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => return,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(err) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics)).await {
                        tracing::debug!(error = %err, "a metrics request timed out");
                    }
                    drop(slot);
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head from `stream` and answers it.
async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0_u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
        if head.len() > MAX_REQUEST_BYTES {
            return;
        }
    }
    let request_line = head.split(|byte| *byte == b'\r').next().unwrap_or_default();
    let mut parts = request_line.split(|byte| *byte == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split(|byte| *byte == b'?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", path) if path == PATH.as_bytes() => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        (b"GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: the metrics are at /metrics\n".to_owned(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "only GET /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(err) = stream.write_all(response.as_bytes()).await {
        tracing::debug!(error = %err, "answering a metrics request failed");
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_value_exists_from_the_start_and_names_carry_the_prefix() {
        let metrics = Metrics::new();
        let text = metrics.render();
        assert!(
            text.contains(r#"fleetlaps_agent_rotations_total{outcome="succeeded",trigger="post_authentication"} 0"#)
        );
        assert!(text.contains(r#"fleetlaps_agent_backups_total{outcome="unopenable"} 0"#));
        assert!(text.contains(r#"fleetlaps_agent_backups_total{outcome="unconfirmed"} 0"#));
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            assert!(line.starts_with("fleetlaps_agent_"), "{line}");
        }
        metrics.rotation_ended(RotationReason::Expired, RotationOutcome::Failed);
        metrics.backup_answered(BackupOutcome::Refused(BackupRefusal::Malformed));
        let text = metrics.render();
        assert!(text.contains(r#"fleetlaps_agent_rotations_total{outcome="failed",trigger="expired"} 1"#));
        assert!(text.contains(r#"fleetlaps_agent_backups_total{outcome="malformed"} 1"#));
    }

    #[tokio::test]
    async fn the_listener_answers_get_metrics_and_refuses_the_rest() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("binds");
        let address = listener.local_addr().expect("bound");
        let metrics = Metrics::new();
        metrics.failed_logins_reported(3);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics, async move {
            let _ = stopped.await;
        }));
        let ask = |request: &'static str| async move {
            let mut stream = TcpStream::connect(address).await.expect("connects");
            stream.write_all(request.as_bytes()).await.expect("sent");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            answer
        };
        let answer = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("fleetlaps_agent_failed_logins_reported_total 3"),
            "{answer}"
        );
        assert!(ask("GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(ask("POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        let _ = stop.send(());
        server.await.expect("stops");
    }
}
