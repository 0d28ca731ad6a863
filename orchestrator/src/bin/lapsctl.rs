//! `lapsctl`: the fleetlaps admin CLI. `lapsctl get-password` reads a device's backed-up
//! passwords from the orchestrator's API as `Get-LapsAADPassword` reads them from Microsoft Graph.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetlaps_orchestrator::client::ApiClient;
use fleetlaps_proto::api::DeviceLocalCredentialInfo;
use secrecy::SecretString;
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Reads backed-up local administrator passwords from a fleetlaps orchestrator.
#[derive(Parser)]
#[command(name = "lapsctl", version)]
struct Cli {
    /// The orchestrator's API.
    #[arg(long, global = true, env = "LAPSCTL_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
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
    /// (as Get-LapsAADPassword).
    GetPassword(GetPassword),
}

#[derive(Args)]
struct GetPassword {
    /// The device's name or, when no device has that name, its id.
    #[arg(long, value_name = "NAME_OR_ID")]
    device: String,
    /// Also show the newest passwords, newest first (needs DeviceLocalCredential.Read.All).
    #[arg(long)]
    include_passwords: bool,
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
    Table,
    Json,
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

/// One output object: named fields in order; `None` is an empty value (`null` in JSON).
struct Entry(Vec<(&'static str, Option<String>)>);

/// Stands for a password that was not asked for in clear text.
const MASK: &str = "********";

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(output) => {
            print!("{output}");
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
    let client = ApiClient::new(&cli.url, token)?;
    match cli.command {
        Command::GetPassword(args) => get_password(&client, &args).await,
    }
}

async fn get_password(client: &ApiClient, args: &GetPassword) -> anyhow::Result<String> {
    let mut found = client.lookup_device(&args.device).await?;
    let device = match found.len() {
        0 => anyhow::bail!("no device named {}", args.device),
        1 => found.remove(0),
        n_devices => {
            let list: String = found
                .iter()
                .map(|device| format!("\n  {}  {}", device.id, device.device_name))
                .collect();
            anyhow::bail!(
                "{n_devices} devices are named {}; pass one of their ids with --device:{list}",
                args.device
            )
        }
    };
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
    Ok(match args.output {
        OutputFormat::Table => render_table(&entries),
        OutputFormat::Json => render_json(&entries),
    })
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
fn render_json(entries: &[Entry]) -> String {
    let mut output = serde_json::to_string_pretty(entries).expect("entries serialise: string keys only");
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
            serde_json::from_str(&render_json(&entries(&device(), Passwords::PlainText).unwrap())).unwrap();
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
            serde_json::from_str(&render_json(&entries(&device(), Passwords::Omitted).unwrap())).unwrap();
        assert_eq!(metadata[0].as_object().unwrap().keys().len(), 3);
        assert!(metadata[0].get("Password").is_none());
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
