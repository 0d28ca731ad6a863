//! Attestations (`signatures_verified`): the orchestrator's signed word that it verified the
//! signatures of a run of the history's messages, so that a replay of the same messages need not
//! check each one again, the costliest part of a rebuild.
//!
//! The live consumer keeps the run it has folded since the last attestation ([`Window`]): the
//! digest of its messages ([`MessagesDigest`]: sequence, subject, signature header and payload)
//! and the sequences it refused, whose signatures it does not vouch for. Every
//! `history.signatures_verified_every` messages, or when the refused reach
//! [`SignaturesVerified::MAX_NOT_VERIFIED`], it records a `signatures_verified` event, signed as
//! every orchestrator event is.
//!
//! A replay reads the attestations first ([`Attestations::from_history`]), unchecked, and
//! folds each message a well-formed one covers without checking its signature. It trusts them
//! only once both hold, and starts again checking every signature otherwise:
//! - the messages it read over the run have the attested digest ([`DigestCheck`]): nothing
//!   was added, removed or changed in the run since the orchestrator verified it;
//! - the attestation's own message, later in the history, folds as an orchestrator event
//!   signed by the recorded orchestrator key. It is covered by a later attestation at most
//!   (each covers only messages before its own), so the last one the replay uses is always
//!   checked in full: every word taken rests on a signature really checked.
//!
//! The orchestrator key vouches for nothing it could not already do: it signs the enrollments
//! that name every device key.

use std::collections::VecDeque;

use fleetlaps_proto::audit::{AuditEnvelope, AuditEvent, SignaturesVerified};
use sha2::{Digest as _, Sha256};

use crate::projection::StreamMessage;

/// SHA-256 over messages, each as its sequence, subject, signature header and payload (each
/// of the last three preceded by its length, so no two messages hash alike).
#[derive(Clone, Default)]
pub struct MessagesDigest(Sha256);

impl MessagesDigest {
    /// Adds one message.
    pub fn add(&mut self, message: &StreamMessage<'_>) {
        self.0.update(message.sequence.to_be_bytes());
        for part in [
            message.subject.as_bytes(),
            message.signature.map_or(&[][..], str::as_bytes),
            message.payload,
        ] {
            self.0.update((part.len() as u64).to_be_bytes());
            self.0.update(part);
        }
    }

    /// The digest, in lowercase hex.
    pub fn finish(self) -> String {
        crate::auth::hex(&self.0.finalize())
    }
}

/// The run the live consumer has folded since its last attestation.
#[derive(Default)]
pub struct Window {
    /// Runs closed because they refused as many messages as one attestation carries.
    closed: Vec<SignaturesVerified>,
    /// The first sequence of the run, once it has one.
    from: Option<u64>,
    /// The last sequence added.
    through: u64,
    /// How many messages it holds.
    count: u64,
    /// Their digest.
    digest: MessagesDigest,
    /// Those refused.
    not_verified: Vec<u64>,
}

impl Window {
    /// Adds a message just folded, `refused` when it was quarantined. Messages are added in
    /// stream order, each once.
    pub fn add(&mut self, message: &StreamMessage<'_>, refused: bool) {
        if refused && self.not_verified.len() == SignaturesVerified::MAX_NOT_VERIFIED {
            let closed = self.close().expect("a run that refused messages has begun");
            self.closed.push(closed);
        }
        self.from.get_or_insert(message.sequence);
        self.through = message.sequence;
        self.count += 1;
        self.digest.add(message);
        if refused {
            self.not_verified.push(message.sequence);
        }
    }

    /// Forgets the run (a batch failed: what was folded of it is not known for sure).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The attestations due: of each run closed, and of the current one when it holds `every`
    /// messages or as many refused as one attestation carries (a new run begins).
    pub fn take_due(&mut self, every: u64) -> Vec<SignaturesVerified> {
        let mut due = std::mem::take(&mut self.closed);
        if self.count >= every || self.not_verified.len() >= SignaturesVerified::MAX_NOT_VERIFIED {
            due.extend(self.close());
        }
        due
    }

    /// The attestation of the current run, if it has begun; a new one begins.
    fn close(&mut self) -> Option<SignaturesVerified> {
        let from = self.from.take()?;
        let closed = std::mem::take(&mut self.closed);
        let run = std::mem::replace(
            self,
            Self {
                closed,
                ..Self::default()
            },
        );
        Some(SignaturesVerified {
            from_sequence: from,
            through_sequence: run.through,
            messages_sha256: run.digest.finish(),
            not_verified: run.not_verified,
        })
    }
}

/// One attestation a replay may use.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attested {
    /// Its own stream sequence.
    sequence: u64,
    /// What it says.
    body: SignaturesVerified,
}

/// The attestations a replay uses: well-formed, recorded before the replay's end, none
/// overlapping another, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attestations {
    /// By their first covered sequence.
    runs: Vec<Attested>,
}

/// Why a replay cannot keep the words it took: it starts again, checking every signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// The messages read over an attested run do not have its digest.
    #[error(
        "the messages {from_sequence} to {through_sequence} are not those attested at stream sequence {sequence} (another digest)"
    )]
    Digest {
        /// The attestation's own sequence.
        sequence: u64,
        /// The run's first sequence.
        from_sequence: u64,
        /// The run's last sequence.
        through_sequence: u64,
    },
    /// The attestation's own message did not fold as an orchestrator event.
    #[error("the attestation at stream sequence {sequence} is not a signed orchestrator event (it was refused)")]
    Unsigned {
        /// Its sequence.
        sequence: u64,
    },
}

impl Attestations {
    /// The attestations among `messages` (the `signatures_verified` messages of the history,
    /// by stream sequence, as read: unchecked) that a replay ending at stream sequence `end`
    /// may use: decoded, covering only messages before their own, refusing in order and within
    /// their run, at most [`SignaturesVerified::MAX_NOT_VERIFIED`] of them, and each past the
    /// run before it (a later one that overlaps an earlier one is left out, as one that does
    /// not decode is: their messages are checked one by one).
    pub fn from_history<'a>(messages: impl IntoIterator<Item = (u64, &'a [u8])>, end: u64) -> Self {
        let mut runs: Vec<Attested> = Vec::new();
        for (sequence, payload) in messages {
            let Ok(AuditEnvelope {
                event: AuditEvent::SignaturesVerified(body),
                ..
            }) = AuditEnvelope::from_json(payload)
            else {
                continue;
            };
            let well_formed = sequence <= end
                && body.from_sequence <= body.through_sequence
                && body.through_sequence < sequence
                && body.not_verified.len() <= SignaturesVerified::MAX_NOT_VERIFIED
                && body.not_verified.is_sorted_by(|a, b| a < b)
                && body
                    .not_verified
                    .iter()
                    .all(|refused| (body.from_sequence..=body.through_sequence).contains(refused));
            let after_the_last = runs
                .last()
                .is_none_or(|last| last.body.through_sequence < body.from_sequence);
            if well_formed && after_the_last {
                runs.push(Attested { sequence, body });
            }
        }
        Self { runs }
    }

    /// Whether the signature of the message at `sequence` is attested.
    pub fn attested(&self, sequence: u64) -> bool {
        let index = self.runs.partition_point(|run| run.body.through_sequence < sequence);
        self.runs.get(index).is_some_and(|run| {
            run.body.from_sequence <= sequence && run.body.not_verified.binary_search(&sequence).is_err()
        })
    }

    /// The attestations' own stream sequences: each must fold as a signed orchestrator event.
    pub fn sequences(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().map(|run| run.sequence)
    }

    /// The check of the runs' digests over the messages as they are read.
    pub fn digest_check(&self) -> DigestCheck {
        DigestCheck {
            runs: self.runs.iter().cloned().collect(),
            digest: MessagesDigest::default(),
        }
    }
}

/// The attested runs' digests, worked out over the messages as a replay reads them, in order.
pub struct DigestCheck {
    /// The runs not yet past, in order.
    runs: VecDeque<Attested>,
    /// The digest of the current run's messages read so far.
    digest: MessagesDigest,
}

impl DigestCheck {
    /// Adds the next message read; `Err` once a run ends with another digest.
    pub fn add(&mut self, message: &StreamMessage<'_>) -> Result<(), Broken> {
        let Some(run) = self.runs.front() else {
            return Ok(());
        };
        if message.sequence < run.body.from_sequence {
            return Ok(());
        }
        if message.sequence <= run.body.through_sequence {
            self.digest.add(message);
        }
        if message.sequence >= run.body.through_sequence {
            let digest = std::mem::take(&mut self.digest).finish();
            let run = self.runs.pop_front().expect("a run is current");
            if digest != run.body.messages_sha256 {
                return Err(Broken::Digest {
                    sequence: run.sequence,
                    from_sequence: run.body.from_sequence,
                    through_sequence: run.body.through_sequence,
                });
            }
            // A message past a run's end may begin the next one.
            if message.sequence > run.body.through_sequence {
                return self.add(message);
            }
        }
        Ok(())
    }

    /// `Err` if a run was not read to its end (the history ended before it).
    pub fn finish(mut self) -> Result<(), Broken> {
        match self.runs.pop_front() {
            None => Ok(()),
            Some(run) => Err(Broken::Digest {
                sequence: run.sequence,
                from_sequence: run.body.from_sequence,
                through_sequence: run.body.through_sequence,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
