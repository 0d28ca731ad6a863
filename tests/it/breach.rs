//! Breach response: a breach declared through the API or `lapsctl` rotates every device it names
//! once, in waves; a device offline at the declaration rotates when it returns and is counted
//! then; a restarted orchestrator resumes its campaigns; bad signals are refused naming why.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlaps_proto::control::{AuthenticationReport, ControlRequest, ControlResponse};
use fleetlaps_proto::event::{AuthenticationOutcome, EventKind};
use fleetlaps_proto::ids::DeviceId;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::apps::{
    ADMIN_TOKEN, MANAGED_ACCOUNT, OPERATOR_TOKEN, TestAgent, TestOrchestrator, device_events, rotations_since,
};
use crate::harness::{TestNats, wait_until};

/// A token for a security team: declares breaches and reads campaigns.
async fn soc_token(orchestrator: &TestOrchestrator) -> String {
    let body = json!({"name": "soc", "scopes": ["Breach.Declare", "Audit.Read.All"]});
    orchestrator.create_token(ADMIN_TOKEN, body).await.0
}

/// Declares a breach through the API; returns the campaign.
async fn declare(orchestrator: &TestOrchestrator, token: &str, scope: Value) -> Value {
    let deadline = Utc::now() + chrono::Duration::hours(1);
    let answer = orchestrator
        .request(
            reqwest::Method::POST,
            "/v1.0/fleetlaps/breaches",
            token,
            Some(json!({"reason": "phished administrator", "deadline": deadline, "scope": scope})),
        )
        .await;
    assert_eq!(answer.status(), StatusCode::CREATED);
    answer.json().await.expect("json")
}

async fn campaign(orchestrator: &TestOrchestrator, token: &str, id: &str) -> Value {
    let answer = orchestrator
        .request(
            reqwest::Method::GET,
            &format!("/v1.0/fleetlaps/breaches/{id}"),
            token,
            None,
        )
        .await;
    assert_eq!(answer.status(), StatusCode::OK);
    answer.json().await.expect("json")
}

/// Waits until the campaign satisfies `done`, and returns it.
async fn wait_for_campaign(
    orchestrator: &TestOrchestrator,
    token: &str,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(what, Duration::from_secs(60), || async {
        let campaign = campaign(orchestrator, token, id).await;
        done(&campaign).then_some(campaign)
    })
    .await
}

/// Declares a breach with `lapsctl breach declare <args> -o json`; returns the campaign as
/// lapsctl prints it (text fields).
async fn lapsctl_declare(orchestrator: &TestOrchestrator, token: &str, args: &[&str]) -> Value {
    let mut all = vec!["--token", token, "breach", "declare"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let declared = orchestrator.lapsctl(&all).await;
    assert!(
        declared.status.success(),
        "{}",
        String::from_utf8_lossy(&declared.stderr)
    );
    let declared: Value = serde_json::from_slice(&declared.stdout).expect("lapsctl -o json");
    declared[0].clone()
}

/// Starts `n` agents, each backed up and settled.
async fn fleet(nats: &TestNats, orchestrator: &TestOrchestrator, n: usize) -> Vec<TestAgent> {
    let mut agents = Vec::new();
    for _ in 0..n {
        let agent = TestAgent::spawn(nats, orchestrator).await;
        let password = orchestrator.wait_for_passwords(&agent.device_id, 1).await.remove(0);
        agent.wait_until_settled_with(&password).await;
        agents.push(agent);
    }
    agents
}

/// Checks that the device rotated exactly once since `since`, and that the centre returns the
/// password its account has.
async fn rotated_once_and_retrievable(
    nats: &TestNats,
    orchestrator: &TestOrchestrator,
    agent: &TestAgent,
    since: DateTime<Utc>,
) {
    assert_eq!(
        rotations_since(nats, &agent.device_id, since).await,
        1,
        "device {} rotated once for the breach",
        agent.device_id
    );
    let newest = orchestrator.passwords(&agent.device_id).await.remove(0);
    agent.wait_until_has(&newest).await;
}

#[tokio::test]
async fn a_fleet_wide_breach_rotates_every_device_once_and_an_offline_one_when_it_returns() {
    // Arrange: three devices, one of them off.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut agents = fleet(&nats, &orchestrator, 3).await;
    let token = soc_token(&orchestrator).await;
    agents[2].stop().await;
    let declared_after = Utc::now();

    // Act: declare it with lapsctl, as a security team would.
    let declared = lapsctl_declare(&orchestrator, &token, &["--all", "--reason", "phished administrator"]).await;
    let id = declared["Id"].as_str().expect("the breach id").to_owned();
    assert_eq!(declared["Targeted"], "3");

    // Assert: the two online devices rotate; the third waits, named as a straggler.
    let waiting = wait_for_campaign(&orchestrator, &token, &id, "the online devices rotate", |campaign| {
        campaign["rotated"] == 2 && campaign["commanded"] == 3
    })
    .await;
    assert_eq!(waiting["state"], "running");
    assert_eq!(waiting["offlineWaiting"], 1, "{waiting}");
    assert_eq!(waiting["stragglers"], json!([agents[2].device_id]));

    // Act: the third device returns.
    agents[2].start_in_process().await;

    // Assert: the campaign completes, each device rotated once for it, and every password the
    // centre returns is its account's.
    let watched = orchestrator.lapsctl(&["--token", &token, "breach", "watch", &id]).await;
    assert!(watched.status.success(), "{}", String::from_utf8_lossy(&watched.stderr));
    let text = String::from_utf8_lossy(&watched.stdout);
    assert!(text.contains("completed: 3 of 3 devices rotated"), "{text}");
    let completed = campaign(&orchestrator, &token, &id).await;
    assert_eq!(
        (completed["state"].as_str(), completed["rotated"].as_u64()),
        (Some("completed"), Some(3))
    );
    for agent in &agents {
        rotated_once_and_retrievable(&nats, &orchestrator, agent, declared_after).await;
    }
}

#[tokio::test]
async fn an_orchestrator_killed_mid_campaign_resumes_it_and_no_device_rotates_twice() {
    // Arrange: one device per wave, so the restart falls in the middle.
    let nats = TestNats::start();
    let mut orchestrator =
        TestOrchestrator::spawn_with_config(&nats, "[campaigns]\nwave_devices_per_second = 1\n").await;
    let agents = fleet(&nats, &orchestrator, 3).await;
    let token = soc_token(&orchestrator).await;
    let declared_after = Utc::now();
    let id = declare(&orchestrator, &token, json!({"kind": "all"})).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    wait_for_campaign(&orchestrator, &token, &id, "the first wave", |campaign| {
        campaign["commanded"] != 0
    })
    .await;

    // Act
    orchestrator.restart().await;

    // Assert
    let completed = wait_for_campaign(&orchestrator, &token, &id, "the campaign completes", |campaign| {
        campaign["state"] == "completed"
    })
    .await;
    assert_eq!(completed["rotated"], 3);
    for agent in &agents {
        rotated_once_and_retrievable(&nats, &orchestrator, agent, declared_after).await;
    }
}

#[tokio::test]
async fn overlapping_breaches_on_offline_devices_rotate_each_device_once_and_both_complete() {
    // Arrange: two devices, both off while two breaches name them.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let mut agents = fleet(&nats, &orchestrator, 2).await;
    let token = soc_token(&orchestrator).await;
    for agent in &mut agents {
        agent.stop().await;
    }
    let declared_after = Utc::now();
    let first = declare(&orchestrator, &token, json!({"kind": "all"})).await;
    let first = first["id"].as_str().expect("an id").to_owned();
    wait_for_campaign(
        &orchestrator,
        &token,
        &first,
        "the first campaign commands",
        |campaign| campaign["commanded"] == 2,
    )
    .await;
    let ids: Vec<DeviceId> = agents.iter().map(|agent| agent.device_id.clone()).collect();
    let second = declare(&orchestrator, &token, json!({"kind": "devices", "deviceIds": ids})).await;
    let second = second["id"].as_str().expect("an id").to_owned();

    // Act
    for agent in &mut agents {
        agent.start_in_process().await;
    }

    // Assert
    for id in [&first, &second] {
        wait_for_campaign(&orchestrator, &token, id, "each campaign completes", |campaign| {
            campaign["state"] == "completed"
        })
        .await;
    }
    for agent in &agents {
        rotated_once_and_retrievable(&nats, &orchestrator, agent, declared_after).await;
    }
}

#[tokio::test]
async fn a_breach_scoped_by_list_by_reader_or_by_authentication_targets_exactly_those_devices() {
    // Arrange: three devices; the investigator reads the second's password, and someone logs
    // in as the third's managed account.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agents = fleet(&nats, &orchestrator, 3).await;
    let token = soc_token(&orchestrator).await;
    let since = Utc::now();
    orchestrator.passwords(&agents[1].device_id).await;
    let login = ControlRequest::Authentication(AuthenticationReport {
        user: MANAGED_ACCOUNT.to_owned(),
        service: "sshd".to_owned(),
        remote_host: Some("203.0.113.7".to_owned()),
        tty: None,
        outcome: AuthenticationOutcome::Success,
    });
    assert!(matches!(agents[2].control(login).await, ControlResponse::Done { .. }));
    wait_until("the login is on the history", Duration::from_secs(30), || async {
        let authenticated = device_events(&nats, &agents[2].device_id, EventKind::AuthenticationSucceeded).await;
        (!authenticated.is_empty()).then_some(())
    })
    .await;

    // Act and assert: each scope targets its device only (declared again while the projections
    // have not folded the read or the login yet: "no device matches"), and its campaign completes.
    let scopes = [
        (
            json!({"kind": "devices", "deviceIds": [agents[0].device_id]}),
            &agents[0].device_id,
        ),
        (
            json!({"kind": "readBy", "principal": "investigator", "since": since}),
            &agents[1].device_id,
        ),
        (
            json!({"kind": "authenticatedSince", "since": since}),
            &agents[2].device_id,
        ),
    ];
    for (scope, device_id) in scopes {
        let declared = wait_until("the scope matches its device", Duration::from_secs(30), || async {
            let answer = orchestrator.request(reqwest::Method::POST,
                "/v1.0/fleetlaps/breaches",
                &token,
                Some(json!({"reason": "scoped", "deadline": Utc::now() + chrono::Duration::hours(1), "scope": scope})),
            )
            .await;
            (answer.status() == StatusCode::CREATED).then_some(answer)
        })
        .await;
        let declared: Value = declared.json().await.expect("json");
        assert_eq!(declared["targeted"], 1, "{scope}: {declared}");
        let id = declared["id"].as_str().expect("an id");
        let completed = wait_for_campaign(&orchestrator, &token, id, "the scoped campaign completes", |campaign| {
            campaign["state"] == "completed"
        })
        .await;
        assert_eq!(completed["stragglers"], json!([]), "{scope}");
        assert!(
            rotations_since(&nats, device_id, since).await >= 1,
            "{scope}: the named device rotated"
        );
    }
}

#[tokio::test]
async fn bad_breach_signals_get_a_4xx_naming_what_was_wrong() {
    // Arrange
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agents = fleet(&nats, &orchestrator, 1).await;
    let token = soc_token(&orchestrator).await;
    let soon = Utc::now() + chrono::Duration::hours(1);
    let signal = |deadline: DateTime<Utc>, scope: Value| json!({"reason": "r", "deadline": deadline, "scope": scope});
    let cases = [
        (
            signal(soon, json!({"kind": "everyone"})),
            OPERATOR_TOKEN.to_owned(),
            StatusCode::FORBIDDEN,
            "Breach.Declare",
        ),
        (
            signal(soon, json!({"kind": "everyone"})),
            token.clone(),
            StatusCode::BAD_REQUEST,
            "everyone",
        ),
        (
            signal(Utc::now() - chrono::Duration::hours(1), json!({"kind": "all"})),
            token.clone(),
            StatusCode::BAD_REQUEST,
            "deadline",
        ),
        (
            signal(soon, json!({"kind": "authenticatedSince", "since": Utc::now()})),
            token.clone(),
            StatusCode::BAD_REQUEST,
            "no device matches",
        ),
        (
            signal(soon, json!({"kind": "devices", "deviceIds": ["not-enrolled"]})),
            token.clone(),
            StatusCode::BAD_REQUEST,
            "not-enrolled",
        ),
        (
            // More ids than one history event holds: refused by name, not lost as a 503.
            signal(
                soon,
                json!({"kind": "devices", "deviceIds": (0..2_000).map(|index| format!("device-{index:05}")).collect::<Vec<_>>()}),
            ),
            token.clone(),
            StatusCode::BAD_REQUEST,
            "at most 500",
        ),
    ];

    // Act and assert
    for (body, caller, status, named) in cases {
        let answer = orchestrator
            .request(
                reqwest::Method::POST,
                "/v1.0/fleetlaps/breaches",
                &caller,
                Some(body.clone()),
            )
            .await;
        let shown: String = body.to_string().chars().take(200).collect();
        assert_eq!(answer.status(), status, "{shown}");
        let error: Value = answer.json().await.expect("json");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{shown}: {message}");
    }
    let list: Value = orchestrator
        .request(reqwest::Method::GET, "/v1.0/fleetlaps/breaches", &token, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(list["value"], json!([]), "nothing was declared");

    // A campaign cancelled stops, and cannot be cancelled twice.
    let mut agents = agents;
    agents[0].stop().await;
    let id = declare(&orchestrator, &token, json!({"kind": "all"})).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let cancel = format!("/v1.0/fleetlaps/breaches/{id}/cancel");
    assert_eq!(
        orchestrator
            .request(reqwest::Method::POST, &cancel, &token, None)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(campaign(&orchestrator, &token, &id).await["state"], "cancelled");
    let again = orchestrator.request(reqwest::Method::POST, &cancel, &token, None).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_breach_scoped_by_tag_rotates_only_the_tagged_devices() {
    // Arrange: three devices, two of them tagged by an admin with lapsctl.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agents = fleet(&nats, &orchestrator, 3).await;
    let token = soc_token(&orchestrator).await;
    for (agent, tag) in agents.iter().zip(["site:paris", "site:lyon"]) {
        let tagged = orchestrator
            .lapsctl(&[
                "--token",
                ADMIN_TOKEN,
                "tag",
                "--device",
                agent.device_id.as_str(),
                "--tag",
                tag,
                "--tag",
                "role:web",
            ])
            .await;
        assert!(tagged.status.success(), "{}", String::from_utf8_lossy(&tagged.stderr));
    }
    let since = Utc::now();

    // Act
    let declared = lapsctl_declare(
        &orchestrator,
        &token,
        &["--tag", "site:paris", "--reason", "the Paris jump host was compromised"],
    )
    .await;

    // Assert: the Paris device only.
    assert_eq!(declared["Targeted"], "1");
    assert_eq!(declared["Scope"], "devices tagged site:paris");
    let id = declared["Id"].as_str().expect("an id").to_owned();
    wait_for_campaign(&orchestrator, &token, &id, "the campaign completes", |campaign| {
        campaign["state"] == "completed"
    })
    .await;
    rotated_once_and_retrievable(&nats, &orchestrator, &agents[0], since).await;
    for agent in &agents[1..] {
        assert_eq!(
            rotations_since(&nats, &agent.device_id, since).await,
            0,
            "untagged or elsewhere"
        );
    }
    let directory: Value = orchestrator
        .request(reqwest::Method::GET, "/v1.0/devices", OPERATOR_TOKEN, None)
        .await
        .json()
        .await
        .expect("json");
    let tagged = directory["value"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|device| device["id"] == agents[1].device_id.as_str())
        .expect("the Lyon device");
    assert_eq!(tagged["tags"], json!(["site:lyon", "role:web"]));
}

#[tokio::test]
async fn a_siem_declares_a_breach_over_nats_with_a_token_and_is_told_what_was_wrong_otherwise() {
    // Arrange: a device, and a SIEM's connection answered below its own inbox prefix.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let agents = fleet(&nats, &orchestrator, 1).await;
    let token = soc_token(&orchestrator).await;
    let siem = nats
        .client_with(
            async_nats::ConnectOptions::new()
                .custom_inbox_prefix(fleetlaps_proto::subject::BREACH_SIGNALS_INBOX_PREFIX),
        )
        .await;
    let since = Utc::now();
    let signal = |bearer: Option<&str>| {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(bearer) = bearer {
            headers.insert("Authorization", format!("Bearer {bearer}").as_str());
        }
        let body = json!({
            "reason": "SIEM rule 42: credential dump on a jump host",
            "deadline": Utc::now() + chrono::Duration::hours(1),
            "scope": {"kind": "all"}
        });
        (headers, serde_json::to_vec(&body).expect("json"))
    };
    let ask = |(headers, body): (async_nats::HeaderMap, Vec<u8>)| {
        let siem = siem.clone();
        async move {
            let answer = siem
                .request_with_headers(fleetlaps_proto::subject::BREACH_SIGNALS, headers, body.into())
                .await
                .expect("the orchestrator answers");
            serde_json::from_slice::<Value>(&answer.payload).expect("json")
        }
    };

    // Act and assert: no token, or one without Breach.Declare, is refused naming why.
    let refused = ask(signal(None)).await;
    assert_eq!(refused["error"]["code"], "InvalidAuthenticationToken", "{refused}");
    let refused = ask(signal(Some(OPERATOR_TOKEN))).await;
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("Breach.Declare")),
        "{refused}"
    );

    // Act and assert: with the SOC's token, the campaign runs and completes.
    let declared = ask(signal(Some(&token))).await;
    assert_eq!(declared["targeted"], 1, "{declared}");
    let id = declared["id"].as_str().expect("an id");
    let completed = wait_for_campaign(&orchestrator, &token, id, "the campaign completes", |campaign| {
        campaign["state"] == "completed"
    })
    .await;
    assert_eq!(completed["declaredBy"], "soc");
    rotated_once_and_retrievable(&nats, &orchestrator, &agents[0], since).await;
}

#[tokio::test]
async fn a_breach_of_a_thousand_simulated_devices_a_tenth_of_them_off_completes_with_each_rotated_once() {
    // Arrange: 1,000 simulated devices, all backed up.
    const DEVICES: usize = 1_000;
    let nats = crate::simulate::nats_with_simulator();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let token = soc_token(&orchestrator).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::simulate::simulator_config(&nats, &dir.path().join("simulator"));
    let mut simulation = crate::simulate::backed_up_fleet(&orchestrator, DEVICES, &config).await;
    let device_ids = simulation.device_ids();
    let off: Vec<DeviceId> = device_ids.iter().step_by(10).cloned().collect();
    simulation.stop(&off).await.expect("a tenth of the fleet stops");
    let declared_after = Utc::now();

    // Act: the whole fleet is declared breached; the devices that were off come back later.
    let declared = declare(&orchestrator, &token, json!({"kind": "all"})).await;
    assert_eq!(declared["targeted"], DEVICES);
    let id = declared["id"].as_str().expect("an id").to_owned();
    let waiting = wait_for_campaign(
        &orchestrator,
        &token,
        &id,
        "every device that is on rotates",
        |campaign| campaign["rotated"] == DEVICES - off.len(),
    )
    .await;
    assert_eq!(waiting["state"], "running", "the devices that are off keep it running");
    simulation.start(&off).await.expect("the rest of the fleet returns");

    // Assert: it completes; each device rotated exactly once after the declaration, and the
    // password the centre returns is each device's account's.
    wait_for_campaign(&orchestrator, &token, &id, "the campaign completes", |campaign| {
        campaign["state"] == "completed"
    })
    .await;
    let mut rotations: std::collections::HashMap<DeviceId, usize> = std::collections::HashMap::new();
    for payload in crate::apps::stream_payloads(&nats, "laps.events.*.password_rotated").await {
        let envelope = fleetlaps_proto::event::Envelope::from_json(&payload).expect("an event");
        if envelope.time >= declared_after {
            *rotations.entry(envelope.device_id).or_default() += 1;
        }
    }
    for device_id in &device_ids {
        assert_eq!(
            rotations.get(device_id),
            Some(&1),
            "device {device_id} rotated once for the breach"
        );
        let newest = orchestrator.passwords(device_id).await.remove(0);
        assert!(
            simulation.verify_password(device_id, &newest).expect("readable"),
            "device {device_id}'s account has the password the centre returns"
        );
    }
    simulation.stop_all().await.expect("the fleet stops");
}
