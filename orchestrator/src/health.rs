//! Whether the orchestrator may act on what its projections say, and whether its consumer works.
//!
//! Authority: the projections hold the tokens, enrollment tokens and rotation requests the API
//! trusts. After a restart they may be behind the stream (a rebuild replays it from the start),
//! and behind means stale: a token revoked on the stream is still usable in projections that have
//! not folded the revocation yet. So until the projections reach the stream's last sequence as it
//! was at start (the *start horizon*), [`Health::authority`] refuses, and the API answers 503 with
//! `Retry-After` instead of trusting them. Once reached, authority stays: what arrives later is
//! folded in order like any other change.
//!
//! Consumer: a batch the projections cannot take (a full disk, a sled error) is not
//! acknowledged and is retried; meanwhile the API keeps serving and `/healthz` and
//! `fleetlaps_consumer_healthy` say the consumer is failing, with the last error.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics::Metrics;
use crate::projection::Projections;

/// The projections have not yet reached the stream's position at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the projections are catching up with the history (at {applied} of {horizon}); retry shortly")]
pub struct CatchingUp {
    /// The last stream sequence folded in.
    pub applied: u64,
    /// The stream's last sequence when the orchestrator started.
    pub horizon: u64,
}

/// The orchestrator's health, shared by the consumer (which reports) and the API (which asks).
pub struct Health {
    /// The stream's last sequence when the orchestrator started.
    start_horizon: u64,
    /// Set once the projections reached [`Self::start_horizon`]; never cleared.
    caught_up: AtomicBool,
    /// The last error of the consumer, while it fails; `None` once a batch succeeds again.
    consumer_failure: Mutex<Option<String>>,
    /// Where the applied position is read.
    projections: Projections,
    /// `fleetlaps_projections_caught_up` and `fleetlaps_consumer_healthy`.
    metrics: Metrics,
}

/// What `/healthz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The last stream sequence folded in.
    pub applied: u64,
    /// The stream's last sequence when the orchestrator started.
    pub start_horizon: u64,
    /// Whether the projections reached the start horizon.
    pub caught_up: bool,
    /// The consumer's last error, while it fails.
    pub consumer_failure: Option<String>,
}

impl HealthReport {
    /// `ok`, `catching_up` or `unhealthy` (the consumer fails).
    pub fn status(&self) -> &'static str {
        if self.consumer_failure.is_some() {
            "unhealthy"
        } else if !self.caught_up {
            "catching_up"
        } else {
            "ok"
        }
    }
}

impl Health {
    /// Health for projections that must reach `start_horizon` (the stream's last sequence at
    /// start; 0 for an empty stream) before they are trusted.
    pub fn new(start_horizon: u64, projections: Projections, metrics: Metrics) -> Self {
        let health = Self {
            start_horizon,
            caught_up: AtomicBool::new(false),
            consumer_failure: Mutex::new(None),
            projections,
            metrics,
        };
        health.metrics.consumer_healthy.set(1);
        // Sets the flag and the metric when the projections are already there.
        let _ = health.authority();
        health
    }

    /// Whether the projections may be trusted for authority (tokens, enrollment tokens, the
    /// rotation throttle): only once they have reached the start horizon.
    pub fn authority(&self) -> Result<(), CatchingUp> {
        if self.caught_up.load(Ordering::Acquire) {
            return Ok(());
        }
        let applied = self.projections.applied_sequence();
        if applied >= self.start_horizon {
            if !self.caught_up.swap(true, Ordering::AcqRel) {
                tracing::info!(
                    applied,
                    horizon = self.start_horizon,
                    "projections caught up: tokens are trusted"
                );
            }
            self.metrics.projections_caught_up.set(1);
            Ok(())
        } else {
            Err(CatchingUp {
                applied,
                horizon: self.start_horizon,
            })
        }
    }

    /// The consumer failed on a batch and will retry it.
    pub fn consumer_failed(&self, error: &dyn std::error::Error) {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        *self.lock_failure() = Some(message);
        self.metrics.consumer_healthy.set(0);
    }

    /// The consumer folded a batch.
    pub fn consumer_succeeded(&self) {
        let mut failure = self.lock_failure();
        if failure.take().is_some() {
            tracing::info!("the consumer folds again");
        }
        self.metrics.consumer_healthy.set(1);
    }

    /// The consumer's last error, while it fails.
    pub fn consumer_failing(&self) -> Option<String> {
        self.lock_failure().clone()
    }

    /// The state `/healthz` reports.
    pub fn report(&self) -> HealthReport {
        let caught_up = self.authority().is_ok();
        HealthReport {
            applied: self.projections.applied_sequence(),
            start_horizon: self.start_horizon,
            caught_up,
            consumer_failure: self.consumer_failing(),
        }
    }

    fn lock_failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic while holding it cannot leave a half-written Option.
        self.consumer_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(horizon: u64) -> (Health, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let projections = Projections::open(dir.path()).expect("projections open");
        (Health::new(horizon, projections, Metrics::new()), dir)
    }

    #[test]
    fn an_empty_stream_gives_authority_at_once() {
        let (health, _dir) = health(0);
        assert_eq!(health.authority(), Ok(()));
        assert_eq!(health.report().status(), "ok");
        assert_eq!(health.metrics.projections_caught_up.get(), 1);
    }

    #[test]
    fn projections_behind_the_start_horizon_have_no_authority() {
        let (health, _dir) = health(5);
        assert_eq!(health.authority(), Err(CatchingUp { applied: 0, horizon: 5 }));
        assert_eq!(health.report().status(), "catching_up");
        assert_eq!(health.metrics.projections_caught_up.get(), 0);
    }

    #[test]
    fn a_consumer_failure_is_reported_with_its_causes_until_a_batch_succeeds() {
        let (health, _dir) = health(0);
        let error = std::io::Error::other("No space left on device");
        let wrapped = crate::projection::ProjectionError::from(sled::Error::Io(error));
        health.consumer_failed(&wrapped);
        let report = health.report();
        assert_eq!(report.status(), "unhealthy");
        assert!(
            report
                .consumer_failure
                .as_deref()
                .is_some_and(|failure| failure.contains("No space left on device")),
            "{report:?}"
        );
        assert_eq!(health.metrics.consumer_healthy.get(), 0);
        health.consumer_succeeded();
        assert_eq!(health.report().status(), "ok");
        assert_eq!(health.metrics.consumer_healthy.get(), 1);
    }
}
