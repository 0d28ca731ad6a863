//! `fleetlaps-orchestrator`: consumes the fleet's events and serves the password API.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetlaps_orchestrator::{App, Config, app, escrow, nats_auth, telemetry};

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
    /// Print the nats-server configuration: JetStream, and a user with its permissions for the
    /// orchestrator and for each device.
    NatsConfig {
        /// The orchestrator's nkey public key (`nkey --seed-file` prints it).
        #[arg(long, value_name = "NKEY_PUBLIC_KEY")]
        orchestrator_nkey: String,
        /// An enrolled device; repeat for each one.
        #[arg(long = "device", value_name = "DEVICE_ID=NKEY_PUBLIC_KEY")]
        devices: Vec<String>,
        /// A file of `DEVICE_ID=NKEY_PUBLIC_KEY` lines (`#` comments and blank lines skipped).
        #[arg(long)]
        devices_file: Option<PathBuf>,
        /// Where nats-server listens for clients.
        #[arg(long, default_value = nats_auth::DEFAULT_LISTEN)]
        listen: String,
        /// JetStream's store directory.
        #[arg(long, default_value = nats_auth::DEFAULT_STORE_DIR)]
        store_dir: PathBuf,
    },
    /// Print the SHA-256 of an API token read from standard input, for `[[tokens]] token_sha256`.
    HashToken,
    /// Print the public key of an nkey seed file, creating the file (mode 0600) with a new user
    /// seed if it does not exist.
    Nkey {
        /// The seed file, as named by `nats.nkey_seed_file`.
        #[arg(long)]
        seed_file: PathBuf,
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
            let key = escrow::open(&config)?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::NatsConfig {
            orchestrator_nkey,
            devices,
            devices_file,
            listen,
            store_dir,
        } => {
            let mut device_users = devices
                .iter()
                .enumerate()
                .map(|(index, entry)| nats_auth::DeviceUser::parse(entry, &format!("--device #{}", index + 1)))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(path) = devices_file {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                device_users.extend(nats_auth::parse_devices_file(&text, &path.display().to_string())?);
            }
            let config = nats_auth::ServerConfig {
                listen,
                store_dir,
                orchestrator: nats_auth::NkeyPublicKey::parse(&orchestrator_nkey, "--orchestrator-nkey")?,
                devices: device_users,
            };
            print!("{}", config.render()?);
            Ok(())
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .context("reading the token from standard input")?;
            let token = token.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!token.is_empty(), "no token on standard input: pipe the token in");
            println!("{}", fleetlaps_orchestrator::auth::token_sha256(token));
            Ok(())
        }
        Command::Nkey { seed_file } => {
            println!("{}", nats_auth::ensure_seed_file(&seed_file)?);
            Ok(())
        }
    }
}
