use super::*;

fn minutes(n: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::minutes(n)
}

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
        .expect("a time")
        .with_timezone(&Utc)
}

fn windows(detectors: &[(Detector, u64, i64)], cooldown: i64) -> Windows {
    Windows::new(WindowSettings {
        thresholds: detectors
            .iter()
            .map(|&(detector, at_least, window)| {
                (
                    detector,
                    Threshold {
                        at_least,
                        window: minutes(window),
                    },
                )
            })
            .collect(),
        cooldown: minutes(cooldown),
    })
}

fn login(device_id: &DeviceId, at: DateTime<Utc>, succeeded: bool, count: u64) -> Observation {
    Observation::Authentication {
        event_id: EventId::new(),
        device_id: device_id.clone(),
        at,
        succeeded,
        count,
    }
}

fn devices(n: usize) -> Vec<DeviceId> {
    (0..n).map(|_| DeviceId::new_random()).collect()
}

#[test]
fn lateral_movement_fires_at_its_device_threshold_within_the_window_only() {
    let fleet = devices(3);
    let mut below = windows(&[(Detector::LateralMovement, 3, 10)], 60);
    // Three devices, but the first falls out of the 10-minute window before the third.
    below.observe(login(&fleet[0], start(), true, 1));
    below.observe(login(&fleet[1], start() + minutes(5), true, 1));
    below.observe(login(&fleet[1], start() + minutes(6), true, 1));
    below.observe(login(&fleet[2], start() + minutes(11), true, 1));
    assert!(below.take_due(start() + minutes(11)).is_empty());

    let mut at = windows(&[(Detector::LateralMovement, 3, 10)], 60);
    for (n, device_id) in fleet.iter().enumerate() {
        at.observe(login(device_id, start() + minutes(n as i64), true, 1));
    }
    let found = at.take_due(start() + minutes(3));
    assert_eq!(found.len(), 1, "{found:?}");
    let detection = &found[0];
    assert_eq!(detection.detector, Detector::LateralMovement);
    assert_eq!(detection.device_count, 3);
    assert_eq!(
        detection.device_ids.iter().collect::<BTreeSet<_>>(),
        fleet.iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(
        (detection.window_start, detection.window_end),
        (start(), start() + minutes(2))
    );
    assert_eq!(detection.evidence_event_ids.len(), 3);
    assert_eq!(detection.breach_id, None);
}

#[test]
fn a_detection_silences_its_evidence_and_the_cooldown_after_it() {
    let fleet = devices(6);
    let mut windows = windows(&[(Detector::LateralMovement, 3, 10)], 30);
    for (n, device_id) in fleet[..3].iter().enumerate() {
        windows.observe(login(device_id, start() + minutes(n as i64), true, 1));
    }
    assert_eq!(windows.take_due(start()).len(), 1);
    // Three more devices within the cool-down: nothing.
    for (n, device_id) in fleet[3..].iter().enumerate() {
        windows.observe(login(device_id, start() + minutes(10 + n as i64), true, 1));
    }
    assert!(windows.take_due(start()).is_empty());
    // After it: new evidence counts again, and only the new.
    for (n, device_id) in fleet[3..].iter().enumerate() {
        windows.observe(login(device_id, start() + minutes(40 + n as i64), true, 1));
    }
    let found = windows.take_due(start());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].device_ids.len(), 3);
    assert!(found[0].window_start > start() + minutes(32));
}

#[test]
fn repeated_failures_count_aggregated_reports_per_device() {
    let fleet = devices(2);
    let mut windows = windows(&[(Detector::RepeatedFailures, 10, 10)], 60);
    windows.observe(login(&fleet[0], start(), false, 4));
    // Another device's failures do not add up with these.
    windows.observe(login(&fleet[1], start() + minutes(1), false, 5));
    windows.observe(login(&fleet[0], start() + minutes(2), false, 5));
    assert!(windows.take_due(start()).is_empty());
    windows.observe(login(&fleet[0], start() + minutes(3), false, 1));
    let found = windows.take_due(start());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].device_ids, vec![fleet[0].clone()]);
    assert_eq!(found[0].authentication_count, 10);
    assert_eq!(found[0].evidence_event_ids.len(), 3);
    // Successes do not count as failures.
    windows.observe(login(&fleet[1], start() + minutes(4), true, 100));
    assert!(windows.take_due(start()).is_empty());
}

#[test]
fn read_then_spread_needs_the_read_before_the_authentications() {
    let fleet = devices(4);
    let read = |at| Observation::PasswordRead {
        event_id: EventId::new(),
        device_id: fleet[0].clone(),
        principal: "helpdesk".to_owned(),
        at,
    };
    let mut windows = windows(&[(Detector::ReadThenSpread, 3, 30)], 60);
    // Authentications before the read do not count.
    windows.observe(login(&fleet[1], start(), true, 1));
    windows.observe(login(&fleet[2], start() + minutes(1), true, 1));
    windows.observe(read(start() + minutes(2)));
    windows.observe(login(&fleet[1], start() + minutes(3), true, 1));
    windows.observe(login(&fleet[2], start() + minutes(4), true, 1));
    assert!(windows.take_due(start()).is_empty());
    windows.observe(login(&fleet[3], start() + minutes(5), true, 1));
    let found = windows.take_due(start());
    assert_eq!(found.len(), 1, "{found:?}");
    let detection = &found[0];
    assert_eq!(detection.principal.as_deref(), Some("helpdesk"));
    // The read's device and the three authenticated on.
    assert_eq!(detection.device_count, 4);
    assert_eq!(detection.evidence_event_ids.len(), 4);
    assert_eq!(detection.window_start, start() + minutes(2));
}

#[test]
fn a_replay_meets_the_recorded_detection_and_acts_on_nothing() {
    let fleet = devices(3);
    let observations: Vec<Observation> = fleet
        .iter()
        .enumerate()
        .map(|(n, device_id)| login(device_id, start() + minutes(n as i64), true, 1))
        .collect();
    let mut live = windows(&[(Detector::LateralMovement, 3, 10)], 60);
    for observation in observations.clone() {
        live.observe(observation);
    }
    let recorded = live.take_due(start()).pop().expect("a detection");

    // The same stream folded again, the recorded detection after its evidence.
    let mut replay = windows(&[(Detector::LateralMovement, 3, 10)], 60);
    for observation in observations.clone() {
        replay.observe(observation);
    }
    replay.observe(Observation::Detected(recorded.clone()));
    assert!(replay.take_due(start()).is_empty());

    // The same candidate, with the same id: a declared breach naming it drops it too.
    let mut declared = windows(&[(Detector::LateralMovement, 3, 10)], 60);
    for observation in observations {
        declared.observe(observation);
    }
    declared.observe(Observation::Declared(recorded.detection_id));
    assert!(declared.take_due(start()).is_empty());

    // Seeded with the detection (a restart): the same devices again within the cool-down count
    // for nothing.
    let mut restarted = windows(&[(Detector::LateralMovement, 3, 10)], 60);
    restarted.observe(Observation::Detected(recorded));
    for (n, device_id) in fleet.iter().enumerate() {
        restarted.observe(login(device_id, start() + minutes(5 + n as i64), true, 1));
    }
    assert!(restarted.take_due(start()).is_empty());
}

#[test]
fn old_evidence_is_not_acted_on_and_an_off_detector_watches_nothing() {
    let fleet = devices(3);
    let mut windows = windows(&[(Detector::LateralMovement, 3, 10)], 60);
    for (n, device_id) in fleet.iter().enumerate() {
        windows.observe(login(device_id, start() + minutes(n as i64), true, 1));
        windows.observe(login(device_id, start() + minutes(n as i64), false, 1_000));
    }
    assert!(windows.take_due(start() + chrono::TimeDelta::days(2)).is_empty());
    assert!(windows.failures.is_empty(), "repeated failures is off");
}
