//! `fleetlaps-agent`: the device side of fleetlaps.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetlaps_agent::account::{AccountBackend, FileAccounts};
use fleetlaps_agent::config::AccountConfig;
use fleetlaps_agent::{App, Config, control, telemetry};
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::password::Password;

/// The fleetlaps agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The config file (TOML); `FLEETLAPS_*` variables override it.
    #[arg(long, global = true, default_value = "/etc/fleetlaps/agent.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until Ctrl-C or SIGTERM.
    Run,
    /// Rotate the password now (LAPS Reset-LapsPassword).
    Reset,
    /// Run a processing cycle now (LAPS Invoke-LapsPolicyProcessing).
    ProcessNow,
    /// Check whether the password on standard input is the managed account's (file backend).
    CheckPassword,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Run => {
            telemetry::init(&config.log);
            let app = App::build(config).await?;
            app.run_until(fleetlaps_agent::app::shutdown_signal()).await
        }
        Command::Reset => ask(&config, ControlRequest::Reset).await,
        Command::ProcessNow => ask(&config, ControlRequest::ProcessNow).await,
        Command::CheckPassword => {
            let AccountConfig::File { path } = &config.account;
            let backend = FileAccounts::new(path);
            let account = backend.resolve(config.policy()?.administrator_account_name())?;
            let mut text = String::new();
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
    }
}
