//! The report: each figure beside the baseline measured in the same run and their ratio, written
//! as `report.md` (a table) and `report.json`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

/// A measured quantity with its unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "unit", content = "value")]
pub(crate) enum Quantity {
    /// A rate: events per second (more is better).
    #[serde(rename = "events/s")]
    EventsPerSecond(f64),
    /// A latency in milliseconds (less is better).
    #[serde(rename = "ms")]
    Milliseconds(f64),
    /// A rate of HTTP requests per second (more is better).
    #[serde(rename = "requests/s")]
    RequestsPerSecond(f64),
    /// A size in bytes, such as storage per event (less is better).
    #[serde(rename = "bytes")]
    Bytes(f64),
    /// A size in mebibytes (2^20 bytes), such as a resident set (less is better).
    #[serde(rename = "MiB")]
    Mebibytes(f64),
    /// A span of time in seconds, such as a whole campaign (less is better).
    #[serde(rename = "s")]
    Seconds(f64),
}

impl Quantity {
    /// A latency from a duration.
    pub(crate) fn latency(duration: Duration) -> Self {
        Self::Milliseconds(duration.as_secs_f64() * 1e3)
    }

    /// A size from a count of bytes, in MiB.
    pub(crate) fn mebibytes(bytes: f64) -> Self {
        Self::Mebibytes(bytes / (1024.0 * 1024.0))
    }

    fn value(self) -> f64 {
        match self {
            Self::EventsPerSecond(value)
            | Self::Milliseconds(value)
            | Self::RequestsPerSecond(value)
            | Self::Bytes(value)
            | Self::Mebibytes(value)
            | Self::Seconds(value) => value,
        }
    }

    fn render(self) -> String {
        match self {
            Self::EventsPerSecond(value) => format!("{} events/s", group_thousands(value.round())),
            Self::Milliseconds(value) => format!("{value:.2} ms"),
            Self::RequestsPerSecond(value) => format!("{} requests/s", group_thousands(value.round())),
            Self::Bytes(value) => format!("{} bytes", group_thousands(value.round())),
            Self::Mebibytes(value) => format!("{value:.1} MiB"),
            Self::Seconds(value) => format!("{value:.2} s"),
        }
    }
}

/// One line of the report: a figure of fleetlaps and the baseline it is compared with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Row {
    /// The benchmark, such as `ingest (pre-filled)`.
    pub(crate) benchmark: String,
    /// What is measured, such as `orchestrator catch-up` or `POST tokens p50`.
    pub(crate) figure: String,
    /// Its value.
    pub(crate) measured: Quantity,
    /// What the baseline is, such as `raw JetStream pull consumer`.
    pub(crate) baseline_name: String,
    /// The baseline's value, in the same unit.
    pub(crate) baseline: Quantity,
    /// `measured / baseline`.
    pub(crate) ratio: f64,
    /// The target, in words (`ratio ≥ 0.5`, `p50 < 10 ms`).
    pub(crate) target: String,
}

impl Row {
    /// A row with its ratio computed.
    pub(crate) fn new(
        benchmark: &str,
        figure: &str,
        measured: Quantity,
        baseline_name: &str,
        baseline: Quantity,
        target: &str,
    ) -> Self {
        Self {
            benchmark: benchmark.to_owned(),
            figure: figure.to_owned(),
            measured,
            baseline_name: baseline_name.to_owned(),
            baseline,
            ratio: ratio(measured.value(), baseline.value()),
            target: target.to_owned(),
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// When the run started (RFC 3339, UTC).
    pub(crate) started: String,
    /// The parameters of the run (events, devices, repetitions).
    pub(crate) parameters: serde_json::Value,
    /// The figures.
    pub(crate) rows: Vec<Row>,
    /// Further observations, one sentence each (CPU per event, message sizes, what was skipped).
    pub(crate) notes: Vec<String>,
}

impl Report {
    /// The markdown report: a heading, a table and the notes.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# fleetlaps benchmarks\n");
        let _ = writeln!(
            out,
            "Run started {}; parameters: `{}`.\n",
            self.started, self.parameters
        );
        let _ = writeln!(
            out,
            "Every ratio is the figure divided by its baseline, both measured in this run on this machine.\n"
        );
        let _ = writeln!(out, "| Benchmark | Figure | Baseline | Ratio | Target |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        for row in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {}: {} | {}: {} | {:.3} | {} |",
                row.benchmark,
                row.figure,
                row.measured.render(),
                row.baseline_name,
                row.baseline.render(),
                row.ratio,
                row.target
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }

    /// Writes `report.md` and `report.json` into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let markdown = dir.join("report.md");
        std::fs::write(&markdown, self.markdown()).with_context(|| format!("writing {}", markdown.display()))?;
        let json = dir.join("report.json");
        let text = serde_json::to_string_pretty(self).context("serialising the report")?;
        std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))
    }
}

/// `measured / baseline`, or NaN when the baseline is 0 (serialised as `null`).
fn ratio(measured: f64, baseline: f64) -> f64 {
    if baseline == 0.0 { f64::NAN } else { measured / baseline }
}

/// The `p`-th percentile (0 < p ≤ 100) of `samples` by the nearest-rank method: the smallest
/// sample with at least `p` % of the samples at or below it. `None` without samples.
pub(crate) fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `1234567` as `1,234,567`.
fn group_thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|value| Duration::from_millis(*value)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank_whatever_the_order() {
        let samples = ms(&[5, 1, 4, 2, 3, 10, 9, 8, 7, 6]);
        assert_eq!(percentile(&samples, 50.0), Some(Duration::from_millis(5)));
        assert_eq!(percentile(&samples, 99.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&samples, 10.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&ms(&[7]), 99.0), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&[], 50.0), None);
        let hundred: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&hundred, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&hundred, 50.0), Some(Duration::from_millis(50)));
    }

    #[test]
    fn every_unit_renders_with_its_name() {
        assert_eq!(Quantity::RequestsPerSecond(12_345.6).render(), "12,346 requests/s");
        assert_eq!(Quantity::Bytes(1_536.2).render(), "1,536 bytes");
        assert_eq!(Quantity::mebibytes(3.0 * 1024.0 * 1024.0).render(), "3.0 MiB");
        assert_eq!(Quantity::Seconds(1.234).render(), "1.23 s");
        assert_eq!(
            serde_json::to_value(Quantity::Bytes(10.0)).expect("serialises"),
            serde_json::json!({"unit": "bytes", "value": 10.0})
        );
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(0.0), "0");
        assert_eq!(group_thousands(999.0), "999");
        assert_eq!(group_thousands(1000.0), "1,000");
        assert_eq!(group_thousands(1_234_567.0), "1,234,567");
        assert_eq!(group_thousands(-12_345.0), "-12,345");
    }

    fn report() -> Report {
        Report {
            started: "2026-12-02T12:00:00Z".to_owned(),
            parameters: serde_json::json!({"events": 20000}),
            rows: vec![
                Row::new(
                    "ingest",
                    "orchestrator catch-up",
                    Quantity::EventsPerSecond(2500.4),
                    "raw pull consumer",
                    Quantity::EventsPerSecond(100_000.0),
                    "ratio ≥ 0.5",
                ),
                Row::new(
                    "lone writes",
                    "POST tokens p50",
                    Quantity::latency(Duration::from_micros(4_250)),
                    "JetStream publish p50",
                    Quantity::Milliseconds(0.0),
                    "p50 < 10 ms",
                ),
            ],
            notes: vec!["12.0 µs of CPU per event".to_owned()],
        }
    }

    #[test]
    fn the_markdown_table_shows_figure_baseline_ratio_and_target() {
        let markdown = report().markdown();
        assert!(markdown.contains("| Benchmark | Figure | Baseline | Ratio | Target |\n|---|---|---|---|---|\n"));
        assert!(markdown.contains(
            "| ingest | orchestrator catch-up: 2,500 events/s | raw pull consumer: 100,000 events/s | 0.025 | ratio ≥ 0.5 |"
        ));
        assert!(markdown.contains(
            "| lone writes | POST tokens p50: 4.25 ms | JetStream publish p50: 0.00 ms | NaN | p50 < 10 ms |"
        ));
        assert!(markdown.ends_with("- 12.0 µs of CPU per event\n"));
    }

    #[test]
    fn the_json_report_keeps_units_and_an_undefined_ratio_as_null() {
        let json = serde_json::to_value(report()).expect("serialises");
        assert_eq!(
            json["rows"][0]["measured"],
            serde_json::json!({"unit": "events/s", "value": 2500.4})
        );
        let ratio = json["rows"][0]["ratio"].as_f64().expect("a number");
        assert!((ratio - 0.025004).abs() < 1e-12, "{ratio}");
        assert_eq!(
            json["rows"][1]["measured"],
            serde_json::json!({"unit": "ms", "value": 4.25})
        );
        assert_eq!(json["rows"][1]["ratio"], serde_json::Value::Null);
        assert_eq!(json["parameters"]["events"], 20000);
    }
}
