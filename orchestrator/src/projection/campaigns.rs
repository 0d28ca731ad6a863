//! The campaigns projection: one [`CampaignRecord`] per breach, with its counters, and one
//! [`CampaignTarget`] per device it targets, folded from the `breach_*` orchestrator events and
//! from the devices' `password_rotated` events.
//!
//! A device counts as rotated for a campaign when it confirms (`password_rotated`) a rotation
//! dated at or after the declaration; one it had already confirmed then counts at once when it is
//! targeted. Each apply here is a pure function of the record and the event.

use chrono::{DateTime, Utc};
use fleetlaps_proto::breach::{BreachDeclared, BreachId, BreachOutcome};
use fleetlaps_proto::command::CommandId;
use fleetlaps_proto::ids::DeviceId;
use serde::{Deserialize, Serialize};

/// Where a campaign stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Its devices are being recorded; nothing is commanded yet.
    Declared,
    /// Commanding and counting.
    Running,
    /// Every device rotated.
    Completed,
    /// The deadline passed first.
    DeadlinePassed,
    /// Someone stopped it.
    Cancelled,
}

impl CampaignState {
    /// Every state, for metrics.
    pub const ALL: [Self; 5] = [
        Self::Declared,
        Self::Running,
        Self::Completed,
        Self::DeadlinePassed,
        Self::Cancelled,
    ];

    /// The state's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Declared => "declared",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::DeadlinePassed => "deadline_passed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether it still commands and counts.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Declared | Self::Running)
    }
}

/// One breach's campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignRecord {
    /// The breach.
    pub breach_id: BreachId,
    /// Why.
    pub reason: String,
    /// When every device should have rotated.
    pub deadline: DateTime<Utc>,
    /// Which devices, in words ([`fleetlaps_proto::breach::BreachScope::describe`]). Not the scope itself: a `devices`
    /// scope lists up to 500 ids, which every rotation the campaign counts would decode and
    /// write again; its devices are the campaign's targets, recorded apart.
    pub scope: String,
    /// When it was declared (the event's time): rotations dated from then on count.
    pub declared_at: DateTime<Utc>,
    /// Who declared it.
    pub declared_by: String,
    /// How many devices it targets.
    pub target_count: u32,
    /// How many of them are recorded so far.
    pub targeted: u32,
    /// How many were commanded (or covered by another campaign's command).
    pub commanded: u32,
    /// How many confirmed a rotation dated after the declaration.
    pub rotated: u32,
    /// Where it stands.
    pub state: CampaignState,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// How it ended.
    pub outcome: Option<BreachOutcome>,
}

impl CampaignRecord {
    /// The campaign a `breach_declared` event begins.
    pub fn declared(body: &BreachDeclared, time: DateTime<Utc>) -> Self {
        Self {
            breach_id: body.breach_id,
            reason: body.reason.clone(),
            deadline: body.deadline,
            scope: body.scope.describe(),
            declared_at: time,
            declared_by: body.declared_by.clone(),
            target_count: body.target_count,
            targeted: 0,
            commanded: 0,
            rotated: 0,
            state: CampaignState::Declared,
            ended_at: None,
            outcome: None,
        }
    }

    /// One more device recorded (`already_rotated`: it had confirmed a rotation since the
    /// declaration); once all are, the campaign runs.
    pub fn target_added(&mut self, already_rotated: bool) {
        self.targeted = self.targeted.saturating_add(1);
        if already_rotated {
            self.rotated = self.rotated.saturating_add(1);
        }
        if self.state == CampaignState::Declared && self.targeted >= self.target_count {
            self.state = CampaignState::Running;
        }
    }

    /// One more device commanded.
    pub fn target_commanded(&mut self) {
        self.commanded = self.commanded.saturating_add(1);
    }

    /// One more device rotated.
    pub fn target_rotated(&mut self) {
        self.rotated = self.rotated.saturating_add(1);
    }

    /// Every targeted device rotated.
    pub fn all_rotated(&self) -> bool {
        self.state == CampaignState::Running && self.rotated >= self.target_count
    }

    /// It ended at `time` with `outcome`; an ended campaign stays as it ended.
    pub fn ended(&mut self, outcome: &BreachOutcome, time: DateTime<Utc>) {
        if !self.state.is_active() {
            return;
        }
        self.state = match outcome {
            BreachOutcome::Completed => CampaignState::Completed,
            BreachOutcome::DeadlinePassed { .. } => CampaignState::DeadlinePassed,
            BreachOutcome::Cancelled { .. } => CampaignState::Cancelled,
        };
        self.ended_at = Some(time);
        self.outcome = Some(outcome.clone());
    }
}

/// One device of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignTarget {
    /// The device.
    pub device_id: DeviceId,
    /// The command it was sent (or counted on), once commanded.
    pub command_id: Option<CommandId>,
    /// Another campaign whose command covers it, if that is how it was commanded.
    pub covered_by: Option<BreachId>,
    /// When it was commanded.
    pub commanded_at: Option<DateTime<Utc>>,
    /// When it confirmed a rotation dated after the declaration.
    pub rotated_at: Option<DateTime<Utc>>,
}

impl CampaignTarget {
    /// A device targeted by a campaign declared at `declared_at`; `last_rotated` is when it last
    /// confirmed a rotation: at or after the declaration, it counts at once.
    pub fn targeted(device_id: DeviceId, declared_at: DateTime<Utc>, last_rotated: Option<DateTime<Utc>>) -> Self {
        Self {
            device_id,
            command_id: None,
            covered_by: None,
            commanded_at: None,
            rotated_at: last_rotated.filter(|rotated| *rotated >= declared_at),
        }
    }

    /// Commanded at `time` with `command_id` (sent by `covered_by` when another campaign sent
    /// it). Returns whether this changed it: a device commanded or rotated before is left.
    pub fn commanded(&mut self, command_id: CommandId, covered_by: Option<BreachId>, time: DateTime<Utc>) -> bool {
        if self.command_id.is_some() || self.rotated_at.is_some() {
            return false;
        }
        self.command_id = Some(command_id);
        self.covered_by = covered_by;
        self.commanded_at = Some(time);
        true
    }

    /// The device confirmed a rotation dated `at`. Returns whether it now counts: it is dated at
    /// or after `declared_at` and the device had not counted before.
    pub fn rotated(&mut self, at: DateTime<Utc>, declared_at: DateTime<Utc>) -> bool {
        if self.rotated_at.is_some() || at < declared_at {
            return false;
        }
        self.rotated_at = Some(at);
        true
    }

    /// Commanded and not yet rotated: waiting for the device (offline, or rotating).
    pub fn waiting(&self) -> bool {
        self.command_id.is_some() && self.rotated_at.is_none()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use fleetlaps_proto::breach::{BreachScope, BreachSource};

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
    }

    fn campaign(target_count: u32) -> CampaignRecord {
        CampaignRecord::declared(
            &BreachDeclared {
                breach_id: BreachId::new(),
                reason: "phished admin".to_owned(),
                deadline: at(3600),
                scope: BreachScope::All,
                target_count,
                declared_by: "soc".to_owned(),
                declared_by_token_id: None,
                source: BreachSource::Api,
            },
            at(0),
        )
    }

    #[test]
    fn a_campaign_runs_once_every_target_is_recorded_and_counts_rotations() {
        let mut record = campaign(2);
        record.target_added(false);
        assert_eq!(record.state, CampaignState::Declared);
        record.target_added(true);
        assert_eq!(
            (record.state, record.targeted, record.rotated),
            (CampaignState::Running, 2, 1)
        );
        assert!(!record.all_rotated());
        record.target_commanded();
        record.target_rotated();
        assert!(record.all_rotated());
        record.ended(&BreachOutcome::Completed, at(60));
        assert_eq!(
            (record.state, record.ended_at),
            (CampaignState::Completed, Some(at(60)))
        );
        // An ended campaign stays as it ended.
        record.ended(
            &BreachOutcome::Cancelled {
                by: "someone".to_owned(),
                by_token_id: None,
            },
            at(120),
        );
        assert_eq!(record.state, CampaignState::Completed);
    }

    #[test]
    fn a_rotation_counts_once_and_only_when_dated_after_the_declaration() {
        let declared_at = at(0);
        let before = CampaignTarget::targeted(DeviceId::parse("dev-1").unwrap(), declared_at, Some(at(-5)));
        assert_eq!(
            before.rotated_at, None,
            "a rotation before the declaration does not count"
        );
        let already = CampaignTarget::targeted(DeviceId::parse("dev-2").unwrap(), declared_at, Some(at(5)));
        assert_eq!(already.rotated_at, Some(at(5)), "one already confirmed after it counts");

        let mut target = before;
        assert!(!target.rotated(at(-1), declared_at));
        assert!(target.commanded(CommandId::new(), None, at(1)));
        assert!(target.waiting());
        assert!(!target.commanded(CommandId::new(), None, at(2)), "commanded once");
        assert!(target.rotated(at(10), declared_at));
        assert!(!target.rotated(at(20), declared_at), "counted once");
        assert!(!target.waiting());
        let mut rotated_first = already;
        assert!(
            !rotated_first.commanded(CommandId::new(), None, at(1)),
            "a rotated device needs no command"
        );
    }
}
