//! Developer tasks for fleetlaps, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! The xtask is plain Rust so that CI and developers run the same steps on any machine that has a
//! Rust toolchain; it installs the system tools the tests need itself.
//!
//! Layout:
//! - `test`: the CI gate (install tools, fmt, clippy, doc, build, test).
//! - `demo`: starts a JetStream server and a small fleet on loopback.
//! - `bench`: builds the release binaries and runs `fleetlaps-bench` (report under `target/bench/`).
//! - `tools`: shared pieces: finding and installing system tools, free ports, child-process guards.

mod bench;
mod demo;
mod test;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer tasks for fleetlaps.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Installs the system tools, then runs fmt, clippy, doc, build and the tests, stopping at the
    /// first failure. This is exactly what CI runs.
    Test {
        /// Extra arguments appended to `cargo test --workspace --locked`, for example a test name
        /// filter (`cargo xtask test -- rotation`) or `-- --nocapture` for the test harness.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Starts nats-server with JetStream under `target/demo/`, builds the release binaries, runs a
    /// small fleet against it, shows a password retrieved and checked, then shuts everything down.
    Demo {
        /// Keep the fleet running after the walk-through, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Builds the release binaries and runs the benchmarks against a real nats-server and the
    /// release orchestrator; writes `target/bench/report.md` and `report.json`. Every figure is a
    /// ratio to a baseline measured in the same run.
    Bench {
        /// Arguments for `fleetlaps-bench`, for example `cargo xtask bench -- --events 100000`.
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Test { cargo_test_args } => test::run(&cargo_test_args),
        Task::Demo { keep_running } => demo::run(keep_running),
        Task::Bench { bench_args } => bench::run(&bench_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
