//! `cargo xtask bench`: builds the release binaries (and the agent as shipped to devices) and runs
//! `fleetlaps-bench`, which starts its own nats-server and orchestrator and writes
//! `target/bench/report.md` and `report.json`.

use crate::tools::{self, NATS_SERVER, WRK};

/// Installs nats-server and wrk if needed, builds the release binaries and the agent as shipped to
/// devices (`--profile device`), runs the benchmarks with `bench_args` appended (for example
/// `--events 100000`).
pub(crate) fn run(bench_args: &[String]) -> anyhow::Result<()> {
    tools::step("ensure system tools: nats-server, wrk");
    tools::ensure_system_tools(&[NATS_SERVER, WRK])?;
    tools::run_step(&mut tools::cargo_command([
        "build",
        "--release",
        "--bins",
        "-p",
        "fleetlaps-orchestrator",
        "-p",
        "fleetlaps-agent",
        "-p",
        "fleetlaps-bench",
    ]))?;
    // The agent as shipped to devices, whose memory the footprint measures.
    tools::run_step(&mut tools::cargo_command([
        "build",
        "--profile",
        "device",
        "--bin",
        "fleetlaps-agent",
        "-p",
        "fleetlaps-agent",
    ]))?;
    let bin_dir = tools::target_dir().join("release");
    tools::run_step(
        std::process::Command::new(bin_dir.join("fleetlaps-bench"))
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--device-agent")
            .arg(tools::target_dir().join("device").join("fleetlaps-agent"))
            .arg("--out")
            .arg(tools::target_dir().join("bench"))
            .arg("--nats-server")
            .arg(NATS_SERVER.path()?)
            .arg("--wrk")
            .arg(WRK.path()?)
            .args(bench_args),
    )
}
