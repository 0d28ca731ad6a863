//! Every key of the projections' sled tree, built in one place.
//!
//! One tree holds every projection under a key prefix, so that applying a message is one atomic
//! batch. Each record kind has a builder here and, where it is scanned, a prefix; nothing else
//! spells a key. Numbers in keys are zero-padded decimal, so keys sort like the numbers and stay
//! readable; ids are their text forms, none of which holds a `/`.
//!
//! | key | holds |
//! |---|---|
//! | `m/last_sequence` | the stream sequence of the last message applied (or refused) |
//! | `m/layout` | the layout version of these keys ([`super::store`] rebuilds another) |
//! | `m/quarantine_len` | how many quarantine records are kept |
//! | `d/<device>` | a `DeviceRecord` |
//! | `n/<name>/<device>` | a device's name, in lower case (empty value): the index `$filter=deviceName eq` reads |
//! | `c/<device>/<sequence>` | a `CredentialRecord`, by the stream sequence of its backup |
//! | `r/<device>/<rotation>` | the `c/` key of a rotation's credential |
//! | `e/<event id>` | an applied event id (an orchestrator event, or a device event that is not a [`is_report`] report), for idempotence |
//! | `rm/<device>/<instance>` | the highest (generation, sequence) of the reports applied from that running copy of the device (each start of an agent is one; `-` for events naming none): a report at or below it is a copy already applied |
//! | `rx/<device>/<sequence>` | a report on the device's subject the fold did not apply (a copy, or refused, empty value): what the timeline leaves out |
//! | `q/<sequence>` | a `QuarantineRecord` |
//! | `qd/<reason>` | how many quarantine records of a reason were dropped to keep the bound |
//! | `a/<sequence>` | an orchestrator event (`AuditEnvelope`): the audit history |
//! | `pr/<principal, hex>/<sequence>` | a password read by the principal: when (milliseconds since the epoch, 8 bytes big-endian), then the device id; what a `readBy` breach scope reads |
//! | `ad/<device>/<sequence>` | an orchestrator event about the device (empty value): its timeline's index into `a/` |
//! | `t/<token id>` | a `TokenRecord` (API or enrollment token) |
//! | `h/<token sha256>` | the id of the token with that digest |
//! | `k/<device>` | an `EnrolledKeyRecord`, the key the device's events must be signed with |
//! | `w/<device>` | when a rotation of the device was last requested (the rotate throttle) |
//! | `rc/<device>` | a clone detected and not yet reported on the history |
//! | `x/<escrow public key>` | an `EscrowKeyRecord`, a key the history recorded |
//! | `o/key` | the `OrchestratorKeyRecord`, the key orchestrator events must be signed with |
//! | `b/<breach>` | a `CampaignRecord`, one breach's campaign |
//! | `bt/<breach>/<device>` | a `CampaignTarget`, one device of a campaign |
//! | `bd/<device>/<breach>` | the campaigns a device is targeted by (empty value), for its rotations |

use fleetlaps_proto::audit::TokenId;
use fleetlaps_proto::breach::BreachId;
use fleetlaps_proto::event::EventKind;
use fleetlaps_proto::ids::{DeviceId, DeviceName, EventId, InstanceId, RotationId};
use fleetlaps_proto::seal::EscrowPublicKey;

use super::quarantine::QuarantineReason;

/// `m/last_sequence`.
pub(super) const LAST_SEQUENCE: &[u8] = b"m/last_sequence";
/// `m/layout`.
pub(super) const LAYOUT: &[u8] = b"m/layout";
/// `m/quarantine_len`.
pub(super) const QUARANTINE_LEN: &[u8] = b"m/quarantine_len";
/// `o/key`.
pub(super) const ORCHESTRATOR_KEY: &[u8] = b"o/key";

/// Every device record.
pub(super) const DEVICES: &[u8] = b"d/";
/// Every quarantine record, oldest first.
pub(super) const QUARANTINE: &[u8] = b"q/";
/// Every orchestrator event, oldest first.
pub(super) const AUDIT: &[u8] = b"a/";
/// Every token record, oldest first (ids are time-ordered).
pub(super) const TOKENS: &[u8] = b"t/";
/// Every recorded escrow key.
pub(super) const ESCROW_KEYS: &[u8] = b"x/";
/// Every clone waiting to be reported.
pub(super) const CLONE_REPORTS: &[u8] = b"rc/";

/// Every campaign, oldest first (breach ids are time-ordered).
pub(super) const CAMPAIGNS: &[u8] = b"b/";

/// `b/<breach>`.
pub(super) fn campaign(breach_id: &BreachId) -> Vec<u8> {
    format!("b/{breach_id}").into_bytes()
}

/// `bt/<breach>/<device>`.
pub(super) fn campaign_target(breach_id: &BreachId, device_id: &DeviceId) -> Vec<u8> {
    format!("bt/{breach_id}/{device_id}").into_bytes()
}

/// `bt/<breach>/`: every device of a campaign, by id.
pub(super) fn campaign_targets(breach_id: &BreachId) -> Vec<u8> {
    format!("bt/{breach_id}/").into_bytes()
}

/// `bd/<device>/<breach>`.
pub(super) fn device_campaign(device_id: &DeviceId, breach_id: &BreachId) -> Vec<u8> {
    format!("bd/{device_id}/{breach_id}").into_bytes()
}

/// `bd/<device>/`: every campaign targeting the device.
pub(super) fn device_campaigns(device_id: &DeviceId) -> Vec<u8> {
    format!("bd/{device_id}/").into_bytes()
}

/// The breach a `bd/<device>/<breach>` key names.
pub(super) fn device_campaign_breach(key: &[u8]) -> Option<BreachId> {
    let text = std::str::from_utf8(key).ok()?;
    BreachId::parse(text.rsplit('/').next()?).ok()
}

/// `d/<device>`.
pub(super) fn device(device_id: &DeviceId) -> Vec<u8> {
    joined(&[b"d/", device_id.as_str().as_bytes()])
}

/// `parts` one after the other: the keys the fold builds for every event, without `format!`.
fn joined(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

/// `n/<name, lower case>/<device>`: the device name index's entry.
pub(super) fn device_name(device_name: &DeviceName, device_id: &DeviceId) -> Vec<u8> {
    format!("n/{}/{device_id}", device_name.as_str().to_ascii_lowercase()).into_bytes()
}

/// `n/<name, lower case>/`: every device of that name, in any case.
pub(super) fn devices_named(device_name: &DeviceName) -> Vec<u8> {
    format!("n/{}/", device_name.as_str().to_ascii_lowercase()).into_bytes()
}

/// The device a `n/<name>/<device>` key names.
pub(super) fn named_device(key: &[u8]) -> Option<DeviceId> {
    let text = std::str::from_utf8(key).ok()?;
    DeviceId::parse(text.rsplit('/').next()?).ok()
}

/// `pr/<principal, hex>/<sequence>`: a password read by `principal` (hex, so any name is one key
/// segment).
pub(super) fn principal_read(principal: &str, sequence: u64) -> Vec<u8> {
    let mut key = principal_reads(principal);
    key.extend_from_slice(format!("{sequence:020}").as_bytes());
    key
}

/// `pr/<principal, hex>/`: every password read by `principal`, oldest first.
pub(super) fn principal_reads(principal: &str) -> Vec<u8> {
    let hex: String = principal.bytes().map(|byte| format!("{byte:02x}")).collect();
    format!("pr/{hex}/").into_bytes()
}

/// `c/<device>/<sequence>`.
pub(super) fn credential(device_id: &DeviceId, sequence: u64) -> Vec<u8> {
    format!("c/{device_id}/{sequence:020}").into_bytes()
}

/// `c/<device>/`: every credential of the device, oldest first.
pub(super) fn credentials_of(device_id: &DeviceId) -> Vec<u8> {
    format!("c/{device_id}/").into_bytes()
}

/// `r/<device>/<rotation>`.
pub(super) fn rotation(device_id: &DeviceId, rotation_id: &RotationId) -> Vec<u8> {
    format!("r/{device_id}/{rotation_id}").into_bytes()
}

/// `e/<event id>`, the id's bytes.
pub(super) fn event(event_id: &EventId) -> Vec<u8> {
    let mut key = b"e/".to_vec();
    key.extend_from_slice(event_id.as_bytes());
    key
}

/// Whether a device event of this kind is a report: one that changes no credential (what an
/// authentication, a policy, a failed rotation, a missing account, post-authentication actions
/// were). A device emits its reports from its outbox in the order of its own sequence, one at a
/// time, and never sends one again once JetStream acknowledged it, so a copy of a report is one
/// at or below the highest (generation, sequence) applied from the same running copy. Reports
/// keep that mark (`rm/`) rather than their ids (`e/`): the projections grow with devices, not
/// with every login. Backups, rotations, commands executed and image rollbacks keep their ids (a
/// backup is sent again after later events when its confirmation does not come).
pub fn is_report(kind: EventKind) -> bool {
    match kind {
        EventKind::PolicyApplied
        | EventKind::RotationFailed
        | EventKind::AccountMissing
        | EventKind::AuthenticationSucceeded
        | EventKind::AuthenticationFailed
        | EventKind::PostAuthenticationActionsStarted
        | EventKind::PostAuthenticationActionsSucceeded
        | EventKind::PostAuthenticationActionsFailed => true,
        EventKind::PasswordBackedUp
        | EventKind::PasswordRotated
        | EventKind::CommandExecuted
        | EventKind::ImageRollbackDetected => false,
    }
}

/// `rm/<device>/<instance>` (`-` for no instance).
pub(super) fn report_mark(device_id: &DeviceId, instance: Option<&InstanceId>) -> Vec<u8> {
    let mut buffer = [0; 36];
    let instance = instance.map_or("-", |instance| instance.encode(&mut buffer));
    joined(&[b"rm/", device_id.as_str().as_bytes(), b"/", instance.as_bytes()])
}

/// A report mark's value: its generation, then its sequence, each a big-endian `u64`, so the
/// bytes compare as the pair does.
pub(super) fn report_mark_value(generation: u64, sequence: u64) -> [u8; 16] {
    let mut value = [0; 16];
    value[..8].copy_from_slice(&generation.to_be_bytes());
    value[8..].copy_from_slice(&sequence.to_be_bytes());
    value
}

/// `rx/<device>/<sequence>`.
pub(super) fn report_passed_over(device_id: &DeviceId, sequence: u64) -> Vec<u8> {
    format!("rx/{device_id}/{sequence:020}").into_bytes()
}

/// `q/<sequence>`.
pub(super) fn quarantine(sequence: u64) -> Vec<u8> {
    format!("q/{sequence:020}").into_bytes()
}

/// `qd/<reason>`.
pub(super) fn quarantine_dropped(reason: QuarantineReason) -> Vec<u8> {
    format!("qd/{reason}").into_bytes()
}

/// `a/<sequence>`.
pub(super) fn audit(sequence: u64) -> Vec<u8> {
    format!("a/{sequence:020}").into_bytes()
}

/// The stream sequence an `a/` key names.
pub(super) fn audit_sequence(key: &[u8]) -> Option<u64> {
    std::str::from_utf8(key.strip_prefix(AUDIT)?).ok()?.parse().ok()
}

/// `ad/<device>/<sequence>`.
pub(super) fn device_audit(device_id: &DeviceId, sequence: u64) -> Vec<u8> {
    format!("ad/{device_id}/{sequence:020}").into_bytes()
}

/// `ad/<device>/`: every orchestrator event about the device, oldest first.
pub(super) fn device_audits(device_id: &DeviceId) -> Vec<u8> {
    format!("ad/{device_id}/").into_bytes()
}

/// The stream sequence an `ad/<device>/<sequence>` key names.
pub(super) fn device_audit_sequence(key: &[u8]) -> Option<u64> {
    std::str::from_utf8(key).ok()?.rsplit('/').next()?.parse().ok()
}

/// `t/<token id>`.
pub(super) fn token(token_id: &TokenId) -> Vec<u8> {
    format!("t/{token_id}").into_bytes()
}

/// `h/<token sha256>`.
pub(super) fn token_digest(token_sha256: &str) -> Vec<u8> {
    format!("h/{token_sha256}").into_bytes()
}

/// `k/<device>`.
pub(super) fn enrolled_key(device_id: &DeviceId) -> Vec<u8> {
    joined(&[b"k/", device_id.as_str().as_bytes()])
}

/// `w/<device>`.
pub(super) fn rotation_request(device_id: &DeviceId) -> Vec<u8> {
    format!("w/{device_id}").into_bytes()
}

/// `rc/<device>`.
pub(super) fn clone_report(device_id: &DeviceId) -> Vec<u8> {
    format!("rc/{device_id}").into_bytes()
}

/// `x/<escrow public key>`; its text form is unpadded base64url, without a `/`.
pub(super) fn escrow_key(public_key: &EscrowPublicKey) -> Vec<u8> {
    format!("x/{public_key}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_sort_as_numbers_and_audit_keys_read_back() {
        assert!(quarantine(9) < quarantine(10));
        assert!(
            credential(&DeviceId::parse("dev-1").unwrap(), 99) < credential(&DeviceId::parse("dev-1").unwrap(), 100)
        );
        assert_eq!(audit_sequence(&audit(12_345)), Some(12_345));
        assert_eq!(audit_sequence(b"q/00000000000000000001"), None);
        let device_id = DeviceId::parse("dev-1").unwrap();
        assert!(device_audit(&device_id, 9) < device_audit(&device_id, 10));
        assert!(device_audit(&device_id, 9).starts_with(&device_audits(&device_id)));
        assert_eq!(device_audit_sequence(&device_audit(&device_id, 12_345)), Some(12_345));
        // The audit history's prefix does not take in the index.
        assert!(!device_audit(&device_id, 1).starts_with(AUDIT));
        assert!(
            credential(&DeviceId::parse("dev-1").unwrap(), 1)
                .starts_with(&credentials_of(&DeviceId::parse("dev-1").unwrap()))
        );
    }

    #[test]
    fn the_keys_built_for_every_event_are_the_layouts_text() {
        let device_id = DeviceId::parse("dev-1").unwrap();
        let instance = InstanceId::new();
        assert_eq!(device(&device_id), b"d/dev-1");
        assert_eq!(enrolled_key(&device_id), b"k/dev-1");
        assert_eq!(
            report_mark(&device_id, Some(&instance)),
            format!("rm/dev-1/{instance}").into_bytes()
        );
        assert_eq!(report_mark(&device_id, None), b"rm/dev-1/-");
    }

    #[test]
    fn each_record_kind_has_its_own_prefix() {
        let device_id = DeviceId::parse("dev-1").unwrap();
        let keys = [
            device(&device_id),
            credential(&device_id, 1),
            rotation(&device_id, &RotationId::new()),
            quarantine(1),
            audit(1),
            device_audit(&device_id, 1),
            token(&TokenId::new()),
            token_digest(&"ab".repeat(32)),
            enrolled_key(&device_id),
            rotation_request(&device_id),
            clone_report(&device_id),
            campaign(&BreachId::new()),
            campaign_target(&BreachId::new(), &device_id),
            device_campaign(&device_id, &BreachId::new()),
        ];
        let prefixes: Vec<&[u8]> = keys
            .iter()
            .map(|key| &key[..key.iter().position(|byte| *byte == b'/').unwrap() + 1])
            .collect();
        let mut unique = prefixes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), prefixes.len(), "{prefixes:?}");
    }
}
