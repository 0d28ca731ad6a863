//! What the orchestrator itself decides, recorded on the same history as the devices' events:
//! a password read by a person, a token created or revoked, a rotation requested, a device
//! enrolled, an escrow key created, a password sealed again to a new escrow key, the
//! orchestrator's own signing key created.
//!
//! Every one is signed by the orchestrator's key (see [`crate::signature`]), over its subject
//! and payload, in the `Fleetlaps-Signature` header, as device events are by their device's key.
//!
//! Each is an [`AuditEnvelope`] on `laps.audit.<kind>` in the events stream, so a replay and an
//! investigation see devices' facts and people's actions in one order.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::breach::{BreachDeclared, BreachDetected, BreachEnded, BreachTargeted, BreachWaveCommanded};
use crate::command::CommandId;
use crate::event::SCHEMA_VERSION;
use crate::ids::{DeviceId, DeviceName, DeviceTag, EventId, IdError, InstanceId, RotationId};
use crate::seal::{EscrowPublicKey, SealedBox};

/// One orchestrator event as it travels on the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEnvelope {
    /// Always [`SCHEMA_VERSION`] when written by this version.
    pub schema: u32,
    /// Unique id, also the `Nats-Msg-Id` header.
    pub id: EventId,
    /// When it happened, in UTC.
    pub time: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// What the orchestrator did or allowed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A principal was given passwords (Entra: "Recover device local administrator password").
    PasswordRead(PasswordRead),
    /// An API token was created.
    TokenCreated(TokenCreated),
    /// An API token was revoked.
    TokenRevoked(TokenRevoked),
    /// A principal asked a device to rotate now.
    RotationRequested(RotationRequested),
    /// An enrollment token was created: devices holding it may enroll.
    EnrollmentTokenCreated(EnrollmentTokenCreated),
    /// An enrollment token was revoked.
    EnrollmentTokenRevoked(EnrollmentTokenRevoked),
    /// A device enrolled with an enrollment token: from here on its signed events count.
    DeviceEnrolled(DeviceEnrolled),
    /// Two running copies of one device were seen (a cloned image): both sources named.
    DeviceCloneDetected(DeviceCloneDetected),
    /// The orchestrator's escrow key was created, rotated or replaced after a recovery: from
    /// here on devices seal to its public key, and an orchestrator must hold it to start.
    EscrowKeyCreated(EscrowKeyCreated),
    /// A backed-up password was sealed again, to the escrow key made by a recovery (it was
    /// opened with the offline recovery key); the credential's sealed box is this one now.
    PasswordResealed(PasswordResealed),
    /// The orchestrator's signing key was created (or replaced): from here on every
    /// orchestrator event must be signed with it. The first one on the stream is trusted as it
    /// is (trust on first use); a later one counts only when signed by the key recorded before.
    OrchestratorKeyCreated(OrchestratorKeyCreated),
    /// An admin set a device's tags.
    DeviceTagsSet(DeviceTagsSet),
    /// A breach was declared: its campaign rotates the devices it names ([`crate::breach`]).
    BreachDeclared(BreachDeclared),
    /// Some of a breach's devices.
    BreachTargeted(BreachTargeted),
    /// Rotate commands a campaign recorded before sending them.
    BreachWaveCommanded(BreachWaveCommanded),
    /// A campaign ended: completed, past its deadline, or cancelled.
    BreachEnded(BreachEnded),
    /// A detector saw what it watches for; the evidence is named ([`crate::breach`]).
    BreachDetected(BreachDetected),
    /// The orchestrator verified the signatures of a run of the history's messages: a replay
    /// may take its word for them rather than check each again.
    SignaturesVerified(SignaturesVerified),
}

/// The kind of an orchestrator event, without its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditKind {
    /// See [`AuditEvent::PasswordRead`].
    PasswordRead,
    /// See [`AuditEvent::TokenCreated`].
    TokenCreated,
    /// See [`AuditEvent::TokenRevoked`].
    TokenRevoked,
    /// See [`AuditEvent::RotationRequested`].
    RotationRequested,
    /// See [`AuditEvent::EnrollmentTokenCreated`].
    EnrollmentTokenCreated,
    /// See [`AuditEvent::EnrollmentTokenRevoked`].
    EnrollmentTokenRevoked,
    /// See [`AuditEvent::DeviceEnrolled`].
    DeviceEnrolled,
    /// See [`AuditEvent::DeviceCloneDetected`].
    DeviceCloneDetected,
    /// See [`AuditEvent::EscrowKeyCreated`].
    EscrowKeyCreated,
    /// See [`AuditEvent::PasswordResealed`].
    PasswordResealed,
    /// See [`AuditEvent::OrchestratorKeyCreated`].
    OrchestratorKeyCreated,
    /// See [`AuditEvent::DeviceTagsSet`].
    DeviceTagsSet,
    /// See [`AuditEvent::BreachDeclared`].
    BreachDeclared,
    /// See [`AuditEvent::BreachTargeted`].
    BreachTargeted,
    /// See [`AuditEvent::BreachWaveCommanded`].
    BreachWaveCommanded,
    /// See [`AuditEvent::BreachEnded`].
    BreachEnded,
    /// See [`AuditEvent::BreachDetected`].
    BreachDetected,
    /// See [`AuditEvent::SignaturesVerified`].
    SignaturesVerified,
}

/// Body of [`AuditEvent::PasswordRead`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordRead {
    /// Who read: the token's name.
    pub principal: String,
    /// The id of the token that read (absent in events recorded before ids were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_token_id: Option<TokenId>,
    /// Whose passwords.
    pub device_id: DeviceId,
    /// Which credential versions were returned, newest first.
    pub rotation_ids: Vec<RotationId>,
    /// Why, when the reader said.
    pub reason: Option<String>,
    /// Graph's `ocp-client-name` header, when sent.
    pub client_name: Option<String>,
    /// Graph's `ocp-client-version` header, when sent.
    pub client_version: Option<String>,
    /// The address the request came from.
    pub source_address: Option<String>,
}

/// The id of an API token (not the token itself).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenId(Uuid);

impl TokenId {
    /// A fresh token id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of a token that is not made through the API (one in the config, the bootstrap
    /// admin's), derived from the first 16 bytes of a digest of its SHA-256: stable across
    /// restarts, so the audit names the same token each time, and revealing nothing of it.
    pub fn derived(digest: [u8; 16]) -> Self {
        Self(uuid::Builder::from_custom_bytes(digest).into_uuid())
    }

    /// Parses a token id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        Uuid::parse_str(value).map(Self).map_err(|_| IdError {
            what: "token id",
            value: value.chars().take(80).collect(),
            allowed: "a UUID",
        })
    }
}

impl Default for TokenId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({})", self.0)
    }
}

/// Body of [`AuditEvent::TokenCreated`]. Holds the token's SHA-256 digest, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token's id.
    pub token_id: TokenId,
    /// Its holder's name: the principal recorded for what it does.
    pub name: String,
    /// Its scopes, by their Graph-style names.
    pub scopes: Vec<String>,
    /// When it stops working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// Who created it.
    pub created_by: String,
    /// The id of the token that created it (absent in events recorded before ids were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by_token_id: Option<TokenId>,
}

/// Body of [`AuditEvent::TokenRevoked`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevoked {
    /// The token revoked.
    pub token_id: TokenId,
    /// Who revoked it.
    pub revoked_by: String,
    /// The id of the token that revoked it (absent in events recorded before ids were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by_token_id: Option<TokenId>,
}

/// Body of [`AuditEvent::RotationRequested`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationRequested {
    /// The command sent to the device.
    pub command_id: CommandId,
    /// The device.
    pub device_id: DeviceId,
    /// Who asked.
    pub principal: String,
    /// The id of the token that asked (absent in events recorded before ids were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_token_id: Option<TokenId>,
    /// Why, when said.
    pub reason: Option<String>,
}

/// Body of [`AuditEvent::EnrollmentTokenCreated`]. Holds the token's SHA-256, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenCreated {
    /// The token's id.
    pub token_id: TokenId,
    /// What it is for (a batch of devices, a site), for people.
    pub name: String,
    /// How many devices may enroll with it.
    pub max_uses: u32,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// Who created it.
    pub created_by: String,
    /// The id of the token that created it (absent in events recorded before ids were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by_token_id: Option<TokenId>,
}

/// Body of [`AuditEvent::EnrollmentTokenRevoked`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenRevoked {
    /// The token revoked.
    pub token_id: TokenId,
    /// Who revoked it.
    pub revoked_by: String,
    /// The id of the token that revoked it (absent in events recorded before ids were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by_token_id: Option<TokenId>,
}

/// Body of [`AuditEvent::DeviceEnrolled`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEnrolled {
    /// The id the orchestrator gave the device.
    pub device_id: DeviceId,
    /// The host name the device gave.
    pub device_name: DeviceName,
    /// The device's Ed25519 public key (standard base64 of its 32 bytes): its events must be
    /// signed with the matching secret key.
    pub public_key: String,
    /// The enrollment token it presented.
    pub enrollment_token_id: TokenId,
    /// The tags it asked for at enrollment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<DeviceTag>,
}

/// Body of [`AuditEvent::DeviceTagsSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTagsSet {
    /// The device.
    pub device_id: DeviceId,
    /// Its tags from now on.
    pub tags: Vec<DeviceTag>,
    /// Who set them (a token's name).
    pub set_by: String,
    /// The id of the token that set them.
    pub set_by_token_id: Option<TokenId>,
}

/// Body of [`AuditEvent::DeviceCloneDetected`]: recorded by the orchestrator when a device
/// event comes from a running copy of the device that another copy had taken over from, which
/// one copy restarted never does. Neither copy's events are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCloneDetected {
    /// The device both copies claim to be.
    pub device_id: DeviceId,
    /// The copy whose event showed the clone: it was heard from again after `other`.
    pub source: CloneSource,
    /// The copy the centre had heard from in between.
    pub other: CloneSource,
    /// The device event that showed it.
    pub evidence_event_id: EventId,
}

/// One running copy of a device, as the centre last heard from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSource {
    /// The copy's instance id, stamped on its events.
    pub instance: InstanceId,
    /// Where its last event stood in the device's order.
    pub position: crate::command::DevicePosition,
    /// When that event happened, by the device's clock.
    pub time: DateTime<Utc>,
}

/// Why an escrow key was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscrowKeyReason {
    /// The orchestrator's first key (or the first record of a key made before keys were
    /// recorded).
    Created,
    /// `fleetlaps-orchestrator escrow rotate`: the previous key is kept to open older backups.
    Rotated,
    /// `fleetlaps-orchestrator recover`: the previous key was lost; the passwords were opened
    /// with the recovery key and sealed again to this one.
    Recovered,
}

/// Body of [`AuditEvent::EscrowKeyCreated`]. Holds the public key only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowKeyCreated {
    /// The new escrow public key: devices seal to it from now on.
    pub public_key: EscrowPublicKey,
    /// The key it replaces, if any.
    pub previous_public_key: Option<EscrowPublicKey>,
    /// Why it was made.
    pub reason: EscrowKeyReason,
}

/// Body of [`AuditEvent::PasswordResealed`]. Holds ciphertext only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordResealed {
    /// The device whose credential it is.
    pub device_id: DeviceId,
    /// The stream sequence of the credential's `password_backed_up` event.
    pub backup_stream_sequence: u64,
    /// The same password, sealed to the current escrow key with the backup's sealing context.
    pub sealed_password: SealedBox,
}

/// Body of [`AuditEvent::OrchestratorKeyCreated`]. Holds the public key only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrchestratorKeyCreated {
    /// The orchestrator's Ed25519 public key (standard base64 of its 32 bytes): every later
    /// orchestrator event must be signed with the matching secret key.
    pub public_key: String,
}

/// Body of [`AuditEvent::SignaturesVerified`]: the orchestrator's word that every message of
/// the events stream from `from_sequence` through `through_sequence` whose digest is
/// `messages_sha256` was signed by its signer's key as the fold found it, except those in
/// `not_verified` (refused, for one reason or another). A replay of the same messages takes
/// that word, once it has found this event signed by the orchestrator key and the digest
/// equal, instead of checking each signature again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignaturesVerified {
    /// The first stream sequence it covers.
    pub from_sequence: u64,
    /// The last stream sequence it covers; always before this event's own.
    pub through_sequence: u64,
    /// SHA-256 (lowercase hex) of the covered messages, each as its sequence, subject,
    /// signature header and payload (`fleetlaps_orchestrator::attestation::MessagesDigest`).
    pub messages_sha256: String,
    /// The covered messages whose signature is not vouched for (they were refused), ascending:
    /// at most [`SignaturesVerified::MAX_NOT_VERIFIED`].
    pub not_verified: Vec<u64>,
}

impl SignaturesVerified {
    /// The most messages one attestation leaves out: past it, a run is attested early.
    pub const MAX_NOT_VERIFIED: usize = 1_000;
}

/// Why bytes are not a valid orchestrator event.
#[derive(Debug, thiserror::Error)]
pub enum AuditDecodeError {
    /// Not JSON, or not of the envelope's shape.
    #[error("malformed audit envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Written by a schema this version does not read.
    #[error("unsupported schema version {found}, expected {SCHEMA_VERSION}")]
    UnsupportedSchema {
        /// The version in the envelope.
        found: u32,
    },
}

impl AuditEnvelope {
    /// Wraps an event with a fresh id.
    pub fn new(time: DateTime<Utc>, event: AuditEvent) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            id: EventId::new(),
            time,
            event,
        }
    }

    /// The envelope as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an audit envelope always serialises: it has only string keys")
    }

    /// Parses and checks an envelope.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AuditDecodeError> {
        let envelope: Self = serde_json::from_slice(bytes)?;
        if envelope.schema != SCHEMA_VERSION {
            return Err(AuditDecodeError::UnsupportedSchema { found: envelope.schema });
        }
        Ok(envelope)
    }
}

impl AuditEvent {
    /// The kind of this event.
    pub fn kind(&self) -> AuditKind {
        match self {
            Self::PasswordRead(_) => AuditKind::PasswordRead,
            Self::TokenCreated(_) => AuditKind::TokenCreated,
            Self::TokenRevoked(_) => AuditKind::TokenRevoked,
            Self::RotationRequested(_) => AuditKind::RotationRequested,
            Self::EnrollmentTokenCreated(_) => AuditKind::EnrollmentTokenCreated,
            Self::EnrollmentTokenRevoked(_) => AuditKind::EnrollmentTokenRevoked,
            Self::DeviceEnrolled(_) => AuditKind::DeviceEnrolled,
            Self::DeviceCloneDetected(_) => AuditKind::DeviceCloneDetected,
            Self::EscrowKeyCreated(_) => AuditKind::EscrowKeyCreated,
            Self::PasswordResealed(_) => AuditKind::PasswordResealed,
            Self::OrchestratorKeyCreated(_) => AuditKind::OrchestratorKeyCreated,
            Self::DeviceTagsSet(_) => AuditKind::DeviceTagsSet,
            Self::BreachDeclared(_) => AuditKind::BreachDeclared,
            Self::BreachTargeted(_) => AuditKind::BreachTargeted,
            Self::BreachWaveCommanded(_) => AuditKind::BreachWaveCommanded,
            Self::BreachEnded(_) => AuditKind::BreachEnded,
            Self::BreachDetected(_) => AuditKind::BreachDetected,
            Self::SignaturesVerified(_) => AuditKind::SignaturesVerified,
        }
    }
}

impl AuditKind {
    /// Every kind.
    pub const ALL: [Self; 18] = [
        Self::PasswordRead,
        Self::TokenCreated,
        Self::TokenRevoked,
        Self::RotationRequested,
        Self::EnrollmentTokenCreated,
        Self::EnrollmentTokenRevoked,
        Self::DeviceEnrolled,
        Self::DeviceCloneDetected,
        Self::EscrowKeyCreated,
        Self::PasswordResealed,
        Self::OrchestratorKeyCreated,
        Self::DeviceTagsSet,
        Self::BreachDeclared,
        Self::BreachTargeted,
        Self::BreachWaveCommanded,
        Self::BreachEnded,
        Self::BreachDetected,
        Self::SignaturesVerified,
    ];

    /// The kind's name on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PasswordRead => "password_read",
            Self::TokenCreated => "token_created",
            Self::TokenRevoked => "token_revoked",
            Self::RotationRequested => "rotation_requested",
            Self::EnrollmentTokenCreated => "enrollment_token_created",
            Self::EnrollmentTokenRevoked => "enrollment_token_revoked",
            Self::DeviceEnrolled => "device_enrolled",
            Self::DeviceCloneDetected => "device_clone_detected",
            Self::EscrowKeyCreated => "escrow_key_created",
            Self::PasswordResealed => "password_resealed",
            Self::OrchestratorKeyCreated => "orchestrator_key_created",
            Self::DeviceTagsSet => "device_tags_set",
            Self::BreachDeclared => "breach_declared",
            Self::BreachTargeted => "breach_targeted",
            Self::BreachWaveCommanded => "breach_wave_commanded",
            Self::BreachEnded => "breach_ended",
            Self::BreachDetected => "breach_detected",
            Self::SignaturesVerified => "signatures_verified",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_envelopes_round_trip_with_kind_and_schema() {
        let envelope = AuditEnvelope::new(
            Utc::now(),
            AuditEvent::TokenRevoked(TokenRevoked {
                token_id: TokenId::new(),
                revoked_by: "admin".to_owned(),
                revoked_by_token_id: Some(TokenId::new()),
            }),
        );
        let json: serde_json::Value = serde_json::from_slice(&envelope.to_json()).expect("json");
        assert_eq!(json["kind"], "token_revoked");
        assert_eq!(json["schema"], 1);
        assert_eq!(AuditEnvelope::from_json(&envelope.to_json()).expect("valid"), envelope);
        for kind in AuditKind::ALL {
            assert_eq!(AuditKind::from_name(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn an_event_recorded_before_token_ids_reads_as_having_none() {
        let old = br#"{"schema":1,"id":"0190a5c4-7d1e-7c3a-9f00-000000000001","time":"2026-01-01T00:00:00Z","kind":"password_read","body":{"principal":"helpdesk","device_id":"dev-1","rotation_ids":[],"reason":null,"client_name":null,"client_version":null,"source_address":null}}"#;
        let envelope = AuditEnvelope::from_json(old).expect("an old event still reads");
        let AuditEvent::PasswordRead(read) = envelope.event else {
            panic!("a password read");
        };
        assert_eq!((read.principal.as_str(), read.principal_token_id), ("helpdesk", None));
    }

    #[test]
    fn a_derived_token_id_is_stable_and_differs_by_digest() {
        assert_eq!(TokenId::derived([7; 16]), TokenId::derived([7; 16]));
        assert_ne!(TokenId::derived([7; 16]), TokenId::derived([8; 16]));
    }
}
