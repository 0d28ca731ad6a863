//! The shapes of the orchestrator's HTTP API: Microsoft Graph's `deviceLocalCredentialInfo`.
//!
//! Field names and formats are Graph's, so a script written for
//! `GET https://graph.microsoft.com/v1.0/directory/deviceLocalCredentials/{id}?$select=credentials`
//! works against the orchestrator by changing the base URL. Errors use OData's shape.

use std::fmt;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{DeviceId, DeviceName};

/// Graph's scope that reads the device directory (names, ids, last seen).
pub const SCOPE_DEVICE_READ: &str = "Device.Read.All";
/// Graph's scope that reads credential metadata only.
pub const SCOPE_READ_BASIC: &str = "DeviceLocalCredential.ReadBasic.All";
/// Graph's scope that also reads the passwords.
pub const SCOPE_READ_PASSWORDS: &str = "DeviceLocalCredential.Read.All";
/// Asks a device to rotate its password now (Intune's "Rotate local admin password").
pub const SCOPE_ROTATE: &str = "DeviceLocalCredential.Rotate";
/// Declares a breach, which forces early rotations fleet-wide.
pub const SCOPE_BREACH_DECLARE: &str = "Breach.Declare";
/// Reads the audit history: who read which password, who made or revoked which token.
pub const SCOPE_AUDIT_READ: &str = "Audit.Read.All";
/// Manages principals: creates, lists and revokes tokens and enrollment tokens; reads the
/// quarantine.
pub const SCOPE_ADMIN: &str = "Admin";
/// Lets a token creator give scopes it does not hold itself. Without it, a principal with
/// `Admin` may create tokens holding only scopes it holds (no escalation). The bootstrap admin
/// token holds it, so it can hand out the first tokens.
pub const SCOPE_TOKEN_GRANT: &str = "Token.Grant";

/// The NATS header carrying a device event's Ed25519 signature (standard base64) over
/// `subject + "\n" + payload`.
pub const SIGNATURE_HEADER: &str = "Fleetlaps-Signature";

/// The header a caller may give the reason for a password read in; it is recorded in the audit.
pub const REASON_HEADER: &str = "x-fleetlaps-reason";
/// The header that carries the id of the command a rotate request issued.
pub const COMMAND_ID_HEADER: &str = "x-fleetlaps-command-id";

/// Graph's `deviceLocalCredentialInfo`: one device's backed-up credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceLocalCredentialInfo {
    /// The device id.
    pub id: DeviceId,
    /// The device's host name.
    pub device_name: DeviceName,
    /// When the newest password was backed up.
    pub last_backup_date_time: Option<DateTime<Utc>>,
    /// When the newest password is due to be rotated.
    pub refresh_date_time: Option<DateTime<Utc>>,
    /// Present only when asked for with `$select=credentials`: newest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Vec<DeviceLocalCredential>>,
}

/// Graph's `deviceLocalCredential`: one backed-up password of one account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceLocalCredential {
    /// The managed account's name.
    pub account_name: String,
    /// The account's identifier: on Linux, its UID.
    pub account_sid: Option<String>,
    /// When this password was backed up.
    pub backup_date_time: DateTime<Utc>,
    /// The password, base64 of its UTF-8 bytes, as Graph sends it.
    pub password_base64: PasswordBase64,
}

/// A password as Graph's `passwordBase64`. Its `Debug` never shows it.
#[derive(Clone)]
pub struct PasswordBase64(SecretString);

impl PasswordBase64 {
    /// Encodes a password.
    pub fn encode(password: &str) -> Self {
        use base64::Engine as _;
        Self(
            base64::engine::general_purpose::STANDARD
                .encode(password.as_bytes())
                .into(),
        )
    }

    /// Decodes the password, refusing text that is not base64 of UTF-8.
    pub fn decode(&self) -> Result<crate::password::Password, String> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.0.expose_secret())
            .map_err(|err| format!("passwordBase64 is not base64: {err}"))?;
        String::from_utf8(bytes)
            .map(crate::password::Password::new)
            .map_err(|_| "passwordBase64 is not UTF-8 text".to_owned())
    }

    /// The base64 text.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for PasswordBase64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.expose_secret() == other.0.expose_secret()
    }
}

impl fmt::Debug for PasswordBase64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordBase64(***)")
    }
}

impl Serialize for PasswordBase64 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.expose_secret())
    }
}

impl<'de> Deserialize<'de> for PasswordBase64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self(String::deserialize(deserializer)?.into()))
    }
}

/// An OData collection page: `{"@odata.context": …, "value": [...], "@odata.nextLink": …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ODataCollection<T> {
    /// Where the collection's metadata is described.
    #[serde(rename = "@odata.context")]
    pub context: String,
    /// The items of this page.
    pub value: Vec<T>,
    /// The URL of the next page, when there is one.
    #[serde(rename = "@odata.nextLink", default, skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
}

/// `POST /v1.0/fleetlaps/tokens`: a token to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// Who will hold it: the principal recorded for what it does.
    pub name: String,
    /// Its scopes, by name.
    pub scopes: Vec<String>,
    /// When it stops working; `None` for never.
    #[serde(default)]
    pub expires_date_time: Option<DateTime<Utc>>,
}

/// A token as listed: everything but the token itself, which only its creator sees, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// The token's id.
    pub id: String,
    /// Its holder.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// When it was created.
    pub created_date_time: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// When it stops working, if ever.
    pub expires_date_time: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_date_time: Option<DateTime<Utc>>,
}

/// The answer to a token creation: the token, shown this once, and its description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    /// The bearer token. The orchestrator keeps only its SHA-256.
    pub token: BearerToken,
    /// What it is.
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// A bearer token in an answer. Its `Debug` never shows it.
#[derive(Clone)]
pub struct BearerToken(SecretString);

impl BearerToken {
    /// Wraps a token.
    pub fn new(token: String) -> Self {
        Self(token.into())
    }

    /// The token itself, to hand to its holder.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(***)")
    }
}

impl Serialize for BearerToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.expose_secret())
    }
}

impl<'de> Deserialize<'de> for BearerToken {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self(String::deserialize(deserializer)?.into()))
    }
}

/// `POST /v1.0/fleetlaps/enrollmentTokens`: an enrollment token to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollmentTokenRequest {
    /// What it is for (a batch of devices, a site), for people.
    pub name: String,
    /// How many devices may enroll with it; 1 (single-use) when not given.
    #[serde(default)]
    pub max_uses: Option<u32>,
    /// When it stops working; 24 hours from now when not given.
    #[serde(default)]
    pub expires_date_time: Option<DateTime<Utc>>,
}

/// An enrollment token as listed: everything but the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentTokenInfo {
    /// The token's id.
    pub id: String,
    /// What it is for.
    pub name: String,
    /// How many devices may enroll with it.
    pub max_uses: u32,
    /// How many have.
    pub uses: u32,
    /// When it was created.
    pub created_date_time: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// When it stops working.
    pub expires_date_time: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_date_time: Option<DateTime<Utc>>,
}

/// The answer to an enrollment token's creation: the token, shown this once, and its description.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedEnrollmentToken {
    /// The enrollment token. The orchestrator keeps only its SHA-256.
    pub token: BearerToken,
    /// What it is.
    #[serde(flatten)]
    pub info: EnrollmentTokenInfo,
}

/// `POST /fleetlaps/v1/enroll`, with the enrollment token as bearer: a device asking to enroll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollmentRequest {
    /// The device's Ed25519 public key, standard base64 of its 32 bytes.
    pub public_key: String,
    /// The device's host name.
    pub device_name: DeviceName,
    /// Tags for the device (a site, a group), at most [`crate::ids::DeviceTag::MAX_PER_DEVICE`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<crate::ids::DeviceTag>,
}

/// `PUT /v1.0/fleetlaps/devices/{deviceId}/tags`: a device's tags, replacing the ones it had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceTagsRequest {
    /// The tags, at most [`crate::ids::DeviceTag::MAX_PER_DEVICE`]; none clears them.
    pub tags: Vec<crate::ids::DeviceTag>,
}

/// The answer to an enrollment: who the device now is, what it seals to, and its policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentResponse {
    /// The id the orchestrator gave the device: its events' subjects carry it.
    pub device_id: DeviceId,
    /// The key the device seals its passwords to.
    pub escrow_public_key: crate::seal::EscrowPublicKey,
    /// The offline recovery key every backup is also sealed to, if the orchestrator has one.
    #[serde(default)]
    pub escrow_recovery_public_key: Option<crate::seal::EscrowPublicKey>,
    /// The orchestrator's LAPS policy, if it has one; it wins over the device's local policy.
    #[serde(default)]
    pub policy: Option<crate::policy::Policy>,
}

/// A page of `GET /v1.0/fleetlaps/quarantine`: an OData collection with the quarantine's bound
/// and how many older entries were dropped to keep it, as instance annotations (OData's
/// `@namespace.term` form, like Graph's `@odata.count`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineCollection {
    /// Where the collection's metadata is described.
    #[serde(rename = "@odata.context")]
    pub context: String,
    /// The entries of this page, oldest first.
    pub value: Vec<QuarantineEntry>,
    /// The URL of the next page, when there is one.
    #[serde(rename = "@odata.nextLink", default, skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
    /// How many entries the quarantine keeps at most (`quarantine.max_entries`).
    #[serde(rename = "@fleetlaps.maxEntries")]
    pub max_entries: u64,
    /// How many of the oldest entries were dropped to keep the bound, in all.
    #[serde(rename = "@fleetlaps.droppedCount")]
    pub dropped_count: u64,
    /// The same, by the dropped entries' reason; reasons with none dropped are left out.
    #[serde(rename = "@fleetlaps.droppedCountByReason", default)]
    pub dropped_count_by_reason: std::collections::BTreeMap<String, u64>,
}

/// A stream message the orchestrator refused, as `GET /v1.0/fleetlaps/quarantine` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineEntry {
    /// Its position in the stream, where the message itself stays for investigation.
    pub stream_sequence: u64,
    /// The subject it came on.
    pub subject: String,
    /// Why it was refused: `forged`, `unopenable`, `unknown_device`, `subject_mismatch`, …
    pub reason: String,
    /// An explanation without payload content.
    pub detail: String,
    /// When the stream stored it.
    pub received_date_time: DateTime<Utc>,
}

/// An entry of the audit history, as `GET /v1.0/fleetlaps/auditEvents` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Its position in the history (the stream sequence).
    pub sequence: u64,
    /// The event's id.
    pub id: String,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// `password_read`, `token_created`, `token_revoked`, `rotation_requested`.
    pub kind: String,
    /// What happened, as recorded (never a password or a token).
    pub body: serde_json::Value,
}

/// OData's error body: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ODataError {
    /// The error itself.
    pub error: ODataErrorDetail,
}

/// The inside of an [`ODataError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ODataErrorDetail {
    /// A stable machine-readable code (`Authorization_RequestDenied`, `Request_ResourceNotFound`, …).
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

impl ODataError {
    /// An error with its code and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ODataErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_info_uses_graph_field_names() {
        let info = DeviceLocalCredentialInfo {
            id: DeviceId::parse("dev-1").expect("valid"),
            device_name: DeviceName::parse("host-1").expect("valid"),
            last_backup_date_time: Some(DateTime::from_timestamp(0, 0).expect("valid")),
            refresh_date_time: None,
            credentials: Some(vec![DeviceLocalCredential {
                account_name: "lapsadmin".to_owned(),
                account_sid: Some("1001".to_owned()),
                backup_date_time: DateTime::from_timestamp(0, 0).expect("valid"),
                password_base64: PasswordBase64::encode("Pässword"),
            }]),
        };
        let json = serde_json::to_value(&info).expect("serialises");
        assert_eq!(json["deviceName"], "host-1");
        assert_eq!(json["lastBackupDateTime"], "1970-01-01T00:00:00Z");
        assert_eq!(json["credentials"][0]["accountSid"], "1001");
        assert_eq!(json["credentials"][0]["passwordBase64"], "UMOkc3N3b3Jk");
        let back: DeviceLocalCredentialInfo = serde_json::from_value(json).expect("parses");
        let password = back.credentials.expect("present")[0]
            .password_base64
            .decode()
            .expect("decodes");
        assert_eq!(password.expose(), "Pässword");
    }

    #[test]
    fn password_base64_is_not_in_debug_output() {
        let encoded = PasswordBase64::encode("hunter2");
        assert!(!format!("{encoded:?}").contains(encoded.expose()));
    }

    #[test]
    fn odata_error_shape() {
        let json = serde_json::to_value(ODataError::new("Request_ResourceNotFound", "no such device")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "Request_ResourceNotFound", "message": "no such device"}})
        );
    }
}

/// `POST /v1.0/fleetlaps/breaches`: a breach signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BreachRequest {
    /// Why, for people (what leaked, the incident's reference).
    pub reason: String,
    /// When every device should have rotated.
    pub deadline: DateTime<Utc>,
    /// Which devices (`{"kind": "all"}`, `{"kind": "devices", "deviceIds": [...]}`,
    /// `{"kind": "readBy", "principal": "...", "since": "..."}`,
    /// `{"kind": "authenticatedSince", "since": "..."}`).
    pub scope: crate::breach::BreachScope,
}

/// A breach's campaign as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BreachInfo {
    /// The breach's id.
    pub id: String,
    /// Why.
    pub reason: String,
    /// Which devices, in words.
    pub scope: String,
    /// `declared`, `running`, `completed`, `deadline_passed` or `cancelled`.
    pub state: String,
    /// When it was declared.
    pub declared_date_time: DateTime<Utc>,
    /// Who declared it.
    pub declared_by: String,
    /// When every device should have rotated.
    pub deadline_date_time: DateTime<Utc>,
    /// When it ended.
    pub ended_date_time: Option<DateTime<Utc>>,
    /// How many devices it targets.
    pub targeted: u32,
    /// How many were sent a rotate command (or are covered by another campaign's).
    pub commanded: u32,
    /// How many confirmed a rotation dated after the declaration.
    pub rotated: u32,
    /// Commanded devices that reported a failed rotation since (in `show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<u32>,
    /// Commanded devices not heard from since their command: offline, they rotate when they
    /// return (in `show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_waiting: Option<u32>,
    /// Devices not yet rotated, at most 100 (in `show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stragglers: Option<Vec<DeviceId>>,
}

/// One entry of a device's timeline, as `GET /v1.0/fleetlaps/devices/{id}/timeline` lists it:
/// one event of the device, or one orchestrator event about it, in the history's order. It never
/// holds a password, sealed or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    /// Its position in the history (the stream sequence): the timeline's order.
    pub sequence: u64,
    /// The event's id.
    pub id: String,
    /// When it happened, by the clock of who recorded it (the device, or the orchestrator).
    pub time: DateTime<Utc>,
    /// The event's kind (`password_rotated`, `password_read`, `breach_targeted`, …).
    pub kind: String,
    /// Who did it: `device` for the device's own events, a principal (a token's name) for what a
    /// person did, `orchestrator` for what the orchestrator decided.
    pub actor: String,
    /// The id of the token the principal used, when a person did it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_token_id: Option<String>,
    /// What happened, in a few words.
    pub summary: String,
    /// The event's relevant fields, by name (never a password, sealed or not).
    pub fields: serde_json::Value,
}

/// `GET /v1.0/fleetlaps/devices/{id}/exposure?at=TIME`: which password version was valid on a
/// device at an instant, who read it, when it was used, when it was rotated away. It never holds
/// a password, sealed or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExposureReport {
    /// The device.
    pub device_id: DeviceId,
    /// The instant asked about.
    pub at: DateTime<Utc>,
    /// The version valid then: the newest whose rotation the device applied at or before `at`;
    /// `None` when none was.
    pub version: Option<ExposedVersion>,
    /// A newer version backed up at or before `at` but not applied on the device by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingVersion>,
    /// Every read that returned the valid version, oldest first.
    pub reads: Vec<ExposureRead>,
    /// The device's authentications while the version was valid, oldest first.
    pub uses: Vec<ExposureUse>,
    /// The answer in one sentence, for people.
    pub summary: String,
}

/// The version an [`ExposureReport`] is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExposedVersion {
    /// The rotation that made it (LAPS's password version).
    pub rotation_id: String,
    /// When the device backed it up.
    pub backed_up_date_time: DateTime<Utc>,
    /// The stream sequence of its backup.
    pub backed_up_sequence: u64,
    /// When the device applied it to the account.
    pub applied_date_time: DateTime<Utc>,
    /// The stream sequence of the rotation that applied it.
    pub applied_sequence: u64,
    /// When the next rotation the device applied replaced it; `None` while it is still current.
    pub rotated_away_date_time: Option<DateTime<Utc>>,
    /// The stream sequence of that next rotation.
    pub rotated_away_sequence: Option<u64>,
    /// The rotation that replaced it.
    pub rotated_away_by: Option<String>,
}

/// A version backed up but not yet applied at the instant asked about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingVersion {
    /// Its rotation.
    pub rotation_id: String,
    /// When the device backed it up.
    pub backed_up_date_time: DateTime<Utc>,
    /// The stream sequence of its backup.
    pub backed_up_sequence: u64,
    /// When the device applied it later, if it did.
    pub applied_date_time: Option<DateTime<Utc>>,
}

/// A password read that returned the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExposureRead {
    /// The read's position in the history.
    pub sequence: u64,
    /// When.
    pub time: DateTime<Utc>,
    /// Who (a token's name).
    pub principal: String,
    /// The id of the token that read.
    pub principal_token_id: Option<String>,
    /// Why, when the reader said.
    pub reason: Option<String>,
    /// The address the request came from.
    pub source_address: Option<String>,
    /// The calling tool (`ocp-client-name`), when sent.
    pub client_name: Option<String>,
    /// Whether it happened before the version was rotated away, so the reader could have used it.
    pub before_rotated_away: bool,
}

/// An authentication as the managed account while the version was valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExposureUse {
    /// The report's position in the history.
    pub sequence: u64,
    /// When the device reported it.
    pub time: DateTime<Utc>,
    /// `success` or `failure`.
    pub outcome: String,
    /// How many authentications the report counts.
    pub count: u64,
    /// The PAM service.
    pub service: String,
    /// The remote host, when PAM knew one.
    pub remote_host: Option<String>,
    /// The terminal, when PAM knew one.
    pub tty: Option<String>,
    /// The first authentication counted, for an aggregated report.
    pub first_date_time: Option<DateTime<Utc>>,
    /// The last authentication counted, for an aggregated report.
    pub last_date_time: Option<DateTime<Utc>>,
}
