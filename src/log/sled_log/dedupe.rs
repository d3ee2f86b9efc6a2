//! Idempotent publish: what the writer remembers of each `(topic, msg_id)` it stored, so a
//! retried publish is recognised instead of stored twice.
//!
//! Guarantees:
//! - an entry is written in the same atomic batch as the event it names, so after any crash
//!   a retry is recognised exactly when the original was stored;
//! - an entry counts for `window` after its commit, whether or not it has been swept yet;
//! - at most `max_ids` entries are kept: beyond that the oldest are forgotten first (a retry
//!   of one of those is stored again, which the README states);
//! - expired entries are removed by [`Dedupe::sweep`] in bounded steps, in time order, never
//!   by a scan on the publish path.

use super::*;
use crate::log::record::DedupeEntry;

/// Most expiry-bucket items one sweep step looks at, so a step never stalls commits for long.
const SWEEP_STEP_ITEMS: usize = 20_000;
/// Largest expiry bucket, bytes: the same bound as chunks, for the same reason (pages of the
/// sled log stay inline in its synced file).
const BUCKET_BYTES: usize = 6 * 1024;

/// Limits of the dedupe memory.
#[derive(Debug, Clone, Copy)]
pub struct DedupeOptions {
    /// How long after its commit a `(topic, msg_id)` is still recognised.
    pub window: Duration,
    /// Most `(topic, msg_id)` pairs remembered.
    pub max_ids: u64,
}

impl Default for DedupeOptions {
    fn default() -> Self {
        DedupeOptions {
            window: Duration::from_secs(120),
            max_ids: 1_000_000,
        }
    }
}

/// The writer's dedupe state. Only the writer thread touches it.
pub(super) struct Dedupe {
    window_ms: u64,
    max_ids: u64,
    /// Entries stored (the persisted counter).
    count: u64,
    /// Entries written by the commit being built: dedupe key → event id.
    round: HashMap<Vec<u8>, u64>,
    /// New keys in the round (entries that did not exist before, expired or not).
    added: u64,
    /// The key of the last [`Dedupe::check`], reused by [`Dedupe::record`].
    key: Vec<u8>,
    /// Whether that key is already stored (expired): writing it again adds no entry.
    key_stored: bool,
    bucket: Vec<u8>,
    bucket_first: u64,
}

impl Dedupe {
    /// The dedupe state of a log whose counter key holds `count`.
    pub(super) fn new(opts: DedupeOptions, count: u64) -> Self {
        Dedupe {
            window_ms: u64::try_from(opts.window.as_millis()).unwrap_or(u64::MAX),
            max_ids: opts.max_ids,
            count,
            round: HashMap::new(),
            added: 0,
            key: Vec::new(),
            key_stored: false,
            bucket: Vec::new(),
            bucket_first: 0,
        }
    }

    /// Entries stored.
    pub(super) fn count(&self) -> u64 {
        self.count
    }

    /// Whether the stored entries exceed the maximum by enough to sweep at once.
    pub(super) fn over_budget(&self) -> bool {
        self.count > self.max_ids.saturating_add(self.max_ids / 100)
    }

    fn live(&self, entry: DedupeEntry, now: u64) -> bool {
        entry.time.saturating_add(self.window_ms) > now
    }

    /// The original id of `(topic, msg_id)` when it was stored within the window (or earlier
    /// in this commit); `None` when this event is new, and then [`Dedupe::record`] must be
    /// called with its id.
    pub(super) fn check(
        &mut self,
        tree: &sled::Tree,
        topic: &str,
        msg_id: &str,
        now: u64,
    ) -> Result<Option<u64>, LogError> {
        record::dedupe_key_into(&mut self.key, topic, msg_id);
        if let Some(&id) = self.round.get(&self.key) {
            return Ok(Some(id));
        }
        self.key_stored = false;
        if let Some(v) = tree.get(&self.key).map_err(storage)? {
            let entry = record::decode_dedupe(&v).map_err(corrupt)?;
            if self.live(entry, now) {
                return Ok(Some(entry.id));
            }
            self.key_stored = true;
        }
        Ok(None)
    }

    /// Remembers the key of the last [`Dedupe::check`] as stored under `id` at `time`.
    pub(super) fn record(&mut self, batch: &mut sled::Batch, id: u64, time: u64) {
        batch.insert(
            self.key.as_slice(),
            &record::encode_dedupe(DedupeEntry { id, time })[..],
        );
        if !self.key_stored {
            self.added += 1;
        }
        if self.bucket.len() + self.key.len() + 10 > BUCKET_BYTES {
            self.close_bucket(batch, time);
        }
        if self.bucket.is_empty() {
            self.bucket_first = id;
        }
        record::push_expiry_item(&mut self.bucket, id, &self.key);
        self.round.insert(self.key.clone(), id);
    }

    fn close_bucket(&mut self, batch: &mut sled::Batch, time: u64) {
        if !self.bucket.is_empty() {
            batch.insert(
                &record::expiry_key(time, self.bucket_first)[..],
                self.bucket.as_slice(),
            );
            self.bucket.clear();
        }
    }

    /// Writes the round's last expiry bucket and the new counter into `batch`.
    pub(super) fn finish_round(&mut self, batch: &mut sled::Batch, time: u64) {
        self.close_bucket(batch, time);
        if self.added > 0 {
            batch.insert(
                record::DEDUPE_COUNT_KEY,
                &record::encode_count(self.count + self.added)[..],
            );
        }
    }

    /// The round's batch was applied: its entries now count.
    pub(super) fn commit_round(&mut self) {
        self.count += self.added;
        self.abort_round();
    }

    /// The round's batch was not applied: forget its entries.
    pub(super) fn abort_round(&mut self) {
        self.round.clear();
        self.added = 0;
        self.bucket.clear();
    }

    /// Removes expired entries, and the oldest beyond the maximum, in time order, looking at
    /// no more than one bounded step of items. Returns how many entries it removed. Not
    /// flushed: a crash only brings back entries the next sweep removes again.
    pub(super) fn sweep(&mut self, tree: &sled::Tree, now: u64) -> Result<u64, LogError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0u64;
        let mut looked = 0usize;
        for item in tree.scan_prefix([record::EXPIRY_PREFIX]) {
            let (k, v) = item.map_err(storage)?;
            let time = record::expiry_time_of_key(&k).map_err(corrupt)?;
            let expired = time.saturating_add(self.window_ms) <= now;
            if !expired && self.count - removed <= self.max_ids {
                break;
            }
            for (id, key) in record::decode_expiry(&v).map_err(corrupt)? {
                // The key may have been written again since (its entry expired and the
                // msg_id came back): only the entry this bucket wrote goes.
                if let Some(cur) = tree.get(key).map_err(storage)? {
                    if record::decode_dedupe(&cur).map_err(corrupt)?.id == id {
                        batch.remove(key);
                        removed += 1;
                    }
                }
                looked += 1;
            }
            batch.remove(k);
            if looked >= SWEEP_STEP_ITEMS {
                break;
            }
        }
        if looked == 0 {
            return Ok(0);
        }
        let left = self.count.saturating_sub(removed);
        batch.insert(record::DEDUPE_COUNT_KEY, &record::encode_count(left)[..]);
        tree.apply_batch(batch).map_err(storage)?;
        self.count = left;
        Ok(removed)
    }
}
