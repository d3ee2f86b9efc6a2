//! Start-up recovery from the write-ahead log: the records above what sled recovered are
//! written into sled again, exactly as their commits wrote them, before anything else runs.
//!
//! Rules:
//! - sled recovers a prefix of its atomic batches, and each WAL record is one batch: a
//!   record whose ids sled already holds is skipped whole, one above them is applied whole,
//!   and one that straddles them means the two disagree (refused);
//! - an unfinished record at the end of the newest segment was never acknowledged: it is
//!   dropped with a log line; damage anywhere else refuses to start;
//! - once the records are in sled, sled is flushed, the checkpoint recorded and the segments
//!   deleted, so a crash during recovery only means recovering again.

use super::wal::WalRecovery;
use super::*;
use crate::log::wal_record::{self, Ending, WalRecord};

impl Writer {
    /// Replays the WAL into sled, given the highest id sled recovered (`stored`).
    pub(super) fn replay_wal(&mut self, stored: u64) -> Result<WalRecovery, LogError> {
        let mut report = WalRecovery::default();
        let mut held = stored;
        let paths = self.wal.segment_paths();
        let newest = paths.len().saturating_sub(1);
        for (i, path) in paths.iter().enumerate() {
            let bytes = std::fs::read(path)
                .map_err(|e| LogError::Open(format!("{}: {e}", path.display())))?;
            report.segments += 1;
            report.bytes += bytes.len() as u64;
            let scan = wal_record::scan(&bytes);
            match &scan.ending {
                Ending::Clean => {}
                Ending::Torn { at } if i == newest => {
                    let torn = bytes.len() - at;
                    tracing::warn!(
                        segment = %path.display(),
                        at,
                        bytes = torn,
                        "the write-ahead log ends with an unfinished record (a write cut \
                         short by a crash, never acknowledged); dropping it"
                    );
                    report.torn_bytes = torn as u64;
                }
                Ending::Torn { at } => {
                    return Err(damaged(
                        path,
                        *at,
                        "a record is cut short, yet a newer segment follows",
                    ));
                }
                Ending::Corrupt { at, why } => return Err(damaged(path, *at, why)),
            }
            for rec in &scan.records {
                report.records += 1;
                if rec.last <= held {
                    continue;
                }
                if rec.first <= held {
                    return Err(LogError::Open(format!(
                        "{}: the write-ahead log's record of ids {}..={} straddles the newest \
                         id sled holds ({held}); refusing to start",
                        path.display(),
                        rec.first,
                        rec.last
                    )));
                }
                report.replayed_events += self.apply_record(rec)?;
                report.replayed_records += 1;
                held = rec.last;
            }
        }
        if report.segments > 0 {
            self.flush_store()?;
            self.settle_wal();
        }
        if report.replayed_records > 0 {
            tracing::info!(
                records = report.replayed_records,
                events = report.replayed_events,
                "replayed the write-ahead log into the store"
            );
        }
        Ok(report)
    }

    /// Applies one record's events with their ids and times; returns how many.
    fn apply_record(&mut self, rec: &WalRecord<'_>) -> Result<u64, LogError> {
        let mut events = Vec::new();
        for (first, bytes) in &rec.chunks {
            let chunk = Chunk::parse(bytes).map_err(corrupt)?;
            for i in 0..chunk.len() {
                let (time, event) = chunk.event(i).map_err(corrupt)?;
                events.push(ops::ImportEvent {
                    id: first + i as u64,
                    time,
                    event,
                });
            }
        }
        let count = events.len() as u64;
        // The commit dated its dedupe bucket with its events' time.
        let bucket_time = events.first().map_or_else(now_ms, |e| e.time);
        let (delta, committed) = self.write_with_ids(events, bucket_time)?;
        self.next_id = self.next_id.max(rec.last + 1);
        self.last_applied = self.last_applied.max(rec.last);
        self.publish(delta, committed);
        Ok(count)
    }
}

fn damaged(path: &std::path::Path, at: usize, why: &str) -> LogError {
    LogError::Open(format!(
        "{}: the write-ahead log is damaged at byte {at} ({why}), before records that were \
         acknowledged. Refusing to start, so nothing more is written: restore the directory \
         from a backup (tidewire export/import), or move it away to start afresh",
        path.display()
    ))
}
