//! Small files replaced atomically and durably: the log's marks and checkpoints, and the
//! webhooks' state. A crash leaves the old content or the new, never a mix or nothing.

use std::io::Write;
use std::path::Path;

/// Replaces `dir/name` with `bytes`: writes a temporary file, fsyncs it, renames it over the
/// old one and fsyncs the directory, so once this returns the new content survives a crash
/// of the process or the machine.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Removes `dir/name` (absent is fine) and fsyncs the directory, so the removal survives a
/// crash.
pub fn remove_file(dir: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(name)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
