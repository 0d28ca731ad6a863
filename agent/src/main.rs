//! `fleetlaps-agent`: the device side of fleetlaps.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetlaps_agent::clock::SystemClock;
use fleetlaps_agent::simulate::{EnrollmentSettings, Simulation, SimulationOptions};
use fleetlaps_agent::{App, Config, control, telemetry};
use fleetlaps_proto::control::{AuthenticationReport, ControlRequest, ControlResponse};
use fleetlaps_proto::event::AuthenticationOutcome;
use fleetlaps_proto::password::Password;
use secrecy::SecretString;

/// The fleetlaps agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The config file (TOML); `FLEETLAPS_AGENT_*` variables override it.
    #[arg(long, global = true, default_value = "/etc/fleetlaps/agent.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device with the orchestrator: make a key pair, send its public half and the
    /// host name over HTTPS with an enrollment token, and keep the identity (device id, key,
    /// escrow key, policy) in the state directory, mode 0600.
    Enroll {
        /// The orchestrator's API, such as https://laps.example.org:8443.
        #[arg(long, value_name = "URL")]
        orchestrator: String,
        /// The enrollment token (`lapsctl enrollment-token create`). Prefer the environment
        /// variable: other local users can see command lines. (Not `FLEETLAPS_*`: those set
        /// config fields.)
        #[arg(long, env = "LAPS_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: SecretString,
        /// Trust only the certificates in this PEM file (a self-signed orchestrator's, or its CA).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Allow an http:// orchestrator URL: the token crosses the network in clear, so only for
        /// a TLS-terminating proxy on this host.
        #[arg(long)]
        insecure_http: bool,
        /// A tag for this device (a site, a group: lower-case letters, digits, '-', '_', '.',
        /// ':'); repeat for several. Breaches can be scoped by tag.
        #[arg(long = "tag", value_name = "TAG", value_parser = parse_tag)]
        tags: Vec<fleetlaps_proto::ids::DeviceTag>,
    },
    /// Run the agent until Ctrl-C or SIGTERM.
    Run,
    /// Rotate the password now (LAPS Reset-LapsPassword).
    Reset,
    /// Run a processing cycle now (LAPS Invoke-LapsPolicyProcessing).
    ProcessNow,
    /// Show the policy, the managed account, the last rotation and what waits (LAPS Get-LapsDiagnostics).
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check whether the password on standard input is the managed account's.
    CheckPassword,
    /// Simulate a fleet in this process, for test and bench fleets: N devices, each enrolled
    /// (once; a restart reuses the identities under `state_dir`), with its own account file and
    /// state, running the agent's own rotation against the real NATS and orchestrator, all
    /// over one NATS connection. The config is the fleet's template (`state_dir`, `[nats]` with
    /// the simulator's nkey seed from `nats-config --simulator-nkey`, `[account] backend =
    /// "file"`, `[policy]`, timings). Runs until Ctrl-C or SIGTERM.
    Simulate {
        /// How many devices: sim-00001 to sim-<N>.
        #[arg(long, value_name = "N")]
        devices: usize,
        /// The orchestrator's API, to enroll the devices not enrolled yet.
        #[arg(long, value_name = "URL", requires = "token")]
        orchestrator: Option<String>,
        /// An enrollment token with a use for each device to enroll (`lapsctl enrollment-token
        /// create --max-uses N`). Prefer the environment variable.
        #[arg(long, env = "LAPS_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: Option<SecretString>,
        /// Trust only the certificates in this PEM file (a self-signed orchestrator's, or its CA).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Allow an http:// orchestrator URL (see `enroll --insecure-http`).
        #[arg(long)]
        insecure_http: bool,
        /// At most this many enrollments at once.
        #[arg(long, default_value_t = 16)]
        enroll_concurrency: usize,
    },
    /// Report an authentication to the agent; run by `pam_exec` (see packaging/pam.d/fleetlaps).
    /// Reads PAM_USER, PAM_SERVICE, PAM_RHOST and PAM_TTY, and always exits 0.
    PamHook {
        /// `success` or `failure`.
        #[arg(value_name = "success|failure")]
        outcome: Option<String>,
    },
}

/// How long the PAM hook waits for the agent: a login waits for the hook.
const PAM_HOOK_TIMEOUT: Duration = Duration::from_secs(3);

/// A `--tag` value, refused with what is allowed.
fn parse_tag(value: &str) -> Result<fleetlaps_proto::ids::DeviceTag, String> {
    fleetlaps_proto::ids::DeviceTag::parse(value).map_err(|err| err.to_string())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One device's agent needs one thread (and the blocking pool, for account changes): the
    // lightest footprint on every device. The fleet simulator runs thousands: every core.
    let mut runtime = match cli.command {
        Command::Simulate { .. } => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = runtime.enable_all().build().context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::PamHook { outcome } = &cli.command {
        // Before the config is loaded: whatever fails, a PAM hook exits 0.
        pam_hook(&cli.config, outcome.as_deref()).await;
        return Ok(());
    }
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Enroll {
            tags,
            orchestrator,
            token,
            ca,
            insecure_http,
        } => {
            telemetry::init(&config.log);
            let device_name = match config.device_name.clone() {
                Some(name) => name,
                None => fleetlaps_agent::app::system_hostname()?,
            };
            let identity = fleetlaps_agent::enroll::enroll(fleetlaps_agent::enroll::EnrollOptions {
                orchestrator_url: &orchestrator,
                token: &token,
                ca_file: ca.as_deref(),
                device_name,
                state_dir: &config.state_dir,
                insecure_http,
                tags,
            })
            .await?;
            println!(
                "enrolled as device {} ({})",
                identity.device_id,
                fleetlaps_agent::identity::Identity::path(&config.state_dir).display()
            );
            Ok(())
        }
        Command::Run => {
            telemetry::init(&config.log);
            let app = App::build(config).await?;
            app.run_until(fleetlaps_agent::app::shutdown_signal()).await
        }
        Command::Simulate {
            devices,
            orchestrator,
            token,
            ca,
            insecure_http,
            enroll_concurrency,
        } => {
            // Each device's info lines times thousands would drown the progress.
            telemetry::init_with_default(&config.log, "warn,fleetlaps_agent::simulate=info");
            let enrollment = match (orchestrator, token) {
                (Some(orchestrator_url), Some(token)) => Some(EnrollmentSettings {
                    orchestrator_url,
                    token,
                    ca_file: ca,
                    insecure_http,
                }),
                _ => None,
            };
            let simulation = Simulation::prepare(
                config,
                SimulationOptions {
                    devices,
                    enrollment,
                    enroll_concurrency,
                    clock: Arc::new(SystemClock),
                    show_progress: true,
                },
            )
            .await?;
            simulation.run_until(fleetlaps_agent::app::shutdown_signal()).await
        }
        Command::Reset => ask(&config, ControlRequest::Reset).await,
        Command::ProcessNow => ask(&config, ControlRequest::ProcessNow).await,
        Command::Status { json } => match control::send(&config.state_dir, &ControlRequest::Status).await? {
            ControlResponse::Status(report) if json => {
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(())
            }
            ControlResponse::Status(report) => {
                print!("{}", fleetlaps_agent::status::render(&report));
                Ok(())
            }
            ControlResponse::Done { message } | ControlResponse::Refused { message } => anyhow::bail!("{message}"),
        },
        Command::PamHook { .. } => Ok(()),
        Command::CheckPassword => {
            let backend = fleetlaps_agent::account::backend(&config.account);
            let policy = match fleetlaps_agent::identity::Identity::load(&config.state_dir)? {
                Some(identity) => fleetlaps_agent::app::effective_policy(&config, &identity)?.0,
                None => config.policy()?,
            };
            let account = backend.resolve(policy.administrator_account_name())?;
            // Wiped once checked, like the password made from it.
            let mut text = zeroize::Zeroizing::new(String::new());
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the password from standard input")?;
            let password = Password::new(text.trim_end_matches(['\r', '\n']).to_owned());
            if backend.verify_password(&account, &password)? {
                println!("the password matches account {}", account.name);
                Ok(())
            } else {
                anyhow::bail!("the password does not match account {}", account.name)
            }
        }
    }
}

async fn ask(config: &Config, request: ControlRequest) -> anyhow::Result<()> {
    match control::send(&config.state_dir, &request).await? {
        ControlResponse::Done { message } => {
            println!("{message}");
            Ok(())
        }
        ControlResponse::Refused { message } => anyhow::bail!("{message}"),
        ControlResponse::Status(_) => anyhow::bail!("the agent answered with a status report"),
    }
}

/// Reports one authentication to the running agent, as `pam_exec` runs it. Never fails: a hook
/// must not lock anyone out, so a problem (the agent is down) is a warning on standard error.
async fn pam_hook(config_path: &Path, outcome: Option<&str>) {
    if let Err(err) = report_authentication(config_path, outcome).await {
        eprintln!("fleetlaps-agent pam-hook: warning: {err:#}");
    }
}

async fn report_authentication(config_path: &Path, outcome: Option<&str>) -> anyhow::Result<()> {
    let outcome = match outcome {
        Some("success") => AuthenticationOutcome::Success,
        Some("failure") => AuthenticationOutcome::Failure,
        other => anyhow::bail!("expected `pam-hook success` or `pam-hook failure`, got {other:?}"),
    };
    // Only the auth stack reports authentications (pam_exec also sets PAM_TYPE elsewhere).
    if std::env::var("PAM_TYPE").is_ok_and(|pam_type| pam_type != "auth") {
        return Ok(());
    }
    let pam_item = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let user = pam_item("PAM_USER").context("PAM_USER is not set: pam-hook is meant to run from pam_exec")?;
    let report = AuthenticationReport {
        user,
        service: pam_item("PAM_SERVICE").unwrap_or_default(),
        remote_host: pam_item("PAM_RHOST"),
        tty: pam_item("PAM_TTY"),
        outcome,
    };
    // The file alone, without FLEETLAPS_* variables: pam_exec hands the hook the PAM
    // environment, which the user logging in can influence.
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading the config file {}", config_path.display()))?;
    let config = Config::from_toml(&text)?;
    let request = ControlRequest::Authentication(report);
    match tokio::time::timeout(PAM_HOOK_TIMEOUT, control::send(&config.state_dir, &request)).await {
        Ok(Ok(ControlResponse::Refused { message })) => anyhow::bail!("the agent refused the report: {message}"),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(err.context("the authentication was not reported")),
        Err(_) => anyhow::bail!("the agent did not answer within {PAM_HOOK_TIMEOUT:?}"),
    }
}
