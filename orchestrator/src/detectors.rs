//! The detectors: breach signals the orchestrator raises itself from what the fleet reports.
//!
//! - `lateral_movement`: the managed account authenticating on `devices` or more distinct devices
//!   within `window_minutes` (a shared credential moving laterally).
//! - `repeated_failures`: `failures` or more failed authentications on one device within
//!   `window_minutes`; an aggregated report counts its `count`.
//! - `read_then_spread`: a `password_read` by a principal, then authentications on `devices` or
//!   more distinct devices within `window_minutes` after it.
//!
//! The consumer feeds [`Detectors`] after each flushed batch ([`DetectorFeed`]): the
//! authentications, password reads and detections it folded, each with its stream time. The
//! windows ([`Windows`]) are pure and kept in memory; they measure time by the stream's clock,
//! never the wall clock, so a replay of the same stream builds the same windows and the same
//! candidate detections, with the same ids (derived from the detector, its subject and the
//! evidence).
//!
//! A detection silences its detector for its subject (the fleet, a device, a principal) from its
//! window's start until `detectors.cooldown_minutes` after its last evidence event: evidence in
//! that span never counts again. Recorded detections on the history set the same silence when the
//! consumer folds them, and at start the recent ones are read from the audit history.
//!
//! Guarantees:
//! - Not twice for the same evidence: candidates are acted on only once the consumer has caught up
//!   (`Health::authority`, and the last batch fed had nothing pending), so during a replay or a
//!   rebuild a candidate meets the detection already recorded for it (same detector and subject,
//!   overlapping window) and is dropped; a detection is recorded with its id as `Nats-Msg-Id`, so
//!   one recorded twice in a row is stored once; a breach a detector declared names the detection,
//!   which is then never declared again.
//! - After a restart the windows start empty (the projections are not replayed): evidence that
//!   straddles a restart is seen only if the events after the restart cross the threshold alone.
//! - Evidence older than a day when the consumer catches up is not acted on.
//! - Crash between declaring a detection's breach and recording the detection: the breach (whose
//!   source names the detection) stays; the detection event is missing from the history.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::audit::AuditEvent;
use fleetlaps_proto::breach::{
    BreachDetected, BreachScope, BreachSource, DEVICES_PER_EVENT, DetectionId, Detector, EVIDENCE_PER_EVENT,
};
use fleetlaps_proto::ids::{DeviceId, EventId};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::bus::Journal;
use crate::campaigns::{self, BreachSignal};
use crate::config::{DetectorMode, DetectorsConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::projection::Projections;

/// Evidence older than this when the consumer catches up is not acted on.
const EVIDENCE_HORIZON: chrono::TimeDelta = chrono::TimeDelta::hours(24);
/// The most events one window keeps; the oldest are dropped first.
const WINDOW_EVENTS_MAX: usize = 10_000;
/// The most candidates waiting to be acted on; the oldest are dropped first.
const PENDING_MAX: usize = 1_000;
/// How often the detectors look at their candidates when nothing is fed.
const TICK: Duration = Duration::from_secs(1);
/// Batches the consumer may have fed ahead of the detectors.
const FEED_CAPACITY: usize = 1_024;

/// One fact the consumer folded that a detector watches, with its stream time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// `authentication_succeeded` or `authentication_failed`.
    Authentication {
        /// The device event.
        event_id: EventId,
        /// Where.
        device_id: DeviceId,
        /// When the stream stored it.
        at: DateTime<Utc>,
        /// Whether it succeeded.
        succeeded: bool,
        /// How many authentications it reports (aggregated failures), at least 1.
        count: u64,
    },
    /// `password_read`.
    PasswordRead {
        /// The orchestrator event.
        event_id: EventId,
        /// Whose password.
        device_id: DeviceId,
        /// Who read it.
        principal: String,
        /// When the stream stored it.
        at: DateTime<Utc>,
    },
    /// A detection recorded on the history.
    Detected(BreachDetected),
    /// A breach a detector declared for this detection.
    Declared(DetectionId),
}

impl Observation {
    /// What a detector watches in an orchestrator event, if anything.
    pub fn of_audit(event: &AuditEvent, event_id: EventId, at: DateTime<Utc>) -> Option<Self> {
        match event {
            AuditEvent::PasswordRead(read) => Some(Self::PasswordRead {
                event_id,
                device_id: read.device_id.clone(),
                principal: read.principal.clone(),
                at,
            }),
            AuditEvent::BreachDetected(detected) => Some(Self::Detected(detected.clone())),
            AuditEvent::BreachDeclared(declared) => match declared.source {
                BreachSource::Detector { detection_id, .. } => Some(Self::Declared(detection_id)),
                BreachSource::Api | BreachSource::Nats => None,
            },
            _ => None,
        }
    }
}

/// What the consumer folded in one batch.
#[derive(Debug)]
pub struct DetectorBatch {
    /// In stream order.
    pub observations: Vec<Observation>,
    /// Whether the batch's last message had nothing pending after it.
    pub caught_up: bool,
}

/// The consumer's end: it sends each batch's observations.
#[derive(Clone)]
pub struct DetectorFeed(mpsc::Sender<DetectorBatch>);

impl DetectorFeed {
    /// Hands a batch to the detectors; waits while they are 1,024 batches behind.
    pub async fn send(&self, batch: DetectorBatch) {
        if self.0.send(batch).await.is_err() {
            tracing::debug!("the detectors have stopped; observations dropped");
        }
    }
}

/// A detector's thresholds, as the windows use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    /// Distinct devices, or failed attempts.
    pub at_least: u64,
    /// How close together.
    pub window: chrono::TimeDelta,
}

/// Which detectors watch, and how much it takes to fire them.
#[derive(Debug, Clone, Default)]
pub struct WindowSettings {
    /// Thresholds of the detectors that watch; a detector not here is off.
    pub thresholds: BTreeMap<Detector, Threshold>,
    /// How long a detection silences its detector for its subject after its last evidence event.
    pub cooldown: chrono::TimeDelta,
}

/// Whom a detection is about: the detector's unit of silence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Subject {
    /// Every device (lateral movement).
    Fleet,
    /// One device (repeated failures).
    Device(DeviceId),
    /// One principal (read then spread).
    Principal(String),
}

impl Subject {
    fn of(detection: &BreachDetected) -> Self {
        match detection.detector {
            Detector::LateralMovement => Self::Fleet,
            Detector::RepeatedFailures => detection
                .device_ids
                .first()
                .map_or(Self::Fleet, |device_id| Self::Device(device_id.clone())),
            Detector::ReadThenSpread => Self::Principal(detection.principal.clone().unwrap_or_default()),
        }
    }

    fn as_text(&self) -> &str {
        match self {
            Self::Fleet => "",
            Self::Device(device_id) => device_id.as_str(),
            Self::Principal(principal) => principal,
        }
    }
}

/// One piece of evidence in a window.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Evidence {
    event_id: EventId,
    device_id: DeviceId,
    at: DateTime<Utc>,
    count: u64,
}

/// The recent evidence about one subject, and until when it is silenced.
#[derive(Debug, Default)]
struct Window {
    events: VecDeque<Evidence>,
    quiet_until: Option<DateTime<Utc>>,
}

impl Window {
    /// Adds `evidence` unless silenced, dropping what fell out of `window` before it.
    fn push(&mut self, evidence: Evidence, window: chrono::TimeDelta) -> bool {
        if self.quiet_until.is_some_and(|quiet| evidence.at <= quiet) {
            return false;
        }
        let oldest = evidence.at - window;
        while self.events.front().is_some_and(|first| first.at < oldest) {
            self.events.pop_front();
        }
        if self.events.len() >= WINDOW_EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(evidence);
        true
    }

    /// Silences the window until `until`, dropping the evidence it covers.
    fn silence(&mut self, until: DateTime<Utc>) {
        self.quiet_until = Some(self.quiet_until.map_or(until, |quiet| quiet.max(until)));
        self.events.retain(|evidence| evidence.at > until);
    }

    fn devices(&self) -> BTreeSet<&DeviceId> {
        self.events.iter().map(|evidence| &evidence.device_id).collect()
    }

    /// Whether nothing in it can matter after `now`.
    fn stale(&self, now: DateTime<Utc>, window: chrono::TimeDelta) -> bool {
        self.quiet_until.is_none_or(|quiet| quiet < now) && self.events.back().is_none_or(|last| last.at < now - window)
    }
}

/// The windows of every detector, and the detections they found not yet acted on. Pure: fed
/// observations in stream order, it gives the same candidates for the same stream.
#[derive(Debug, Default)]
pub struct Windows {
    settings: WindowSettings,
    /// Successful authentications, fleet-wide.
    lateral: Window,
    /// Failed authentications, by device.
    failures: HashMap<DeviceId, Window>,
    /// Password reads, by principal (their `quiet_until` silences the principal).
    reads: HashMap<String, Window>,
    /// Successful authentications, for read then spread.
    spread: Window,
    /// Found, not yet acted on, oldest first.
    pending: VecDeque<BreachDetected>,
}

impl Windows {
    /// Empty windows for these settings.
    pub fn new(settings: WindowSettings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// Takes one observation, in stream order; may find a detection.
    pub fn observe(&mut self, observation: Observation) {
        match observation {
            Observation::Authentication {
                event_id,
                device_id,
                at,
                succeeded,
                count,
            } => {
                let evidence = Evidence {
                    event_id,
                    device_id,
                    at,
                    count: count.max(1),
                };
                if succeeded {
                    self.lateral_movement(&evidence);
                    self.read_then_spread(evidence);
                } else {
                    self.repeated_failures(evidence);
                }
            }
            Observation::PasswordRead {
                event_id,
                device_id,
                principal,
                at,
            } => {
                if let Some(threshold) = self.threshold(Detector::ReadThenSpread) {
                    let evidence = Evidence {
                        event_id,
                        device_id,
                        at,
                        count: 0,
                    };
                    self.reads
                        .entry(principal)
                        .or_default()
                        .push(evidence, threshold.window);
                }
            }
            Observation::Detected(detection) => self.recorded(&detection),
            Observation::Declared(detection_id) => {
                self.pending.retain(|pending| pending.detection_id != detection_id);
            }
        }
    }

    /// The detections found and not yet acted on whose evidence is recent enough; they leave the
    /// windows' care (give back with [`Windows::retry`] what could not be recorded).
    pub fn take_due(&mut self, now: DateTime<Utc>) -> Vec<BreachDetected> {
        self.pending
            .drain(..)
            .filter(|detection| detection.window_end >= now - EVIDENCE_HORIZON)
            .collect()
    }

    /// Gives back a detection that could not be recorded, to try again.
    pub fn retry(&mut self, detection: BreachDetected) {
        self.pending.push_back(detection);
    }

    /// Forgets windows nothing can fire from any more; call only once caught up.
    pub fn prune(&mut self, now: DateTime<Utc>) {
        let window_of = |detector| self.threshold(detector).map_or(chrono::TimeDelta::zero(), |t| t.window);
        let (failure_window, read_window) = (
            window_of(Detector::RepeatedFailures),
            window_of(Detector::ReadThenSpread),
        );
        self.failures.retain(|_, window| !window.stale(now, failure_window));
        self.reads.retain(|_, window| !window.stale(now, read_window));
    }

    fn threshold(&self, detector: Detector) -> Option<Threshold> {
        self.settings.thresholds.get(&detector).copied()
    }

    fn lateral_movement(&mut self, evidence: &Evidence) {
        let Some(threshold) = self.threshold(Detector::LateralMovement) else {
            return;
        };
        if !self.lateral.push(evidence.clone(), threshold.window) {
            return;
        }
        if (self.lateral.devices().len() as u64) < threshold.at_least {
            return;
        }
        let evidence: Vec<Evidence> = self.lateral.events.iter().cloned().collect();
        self.found(Detector::LateralMovement, &Subject::Fleet, &evidence, None);
    }

    fn repeated_failures(&mut self, evidence: Evidence) {
        let Some(threshold) = self.threshold(Detector::RepeatedFailures) else {
            return;
        };
        let device_id = evidence.device_id.clone();
        let window = self.failures.entry(device_id.clone()).or_default();
        if !window.push(evidence, threshold.window) {
            return;
        }
        let attempts: u64 = window.events.iter().map(|evidence| evidence.count).sum();
        if attempts < threshold.at_least {
            return;
        }
        let evidence: Vec<Evidence> = window.events.iter().cloned().collect();
        self.found(Detector::RepeatedFailures, &Subject::Device(device_id), &evidence, None);
    }

    fn read_then_spread(&mut self, evidence: Evidence) {
        let Some(threshold) = self.threshold(Detector::ReadThenSpread) else {
            return;
        };
        let now = evidence.at;
        self.spread.push(evidence, threshold.window);
        let mut found = Vec::new();
        for (principal, reads) in &self.reads {
            // The earliest read still in the window: the most authentications after it.
            let Some(read) = reads.events.iter().find(|read| read.at >= now - threshold.window) else {
                continue;
            };
            let after: Vec<&Evidence> = self.spread.events.iter().filter(|auth| auth.at > read.at).collect();
            let devices: BTreeSet<&DeviceId> = after.iter().map(|auth| &auth.device_id).collect();
            if (devices.len() as u64) < threshold.at_least {
                continue;
            }
            let mut evidence = vec![read.clone()];
            evidence.extend(after.into_iter().cloned());
            found.push((principal.clone(), evidence));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        for (principal, evidence) in found {
            self.found(
                Detector::ReadThenSpread,
                &Subject::Principal(principal.clone()),
                &evidence,
                Some(principal),
            );
        }
    }

    /// A detection: becomes a candidate, and silences its detector for its subject.
    fn found(&mut self, detector: Detector, subject: &Subject, evidence: &[Evidence], principal: Option<String>) {
        let (Some(first), Some(last)) = (evidence.first(), evidence.last()) else {
            return;
        };
        let mut digest = Sha256::new();
        digest.update(detector.as_str());
        digest.update([0]);
        digest.update(subject.as_text());
        for item in evidence {
            digest.update(item.event_id.as_bytes());
        }
        let digest: [u8; 32] = digest.finalize().into();
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        let devices: BTreeSet<&DeviceId> = evidence.iter().map(|item| &item.device_id).collect();
        let detection = BreachDetected {
            detection_id: DetectionId::derived(id),
            detector,
            device_count: u32::try_from(devices.len()).unwrap_or(u32::MAX),
            device_ids: devices.into_iter().take(DEVICES_PER_EVENT).cloned().collect(),
            window_start: first.at,
            window_end: last.at,
            evidence_event_ids: evidence
                .iter()
                .rev()
                .take(EVIDENCE_PER_EVENT)
                .rev()
                .map(|item| item.event_id)
                .collect(),
            authentication_count: evidence.iter().map(|item| item.count).sum(),
            principal,
            breach_id: None,
        };
        self.silence(&detection, subject);
        if self.pending.len() >= PENDING_MAX {
            self.pending.pop_front();
        }
        self.pending.push_back(detection);
    }

    /// A detection recorded on the history: its evidence never counts again, and a candidate
    /// for the same evidence is dropped.
    fn recorded(&mut self, detection: &BreachDetected) {
        let subject = Subject::of(detection);
        self.pending.retain(|pending| {
            pending.detection_id != detection.detection_id
                && !(pending.detector == detection.detector
                    && Subject::of(pending) == subject
                    && pending.window_start <= detection.window_end
                    && detection.window_start <= pending.window_end)
        });
        self.silence(detection, &subject);
    }

    fn silence(&mut self, detection: &BreachDetected, subject: &Subject) {
        let until = detection.window_end + self.settings.cooldown;
        match (detection.detector, subject) {
            (Detector::LateralMovement, _) => self.lateral.silence(until),
            (Detector::RepeatedFailures, Subject::Device(device_id)) => {
                self.failures.entry(device_id.clone()).or_default().silence(until);
            }
            (Detector::ReadThenSpread, Subject::Principal(principal)) => {
                self.reads.entry(principal.clone()).or_default().silence(until);
            }
            _ => {}
        }
    }
}

/// What the detectors need besides their settings.
pub struct DetectorParts {
    /// Read for the recent detections at start, and by `campaigns::declare`.
    pub projections: Projections,
    /// Where detections and their breaches are recorded.
    pub journal: Arc<dyn Journal>,
    /// Whether the projections have caught up since start.
    pub health: Arc<Health>,
    /// `fleetlaps_detections_total`.
    pub metrics: Metrics,
    /// Woken after a detector declares a breach.
    pub campaign_wake: Arc<Notify>,
}

/// The detectors' task: fed by the consumer, acting on what the windows find once caught up.
pub struct Detectors {
    parts: DetectorParts,
    windows: Windows,
    modes: BTreeMap<Detector, DetectorMode>,
    campaign_deadline: Duration,
    receiver: mpsc::Receiver<DetectorBatch>,
    /// Whether the last batch fed had nothing pending after it.
    caught_up: bool,
}

impl Detectors {
    /// The detectors of `config`, and the consumer's feed; `None` when every detector is off.
    pub fn new(config: &DetectorsConfig, parts: DetectorParts) -> anyhow::Result<Option<(Self, DetectorFeed)>> {
        let mut settings = WindowSettings {
            thresholds: BTreeMap::new(),
            cooldown: chrono::TimeDelta::from_std(config.cooldown())?,
        };
        let mut modes = BTreeMap::new();
        for detector in Detector::ALL {
            let thresholds = config.thresholds(detector)?;
            if thresholds.mode == DetectorMode::Off {
                continue;
            }
            modes.insert(detector, thresholds.mode);
            settings.thresholds.insert(
                detector,
                Threshold {
                    at_least: thresholds.threshold,
                    window: chrono::TimeDelta::from_std(thresholds.window)?,
                },
            );
        }
        if modes.is_empty() {
            return Ok(None);
        }
        let (sender, receiver) = mpsc::channel(FEED_CAPACITY);
        let detectors = Self {
            parts,
            windows: Windows::new(settings),
            modes,
            campaign_deadline: config.campaign_deadline(),
            receiver,
            caught_up: false,
        };
        Ok(Some((detectors, DetectorFeed(sender))))
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        if let Err(err) = self.seed() {
            tracing::warn!(error = %err, "reading recent detections failed; the detectors start without them");
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                batch = self.receiver.recv() => match batch {
                    Some(batch) => self.take(batch),
                    None => return,
                },
                () = tokio::time::sleep(TICK) => {}
            }
            // Everything fed so far, before acting: a recorded detection may be waiting.
            while let Ok(batch) = self.receiver.try_recv() {
                self.take(batch);
            }
            if self.caught_up && self.parts.health.authority().is_ok() {
                self.act().await;
            }
        }
    }

    fn take(&mut self, batch: DetectorBatch) {
        for observation in batch.observations {
            self.windows.observe(observation);
        }
        self.caught_up = batch.caught_up;
    }

    /// Silences the windows with the detections recorded within the evidence horizon.
    fn seed(&mut self) -> Result<(), crate::projection::ProjectionError> {
        let since = Utc::now() - EVIDENCE_HORIZON - self.windows.settings.cooldown;
        let mut after = 0;
        loop {
            let page = self.parts.projections.audit(after, 1_000)?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = *last;
            for (_, envelope) in page {
                if let AuditEvent::BreachDetected(detection) = envelope.event
                    && detection.window_end >= since
                {
                    self.windows.observe(Observation::Detected(detection));
                }
            }
        }
    }

    /// Records each detection found (declaring its breach first in `campaign` mode).
    async fn act(&mut self) {
        let now = Utc::now();
        self.windows.prune(now);
        for mut detection in self.windows.take_due(now) {
            let mode = self
                .modes
                .get(&detection.detector)
                .copied()
                .unwrap_or(DetectorMode::Off);
            if mode == DetectorMode::Campaign && detection.breach_id.is_none() {
                match self.declare(&detection, now).await {
                    Ok(breach_id) => {
                        detection.breach_id = Some(breach_id);
                        self.parts.campaign_wake.notify_one();
                    }
                    // Never valid however often tried: the detection is recorded without one.
                    Err(err @ campaigns::SignalError::Invalid(_)) => {
                        tracing::warn!(detection_id = %detection.detection_id, error = %err, "a detection's breach was refused; the detection is recorded without one");
                    }
                    Err(err) => {
                        tracing::warn!(detection_id = %detection.detection_id, error = %err, "declaring a detection's breach failed; tried again");
                        self.windows.retry(detection);
                        continue;
                    }
                }
            }
            let detector = detection.detector;
            let detection_id = detection.detection_id;
            let devices = detection.device_count;
            match self
                .parts
                .journal
                .append_with_id(
                    AuditEvent::BreachDetected(detection.clone()),
                    format!("detection-{detection_id}"),
                )
                .await
            {
                Ok(_) => {
                    self.parts
                        .metrics
                        .detections
                        .with_label_values(&[detector.as_str()])
                        .inc();
                    tracing::warn!(%detector, %detection_id, devices, breach_id = ?detection.breach_id, "breach detected");
                }
                Err(err) => {
                    tracing::warn!(%detection_id, error = %err, "recording a detection failed; tried again");
                    self.windows.retry(detection);
                }
            }
        }
    }

    async fn declare(
        &self,
        detection: &BreachDetected,
        now: DateTime<Utc>,
    ) -> Result<fleetlaps_proto::breach::BreachId, campaigns::SignalError> {
        let deadline = now + chrono::TimeDelta::from_std(self.campaign_deadline).unwrap_or(chrono::TimeDelta::hours(4));
        let signal = BreachSignal {
            reason: format!(
                "detector {}: detection {} on {} device(s)",
                detection.detector, detection.detection_id, detection.device_count
            ),
            deadline,
            scope: BreachScope::Devices {
                device_ids: detection.device_ids.clone(),
            },
            declared_by: format!("detector:{}", detection.detector),
            declared_by_token_id: None,
            source: BreachSource::Detector {
                detector: detection.detector,
                detection_id: detection.detection_id,
            },
        };
        let campaign = campaigns::declare(&self.parts.projections, self.parts.journal.as_ref(), signal).await?;
        Ok(campaign.breach_id)
    }
}

#[cfg(test)]
mod tests;
