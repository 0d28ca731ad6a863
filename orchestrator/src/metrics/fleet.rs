//! The metrics read from the projections at each scrape: devices by state, password ages and
//! campaigns. They depend on the time of the scrape (a password expires without any event), so
//! they are computed then rather than kept by the fold.

use chrono::{DateTime, Utc};
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, IntGaugeVec};

use super::{AGE_BUCKETS, CAMPAIGN_DEVICES, CAMPAIGNS, DEVICES, PASSWORD_AGE_SECONDS, gauge_vec, histogram};
use crate::liveness::Liveness;
use crate::projection::{CampaignState, DeviceState, Projections};

/// The `device_state` values of [`CAMPAIGN_DEVICES`]: each a count of the campaign's devices,
/// not a partition (a device commanded and then rotated counts in both).
const CAMPAIGN_DEVICE_STATES: [&str; 3] = ["targeted", "commanded", "rotated"];

/// Computes [`DEVICES`], [`PASSWORD_AGE_SECONDS`], [`CAMPAIGNS`] and [`CAMPAIGN_DEVICES`] at
/// each scrape.
pub(super) struct FleetCollector {
    projections: Projections,
    liveness: Liveness,
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
    fn fill(&self, projections: &Projections, liveness: &Liveness, now: DateTime<Utc>) -> Result<(), String> {
        // Until every heartbeat the bucket held at start is read, a device may look silent only
        // because its heartbeat was not read yet: no device states rather than false ones.
        let states_known = liveness.caught_up();
        if states_known {
            for state in DeviceState::ALL {
                self.devices.with_label_values(&[state.as_str()]);
            }
        }
        for state in CampaignState::ALL {
            self.campaigns.with_label_values(&[state.as_str()]);
            for device_state in CAMPAIGN_DEVICE_STATES {
                self.campaign_devices.with_label_values(&[state.as_str(), device_state]);
            }
        }
        // Read as iterated: one device in memory at a time, however large the fleet, and of each
        // only where it stands.
        for device in projections.device_standings() {
            let device = device.map_err(|err| err.to_string())?;
            if states_known {
                let state = liveness
                    .state(projections, &device, now)
                    .map_err(|err| err.to_string())?;
                self.devices.with_label_values(&[state.as_str()]).inc();
            }
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
    pub(super) fn new(projections: Projections, liveness: Liveness) -> Self {
        Self {
            projections,
            liveness,
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
        match metrics.fill(&self.projections, &self.liveness, Utc::now()) {
            Ok(()) => metrics.collect(),
            Err(err) => {
                tracing::warn!(error = %err, "reading the fleet for metrics failed");
                Vec::new()
            }
        }
    }
}
