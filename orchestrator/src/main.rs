//! `fleetlaps-orchestrator`: consumes the fleet's events and serves the password API.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fleetlaps_orchestrator::{App, Config, app, escrow, telemetry};

/// The fleetlaps orchestrator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume events and serve the API until Ctrl-C or SIGTERM.
    Run {
        /// The config file (TOML); `FLEETLAPS_*` variables override it.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the escrow public key agents seal passwords to (creating the key if missing).
    EscrowPublicKey {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            telemetry::init(&config.log);
            let app = App::build(config).await?;
            app.run_until(app::shutdown_signal()).await
        }
        Command::EscrowPublicKey { config } => {
            let config = Config::load(&config)?;
            let key = escrow::load_or_create(&config.data_dir.join(escrow::KEY_FILE))?;
            println!("{}", key.public_key());
            Ok(())
        }
    }
}
