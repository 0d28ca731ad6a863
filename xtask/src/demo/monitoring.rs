//! The monitoring part of the demo: a Prometheus scraping the orchestrator with the alert rules
//! of `dashboards/prometheus/alerts.yml`, and the dashboards' questions asked of it with
//! `promtool query instant`, as a Grafana panel would.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::DemoEnv;
use crate::tools::{self, ChildGuard, Interrupt, PROMETHEUS, PROMTOOL};

/// How long Prometheus may take to see what the demo waits for (a first scrape, an alert: the
/// silence threshold, a scrape, an evaluation).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

/// A running Prometheus and its address.
pub(crate) struct DemoPrometheus {
    /// Stops it when dropped.
    _guard: ChildGuard,
    /// `http://127.0.0.1:<port>`.
    pub(crate) url: String,
}

/// Starts Prometheus scraping the orchestrator's metrics listener every two seconds, evaluating
/// the alert rules of `dashboards/prometheus/alerts.yml`, its store under `target/demo/prometheus/`.
pub(crate) fn start(env: &DemoEnv, metrics_port: u16) -> anyhow::Result<DemoPrometheus> {
    let dir = env.root.join("prometheus");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let rules = tools::workspace_root().join("dashboards/prometheus/alerts.yml");
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
  - "{rules}"
scrape_configs:
  - job_name: fleetlaps-orchestrator
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"#,
            rules = rules.display()
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let port = tools::free_loopback_port()?;
    let url = format!("http://127.0.0.1:{port}");
    tools::step(&format!(
        "start Prometheus at {url}: it scrapes the orchestrator every 2 s and evaluates the alert rules of {} \
         (config {})",
        rules.display(),
        config.display()
    ));
    let log = fs::File::create(dir.join("prometheus.log")).context("creating the Prometheus log")?;
    let mut guard = ChildGuard::spawn(
        "prometheus",
        Command::new(PROMETHEUS.path()?)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    tools::wait_until_listening(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(60),
        &mut guard,
        &env.interrupt,
    )?;
    let prometheus = DemoPrometheus { _guard: guard, url };
    prometheus.wait_for_answer(
        r#"up{job="fleetlaps-orchestrator"} == 1"#,
        "its first scrape of the orchestrator",
        &env.interrupt,
    )?;
    Ok(prometheus)
}

/// What the dashboards show, asked of Prometheus: each question, then its query's answer.
const QUESTIONS: [(&str, &str); 7] = [
    (
        "Backup success over the last hour (Fleet backup health)",
        r#"sum(increase(fleetlaps_backups_confirmed_total{outcome="stored"}[1h])) / sum(increase(fleetlaps_backups_confirmed_total[1h]))"#,
    ),
    ("Devices by state", "sum by (state) (fleetlaps_devices)"),
    (
        "Rotations by trigger",
        "sum by (trigger) (fleetlaps_rotations_total) > 0",
    ),
    (
        "Breach campaigns by state (Breach response)",
        "sum by (state) (fleetlaps_campaigns) > 0",
    ),
    (
        "Seconds from the declaration to the rotation, 90th percentile",
        "histogram_quantile(0.9, sum by (le) (fleetlaps_campaign_rotation_seconds_bucket))",
    ),
    (
        "Events ingested by outcome (Orchestrator)",
        "sum by (outcome) (fleetlaps_events_ingested_total)",
    ),
    ("Alerts firing", r#"ALERTS{alertstate="firing"}"#),
];

impl DemoPrometheus {
    /// Asks each of the dashboards' questions and prints the answers.
    pub(crate) fn show(&self) -> anyhow::Result<()> {
        tools::step(&format!(
            "monitoring: the dashboards' questions, asked of Prometheus ({}) with promtool query instant",
            self.url
        ));
        for (question, query) in QUESTIONS {
            let answer = self.query(query)?;
            println!("{question}:");
            if answer.trim().is_empty() {
                println!("    (none)");
            }
            for line in answer.lines().filter(|line| !line.trim().is_empty()) {
                println!("    {line}");
            }
        }
        println!(
            "Grafana: import dashboards/grafana/*.json and pick this Prometheus ({}) in their datasource variable",
            self.url
        );
        Ok(())
    }

    /// Waits until the alert `name` fires.
    pub(crate) fn wait_for_alert(&self, name: &str, interrupt: &Interrupt) -> anyhow::Result<()> {
        let query = format!(r#"ALERTS{{alertname="{name}",alertstate="firing"}}"#);
        self.wait_for_answer(&query, &format!("{name} to fire"), interrupt)
    }

    /// Waits until `query` has an answer; `what` says what is awaited, for the error.
    fn wait_for_answer(&self, query: &str, what: &str, interrupt: &Interrupt) -> anyhow::Result<()> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while self.query(query)?.trim().is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "Prometheus did not see {what} within {ANSWER_TIMEOUT:?}"
            );
            interrupt.sleep(Duration::from_secs(1))?;
        }
        Ok(())
    }

    /// Shows the silent devices and the alert that fired for them.
    pub(crate) fn show_silent(&self) -> anyhow::Result<()> {
        for (question, query) in [
            ("Silent devices", r#"sum(fleetlaps_devices{state="silent"})"#),
            ("Alerts firing", r#"ALERTS{alertstate="firing"}"#),
        ] {
            println!("{question}:");
            for line in self.query(query)?.lines() {
                println!("    {line}");
            }
        }
        Ok(())
    }

    /// The answer to `query` now, as promtool prints it.
    fn query(&self, query: &str) -> anyhow::Result<String> {
        let output = Command::new(PROMTOOL.path()?)
            .args(["query", "instant", &self.url, query])
            .output()
            .context("running promtool query instant")?;
        anyhow::ensure!(
            output.status.success(),
            "promtool query instant {query}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
