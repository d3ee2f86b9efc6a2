//! Making sled durable off the acknowledgement path, and the checkpoint that says how far it is.
//!
//! Acknowledging waits for the write-ahead log's fsync (see [`super::wal`]); sled itself is
//! flushed here, in the background, at least every `storage_checkpoint_ms` (sooner once the WAL
//! has grown by [`CHECKPOINT_BYTES`]). After each flush the checkpoint file records the
//! highest id sled holds durably, and the WAL segments wholly at or below it are deleted.
//!
//! The checkpoint only ever names an id covered by a finished flush, so at start-up sled
//! holding less than it says means sled lost data it had made durable: the log refuses to
//! start, as it does when sled recovers less than the durable mark.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::wal::Segments;
use super::{storage, LogError, Shared};
use crate::log::blobs::BlobSync;
use crate::metrics::Metrics;

/// WAL bytes written since the last checkpoint that bring the next one forward.
pub(super) const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Name of the checkpoint file in the WAL directory.
const CHECKPOINT_FILE: &str = "checkpoint";
const PREFIX: &str = "tidewire-wal sled-durable-through ";

/// Everything a flush of sled must sync before its events count as durable.
pub(super) struct StoreSync {
    pub(super) db: sled::Db,
    /// sled's main log file (`<dir>/db`), fdatasynced by every flush.
    log_file: std::fs::File,
    blobs: Mutex<BlobSync>,
}

impl StoreSync {
    pub(super) fn new(db: sled::Db, log_file: std::fs::File, dir: PathBuf) -> Self {
        StoreSync {
            db,
            log_file,
            blobs: Mutex::new(BlobSync::new(dir)),
        }
    }

    /// Makes everything written to sled before the call durable: sled's log, then the blob
    /// files sled's flush leaves unsynced. Returns how many blob files were synced.
    pub(super) fn flush(&self) -> Result<u64, LogError> {
        self.db.flush().map_err(storage)?;
        // sled's flush writes its log with sync_file_range on Linux, which neither flushes the
        // drive's write cache nor syncs the file's size and block map: an fdatasync makes the
        // flush what a durability claim needs.
        self.log_file
            .sync_data()
            .map_err(|e| LogError::Storage(format!("syncing the log file: {e}")))?;
        let mut blobs = self
            .blobs
            .lock()
            .map_err(|_| LogError::Storage("the blob syncer panicked".into()))?;
        blobs
            .sync()
            .map_err(|e| LogError::Storage(format!("syncing the log's blob files: {e}")))
    }
}

/// The checkpoint recorded in `wal_dir` (0 when there is none yet).
pub(super) fn read(wal_dir: &Path) -> Result<u64, LogError> {
    let path = wal_dir.join(CHECKPOINT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(LogError::Open(format!("{}: {e}", path.display()))),
    };
    text.trim()
        .strip_prefix(PREFIX)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| LogError::Open(format!("{}: not a tidewire checkpoint", path.display())))
}

/// Records, durably, that sled holds every event up to `through` (write, fsync, rename, fsync
/// the directory: a crash leaves the old checkpoint or the new one).
pub(super) fn write(wal_dir: &Path, through: u64) -> std::io::Result<()> {
    super::mark::replace_durably(wal_dir, CHECKPOINT_FILE, &format!("{PREFIX}{through}\n"))
}

/// Refuses a store that holds less than the checkpoint says it made durable.
pub(super) fn check(dir: &Path, checkpoint: u64, stored: u64) -> Result<(), LogError> {
    if checkpoint > stored {
        return Err(LogError::Open(format!(
            "{}: sled recovers events only up to id {stored}, but the write-ahead log's \
             checkpoint records that sled held every event up to {checkpoint} durably: sled's \
             files are damaged and it dropped what it could not read. Refusing to start, so \
             nothing more is written: restore the directory from a backup (tidewire \
             export/import), or move it away to start afresh",
            dir.display()
        )));
    }
    Ok(())
}

/// The background checkpointer: flushes sled, records the checkpoint, deletes covered WAL
/// segments. Runs until every sender of its nudges is dropped.
pub(super) struct Checkpointer {
    pub(super) store: Arc<StoreSync>,
    pub(super) shared: Arc<Shared>,
    pub(super) segments: Arc<Mutex<Segments>>,
    pub(super) wal_dir: PathBuf,
    pub(super) metrics: Metrics,
    /// The checkpoint on disk.
    pub(super) checkpoint: u64,
    /// Longest time between two checkpoints while events arrive.
    pub(super) every: Duration,
    /// Bytes of a WAL segment (the size of the spare prepared for the writer).
    pub(super) segment_bytes: u64,
    /// Free bytes a spare must leave on the filesystem (`storage_min_free_bytes`).
    pub(super) min_free: u64,
}

impl Checkpointer {
    /// Runs the loop on its own thread; the writer nudges it through `nudges` when the WAL
    /// grew by [`CHECKPOINT_BYTES`], and ends it by dropping the sender.
    pub(super) fn spawn(
        self,
        nudges: std_mpsc::Receiver<()>,
    ) -> Result<std::thread::JoinHandle<()>, LogError> {
        std::thread::Builder::new()
            .name("tidewire-log-checkpoint".into())
            .spawn(move || self.run(nudges))
            .map_err(|e| LogError::Open(format!("cannot start the checkpoint thread: {e}")))
    }

    fn run(mut self, nudges: std_mpsc::Receiver<()>) {
        loop {
            // The writer's next segment, ready before it is needed.
            if let Err(e) =
                super::wal::prepare_spare(&self.wal_dir, self.segment_bytes, self.min_free)
            {
                tracing::warn!(error = %e, "preparing a WAL segment failed; retrying later");
            }
            match nudges.recv_timeout(self.every) {
                Ok(()) | Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if let Err(e) = self.step() {
                tracing::warn!(error = %e, "checkpointing the log failed; retrying later");
            }
        }
    }

    /// One checkpoint, when sled holds anything the last one did not cover.
    pub(super) fn step(&mut self) -> Result<(), LogError> {
        // Read before the flush: every batch applied before this load is covered by it.
        let applied = self.shared.applied.load(Ordering::Acquire);
        if applied <= self.checkpoint {
            return Ok(());
        }
        let started = Instant::now();
        let synced = self.store.flush()?;
        self.metrics.observe_blobs_synced(synced);
        write(&self.wal_dir, applied)
            .map_err(|e| LogError::Storage(format!("writing the WAL checkpoint: {e}")))?;
        self.checkpoint = applied;
        let deleted = super::wal::delete_through(&self.segments, applied);
        self.metrics.observe_checkpoint(started.elapsed(), deleted);
        Ok(())
    }
}
