//! One fold of many messages: their writes are staged in memory over the sled tree, where the
//! later messages of the same fold read them back, and are then written as one sled batch, one
//! log write instead of one per message.
//!
//! A fold holds many events of each device, so records are staged as they are, decoded
//! ([`Staged::insert_record`]), and encoded once, when the batch is made; a record read from
//! the tree is decoded once per fold. A later message reads a clone, never the JSON.
//!
//! [`Records`] is how the projections are read, by the API from the tree itself and by the fold
//! from [`Staged`]: the same typed reads either way.
//!
//! Invariant: a message's writes are kept whole or not at all ([`Staged::keep`],
//! [`Staged::discard`]): a message refused half-way leaves only what its refusal writes.

use std::any::Any;
use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::iter::Peekable;
use std::rc::Rc;

use fleetlaps_proto::audit::TokenId;
use fleetlaps_proto::breach::BreachId;
use fleetlaps_proto::event::Envelope;
use fleetlaps_proto::ids::{DeviceId, EventId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::IVec;

use super::campaigns::{CampaignRecord, CampaignTarget};
use super::credentials::CredentialRecord;
use super::devices::DeviceRecord;
use super::escrow_keys::EscrowKeyRecord;
use super::keys;
use super::orchestrator_key::OrchestratorKeyRecord;
use super::principals::{EnrolledKeyRecord, TokenRecord};
use super::store::ProjectionError;

/// A key and its value, as sled gives them.
type Entry = Result<(IVec, IVec), sled::Error>;

/// The projections' records, read from the tree or through a fold's staged writes.
pub(super) trait Records {
    /// The bytes under `key`.
    fn raw(&self, key: &[u8]) -> Result<Option<IVec>, sled::Error>;

    /// Every entry whose key starts with `prefix`, in key order.
    fn raw_prefix<'a>(&'a self, prefix: &'a [u8]) -> Box<dyn Iterator<Item = Entry> + 'a>;

    /// The record under `key`, decoded.
    fn record<T: DeserializeOwned + Clone + 'static>(&self, key: &[u8]) -> Result<Option<T>, ProjectionError> {
        self.raw(key)?.map(|value| decode(key, &value)).transpose()
    }

    /// Whether anything is stored under `key`.
    fn has(&self, key: &[u8]) -> Result<bool, ProjectionError> {
        Ok(self.raw(key)?.is_some())
    }

    /// The number under `key` (a big-endian `u64`), if any.
    fn number(&self, key: &[u8]) -> Result<Option<u64>, ProjectionError> {
        Ok(self.raw(key)?.map(|bytes| decode_u64(&bytes)))
    }

    /// Every record under `prefix`, decoded, in key order.
    fn records<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, ProjectionError> {
        self.raw_prefix(prefix)
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect()
    }

    /// One device.
    fn device(&self, device_id: &DeviceId) -> Result<Option<DeviceRecord>, ProjectionError> {
        self.record(&keys::device(device_id))
    }

    /// The key `device_id` enrolled with, if it did.
    fn enrolled_key(&self, device_id: &DeviceId) -> Result<Option<EnrolledKeyRecord>, ProjectionError> {
        self.record(&keys::enrolled_key(device_id))
    }

    /// The key orchestrator events must be signed with, once the history recorded one.
    fn orchestrator_key(&self) -> Result<Option<OrchestratorKeyRecord>, ProjectionError> {
        self.record(keys::ORCHESTRATOR_KEY)
    }

    /// Whether the event with this id was applied before.
    fn event_applied(&self, event_id: &EventId) -> Result<bool, ProjectionError> {
        self.has(&keys::event(event_id))
    }

    /// Whether a copy of the device event `envelope` was applied before: for a report
    /// ([`keys::is_report`]), it is at or below the mark of the reports applied from its running
    /// copy; for any other, its id was applied. [`Staged::device_event_applied`] records it.
    fn device_event_applied_before(&self, envelope: &Envelope) -> Result<bool, ProjectionError> {
        if !keys::is_report(envelope.event.kind()) {
            return self.event_applied(&envelope.id);
        }
        let mark = self.raw(&keys::report_mark(&envelope.device_id, envelope.instance.as_ref()))?;
        let this = keys::report_mark_value(envelope.generation, envelope.sequence);
        Ok(mark.is_some_and(|mark| mark.as_ref() >= this.as_slice()))
    }

    /// One token of either kind.
    fn token(&self, token_id: &TokenId) -> Result<Option<TokenRecord>, ProjectionError> {
        self.record(&keys::token(token_id))
    }

    /// A device's credential backed up at stream sequence `backup_stream_sequence`.
    fn credential(
        &self,
        device_id: &DeviceId,
        backup_stream_sequence: u64,
    ) -> Result<Option<CredentialRecord>, ProjectionError> {
        self.record(&keys::credential(device_id, backup_stream_sequence))
    }

    /// One breach's campaign.
    fn campaign(&self, breach_id: &BreachId) -> Result<Option<CampaignRecord>, ProjectionError> {
        self.record(&keys::campaign(breach_id))
    }

    /// One device of a campaign.
    fn campaign_target(
        &self,
        breach_id: &BreachId,
        device_id: &DeviceId,
    ) -> Result<Option<CampaignTarget>, ProjectionError> {
        self.record(&keys::campaign_target(breach_id, device_id))
    }

    /// The campaigns targeting a device, oldest first.
    fn device_campaigns(&self, device_id: &DeviceId) -> Result<Vec<BreachId>, ProjectionError> {
        let prefix = keys::device_campaigns(device_id);
        self.raw_prefix(&prefix)
            .map(|entry| {
                let (key, _) = entry?;
                keys::device_campaign_breach(&key).ok_or_else(|| ProjectionError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    source: serde::de::Error::custom("not a breach id"),
                })
            })
            .collect()
    }

    /// Every escrow public key the history recorded, oldest first.
    fn escrow_keys(&self) -> Result<Vec<EscrowKeyRecord>, ProjectionError> {
        let mut keys = self.records::<EscrowKeyRecord>(keys::ESCROW_KEYS)?;
        keys.sort_by_key(|key| key.stream_sequence);
        Ok(keys)
    }

    /// How many quarantine records are kept.
    fn quarantine_len(&self) -> Result<u64, ProjectionError> {
        match self.number(keys::QUARANTINE_LEN)? {
            Some(len) => Ok(len),
            // A store from before the bound: count once; the next record writes the length.
            None => Ok(self.raw_prefix(keys::QUARANTINE).count() as u64),
        }
    }
}

impl Records for sled::Tree {
    fn raw(&self, key: &[u8]) -> Result<Option<IVec>, sled::Error> {
        self.get(key)
    }

    fn raw_prefix<'a>(&'a self, prefix: &'a [u8]) -> Box<dyn Iterator<Item = Entry> + 'a> {
        Box::new(self.scan_prefix(prefix))
    }
}

/// A record staged as it is, encoded only when the batch is made.
trait StagedRecord {
    /// Its bytes, as the tree keeps them.
    fn encode(&self) -> Vec<u8>;
    /// Itself, to be read back as its own type.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Serialize + 'static> StagedRecord for T {
    fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// What a fold wrote under a key.
#[derive(Clone)]
enum Staging {
    /// Bytes, as given.
    Bytes(IVec),
    /// A record, encoded when the batch is made (or when its bytes are read).
    Record(Rc<dyn StagedRecord>),
}

impl Staging {
    fn bytes(&self) -> IVec {
        match self {
            Self::Bytes(bytes) => bytes.clone(),
            Self::Record(record) => IVec::from(record.encode()),
        }
    }
}

/// The writes of a fold not yet in the tree, read before the tree's own records.
pub(super) struct Staged<'t> {
    /// The records as they were before the fold.
    tree: &'t sled::Tree,
    /// Every key the fold wrote: its new value, or `None` where it removed the record.
    writes: BTreeMap<IVec, Option<Staging>>,
    /// What the current message's writes replaced, oldest first, to put back if it is refused:
    /// the key and its staged entry before (`None` when the fold had not written it).
    undo: Vec<(IVec, Option<Option<Staging>>)>,
    /// Records read from the tree, decoded (the tree does not change during a fold).
    decoded: RefCell<HashMap<IVec, Rc<dyn Any>>>,
}

impl<'t> Staged<'t> {
    /// Nothing staged yet over `tree`.
    pub(super) fn new(tree: &'t sled::Tree) -> Self {
        Self {
            tree,
            writes: BTreeMap::new(),
            undo: Vec::new(),
            decoded: RefCell::new(HashMap::new()),
        }
    }

    /// Stages `value` under `key`.
    pub(super) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.stage(
            IVec::from(key.as_ref()),
            Some(Staging::Bytes(IVec::from(value.as_ref()))),
        );
    }

    /// Stages `record` under `key`, as it is: later messages of the fold read it back without
    /// decoding it, and it is encoded once, in the batch.
    pub(super) fn insert_record<T: Serialize + 'static>(&mut self, key: impl AsRef<[u8]>, record: T) {
        self.stage(IVec::from(key.as_ref()), Some(Staging::Record(Rc::new(record))));
    }

    /// Records that the device event `envelope` was applied by the message at stream `sequence`:
    /// a report moves its running copy's mark, any other keeps its id (what
    /// [`Records::device_event_applied_before`] reads).
    pub(super) fn device_event_applied(&mut self, envelope: &Envelope, sequence: u64) {
        if keys::is_report(envelope.event.kind()) {
            self.insert(
                keys::report_mark(&envelope.device_id, envelope.instance.as_ref()),
                keys::report_mark_value(envelope.generation, envelope.sequence),
            );
        } else {
            self.insert(keys::event(&envelope.id), sequence.to_be_bytes());
        }
    }

    /// Stages the removal of `key`.
    pub(super) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.stage(IVec::from(key.as_ref()), None);
    }

    fn stage(&mut self, key: IVec, value: Option<Staging>) {
        let before = self.writes.insert(key.clone(), value);
        self.undo.push((key, before));
    }

    /// Keeps the current message's writes: the next message starts.
    pub(super) fn keep(&mut self) {
        self.undo.clear();
    }

    /// Drops the current message's writes, as if it had written nothing.
    pub(super) fn discard(&mut self) {
        while let Some((key, before)) = self.undo.pop() {
            match before {
                Some(entry) => self.writes.insert(key, entry),
                None => self.writes.remove(&key),
            };
        }
    }

    /// Whether anything is staged.
    pub(super) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The keys written (or removed), in key order.
    pub(super) fn keys(&self) -> Vec<IVec> {
        self.writes.keys().cloned().collect()
    }

    /// Everything kept, as one sled batch.
    pub(super) fn into_batch(mut self) -> sled::Batch {
        self.discard();
        let mut batch = sled::Batch::default();
        for (key, value) in self.writes {
            match value {
                Some(value) => batch.insert(key, value.bytes()),
                None => batch.remove(key),
            }
        }
        batch
    }
}

impl Records for Staged<'_> {
    fn raw(&self, key: &[u8]) -> Result<Option<IVec>, sled::Error> {
        match self.writes.get(key) {
            Some(staged) => Ok(staged.as_ref().map(Staging::bytes)),
            None => self.tree.get(key),
        }
    }

    fn record<T: DeserializeOwned + Clone + 'static>(&self, key: &[u8]) -> Result<Option<T>, ProjectionError> {
        match self.writes.get(key) {
            None => {}
            Some(None) => return Ok(None),
            Some(Some(Staging::Record(record))) => {
                if let Some(record) = record.as_any().downcast_ref::<T>() {
                    return Ok(Some(record.clone()));
                }
                return decode(key, &record.encode()).map(Some);
            }
            Some(Some(Staging::Bytes(bytes))) => return decode(key, bytes).map(Some),
        }
        if let Some(record) = self
            .decoded
            .borrow()
            .get(key)
            .and_then(|record| record.downcast_ref::<T>())
        {
            return Ok(Some(record.clone()));
        }
        let Some(bytes) = self.tree.get(key)? else {
            return Ok(None);
        };
        let record: T = decode(key, &bytes)?;
        self.decoded
            .borrow_mut()
            .insert(IVec::from(key), Rc::new(record.clone()));
        Ok(Some(record))
    }

    fn raw_prefix<'a>(&'a self, prefix: &'a [u8]) -> Box<dyn Iterator<Item = Entry> + 'a> {
        let staged = self
            .writes
            .range::<[u8], _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(move |(key, _)| key.starts_with(prefix));
        Box::new(Merged {
            tree: self.tree.scan_prefix(prefix).peekable(),
            staged: staged.peekable(),
        })
    }
}

/// The tree's entries under a prefix with the staged writes laid over them, in key order.
struct Merged<'a, S: Iterator<Item = (&'a IVec, &'a Option<Staging>)>> {
    /// The tree's entries.
    tree: Peekable<sled::Iter>,
    /// The staged writes under the same prefix.
    staged: Peekable<S>,
}

impl<'a, S: Iterator<Item = (&'a IVec, &'a Option<Staging>)>> Iterator for Merged<'a, S> {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        loop {
            let order = match (self.tree.peek(), self.staged.peek()) {
                (Some(Err(_)), _) => return self.tree.next(),
                (None, None) => return None,
                (Some(Ok(_)), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(Ok((tree_key, _))), Some((staged_key, _))) => tree_key.as_ref().cmp(staged_key.as_ref()),
            };
            match order {
                Ordering::Less => return self.tree.next(),
                // The staged write replaces the tree's record.
                Ordering::Equal => drop(self.tree.next()),
                Ordering::Greater => {}
            }
            let (key, value) = self.staged.next()?;
            if let Some(value) = value {
                return Some(Ok((key.clone(), value.bytes())));
            }
            // A staged removal: the record is gone; look further.
        }
    }
}

/// A record's bytes, decoded; `key` names it in the error.
pub(super) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, ProjectionError> {
    serde_json::from_slice(bytes).map_err(|source| ProjectionError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

/// A record's bytes, as the tree keeps them.
pub(super) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("projection records serialise: string keys only")
}

/// A big-endian `u64` (shorter values are padded on the right, as before).
pub(super) fn decode_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    let len = bytes.len().min(8);
    array[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(array)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path()).expect("sled opens");
        let tree = db.open_tree("t").expect("tree opens");
        (dir, tree)
    }

    fn entries(records: &impl Records, prefix: &[u8]) -> Vec<(String, String)> {
        records
            .raw_prefix(prefix)
            .map(|entry| {
                let (key, value) = entry.expect("entry reads");
                (
                    String::from_utf8_lossy(&key).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn staged_writes_are_read_back_over_the_tree_and_a_discarded_message_leaves_none() {
        let (_dir, tree) = tree();
        for (key, value) in [("p/1", "a"), ("p/3", "c"), ("p/5", "e"), ("q/1", "x")] {
            tree.insert(key, value).expect("insert");
        }
        let mut staged = Staged::new(&tree);
        staged.insert("p/2", "b");
        staged.insert("p/3", "C");
        staged.remove("p/5");
        staged.keep();
        assert_eq!(staged.raw(b"p/3").expect("read").as_deref(), Some(&b"C"[..]));
        assert_eq!(staged.raw(b"p/5").expect("read"), None);
        assert_eq!(
            entries(&staged, b"p/"),
            [("p/1", "a"), ("p/2", "b"), ("p/3", "C")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );

        // A refused message: its writes go, the kept ones stay.
        staged.insert("p/0", "z");
        staged.insert("p/2", "B");
        staged.remove("p/1");
        staged.discard();
        assert_eq!(
            entries(&staged, b"p/"),
            [("p/1", "a"), ("p/2", "b"), ("p/3", "C")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(
            tree.get("p/2").expect("read"),
            None,
            "nothing reaches the tree before the batch"
        );

        tree.apply_batch(staged.into_batch()).expect("batch applies");
        assert_eq!(
            entries(&tree, b"p/"),
            [("p/1", "a"), ("p/2", "b"), ("p/3", "C")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(entries(&tree, b"q/").len(), 1);
    }

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Counter {
        count: u64,
    }

    #[test]
    fn a_staged_record_is_read_back_as_it_is_and_encoded_once_in_the_batch() {
        let (_dir, tree) = tree();
        tree.insert("r/1", encode(&Counter { count: 1 })).expect("insert");
        let mut staged = Staged::new(&tree);
        let read: Counter = staged.record(b"r/1").expect("read").expect("stored");
        assert_eq!(read, Counter { count: 1 });
        staged.insert_record("r/1", Counter { count: 2 });
        staged.keep();
        assert_eq!(
            staged.record::<Counter>(b"r/1").expect("read"),
            Some(Counter { count: 2 })
        );
        assert_eq!(
            staged.raw(b"r/1").expect("read").as_deref(),
            Some(encode(&Counter { count: 2 }).as_slice()),
            "its bytes are what the batch will write"
        );
        assert_eq!(
            entries(&staged, b"r/"),
            [("r/1".to_owned(), r#"{"count":2}"#.to_owned())],
            "a scan sees it encoded"
        );

        // A refused message's record goes; the one kept before it, and the tree's, stay.
        staged.insert_record("r/1", Counter { count: 3 });
        staged.insert_record("r/2", Counter { count: 1 });
        staged.discard();
        assert_eq!(
            staged.record::<Counter>(b"r/1").expect("read"),
            Some(Counter { count: 2 })
        );
        assert_eq!(staged.record::<Counter>(b"r/2").expect("read"), None);
        staged.remove("r/1");
        staged.keep();
        assert_eq!(
            staged.record::<Counter>(b"r/1").expect("read"),
            None,
            "a removal hides the decoded tree record"
        );

        tree.apply_batch(staged.into_batch()).expect("batch applies");
        assert_eq!(tree.get("r/1").expect("read"), None);
        let mut staged = Staged::new(&tree);
        staged.insert_record("r/3", Counter { count: 7 });
        staged.keep();
        tree.apply_batch(staged.into_batch()).expect("batch applies");
        assert_eq!(
            tree.get("r/3").expect("read").as_deref(),
            Some(encode(&Counter { count: 7 }).as_slice())
        );
    }

    #[test]
    fn the_batch_leaves_out_the_writes_of_a_message_neither_kept_nor_discarded() {
        let (_dir, tree) = tree();
        let mut staged = Staged::new(&tree);
        staged.insert("p/1", "a");
        staged.keep();
        staged.insert("p/2", "b");
        assert!(!staged.is_empty());
        tree.apply_batch(staged.into_batch()).expect("batch applies");
        assert_eq!(tree.get("p/1").expect("read").as_deref(), Some(&b"a"[..]));
        assert_eq!(tree.get("p/2").expect("read"), None);
    }
}
