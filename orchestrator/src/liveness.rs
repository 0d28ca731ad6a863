//! Liveness: when each device last said it was alive, kept in memory from the liveness bucket
//! (`LAPS_LIVENESS`, one heartbeat per device, see [`fleetlaps_proto::liveness`]), never from the
//! history, so "which devices are silent" is known at any fleet size while the history grows only
//! with real changes.
//!
//! `bus::watch_heartbeats` fills a [`Liveness`] from the bucket: first every device's last
//! heartbeat, then each new one. A heartbeat is dated by the server's time of its KV entry, not by
//! the device's clock, which may be wrong or lie.
//!
//! A device is *silent* when it was last heard ([`Liveness::last_heard`]: its last heartbeat, or
//! its enrollment when it never beat) longer than `monitoring.silent_after_secs` ago; the rule is
//! [`DeviceStanding::state`]'s, which the metrics and the API share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::ids::DeviceId;

use crate::projection::{DeviceStanding, DeviceState, ProjectionError, Projections};

/// The last heartbeat of every device heard from, shared: cheap to clone, cheap to read.
#[derive(Clone)]
pub struct Liveness {
    /// Each device's last heartbeat, by the server's time; a time never moves back.
    last_heartbeats: Arc<RwLock<HashMap<DeviceId, DateTime<Utc>>>>,
    /// Whether the watcher has read every heartbeat the bucket held when it started.
    caught_up: Arc<AtomicBool>,
    /// `monitoring.silent_after_secs`.
    silent_after: Duration,
}

impl Liveness {
    /// An empty liveness, calling a device silent after `silent_after` without a heartbeat.
    /// It holds no projections (which would keep their store open): [`Self::last_heard`] and [`Self::state`] are given them.
    pub fn new(silent_after: Duration) -> Self {
        Self {
            last_heartbeats: Arc::default(),
            caught_up: Arc::default(),
            silent_after,
        }
    }

    /// Notes a heartbeat of `device_id` dated `at` (the server's time); an older one than the
    /// last known changes nothing.
    pub fn record(&self, device_id: DeviceId, at: DateTime<Utc>) {
        let mut last_heartbeats = self.last_heartbeats.write().unwrap_or_else(PoisonError::into_inner);
        let last = last_heartbeats.entry(device_id).or_insert(at);
        *last = (*last).max(at);
    }

    /// Notes that every heartbeat the bucket held at start has been read: before that, a device
    /// may look silent only because its heartbeat was not read yet.
    pub fn mark_caught_up(&self) {
        self.caught_up.store(true, Ordering::Relaxed);
    }

    /// Whether every heartbeat the bucket held at start has been read.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// When `device_id` last beat, by the server's time, if it ever did.
    pub fn last_seen(&self, device_id: &DeviceId) -> Option<DateTime<Utc>> {
        self.last_heartbeats
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device_id)
            .copied()
    }

    /// Every device's last heartbeat, as of now.
    pub fn snapshot(&self) -> HashMap<DeviceId, DateTime<Utc>> {
        self.last_heartbeats
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How long without a heartbeat makes a device silent (`monitoring.silent_after_secs`).
    pub fn silent_after(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::from_std(self.silent_after).unwrap_or(chrono::TimeDelta::MAX)
    }

    /// When `device` was last heard from: its last heartbeat, by the server's time, or, when it
    /// never beat, its enrollment (read from `projections`).
    pub fn last_heard(
        &self,
        projections: &Projections,
        device: &DeviceStanding,
    ) -> Result<DateTime<Utc>, ProjectionError> {
        match self.last_seen(&device.device_id) {
            Some(beat) => Ok(beat),
            // A device exists only once enrolled; its first event time is the fallback.
            None => Ok(projections
                .enrolled_key(&device.device_id)?
                .map_or(device.last_seen, |key| key.enrolled_at)),
        }
    }

    /// Where `device` stands at `now` ([`DeviceStanding::state`]), silent or not by its last
    /// heartbeat.
    pub fn state(
        &self,
        projections: &Projections,
        device: &DeviceStanding,
        now: DateTime<Utc>,
    ) -> Result<DeviceState, ProjectionError> {
        Ok(device.state(self.last_heard(projections, device)?, now, self.silent_after()))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(hours: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000, 0).single().expect("a valid time") + chrono::Duration::hours(hours)
    }

    fn device(id: &str) -> DeviceId {
        DeviceId::parse(id).expect("valid")
    }

    #[test]
    fn a_heartbeat_never_moves_back_and_the_snapshot_shows_the_last() {
        let liveness = Liveness::new(HOUR);
        let device_id = device("dev-1");
        assert_eq!(liveness.last_seen(&device_id), None);
        liveness.record(device_id.clone(), at(2));
        liveness.record(device_id.clone(), at(1));
        assert_eq!(liveness.last_seen(&device_id), Some(at(2)));
        liveness.record(device_id.clone(), at(3));
        assert_eq!(liveness.snapshot(), HashMap::from([(device_id, at(3))]));
        assert!(!liveness.caught_up());
        liveness.mark_caught_up();
        assert!(liveness.caught_up());
    }
}
