//! `lapsctl`: the fleetlaps admin CLI. `lapsctl get-password` reads a device's backed-up
//! passwords from the orchestrator's API as `Get-LapsAADPassword` reads them from Microsoft Graph;
//! `rotate` asks a device to rotate now; `token` manages API tokens; `enrollment-token` manages
//! the tokens devices enroll with; `quarantine` lists refused events; `audit` shows the history;
//! `timeline` shows every event of one device and `exposure` which of its passwords was valid at
//! an instant and who read or used it; `breach` declares a breach and follows its campaign
//! (`watch` draws its progress).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetlaps_orchestrator::client::{ApiClient, ApiTokens, AuditFilter, EnrollmentTokens};
use fleetlaps_proto::api::{
    BreachInfo, BreachRequest, DeviceLocalCredentialInfo, EnrollmentTokenInfo, EnrollmentTokenRequest, ExposureReport,
    TimelineEntry, TokenInfo, TokenRequest,
};
use fleetlaps_proto::breach::BreachScope;
use fleetlaps_proto::ids::{DeviceId, DeviceTag};
use secrecy::SecretString;
use serde::ser::{Serialize, SerializeMap, Serializer};
use zeroize::{Zeroize as _, Zeroizing};

/// Reads backed-up local administrator passwords from a fleetlaps orchestrator.
#[derive(Parser)]
#[command(name = "lapsctl", version)]
struct Cli {
    /// The orchestrator's API.
    #[arg(long, global = true, env = "LAPSCTL_URL", default_value = "https://127.0.0.1:8080")]
    url: String,
    /// Trust only the CA certificates in this PEM file for an https URL, instead of the built-in
    /// web roots. For an orchestrator with a self-signed certificate, its `data_dir/tls/cert.pem`.
    #[arg(long, global = true, env = "LAPSCTL_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The API bearer token. Prefer the environment variable: other local users can see
    /// command-line arguments. Never printed.
    #[arg(long, global = true, env = "LAPSCTL_TOKEN", hide_env_values = true)]
    token: Option<SecretString>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a device's password metadata or, with --include-passwords, its newest passwords
    /// (as Get-LapsAADPassword). Each read of passwords is recorded in the audit history.
    GetPassword(GetPassword),
    /// Ask a device to rotate its password now (Intune's "Rotate local admin password"); needs
    /// DeviceLocalCredential.Rotate, and Device.Read.All to find a device by name. The device
    /// rotates when it next hears from NATS.
    Rotate(Rotate),
    /// Create, list and revoke API tokens (needs Admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Create, list and revoke enrollment tokens, with which devices enroll (needs Admin).
    #[command(subcommand)]
    EnrollmentToken(EnrollmentTokenCommand),
    /// List the stream messages the orchestrator refused: forged, malformed, unopenable… (needs Admin).
    Quarantine {
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Show the audit history: password reads, rotation requests, tokens (needs Audit.Read.All).
    Audit(Audit),
    /// Show every event of one device in the history's order: rotations, password reads and by
    /// whom, rotation requests and commands, breach campaigns, authentications, rollbacks, clones,
    /// enrollment, tags (needs Audit.Read.All). Never a password.
    Timeline(Timeline),
    /// Show which password version was valid on a device at an instant: when it was backed up
    /// and applied, who read it, when it was used, when it was rotated away (needs Audit.Read.All).
    /// Never a password.
    Exposure(Exposure),
    /// Set a device's tags, replacing the ones it had (needs Admin); breaches can be scoped by tag.
    Tag {
        /// The device's id.
        #[arg(long)]
        device: String,
        /// A tag; repeat for several; none clears them.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Declare a breach and follow its campaign: every device it names rotates once (needs
    /// Breach.Declare; list, show and watch also take Audit.Read.All).
    #[command(subcommand)]
    Breach(BreachCommand),
}

#[derive(Subcommand)]
enum BreachCommand {
    /// Declare a breach: its campaign sends each device it names a rotate command, in waves.
    Declare {
        /// Why (what leaked, the incident's reference).
        #[arg(long)]
        reason: String,
        /// Hours until every device should have rotated.
        #[arg(long, value_name = "HOURS", default_value_t = 24)]
        deadline_in_hours: u32,
        /// Every enrolled device.
        #[arg(long, conflicts_with_all = ["device", "read_by", "authenticated_since"])]
        all: bool,
        /// A device id; repeat for several.
        #[arg(long, conflicts_with_all = ["read_by", "authenticated_since", "tag"])]
        device: Vec<String>,
        /// The devices with this tag; repeat for several (any of them).
        #[arg(long, conflicts_with_all = ["read_by", "authenticated_since"])]
        tag: Vec<String>,
        /// The devices whose password this principal read since --since.
        #[arg(
            long,
            value_name = "PRINCIPAL",
            requires = "since",
            conflicts_with = "authenticated_since"
        )]
        read_by: Option<String>,
        /// The devices where the managed account authenticated since this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        authenticated_since: Option<chrono::DateTime<Utc>>,
        /// With --read-by: from when (RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<chrono::DateTime<Utc>>,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// List the campaigns.
    List {
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Show one campaign's progress and its stragglers.
    Show {
        /// The breach id, as `lapsctl breach list` shows it.
        id: String,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Follow a campaign with a progress bar until it ends.
    Watch {
        /// The breach id.
        id: String,
    },
    /// Stop a running campaign; commands already sent stay with their devices.
    Cancel {
        /// The breach id.
        id: String,
    },
}

#[derive(Subcommand)]
enum EnrollmentTokenCommand {
    /// Create an enrollment token and print it: it is shown this once, the server keeps only its hash.
    Create {
        /// What it is for (a batch of devices, a site).
        #[arg(long)]
        name: String,
        /// How many devices may enroll with it (1 to 10000).
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Hours until it expires.
        #[arg(long, value_name = "HOURS", default_value_t = 24)]
        expires_in_hours: u32,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// List the enrollment tokens with their use counts (never the tokens themselves).
    List {
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Revoke an enrollment token: no device enrolls with it any more.
    Revoke {
        /// The token's id, as `lapsctl enrollment-token list` shows it.
        #[arg(long)]
        id: String,
    },
}

#[derive(Args)]
struct Rotate {
    /// The device's name, or its id.
    #[arg(long, value_name = "NAME_OR_ID")]
    device: String,
    /// Why, for the audit history.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it: it is shown this once, the server keeps only its hash.
    Create {
        /// Who will hold it; the audit records this name for what the token does.
        #[arg(long)]
        name: String,
        /// A scope, such as DeviceLocalCredential.Read.All; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Days until it expires; without it, it does not expire.
        #[arg(long, value_name = "DAYS")]
        expires_in_days: Option<u32>,
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// List the tokens made through the API (never the tokens themselves).
    List {
        #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token's id, as `lapsctl token list` shows it.
        #[arg(long)]
        id: String,
    },
}

#[derive(Args)]
struct Audit {
    /// Only this device's entries (its name or id).
    #[arg(long, value_name = "NAME_OR_ID")]
    device: Option<String>,
    /// Only this kind: password_read, rotation_requested, token_created, token_revoked, …
    #[arg(long)]
    kind: Option<String>,
    /// Only what this principal (a token's name) did: everything a person read, asked, made.
    #[arg(long)]
    principal: Option<String>,
    /// Only from this time on (RFC 3339).
    #[arg(long, value_name = "TIME")]
    since: Option<DateTime<Utc>>,
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Args)]
struct Timeline {
    /// The device's id, or its name (finding a device by name also needs
    /// DeviceLocalCredential.ReadBasic.All).
    #[arg(long, value_name = "ID_OR_NAME")]
    device: String,
    /// `table`: one line an event; `json`: an array of the entries with every field; `jsonl`:
    /// one entry a line.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Args)]
struct Exposure {
    /// The device's id, or its name (finding a device by name also needs
    /// DeviceLocalCredential.ReadBasic.All).
    #[arg(long, value_name = "ID_OR_NAME")]
    device: String,
    /// The instant (RFC 3339, such as 2026-11-24T13:05:00Z).
    #[arg(long, value_name = "TIME")]
    at: DateTime<Utc>,
    /// `table`: a "Name : value" block per part; `json` or `jsonl`: the report as one object.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Args)]
struct GetPassword {
    /// The device's name or, when no device has that name, its id.
    #[arg(long, value_name = "NAME_OR_ID")]
    device: String,
    /// Also show the newest passwords, newest first (needs DeviceLocalCredential.Read.All).
    #[arg(long)]
    include_passwords: bool,
    /// Why the passwords are read, for the audit history (a ticket number, say).
    #[arg(long, requires = "include_passwords")]
    reason: Option<String>,
    /// Show the passwords in clear text; without it they are shown as ********.
    #[arg(long, requires = "include_passwords")]
    as_plain_text: bool,
    /// `table`: a "Name : value" block per entry, as PowerShell lists the cmdlet's output;
    /// `json`: an array of objects with the same names.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// Aligned for reading.
    Table,
    /// One JSON array (pretty-printed).
    Json,
    /// JSON lines: one compact object a line, for `jq` and log pipelines.
    Jsonl,
}

/// What the Password field shows.
#[derive(Clone, Copy)]
enum Passwords {
    /// No credentials were asked for: no Password field.
    Omitted,
    /// `********`.
    Masked,
    /// The password itself.
    PlainText,
}

/// One output object: named fields in order; `None` is an empty value (`null` in JSON). A field
/// may hold a password, so the values are wiped when the entry is dropped.
struct Entry(Vec<(&'static str, Option<String>)>);

impl Entry {
    /// Overwrites every value with zeros and empties it.
    fn wipe(&mut self) {
        for (_, value) in &mut self.0 {
            if let Some(value) = value {
                value.zeroize();
            }
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// Stands for a password that was not asked for in clear text.
const MASK: &str = "********";

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(output) => {
            // It may hold passwords: wiped once printed.
            let output = Zeroizing::new(output);
            print!("{}", output.as_str());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("lapsctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let token = cli.token.context("no API token: pass --token or set LAPSCTL_TOKEN")?;
    let mut client = ApiClient::with_ca(&cli.url, token, cli.ca.as_deref())?;
    match cli.command {
        Command::GetPassword(args) => {
            client.set_reason(args.reason.clone());
            get_password(&client, &args).await
        }
        Command::Rotate(args) => {
            client.set_reason(args.reason.clone());
            let (device_id, device_name) = directory_device(&client, &args.device).await?;
            let command_id = client.rotate(&device_id).await?;
            Ok(format!(
                "rotation requested for {device_name} ({device_id}): command {command_id}\n"
            ))
        }
        Command::Token(command) => manage_tokens(&client, command).await,
        Command::EnrollmentToken(command) => manage_enrollment_tokens(&client, command).await,
        Command::Quarantine { output } => {
            let listing = client.quarantine().await?;
            let entries: Vec<Entry> = listing
                .entries
                .iter()
                .map(|entry| {
                    Entry(vec![
                        ("StreamSequence", Some(entry.stream_sequence.to_string())),
                        ("ReceivedTime", Some(timestamp(entry.received_date_time))),
                        ("Reason", Some(entry.reason.clone())),
                        ("Subject", Some(entry.subject.clone())),
                        ("Detail", Some(entry.detail.clone())),
                    ])
                })
                .collect();
            let mut text = render(&entries, output);
            if listing.dropped_count > 0 {
                // On stderr for JSON, so the output stays one document.
                let note = format!(
                    "{} older entries were dropped: the quarantine keeps the newest {}\n",
                    listing.dropped_count, listing.max_entries
                );
                match output {
                    OutputFormat::Table => text.push_str(&format!("\n{note}")),
                    OutputFormat::Json | OutputFormat::Jsonl => eprint!("{note}"),
                }
            }
            Ok(text)
        }
        Command::Audit(args) => audit(&client, &args).await,
        Command::Timeline(args) => {
            let device_id = investigated_device(&client, &args.device).await?;
            let entries = client.timeline(&device_id).await?;
            Ok(match args.output {
                OutputFormat::Table => timeline_table(&entries),
                OutputFormat::Json => pretty_json(&entries),
                OutputFormat::Jsonl => json_lines(&entries),
            })
        }
        Command::Exposure(args) => {
            let device_id = investigated_device(&client, &args.device).await?;
            let report = client.exposure(&device_id, args.at).await?;
            Ok(match args.output {
                OutputFormat::Table => render_table(&exposure_entries(&report)),
                OutputFormat::Json => pretty_json(&report),
                OutputFormat::Jsonl => json_lines(std::slice::from_ref(&report)),
            })
        }
        Command::Breach(command) => breach(&client, command).await,
        Command::Tag { device, tags } => {
            let device_id = DeviceId::parse(&device)?;
            let tags: Vec<DeviceTag> = tags.iter().map(|tag| DeviceTag::parse(tag)).collect::<Result<_, _>>()?;
            client.set_device_tags(&device_id, &tags).await?;
            Ok(format!(
                "device {device_id} tagged: {}\n",
                tags.iter().map(DeviceTag::as_str).collect::<Vec<_>>().join(" ")
            ))
        }
    }
}

/// The one device `name_or_id` designates, or an error saying why there is not one.
async fn one_device(client: &ApiClient, name_or_id: &str) -> anyhow::Result<DeviceLocalCredentialInfo> {
    let found = client.lookup_device(name_or_id).await?;
    the_one(name_or_id, found, |device| {
        (device.id.to_string(), device.device_name.to_string())
    })
}

/// The one device `name_or_id` designates in the device directory (`Device.Read.All`): those
/// named so, or the one with that id. A UUID is taken as an id without asking the directory.
async fn directory_device(client: &ApiClient, name_or_id: &str) -> anyhow::Result<(DeviceId, String)> {
    if uuid_like(name_or_id)
        && let Ok(device_id) = DeviceId::parse(name_or_id)
    {
        return Ok((device_id, name_or_id.to_owned()));
    }
    let directory = client.directory().await?;
    let (mut found, others): (Vec<_>, Vec<_>) = directory
        .into_iter()
        .partition(|(_, name)| name.eq_ignore_ascii_case(name_or_id));
    if found.is_empty() {
        found = others.into_iter().filter(|(id, _)| id.as_str() == name_or_id).collect();
    }
    the_one(name_or_id, found, |(id, name)| (id.to_string(), name.clone()))
}

/// The only device `found` for `name_or_id`, or an error saying there is none, or listing the
/// ids of those that share the name.
fn the_one<T>(name_or_id: &str, mut found: Vec<T>, id_and_name: impl Fn(&T) -> (String, String)) -> anyhow::Result<T> {
    match found.len() {
        0 => anyhow::bail!("no device named {name_or_id}"),
        1 => Ok(found.remove(0)),
        n_devices => {
            let list: String = found
                .iter()
                .map(|device| {
                    let (id, name) = id_and_name(device);
                    format!("\n  {id}  {name}")
                })
                .collect();
            anyhow::bail!("{n_devices} devices are named {name_or_id}; pass one of their ids with --device:{list}")
        }
    }
}

/// Whether `text` has a UUID's shape (8-4-4-4-12 hex digits).
fn uuid_like(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|group| group.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|group| group.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn manage_tokens(client: &ApiClient, command: TokenCommand) -> anyhow::Result<String> {
    match command {
        TokenCommand::Create {
            name,
            scopes,
            expires_in_days,
            output,
        } => {
            let request = TokenRequest {
                name,
                scopes,
                expires_date_time: expires_in_days.map(|days| Utc::now() + chrono::Duration::days(i64::from(days))),
            };
            let created = client.create_token::<ApiTokens>(&request).await?;
            let mut fields = token_fields(&created.info);
            fields.insert(0, ("Token", Some(created.token.expose().to_owned())));
            Ok(render(&[Entry(fields)], output))
        }
        TokenCommand::List { output } => {
            let entries: Vec<Entry> = client
                .tokens::<ApiTokens>()
                .await?
                .iter()
                .map(|info| Entry(token_fields(info)))
                .collect();
            Ok(render(&entries, output))
        }
        TokenCommand::Revoke { id } => {
            client.revoke_token::<ApiTokens>(&id).await?;
            Ok(format!("token {id} revoked\n"))
        }
    }
}

async fn manage_enrollment_tokens(client: &ApiClient, command: EnrollmentTokenCommand) -> anyhow::Result<String> {
    match command {
        EnrollmentTokenCommand::Create {
            name,
            max_uses,
            expires_in_hours,
            output,
        } => {
            let request = EnrollmentTokenRequest {
                name,
                max_uses: Some(max_uses),
                expires_date_time: Some(Utc::now() + chrono::Duration::hours(i64::from(expires_in_hours))),
            };
            let created = client.create_token::<EnrollmentTokens>(&request).await?;
            let mut fields = enrollment_token_fields(&created.info);
            fields.insert(0, ("Token", Some(created.token.expose().to_owned())));
            Ok(render(&[Entry(fields)], output))
        }
        EnrollmentTokenCommand::List { output } => {
            let entries: Vec<Entry> = client
                .tokens::<EnrollmentTokens>()
                .await?
                .iter()
                .map(|info| Entry(enrollment_token_fields(info)))
                .collect();
            Ok(render(&entries, output))
        }
        EnrollmentTokenCommand::Revoke { id } => {
            client.revoke_token::<EnrollmentTokens>(&id).await?;
            Ok(format!("enrollment token {id} revoked\n"))
        }
    }
}

async fn breach(client: &ApiClient, command: BreachCommand) -> anyhow::Result<String> {
    match command {
        BreachCommand::Declare {
            reason,
            deadline_in_hours,
            all,
            device,
            tag,
            read_by,
            authenticated_since,
            since,
            output,
        } => {
            let scope = match (all, device.is_empty(), read_by, authenticated_since) {
                (true, _, _, _) => BreachScope::All,
                _ if !tag.is_empty() => BreachScope::Tags {
                    tags: tag.iter().map(|tag| DeviceTag::parse(tag)).collect::<Result<_, _>>()?,
                },
                (false, false, _, _) => BreachScope::Devices {
                    device_ids: device.iter().map(|id| DeviceId::parse(id)).collect::<Result<_, _>>()?,
                },
                (false, true, Some(principal), _) => BreachScope::ReadBy {
                    principal,
                    since: since.context("--read-by needs --since")?,
                },
                (false, true, None, Some(since)) => BreachScope::AuthenticatedSince { since },
                (false, true, None, None) => anyhow::bail!(
                    "which devices? pass --all, --device ID, --tag TAG, --read-by PRINCIPAL --since TIME or --authenticated-since TIME"
                ),
            };
            let request = BreachRequest {
                reason,
                deadline: Utc::now() + chrono::Duration::hours(i64::from(deadline_in_hours)),
                scope,
            };
            let info = client.declare_breach(&request).await?;
            Ok(render(&[Entry(breach_fields(&info))], output))
        }
        BreachCommand::List { output } => {
            let entries: Vec<Entry> = client
                .breaches()
                .await?
                .iter()
                .map(|info| Entry(breach_fields(info)))
                .collect();
            Ok(render(&entries, output))
        }
        BreachCommand::Show { id, output } => {
            let info = client.breach(&id).await?;
            let mut fields = breach_fields(&info);
            fields.push(("Failed", info.failed.map(|n| n.to_string())));
            fields.push(("OfflineWaiting", info.offline_waiting.map(|n| n.to_string())));
            fields.push((
                "Stragglers",
                info.stragglers
                    .as_ref()
                    .map(|ids| ids.iter().map(DeviceId::as_str).collect::<Vec<_>>().join(" ")),
            ));
            Ok(render(&[Entry(fields)], output))
        }
        BreachCommand::Watch { id } => watch_breach(client, &id).await,
        BreachCommand::Cancel { id } => {
            client.cancel_breach(&id).await?;
            Ok(format!("breach {id} cancelled\n"))
        }
    }
}

/// Draws a campaign's progress (devices rotated of targeted, with rate and time left) until it
/// ends; returns how it ended.
async fn watch_breach(client: &ApiClient, id: &str) -> anyhow::Result<String> {
    let first = client.breach(id).await?;
    let bar = indicatif::ProgressBar::new(u64::from(first.targeted)).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} devices rotated ({per_sec}, {eta} left) {msg}",
        )
        .expect("a valid template"),
    );
    let mut info = first;
    loop {
        bar.set_length(u64::from(info.targeted));
        bar.set_position(u64::from(info.rotated));
        bar.set_message(format!("{}, {} commanded", info.state, info.commanded));
        if !matches!(info.state.as_str(), "declared" | "running") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        info = client.breach(id).await?;
    }
    bar.finish();
    let mut text = format!(
        "breach {} {}: {} of {} devices rotated\n",
        info.id, info.state, info.rotated, info.targeted
    );
    if let Some(stragglers) = info.stragglers.filter(|ids| !ids.is_empty()) {
        text.push_str(&format!(
            "not rotated: {}\n",
            stragglers.iter().map(DeviceId::as_str).collect::<Vec<_>>().join(" ")
        ));
    }
    Ok(text)
}

fn breach_fields(info: &BreachInfo) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("Id", Some(info.id.clone())),
        ("State", Some(info.state.clone())),
        ("Reason", Some(info.reason.clone())),
        ("Scope", Some(info.scope.clone())),
        ("Targeted", Some(info.targeted.to_string())),
        ("Commanded", Some(info.commanded.to_string())),
        ("Rotated", Some(info.rotated.to_string())),
        ("DeclaredBy", Some(info.declared_by.clone())),
        ("DeclaredTime", Some(timestamp(info.declared_date_time))),
        ("Deadline", Some(timestamp(info.deadline_date_time))),
        ("EndedTime", info.ended_date_time.map(timestamp)),
    ]
}

fn enrollment_token_fields(info: &EnrollmentTokenInfo) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("Id", Some(info.id.clone())),
        ("Name", Some(info.name.clone())),
        ("Uses", Some(format!("{}/{}", info.uses, info.max_uses))),
        ("CreatedBy", Some(info.created_by.clone())),
        ("CreatedTime", Some(timestamp(info.created_date_time))),
        ("ExpirationTime", Some(timestamp(info.expires_date_time))),
        ("RevokedTime", info.revoked_date_time.map(timestamp)),
    ]
}

fn token_fields(info: &TokenInfo) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("Id", Some(info.id.clone())),
        ("Name", Some(info.name.clone())),
        ("Scopes", Some(info.scopes.join(" "))),
        ("CreatedBy", Some(info.created_by.clone())),
        ("CreatedTime", Some(timestamp(info.created_date_time))),
        ("ExpirationTime", info.expires_date_time.map(timestamp)),
        ("RevokedTime", info.revoked_date_time.map(timestamp)),
    ]
}

async fn audit(client: &ApiClient, args: &Audit) -> anyhow::Result<String> {
    let device = match &args.device {
        Some(name_or_id) => Some(one_device(client, name_or_id).await?.id),
        None => None,
    };
    let entries: Vec<Entry> = client
        .audit(&AuditFilter {
            device_id: device.as_ref(),
            kind: args.kind.as_deref(),
            principal: args.principal.as_deref(),
            since: args.since,
        })
        .await?
        .iter()
        .map(|entry| {
            let field = |name: &str| entry.body.get(name).and_then(|value| value.as_str()).map(str::to_owned);
            let principal = field("principal")
                .or_else(|| field("created_by"))
                .or_else(|| field("revoked_by"));
            let subject = field("device_id").or_else(|| field("token_id"));
            Entry(vec![
                ("Sequence", Some(entry.sequence.to_string())),
                ("Time", Some(timestamp(entry.time))),
                ("Kind", Some(entry.kind.clone())),
                ("Principal", principal),
                ("Subject", subject),
                ("Reason", field("reason")),
                ("Client", field("client_name")),
                ("SourceAddress", field("source_address")),
            ])
        })
        .collect();
    Ok(render(&entries, args.output))
}

/// The device an investigation is about: an id as it is (an investigator may hold only
/// Audit.Read.All), else the one device of that name.
async fn investigated_device(client: &ApiClient, id_or_name: &str) -> anyhow::Result<DeviceId> {
    if uuid_like(id_or_name)
        && let Ok(device_id) = DeviceId::parse(id_or_name)
    {
        return Ok(device_id);
    }
    Ok(one_device(client, id_or_name).await?.id)
}

/// One compact JSON object a line.
fn json_lines<T: Serialize>(items: &[T]) -> String {
    let mut output = String::new();
    for item in items {
        output.push_str(&serde_json::to_string(item).expect("API shapes serialise: string keys only"));
        output.push('\n');
    }
    output
}

/// A timeline as a table: one line an event, its columns aligned.
fn timeline_table(entries: &[TimelineEntry]) -> String {
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|entry| {
            [
                entry.sequence.to_string(),
                timestamp(entry.time),
                entry.kind.clone(),
                entry.actor.clone(),
                entry.summary.clone(),
            ]
        })
        .collect();
    render_columns(["Sequence", "Time", "Kind", "Actor", "Summary"], &rows)
}

/// Columns under their headers, each as wide as its widest value, the last one unpadded.
fn render_columns<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(|header| header.chars().count());
    for row in rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let mut output = String::new();
    let mut line = |values: [&str; N]| {
        let mut text = String::new();
        for (index, value) in values.iter().enumerate() {
            if index > 0 {
                text.push_str("  ");
            }
            text.push_str(&format!("{value:<width$}", width = widths[index]));
        }
        writeln!(output, "{}", text.trim_end()).expect("writing to a String cannot fail");
    };
    line(headers);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    output
}

/// An exposure report as "Name : value" blocks: the version, then each read, then each use.
fn exposure_entries(report: &ExposureReport) -> Vec<Entry> {
    let version = report.version.as_ref();
    let rotated_away = version.map(|version| match version.rotated_away_date_time {
        Some(time) => timestamp(time),
        None => "still current".to_owned(),
    });
    let pending = report.pending.as_ref().map(|pending| {
        format!(
            "{} backed up at {}, not applied by then{}",
            pending.rotation_id,
            timestamp(pending.backed_up_date_time),
            pending
                .applied_date_time
                .map(|time| format!(" (applied at {})", timestamp(time)))
                .unwrap_or_else(|| " (never applied)".to_owned())
        )
    });
    let mut entries = vec![Entry(vec![
        ("DeviceId", Some(report.device_id.to_string())),
        ("At", Some(timestamp(report.at))),
        (
            "Version",
            Some(version.map_or_else(|| "none".to_owned(), |version| version.rotation_id.clone())),
        ),
        (
            "BackedUpTime",
            version.map(|version| timestamp(version.backed_up_date_time)),
        ),
        (
            "AppliedTime",
            version.map(|version| timestamp(version.applied_date_time)),
        ),
        ("RotatedAwayTime", rotated_away),
        (
            "RotatedAwayBy",
            version.and_then(|version| version.rotated_away_by.clone()),
        ),
        ("Pending", pending),
        ("Reads", Some(report.reads.len().to_string())),
        ("Uses", Some(report.uses.len().to_string())),
        ("Summary", Some(report.summary.clone())),
    ])];
    for (index, read) in report.reads.iter().enumerate() {
        entries.push(Entry(vec![
            ("Read", Some((index + 1).to_string())),
            ("Sequence", Some(read.sequence.to_string())),
            ("Time", Some(timestamp(read.time))),
            ("Principal", Some(read.principal.clone())),
            ("TokenId", read.principal_token_id.clone()),
            ("Reason", read.reason.clone()),
            ("SourceAddress", read.source_address.clone()),
            ("Client", read.client_name.clone()),
            ("BeforeRotatedAway", Some(read.before_rotated_away.to_string())),
        ]));
    }
    for (index, used) in report.uses.iter().enumerate() {
        entries.push(Entry(vec![
            ("Use", Some((index + 1).to_string())),
            ("Sequence", Some(used.sequence.to_string())),
            ("Time", Some(timestamp(used.time))),
            ("Outcome", Some(used.outcome.clone())),
            ("Count", Some(used.count.to_string())),
            ("Service", Some(used.service.clone())),
            ("RemoteHost", used.remote_host.clone()),
        ]));
    }
    entries
}

fn render(entries: &[Entry], output: OutputFormat) -> String {
    match output {
        OutputFormat::Table => render_table(entries),
        OutputFormat::Json => pretty_json(entries),
        OutputFormat::Jsonl => json_lines(entries),
    }
}

async fn get_password(client: &ApiClient, args: &GetPassword) -> anyhow::Result<String> {
    let device = one_device(client, &args.device).await?;
    let passwords = match (args.include_passwords, args.as_plain_text) {
        (false, _) => Passwords::Omitted,
        (true, false) => Passwords::Masked,
        (true, true) => Passwords::PlainText,
    };
    let device = match passwords {
        Passwords::Omitted => device,
        Passwords::Masked | Passwords::PlainText => client.device(&device.id, true).await?,
    };
    let entries = entries(&device, passwords)?;
    Ok(render(&entries, args.output))
}

/// The cmdlet's output objects for `device`: one without passwords, else one per credential.
fn entries(device: &DeviceLocalCredentialInfo, passwords: Passwords) -> anyhow::Result<Vec<Entry>> {
    let device_name = Some(device.device_name.to_string());
    let device_id = Some(device.id.to_string());
    let expiration = device.refresh_date_time.map(timestamp);
    let show_password = match passwords {
        Passwords::Omitted => {
            return Ok(vec![Entry(vec![
                ("DeviceName", device_name),
                ("DeviceId", device_id),
                ("PasswordExpirationTime", expiration),
            ])]);
        }
        Passwords::Masked => false,
        Passwords::PlainText => true,
    };
    let credentials = device.credentials.as_deref().unwrap_or_default();
    if credentials.is_empty() {
        anyhow::bail!(
            "device {} ({}) has no backed-up password",
            device.device_name,
            device.id
        );
    }
    credentials
        .iter()
        .enumerate()
        .map(|(index, credential)| {
            let password = if show_password {
                let decoded = credential.password_base64.decode().map_err(|err| {
                    anyhow::anyhow!(
                        "device {}: password backed up at {}: {err}",
                        device.id,
                        timestamp(credential.backup_date_time)
                    )
                })?;
                decoded.expose().to_owned()
            } else {
                MASK.to_owned()
            };
            Ok(Entry(vec![
                ("DeviceName", device_name.clone()),
                ("DeviceId", device_id.clone()),
                ("Account", Some(credential.account_name.clone())),
                ("Password", Some(password)),
                // Only the newest password expires, as LAPS shows it.
                (
                    "PasswordExpirationTime",
                    if index == 0 { expiration.clone() } else { None },
                ),
                ("PasswordUpdateTime", Some(timestamp(credential.backup_date_time))),
            ]))
        })
        .collect()
}

/// "Name : value" blocks, names padded to one width, a blank line between blocks.
fn render_table(entries: &[Entry]) -> String {
    let width = entries
        .iter()
        .flat_map(|entry| entry.0.iter().map(|(name, _)| name.len()))
        .max()
        .unwrap_or(0);
    let mut output = String::new();
    for (index, entry) in entries.iter().enumerate() {
        if index > 0 {
            output.push('\n');
        }
        for (name, value) in &entry.0 {
            let line = format!("{name:<width$} : {}", value.as_deref().unwrap_or_default());
            writeln!(output, "{}", line.trim_end()).expect("writing to a String cannot fail");
        }
    }
    output
}

/// A pretty-printed JSON array of objects, fields in the table's order.
/// Pretty-printed JSON.
fn pretty_json<T: Serialize + ?Sized>(value: &T) -> String {
    let mut output = serde_json::to_string_pretty(value).expect("API shapes serialise: string keys only");
    output.push('\n');
    output
}

/// ISO 8601 in UTC, to the second.
fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use fleetlaps_proto::api::{DeviceLocalCredential, PasswordBase64};
    use fleetlaps_proto::ids::{DeviceId, DeviceName};

    use super::*;

    #[test]
    fn an_entry_holding_a_password_is_wiped() {
        let mut entries = entries(&device(), Passwords::PlainText).unwrap();
        assert!(
            render_table(&entries).contains("old-password"),
            "the fixture shows a password"
        );
        for entry in &mut entries {
            entry.wipe();
        }
        assert!(
            entries
                .iter()
                .flat_map(|entry| entry.0.iter())
                .all(|(_, value)| value.as_deref().is_none_or(str::is_empty)),
            "every value is wiped"
        );
    }

    fn time(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    fn device() -> DeviceLocalCredentialInfo {
        let credential = |password: &str, backup: i64| DeviceLocalCredential {
            account_name: "lapsadmin".to_owned(),
            account_sid: Some("1001".to_owned()),
            backup_date_time: time(backup),
            password_base64: PasswordBase64::encode(password),
        };
        DeviceLocalCredentialInfo {
            id: DeviceId::parse("dev-1").unwrap(),
            device_name: DeviceName::parse("host-1").unwrap(),
            last_backup_date_time: Some(time(1_700_000_000)),
            refresh_date_time: Some(time(1_702_592_000)),
            credentials: Some(vec![
                credential("new-pässword", 1_700_000_000),
                credential("old-password", 1_690_000_000),
            ]),
        }
    }

    #[test]
    fn metadata_lists_name_id_and_expiration() {
        let table = render_table(&entries(&device(), Passwords::Omitted).unwrap());
        assert_eq!(
            table,
            "DeviceName             : host-1\n\
             DeviceId               : dev-1\n\
             PasswordExpirationTime : 2023-12-14T22:13:20Z\n"
        );
    }

    #[test]
    fn passwords_are_masked_unless_asked_in_plain_text() {
        let masked = render_table(&entries(&device(), Passwords::Masked).unwrap());
        assert_eq!(
            masked,
            "DeviceName             : host-1\n\
             DeviceId               : dev-1\n\
             Account                : lapsadmin\n\
             Password               : ********\n\
             PasswordExpirationTime : 2023-12-14T22:13:20Z\n\
             PasswordUpdateTime     : 2023-11-14T22:13:20Z\n\
             \n\
             DeviceName             : host-1\n\
             DeviceId               : dev-1\n\
             Account                : lapsadmin\n\
             Password               : ********\n\
             PasswordExpirationTime :\n\
             PasswordUpdateTime     : 2023-07-22T04:26:40Z\n"
        );
        assert!(!masked.contains("password"), "{masked}");
        let plain = render_table(&entries(&device(), Passwords::PlainText).unwrap());
        assert!(plain.contains("Password               : new-pässword\n"), "{plain}");
        assert!(plain.contains("Password               : old-password\n"), "{plain}");
    }

    #[test]
    fn json_has_the_cmdlet_field_names() {
        let json: serde_json::Value =
            serde_json::from_str(&pretty_json(&entries(&device(), Passwords::PlainText).unwrap())).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {
                    "DeviceName": "host-1",
                    "DeviceId": "dev-1",
                    "Account": "lapsadmin",
                    "Password": "new-pässword",
                    "PasswordExpirationTime": "2023-12-14T22:13:20Z",
                    "PasswordUpdateTime": "2023-11-14T22:13:20Z",
                },
                {
                    "DeviceName": "host-1",
                    "DeviceId": "dev-1",
                    "Account": "lapsadmin",
                    "Password": "old-password",
                    "PasswordExpirationTime": null,
                    "PasswordUpdateTime": "2023-07-22T04:26:40Z",
                },
            ])
        );
        let metadata: serde_json::Value =
            serde_json::from_str(&pretty_json(&entries(&device(), Passwords::Omitted).unwrap())).unwrap();
        assert_eq!(metadata[0].as_object().unwrap().keys().len(), 3);
        assert!(metadata[0].get("Password").is_none());
    }

    #[test]
    fn a_timeline_is_one_aligned_line_an_event_and_json_one_object_a_line() {
        let entry = |sequence: u64, kind: &str, actor: &str, summary: &str| TimelineEntry {
            sequence,
            id: format!("id-{sequence}"),
            time: time(1_700_000_000 + i64::try_from(sequence).unwrap()),
            kind: kind.to_owned(),
            actor: actor.to_owned(),
            actor_token_id: None,
            summary: summary.to_owned(),
            fields: serde_json::json!({"n": sequence}),
        };
        let entries = [
            entry(9, "password_rotated", "device", "rotation r1 applied"),
            entry(12, "password_read", "alice", "password read by alice"),
        ];
        assert_eq!(
            timeline_table(&entries),
            "Sequence  Time                  Kind              Actor   Summary\n\
             9         2023-11-14T22:13:29Z  password_rotated  device  rotation r1 applied\n\
             12        2023-11-14T22:13:32Z  password_read     alice   password read by alice\n"
        );
        let lines = json_lines(&entries);
        let back: Vec<TimelineEntry> = lines.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(back, entries);
    }

    #[test]
    fn a_device_without_backups_is_an_error_when_passwords_are_asked() {
        let mut device = device();
        device.credentials = Some(Vec::new());
        // `Entry` has no `Debug` (it can hold a password), so no `expect_err`.
        let Err(err) = entries(&device, Passwords::Masked) else {
            panic!("a device without backups has no entries")
        };
        assert!(err.to_string().contains("has no backed-up password"), "{err}");
    }

    #[test]
    fn the_cli_parses_and_plain_text_needs_include_passwords() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "lapsctl",
            "get-password",
            "--device",
            "host-1",
            "--token",
            "t",
            "-o",
            "json",
        ]);
        assert!(cli.is_ok());
        let cli = Cli::try_parse_from(["lapsctl", "get-password", "--device", "host-1", "--as-plain-text"]);
        assert!(cli.is_err());
    }
}
