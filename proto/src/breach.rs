//! Breaches and the campaigns that answer them: a breach signal names which devices' passwords
//! an attacker may know; the orchestrator then rotates each of them once, in waves, and counts a
//! device done when it confirms a rotation dated after the declaration.
//!
//! A campaign is an event-sourced aggregate on the history: [`BreachDeclared`] (what, why, until
//! when, how many devices), [`BreachTargeted`] (the devices, in chunks), [`BreachWaveCommanded`]
//! (rotate commands sent, in chunks), and one [`BreachEnded`] (completed, past its deadline with
//! the stragglers named, or cancelled). Every body stays well under the stream's message bound:
//! device lists are cut into chunks of at most [`DEVICES_PER_EVENT`].
//!
//! The orchestrator's detectors raise signals themselves: each detection is a [`BreachDetected`]
//! with its evidence, and in `campaign` mode also a breach whose source is
//! [`BreachSource::Detector`].

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::audit::TokenId;
use crate::command::CommandId;
use crate::ids::{DeviceId, EventId, IdError};

/// The most device ids one breach event lists: about 25 KiB of JSON, well under the stream's
/// 64 KiB message bound.
pub const DEVICES_PER_EVENT: usize = 500;

/// The id of a breach, and of the campaign that answers it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BreachId(Uuid);

impl BreachId {
    /// A fresh, time-ordered breach id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a breach id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        Uuid::parse_str(value).map(Self).map_err(|_| IdError {
            what: "breach id",
            value: value.chars().take(80).collect(),
            allowed: "a UUID",
        })
    }
}

impl Default for BreachId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BreachId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for BreachId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BreachId({})", self.0)
    }
}

/// Which devices a breach exposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum BreachScope {
    /// Every enrolled device.
    All,
    /// These devices.
    Devices {
        /// Their ids.
        device_ids: Vec<DeviceId>,
    },
    /// The devices with any of these tags.
    Tags {
        /// The tags.
        tags: Vec<crate::ids::DeviceTag>,
    },
    /// The devices whose password this principal read since this time.
    ReadBy {
        /// The principal (a token's name) as the audit records it.
        principal: String,
        /// From when.
        since: DateTime<Utc>,
    },
    /// The devices where the managed account authenticated since this time.
    AuthenticatedSince {
        /// From when.
        since: DateTime<Utc>,
    },
}

impl BreachScope {
    /// How the scope reads in lists.
    pub fn describe(&self) -> String {
        match self {
            Self::All => "the whole fleet".to_owned(),
            Self::Devices { device_ids } => format!("{} listed device(s)", device_ids.len()),
            Self::Tags { tags } => format!(
                "devices tagged {}",
                tags.iter()
                    .map(crate::ids::DeviceTag::as_str)
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
            Self::ReadBy { principal, since } => format!("devices whose password {principal} read since {since}"),
            Self::AuthenticatedSince { since } => format!("devices authenticated on since {since}"),
        }
    }
}

/// Where a breach signal came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreachSource {
    /// `POST /v1.0/fleetlaps/breaches` or `lapsctl breach declare`.
    Api,
    /// A signal on the NATS subject `laps.breaches.declare` (a SIEM, a script).
    Nats,
    /// One of the orchestrator's detectors, for the detection it names.
    Detector {
        /// Which detector.
        detector: Detector,
        /// The detection that started it ([`BreachDetected::detection_id`]).
        detection_id: DetectionId,
    },
}

/// The most evidence event ids one [`BreachDetected`] lists: about 8 KiB of JSON, so with
/// [`DEVICES_PER_EVENT`] devices it stays under half the stream's message bound.
pub const EVIDENCE_PER_EVENT: usize = 200;

/// One of the orchestrator's detectors: what it watches for in what the fleet reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// The managed account authenticating on many distinct devices within a short window (a
    /// shared credential moving laterally).
    LateralMovement,
    /// Many failed authentications on one device within a short window.
    RepeatedFailures,
    /// A password read by a principal, then authentications on many devices soon after.
    ReadThenSpread,
}

impl Detector {
    /// Every detector.
    pub const ALL: [Self; 3] = [Self::LateralMovement, Self::RepeatedFailures, Self::ReadThenSpread];

    /// The detector's name on the wire, in the config and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LateralMovement => "lateral_movement",
            Self::RepeatedFailures => "repeated_failures",
            Self::ReadThenSpread => "read_then_spread",
        }
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The id of a detection, derived from its detector and its evidence, so the same evidence always
/// gives the same id (the `Nats-Msg-Id` of its record, which JetStream de-duplicates).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DetectionId(Uuid);

impl DetectionId {
    /// The id whose bytes are these (the first 16 bytes of a digest of the evidence).
    pub fn derived(digest: [u8; 16]) -> Self {
        Self(uuid::Builder::from_custom_bytes(digest).into_uuid())
    }

    /// Parses a detection id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        Uuid::parse_str(value).map(Self).map_err(|_| IdError {
            what: "detection id",
            value: value.chars().take(80).collect(),
            allowed: "a UUID",
        })
    }
}

impl fmt::Display for DetectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for DetectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DetectionId({})", self.0)
    }
}

/// Body of `breach_detected`: a detector saw what it watches for, with the evidence. It changes
/// nothing but the audit history; in `campaign` mode the breach it declared is named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachDetected {
    /// Derived from the detector, its subject and the evidence.
    pub detection_id: DetectionId,
    /// Which detector.
    pub detector: Detector,
    /// The devices involved (at most [`DEVICES_PER_EVENT`] of `device_count`).
    pub device_ids: Vec<DeviceId>,
    /// How many devices were involved.
    pub device_count: u32,
    /// The stream time of the first evidence event.
    pub window_start: DateTime<Utc>,
    /// The stream time of the last evidence event.
    pub window_end: DateTime<Utc>,
    /// The evidence: device events and orchestrator events, by id (the last
    /// [`EVIDENCE_PER_EVENT`] of them).
    pub evidence_event_ids: Vec<EventId>,
    /// How many authentications the evidence counts (an aggregated failure report counts its
    /// `count`).
    pub authentication_count: u64,
    /// For `read_then_spread`: the principal whose read began it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The breach declared for it, in `campaign` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breach_id: Option<BreachId>,
}

/// Body of `breach_declared`: a breach and its campaign begin. Its devices follow in
/// [`BreachTargeted`] events; the campaign commands nothing until all `target_count` are there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachDeclared {
    /// The breach.
    pub breach_id: BreachId,
    /// Why, for people.
    pub reason: String,
    /// When every device should have rotated; past it, the campaign ends naming the stragglers.
    pub deadline: DateTime<Utc>,
    /// Which devices, as asked.
    pub scope: BreachScope,
    /// How many devices the scope matched at the declaration.
    pub target_count: u32,
    /// Who declared it (a token's name).
    pub declared_by: String,
    /// The id of the token that declared it.
    pub declared_by_token_id: Option<TokenId>,
    /// Where the signal came from.
    pub source: BreachSource,
}

/// Body of `breach_targeted`: some of a breach's devices (at most [`DEVICES_PER_EVENT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachTargeted {
    /// The breach.
    pub breach_id: BreachId,
    /// Its devices, in this chunk.
    pub device_ids: Vec<DeviceId>,
}

/// One rotate command a campaign sent, or counted on: `covered_by` names another campaign
/// whose command, sent after this breach was declared, already asks the device to rotate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachCommand {
    /// The device.
    pub device_id: DeviceId,
    /// The command it executes (at most once).
    pub command_id: CommandId,
    /// The campaign that sent it, when another one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covered_by: Option<BreachId>,
}

/// Body of `breach_wave_commanded`: rotate commands recorded before they are sent (at most
/// [`DEVICES_PER_EVENT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachWaveCommanded {
    /// The breach.
    pub breach_id: BreachId,
    /// The commands.
    pub commands: Vec<BreachCommand>,
}

/// How a campaign ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum BreachOutcome {
    /// Every device confirmed a rotation dated after the declaration.
    Completed,
    /// The deadline passed first; these devices had not rotated (the first
    /// [`DEVICES_PER_EVENT`] of them, of `straggler_count`).
    DeadlinePassed {
        /// How many had not rotated.
        straggler_count: u32,
        /// Which, at most [`DEVICES_PER_EVENT`].
        stragglers: Vec<DeviceId>,
    },
    /// Someone stopped it; commands already sent stay with their devices.
    Cancelled {
        /// Who (a token's name).
        by: String,
        /// The id of the token.
        by_token_id: Option<TokenId>,
    },
}

/// Body of `breach_ended`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreachEnded {
    /// The breach.
    pub breach_id: BreachId,
    /// How.
    #[serde(flatten)]
    pub outcome: BreachOutcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_chunk_of_targets_fits_well_under_the_stream_bound() {
        let body = BreachTargeted {
            breach_id: BreachId::new(),
            device_ids: (0..DEVICES_PER_EVENT).map(|_| DeviceId::new_random()).collect(),
        };
        let bytes = serde_json::to_vec(&body).expect("serialises").len();
        assert!(bytes * 2 < crate::subject::MAX_EVENT_BYTES as usize, "{bytes} bytes");
    }

    #[test]
    fn a_full_detection_fits_well_under_the_stream_bound() {
        let body = BreachDetected {
            detection_id: DetectionId::derived([1; 16]),
            detector: Detector::LateralMovement,
            device_ids: (0..DEVICES_PER_EVENT).map(|_| DeviceId::new_random()).collect(),
            device_count: 10_000,
            window_start: Utc::now(),
            window_end: Utc::now(),
            evidence_event_ids: (0..EVIDENCE_PER_EVENT).map(|_| EventId::new()).collect(),
            authentication_count: 10_000,
            principal: Some("p".repeat(200)),
            breach_id: Some(BreachId::new()),
        };
        let bytes = serde_json::to_vec(&body).expect("serialises").len();
        assert!(bytes * 2 < crate::subject::MAX_EVENT_BYTES as usize, "{bytes} bytes");
        let source = serde_json::to_value(BreachSource::Detector {
            detector: Detector::ReadThenSpread,
            detection_id: body.detection_id,
        })
        .expect("serialises");
        assert_eq!(source["detector"]["detector"], "read_then_spread");
    }

    #[test]
    fn scopes_read_as_tagged_json() {
        let scope: BreachScope =
            serde_json::from_str(r#"{"kind":"readBy","principal":"helpdesk","since":"2026-01-01T00:00:00Z"}"#)
                .expect("a read-by scope");
        assert!(matches!(scope, BreachScope::ReadBy { ref principal, .. } if principal == "helpdesk"));
        let all: BreachScope = serde_json::from_str(r#"{"kind":"all"}"#).expect("all");
        assert_eq!(all, BreachScope::All);
        assert!(serde_json::from_str::<BreachScope>(r#"{"kind":"everyone"}"#).is_err());
    }
}
