//! The metrics read from the projections at each scrape: devices by state, password ages and
//! campaigns. They depend on the time of the scrape (a password expires without any event), so
//! they are computed then rather than kept by the fold.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use fleetlaps_proto::ids::DeviceId;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, IntGaugeVec};

use super::{AGE_BUCKETS, CAMPAIGN_DEVICES, CAMPAIGNS, DEVICES, PASSWORD_AGE_SECONDS, gauge_vec, histogram};
use crate::projection::{CampaignState, DeviceState, Projections};

/// The `device_state` values of [`CAMPAIGN_DEVICES`]: each a count of the campaign's devices,
/// not a partition (a device commanded and then rotated counts in both).
const CAMPAIGN_DEVICE_STATES: [&str; 3] = ["targeted", "commanded", "rotated"];

/// The last heartbeat of a device, if it ever sent one.
pub type HeartbeatLookup = Arc<dyn Fn(&DeviceId) -> Option<DateTime<Utc>> + Send + Sync>;

/// What the fleet metrics need beside the projections.
#[derive(Clone)]
pub struct FleetView {
    /// A device is `silent` when nothing was heard from it (no heartbeat, no event) for longer.
    pub silent_after: TimeDelta,
    /// Each device's last heartbeat.
    pub heartbeats: HeartbeatLookup,
}

/// Computes [`DEVICES`], [`PASSWORD_AGE_SECONDS`], [`CAMPAIGNS`] and [`CAMPAIGN_DEVICES`] at
/// each scrape.
pub(super) struct FleetCollector {
    projections: Projections,
    fleet: FleetView,
    /// The metric definitions, for [`Collector::desc`]; fresh copies are filled at each scrape.
    definitions: FleetMetrics,
}

/// One scrape's fleet metrics.
struct FleetMetrics {
    devices: IntGaugeVec,
    password_age: Histogram,
    campaigns: IntGaugeVec,
    campaign_devices: IntGaugeVec,
}

impl FleetMetrics {
    fn new() -> Self {
        Self {
            devices: gauge_vec(DEVICES, "Devices known to the projections, by state.", &["state"]),
            password_age: histogram(
                PASSWORD_AGE_SECONDS,
                "Age of every device's current password.",
                &AGE_BUCKETS,
            ),
            campaigns: gauge_vec(CAMPAIGNS, "Breach campaigns, by state.", &["state"]),
            campaign_devices: gauge_vec(
                CAMPAIGN_DEVICES,
                "Devices of the campaigns in each state, by where each device stands.",
                &["campaign_state", "device_state"],
            ),
        }
    }

    /// Fills the metrics from the projections as of `now`.
    fn fill(&self, projections: &Projections, fleet: &FleetView, now: DateTime<Utc>) -> Result<(), String> {
        for state in DeviceState::ALL {
            self.devices.with_label_values(&[state.as_str()]);
        }
        for state in CampaignState::ALL {
            self.campaigns.with_label_values(&[state.as_str()]);
            for device_state in CAMPAIGN_DEVICE_STATES {
                self.campaign_devices.with_label_values(&[state.as_str(), device_state]);
            }
        }
        for device in projections.devices().map_err(|err| err.to_string())? {
            let heartbeat = (fleet.heartbeats)(&device.device_id);
            let state = device.state(heartbeat, now, fleet.silent_after);
            self.devices.with_label_values(&[state.as_str()]).inc();
            if let Some(rotated) = device.last_rotated {
                self.password_age.observe((now - rotated).as_seconds_f64().max(0.0));
            }
        }
        for campaign in projections.campaigns().map_err(|err| err.to_string())? {
            let state = campaign.state.as_str();
            self.campaigns.with_label_values(&[state]).inc();
            let counts = [campaign.target_count, campaign.commanded, campaign.rotated];
            for (device_state, count) in CAMPAIGN_DEVICE_STATES.into_iter().zip(counts) {
                self.campaign_devices
                    .with_label_values(&[state, device_state])
                    .add(i64::from(count));
            }
        }
        Ok(())
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.devices.collect();
        families.extend(self.password_age.collect());
        families.extend(self.campaigns.collect());
        families.extend(self.campaign_devices.collect());
        families
    }
}

impl FleetCollector {
    pub(super) fn new(projections: Projections, fleet: FleetView) -> Self {
        Self {
            projections,
            fleet,
            definitions: FleetMetrics::new(),
        }
    }
}

impl Collector for FleetCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.definitions.devices.desc();
        descs.extend(self.definitions.password_age.desc());
        descs.extend(self.definitions.campaigns.desc());
        descs.extend(self.definitions.campaign_devices.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let metrics = FleetMetrics::new();
        match metrics.fill(&self.projections, &self.fleet, Utc::now()) {
            Ok(()) => metrics.collect(),
            Err(err) => {
                tracing::warn!(error = %err, "reading the fleet for metrics failed");
                Vec::new()
            }
        }
    }
}
