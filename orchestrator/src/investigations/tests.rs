//! The timeline's entries and the exposure report, on hand-built timelines (no NATS, no sled).

use chrono::TimeZone as _;
use fleetlaps_proto::audit::{PasswordRead, TokenId};
use fleetlaps_proto::event::{
    AuthenticationObserved, PasswordBackedUp, PasswordRotated, RotationReason, sealing_context,
};
use fleetlaps_proto::ids::{AccountName, DeviceName};
use fleetlaps_proto::seal::{EscrowSecretKey, seal};

use super::*;

/// Builds a device's timeline, one event per call, at one-minute steps from a fixed start.
struct History {
    device_id: DeviceId,
    events: Vec<TimelineEvent>,
    escrow: EscrowSecretKey,
}

/// The time of minute `minute` of the test's history.
fn minute(minute: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + minute * 60, 0).unwrap()
}

impl History {
    fn new() -> Self {
        Self {
            device_id: DeviceId::parse("dev-1").unwrap(),
            events: Vec::new(),
            escrow: EscrowSecretKey::generate(),
        }
    }

    /// The next stream sequence: events of other devices come between, so sequences have gaps.
    fn next_sequence(&self) -> u64 {
        self.events.last().map_or(10, |event| event.sequence + 3)
    }

    fn device(&mut self, at: i64, event: Event) -> u64 {
        let sequence = self.next_sequence();
        let position = u64::try_from(self.events.len()).unwrap() + 1;
        let envelope = Envelope::new(self.device_id.clone(), position, minute(at), event);
        self.events.push(TimelineEvent {
            sequence,
            recorded: Recorded::Device(envelope),
        });
        sequence
    }

    fn backed_up(&mut self, at: i64, rotation_id: RotationId) -> u64 {
        let sealed = seal(
            &self.escrow.public_key(),
            b"the-password",
            &sealing_context(&self.device_id, &rotation_id),
        );
        self.device(
            at,
            Event::PasswordBackedUp(PasswordBackedUp {
                rotation_id,
                device_name: DeviceName::parse("host-1").unwrap(),
                account_name: AccountName::parse("lapsadmin").unwrap(),
                account_uid: Some(1001),
                sealed_password: sealed.clone(),
                escrow_public_key: Some(self.escrow.public_key()),
                recovery_sealed_password: Some(sealed),
                expires_at: minute(at) + chrono::Duration::days(30),
                reason: RotationReason::Expired,
            }),
        )
    }

    fn rotated(&mut self, at: i64, rotation_id: RotationId) -> u64 {
        self.device(
            at,
            Event::PasswordRotated(PasswordRotated {
                rotation_id,
                account_name: AccountName::parse("lapsadmin").unwrap(),
                command_id: None,
            }),
        )
    }

    /// A backup and its rotation applied a minute later; returns the rotation's sequence.
    fn rotation(&mut self, at: i64, rotation_id: RotationId) -> u64 {
        self.backed_up(at, rotation_id);
        self.rotated(at + 1, rotation_id)
    }

    fn authenticated(&mut self, at: i64, success: bool, count: u64) -> u64 {
        let observed = AuthenticationObserved {
            account_name: AccountName::parse("lapsadmin").unwrap(),
            service: "sshd".to_owned(),
            remote_host: Some("203.0.113.7".to_owned()),
            tty: None,
            reset_deadline: None,
            count,
            first_at: None,
            last_at: None,
        };
        self.device(
            at,
            if success {
                Event::AuthenticationSucceeded(observed)
            } else {
                Event::AuthenticationFailed(observed)
            },
        )
    }

    fn read(&mut self, at: i64, principal: &str, rotation_ids: Vec<RotationId>) -> u64 {
        let sequence = self.next_sequence();
        let envelope = AuditEnvelope::new(
            minute(at),
            AuditEvent::PasswordRead(PasswordRead {
                principal: principal.to_owned(),
                principal_token_id: Some(TokenId::derived([7; 16])),
                device_id: self.device_id.clone(),
                rotation_ids,
                reason: Some("INC-42".to_owned()),
                client_name: Some("lapsctl".to_owned()),
                client_version: Some("1.0".to_owned()),
                source_address: Some("192.0.2.10".to_owned()),
            }),
        );
        self.events.push(TimelineEvent {
            sequence,
            recorded: Recorded::Orchestrator(envelope),
        });
        sequence
    }

    fn exposure(&self, at: DateTime<Utc>) -> ExposureReport {
        exposure(&self.device_id, &self.events, at)
    }
}

#[test]
fn the_version_valid_between_two_rotations_its_reads_its_uses_and_when_it_was_rotated_away() {
    let mut history = History::new();
    let (first, second) = (RotationId::new(), RotationId::new());
    let first_applied = history.rotation(0, first);
    let early_read = history.read(5, "alice", vec![first]);
    let login = history.authenticated(6, true, 1);
    let failures = history.authenticated(7, false, 4);
    let second_applied = history.rotation(10, second);
    let late_read = history.read(20, "bob", vec![second, first]);
    history.read(21, "carol", vec![second]);
    history.authenticated(22, true, 1);

    let report = history.exposure(minute(8));

    let version = report.version.as_ref().expect("a version was valid");
    assert_eq!(version.rotation_id, first.to_string());
    assert_eq!(version.backed_up_date_time, minute(0));
    assert_eq!(version.backed_up_sequence, first_applied - 3);
    assert_eq!(version.applied_date_time, minute(1));
    assert_eq!(version.applied_sequence, first_applied);
    assert_eq!(version.rotated_away_date_time, Some(minute(11)));
    assert_eq!(version.rotated_away_sequence, Some(second_applied));
    assert_eq!(version.rotated_away_by, Some(second.to_string()));
    assert_eq!(report.pending, None);
    // Every read that returned it, also after it was rotated away (flagged), none of others'.
    assert_eq!(
        report
            .reads
            .iter()
            .map(|read| (read.sequence, read.principal.as_str(), read.before_rotated_away))
            .collect::<Vec<_>>(),
        [(early_read, "alice", true), (late_read, "bob", false)]
    );
    let read = &report.reads[0];
    assert_eq!(read.time, minute(5));
    assert_eq!(read.principal_token_id, Some(TokenId::derived([7; 16]).to_string()));
    assert_eq!(read.reason.as_deref(), Some("INC-42"));
    assert_eq!(read.source_address.as_deref(), Some("192.0.2.10"));
    assert_eq!(read.client_name.as_deref(), Some("lapsctl"));
    // The authentications while it was valid, with their outcomes and counts.
    assert_eq!(
        report
            .uses
            .iter()
            .map(|used| (used.sequence, used.outcome.as_str(), used.count))
            .collect::<Vec<_>>(),
        [(login, "success", 1), (failures, "failure", 4)]
    );
    assert_eq!(report.uses[0].service, "sshd");
    assert_eq!(report.uses[0].remote_host.as_deref(), Some("203.0.113.7"));
    assert!(
        report
            .summary
            .starts_with(&format!("rotation {first} was the password of device dev-1")),
        "{}",
        report.summary
    );
    assert!(
        report
            .summary
            .ends_with(&format!("rotated away at 2027-01-15T08:11:00Z by rotation {second}")),
        "{}",
        report.summary
    );
}

#[test]
fn the_newest_version_is_still_current_and_an_instant_at_its_application_counts() {
    let mut history = History::new();
    let (first, second) = (RotationId::new(), RotationId::new());
    history.rotation(0, first);
    history.rotation(10, second);
    history.authenticated(30, true, 1);

    let at_application = history.exposure(minute(11));
    let much_later = history.exposure(minute(1000));

    for report in [&at_application, &much_later] {
        let version = report.version.as_ref().expect("valid");
        assert_eq!(version.rotation_id, second.to_string());
        assert_eq!(version.rotated_away_date_time, None);
        assert_eq!(version.rotated_away_by, None);
        assert_eq!(report.uses.len(), 1);
        assert!(report.summary.ends_with("still current"), "{}", report.summary);
    }
    // A second before it was applied, the first one still was.
    let just_before = history.exposure(minute(11) - chrono::Duration::seconds(1));
    assert_eq!(just_before.version.expect("valid").rotation_id, first.to_string());
}

#[test]
fn before_any_rotation_none_was_valid() {
    let mut history = History::new();
    let first = RotationId::new();
    history.read(0, "alice", Vec::new());
    history.rotation(10, first);

    let report = history.exposure(minute(5));

    assert_eq!(report.version, None);
    assert_eq!(report.pending, None);
    assert!(report.reads.is_empty() && report.uses.is_empty());
    assert_eq!(
        report.summary,
        "no password version of device dev-1 was applied at or before 2027-01-15T08:05:00Z"
    );
    // An empty history says the same.
    let empty = exposure(&history.device_id, &[], minute(5));
    assert_eq!(empty.version, None);
    assert_eq!(empty.summary, report.summary);
}

#[test]
fn a_backup_not_yet_applied_is_pending_and_said_so() {
    let mut history = History::new();
    let (first, second, never) = (RotationId::new(), RotationId::new(), RotationId::new());
    let first_backup = history.backed_up(0, first);
    history.rotated(10, first);

    // Backed up, not applied until minute 10: none valid at minute 5, the backup pending.
    let report = history.exposure(minute(5));
    assert_eq!(report.version, None);
    let pending = report.pending.as_ref().expect("pending");
    assert_eq!(pending.rotation_id, first.to_string());
    assert_eq!(pending.backed_up_sequence, first_backup);
    assert_eq!(pending.applied_date_time, Some(minute(10)));
    assert!(
        report.summary.contains(&format!(
            "rotation {first} was backed up at 2027-01-15T08:00:00Z but not yet applied (applied at 2027-01-15T08:10:00Z)"
        )),
        "{}",
        report.summary
    );

    // A valid version and a newer backup that was never applied (the account kept the first).
    history.backed_up(20, second);
    history.rotated(21, second);
    history.backed_up(30, never);
    let report = history.exposure(minute(40));
    assert_eq!(report.version.as_ref().expect("valid").rotation_id, second.to_string());
    let pending = report.pending.as_ref().expect("pending");
    assert_eq!(pending.rotation_id, never.to_string());
    assert_eq!(pending.applied_date_time, None);
    assert!(report.summary.contains("still current"), "{}", report.summary);
    assert!(report.summary.ends_with("(never applied)"), "{}", report.summary);
}

#[test]
fn a_version_applied_again_is_not_rotated_away_by_itself() {
    // A re-sent rotation report of the same version (another id) does not end it.
    let mut history = History::new();
    let (first, second) = (RotationId::new(), RotationId::new());
    history.rotation(0, first);
    history.rotated(3, first);
    let login = history.authenticated(4, true, 1);
    history.rotation(10, second);

    let report = history.exposure(minute(2));

    let version = report.version.expect("valid");
    assert_eq!(version.rotation_id, first.to_string());
    assert_eq!(version.rotated_away_by, Some(second.to_string()));
    assert_eq!(
        report.uses.iter().map(|used| used.sequence).collect::<Vec<_>>(),
        [login]
    );
}

#[test]
fn entries_name_their_actor_and_never_hold_a_sealed_password() {
    let mut history = History::new();
    let rotation_id = RotationId::new();
    history.backed_up(0, rotation_id);
    history.read(1, "alice", vec![rotation_id]);

    let backup = history.events[0].entry(&history.device_id);
    let read = history.events[1].entry(&history.device_id);

    assert_eq!(backup.kind, "password_backed_up");
    assert_eq!(backup.actor, "device");
    assert_eq!(backup.fields["rotation_id"], rotation_id.to_string());
    assert_eq!(backup.fields["with_recovery_copy"], true);
    assert_eq!(
        backup.summary,
        format!("password backed up: rotation {rotation_id} (expired)")
    );
    let text = serde_json::to_string(&backup).unwrap();
    assert!(!text.contains("sealed_password"), "{text}");
    let Recorded::Device(envelope) = &history.events[0].recorded else {
        panic!("a device event")
    };
    let Event::PasswordBackedUp(body) = &envelope.event else {
        panic!("a backup")
    };
    let ciphertext = serde_json::to_value(&body.sealed_password).unwrap().to_string();
    let ciphertext = ciphertext.trim_matches('"');
    assert!(!text.contains(ciphertext), "{text}");

    assert_eq!(read.kind, "password_read");
    assert_eq!(read.actor, "alice");
    assert_eq!(read.actor_token_id, Some(TokenId::derived([7; 16]).to_string()));
    assert_eq!(read.fields["rotation_ids"], json!([rotation_id]));
    assert_eq!(read.fields["reason"], "INC-42");
    assert_eq!(read.fields["source_address"], "192.0.2.10");
    assert_eq!(
        read.summary,
        format!("password read by alice for \"INC-42\" from 192.0.2.10: rotations {rotation_id}")
    );
}

#[test]
fn a_wave_shows_the_device_s_own_command() {
    use fleetlaps_proto::breach::{BreachCommand, BreachId, BreachWaveCommanded};
    use fleetlaps_proto::command::CommandId;
    let device_id = DeviceId::parse("dev-1").unwrap();
    let (breach_id, mine, theirs) = (BreachId::new(), CommandId::new(), CommandId::new());
    let wave = TimelineEvent {
        sequence: 9,
        recorded: Recorded::Orchestrator(AuditEnvelope::new(
            minute(0),
            AuditEvent::BreachWaveCommanded(BreachWaveCommanded {
                breach_id,
                commands: vec![
                    BreachCommand {
                        device_id: DeviceId::parse("dev-0").unwrap(),
                        command_id: theirs,
                        covered_by: None,
                    },
                    BreachCommand {
                        device_id: device_id.clone(),
                        command_id: mine,
                        covered_by: None,
                    },
                ],
            }),
        )),
    };

    let entry = wave.entry(&device_id);

    assert_eq!(entry.actor, "orchestrator");
    assert_eq!(entry.fields["command_id"], mine.to_string());
    assert_eq!(
        entry.summary,
        format!("breach {breach_id} commanded a rotation: command {mine}")
    );
}
