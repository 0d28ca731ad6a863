//! `fleetlaps-orchestrator`: consumes the fleet's events and serves the password API.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetlaps_orchestrator::{App, Config, app, escrow, key_ceremony, nats_auth, telemetry};

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
    /// Print the escrow public key agents seal passwords to (the key is made by the first start).
    EscrowPublicKey {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// The escrow key's life: rotate it, make an offline recovery key.
    Escrow {
        #[command(subcommand)]
        command: EscrowCommand,
    },
    /// Break-glass: the escrow key is lost. Opens every backup's copy sealed to the offline
    /// recovery key, seals it to a new escrow key and records that; then start the orchestrator.
    Recover {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The offline recovery secret key file (`escrow recovery-key --out` wrote it).
        #[arg(long)]
        recovery_key: PathBuf,
    },
    /// Rebuild every projection from the history into a fresh directory (the live ones are left
    /// alone), up to an instant with --until: the state as it was then. Prints the digest, which
    /// equals the live projections' when the whole history is replayed.
    Replay {
        /// The config file (TOML): NATS, and the data directory with the escrow key.
        #[arg(long)]
        config: PathBuf,
        /// Where to write the projections: a new or empty directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replay only the messages stored at or before this instant (RFC 3339).
        #[arg(long, value_name = "TIME")]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Check every signature, taking none of the orchestrator's attestations of the
        /// signatures it verified (`signatures_verified`): slower, trusting only the keys.
        #[arg(long)]
        verify_every_signature: bool,
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
        /// TEST AND BENCH FLEETS ONLY, NEVER PRODUCTION: add a user for the fleet simulator
        /// (`fleetlaps-agent simulate`) with this nkey, allowed every device's subjects.
        #[arg(long, value_name = "NKEY_PUBLIC_KEY")]
        simulator_nkey: Option<String>,
        /// Where nats-server listens for clients.
        #[arg(long, default_value = nats_auth::DEFAULT_LISTEN)]
        listen: String,
        /// JetStream's store directory.
        #[arg(long, default_value = nats_auth::DEFAULT_STORE_DIR)]
        store_dir: PathBuf,
        /// The nats-server version the file is for (`2.9`, `2.10.4`): from 2.10 on the store is
        /// synced before each acknowledgement. Without it, `nats-server --version` is asked.
        #[arg(long, value_name = "VERSION")]
        server_version: Option<String>,
        /// The server's TLS certificate chain (PEM): clients then connect with tls:// URLs.
        #[arg(long, value_name = "PEM_FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The server's TLS private key (PEM).
        #[arg(long, value_name = "PEM_FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The most client connections at once (a fleet needs one per device, plus a few).
        #[arg(long, default_value_t = nats_auth::DEFAULT_MAX_CONNECTIONS)]
        max_connections: u32,
        /// The most disk JetStream may use, in bytes.
        #[arg(long, default_value_t = nats_auth::DEFAULT_MAX_FILE_STORE_BYTES)]
        max_file_store: u64,
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

#[derive(Subcommand)]
enum EscrowCommand {
    /// Make a new escrow key, keeping the old ones to open older backups, and record it; devices
    /// seal to it from their next rotation. Run it with the orchestrator stopped.
    Rotate {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Make an offline recovery key pair: the secret key goes to FILE (0600, never overwritten),
    /// the public key is printed for `escrow_recovery_public_key`.
    RecoveryKey {
        /// Where to write the secret key; keep it offline.
        #[arg(long)]
        out: PathBuf,
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
            let path = escrow::key_path(&config);
            let keyring = escrow::EscrowKeyring::read(&path)?.with_context(|| {
                format!(
                    "no escrow key at {}: start the orchestrator once to create it",
                    path.display()
                )
            })?;
            println!("{}", keyring.public_key());
            Ok(())
        }
        Command::Escrow {
            command: EscrowCommand::Rotate { config },
        } => {
            let config = Config::load(&config)?;
            telemetry::init(&config.log);
            let public_key = key_ceremony::rotate(&config).await?;
            eprintln!(
                "escrow key rotated; back up {} again",
                escrow::key_path(&config).display()
            );
            println!("{public_key}");
            Ok(())
        }
        Command::Escrow {
            command: EscrowCommand::RecoveryKey { out },
        } => {
            let public_key = escrow::create_recovery_key(&out)?;
            eprintln!(
                "recovery secret key written to {}: keep it offline; put the public key below in the config as escrow_recovery_public_key",
                out.display()
            );
            println!("{public_key}");
            Ok(())
        }
        Command::Recover { config, recovery_key } => {
            let config = Config::load(&config)?;
            telemetry::init(&config.log);
            let bar = indicatif::ProgressBar::new(0).with_message("reading the history");
            let report = key_ceremony::recover(&config, &recovery_key, |read, total| {
                bar.set_length(total);
                bar.set_position(read);
            })
            .await?;
            bar.finish_and_clear();
            println!(
                "recovered {} credential(s) of {} device(s); new escrow public key {} replaces the lost {}",
                report.credentials_recovered, report.devices_recovered, report.public_key, report.lost_public_key
            );
            for unrecoverable in &report.unrecoverable {
                println!(
                    "not recovered: device {} backup at stream sequence {}: {}",
                    unrecoverable.device_id, unrecoverable.backup_stream_sequence, unrecoverable.reason
                );
            }
            eprintln!(
                "back up {} now, then start the orchestrator",
                escrow::key_path(&config).display()
            );
            Ok(())
        }
        Command::Replay {
            config,
            out,
            until,
            verify_every_signature,
        } => {
            let config = Config::load(&config)?;
            telemetry::init(&config.log);
            let bar = indicatif::ProgressBar::new(0).with_message("replaying the history");
            let report =
                fleetlaps_orchestrator::replay::replay(&config, &out, until, verify_every_signature, |read, total| {
                    bar.set_length(total);
                    bar.set_position(read);
                })
                .await?;
            bar.finish_and_clear();
            if let Some(broken) = &report.restarted {
                println!("replayed again checking every signature: {broken}");
            }
            println!(
                "replayed {} message(s), up to stream sequence {}, into {}",
                report.messages,
                report.last_sequence,
                out.display()
            );
            println!(
                "signatures taken from the orchestrator's attestations: {} of {} message(s)",
                report.attested, report.messages
            );
            println!("digest {}", report.digest);
            Ok(())
        }
        Command::NatsConfig {
            orchestrator_nkey,
            devices,
            devices_file,
            simulator_nkey,
            listen,
            store_dir,
            server_version,
            tls_cert,
            tls_key,
            max_connections,
            max_file_store,
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
            let server_version = match server_version {
                Some(text) => nats_auth::parse_server_version(&text).with_context(|| {
                    format!("--server-version {text:?}: allowed: MAJOR.MINOR[.PATCH], such as 2.9 or 2.10.4")
                })?,
                None => nats_auth::installed_server_version()?,
            };
            let config = nats_auth::ServerConfig {
                listen,
                store_dir,
                server_version,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(cert_file, key_file)| nats_auth::ServerTlsFiles { cert_file, key_file }),
                limits: nats_auth::ServerLimits {
                    max_connections,
                    max_file_store,
                    ..nats_auth::ServerLimits::default()
                },
                orchestrator: nats_auth::NkeyPublicKey::parse(&orchestrator_nkey, "--orchestrator-nkey")?,
                devices: device_users,
                simulator: simulator_nkey
                    .map(|key| nats_auth::NkeyPublicKey::parse(&key, "--simulator-nkey"))
                    .transpose()?,
            };
            if config.simulator.is_some() {
                eprintln!(
                    "warning: --simulator-nkey renders a user that may act for every device: for test and bench \
                     fleets only, never in production"
                );
            }
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
