//! Failed authentications as the managed account, aggregated so that a flood of them (a password
//! guesser, a misconfigured script) becomes a bounded number of events.
//!
//! The first failure after a quiet spell is reported at once (count 1), and opens a window of
//! `post_authentication.failure_report_interval_secs`. Failures inside the window are only
//! counted; when it ends they are reported in one event with their count and the times of the
//! first and last, and a failure after its end both reports them and opens the next window. So
//! each window sends at most two events, whatever the number of failures, and the counts of the
//! events add up to the number of failures.
//!
//! The window is persisted (under `p/failures`, see [`crate::postauth`]) together with the event
//! that reports from it, so a restart neither loses nor repeats a count.

use chrono::{DateTime, Utc};
use fleetlaps_proto::event::AuthenticationObserved;
use fleetlaps_proto::ids::AccountName;
use serde::{Deserialize, Serialize};

/// Failures counted and not yet reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureWindow {
    /// When the window opened; it ends `interval` later.
    pub opened_at: DateTime<Utc>,
    /// Failures since it opened that no event has reported yet.
    pub count: u64,
    /// The first of them.
    pub first_at: Option<DateTime<Utc>>,
    /// The last of them.
    pub last_at: Option<DateTime<Utc>>,
    /// PAM's account of the last of them.
    pub last: Option<FailedAuthentication>,
}

/// What PAM said about one failed authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedAuthentication {
    /// The managed account.
    pub account_name: AccountName,
    /// `PAM_SERVICE`.
    pub service: String,
    /// `PAM_RHOST`.
    pub remote_host: Option<String>,
    /// `PAM_TTY`.
    pub tty: Option<String>,
}

/// The window after one more failure at `now`, and the event body to report, if one is due.
pub fn on_failure(
    window: Option<FailureWindow>,
    failure: FailedAuthentication,
    now: DateTime<Utc>,
    interval: chrono::Duration,
) -> (Option<FailureWindow>, Option<AuthenticationObserved>) {
    match window {
        Some(mut window) if now < window.opened_at + interval => {
            window.count = window.count.saturating_add(1);
            window.first_at = window.first_at.or(Some(now));
            window.last_at = Some(now);
            window.last = Some(failure);
            (Some(window), None)
        }
        // The window has ended: this failure reports what it counted, with itself, and opens the
        // next window.
        Some(window) => {
            let report = observed(
                &failure,
                window.count.saturating_add(1),
                window.first_at.or(Some(now)),
                Some(now),
            );
            (Some(opened(now)), Some(report))
        }
        // A quiet spell: reported at once.
        None => (Some(opened(now)), Some(observed(&failure, 1, None, None))),
    }
}

/// The window at `now` with no new failure: closed once it has ended, with the event body that
/// reports what it counted, if anything.
pub fn on_tick(
    window: Option<FailureWindow>,
    now: DateTime<Utc>,
    interval: chrono::Duration,
) -> (Option<FailureWindow>, Option<AuthenticationObserved>) {
    match window {
        Some(window) if now >= window.opened_at + interval => {
            let report = window
                .last
                .as_ref()
                .filter(|_| window.count > 0)
                .map(|last| observed(last, window.count, window.first_at, window.last_at));
            (None, report)
        }
        window => (window, None),
    }
}

/// When `window` ends, if one is open.
pub fn ends_at(window: Option<&FailureWindow>, interval: chrono::Duration) -> Option<DateTime<Utc>> {
    window.map(|window| window.opened_at + interval)
}

fn opened(now: DateTime<Utc>) -> FailureWindow {
    FailureWindow {
        opened_at: now,
        count: 0,
        first_at: None,
        last_at: None,
        last: None,
    }
}

fn observed(
    failure: &FailedAuthentication,
    count: u64,
    first_at: Option<DateTime<Utc>>,
    last_at: Option<DateTime<Utc>>,
) -> AuthenticationObserved {
    AuthenticationObserved {
        account_name: failure.account_name.clone(),
        service: failure.service.clone(),
        remote_host: failure.remote_host.clone(),
        tty: failure.tty.clone(),
        reset_deadline: None,
        count,
        first_at,
        last_at,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn failure() -> FailedAuthentication {
        FailedAuthentication {
            account_name: AccountName::parse("lapsadmin").unwrap(),
            service: "sshd".to_owned(),
            remote_host: Some("203.0.113.9".to_owned()),
            tty: None,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_flood_becomes_at_most_two_events_a_window_whose_counts_add_up() {
        let interval = chrono::Duration::seconds(60);
        let mut window = None;
        let mut reports = Vec::new();
        // 10,000 failures over 150 seconds, then the loop wakes after the last window ended.
        for index in 0..10_000i64 {
            let (next, report) = on_failure(window, failure(), at(index * 150 / 10_000), interval);
            window = next;
            reports.extend(report);
        }
        let (window, report) = on_tick(window, at(300), interval);
        reports.extend(report);

        assert_eq!(window, None, "closed");
        assert!(reports.len() <= 2 * 3, "{} events for three windows", reports.len());
        assert_eq!(reports.iter().map(|report| report.count).sum::<u64>(), 10_000);
        assert_eq!(reports[0].count, 1, "the first failure is reported at once");
        assert!(reports.iter().all(|report| report.first_at <= report.last_at));
    }

    #[test]
    fn a_window_ends_quietly_when_nothing_followed_its_first_failure() {
        let interval = chrono::Duration::seconds(60);
        let (window, report) = on_failure(None, failure(), at(0), interval);
        assert_eq!(report.map(|report| report.count), Some(1));
        assert_eq!(ends_at(window.as_ref(), interval), Some(at(60)));
        let (still_open, nothing) = on_tick(window.clone(), at(59), interval);
        assert_eq!((still_open, nothing), (window.clone(), None));
        let (closed, nothing) = on_tick(window, at(60), interval);
        assert_eq!((closed, nothing), (None, None));
    }

    #[test]
    fn failures_inside_a_window_are_reported_when_it_ends_with_their_times() {
        let interval = chrono::Duration::seconds(60);
        let (window, _) = on_failure(None, failure(), at(0), interval);
        let (window, none) = on_failure(window, failure(), at(10), interval);
        assert_eq!(none, None);
        let (window, none) = on_failure(window, failure(), at(20), interval);
        assert_eq!(none, None);
        let (window, report) = on_tick(window, at(61), interval);
        let report = report.expect("two counted");
        assert_eq!(window, None);
        assert_eq!(
            (report.count, report.first_at, report.last_at),
            (2, Some(at(10)), Some(at(20)))
        );
        // A failure after a window ended reports what it counted, itself included.
        let (window, _) = on_failure(None, failure(), at(100), interval);
        let (window, _) = on_failure(window, failure(), at(110), interval);
        let (window, report) = on_failure(window, failure(), at(170), interval);
        let report = report.expect("due");
        assert_eq!(
            (report.count, report.first_at, report.last_at),
            (2, Some(at(110)), Some(at(170)))
        );
        assert_eq!(
            window.map(|window| (window.opened_at, window.count)),
            Some((at(170), 0))
        );
    }
}
