//! The text of `fleetlaps-agent status`: what LAPS `Get-LapsDiagnostics` would tell.

use std::fmt::Write as _;

use fleetlaps_proto::control::StatusReport;

/// Renders a status report as aligned `Name : value` lines.
pub fn render(report: &StatusReport) -> String {
    let policy = report.policy.to_settings();
    let or_none = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    let rows: Vec<(&str, String)> = vec![
        ("DeviceName", report.device_name.clone()),
        ("DeviceId", report.device_id.clone()),
        ("PolicySource", report.policy_source.to_string()),
        (
            "BackupDirectory",
            or_none(policy.backup_directory.map(|v| v.to_string())),
        ),
        (
            "PasswordAgeDays",
            or_none(policy.password_age_days.map(|v| v.to_string())),
        ),
        (
            "PasswordComplexity",
            or_none(policy.password_complexity.map(|v| v.to_string())),
        ),
        ("PasswordLength", or_none(policy.password_length.map(|v| v.to_string()))),
        (
            "PassphraseLength",
            or_none(policy.passphrase_length.map(|v| v.to_string())),
        ),
        (
            "AdministratorAccountName",
            or_none(policy.administrator_account_name.clone()),
        ),
        (
            "PostAuthenticationResetDelay",
            or_none(policy.post_authentication_reset_delay.map(|v| v.to_string())),
        ),
        (
            "PostAuthenticationActions",
            or_none(policy.post_authentication_actions.map(|v| v.to_string())),
        ),
        ("ManagedAccount", or_none(report.managed_account.clone())),
        ("LastRotation", or_none(report.last_rotation.map(|t| t.to_rfc3339()))),
        (
            "PasswordExpirationTime",
            or_none(report.expires_at.map(|t| t.to_rfc3339())),
        ),
        ("PendingRotation", or_none(report.pending_rotation.clone())),
        ("OutboxPending", report.outbox_pending.to_string()),
        ("OutboxDropped", report.outbox_dropped.to_string()),
        ("UnconfirmedBackups", report.unconfirmed_backups.to_string()),
        (
            "PostAuthenticationResetAt",
            or_none(report.post_authentication_reset_at.map(|t| t.to_rfc3339())),
        ),
        ("Connected", report.connected.to_string()),
        ("LastError", or_none(report.last_error.clone())),
        ("LastBackupRefusal", or_none(report.last_backup_refusal.clone())),
    ];
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (name, value) in rows {
        let _ = writeln!(text, "{name:<width$} : {value}");
    }
    text
}
