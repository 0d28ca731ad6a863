//! Investigations of one device, with a real orchestrator and agent: its timeline (every event of
//! the device and every orchestrator event about it, in the history's order) and the exposure of
//! its password at an instant, through the API and `lapsctl`, for `Audit.Read.All` only.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use fleetlaps_orchestrator::bus::{DeviceEvents, History};
use fleetlaps_proto::api::{
    ExposedVersion, ExposureRead, ExposureReport, ExposureUse, ODataCollection, REASON_HEADER, TimelineEntry,
};
use fleetlaps_proto::audit::AuditKind;
use fleetlaps_proto::control::{AuthenticationReport, ControlRequest, ControlResponse};
use fleetlaps_proto::event::{AuthenticationOutcome, EventKind};
use fleetlaps_proto::ids::DeviceId;
use fleetlaps_proto::subject;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::apps::{ADMIN_TOKEN, MANAGED_ACCOUNT, OPERATOR_TOKEN, READ_TOKEN, TestAgent, TestOrchestrator};
use crate::harness::{TestNats, wait_until};

/// How long the steps of the scripted history may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The device's timeline through the API, every page (of three entries), read with `token`.
pub(crate) async fn timeline(orchestrator: &TestOrchestrator, token: &str, device_id: &DeviceId) -> Vec<TimelineEntry> {
    let mut entries = Vec::new();
    let mut path = format!("/v1.0/fleetlaps/devices/{device_id}/timeline?$top=3");
    loop {
        let answer = orchestrator.get(&path, Some(token)).await;
        assert_eq!(answer.status(), StatusCode::OK);
        let page: ODataCollection<TimelineEntry> = answer.json().await.expect("a timeline page");
        entries.extend(page.value);
        match page.next_link {
            Some(next) => path = orchestrator.next_path(&next),
            None => return entries,
        }
    }
}

/// Waits until the device's timeline holds `count` entries of `kind`, and returns it.
async fn wait_for_timeline(
    orchestrator: &TestOrchestrator,
    token: &str,
    device_id: &DeviceId,
    kind: &str,
    count: usize,
) -> Vec<TimelineEntry> {
    wait_until(&format!("the timeline holds {count} {kind}"), TIMEOUT, || async {
        let entries = timeline(orchestrator, token, device_id).await;
        (entries.iter().filter(|entry| entry.kind == kind).count() >= count).then_some(entries)
    })
    .await
}

/// The exposure report through the API.
async fn exposure(orchestrator: &TestOrchestrator, token: &str, device_id: &DeviceId, at: &str) -> reqwest::Response {
    let at = at.replace('+', "%2B");
    orchestrator
        .get(
            &format!("/v1.0/fleetlaps/devices/{device_id}/exposure?at={at}"),
            Some(token),
        )
        .await
}

/// An API error's status and message.
async fn error(answer: reqwest::Response) -> (StatusCode, String) {
    let status = answer.status();
    let body: Value = answer.json().await.expect("an OData error");
    (status, body["error"]["message"].as_str().expect("a message").to_owned())
}

/// `lapsctl <args>`, which must succeed; its standard output.
async fn lapsctl(orchestrator: &TestOrchestrator, args: &[&str]) -> String {
    let output = orchestrator.lapsctl(args).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// A string field of an entry.
fn field<'a>(entry: &'a TimelineEntry, name: &str) -> &'a str {
    entry.fields[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {entry:?}"))
}

/// The values of the "Name : value" lines named `name` in a lapsctl table.
fn table_values(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|line| {
            line.split_once(" : ")
                .or_else(|| line.strip_suffix(" :").map(|n| (n, "")))
        })
        .filter(|(line_name, _)| line_name.trim_end() == name)
        .map(|(_, value)| value.to_owned())
        .collect()
}

/// RFC 3339 to the second, as summaries and tables print times.
fn seconds(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[tokio::test]
async fn a_device_s_timeline_and_the_exposure_of_its_password_between_two_rotations() {
    // Arrange: an orchestrator, an investigator who may read the history only, and a device.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let (auditor, _) = orchestrator
        .create_token(ADMIN_TOKEN, json!({"name": "auditor", "scopes": ["Audit.Read.All"]}))
        .await;
    let (reader, reader_id) = orchestrator
        .create_token(
            ADMIN_TOKEN,
            json!({"name": "alice", "scopes": ["DeviceLocalCredential.Read.All"]}),
        )
        .await;
    let (soc, _) = orchestrator
        .create_token(ADMIN_TOKEN, json!({"name": "soc", "scopes": ["Breach.Declare"]}))
        .await;
    let before_everything = Utc::now();
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let device_id = agent.device_id.clone();

    // Act: a scripted history, each step on the timeline before the next.
    // 1. The first rotation, at start.
    wait_for_timeline(&orchestrator, &auditor, &device_id, "password_rotated", 1).await;
    // 2. Tags.
    let tagged = orchestrator
        .request(
            reqwest::Method::PUT,
            &format!("/v1.0/fleetlaps/devices/{device_id}/tags"),
            ADMIN_TOKEN,
            Some(json!({"tags": ["site:paris"]})),
        )
        .await;
    assert_eq!(tagged.status(), StatusCode::OK);
    // 3. A password read by alice, with a reason.
    let read = orchestrator
        .http
        .get(format!(
            "{}/v1.0/directory/deviceLocalCredentials/{device_id}?$select=credentials",
            orchestrator.base_url
        ))
        .bearer_auth(&reader)
        .header(REASON_HEADER, "INC-1234")
        .send()
        .await
        .expect("the API answers");
    assert_eq!(read.status(), StatusCode::OK);
    wait_for_timeline(&orchestrator, &auditor, &device_id, "password_read", 1).await;
    // 4. A login as the managed account, as the PAM hook reports it.
    let login = ControlRequest::Authentication(AuthenticationReport {
        user: MANAGED_ACCOUNT.to_owned(),
        service: "sshd".to_owned(),
        remote_host: Some("203.0.113.7".to_owned()),
        tty: None,
        outcome: AuthenticationOutcome::Success,
    });
    assert!(matches!(agent.control(login).await, ControlResponse::Done { .. }));
    wait_for_timeline(&orchestrator, &auditor, &device_id, "authentication_succeeded", 1).await;
    // 5. A rotation requested by the operator, carried out by the device.
    let rotate = orchestrator
        .http
        .post(format!(
            "{}/v1.0/deviceManagement/managedDevices/{device_id}/rotateLocalAdminPassword",
            orchestrator.base_url
        ))
        .bearer_auth(OPERATOR_TOKEN)
        .header(REASON_HEADER, "INC-1234 follow-up")
        .send()
        .await
        .expect("the API answers");
    assert_eq!(rotate.status(), StatusCode::NO_CONTENT);
    wait_for_timeline(&orchestrator, &auditor, &device_id, "password_rotated", 2).await;
    // 6. A breach naming the device: its campaign commands a rotation.
    let deadline = Utc::now() + chrono::Duration::hours(1);
    let declared = orchestrator
        .request(
            reqwest::Method::POST,
            "/v1.0/fleetlaps/breaches",
            &soc,
            Some(json!({
                "reason": "phished administrator",
                "deadline": deadline,
                "scope": {"kind": "devices", "deviceIds": [device_id]},
            })),
        )
        .await;
    assert_eq!(declared.status(), StatusCode::CREATED);
    let declared: Value = declared.json().await.expect("json");
    let breach_id = declared["id"].as_str().expect("a breach id").to_owned();
    let entries = wait_for_timeline(&orchestrator, &auditor, &device_id, "password_rotated", 3).await;

    // Assert: the exact timeline, in the history's order.
    let kinds: Vec<(&str, &str)> = entries
        .iter()
        .map(|entry| (entry.kind.as_str(), entry.actor.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("device_enrolled", "device"),
            ("policy_applied", "device"),
            ("password_backed_up", "device"),
            ("password_rotated", "device"),
            ("device_tags_set", "bootstrap-admin"),
            ("password_read", "alice"),
            ("authentication_succeeded", "device"),
            ("rotation_requested", "operator"),
            ("password_backed_up", "device"),
            ("password_rotated", "device"),
            ("breach_targeted", "orchestrator"),
            ("breach_wave_commanded", "orchestrator"),
            ("password_backed_up", "device"),
            ("password_rotated", "device"),
        ],
        "{entries:#?}"
    );
    assert!(entries.windows(2).all(|pair| pair[0].sequence < pair[1].sequence));
    let [
        enrolled,
        _policy,
        first_backup,
        first_applied,
        tags,
        read,
        login,
        requested,
        second_backup,
        second_applied,
        targeted,
        wave,
        third_backup,
        third_applied,
    ] = entries.as_slice()
    else {
        unreachable!("fourteen entries")
    };
    assert_eq!(field(enrolled, "device_name"), "device-1");
    let first = field(first_backup, "rotation_id");
    let second = field(second_backup, "rotation_id");
    let third = field(third_backup, "rotation_id");
    assert_eq!(field(first_applied, "rotation_id"), first);
    assert_eq!(field(second_applied, "rotation_id"), second);
    assert_eq!(field(third_applied, "rotation_id"), third);
    assert!(first != second && second != third);
    assert_eq!(field(first_backup, "reason"), "initial");
    assert_eq!(field(second_backup, "reason"), "command");
    assert_eq!(field(third_backup, "reason"), "command");
    assert_eq!(tags.fields["tags"], json!(["site:paris"]));
    // The read: who, with which token, why, from where, which versions.
    assert_eq!(read.actor_token_id.as_deref(), Some(reader_id.as_str()));
    assert_eq!(read.fields["rotation_ids"], json!([first]));
    assert_eq!(field(read, "reason"), "INC-1234");
    assert_eq!(field(read, "source_address"), "127.0.0.1");
    assert_eq!(
        read.summary,
        format!("password read by alice for \"INC-1234\" from 127.0.0.1: rotations {first}")
    );
    assert_eq!(login.fields["count"], 1);
    assert_eq!(field(login, "remote_host"), "203.0.113.7");
    // The request's command, then the campaign's, each carried out by the rotation that names it.
    assert_eq!(field(requested, "reason"), "INC-1234 follow-up");
    assert_eq!(field(second_applied, "command_id"), field(requested, "command_id"));
    assert!(
        second_applied
            .summary
            .ends_with(&format!("command {} executed", field(requested, "command_id"))),
        "{}",
        second_applied.summary
    );
    assert_eq!(field(targeted, "breach_id"), breach_id);
    assert_eq!(field(wave, "breach_id"), breach_id);
    assert_eq!(field(third_applied, "command_id"), field(wave, "command_id"));
    assert_eq!(
        first_applied.fields["command_id"],
        Value::Null,
        "no command caused the first"
    );
    // Never a password, sealed or not.
    let text = serde_json::to_string(&entries).expect("json");
    assert!(!text.contains("sealed"), "{text}");

    // Assert: the exposure at the read, between the first and the second rotation.
    let at = read.time.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let answer = exposure(&orchestrator, &auditor, &device_id, &at).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let report: ExposureReport = answer.json().await.expect("a report");
    let expected = ExposureReport {
        device_id: device_id.clone(),
        at: read.time,
        version: Some(ExposedVersion {
            rotation_id: first.to_owned(),
            backed_up_date_time: first_backup.time,
            backed_up_sequence: first_backup.sequence,
            applied_date_time: first_applied.time,
            applied_sequence: first_applied.sequence,
            rotated_away_date_time: Some(second_applied.time),
            rotated_away_sequence: Some(second_applied.sequence),
            rotated_away_by: Some(second.to_owned()),
        }),
        pending: None,
        reads: vec![ExposureRead {
            sequence: read.sequence,
            time: read.time,
            principal: "alice".to_owned(),
            principal_token_id: Some(reader_id.clone()),
            reason: Some("INC-1234".to_owned()),
            source_address: Some("127.0.0.1".to_owned()),
            client_name: None,
            before_rotated_away: true,
        }],
        uses: vec![ExposureUse {
            sequence: login.sequence,
            time: login.time,
            outcome: "success".to_owned(),
            count: 1,
            service: "sshd".to_owned(),
            remote_host: Some("203.0.113.7".to_owned()),
            tty: None,
            first_date_time: None,
            last_date_time: None,
        }],
        summary: format!(
            "rotation {first} was the password of device {device_id} at {}: backed up at {}, applied at {}, \
             read 1 times, used in 1 authentication reports, rotated away at {} by rotation {second}",
            seconds(read.time),
            seconds(first_backup.time),
            seconds(first_applied.time),
            seconds(second_applied.time),
        ),
    };
    assert_eq!(report, expected);

    // Assert: before any rotation, none was valid.
    let at = before_everything.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let answer = exposure(&orchestrator, &auditor, &device_id, &at).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let none: ExposureReport = answer.json().await.expect("a report");
    assert_eq!(
        none,
        ExposureReport {
            device_id: device_id.clone(),
            at: before_everything,
            version: None,
            pending: None,
            reads: Vec::new(),
            uses: Vec::new(),
            summary: format!(
                "no password version of device {device_id} was applied at or before {}",
                seconds(before_everything)
            ),
        }
    );

    // Assert: lapsctl shows the same, as a table and as JSON lines.
    let device = device_id.to_string();
    let table = lapsctl(&orchestrator, &["--token", &auditor, "timeline", "--device", &device]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), entries.len() + 1, "{table}");
    assert!(lines[0].starts_with("Sequence"), "{table}");
    for (line, entry) in lines[1..].iter().zip(&entries) {
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            columns[..4],
            [
                entry.sequence.to_string().as_str(),
                seconds(entry.time).as_str(),
                entry.kind.as_str(),
                entry.actor.as_str()
            ]
        );
        assert!(line.ends_with(&entry.summary), "{line}");
    }
    let json_lines = lapsctl(
        &orchestrator,
        &["--token", &auditor, "timeline", "--device", &device, "-o", "jsonl"],
    )
    .await;
    let from_lapsctl: Vec<TimelineEntry> = json_lines
        .lines()
        .map(|line| serde_json::from_str(line).expect("one entry a line"))
        .collect();
    assert_eq!(from_lapsctl, entries);
    let at = read.time.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let report_line = lapsctl(
        &orchestrator,
        &[
            "--token", &auditor, "exposure", "--device", &device, "--at", &at, "-o", "jsonl",
        ],
    )
    .await;
    assert_eq!(report_line.lines().count(), 1, "{report_line}");
    let from_lapsctl: ExposureReport = serde_json::from_str(&report_line).expect("the report");
    assert_eq!(from_lapsctl, expected);
    let report_table = lapsctl(
        &orchestrator,
        &["--token", &auditor, "exposure", "--device", &device, "--at", &at],
    )
    .await;
    for (name, value) in [
        ("Version", first.to_owned()),
        ("BackedUpTime", seconds(first_backup.time)),
        ("AppliedTime", seconds(first_applied.time)),
        ("RotatedAwayTime", seconds(second_applied.time)),
        ("RotatedAwayBy", second.to_owned()),
        ("Reads", "1".to_owned()),
        ("Uses", "1".to_owned()),
        ("Principal", "alice".to_owned()),
        ("TokenId", reader_id.clone()),
        ("Reason", "INC-1234".to_owned()),
        ("SourceAddress", "127.0.0.1".to_owned()),
        ("Outcome", "success".to_owned()),
        ("RemoteHost", "203.0.113.7".to_owned()),
    ] {
        assert_eq!(table_values(&report_table, name), [value], "{name} in\n{report_table}");
    }
    let at = before_everything.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let none_table = lapsctl(
        &orchestrator,
        &["--token", &auditor, "exposure", "--device", &device, "--at", &at],
    )
    .await;
    assert_eq!(table_values(&none_table, "Version"), ["none"], "{none_table}");
    assert_eq!(table_values(&none_table, "Reads"), ["0"], "{none_table}");

    // Assert: reading them disclosed nothing, so the history holds one read only.
    let reads = timeline(&orchestrator, &auditor, &device_id)
        .await
        .into_iter()
        .filter(|entry| entry.kind == "password_read")
        .count();
    assert_eq!(reads, 1);
}

#[tokio::test]
async fn investigations_need_audit_read_all_a_known_device_and_a_valid_instant() {
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let device_id = agent.device_id.clone();
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let timeline_path = format!("/v1.0/fleetlaps/devices/{device_id}/timeline");

    // A token without Audit.Read.All (it may read passwords): 403 on both, naming the scope.
    let (status, message) = error(orchestrator.get(&timeline_path, Some(READ_TOKEN)).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("Audit.Read.All"), "{message}");
    let (status, message) = error(exposure(&orchestrator, READ_TOKEN, &device_id, &now).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("Audit.Read.All"), "{message}");
    // No token: 401.
    assert_eq!(
        orchestrator.get(&timeline_path, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let device = device_id.to_string();
    let denied = orchestrator
        .lapsctl(&["--token", READ_TOKEN, "timeline", "--device", &device])
        .await;
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Audit.Read.All") && stderr.contains("403"), "{stderr}");

    // An unknown device: 404 saying so.
    let unknown = DeviceId::new_random();
    let (status, message) = error(
        orchestrator
            .get(
                &format!("/v1.0/fleetlaps/devices/{unknown}/timeline"),
                Some(OPERATOR_TOKEN),
            )
            .await,
    )
    .await;
    assert_eq!(
        (status, message),
        (StatusCode::NOT_FOUND, format!("device {unknown} was not found"))
    );
    let (status, message) = error(exposure(&orchestrator, OPERATOR_TOKEN, &unknown, &now).await).await;
    assert_eq!(
        (status, message),
        (StatusCode::NOT_FOUND, format!("device {unknown} was not found"))
    );
    let unknown_text = unknown.to_string();
    let missing = orchestrator
        .lapsctl(&[
            "--token",
            OPERATOR_TOKEN,
            "exposure",
            "--device",
            &unknown_text,
            "--at",
            &now,
        ])
        .await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains(&format!("device {unknown} was not found")), "{stderr}");

    // A bad instant, or none: 400 naming the format.
    for at in ["yesterday", "2026-11-24", "2026-11-24 13:05"] {
        let (status, message) = error(exposure(&orchestrator, OPERATOR_TOKEN, &device_id, at).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{at}");
        assert!(message.contains("allowed: an RFC 3339 time"), "{message}");
    }
    let (status, message) = error(
        orchestrator
            .get(
                &format!("/v1.0/fleetlaps/devices/{device_id}/exposure"),
                Some(OPERATOR_TOKEN),
            )
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        message.contains("at is required") && message.contains("RFC 3339"),
        "{message}"
    );
}

#[tokio::test]
async fn a_devices_events_are_read_to_the_end_in_pages_of_any_size_with_other_subjects_between_and_after() {
    // Arrange: on a real events stream, the device's events between another device's and the
    // orchestrator's, and a tail of other subjects after its last one (what a timeline page
    // that reaches the device's end meets).
    let nats = TestNats::start();
    let jetstream = async_nats::jetstream::new(nats.client().await);
    let history = History::open(&jetstream).await.expect("the events stream");
    let (device, other) = (DeviceId::new_random(), DeviceId::new_random());
    let mut expected = Vec::new();
    let publish = |subject: String| {
        let jetstream = jetstream.clone();
        async move {
            jetstream
                .publish(subject, "{}".into())
                .await
                .expect("published")
                .await
                .expect("stored")
                .sequence
        }
    };
    for round in 0..7 {
        let kind = [EventKind::AuthenticationSucceeded, EventKind::PolicyApplied][round % 2];
        expected.push(publish(subject::device_event(&device, kind)).await);
        publish(subject::device_event(&other, kind)).await;
        publish(subject::audit_event(AuditKind::PasswordRead)).await;
    }
    let mut last = 0;
    for _ in 0..5 {
        last = publish(subject::device_event(&other, EventKind::PasswordRotated)).await;
        last = last.max(publish(subject::audit_event(AuditKind::RotationRequested)).await);
    }

    for limit in 1..=4 {
        // Act: page through everything up to the stream's end, `limit` at a time.
        let mut read = Vec::new();
        let mut after = 0;
        loop {
            let page = tokio::time::timeout(TIMEOUT, history.device_events(&device, after, last, limit))
                .await
                .unwrap_or_else(|_| panic!("a page of {limit} after {after} is answered"))
                .expect("the device's events");
            assert!(page.len() <= limit, "at most {limit}");
            let Some(newest) = page.last() else { break };
            after = newest.sequence;
            read.extend(page.iter().map(|message| {
                assert!(
                    message.subject.starts_with(&format!("laps.events.{device}.")),
                    "{}",
                    message.subject
                );
                message.sequence
            }));
        }

        // Assert: each of the device's events once, in order, and the last page empty.
        assert_eq!(read, expected, "pages of {limit}");
    }
    let bounded = history
        .device_events(&device, 0, expected[3], 100)
        .await
        .expect("the device's events up to a sequence");
    assert_eq!(
        bounded.iter().map(|message| message.sequence).collect::<Vec<_>>(),
        expected[..4]
    );
}
