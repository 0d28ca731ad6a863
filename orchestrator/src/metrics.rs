//! Prometheus metrics: every name is a constant here, and dashboards query only these names.
//!
//! Labels come only from bounded sets (event kind, quarantine reason, matched route, status
//! class, outcome), never a device id, a principal or error text.

use fleetlaps_proto::audit::AuditKind;
use fleetlaps_proto::breach::Detector;
use fleetlaps_proto::command::BackupRefusal;
use fleetlaps_proto::event::{EventKind, RotationReason};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::auth::Scope;
use crate::liveness::Liveness;
use crate::projection::{ConfirmedRotation, Projections, QuarantineReason};

mod fleet;

use fleet::FleetCollector;

/// Counter: messages taken from the events stream, by `kind` (the event's kind, from its
/// subject; `unknown` when the subject names none) and `outcome` ([`IngestOutcome`]).
pub const EVENTS_INGESTED_TOTAL: &str = "fleetlaps_events_ingested_total";
/// Counter: messages refused into the quarantine, by reason.
pub const EVENTS_QUARANTINED_TOTAL: &str = "fleetlaps_events_quarantined_total";
/// Counter: quarantine records dropped to keep the quarantine's bound, by the dropped record's
/// reason. Read from the projections at each scrape, so it survives restarts and a rebuild gives
/// the same.
pub const QUARANTINE_DROPPED_TOTAL: &str = "fleetlaps_quarantine_dropped_total";
/// Gauge: quarantine records kept (at most `quarantine.max_entries`).
pub const QUARANTINE_ENTRIES: &str = "fleetlaps_quarantine_entries";
/// Gauge: the stream sequence of the last message folded in.
pub const PROJECTION_LAST_SEQUENCE: &str = "fleetlaps_projection_last_sequence";
/// Gauge: messages on the stream the consumer has not fetched yet, as of its last batch.
pub const CONSUMER_PENDING_MESSAGES: &str = "fleetlaps_consumer_pending_messages";
/// Histogram: from a message's time on the stream to its fold being durable (flushed).
pub const INGEST_LAG_SECONDS: &str = "fleetlaps_ingest_lag_seconds";
/// Histogram: time to fold, flush and acknowledge one batch.
pub const CONSUMER_BATCH_DURATION_SECONDS: &str = "fleetlaps_consumer_batch_duration_seconds";
/// Gauge: devices known to the projections, by `state` ([`crate::projection::DeviceState`]), at scrape time.
pub const DEVICES: &str = "fleetlaps_devices";
/// Histogram: the age of every device's current password, at scrape time.
pub const PASSWORD_AGE_SECONDS: &str = "fleetlaps_password_age_seconds";
/// Counter: rotations devices confirmed (the account changed), by `trigger` ([`RotationTrigger`]).
pub const ROTATIONS_TOTAL: &str = "fleetlaps_rotations_total";
/// Counter: backups answered to their devices, by `outcome`: `stored` or the refusal's reason.
pub const BACKUPS_CONFIRMED_TOTAL: &str = "fleetlaps_backups_confirmed_total";
/// Counter: credential reads served, by the `scope` they needed
/// (`DeviceLocalCredential.ReadBasic.All` for metadata, `DeviceLocalCredential.Read.All` for
/// passwords).
pub const CREDENTIAL_READS_TOTAL: &str = "fleetlaps_credential_reads_total";
/// Counter: passwords disclosed through the API (one per credential returned).
pub const PASSWORDS_DISCLOSED_TOTAL: &str = "fleetlaps_passwords_disclosed_total";
/// Gauge: breach campaigns, by `state` (`declared`, `running`, `completed`, `deadline_passed`,
/// `cancelled`), at scrape time.
pub const CAMPAIGNS: &str = "fleetlaps_campaigns";
/// Gauge: the devices of the campaigns in each `campaign_state`, by `device_state`: `targeted`
/// (all of them), `commanded` (sent a rotate command, or covered by another campaign's) and
/// `rotated` (confirmed a rotation dated after the declaration); counts, not a partition. A
/// campaign's progress is `rotated / targeted`; its stragglers are `targeted - rotated` once its
/// state is `deadline_passed`.
pub const CAMPAIGN_DEVICES: &str = "fleetlaps_campaign_devices";
/// Histogram: from a breach's declaration to a targeted device confirming its rotation.
pub const CAMPAIGN_ROTATION_SECONDS: &str = "fleetlaps_campaign_rotation_seconds";
/// Counter: API requests, by matched route and status code.
pub const HTTP_REQUESTS_TOTAL: &str = "fleetlaps_http_requests_total";
/// Histogram: API request latency, by matched route.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "fleetlaps_http_request_duration_seconds";
/// Counter: image rollbacks reported by devices (a device restored from an older copy, which
/// then rotated).
pub const IMAGE_ROLLBACKS_TOTAL: &str = "fleetlaps_image_rollbacks_total";
/// Counter: clones recorded on the history (two running copies of one device).
pub const DEVICE_CLONES_DETECTED_TOTAL: &str = "fleetlaps_device_clones_detected_total";
/// Counter: device events older than their device's newest one, applied anyway (a clone or an
/// unnoticed rollback).
pub const EVENTS_OUT_OF_ORDER_TOTAL: &str = "fleetlaps_events_out_of_order_total";
/// Counter: detections recorded by this process, by detector (`lateral_movement`,
/// `repeated_failures`, `read_then_spread`).
pub const DETECTIONS_TOTAL: &str = "fleetlaps_detections_total";
/// Gauge: 1 while the consumer folds batches, 0 while a batch fails and is retried (a full disk,
/// a sled error).
pub const CONSUMER_HEALTHY: &str = "fleetlaps_consumer_healthy";
/// Gauge: 1 once the projections reached the stream's last sequence at start (tokens are trusted
/// from then on), 0 before.
pub const PROJECTIONS_CAUGHT_UP: &str = "fleetlaps_projections_caught_up";
/// Counter: API connections closed by the server before or between requests, by reason
/// ([`ConnectionDropReason`]).
pub const HTTP_CONNECTIONS_DROPPED_TOTAL: &str = "fleetlaps_http_connections_dropped_total";

/// Every metric name the orchestrator serves: what dashboards and alert rules may query.
pub const ALL_NAMES: [&str; 28] = [
    EVENTS_INGESTED_TOTAL,
    EVENTS_QUARANTINED_TOTAL,
    QUARANTINE_DROPPED_TOTAL,
    QUARANTINE_ENTRIES,
    PROJECTION_LAST_SEQUENCE,
    CONSUMER_PENDING_MESSAGES,
    INGEST_LAG_SECONDS,
    CONSUMER_BATCH_DURATION_SECONDS,
    DEVICES,
    PASSWORD_AGE_SECONDS,
    ROTATIONS_TOTAL,
    BACKUPS_CONFIRMED_TOTAL,
    CREDENTIAL_READS_TOTAL,
    PASSWORDS_DISCLOSED_TOTAL,
    CAMPAIGNS,
    CAMPAIGN_DEVICES,
    CAMPAIGN_ROTATION_SECONDS,
    HTTP_REQUESTS_TOTAL,
    HTTP_REQUEST_DURATION_SECONDS,
    IMAGE_ROLLBACKS_TOTAL,
    DEVICE_CLONES_DETECTED_TOTAL,
    EVENTS_OUT_OF_ORDER_TOTAL,
    DETECTIONS_TOTAL,
    CONSUMER_HEALTHY,
    PROJECTIONS_CAUGHT_UP,
    HTTP_CONNECTIONS_DROPPED_TOTAL,
    // Served by every Prometheus target, listed so dashboards may use them.
    "up",
    "scrape_duration_seconds",
];

/// What became of a message taken from the stream: the `outcome` label of
/// [`EVENTS_INGESTED_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// It changed the projections (or joined the audit history).
    Applied,
    /// An event with the same id was applied before (a re-sent event).
    Duplicate,
    /// It was refused into the quarantine.
    Quarantined,
}

impl IngestOutcome {
    /// Every outcome, so each label value exists from the start.
    pub const ALL: [Self; 3] = [Self::Applied, Self::Duplicate, Self::Quarantined];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Quarantined => "quarantined",
        }
    }
}

/// Why a confirmed rotation happened: the `trigger` label of [`ROTATIONS_TOTAL`]. The device's
/// [`RotationReason`], except that a commanded rotation counted by a breach campaign is
/// `campaign`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationTrigger {
    /// The device had no backed-up password yet.
    Initial,
    /// The password reached `PasswordAgeDays`.
    Age,
    /// Someone asked on the device.
    Manual,
    /// The post-authentication grace period ended.
    PostAuthentication,
    /// A rotate command outside any campaign (`lapsctl rotate`, Graph's rotate action).
    Command,
    /// A breach campaign's command.
    Campaign,
    /// The device found it was rolled back to an older image.
    Rollback,
}

impl RotationTrigger {
    /// Every trigger, so each label value exists from the start.
    pub const ALL: [Self; 7] = [
        Self::Initial,
        Self::Age,
        Self::Manual,
        Self::PostAuthentication,
        Self::Command,
        Self::Campaign,
        Self::Rollback,
    ];

    /// The trigger of a rotation made for `reason`, counted by a campaign or not.
    pub fn of(reason: RotationReason, counted_by_campaign: bool) -> Self {
        match reason {
            RotationReason::Initial => Self::Initial,
            RotationReason::Expired => Self::Age,
            RotationReason::Manual => Self::Manual,
            RotationReason::PostAuthentication => Self::PostAuthentication,
            RotationReason::Command if counted_by_campaign => Self::Campaign,
            RotationReason::Command => Self::Command,
            RotationReason::Rollback => Self::Rollback,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Age => "age",
            Self::Manual => "manual",
            Self::PostAuthentication => "post_authentication",
            Self::Command => "command",
            Self::Campaign => "campaign",
            Self::Rollback => "rollback",
        }
    }
}

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
    /// See [`EVENTS_INGESTED_TOTAL`].
    pub events_ingested: IntCounterVec,
    /// See [`EVENTS_QUARANTINED_TOTAL`].
    pub events_quarantined: IntCounterVec,
    /// See [`PROJECTION_LAST_SEQUENCE`].
    pub projection_last_sequence: IntGauge,
    /// See [`CONSUMER_PENDING_MESSAGES`].
    pub consumer_pending: IntGauge,
    /// See [`INGEST_LAG_SECONDS`].
    pub ingest_lag: Histogram,
    /// See [`CONSUMER_BATCH_DURATION_SECONDS`].
    pub consumer_batch_duration: Histogram,
    /// See [`ROTATIONS_TOTAL`].
    pub rotations: IntCounterVec,
    /// See [`BACKUPS_CONFIRMED_TOTAL`].
    pub backups_confirmed: IntCounterVec,
    /// See [`CREDENTIAL_READS_TOTAL`].
    pub credential_reads: IntCounterVec,
    /// See [`PASSWORDS_DISCLOSED_TOTAL`].
    pub passwords_disclosed: IntCounter,
    /// See [`CAMPAIGN_ROTATION_SECONDS`].
    pub campaign_rotation: Histogram,
    /// See [`HTTP_REQUESTS_TOTAL`].
    pub http_requests: IntCounterVec,
    /// See [`HTTP_REQUEST_DURATION_SECONDS`].
    pub http_request_duration: HistogramVec,
    /// See [`IMAGE_ROLLBACKS_TOTAL`].
    pub image_rollbacks: IntCounter,
    /// See [`DEVICE_CLONES_DETECTED_TOTAL`].
    pub device_clones_detected: IntCounter,
    /// See [`EVENTS_OUT_OF_ORDER_TOTAL`].
    pub events_out_of_order: IntCounter,
    /// See [`DETECTIONS_TOTAL`].
    pub detections: IntCounterVec,
    /// See [`CONSUMER_HEALTHY`].
    pub consumer_healthy: IntGauge,
    /// See [`PROJECTIONS_CAUGHT_UP`].
    pub projections_caught_up: IntGauge,
    /// See [`HTTP_CONNECTIONS_DROPPED_TOTAL`].
    pub http_connections_dropped: IntCounterVec,
}

/// Seconds: from a millisecond to a day, for lags and delays that are usually short but must
/// show when they are not.
const LAG_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 3600.0, 86_400.0,
];

/// Seconds: from a minute to a year, for password ages (LAPS' `PasswordAgeDays` is 1 to 365).
const AGE_BUCKETS: [f64; 12] = [
    60.0,
    3600.0,
    6.0 * 3600.0,
    86_400.0,
    3.0 * 86_400.0,
    7.0 * 86_400.0,
    14.0 * 86_400.0,
    30.0 * 86_400.0,
    60.0 * 86_400.0,
    90.0 * 86_400.0,
    180.0 * 86_400.0,
    365.0 * 86_400.0,
];

/// Seconds: from a second to a week, for the time from a breach's declaration to a rotation.
const CAMPAIGN_BUCKETS: [f64; 12] = [
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    86_400.0,
    3.0 * 86_400.0,
    7.0 * 86_400.0,
];

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("metric definition is valid")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("metric definition is valid")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("metric definition is valid")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::new(),
            events_ingested: counter_vec(
                EVENTS_INGESTED_TOTAL,
                "Messages taken from the events stream, by event kind and outcome.",
                &["kind", "outcome"],
            ),
            events_quarantined: counter_vec(
                EVENTS_QUARANTINED_TOTAL,
                "Messages refused into the quarantine, by reason.",
                &["reason"],
            ),
            projection_last_sequence: gauge(
                PROJECTION_LAST_SEQUENCE,
                "Stream sequence of the last message folded in.",
            ),
            consumer_pending: gauge(
                CONSUMER_PENDING_MESSAGES,
                "Messages on the stream the consumer has not fetched yet.",
            ),
            ingest_lag: histogram(
                INGEST_LAG_SECONDS,
                "From a message's time on the stream to its fold being durable.",
                &LAG_BUCKETS,
            ),
            consumer_batch_duration: Histogram::with_opts(HistogramOpts::new(
                CONSUMER_BATCH_DURATION_SECONDS,
                "Time to fold, flush and acknowledge one batch.",
            ))
            .expect("metric definition is valid"),
            rotations: counter_vec(
                ROTATIONS_TOTAL,
                "Rotations devices confirmed, by trigger.",
                &["trigger"],
            ),
            backups_confirmed: counter_vec(
                BACKUPS_CONFIRMED_TOTAL,
                "Backups answered to their devices, by outcome.",
                &["outcome"],
            ),
            credential_reads: counter_vec(
                CREDENTIAL_READS_TOTAL,
                "Credential reads served, by the scope they needed.",
                &["scope"],
            ),
            passwords_disclosed: counter(PASSWORDS_DISCLOSED_TOTAL, "Passwords disclosed through the API."),
            campaign_rotation: histogram(
                CAMPAIGN_ROTATION_SECONDS,
                "From a breach's declaration to a targeted device confirming its rotation.",
                &CAMPAIGN_BUCKETS,
            ),
            http_requests: counter_vec(HTTP_REQUESTS_TOTAL, "API requests.", &["route", "status"]),
            http_request_duration: HistogramVec::new(
                HistogramOpts::new(HTTP_REQUEST_DURATION_SECONDS, "API request latency."),
                &["route"],
            )
            .expect("metric definition is valid"),
            image_rollbacks: counter(IMAGE_ROLLBACKS_TOTAL, "Image rollbacks reported by devices."),
            device_clones_detected: counter(
                DEVICE_CLONES_DETECTED_TOTAL,
                "Clones (two running copies of one device) recorded on the history.",
            ),
            events_out_of_order: counter(
                EVENTS_OUT_OF_ORDER_TOTAL,
                "Device events older than their device's newest one, applied anyway.",
            ),
            detections: counter_vec(
                DETECTIONS_TOTAL,
                "Detections recorded by this process, by detector.",
                &["detector"],
            ),
            consumer_healthy: gauge(
                CONSUMER_HEALTHY,
                "1 while the consumer folds batches, 0 while one fails.",
            ),
            projections_caught_up: gauge(
                PROJECTIONS_CAUGHT_UP,
                "1 once the projections reached the stream's last sequence at start.",
            ),
            http_connections_dropped: counter_vec(
                HTTP_CONNECTIONS_DROPPED_TOTAL,
                "API connections closed by the server before or between requests, by reason.",
                &["reason"],
            ),
        };
        metrics.register_all();
        metrics.show_every_label_value();
        metrics
    }

    fn register_all(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 20] = [
            Box::new(self.events_ingested.clone()),
            Box::new(self.events_quarantined.clone()),
            Box::new(self.projection_last_sequence.clone()),
            Box::new(self.consumer_pending.clone()),
            Box::new(self.ingest_lag.clone()),
            Box::new(self.consumer_batch_duration.clone()),
            Box::new(self.rotations.clone()),
            Box::new(self.backups_confirmed.clone()),
            Box::new(self.credential_reads.clone()),
            Box::new(self.passwords_disclosed.clone()),
            Box::new(self.campaign_rotation.clone()),
            Box::new(self.http_requests.clone()),
            Box::new(self.http_request_duration.clone()),
            Box::new(self.image_rollbacks.clone()),
            Box::new(self.device_clones_detected.clone()),
            Box::new(self.events_out_of_order.clone()),
            Box::new(self.detections.clone()),
            Box::new(self.consumer_healthy.clone()),
            Box::new(self.projections_caught_up.clone()),
            Box::new(self.http_connections_dropped.clone()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("each metric is registered once");
        }
    }

    /// Shows every bounded label value from the start, so rates and ratios exist before the
    /// first event and a dashboard's query returns zeros rather than nothing.
    fn show_every_label_value(&self) {
        let kinds = EventKind::ALL
            .iter()
            .map(|kind| kind.as_str())
            .chain(AuditKind::ALL.iter().map(|kind| kind.as_str()))
            .chain([UNKNOWN_KIND]);
        for kind in kinds {
            for outcome in IngestOutcome::ALL {
                self.events_ingested.with_label_values(&[kind, outcome.as_str()]);
            }
        }
        for reason in QuarantineReason::ALL {
            self.events_quarantined.with_label_values(&[reason.as_str()]);
        }
        for trigger in RotationTrigger::ALL {
            self.rotations.with_label_values(&[trigger.as_str()]);
        }
        self.backups_confirmed.with_label_values(&[BACKUP_STORED]);
        for reason in BackupRefusal::ALL {
            self.backups_confirmed.with_label_values(&[reason.as_str()]);
        }
        for scope in [Scope::ReadBasic, Scope::ReadPasswords] {
            self.credential_reads.with_label_values(&[scope.as_str()]);
        }
        for detector in Detector::ALL {
            self.detections.with_label_values(&[detector.as_str()]);
        }
        for reason in ConnectionDropReason::ALL {
            self.http_connections_dropped.with_label_values(&[reason.as_str()]);
        }
    }

    /// Counts one message taken from the stream.
    pub fn ingested(&self, kind: &str, outcome: IngestOutcome) {
        self.events_ingested.with_label_values(&[kind, outcome.as_str()]).inc();
    }

    /// Counts a rotation its device confirmed, and for each campaign that counted it the time
    /// since that campaign's declaration.
    pub fn rotation_confirmed(&self, rotation: &ConfirmedRotation) {
        let trigger = RotationTrigger::of(rotation.reason, !rotation.campaign_delays.is_empty());
        self.rotations.with_label_values(&[trigger.as_str()]).inc();
        for delay in &rotation.campaign_delays {
            self.campaign_rotation.observe(delay.as_seconds_f64().max(0.0));
        }
    }

    /// Counts a credential read that needed `scope`.
    pub fn credential_read(&self, scope: Scope) {
        self.credential_reads.with_label_values(&[scope.as_str()]).inc();
    }

    /// Reports the quarantine's size and dropped counts from `projections` at every scrape.
    pub fn observe_quarantine(&self, projections: Projections) {
        self.registry
            .register(Box::new(QuarantineCollector::new(projections)))
            .expect("the quarantine collector is registered once");
    }

    /// Reports the fleet (devices by state, password ages, campaigns) from `projections` at
    /// every scrape, silent or not by `liveness`.
    pub fn observe_fleet(&self, projections: Projections, liveness: Liveness) {
        self.registry
            .register(Box::new(FleetCollector::new(projections, liveness)))
            .expect("the fleet collector is registered once");
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

/// The `kind` label of a message whose subject names no kind (it is quarantined).
pub const UNKNOWN_KIND: &str = "unknown";

/// The `outcome` label of [`BACKUPS_CONFIRMED_TOTAL`] for a stored backup.
pub const BACKUP_STORED: &str = "stored";

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
                for reason in QuarantineReason::ALL {
                    dropped.with_label_values(&[reason.as_str()]);
                }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The metric families named in an exposition (`# TYPE name kind` lines).
    fn served_names(exposition: &str) -> BTreeSet<String> {
        exposition
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_metric_named_in_the_module_is_served_and_every_served_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let projections = Projections::open(&dir.path().join("db")).unwrap();
        let metrics = Metrics::new();
        metrics.observe_quarantine(projections.clone());
        let liveness = Liveness::new(std::time::Duration::from_secs(3 * 3600));
        liveness.mark_caught_up();
        metrics.observe_fleet(projections, liveness);
        // Per-route series exist once a route has served a request.
        metrics.http_requests.with_label_values(&["/healthz", "200"]).inc();
        metrics
            .http_request_duration
            .with_label_values(&["/healthz"])
            .observe(0.001);
        let served = served_names(&metrics.render());
        let named: BTreeSet<String> = ALL_NAMES
            .iter()
            .filter(|name| name.starts_with("fleetlaps_"))
            .map(|name| (*name).to_owned())
            .collect();
        assert_eq!(served, named);
    }

    #[test]
    fn a_commanded_rotation_counted_by_a_campaign_is_a_campaign_rotation() {
        let metrics = Metrics::new();
        metrics.rotation_confirmed(&ConfirmedRotation {
            reason: RotationReason::Command,
            campaign_delays: vec![chrono::TimeDelta::seconds(42)],
            completes_a_campaign: false,
        });
        metrics.rotation_confirmed(&ConfirmedRotation {
            reason: RotationReason::Command,
            campaign_delays: Vec::new(),
            completes_a_campaign: false,
        });
        metrics.rotation_confirmed(&ConfirmedRotation {
            reason: RotationReason::Expired,
            campaign_delays: Vec::new(),
            completes_a_campaign: false,
        });
        let count = |trigger: &str| metrics.rotations.with_label_values(&[trigger]).get();
        assert_eq!(
            (count("campaign"), count("command"), count("age"), count("initial")),
            (1, 1, 1, 0)
        );
        assert_eq!(metrics.campaign_rotation.get_sample_count(), 1);
        assert!((metrics.campaign_rotation.get_sample_sum() - 42.0).abs() < f64::EPSILON);
    }

    #[test]
    fn no_label_value_is_a_device_id_or_a_principal() {
        let exposition = Metrics::new().render();
        for line in exposition.lines().filter(|line| !line.starts_with('#')) {
            let Some((_, labels)) = line.split_once('{') else {
                continue;
            };
            for pair in labels.trim_end_matches(|c| c != '}').trim_end_matches('}').split(',') {
                let (name, _) = pair.split_once('=').unwrap();
                assert!(
                    ["kind", "outcome", "reason", "trigger", "scope", "detector", "le"].contains(&name),
                    "unexpected label {name} in {line}"
                );
            }
        }
    }
}
