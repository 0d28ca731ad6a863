//! Prometheus metrics: every name is a constant here, and dashboards query only these names.
//!
//! Labels come only from bounded sets (event kind, quarantine reason, matched route, status
//! class, outcome), never a device id, a principal or error text.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::projection::{Projections, QuarantineReason};

/// Events folded into the projections, by kind.
pub const EVENTS_APPLIED_TOTAL: &str = "fleetlaps_events_applied_total";
/// Re-sent events recognised by id and skipped.
pub const EVENTS_DUPLICATE_TOTAL: &str = "fleetlaps_events_duplicate_total";
/// Messages refused into the quarantine, by reason.
pub const EVENTS_QUARANTINED_TOTAL: &str = "fleetlaps_events_quarantined_total";
/// Quarantine records dropped to keep the quarantine's bound, by the dropped record's reason. Read
/// from the projections at each scrape, so it survives restarts and a rebuild gives the same.
pub const QUARANTINE_DROPPED_TOTAL: &str = "fleetlaps_quarantine_dropped_total";
/// Quarantine records kept (at most `quarantine.max_entries`).
pub const QUARANTINE_ENTRIES: &str = "fleetlaps_quarantine_entries";
/// The stream sequence of the last message folded in.
pub const PROJECTION_LAST_SEQUENCE: &str = "fleetlaps_projection_last_sequence";
/// Devices known to the projections.
pub const DEVICES: &str = "fleetlaps_devices";
/// Time to fold, flush and acknowledge one batch.
pub const CONSUMER_BATCH_DURATION_SECONDS: &str = "fleetlaps_consumer_batch_duration_seconds";
/// API requests, by matched route and status code.
pub const HTTP_REQUESTS_TOTAL: &str = "fleetlaps_http_requests_total";
/// API request latency, by matched route.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "fleetlaps_http_request_duration_seconds";
/// Passwords disclosed through the API (one per credential returned).
pub const PASSWORDS_DISCLOSED_TOTAL: &str = "fleetlaps_passwords_disclosed_total";

/// Image rollbacks reported by devices (a device restored from an older copy, which then rotated).
pub const IMAGE_ROLLBACKS_TOTAL: &str = "fleetlaps_image_rollbacks_total";
/// Counter: clones recorded on the history (two running copies of one device).
pub const DEVICE_CLONES_DETECTED_TOTAL: &str = "fleetlaps_device_clones_detected_total";
/// Device events older than their device's newest one, applied anyway (a clone or an unnoticed
/// rollback).
pub const EVENTS_OUT_OF_ORDER_TOTAL: &str = "fleetlaps_events_out_of_order_total";
/// Backups answered to their devices, by outcome: `stored` or the refusal's reason.
pub const BACKUPS_CONFIRMED_TOTAL: &str = "fleetlaps_backups_confirmed_total";

/// Counter: detections recorded by this process, by detector (`lateral_movement`,
/// `repeated_failures`, `read_then_spread`).
pub const DETECTIONS_TOTAL: &str = "fleetlaps_detections_total";

/// Gauge: 1 while the consumer folds batches, 0 while a batch fails and is retried (a full disk,
/// a sled error).
pub const CONSUMER_HEALTHY: &str = "fleetlaps_consumer_healthy";
/// Gauge: 1 once the projections reached the stream's last sequence at start (tokens are trusted
/// from then on), 0 before.
pub const PROJECTIONS_CAUGHT_UP: &str = "fleetlaps_projections_caught_up";

/// API connections closed by the server before or between requests, by reason
/// ([`ConnectionDropReason`]).
pub const HTTP_CONNECTIONS_DROPPED_TOTAL: &str = "fleetlaps_http_connections_dropped_total";

/// Why the API closed a connection: the `reason` label of [`HTTP_CONNECTIONS_DROPPED_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionDropReason {
    /// Refused at once: its address already had `http.max_connections_per_address` open.
    PerAddressLimit,
    /// The TLS handshake took longer than `http.header_read_timeout_secs`.
    TlsHandshakeTimeout,
    /// A request head took longer than `http.header_read_timeout_secs`.
    HeaderReadTimeout,
    /// Nothing was sent or read for `http.idle_timeout_secs` between requests.
    IdleTimeout,
}

impl ConnectionDropReason {
    /// Every reason, so each label value exists from the start.
    pub const ALL: [Self; 4] = [
        Self::PerAddressLimit,
        Self::TlsHandshakeTimeout,
        Self::HeaderReadTimeout,
        Self::IdleTimeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerAddressLimit => "per_address_limit",
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::HeaderReadTimeout => "header_read_timeout",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

/// The orchestrator's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// See [`EVENTS_APPLIED_TOTAL`].
    pub events_applied: IntCounterVec,
    /// See [`EVENTS_DUPLICATE_TOTAL`].
    pub events_duplicate: IntCounter,
    /// See [`EVENTS_QUARANTINED_TOTAL`].
    pub events_quarantined: IntCounterVec,
    /// See [`PROJECTION_LAST_SEQUENCE`].
    pub projection_last_sequence: IntGauge,
    /// See [`DEVICES`].
    pub devices: IntGauge,
    /// See [`CONSUMER_BATCH_DURATION_SECONDS`].
    pub consumer_batch_duration: Histogram,
    /// See [`HTTP_REQUESTS_TOTAL`].
    pub http_requests: IntCounterVec,
    /// See [`HTTP_REQUEST_DURATION_SECONDS`].
    pub http_request_duration: HistogramVec,
    /// See [`PASSWORDS_DISCLOSED_TOTAL`].
    pub passwords_disclosed: IntCounter,
    /// See [`IMAGE_ROLLBACKS_TOTAL`].
    pub image_rollbacks: IntCounter,
    /// See [`DEVICE_CLONES_DETECTED_TOTAL`].
    pub device_clones_detected: IntCounter,
    /// See [`EVENTS_OUT_OF_ORDER_TOTAL`].
    pub events_out_of_order: IntCounter,
    /// See [`BACKUPS_CONFIRMED_TOTAL`].
    pub backups_confirmed: IntCounterVec,
    /// See [`DETECTIONS_TOTAL`].
    pub detections: IntCounterVec,
    /// See [`CONSUMER_HEALTHY`].
    pub consumer_healthy: IntGauge,
    /// See [`PROJECTIONS_CAUGHT_UP`].
    pub projections_caught_up: IntGauge,
    /// See [`HTTP_CONNECTIONS_DROPPED_TOTAL`].
    pub http_connections_dropped: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let events_applied = IntCounterVec::new(
            Opts::new(EVENTS_APPLIED_TOTAL, "Events folded into the projections."),
            &["kind"],
        )
        .expect("metric definition is valid");
        let events_duplicate = IntCounter::new(EVENTS_DUPLICATE_TOTAL, "Re-sent events recognised by id and skipped.")
            .expect("metric definition is valid");
        let events_quarantined = IntCounterVec::new(
            Opts::new(EVENTS_QUARANTINED_TOTAL, "Messages refused into the quarantine."),
            &["reason"],
        )
        .expect("metric definition is valid");
        let projection_last_sequence = IntGauge::new(
            PROJECTION_LAST_SEQUENCE,
            "Stream sequence of the last message folded in.",
        )
        .expect("metric definition is valid");
        let devices = IntGauge::new(DEVICES, "Devices known to the projections.").expect("metric definition is valid");
        let consumer_batch_duration = Histogram::with_opts(HistogramOpts::new(
            CONSUMER_BATCH_DURATION_SECONDS,
            "Time to fold, flush and acknowledge one batch.",
        ))
        .expect("metric definition is valid");
        let http_requests = IntCounterVec::new(Opts::new(HTTP_REQUESTS_TOTAL, "API requests."), &["route", "status"])
            .expect("metric definition is valid");
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(HTTP_REQUEST_DURATION_SECONDS, "API request latency."),
            &["route"],
        )
        .expect("metric definition is valid");
        let passwords_disclosed = IntCounter::new(PASSWORDS_DISCLOSED_TOTAL, "Passwords disclosed through the API.")
            .expect("metric definition is valid");

        let image_rollbacks = IntCounter::new(IMAGE_ROLLBACKS_TOTAL, "Image rollbacks reported by devices.")
            .expect("metric definition is valid");
        let device_clones_detected = IntCounter::new(
            DEVICE_CLONES_DETECTED_TOTAL,
            "Clones (two running copies of one device) recorded on the history.",
        )
        .expect("metric definition is valid");
        let events_out_of_order = IntCounter::new(
            EVENTS_OUT_OF_ORDER_TOTAL,
            "Device events older than their device's newest one, applied anyway.",
        )
        .expect("metric definition is valid");
        let backups_confirmed = IntCounterVec::new(
            Opts::new(
                BACKUPS_CONFIRMED_TOTAL,
                "Backups answered to their devices, by outcome.",
            ),
            &["outcome"],
        )
        .expect("metric definition is valid");
        let detections = IntCounterVec::new(
            Opts::new(DETECTIONS_TOTAL, "Detections recorded by this process, by detector."),
            &["detector"],
        )
        .expect("metric definition is valid");

        let consumer_healthy = IntGauge::new(
            CONSUMER_HEALTHY,
            "1 while the consumer folds batches, 0 while one fails.",
        )
        .expect("metric definition is valid");
        let projections_caught_up = IntGauge::new(
            PROJECTIONS_CAUGHT_UP,
            "1 once the projections reached the stream's last sequence at start.",
        )
        .expect("metric definition is valid");

        let http_connections_dropped = IntCounterVec::new(
            Opts::new(
                HTTP_CONNECTIONS_DROPPED_TOTAL,
                "API connections closed by the server before or between requests, by reason.",
            ),
            &["reason"],
        )
        .expect("metric definition is valid");
        let collectors: [Box<dyn prometheus::core::Collector>; 17] = [
            Box::new(events_applied.clone()),
            Box::new(events_duplicate.clone()),
            Box::new(events_quarantined.clone()),
            Box::new(projection_last_sequence.clone()),
            Box::new(devices.clone()),
            Box::new(consumer_batch_duration.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_request_duration.clone()),
            Box::new(passwords_disclosed.clone()),
            Box::new(image_rollbacks.clone()),
            Box::new(device_clones_detected.clone()),
            Box::new(events_out_of_order.clone()),
            Box::new(backups_confirmed.clone()),
            Box::new(detections.clone()),
            Box::new(consumer_healthy.clone()),
            Box::new(projections_caught_up.clone()),
            Box::new(http_connections_dropped.clone()),
        ];
        for collector in collectors {
            registry.register(collector).expect("each metric is registered once");
        }
        // Show every bounded label value from the start, so rates exist before the first event.
        for kind in fleetlaps_proto::event::EventKind::ALL {
            events_applied.with_label_values(&[kind.as_str()]);
        }
        for kind in fleetlaps_proto::audit::AuditKind::ALL {
            events_applied.with_label_values(&[kind.as_str()]);
        }
        for reason in QuarantineReason::ALL {
            events_quarantined.with_label_values(&[reason.as_str()]);
        }
        for reason in ConnectionDropReason::ALL {
            http_connections_dropped.with_label_values(&[reason.as_str()]);
        }
        backups_confirmed.with_label_values(&["stored"]);
        for reason in fleetlaps_proto::command::BackupRefusal::ALL {
            backups_confirmed.with_label_values(&[reason.as_str()]);
        }
        for detector in fleetlaps_proto::breach::Detector::ALL {
            detections.with_label_values(&[detector.as_str()]);
        }
        Self {
            registry,
            events_applied,
            events_duplicate,
            events_quarantined,
            projection_last_sequence,
            devices,
            consumer_batch_duration,
            http_requests,
            http_request_duration,
            passwords_disclosed,
            image_rollbacks,
            device_clones_detected,
            events_out_of_order,
            backups_confirmed,
            detections,
            consumer_healthy,
            projections_caught_up,
            http_connections_dropped,
        }
    }

    /// Reports the quarantine's size and dropped counts from `projections` at every scrape.
    pub fn observe_quarantine(&self, projections: Projections) {
        self.registry
            .register(Box::new(QuarantineCollector::new(projections)))
            .expect("the quarantine collector is registered once");
    }

    /// The Prometheus text exposition of every metric.
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

/// Reads the quarantine's persistent counts at scrape time: the fold that keeps them knows no
/// metrics, and a counter kept in memory would restart from zero.
struct QuarantineCollector {
    projections: Projections,
    /// The metric definitions, for [`prometheus::core::Collector::desc`]; fresh copies are filled
    /// at each scrape.
    dropped: IntCounterVec,
    entries: IntGauge,
}

impl QuarantineCollector {
    fn new(projections: Projections) -> Self {
        Self {
            projections,
            dropped: Self::dropped_vec(),
            entries: Self::entries_gauge(),
        }
    }

    fn dropped_vec() -> IntCounterVec {
        IntCounterVec::new(
            Opts::new(
                QUARANTINE_DROPPED_TOTAL,
                "Quarantine records dropped to keep the quarantine's bound, by reason.",
            ),
            &["reason"],
        )
        .expect("metric definition is valid")
    }

    fn entries_gauge() -> IntGauge {
        IntGauge::new(QUARANTINE_ENTRIES, "Quarantine records kept.").expect("metric definition is valid")
    }
}

impl prometheus::core::Collector for QuarantineCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.dropped.desc();
        descs.extend(self.entries.desc());
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let dropped = Self::dropped_vec();
        let entries = Self::entries_gauge();
        match (self.projections.quarantine_dropped(), self.projections.quarantine_len()) {
            (Ok(counts), Ok(len)) => {
                for (reason, count) in counts {
                    dropped.with_label_values(&[reason.as_str()]).inc_by(count);
                }
                entries.set(i64::try_from(len).unwrap_or(i64::MAX));
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %err, "reading the quarantine for metrics failed");
                return Vec::new();
            }
        }
        let mut families = dropped.collect();
        families.extend(entries.collect());
        families
    }
}
