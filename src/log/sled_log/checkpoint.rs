//! Making sled durable off the acknowledgement path, and the checkpoint that says how far it is.
//!
//! Acknowledging waits for the write-ahead log's fsync (see [`super::wal`]); sled itself is
//! flushed by the writer between commits, at least every `storage_checkpoint_ms` while events
//! arrive (sooner once the WAL has grown by [`checkpoint_bytes`]). After each flush the
//! checkpoint file records the highest id sled holds durably, and the WAL segments wholly at
//! or below it are deleted.
//!
//! Why on the writer's thread: it alone applies batches to sled, so a flush it runs between
//! commits covers exactly the last id it applied, with no shared counter or lock; the price
//! is that commits queued meanwhile wait for that flush, once every `storage_checkpoint_ms`
//! under load (a background thread would contend for the same disk all the same).
//!
//! The checkpoint only ever names an id covered by a finished flush, so at start-up sled
//! holding less than it says means sled lost data it had made durable: the log refuses to
//! start, as it does when sled recovers less than the durable mark.

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use super::{storage, LogError};
use crate::log::blobs::BlobSync;

/// WAL bytes written since the last checkpoint that bring the next one forward, for a sled
/// cache of `cache_bytes`: half the cache, between 1 and 64 MiB.
///
/// Why: sled cannot evict what it has not flushed, so everything written between two
/// checkpoints stays in memory beside its cache; tying the two keeps the server's memory
/// near what `cache_bytes` says however fast events arrive.
pub(super) fn checkpoint_bytes(cache_bytes: u64) -> u64 {
    (cache_bytes / 2).clamp(1 << 20, 64 << 20)
}
/// Name of the checkpoint file in the WAL directory.
const CHECKPOINT_FILE: &str = "checkpoint";
const PREFIX: &str = "tidewire-wal sled-durable-through ";

/// Everything a flush of sled must sync before its events count as durable.
pub(super) struct StoreSync {
    pub(super) db: sled::Db,
    /// sled's main log file (`<dir>/db`), fdatasynced by every flush.
    log_file: std::fs::File,
    blobs: BlobSync,
}

impl StoreSync {
    pub(super) fn new(db: sled::Db, log_file: std::fs::File, dir: PathBuf) -> Self {
        StoreSync {
            db,
            log_file,
            blobs: BlobSync::new(dir),
        }
    }

    /// Makes everything written to sled before the call durable: sled's log, then the blob
    /// files sled's flush leaves unsynced. Returns how many blob files were synced.
    pub(super) fn flush(&mut self) -> Result<u64, LogError> {
        self.db.flush().map_err(storage)?;
        // sled's flush writes its log with sync_file_range on Linux, which neither flushes the
        // drive's write cache nor syncs the file's size and block map: an fdatasync makes the
        // flush what a durability claim needs.
        self.log_file
            .sync_data()
            .map_err(|e| LogError::Storage(format!("syncing the log file: {e}")))?;
        self.blobs
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

/// Keeps a zero-filled spare WAL segment ready for the writer (see
/// [`prepare_spare`](super::wal::prepare_spare)), on its own thread so the writer never
/// waits for the zeros. Runs until the sender of its stop channel is dropped; a fill in
/// progress then stops at its next block, so joining the thread (the log's close) waits for
/// one block's write, not for a whole segment's writes and fsync.
pub(super) struct SpareMaker {
    pub(super) wal_dir: PathBuf,
    /// Bytes of a WAL segment.
    pub(super) segment_bytes: u64,
    /// Free bytes a spare must leave on the filesystem (`storage_min_free_bytes`).
    pub(super) min_free: u64,
}

/// How often the spare maker looks whether the writer took the spare.
const SPARE_CHECK_EVERY: Duration = Duration::from_millis(200);

impl SpareMaker {
    /// Runs the loop on its own thread until `stop`'s sender is dropped.
    pub(super) fn spawn(
        self,
        stop: std_mpsc::Receiver<()>,
    ) -> Result<std::thread::JoinHandle<()>, LogError> {
        std::thread::Builder::new()
            .name("tidewire-wal-spare".into())
            .spawn(move || loop {
                // Nothing is ever sent on the channel: it is disconnected exactly when the
                // writer stops.
                let stopping =
                    || matches!(stop.try_recv(), Err(std_mpsc::TryRecvError::Disconnected));
                match super::wal::prepare_spare(
                    &self.wal_dir,
                    self.segment_bytes,
                    self.min_free,
                    &stopping,
                ) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "preparing a WAL segment failed; retrying later")
                    }
                }
                match stop.recv_timeout(SPARE_CHECK_EVERY) {
                    Ok(()) | Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            })
            .map_err(|e| LogError::Open(format!("cannot start the WAL spare thread: {e}")))
    }
}
