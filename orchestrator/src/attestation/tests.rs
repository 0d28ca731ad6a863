use chrono::Utc;
use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, SignaturesVerified};

use super::*;

/// A message of the history: its sequence, on a device's subject, with a signature header.
fn message(sequence: u64, payload: &[u8]) -> StreamMessage<'_> {
    StreamMessage {
        sequence,
        subject: "laps.events.dev-1.authentication_failed",
        published: Utc::now(),
        payload,
        signature: Some("sig"),
    }
}

fn attestation(body: SignaturesVerified) -> Vec<u8> {
    AuditEnvelope::new(Utc::now(), AuditEvent::SignaturesVerified(body)).to_json()
}

fn digest_of(messages: &[StreamMessage<'_>]) -> String {
    let mut digest = MessagesDigest::default();
    for message in messages {
        digest.add(message);
    }
    digest.finish()
}

#[test]
fn a_window_attests_its_run_once_due_with_the_refused_left_out_and_starts_a_new_one() {
    let payloads: Vec<Vec<u8>> = (0..5).map(|n| format!("payload {n}").into_bytes()).collect();
    let messages: Vec<_> = payloads.iter().zip(11..).map(|(p, s)| message(s, p)).collect();
    let mut window = Window::default();
    for message in &messages[..3] {
        window.add(message, message.sequence == 12);
        assert_eq!(window.take_due(4), [], "not due before four messages");
    }
    window.add(&messages[3], false);

    let due = window.take_due(4);

    assert_eq!(
        due,
        [SignaturesVerified {
            from_sequence: 11,
            through_sequence: 14,
            messages_sha256: digest_of(&messages[..4]),
            not_verified: vec![12],
        }]
    );
    window.add(&messages[4], false);
    assert_eq!(window.take_due(1)[0].from_sequence, 15, "the next run begins after it");
    window.add(&messages[4], false);
    window.reset();
    assert_eq!(window.take_due(1), [], "a reset run attests nothing");
}

#[test]
fn a_run_that_refused_as_many_as_one_attestation_carries_is_closed_and_the_next_refusal_begins_another() {
    let max = SignaturesVerified::MAX_NOT_VERIFIED as u64;
    let mut window = Window::default();
    for sequence in 1..max {
        window.add(&message(sequence, b"x"), true);
        assert_eq!(window.take_due(u64::MAX), []);
    }
    // In one batch: the last refusal the run can carry, a message verified, two more refused.
    window.add(&message(max, b"x"), true);
    window.add(&message(max + 1, b"x"), false);
    window.add(&message(max + 2, b"x"), true);
    window.add(&message(max + 3, b"x"), true);

    let due = window.take_due(u64::MAX);

    let runs: Vec<_> = due
        .iter()
        .map(|run| (run.from_sequence, run.through_sequence, run.not_verified.len()))
        .collect();
    assert_eq!(runs, [(1, max + 1, SignaturesVerified::MAX_NOT_VERIFIED)]);
    window.add(&message(max + 4, b"x"), false);
    let next = window.take_due(1);
    assert_eq!(next[0].from_sequence, max + 2);
    assert_eq!(next[0].not_verified, [max + 2, max + 3]);
}

#[test]
fn the_digest_tells_apart_a_changed_payload_signature_subject_or_sequence() {
    let base = digest_of(&[message(1, b"ab")]);
    let mut other_signature = message(1, b"ab");
    other_signature.signature = Some("sig2");
    let mut no_signature = message(1, b"ab");
    no_signature.signature = None;
    let mut other_subject = message(1, b"ab");
    other_subject.subject = "laps.events.dev-2.authentication_failed";
    for changed in [
        digest_of(&[message(1, b"ac")]),
        digest_of(&[message(2, b"ab")]),
        digest_of(&[other_signature]),
        digest_of(&[no_signature]),
        digest_of(&[other_subject]),
        digest_of(&[message(1, b"a"), message(2, b"b")]),
    ] {
        assert_ne!(changed, base);
    }
    assert_eq!(digest_of(&[message(1, b"ab")]), base);
}

fn body(from_sequence: u64, through_sequence: u64, not_verified: Vec<u64>) -> SignaturesVerified {
    SignaturesVerified {
        from_sequence,
        through_sequence,
        messages_sha256: "0".repeat(64),
        not_verified,
    }
}

#[test]
fn a_replay_uses_only_well_formed_attestations_of_runs_before_their_own_message_and_none_overlapping() {
    let kept = [
        (10, attestation(body(1, 9, vec![3]))),
        (20, attestation(body(11, 19, vec![]))),
    ];
    let refused = [
        // Covers itself.
        (30, attestation(body(21, 30, vec![]))),
        // Ends before it begins.
        (31, attestation(body(25, 24, vec![]))),
        // Refuses outside its run, or out of order.
        (32, attestation(body(21, 29, vec![40]))),
        (33, attestation(body(21, 29, vec![25, 22]))),
        // Overlaps the run kept before it.
        (34, attestation(body(15, 29, vec![]))),
        // Past the replay's end.
        (60, attestation(body(40, 50, vec![]))),
        // Not an attestation at all.
        (35, b"{}".to_vec()),
    ];
    let attestations = Attestations::from_history(
        kept.iter()
            .chain(&refused)
            .map(|(sequence, payload)| (*sequence, payload.as_slice())),
        59,
    );

    let attested: Vec<u64> = (1..=60).filter(|sequence| attestations.attested(*sequence)).collect();
    let expected: Vec<u64> = (1..=9).filter(|s| *s != 3).chain(11..=19).collect();
    assert_eq!(attested, expected);
    let own: Vec<u64> = attestations.sequences().collect();
    assert!(own.contains(&10) && own.contains(&20));
    assert!(!own.contains(&30) && !own.contains(&34));
    let too_many = attestation(body(1, 5_000, (1..=1_001).collect()));
    assert_eq!(
        Attestations::from_history([(5_001, too_many.as_slice())], 6_000)
            .sequences()
            .count(),
        0
    );
}

#[test]
fn the_digest_check_holds_over_the_attested_messages_and_breaks_on_one_changed() {
    let payloads: Vec<Vec<u8>> = (0..8).map(|n| format!("event {n}").into_bytes()).collect();
    let messages: Vec<_> = payloads.iter().zip(1..).map(|(p, s)| message(s, p)).collect();
    let run = |from: u64, through: u64| SignaturesVerified {
        from_sequence: from,
        through_sequence: through,
        messages_sha256: digest_of(&messages[from as usize - 1..through as usize]),
        not_verified: vec![],
    };
    // Two runs, 2 to 3 and 5 to 6, with a gap and attestations of their own at 4 and 7.
    let first = attestation(run(2, 3));
    let second = attestation(run(5, 6));
    let attestations = Attestations::from_history([(4, first.as_slice()), (7, second.as_slice())], 8);

    let mut check = attestations.digest_check();
    for message in &messages {
        check.add(message).expect("the same messages");
    }
    check.finish().expect("every run read");

    // A message of the second run changed: found at its end.
    let mut check = attestations.digest_check();
    let changed = message(6, b"forged");
    for message in messages.iter().take(5).chain([&changed]) {
        let added = check.add(message);
        if message.sequence == 6 {
            assert_eq!(
                added,
                Err(Broken::Digest {
                    sequence: 7,
                    from_sequence: 5,
                    through_sequence: 6
                })
            );
        } else {
            added.expect("as attested");
        }
    }
    // A message missing from a run: the run ends past its last, still found.
    let mut check = attestations.digest_check();
    for message in messages.iter().filter(|message| message.sequence != 3) {
        if message.sequence == 4 {
            assert!(check.add(message).is_err(), "the first run lacks message 3");
            break;
        }
        check.add(message).expect("before the end of the run");
    }
    // The history ending before a run's end.
    let mut check = attestations.digest_check();
    for message in &messages[..4] {
        check.add(message).expect("first run whole");
    }
    assert!(check.finish().is_err());
}
