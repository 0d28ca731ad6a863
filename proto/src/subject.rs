//! NATS subject and stream names, in one place.
//!
//! Device events are published on `laps.events.<device_id>.<kind>`: one subject per device and
//! kind, so that a device's user can be allowed exactly its own subjects and a consumer can
//! filter by device or kind. The device token is a [`DeviceId`], which is always one token.

use crate::event::EventKind;
use crate::ids::DeviceId;

/// The stream that holds the whole history of device events.
pub const EVENTS_STREAM: &str = "LAPS_EVENTS";

/// The device events' subjects in [`EVENTS_STREAM`].
pub const EVENTS_WILDCARD: &str = "laps.events.>";

/// The orchestrator's own events' subjects in [`EVENTS_STREAM`].
pub const AUDIT_WILDCARD: &str = "laps.audit.>";

/// Where SIEMs and scripts send breach signals over NATS, as requests: a [`crate::api::BreachRequest`]
/// with an `Authorization: Bearer <token>` header (a token holding `Breach.Declare`). The
/// orchestrator answers on the request's reply subject with the campaign
/// ([`crate::api::BreachInfo`]) or an [`crate::api::ODataError`]. Not kept on any stream: the
/// `breach_declared` event the orchestrator records is the history.
pub const BREACH_SIGNALS: &str = "laps.breaches.declare";

/// The inbox prefix a breach signal's sender uses for the answer: its NATS user may read only
/// below it, never the orchestrator's `_INBOX` nor a device's `_INBOX_<device id>`.
pub const BREACH_SIGNALS_INBOX_PREFIX: &str = "_SIGNALS_INBOX";

/// The largest message, headers and payload, the events stream stores: JetStream refuses a
/// larger one (`max_msg_size`). The largest real event, a backup sealed to the escrow key and
/// the recovery key, is well under 4 KiB; the bound keeps one device from filling the history
/// with a few huge messages.
pub const MAX_EVENT_BYTES: i32 = 64 * 1024;

/// The subject the orchestrator records one kind of its own events on.
pub fn audit_event(kind: crate::audit::AuditKind) -> String {
    format!("laps.audit.{kind}")
}

/// The kind named by an audit subject, if it is one.
pub fn parse_audit_event(subject: &str) -> Option<crate::audit::AuditKind> {
    subject
        .strip_prefix("laps.audit.")
        .and_then(crate::audit::AuditKind::from_name)
}

/// The stream that keeps the last command for each device.
pub const COMMANDS_STREAM: &str = "LAPS_COMMANDS";

/// Every subject of [`COMMANDS_STREAM`].
pub const COMMANDS_WILDCARD: &str = "laps.commands.>";

/// The subject of one device's commands.
pub fn device_commands(device_id: &DeviceId) -> String {
    format!("laps.commands.{device_id}")
}

/// The stream that keeps, per device, the centre's [`crate::command::CurrentPasswordVersion`]
/// (the last one per subject).
pub const PASSWORD_VERSIONS_STREAM: &str = "LAPS_PASSWORD_VERSIONS";

/// Every subject of [`PASSWORD_VERSIONS_STREAM`].
pub const PASSWORD_VERSIONS_WILDCARD: &str = "laps.password_version.>";

/// The subject of one device's current password version.
pub fn device_password_version(device_id: &DeviceId) -> String {
    format!("laps.password_version.{device_id}")
}

/// The JetStream KV bucket of each device's last heartbeat ([`crate::liveness::Heartbeat`]),
/// key = device id, one value per key (history 1): liveness without growing the history.
pub const LIVENESS_BUCKET: &str = "LAPS_LIVENESS";

/// The stream behind [`LIVENESS_BUCKET`] (JetStream names a bucket's stream `KV_<bucket>`).
pub const LIVENESS_STREAM: &str = "KV_LAPS_LIVENESS";

/// Every key's subject in [`LIVENESS_BUCKET`].
pub const LIVENESS_WILDCARD: &str = "$KV.LAPS_LIVENESS.>";

/// The largest heartbeat value the bucket stores (its `max_value_size`); a heartbeat is under
/// 200 bytes.
pub const MAX_HEARTBEAT_BYTES: i32 = 1024;

/// The subject a device puts its heartbeat on: its key in [`LIVENESS_BUCKET`], published to
/// directly (a JetStream publish), so the device needs no JetStream API permission.
pub fn device_heartbeat(device_id: &DeviceId) -> String {
    format!("$KV.{LIVENESS_BUCKET}.{device_id}")
}

/// The device named by a heartbeat subject (`$KV.LAPS_LIVENESS.<device_id>`), if it is one.
pub fn parse_device_heartbeat(subject: &str) -> Option<DeviceId> {
    let device = subject.strip_prefix("$KV.LAPS_LIVENESS.")?;
    DeviceId::parse(device).ok()
}

/// The subject the orchestrator confirms (or refuses) a device's backups on, live (core NATS, not
/// a stream: a device that misses one finds the newest in its current password version, or
/// re-sends its backup and is confirmed again).
pub fn device_confirmations(device_id: &DeviceId) -> String {
    format!("laps.confirmations.{device_id}")
}

/// Every device's confirmations subject (see [`device_confirmations`]).
pub const CONFIRMATIONS_WILDCARD: &str = "laps.confirmations.*";

/// Every device's commands subject (see [`device_commands`]), one token per device.
pub const DEVICE_COMMANDS_WILDCARD: &str = "laps.commands.*";

/// The device named by a confirmations or commands subject (`laps.confirmations.<device_id>`,
/// `laps.commands.<device_id>`), if it is one.
pub fn parse_device_inbound(subject: &str) -> Option<DeviceId> {
    let device = subject
        .strip_prefix("laps.confirmations.")
        .or_else(|| subject.strip_prefix("laps.commands."))?;
    DeviceId::parse(device).ok()
}

/// The inbox prefix of the fleet simulator's one shared connection (`fleetlaps-agent
/// simulate`), whose NATS user, for test and bench fleets only, may act for every device.
/// Device ids are the orchestrator's UUIDs, so no device's own prefix equals it.
pub const SIMULATOR_INBOX_PREFIX: &str = "_INBOX_fleetlaps-simulator";

/// The inbox prefix a device's client uses for replies (JetStream acks, API answers), instead of
/// the shared `_INBOX`: a device's NATS user may subscribe only below its own prefix, so no device
/// reads another's replies. The orchestrator keeps `_INBOX`, which no device prefix can equal.
pub fn device_inbox_prefix(device_id: &DeviceId) -> String {
    format!("_INBOX_{device_id}")
}

/// The subject a device publishes one kind of event on.
pub fn device_event(device_id: &DeviceId, kind: EventKind) -> String {
    format!("laps.events.{device_id}.{kind}")
}

/// The device token and kind named by a device event subject, if it is one.
pub fn parse_device_event(subject: &str) -> Option<(DeviceId, EventKind)> {
    let mut tokens = subject.split('.');
    let (Some("laps"), Some("events"), Some(device), Some(kind), None) = (
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
    ) else {
        return None;
    };
    Some((DeviceId::parse(device).ok()?, EventKind::from_name(kind)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmation_and_command_subjects_name_their_device() {
        let device_id = DeviceId::parse("dev-1").expect("valid");
        assert_eq!(
            parse_device_inbound(&device_confirmations(&device_id)),
            Some(device_id.clone())
        );
        assert_eq!(parse_device_inbound(&device_commands(&device_id)), Some(device_id));
        for other in [
            "laps.events.dev-1.password_rotated",
            "laps.commands.a.b",
            "laps.confirmations.",
        ] {
            assert_eq!(parse_device_inbound(other), None, "{other}");
        }
    }

    #[test]
    fn heartbeat_subjects_name_their_device() {
        let device_id = DeviceId::parse("dev-1").expect("valid");
        let subject = device_heartbeat(&device_id);
        assert_eq!(subject, "$KV.LAPS_LIVENESS.dev-1");
        assert!(subject.starts_with(LIVENESS_WILDCARD.trim_end_matches('>')));
        assert_eq!(parse_device_heartbeat(&subject), Some(device_id));
        for other in [
            "$KV.LAPS_LIVENESS.a.b",
            "$KV.OTHER.dev-1",
            "laps.events.dev-1.policy_applied",
        ] {
            assert_eq!(parse_device_heartbeat(other), None, "{other}");
        }
    }

    #[test]
    fn device_event_subjects_round_trip() {
        let device_id = DeviceId::parse("dev-1").expect("valid");
        let subject = device_event(&device_id, EventKind::PasswordBackedUp);
        assert_eq!(subject, "laps.events.dev-1.password_backed_up");
        assert_eq!(
            parse_device_event(&subject),
            Some((device_id, EventKind::PasswordBackedUp))
        );
    }

    #[test]
    fn other_subjects_are_not_device_events() {
        for subject in [
            "laps.events.dev-1",
            "laps.events.dev-1.nope",
            "laps.commands.dev-1.rotate",
            "x.events.a.policy_applied",
        ] {
            assert_eq!(parse_device_event(subject), None, "{subject}");
        }
    }
}
