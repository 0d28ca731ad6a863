//! The LAPS policy: the settings that apply in the Entra mode, their ranges and defaults.
//!
//! A [`Policy`] can only be built through validation ([`Policy::from_settings`] or serde), so a
//! value in hand is always in range. Settings are named exactly as LAPS names them, in the
//! config file and on the wire (`PasswordAgeDays`, `PostAuthenticationActions`, …).

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::ids::AccountName;
use crate::password::PasswordComplexity;

/// A setting that is out of range, of the wrong type, or unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy setting {setting} = {value}: allowed {allowed}")]
pub struct PolicyError {
    /// The LAPS name of the setting.
    pub setting: &'static str,
    /// The refused value, as given.
    pub value: String,
    /// What the setting accepts.
    pub allowed: String,
}

/// LAPS `BackupDirectory`: where the password is backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackupDirectory {
    /// 0: LAPS is disabled; the agent manages nothing.
    Disabled,
    /// 1: backed up to the orchestrator (Windows LAPS: Microsoft Entra ID).
    Orchestrator,
}

impl BackupDirectory {
    /// The LAPS value of the setting.
    pub fn value(self) -> u8 {
        match self {
            Self::Disabled => 0,
            Self::Orchestrator => 1,
        }
    }
}

/// LAPS `PostAuthenticationActions`: what happens when the post-authentication grace period ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PostAuthenticationActions {
    /// 1: reset the password.
    ResetPassword,
    /// 3: reset the password and end the managed account's sessions.
    ResetPasswordAndLogoff,
    /// 5: reset the password and restart the device.
    ResetPasswordAndReboot,
    /// 11: reset the password, end the sessions and terminate the account's remaining processes.
    ResetPasswordLogoffAndTerminateProcesses,
}

impl PostAuthenticationActions {
    /// The LAPS value of the setting.
    pub fn value(self) -> u8 {
        match self {
            Self::ResetPassword => 1,
            Self::ResetPasswordAndLogoff => 3,
            Self::ResetPasswordAndReboot => 5,
            Self::ResetPasswordLogoffAndTerminateProcesses => 11,
        }
    }

    fn from_value(value: i64) -> Option<Self> {
        match value {
            1 => Some(Self::ResetPassword),
            3 => Some(Self::ResetPasswordAndLogoff),
            5 => Some(Self::ResetPasswordAndReboot),
            11 => Some(Self::ResetPasswordLogoffAndTerminateProcesses),
            _ => None,
        }
    }
}

/// A validated LAPS policy.
///
/// Invariant: every setting is within the range LAPS allows for the Entra mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PolicySettings", into = "PolicySettings")]
pub struct Policy {
    backup_directory: BackupDirectory,
    password_age_days: u16,
    password_complexity: PasswordComplexity,
    password_length: u8,
    passphrase_length: u8,
    administrator_account_name: Option<AccountName>,
    post_authentication_reset_delay_hours: u8,
    post_authentication_actions: PostAuthenticationActions,
}

/// The policy as written in a config file or sent on the wire: every setting optional, a missing
/// one takes the LAPS default (as LAPS does for a source that sets some settings but not all).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PolicySettings {
    /// 0 disabled, 1 orchestrator (LAPS: 2 Active Directory, not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_directory: Option<i64>,
    /// Maximum password age in days, 1–365 (at least 7 when backing up to the orchestrator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_age_days: Option<i64>,
    /// 1–8, see [`PasswordComplexity`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_complexity: Option<i64>,
    /// Characters, 8–64 (complexities 1–5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_length: Option<i64>,
    /// Words, 3–10 (complexities 6–8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_length: Option<i64>,
    /// The managed account; unset means the account with UID 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub administrator_account_name: Option<String>,
    /// Hours, 0–24; 0 disables post-authentication actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_authentication_reset_delay: Option<i64>,
    /// 1, 3, 5 or 11.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_authentication_actions: Option<i64>,
}

impl Policy {
    /// The range of `PasswordAgeDays`.
    pub const PASSWORD_AGE_DAYS: RangeInclusive<i64> = 1..=365;
    /// The smallest `PasswordAgeDays` when backing up to the orchestrator (as to Entra ID).
    pub const MIN_PASSWORD_AGE_DAYS_WITH_BACKUP: i64 = 7;
    /// The range of `PasswordLength`.
    pub const PASSWORD_LENGTH: RangeInclusive<i64> = 8..=64;
    /// The range of `PassphraseLength`.
    pub const PASSPHRASE_LENGTH: RangeInclusive<i64> = 3..=10;
    /// The range of `PostAuthenticationResetDelay`, in hours.
    pub const POST_AUTHENTICATION_RESET_DELAY: RangeInclusive<i64> = 0..=24;

    /// Validates settings, filling what is missing with the LAPS defaults.
    pub fn from_settings(settings: &PolicySettings) -> Result<Self, PolicyError> {
        let backup_directory = match settings.backup_directory.unwrap_or(1) {
            0 => BackupDirectory::Disabled,
            1 => BackupDirectory::Orchestrator,
            other => {
                return Err(PolicyError {
                    setting: "BackupDirectory",
                    value: other.to_string(),
                    allowed: "0 (disabled) or 1 (orchestrator); 2 (Active Directory) is not supported".to_owned(),
                });
            }
        };
        let min_age = if backup_directory == BackupDirectory::Orchestrator {
            Self::MIN_PASSWORD_AGE_DAYS_WITH_BACKUP
        } else {
            *Self::PASSWORD_AGE_DAYS.start()
        };
        let password_age_days = in_range(
            "PasswordAgeDays",
            settings.password_age_days.unwrap_or(30),
            &(min_age..=365),
        )?;
        let complexity_value = settings.password_complexity.unwrap_or(4);
        let password_complexity = PasswordComplexity::from_value(complexity_value).ok_or_else(|| PolicyError {
            setting: "PasswordComplexity",
            value: complexity_value.to_string(),
            allowed: "1 to 8".to_owned(),
        })?;
        let password_length = in_range(
            "PasswordLength",
            settings.password_length.unwrap_or(14),
            &Self::PASSWORD_LENGTH,
        )?;
        let passphrase_length = in_range(
            "PassphraseLength",
            settings.passphrase_length.unwrap_or(6),
            &Self::PASSPHRASE_LENGTH,
        )?;
        let administrator_account_name = settings
            .administrator_account_name
            .as_deref()
            .map(|name| {
                AccountName::parse(name).map_err(|err| PolicyError {
                    setting: "AdministratorAccountName",
                    value: format!("{name:?}"),
                    allowed: format!("a local account name: {}", err.allowed),
                })
            })
            .transpose()?;
        let post_authentication_reset_delay_hours = in_range(
            "PostAuthenticationResetDelay",
            settings.post_authentication_reset_delay.unwrap_or(24),
            &Self::POST_AUTHENTICATION_RESET_DELAY,
        )?;
        let actions_value = settings.post_authentication_actions.unwrap_or(3);
        let post_authentication_actions =
            PostAuthenticationActions::from_value(actions_value).ok_or_else(|| PolicyError {
                setting: "PostAuthenticationActions",
                value: actions_value.to_string(),
                allowed: "1, 3, 5 or 11".to_owned(),
            })?;
        Ok(Self {
            backup_directory,
            password_age_days: u16::try_from(password_age_days).expect("range checked above"),
            password_complexity,
            password_length: u8::try_from(password_length).expect("range checked above"),
            passphrase_length: u8::try_from(passphrase_length).expect("range checked above"),
            administrator_account_name,
            post_authentication_reset_delay_hours: u8::try_from(post_authentication_reset_delay_hours)
                .expect("range checked above"),
            post_authentication_actions,
        })
    }

    /// The settings this policy was built from, every one filled in.
    pub fn to_settings(&self) -> PolicySettings {
        PolicySettings {
            backup_directory: Some(self.backup_directory.value().into()),
            password_age_days: Some(self.password_age_days.into()),
            password_complexity: Some(self.password_complexity.value().into()),
            password_length: Some(self.password_length.into()),
            passphrase_length: Some(self.passphrase_length.into()),
            administrator_account_name: self
                .administrator_account_name
                .as_ref()
                .map(|name| name.as_str().to_owned()),
            post_authentication_reset_delay: Some(self.post_authentication_reset_delay_hours.into()),
            post_authentication_actions: Some(self.post_authentication_actions.value().into()),
        }
    }

    /// LAPS `BackupDirectory`.
    pub fn backup_directory(&self) -> BackupDirectory {
        self.backup_directory
    }

    /// LAPS `PasswordAgeDays`: the maximum age of a password.
    pub fn password_age(&self) -> chrono::Duration {
        chrono::Duration::days(self.password_age_days.into())
    }

    /// LAPS `PasswordComplexity`.
    pub fn password_complexity(&self) -> PasswordComplexity {
        self.password_complexity
    }

    /// LAPS `PasswordLength`, in characters.
    pub fn password_length(&self) -> u8 {
        self.password_length
    }

    /// LAPS `PassphraseLength`, in words.
    pub fn passphrase_length(&self) -> u8 {
        self.passphrase_length
    }

    /// LAPS `AdministratorAccountName`; `None` means the account with UID 0.
    pub fn administrator_account_name(&self) -> Option<&AccountName> {
        self.administrator_account_name.as_ref()
    }

    /// LAPS `PostAuthenticationResetDelay`; `None` when it is 0, which disables the actions.
    pub fn post_authentication_reset_delay(&self) -> Option<chrono::Duration> {
        (self.post_authentication_reset_delay_hours > 0)
            .then(|| chrono::Duration::hours(self.post_authentication_reset_delay_hours.into()))
    }

    /// LAPS `PostAuthenticationActions`.
    pub fn post_authentication_actions(&self) -> PostAuthenticationActions {
        self.post_authentication_actions
    }
}

impl Default for Policy {
    /// The LAPS defaults, backing up to the orchestrator.
    fn default() -> Self {
        Self::from_settings(&PolicySettings::default()).expect("the LAPS defaults are in range")
    }
}

impl TryFrom<PolicySettings> for Policy {
    type Error = PolicyError;

    fn try_from(settings: PolicySettings) -> Result<Self, PolicyError> {
        Self::from_settings(&settings)
    }
}

impl From<Policy> for PolicySettings {
    fn from(policy: Policy) -> Self {
        policy.to_settings()
    }
}

/// Where the policy in force came from (LAPS reports its policy source in event 10022).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// Sent by the orchestrator at enrollment (LAPS: CSP); it wins over the local config.
    Orchestrator,
    /// The agent's local config file (LAPS: local configuration).
    LocalConfig,
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Orchestrator => "orchestrator",
            Self::LocalConfig => "local config",
        })
    }
}

fn in_range(setting: &'static str, value: i64, range: &RangeInclusive<i64>) -> Result<i64, PolicyError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(PolicyError {
            setting,
            value: value.to_string(),
            allowed: format!("{} to {}", range.start(), range.end()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(edit: impl FnOnce(&mut PolicySettings)) -> PolicySettings {
        let mut settings = PolicySettings::default();
        edit(&mut settings);
        settings
    }

    #[test]
    fn defaults_are_the_laps_defaults() {
        let policy = Policy::default();
        assert_eq!(policy.backup_directory(), BackupDirectory::Orchestrator);
        assert_eq!(policy.password_age(), chrono::Duration::days(30));
        assert_eq!(
            policy.password_complexity(),
            PasswordComplexity::UpperLowerDigitsSpecials
        );
        assert_eq!(policy.password_length(), 14);
        assert_eq!(policy.passphrase_length(), 6);
        assert_eq!(policy.administrator_account_name(), None);
        assert_eq!(
            policy.post_authentication_reset_delay(),
            Some(chrono::Duration::hours(24))
        );
        assert_eq!(
            policy.post_authentication_actions(),
            PostAuthenticationActions::ResetPasswordAndLogoff
        );
    }

    #[test]
    fn out_of_range_settings_name_the_setting_and_the_range() {
        let cases: [(PolicySettings, &str); 8] = [
            (
                settings(|s| s.password_length = Some(7)),
                "policy setting PasswordLength = 7: allowed 8 to 64",
            ),
            (
                settings(|s| s.password_length = Some(65)),
                "policy setting PasswordLength = 65: allowed 8 to 64",
            ),
            (
                settings(|s| s.password_complexity = Some(9)),
                "policy setting PasswordComplexity = 9: allowed 1 to 8",
            ),
            (
                settings(|s| s.passphrase_length = Some(2)),
                "policy setting PassphraseLength = 2: allowed 3 to 10",
            ),
            (
                settings(|s| s.password_age_days = Some(6)),
                "policy setting PasswordAgeDays = 6: allowed 7 to 365",
            ),
            (
                settings(|s| s.post_authentication_reset_delay = Some(25)),
                "policy setting PostAuthenticationResetDelay = 25: allowed 0 to 24",
            ),
            (
                settings(|s| s.post_authentication_actions = Some(2)),
                "policy setting PostAuthenticationActions = 2: allowed 1, 3, 5 or 11",
            ),
            (
                settings(|s| s.backup_directory = Some(2)),
                "policy setting BackupDirectory = 2: allowed 0 (disabled) or 1 (orchestrator); 2 (Active Directory) is not supported",
            ),
        ];
        for (settings, message) in cases {
            let err = Policy::from_settings(&settings).expect_err(message);
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn a_short_age_is_allowed_only_without_backup() {
        let without_backup = settings(|s| {
            s.backup_directory = Some(0);
            s.password_age_days = Some(1);
        });
        assert!(Policy::from_settings(&without_backup).is_ok());
    }

    #[test]
    fn bad_account_name_is_refused() {
        let err = Policy::from_settings(&settings(|s| {
            s.administrator_account_name = Some("Bad Name".to_owned())
        }))
        .expect_err("refused");
        assert_eq!(err.setting, "AdministratorAccountName");
    }

    #[test]
    fn policy_uses_laps_names_on_the_wire_and_round_trips() {
        let policy = Policy::from_settings(&settings(|s| {
            s.administrator_account_name = Some("lapsadmin".to_owned());
            s.post_authentication_actions = Some(11);
        }))
        .expect("valid");
        let json = serde_json::to_value(&policy).expect("serialises");
        assert_eq!(json["AdministratorAccountName"], "lapsadmin");
        assert_eq!(json["PostAuthenticationActions"], 11);
        assert_eq!(json["PasswordAgeDays"], 30);
        let back: Policy = serde_json::from_value(json).expect("parses");
        assert_eq!(back, policy);
    }

    #[test]
    fn unknown_settings_are_refused_by_name() {
        let err = serde_json::from_str::<Policy>(r#"{"PasswordLenght": 14}"#).expect_err("unknown field");
        assert!(err.to_string().contains("PasswordLenght"), "{err}");
    }
}
