//! The event envelope and the closed set of event kinds.
//!
//! Every fact a device reports is one [`Envelope`] on the stream, as JSON with an explicit schema
//! version. The kinds form one closed enum, [`Event`], named as past-tense facts, so that every
//! consumer matches on all of them in one place. Each kind carries the Windows LAPS event code
//! where LAPS has one (10029 for a backup, 10020 for the local account update, …).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AccountName, DeviceId, DeviceName, EventId, InstanceId, RotationId};
use crate::policy::{Policy, PolicySource};
use crate::seal::SealedBox;

/// The schema version written into every envelope; a consumer refuses any other.
pub const SCHEMA_VERSION: u32 = 1;

/// One event as it travels on the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always [`SCHEMA_VERSION`] when written by this version.
    pub schema: u32,
    /// Unique id, also the `Nats-Msg-Id` header, so a re-sent event is deduplicated.
    pub id: EventId,
    /// The device the event is about; must match the device token of its subject.
    pub device_id: DeviceId,
    /// The generation of the device's state that emitted it: a state made afresh, or one that
    /// found it was restored from an older copy (an image rollback), starts a higher one, so its
    /// events order after everything emitted before. 0 in events of agents older than it.
    #[serde(default)]
    pub generation: u64,
    /// The device's own counter: each event it emits has the next number, starting at 1.
    pub sequence: u64,
    /// The running copy of the agent that emitted it; two copies of one device (a cloned image)
    /// show as two instances whose events interleave. Absent in events of agents older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceId>,
    /// When the fact happened, in UTC.
    pub time: DateTime<Utc>,
    /// The LAPS event code of the kind, when LAPS has one; redundant with the kind and checked.
    pub code: Option<u32>,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// What happened: one closed set of past-tense facts, each with its body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Event {
    /// The agent started with (or changed to) a policy (LAPS 10022).
    PolicyApplied(PolicyApplied),
    /// A new password was sealed and handed to the stream, before the account changes (LAPS 10029).
    PasswordBackedUp(PasswordBackedUp),
    /// The managed account now has the backed-up password (LAPS 10020).
    PasswordRotated(PasswordRotated),
    /// A rotation could not be completed; the account keeps its password (LAPS 10005).
    RotationFailed(RotationFailed),
    /// The configured managed account does not exist; nothing was rotated (LAPS 10013).
    AccountMissing(AccountMissing),
    /// Someone authenticated as the managed account; a reset is scheduled (LAPS 10041).
    AuthenticationSucceeded(AuthenticationObserved),
    /// An authentication as the managed account failed.
    AuthenticationFailed(AuthenticationObserved),
    /// The post-authentication grace period ended; the actions start (LAPS 10042).
    PostAuthenticationActionsStarted(PostAuthenticationActions),
    /// The post-authentication reset and actions succeeded (LAPS 10044).
    PostAuthenticationActionsSucceeded(PostAuthenticationActions),
    /// The post-authentication reset or an action failed; it will be retried (LAPS 10043).
    PostAuthenticationActionsFailed(PostAuthenticationActionsFailed),
    /// A command from the orchestrator was carried out (or refused). Agents no longer send it
    /// for a rotation a command caused: its [`PasswordRotated::command_id`] says so in the same
    /// event.
    CommandExecuted(CommandExecuted),
    /// The device's state is behind the centre's view of it: the device was restored from an
    /// older copy (an image rollback, a snapshot) or lost its state; it rotates at once (LAPS
    /// 10015 with reason 0x4000).
    ImageRollbackDetected(ImageRollbackDetected),
}

/// The kind of an event, without its body: names subjects and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// See [`Event::PolicyApplied`].
    PolicyApplied,
    /// See [`Event::PasswordBackedUp`].
    PasswordBackedUp,
    /// See [`Event::PasswordRotated`].
    PasswordRotated,
    /// See [`Event::RotationFailed`].
    RotationFailed,
    /// See [`Event::AccountMissing`].
    AccountMissing,
    /// See [`Event::AuthenticationSucceeded`].
    AuthenticationSucceeded,
    /// See [`Event::AuthenticationFailed`].
    AuthenticationFailed,
    /// See [`Event::PostAuthenticationActionsStarted`].
    PostAuthenticationActionsStarted,
    /// See [`Event::PostAuthenticationActionsSucceeded`].
    PostAuthenticationActionsSucceeded,
    /// See [`Event::PostAuthenticationActionsFailed`].
    PostAuthenticationActionsFailed,
    /// See [`Event::CommandExecuted`].
    CommandExecuted,
    /// See [`Event::ImageRollbackDetected`].
    ImageRollbackDetected,
}

/// Body of [`Event::PolicyApplied`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyApplied {
    /// The device's host name.
    pub device_name: DeviceName,
    /// Where the policy came from.
    pub source: PolicySource,
    /// Every setting of the policy in force.
    pub policy: Policy,
}

/// Why a rotation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationReason {
    /// The device had no backed-up password yet.
    Initial,
    /// The password reached `PasswordAgeDays`.
    Expired,
    /// Someone asked for it on the device (`fleetlaps-agent reset`, LAPS `Reset-LapsPassword`).
    Manual,
    /// The orchestrator sent a rotate command.
    Command,
    /// The post-authentication grace period ended.
    PostAuthentication,
    /// The device found it was rolled back to an older image (LAPS 10015, reason 0x4000).
    Rollback,
}

impl RotationReason {
    /// Every reason, for metrics.
    pub const ALL: [Self; 6] = [
        Self::Initial,
        Self::Expired,
        Self::Manual,
        Self::Command,
        Self::PostAuthentication,
        Self::Rollback,
    ];

    /// The reason's name, as serialised and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Expired => "expired",
            Self::Manual => "manual",
            Self::Command => "command",
            Self::PostAuthentication => "post_authentication",
            Self::Rollback => "rollback",
        }
    }
}

/// Body of [`Event::PasswordBackedUp`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasswordBackedUp {
    /// The rotation this backup belongs to; the matching [`PasswordRotated`] names it too.
    pub rotation_id: RotationId,
    /// The device's host name.
    pub device_name: DeviceName,
    /// The managed account.
    pub account_name: AccountName,
    /// The account's numeric id (LAPS: its SID; here the UID, for Graph's `accountSid`).
    pub account_uid: Option<u32>,
    /// The new password, sealed to the escrow key with [`sealing_context`].
    pub sealed_password: SealedBox,
    /// The escrow public key `sealed_password` is sealed to, so the orchestrator knows which of
    /// its keys opens it; `None` in backups of agents older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escrow_public_key: Option<crate::seal::EscrowPublicKey>,
    /// The same password sealed to the offline recovery key, when the orchestrator has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_sealed_password: Option<SealedBox>,
    /// When the new password must be rotated again (Graph's `refreshDateTime`).
    pub expires_at: DateTime<Utc>,
    /// Why the rotation started.
    pub reason: RotationReason,
}

/// Body of [`Event::PasswordRotated`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasswordRotated {
    /// The rotation whose backup is now the account's password.
    pub rotation_id: RotationId,
    /// The managed account.
    pub account_name: AccountName,
    /// The command this rotation carried out, when one caused it (a rotation request, a breach
    /// campaign's wave): the rotation is the command's execution, and no `command_executed`
    /// follows it. Absent from rotations no command caused, and from agents that reported the
    /// execution as a `command_executed` of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<crate::command::CommandId>,
}

/// Where in the rotation a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationStage {
    /// Before anything was sent: the account or the policy was not usable.
    Prepare,
    /// The backup could not be stored; the account was not touched.
    Backup,
    /// The account could not be changed after the backup.
    Apply,
}

/// Body of [`Event::RotationFailed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationFailed {
    /// The rotation that failed, if it got as far as having one.
    pub rotation_id: Option<RotationId>,
    /// Where it failed.
    pub stage: RotationStage,
    /// What went wrong, without any secret.
    pub error: String,
}

/// Body of [`Event::AccountMissing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountMissing {
    /// The account looked for: a name, or `uid 0`.
    pub account: String,
}

/// Whether an authentication succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthenticationOutcome {
    /// The password was accepted.
    Success,
    /// The password was refused.
    Failure,
}

/// Body of [`Event::AuthenticationSucceeded`] and [`Event::AuthenticationFailed`]: what PAM told
/// the agent about an authentication as the managed account. Failures are aggregated: one event
/// may report `count` of them, from `first_at` to `last_at`, PAM's details being the last one's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthenticationObserved {
    /// The managed account.
    pub account_name: AccountName,
    /// The PAM service (`sshd`, `login`, `sudo`, …).
    pub service: String,
    /// The remote host, when PAM knows one.
    pub remote_host: Option<String>,
    /// The terminal, when PAM knows one.
    pub tty: Option<String>,
    /// After a success: when the post-authentication reset will run (`None` when
    /// PostAuthenticationResetDelay is 0, which disables it).
    pub reset_deadline: Option<DateTime<Utc>>,
    /// How many authentications the event reports; agents before aggregation sent one each, so
    /// 1 when absent.
    #[serde(default = "one")]
    pub count: u64,
    /// The first authentication counted, when the event reports more than one or a later one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_at: Option<DateTime<Utc>>,
    /// The last authentication counted, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<DateTime<Utc>>,
}

/// The `count` of an [`AuthenticationObserved`] without one.
fn one() -> u64 {
    1
}

/// Body of [`Event::PostAuthenticationActionsStarted`] and
/// [`Event::PostAuthenticationActionsSucceeded`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostAuthenticationActions {
    /// The managed account.
    pub account_name: AccountName,
    /// The LAPS `PostAuthenticationActions` value carried out: 1, 3, 5 or 11.
    pub actions: u8,
}

/// Body of [`Event::PostAuthenticationActionsFailed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostAuthenticationActionsFailed {
    /// The managed account.
    pub account_name: AccountName,
    /// The LAPS `PostAuthenticationActions` value attempted.
    pub actions: u8,
    /// How many attempts have failed so far.
    pub attempt: u32,
    /// What went wrong, without any secret.
    pub error: String,
}

/// Body of [`Event::CommandExecuted`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandExecuted {
    /// The command carried out.
    pub command_id: crate::command::CommandId,
    /// The rotation it made, if it rotated.
    pub rotation_id: Option<RotationId>,
    /// `None` on success, else why it failed.
    pub error: Option<String>,
}

/// Body of [`Event::ImageRollbackDetected`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRollbackDetected {
    /// The rotation the device's state held as current, if any.
    pub local_rotation_id: Option<RotationId>,
    /// The rotation the centre holds as current, if any.
    pub centre_rotation_id: Option<RotationId>,
    /// The position the device's state was at.
    pub local_position: crate::command::DevicePosition,
    /// The newest position the centre had seen.
    pub centre_position: crate::command::DevicePosition,
    /// The generation the device goes on with.
    pub new_generation: u64,
}

/// Why bytes from the stream are not a valid envelope.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not of the envelope's shape.
    #[error("malformed envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Written by a schema this version does not read.
    #[error("unsupported schema version {found}, expected {SCHEMA_VERSION}")]
    UnsupportedSchema {
        /// The version in the envelope.
        found: u32,
    },
    /// The LAPS code does not belong to the kind.
    #[error("event code {found:?} does not match kind {kind}, which has {expected:?}")]
    CodeMismatch {
        /// The kind of the event.
        kind: EventKind,
        /// The code the envelope carried.
        found: Option<u32>,
        /// The code of the kind.
        expected: Option<u32>,
    },
}

impl Envelope {
    /// Wraps an event with a fresh id and the kind's LAPS code, at generation 0.
    pub fn new(device_id: DeviceId, sequence: u64, time: DateTime<Utc>, event: Event) -> Self {
        Self::at(
            device_id,
            crate::command::DevicePosition {
                generation: 0,
                sequence,
            },
            time,
            event,
        )
    }

    /// Wraps an event with a fresh id and the kind's LAPS code, at `position`.
    pub fn at(
        device_id: DeviceId,
        position: crate::command::DevicePosition,
        time: DateTime<Utc>,
        event: Event,
    ) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            id: EventId::new(),
            device_id,
            generation: position.generation,
            sequence: position.sequence,
            instance: None,
            time,
            code: event.kind().code(),
            event,
        }
    }

    /// The same envelope, stamped as emitted by `instance`.
    pub fn emitted_by(mut self, instance: InstanceId) -> Self {
        self.instance = Some(instance);
        self
    }

    /// Where the event stands in its device's order.
    pub fn position(&self) -> crate::command::DevicePosition {
        crate::command::DevicePosition {
            generation: self.generation,
            sequence: self.sequence,
        }
    }

    /// The envelope as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises: it has only string keys")
    }

    /// Parses and checks an envelope: the schema version and the code of its kind.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope: Self = serde_json::from_slice(bytes)?;
        if envelope.schema != SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedSchema { found: envelope.schema });
        }
        let kind = envelope.event.kind();
        if envelope.code != kind.code() {
            return Err(DecodeError::CodeMismatch {
                kind,
                found: envelope.code,
                expected: kind.code(),
            });
        }
        Ok(envelope)
    }
}

impl Event {
    /// The kind of this event.
    pub fn kind(&self) -> EventKind {
        match self {
            Self::PolicyApplied(_) => EventKind::PolicyApplied,
            Self::PasswordBackedUp(_) => EventKind::PasswordBackedUp,
            Self::PasswordRotated(_) => EventKind::PasswordRotated,
            Self::RotationFailed(_) => EventKind::RotationFailed,
            Self::AccountMissing(_) => EventKind::AccountMissing,
            Self::AuthenticationSucceeded(_) => EventKind::AuthenticationSucceeded,
            Self::AuthenticationFailed(_) => EventKind::AuthenticationFailed,
            Self::PostAuthenticationActionsStarted(_) => EventKind::PostAuthenticationActionsStarted,
            Self::PostAuthenticationActionsSucceeded(_) => EventKind::PostAuthenticationActionsSucceeded,
            Self::PostAuthenticationActionsFailed(_) => EventKind::PostAuthenticationActionsFailed,
            Self::CommandExecuted(_) => EventKind::CommandExecuted,
            Self::ImageRollbackDetected(_) => EventKind::ImageRollbackDetected,
        }
    }
}

impl EventKind {
    /// Every kind, for metrics and documentation.
    pub const ALL: [Self; 12] = [
        Self::PolicyApplied,
        Self::PasswordBackedUp,
        Self::PasswordRotated,
        Self::RotationFailed,
        Self::AccountMissing,
        Self::AuthenticationSucceeded,
        Self::AuthenticationFailed,
        Self::PostAuthenticationActionsStarted,
        Self::PostAuthenticationActionsSucceeded,
        Self::PostAuthenticationActionsFailed,
        Self::CommandExecuted,
        Self::ImageRollbackDetected,
    ];

    /// The kind's name on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyApplied => "policy_applied",
            Self::PasswordBackedUp => "password_backed_up",
            Self::PasswordRotated => "password_rotated",
            Self::RotationFailed => "rotation_failed",
            Self::AccountMissing => "account_missing",
            Self::AuthenticationSucceeded => "authentication_succeeded",
            Self::AuthenticationFailed => "authentication_failed",
            Self::PostAuthenticationActionsStarted => "post_authentication_actions_started",
            Self::PostAuthenticationActionsSucceeded => "post_authentication_actions_succeeded",
            Self::PostAuthenticationActionsFailed => "post_authentication_actions_failed",
            Self::CommandExecuted => "command_executed",
            Self::ImageRollbackDetected => "image_rollback_detected",
        }
    }

    /// The kind named `name` on the wire, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The Windows LAPS event code for this fact, where LAPS has one.
    pub fn code(self) -> Option<u32> {
        match self {
            Self::PolicyApplied => Some(10022),
            Self::PasswordBackedUp => Some(10029),
            Self::PasswordRotated => Some(10020),
            Self::RotationFailed => Some(10005),
            Self::AccountMissing => Some(10013),
            Self::AuthenticationSucceeded => Some(10041),
            Self::AuthenticationFailed | Self::CommandExecuted => None,
            Self::PostAuthenticationActionsStarted => Some(10042),
            Self::PostAuthenticationActionsSucceeded => Some(10044),
            Self::PostAuthenticationActionsFailed => Some(10043),
            Self::ImageRollbackDetected => Some(10015),
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The associated data a password is sealed with: binds the ciphertext to one device and one
/// rotation, so a sealed password replayed under another device or rotation does not open.
pub fn sealing_context(device_id: &DeviceId, rotation_id: &RotationId) -> Vec<u8> {
    format!("fleetlaps password v1\0{device_id}\0{rotation_id}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{EscrowSecretKey, seal};

    #[test]
    fn rotation_reason_names_are_their_serialised_names() {
        for reason in RotationReason::ALL {
            let json = serde_json::to_string(&reason).expect("serialises");
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }

    fn backed_up() -> Envelope {
        let device_id = DeviceId::parse("dev-1").expect("valid");
        let rotation_id = RotationId::new();
        let escrow = EscrowSecretKey::generate();
        let sealed = seal(
            &escrow.public_key(),
            b"secret",
            &sealing_context(&device_id, &rotation_id),
        );
        Envelope::new(
            device_id,
            1,
            Utc::now(),
            Event::PasswordBackedUp(PasswordBackedUp {
                rotation_id,
                device_name: DeviceName::parse("host-1").expect("valid"),
                account_name: AccountName::parse("lapsadmin").expect("valid"),
                account_uid: Some(1001),
                sealed_password: sealed,
                escrow_public_key: Some(escrow.public_key()),
                recovery_sealed_password: None,
                expires_at: Utc::now(),
                reason: RotationReason::Initial,
            }),
        )
    }

    #[test]
    fn envelope_round_trips_with_kind_code_and_schema() {
        let envelope = backed_up();
        let json: serde_json::Value = serde_json::from_slice(&envelope.to_json()).expect("json");
        assert_eq!(json["schema"], 1);
        assert_eq!(json["kind"], "password_backed_up");
        assert_eq!(json["code"], 10029);
        assert_eq!(json["body"]["account_name"], "lapsadmin");
        assert_eq!(Envelope::from_json(&envelope.to_json()).expect("valid"), envelope);
    }

    #[test]
    fn a_wrong_code_or_schema_is_refused() {
        let mut json: serde_json::Value = serde_json::from_slice(&backed_up().to_json()).expect("json");
        json["code"] = 10020.into();
        let err = Envelope::from_json(json.to_string().as_bytes()).expect_err("code mismatch");
        assert!(matches!(err, DecodeError::CodeMismatch { .. }), "{err}");
        json["code"] = 10029.into();
        json["schema"] = 2.into();
        let err = Envelope::from_json(json.to_string().as_bytes()).expect_err("schema");
        assert_eq!(err.to_string(), "unsupported schema version 2, expected 1");
    }

    #[test]
    fn garbage_and_unknown_kinds_are_malformed() {
        assert!(matches!(
            Envelope::from_json(b"not json"),
            Err(DecodeError::Malformed(_))
        ));
        let mut json: serde_json::Value = serde_json::from_slice(&backed_up().to_json()).expect("json");
        json["kind"] = "password_stolen".into();
        assert!(matches!(
            Envelope::from_json(json.to_string().as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn an_authentication_from_before_aggregation_counts_one() {
        let old = r#"{"account_name":"admin","service":"sshd","remote_host":null,"tty":null,"reset_deadline":null}"#;
        let observed: AuthenticationObserved = serde_json::from_str(old).unwrap();
        assert_eq!((observed.count, observed.first_at, observed.last_at), (1, None, None));
        let text = serde_json::to_string(&observed).unwrap();
        assert!(text.contains(r#""count":1"#) && !text.contains("first_at"), "{text}");
    }

    #[test]
    fn a_rotation_names_its_command_only_when_one_caused_it() {
        let before = r#"{"rotation_id":"01a23d42-241a-71ad-a5f1-aa81c489c0c2","account_name":"admin"}"#;
        let rotated: PasswordRotated = serde_json::from_str(before).unwrap();
        assert_eq!(rotated.command_id, None);
        assert_eq!(serde_json::to_string(&rotated).unwrap(), before, "encoded as before");
        let commanded = PasswordRotated {
            command_id: Some(crate::command::CommandId::new()),
            ..rotated
        };
        let text = serde_json::to_string(&commanded).unwrap();
        assert!(text.contains("command_id"), "{text}");
        assert_eq!(serde_json::from_str::<PasswordRotated>(&text).unwrap(), commanded);
    }

    #[test]
    fn kinds_have_unique_names() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn sealing_context_differs_per_device_and_rotation() {
        let rotation_id = RotationId::new();
        let a = sealing_context(&DeviceId::parse("a").expect("valid"), &rotation_id);
        let b = sealing_context(&DeviceId::parse("b").expect("valid"), &rotation_id);
        assert_ne!(a, b);
    }
}
