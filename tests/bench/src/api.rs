//! API under load: `wrk` (a real HTTP load generator) against the running orchestrator's
//! Graph API at 1 and 16 connections, for each fleet size: metadata by id, `$filter` by name and
//! audited password reads. The baseline is `wrk` against `GET /healthz` of the same server, with
//! the same connections, in the same run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use fleetlaps_proto::api::SCOPE_READ_PASSWORDS;
use serde::Deserialize;

use crate::fleet::{Device, Orchestrator};
use crate::report::{Quantity, Row};

const BENCHMARK: &str = "API under load";

/// Devices given a backed-up password, whose audited reads `wrk` cycles through: enough that
/// reads spread over many devices, few enough that backing them up stays quick.
const BACKED_UP_DEVICES: usize = 1_000;

/// The connection counts each endpoint is measured at.
const CONNECTIONS: [u32; 2] = [1, 16];

/// The `wrk` script: sets the bearer token, cycles through the request paths of a file (one per
/// line, each thread from its own random start) and prints the summary as one JSON line.
const WRK_SCRIPT: &str = r#"-- fleetlaps-bench: written by tests/bench/src/api.rs
local paths = {}
local index = 0
local headers = {}

function init(args)
  headers["Authorization"] = "Bearer " .. args[1]
  for line in io.lines(args[2]) do
    paths[#paths + 1] = line
  end
  index = math.random(#paths)
end

function request()
  index = index % #paths + 1
  return wrk.format("GET", paths[index], headers)
end

function done(summary, latency, requests)
  io.write(string.format(
    "BENCH-RESULT {\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p99_us\":%d," ..
    "\"errors_status\":%d,\"errors_connect\":%d,\"errors_read\":%d,\"errors_write\":%d,\"errors_timeout\":%d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
end
"#;

/// What the script's `done` prints after `BENCH-RESULT `.
#[derive(Debug, Clone, Copy, Deserialize)]
struct WrkSummary {
    /// Requests completed.
    requests: u64,
    /// How long the run lasted, in µs.
    duration_us: u64,
    /// Median latency, in µs.
    p50_us: u64,
    /// 99th percentile latency, in µs.
    p99_us: u64,
    /// Answers that were not 2xx or 3xx.
    errors_status: u64,
    /// Connections that failed.
    errors_connect: u64,
    /// Reads that failed.
    errors_read: u64,
    /// Writes that failed.
    errors_write: u64,
    /// Requests that timed out.
    errors_timeout: u64,
}

impl WrkSummary {
    fn p50(self) -> Quantity {
        Quantity::Milliseconds(self.p50_us as f64 / 1e3)
    }

    fn p99(self) -> Quantity {
        Quantity::Milliseconds(self.p99_us as f64 / 1e3)
    }

    fn rate(self) -> Quantity {
        Quantity::RequestsPerSecond(self.requests as f64 / (self.duration_us as f64 / 1e6))
    }
}

/// The benchmark's knobs, from the command line.
pub(crate) struct ApiOptions<'a> {
    /// `wrk`'s executable.
    pub(crate) wrk: &'a Path,
    /// Fleet sizes, ascending: the API devices enrolled before each round of measurements.
    pub(crate) sizes: &'a [u32],
    /// How long each `wrk` run lasts.
    pub(crate) duration: Duration,
    /// Where the script and path files go.
    pub(crate) work: &'a Path,
}

/// One endpoint measured: its name in the report, its paths file, its target at one connection.
struct Endpoint {
    name: &'static str,
    paths: PathBuf,
    target_one_connection: &'static str,
}

/// Runs the benchmark against the running orchestrator: enrolls the devices of each size (16 at a
/// time), backs up [`BACKED_UP_DEVICES`] of them, and measures each endpoint with `wrk`.
pub(crate) async fn run(
    orchestrator: &Orchestrator,
    http: &reqwest::Client,
    simulator: &jetstream::Context,
    reader: &jetstream::Context,
    options: &ApiOptions<'_>,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let dir = options.work.join("api");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("fleetlaps.lua");
    std::fs::write(&script, WRK_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    let token = orchestrator
        .create_token_with(http, "bench-api", &[SCOPE_READ_PASSWORDS])
        .await?;

    let mut devices: Vec<Device> = Vec::new();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut backed_up = 0;
    for &size in options.sizes {
        let missing = size.saturating_sub(devices.len() as u32);
        let progress = crate::bar("API: enrolling devices");
        let first = devices.len() as u32;
        devices.extend(
            orchestrator
                .enroll_many(http, "bench-api", first, missing, &progress)
                .await
                .context("enrolling the API devices")?,
        );
        progress.finish();
        if backed_up < BACKED_UP_DEVICES.min(devices.len()) {
            let progress = crate::bar("API: backing up passwords");
            let wanted = BACKED_UP_DEVICES.min(devices.len());
            progress.set_length((wanted - backed_up) as u64);
            let mut acks = Vec::new();
            for device in &mut devices[backed_up..wanted] {
                acks.push(device.next_backup()?.send(simulator).await?);
            }
            for ack in acks {
                ack.await.context("awaiting JetStream's ack of a backup")?;
                progress.inc(1);
            }
            progress.finish();
            backed_up = wanted;
        }
        crate::wait_caught_up(orchestrator, http, reader).await?;

        let write_paths = |name: &str, paths: &mut dyn Iterator<Item = String>| -> anyhow::Result<PathBuf> {
            let path = dir.join(format!("{name}-{size}.txt"));
            let mut text = String::new();
            for line in paths {
                let _ = writeln!(text, "{line}");
            }
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let health = write_paths("health", &mut std::iter::once("/healthz".to_owned()))?;
        let scrape = write_paths("metrics", &mut std::iter::once("/metrics".to_owned()))?;
        let endpoints = [
            Endpoint {
                name: "metadata by id",
                paths: write_paths(
                    "by-id",
                    &mut devices
                        .iter()
                        .map(|device| format!("/v1.0/directory/deviceLocalCredentials/{}", device.id)),
                )?,
                target_one_connection: "p99 < 2 ms",
            },
            Endpoint {
                name: "$filter by name",
                paths: write_paths(
                    "by-name",
                    &mut devices.iter().map(|device| {
                        format!(
                            "/v1.0/directory/deviceLocalCredentials?$filter=deviceName%20eq%20%27{}%27",
                            device.name
                        )
                    }),
                )?,
                target_one_connection: "as fast as by id",
            },
            Endpoint {
                name: "audited password read",
                paths: write_paths(
                    "credentials",
                    &mut devices[..backed_up].iter().map(|device| {
                        format!(
                            "/v1.0/directory/deviceLocalCredentials/{}?$select=credentials",
                            device.id
                        )
                    }),
                )?,
                target_one_connection: "p99 < 5 ms",
            },
        ];

        let progress = crate::bar("API: wrk runs");
        progress.set_length((CONNECTIONS.len() * (endpoints.len() + 1)) as u64);
        for connections in CONNECTIONS {
            let label = |name: &str| format!("{name}, {size} devices, {connections} conn.");
            let baseline = wrk(options, &script, &token, &health, &orchestrator.base_url, connections)
                .context("baseline: wrk against /healthz")?
                .context("baseline: wrk completed no request of /healthz")?;
            progress.inc(1);
            if connections == 1 {
                // A Prometheus scrape: the fleet metrics read every device record each time.
                let metrics_base = orchestrator.metrics_url.trim_end_matches("/metrics");
                let scraped = wrk(options, &script, &token, &scrape, metrics_base, connections)
                    .context("wrk against /metrics")?
                    .context("wrk completed no scrape of /metrics")?;
                rows.push(Row::new(
                    BENCHMARK,
                    &format!("a /metrics scrape, {size} devices, p50"),
                    scraped.p50(),
                    "GET /healthz p50",
                    baseline.p50(),
                    "—",
                ));
            }
            let mut by_id = None;
            for endpoint in &endpoints {
                let measured = wrk(
                    options,
                    &script,
                    &token,
                    &endpoint.paths,
                    &orchestrator.base_url,
                    connections,
                )
                .with_context(|| format!("wrk: {}", endpoint.name))?;
                progress.inc(1);
                let Some(measured) = measured else {
                    notes.push(format!(
                        "API: {}: wrk completed no request within its {} s (each took longer, or the server stalled), \
                         so it has no figures.",
                        label(endpoint.name),
                        options.duration.as_secs()
                    ));
                    continue;
                };
                let target = |figure: &str| match (connections, figure) {
                    (1, "p99") => endpoint.target_one_connection,
                    _ => "—",
                };
                let name = label(endpoint.name);
                rows.push(Row::new(
                    BENCHMARK,
                    &format!("{name} p50"),
                    measured.p50(),
                    "GET /healthz p50",
                    baseline.p50(),
                    "—",
                ));
                rows.push(Row::new(
                    BENCHMARK,
                    &format!("{name} p99"),
                    measured.p99(),
                    "GET /healthz p99",
                    baseline.p99(),
                    if endpoint.name == "$filter by name" {
                        "—"
                    } else {
                        target("p99")
                    },
                ));
                rows.push(Row::new(
                    BENCHMARK,
                    &format!("{name} rate"),
                    measured.rate(),
                    "GET /healthz rate",
                    baseline.rate(),
                    "—",
                ));
                match (endpoint.name, by_id) {
                    ("metadata by id", _) => by_id = Some(measured),
                    ("$filter by name", Some(by_id)) => rows.push(Row::new(
                        BENCHMARK,
                        &format!("{name} p50 against by id"),
                        measured.p50(),
                        "metadata by id p50",
                        by_id.p50(),
                        "ratio ≈ 1 (as fast as by id)",
                    )),
                    _ => {}
                }
            }
        }
        progress.finish();
    }
    notes.push(format!(
        "API: wrk {} s per run (threads: 1 at one connection, 2 at 16), plain HTTP with keep-alive, \
         each thread cycling through the devices' paths; audited reads cycle over the {backed_up} devices \
         with a backed-up password, each read appending a `password_read` event before it answers. \
         Fleet sizes count the API benchmark's own devices (the other benchmarks' devices, a few hundred, are enrolled too). \
         The baseline, /healthz, is unauthenticated: it measures the server, not the token check.",
        options.duration.as_secs()
    ));
    Ok((rows, notes))
}

/// Runs `wrk` with the script for `connections` connections over `paths`; its summary, or `None`
/// when no request completed within the run. Fails when any answer was not 2xx or any socket
/// error happened: a figure of failures measures nothing.
fn wrk(
    options: &ApiOptions<'_>,
    script: &Path,
    token: &str,
    paths: &Path,
    base_url: &str,
    connections: u32,
) -> anyhow::Result<Option<WrkSummary>> {
    let threads = connections.min(2);
    let output = Command::new(options.wrk)
        .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", options.duration.as_secs().max(1))])
        .args(["--timeout", "10s", "-s"])
        .arg(script)
        .arg(base_url)
        .arg("--")
        .arg(token)
        .arg(paths)
        .output()
        .with_context(|| format!("running {}", options.wrk.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {} {}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("BENCH-RESULT "))
        .with_context(|| format!("wrk printed no summary: {}", stdout.trim()))?;
    let summary: WrkSummary = serde_json::from_str(line).with_context(|| format!("wrk's summary {line}"))?;
    let socket_errors = summary.errors_connect + summary.errors_read + summary.errors_write + summary.errors_timeout;
    if summary.errors_status == 0 && socket_errors == 0 && summary.requests == 0 {
        return Ok(None);
    }
    if summary.errors_status > 0 || socket_errors > 0 {
        bail!(
            "wrk over {}: {} requests, {} answers not 2xx, {socket_errors} socket errors; see the orchestrator's log",
            paths.display(),
            summary.requests,
            summary.errors_status
        );
    }
    Ok(Some(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_summary_line_decodes_into_latencies_and_a_rate() {
        let line = r#"{"requests":2000,"duration_us":2000000,"p50_us":150,"p99_us":1200,"errors_status":0,"errors_connect":0,"errors_read":0,"errors_write":0,"errors_timeout":0}"#;
        let summary: WrkSummary = serde_json::from_str(line).expect("decodes");
        assert_eq!(summary.p50(), Quantity::Milliseconds(0.15));
        assert_eq!(summary.p99(), Quantity::Milliseconds(1.2));
        assert_eq!(summary.rate(), Quantity::RequestsPerSecond(1000.0));
        assert!(
            WRK_SCRIPT.contains("BENCH-RESULT "),
            "the script prints what run() looks for"
        );
    }
}
