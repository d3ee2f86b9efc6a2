//! The durable high-water mark: a small file beside sled's own (`tidewire.mark`) recording an id
//! every event up to which is known durable (written after the flush that covered it, at most
//! about once a second, and at shutdown).
//!
//! sled recovers a damaged log by stopping at the first record it cannot read, and opens what
//! came before as if nothing were missing. Comparing what it recovered with this mark turns
//! that silent loss into a refusal to start, before tidewire writes anything.

use std::path::Path;

use super::LogError;

/// Name of the mark file in the data directory.
pub(super) const MARK_FILE: &str = "tidewire.mark";
const PREFIX: &str = "tidewire-log durable-through ";

/// The recorded mark, if the directory has one.
pub(super) fn read(dir: &Path) -> Result<Option<u64>, LogError> {
    let path = dir.join(MARK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::Open(format!("{}: {e}", path.display()))),
    };
    text.trim()
        .strip_prefix(PREFIX)
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| LogError::Open(format!("{}: not a tidewire mark", path.display())))
}

/// Records, durably, that every event up to `through` is stored (write, fsync, rename, fsync
/// the directory, so a crash leaves the old mark or the new one).
pub(super) fn write(dir: &Path, through: u64) -> std::io::Result<()> {
    replace_durably(dir, MARK_FILE, &format!("{PREFIX}{through}\n"))
}

/// Replaces `dir/name` with `text` durably (see [`crate::durable::replace_file`]).
pub(super) fn replace_durably(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    crate::durable::replace_file(dir, name, text.as_bytes())
}

/// Refuses a log that recovered less than the mark says was durable.
pub(super) fn check(dir: &Path, mark: Option<u64>, recovered: u64) -> Result<(), LogError> {
    match mark {
        Some(m) if m > recovered => Err(LogError::Open(format!(
            "{}: the log recovers events only up to id {recovered}, but {MARK_FILE} records \
             that every event up to {m} was durable: sled's files are damaged and it dropped \
             what it could not read. Refusing to start, so nothing more is written: restore \
             the directory from a backup (tidewire export/import), or move it away to start \
             afresh",
            dir.display()
        ))),
        _ => Ok(()),
    }
}
