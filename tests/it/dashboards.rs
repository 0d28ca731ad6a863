//! `dashboards/`: the Grafana dashboards, the alert rules and the example Prometheus
//! configuration, checked as a user of them would: linted, run through `promtool`, and every
//! panel query and alert expression evaluated by a real Prometheus (Debian's package) scraping a
//! real orchestrator with a simulated fleet.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::apps::{ADMIN_TOKEN, TestOrchestrator};
use crate::harness::{free_loopback_port, wait_until};

/// Where the deliverables live.
fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// Every Grafana dashboard, by file name.
fn dashboards() -> Vec<(String, Value)> {
    let dir = dashboards_dir().join("grafana");
    let mut dashboards: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("reading {}: {err}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable");
            let dashboard = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            (
                path.file_name().expect("a name").to_string_lossy().into_owned(),
                dashboard,
            )
        })
        .collect();
    dashboards.sort_by(|a, b| a.0.cmp(&b.0));
    dashboards
}

/// A panel's queries, as `(dashboard, panel title, expr)`.
fn panel_queries() -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    for (file, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                queries.push((
                    file.clone(),
                    panel["title"].as_str().expect("a title").to_owned(),
                    target["expr"].as_str().expect("an expr").to_owned(),
                ));
            }
        }
    }
    queries
}

/// Every alert rule of `alerts.yml`, as `(name, expr)`. The file keeps each `expr:` on one line
/// right after its `alert:` (the lint below holds it to that).
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(dashboards_dir().join("prometheus/alerts.yml")).expect("alerts.yml");
    let mut rules = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(alert) = line.strip_prefix("- alert: ") {
            name = Some(alert.to_owned());
        } else if let Some(expr) = line.strip_prefix("expr: ") {
            let alert = name.take().expect("every expr follows its alert's name");
            rules.push((alert, expr.to_owned()));
        }
    }
    assert!(!rules.is_empty(), "alerts.yml has no rules");
    rules
}

/// The metric names a PromQL expression selects: every identifier starting with `fleetlaps_`,
/// with a histogram's `_bucket`, `_sum` or `_count` taken off, plus `up`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut identifier = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' {
            identifier.push(c);
            continue;
        }
        if identifier.starts_with("fleetlaps_") || (identifier == "up" && c == '{') {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| identifier.strip_suffix(suffix))
                .filter(|base| known_metric(base))
                .map_or_else(|| identifier.clone(), str::to_owned);
            names.insert(base);
        }
        identifier.clear();
        // Label values in quotes are not names.
        if c == '"' {
            identifier.push('"');
        }
    }
    names
}

fn known_metric(name: &str) -> bool {
    fleetlaps_orchestrator::metrics::ALL_NAMES.contains(&name)
}

/// Splits an alert expression `<query> <comparison> <number>` at its last top-level comparison.
fn split_alert(expr: &str) -> Option<(&str, &str, f64)> {
    let mut depth = 0i32;
    let bytes = expr.as_bytes();
    let mut split = None;
    for (i, &byte) in bytes.iter().enumerate() {
        match byte {
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => depth -= 1,
            b'<' | b'>' | b'=' | b'!' if depth == 0 => {
                let op_len = if bytes.get(i + 1) == Some(&b'=') { 2 } else { 1 };
                if byte == b'=' && op_len == 1 || split.is_some_and(|(start, len): (usize, usize)| start + len > i) {
                    continue;
                }
                split = Some((i, op_len));
            }
            _ => {}
        }
    }
    let (at, len) = split?;
    let threshold = expr[at + len..].trim().parse().ok()?;
    Some((expr[..at].trim(), &expr[at..at + len], threshold))
}

#[test]
fn the_dashboards_use_their_datasource_variable_unique_panel_ids_and_only_metrics_the_orchestrator_serves() {
    let dashboards = dashboards();
    let files: Vec<&str> = dashboards.iter().map(|(file, _)| file.as_str()).collect();
    assert_eq!(
        files,
        ["breach-response.json", "fleet-backup-health.json", "orchestrator.json"],
        "the three dashboards"
    );
    let mut uids = BTreeSet::new();
    for (file, dashboard) in &dashboards {
        assert!(
            uids.insert(dashboard["uid"].as_str().expect("a uid")),
            "{file}: uid used twice"
        );
        let variables = dashboard["templating"]["list"].as_array().expect("templating");
        assert!(
            variables.iter().any(|variable| variable["name"] == "datasource"
                && variable["type"] == "datasource"
                && variable["query"] == "prometheus"),
            "{file}: no Prometheus datasource variable"
        );
        let mut ids = BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().expect("a title");
            assert!(
                ids.insert(panel["id"].as_u64().expect("an id")),
                "{file}: panel id of {title} used twice"
            );
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: {title} does not use the variable"
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{file}: {title} has no query");
            for target in targets {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{file}: {title}");
                let expr = target["expr"].as_str().expect("an expr");
                let names = metric_names(expr);
                assert!(!names.is_empty(), "{file}: {title}: {expr} names no metric");
                for name in names {
                    assert!(
                        known_metric(&name),
                        "{file}: {title}: {name} is not in orchestrator/src/metrics.rs"
                    );
                }
            }
        }
    }
    for (alert, expr) in alert_rules() {
        assert!(
            split_alert(&expr).is_some(),
            "{alert}: `{expr}` is not `<query> <comparison> <number>`"
        );
        for name in metric_names(&expr) {
            assert!(
                known_metric(&name),
                "{alert}: {name} is not in orchestrator/src/metrics.rs"
            );
        }
    }
}

#[test]
fn the_lint_catches_an_unknown_metric_and_splits_alert_expressions() {
    assert_eq!(
        metric_names(r#"sum by (le) (rate(fleetlaps_ingest_lag_seconds_bucket{kind="x"}[5m])) / fleetlaps_nope"#),
        BTreeSet::from(["fleetlaps_ingest_lag_seconds".to_owned(), "fleetlaps_nope".to_owned()])
    );
    assert!(!known_metric("fleetlaps_nope"));
    assert_eq!(
        split_alert(r#"sum(fleetlaps_devices{state!="silent"}) >= 2"#),
        Some((r#"sum(fleetlaps_devices{state!="silent"})"#, ">=", 2.0))
    );
    assert_eq!(split_alert("min(up) == 0"), Some(("min(up)", "==", 0.0)));
    assert_eq!(split_alert("sum(fleetlaps_devices)"), None);
}

/// Runs `promtool` with `args` in `dashboards/prometheus`, and fails with its output unless it
/// succeeds.
fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dashboards_dir().join("prometheus"))
        .output()
        .expect("promtool runs: install Debian's package `prometheus` (cargo xtask test does)");
    assert!(
        output.status.success(),
        "promtool {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_accepts_the_example_config_and_the_rules_and_the_rules_pass_their_unit_tests() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
}

/// A Prometheus server scraping one orchestrator every second and evaluating the alert rules of
/// `dashboards/prometheus/alerts.yml`, with its store in a temporary directory. Killed on drop.
pub(crate) struct TestPrometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl TestPrometheus {
    /// Starts Prometheus scraping `target` (`host:port` of a metrics listener) as the job the
    /// dashboards select.
    pub(crate) async fn start(target: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = dashboards_dir().join("prometheus/alerts.yml");
        let config = format!(
            r#"
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - "{rules}"
scrape_configs:
  - job_name: fleetlaps-orchestrator
    static_configs:
      - targets: ["{target}"]
"#,
            rules = rules.canonicalize().expect("alerts.yml").display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing the config");
        let address = format!("127.0.0.1:{}", free_loopback_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("a log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts: install Debian's package `prometheus` (cargo xtask test does)");
        let prometheus = Self {
            child,
            url: format!("http://{address}"),
            http: reqwest::Client::new(),
            _dir: dir,
        };
        wait_until("Prometheus answers", Duration::from_secs(60), || async {
            let ready = prometheus.http.get(format!("{}/-/ready", prometheus.url)).send().await;
            ready
                .is_ok_and(|response| response.status() == StatusCode::OK)
                .then_some(())
        })
        .await;
        prometheus
    }

    /// Evaluates `query` now; panics unless Prometheus accepts it. Returns its result vector.
    pub(crate) async fn query(&self, query: &str) -> Vec<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await
            .expect("Prometheus answers");
        let status = response.status();
        let body: Value = response.json().await.expect("json");
        assert!(status.is_success() && body["status"] == "success", "`{query}`: {body}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The first sample's value of `query`, if it has one.
    pub(crate) async fn value(&self, query: &str) -> Option<f64> {
        let result = self.query(query).await;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// The `data` of an answer of the HTTP API at `path`.
    async fn api(&self, path: &str) -> Value {
        let body: Value = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("Prometheus answers")
            .json()
            .await
            .expect("json");
        assert_eq!(body["status"], "success", "{path}: {body}");
        body["data"].clone()
    }

    /// The alerts firing now, by name.
    pub(crate) async fn firing(&self) -> BTreeSet<String> {
        self.api("/api/v1/alerts").await["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|alert| alert["state"] == "firing")
            .filter_map(|alert| alert["labels"]["alertname"].as_str().map(str::to_owned))
            .collect()
    }

    /// Every rule group's rules, as Prometheus evaluates them.
    async fn rules(&self) -> Vec<Value> {
        self.api("/api/v1/rules").await["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until Prometheus has scraped the orchestrator for `samples` times.
    pub(crate) async fn wait_for_scrapes(&self, samples: u32) {
        wait_until(
            "Prometheus scrapes the orchestrator",
            Duration::from_secs(60),
            || async {
                let scraped = self
                    .value(r#"count_over_time(up{job="fleetlaps-orchestrator"}[5m])"#)
                    .await
                    .unwrap_or(0.0);
                let up = self.value(r#"min(up{job="fleetlaps-orchestrator"})"#).await;
                (scraped >= f64::from(samples) && up == Some(1.0)).then_some(())
            },
        )
        .await;
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What Grafana puts in place of `$__rate_interval` at a 1 s scrape interval, roughly.
const RATE_INTERVAL: &str = "15s";

#[tokio::test]
async fn every_dashboard_query_and_alert_expression_returns_data_from_a_real_prometheus() {
    // Arrange: an orchestrator with a simulated fleet, a password read, a breach campaign.
    const DEVICES: usize = 20;
    let nats = crate::simulate::nats_with_simulator();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Prometheus first, as in production: it sees every backup and rotation happen.
    let prometheus = TestPrometheus::start(&orchestrator.metrics_target()).await;
    prometheus.wait_for_scrapes(1).await;
    let config = crate::simulate::simulator_config(&nats, &dir.path().join("simulator"));
    let simulation = crate::simulate::backed_up_fleet(&orchestrator, DEVICES, &config).await;
    let device_id = simulation.device_ids()[0].clone();
    let reader = orchestrator
        .create_token(
            ADMIN_TOKEN,
            json!({"name": "monitoring-check", "scopes": ["DeviceLocalCredential.Read.All", "Breach.Declare"]}),
        )
        .await
        .0;
    orchestrator.wait_for_passwords(&device_id, 1).await;
    let read = orchestrator
        .get(
            &format!("/v1.0/directory/deviceLocalCredentials/{device_id}?$select=credentials"),
            Some(&reader),
        )
        .await;
    assert_eq!(read.status(), StatusCode::OK);
    let deadline = Utc::now() + chrono::Duration::hours(1);
    let declared = orchestrator
        .request(
            reqwest::Method::POST,
            "/v1.0/fleetlaps/breaches",
            &reader,
            Some(json!({"reason": "dashboards", "deadline": deadline, "scope": {"kind": "all"}})),
        )
        .await;
    assert_eq!(declared.status(), StatusCode::CREATED);
    wait_until(
        "every campaign rotation is counted",
        Duration::from_secs(120),
        || async {
            let rotated = orchestrator
                .metric(r#"fleetlaps_rotations_total{trigger="campaign"}"#)
                .await;
            (rotated >= DEVICES as f64).then_some(())
        },
    )
    .await;

    // Act: Prometheus scrapes for a while.
    prometheus.wait_for_scrapes(20).await;

    // Assert: the headline figures are the fleet's: every backup stored, the campaign complete,
    // every device compliant.
    let figure = |query: &'static str| async { prometheus.value(query).await };
    assert_eq!(
        figure(r#"sum(increase(fleetlaps_backups_confirmed_total{outcome="stored"}[1h])) / sum(increase(fleetlaps_backups_confirmed_total[1h]))"#).await,
        Some(1.0),
        "backup success"
    );
    assert_eq!(
        figure(r#"sum(fleetlaps_campaign_devices{campaign_state="completed",device_state="rotated"})"#).await,
        Some(DEVICES as f64)
    );
    assert_eq!(
        figure(r#"sum(fleetlaps_devices{state="compliant"})"#).await,
        Some(DEVICES as f64)
    );

    // And every panel query and every alert's query returns data; every rule evaluates.
    let mut empty = Vec::new();
    for (file, title, expr) in panel_queries() {
        let query = expr.replace("$__rate_interval", RATE_INTERVAL);
        if prometheus.query(&query).await.is_empty() {
            empty.push(format!("{file}: {title}: {query}"));
        }
    }
    for (alert, expr) in alert_rules() {
        let (query, _, _) = split_alert(&expr).expect("linted");
        if prometheus.query(query).await.is_empty() {
            empty.push(format!("alert {alert}: {query}"));
        }
    }
    assert!(empty.is_empty(), "queries without data:\n{}", empty.join("\n"));
    let rules = prometheus.rules().await;
    assert_eq!(rules.len(), alert_rules().len(), "Prometheus loaded every rule");
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    drop(simulation);
}

#[tokio::test]
async fn a_burst_of_refused_messages_fires_the_quarantine_spike_alert() {
    // Arrange: an orchestrator scraped by Prometheus, nothing refused yet.
    let nats = crate::harness::TestNats::start();
    let orchestrator = TestOrchestrator::spawn(&nats).await;
    let prometheus = TestPrometheus::start(&orchestrator.metrics_target()).await;
    prometheus.wait_for_scrapes(3).await;
    assert!(!prometheus.firing().await.contains(QUARANTINE_SPIKE));

    // Act: 50 messages that are not events arrive on the stream.
    crate::apps::publish_noise(&nats, 50).await;

    // Assert: they are quarantined, and the alert fires.
    wait_until("the quarantine spike alert fires", Duration::from_secs(60), || async {
        prometheus.firing().await.contains(QUARANTINE_SPIKE).then_some(())
    })
    .await;
    assert!(
        orchestrator
            .metric(r#"fleetlaps_events_quarantined_total{reason="unknown_subject"}"#)
            .await
            >= 50.0
    );
}

/// The alert of `alerts.yml` for many refused messages at once.
const QUARANTINE_SPIKE: &str = "FleetlapsQuarantineSpike";

#[tokio::test]
async fn a_device_stopped_longer_than_the_silence_threshold_shows_as_silent_and_fires_its_alert() {
    // Arrange: a device beating every second, silent after five; Prometheus scraping.
    const SILENT_AFTER_SECS: u64 = 5;
    let nats = crate::harness::TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_config(
        &nats,
        &format!("[monitoring]\nsilent_after_secs = {SILENT_AFTER_SECS}\n"),
    )
    .await;
    let mut agent = crate::apps::TestAgent::spawn_with(
        &nats,
        &orchestrator,
        crate::apps::AgentOptions {
            processing_interval_secs: 1,
            ..crate::apps::AgentOptions::default()
        },
    )
    .await;
    orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let prometheus = TestPrometheus::start(&orchestrator.metrics_target()).await;
    // Longer than the threshold since its last event: only its heartbeats keep it heard from.
    tokio::time::sleep(Duration::from_secs(SILENT_AFTER_SECS + 3)).await;
    prometheus.wait_for_scrapes(3).await;
    assert_eq!(orchestrator.metric(r#"fleetlaps_devices{state="silent"}"#).await, 0.0);
    assert_eq!(
        orchestrator.metric(r#"fleetlaps_devices{state="compliant"}"#).await,
        1.0
    );
    assert!(!prometheus.firing().await.contains(DEVICES_SILENT));

    // Act: the device stops.
    agent.stop().await;

    // Assert: once the threshold has passed it is silent, and the alert fires.
    wait_until("the device is counted silent", Duration::from_secs(60), || async {
        (orchestrator.metric(r#"fleetlaps_devices{state="silent"}"#).await == 1.0).then_some(())
    })
    .await;
    wait_until("the silent devices alert fires", Duration::from_secs(60), || async {
        prometheus.firing().await.contains(DEVICES_SILENT).then_some(())
    })
    .await;
    assert_eq!(
        prometheus.value(r#"sum(fleetlaps_devices{state="silent"})"#).await,
        Some(1.0)
    );
}

/// The alert of `alerts.yml` for devices neither beating nor sending.
const DEVICES_SILENT: &str = "FleetlapsDevicesSilent";
