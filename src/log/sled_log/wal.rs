//! The write-ahead log in front of sled: append-only segment files under `<data dir>/wal/`,
//! one framed record per group commit (see [`wal_record`](crate::log::wal_record)).
//!
//! Guarantees:
//! - a record is appended with one write; [`Wal::sync`] (one `fdatasync`) makes every record
//!   appended before it durable, and acknowledging waits for it;
//! - a segment is named by the first id it holds (`<first id, 20 digits>.wal`); segments hold
//!   increasing ids and a segment is never written again once the next one exists;
//! - a segment is deleted only when the checkpoint (sled durable) covers every id in it.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::LogError;

/// Name of the WAL directory inside the data directory.
pub(super) const WAL_DIR: &str = "wal";
const SUFFIX: &str = ".wal";
/// The next segment, zero-filled ahead by the spare maker (see [`prepare_spare`]).
const SPARE: &str = "spare";
/// A spare being filled.
const SPARE_TMP: &str = "spare.tmp";

/// Zero-fills a spare segment of `bytes` in `wal_dir` unless one is there, and syncs it:
/// the writer renames it into place as its next segment. Only zeros are ever written to a
/// spare, so one cut short by a crash is as good as a shorter one. Not while the filesystem
/// would keep less than `min_free` bytes free after it (the writer then starts its next
/// segment as a growing file); a spare that could not be finished is removed.
///
/// `stopping` is asked before each block of zeros: once it says true the fill is abandoned
/// (the partial file removed, nothing synced) and the error is [`std::io::ErrorKind::Interrupted`].
/// Why: the log's close waits for the spare maker, and a spare is only ever a head start for
/// a segment that a stopping log will not write; finishing it cost a whole segment's writes
/// and fsync on every stop (seconds on a slow or busy disk, past any shutdown deadline).
pub(super) fn prepare_spare(
    wal_dir: &Path,
    bytes: u64,
    min_free: u64,
    stopping: &dyn Fn() -> bool,
) -> std::io::Result<bool> {
    let spare = wal_dir.join(SPARE);
    if spare.exists() {
        return Ok(false);
    }
    if fs4::available_space(wal_dir).is_ok_and(|free| free < bytes.saturating_add(min_free)) {
        return Ok(false);
    }
    let tmp = wal_dir.join(SPARE_TMP);
    let filled = zero_fill(&tmp, bytes, stopping).and_then(|()| std::fs::rename(&tmp, &spare));
    if filled.is_err() {
        // A half-filled spare would only hold on to the room that ran out (or, abandoned, to
        // room nobody is going to use).
        let _ = std::fs::remove_file(&tmp);
    }
    filled.map(|()| true)
}

/// The zeros a spare is filled with. Static, not allocated: a freed 1 MiB buffer would raise
/// glibc's mmap threshold (see the writer's `RECORD_CAPACITY`).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Writes `bytes` zeros to a new file at `path`, synced; stops with `Interrupted` before the
/// next block (and before the sync) once `stopping` says so.
fn zero_fill(path: &Path, bytes: u64, stopping: &dyn Fn() -> bool) -> std::io::Result<()> {
    let abandoned = || {
        std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "the log is closing: spare segment abandoned",
        )
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let mut at = 0;
    while at < bytes {
        if stopping() {
            return Err(abandoned());
        }
        let n = ZEROS.len().min((bytes - at) as usize);
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    if stopping() {
        return Err(abandoned());
    }
    file.sync_data()
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SUFFIX}"))
}

/// The appending side of the WAL, owned by the writer thread.
pub(super) struct Wal {
    dir: PathBuf,
    /// The first ids of the segments on disk, the open one included (the last).
    segments: BTreeSet<u64>,
    /// The segment being appended to, with its length.
    open: Option<(File, u64)>,
    /// A segment is closed, and the next one started, once it holds this many bytes.
    segment_bytes: u64,
    /// Whether anything was appended since the last sync.
    dirty: bool,
    /// Bytes appended since the last [`Wal::take_appended`].
    appended: u64,
    /// A failed write could not be undone: the open segment ends torn, and nothing more is
    /// appended until the segments are deleted (the writer flushes sled instead).
    broken: bool,
}

/// What the WAL directory held when the log opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WalRecovery {
    /// Segments found.
    pub segments: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Records that read back.
    pub records: u64,
    /// Records above what sled held, written into it again.
    pub replayed_records: u64,
    /// Events of those records.
    pub replayed_events: u64,
    /// Bytes of an unfinished record at the end of the newest segment, dropped (never
    /// acknowledged).
    pub torn_bytes: u64,
}

impl Wal {
    /// Opens the WAL directory of `data_dir` (creating it), without reading any segment.
    pub(super) fn open(data_dir: &Path, segment_bytes: u64) -> Result<Wal, LogError> {
        let dir = data_dir.join(WAL_DIR);
        let open_err = |e: std::io::Error| LogError::Open(format!("{}: {e}", dir.display()));
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(open_err)?;
            File::open(data_dir)
                .and_then(|d| d.sync_all())
                .map_err(open_err)?;
        }
        let mut segments = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).map_err(open_err)? {
            let entry = entry.map_err(open_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(first) = name
                .strip_suffix(SUFFIX)
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.insert(first);
        }
        Ok(Wal {
            segments,
            dir,
            open: None,
            segment_bytes,
            dirty: false,
            appended: 0,
            broken: false,
        })
    }

    /// The WAL directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The paths of the segments on disk, oldest first.
    pub(super) fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments
            .iter()
            .map(|f| segment_path(&self.dir, *f))
            .collect()
    }

    /// Deletes the closed segments wholly at or below `through`. Returns how many.
    pub(super) fn delete_through(&mut self, through: u64) -> u64 {
        self.delete(through, false)
    }

    /// Deletes every segment whose ids all lie at or below `through`; the newest is kept
    /// (the writer may still append to it) unless `including_open`. Returns how many.
    fn delete(&mut self, through: u64, including_open: bool) -> u64 {
        let firsts: Vec<u64> = self.segments.iter().copied().collect();
        let mut deleted = 0;
        for (i, first) in firsts.iter().enumerate() {
            // A segment ends where the next begins; the newest is covered only when asked.
            let covered = match firsts.get(i + 1) {
                Some(next) => next.saturating_sub(1) <= through,
                None => including_open,
            };
            if !covered {
                break;
            }
            match std::fs::remove_file(segment_path(&self.dir, *first)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, "deleting a WAL segment failed; retrying later");
                    break;
                }
            }
            self.segments.remove(first);
            deleted += 1;
        }
        deleted
    }

    /// Appends one record holding the ids from `first` on. Starts a new segment first when
    /// there is none open or the open one is full. On an error nothing of the record counts:
    /// the segment is cut back to its length before it (or, if even that fails, closed so the
    /// damage stays its torn tail).
    pub(super) fn append(&mut self, first: u64, record: &[u8]) -> Result<(), LogError> {
        if self.broken {
            return Err(LogError::Storage(
                "the WAL could not undo a failed write; it is unused until restart".into(),
            ));
        }
        let full = self
            .open
            .as_ref()
            .is_some_and(|(_, len)| *len >= self.segment_bytes);
        if self.open.is_none() || full {
            self.start_segment(first)?;
        }
        let Some((file, len)) = self.open.as_mut() else {
            return Err(LogError::Storage("no WAL segment is open".into()));
        };
        if let Err(e) = file.write_all_at(record, *len) {
            let undone = file.set_len(*len).is_ok();
            if !undone {
                // Anything appended after the damage, here or in a next segment, would put
                // it before acknowledged data: the torn record stays the WAL's last.
                self.broken = true;
            }
            return Err(LogError::Storage(format!("writing the WAL: {e}")));
        }
        *len += record.len() as u64;
        self.dirty = true;
        self.appended += record.len() as u64;
        Ok(())
    }

    /// Closes the open segment (synced) and creates the next one, durably named.
    fn start_segment(&mut self, first: u64) -> Result<(), LogError> {
        let err = |e: std::io::Error| LogError::Storage(format!("starting a WAL segment: {e}"));
        if let Some((file, _)) = &self.open {
            // Its records must be durable before any record of the next segment is: the
            // torn-tail rule holds only for the newest segment.
            if self.dirty {
                file.sync_data().map_err(err)?;
                self.dirty = false;
            }
        }
        self.open = None;
        let path = segment_path(&self.dir, first);
        // The spare zero-filled ahead (see [`prepare_spare`]), when there is one: each sync of a record
        // then writes data only, where appending to a growing file makes every fdatasync
        // commit the file's new size too. Without one, a growing file does (slower, as safe).
        let file = match std::fs::rename(self.dir.join(SPARE), &path) {
            Ok(()) => OpenOptions::new().write(true).open(&path).map_err(err)?,
            Err(_) => OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .map_err(err)?,
        };
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        self.segments.insert(first);
        self.open = Some((file, 0));
        Ok(())
    }

    /// Makes every record appended so far durable (one `fdatasync`; nothing when nothing
    /// was appended since the last sync).
    pub(super) fn sync(&mut self) -> Result<(), LogError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some((file, _)) = &self.open {
            file.sync_data()
                .map_err(|e| LogError::Storage(format!("syncing the WAL: {e}")))?;
        }
        self.dirty = false;
        Ok(())
    }

    /// Bytes appended since the last call.
    pub(super) fn take_appended(&mut self) -> u64 {
        std::mem::take(&mut self.appended)
    }

    /// Deletes every segment, the open one too: sled durably holds everything they held.
    pub(super) fn delete_all(&mut self) -> u64 {
        self.open = None;
        self.dirty = false;
        self.broken = false;
        self.delete(u64::MAX, true)
    }
}
