//! Makes sled's blob files as durable as its main log.
//!
//! sled 0.34 writes a page too large for its log segments (a leaf holding a few events of
//! several KiB each) to its own file under `<data dir>/blobs/`, named by its log sequence
//! number, and `flush()` never fsyncs those files (its main log it only writes back with
//! sync_file_range, which the writer follows with an fdatasync). An event in
//! such a page would be acknowledged and then lost on power failure. The writer therefore
//! calls [`BlobSync::sync`] after every flush and before acknowledging, so "ack = durable"
//! holds for events of any size.

use std::io;
use std::path::PathBuf;

/// fsyncs the blob files sled wrote since the last call.
pub struct BlobSync {
    dir: PathBuf,
    /// Highest blob sequence number already synced (`None`: none yet).
    synced_through: Option<u64>,
}

impl BlobSync {
    /// Tracks the blobs of the sled database in `data_dir`. Nothing is synced yet, so the
    /// first [`BlobSync::sync`] covers blobs left by an earlier run too.
    pub fn new(data_dir: PathBuf) -> Self {
        BlobSync {
            dir: data_dir.join("blobs"),
            synced_through: None,
        }
    }

    /// fsyncs every blob file newer than those synced before, then the directory that
    /// names them. Returns how many files it synced (0 when there were none, the usual case).
    pub fn sync(&mut self) -> io::Result<u64> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        let due = blobs_to_sync(names, self.synced_through);
        if due.is_empty() {
            return Ok(0);
        }
        let mut synced = 0;
        for (_, name) in &due {
            match std::fs::File::open(self.dir.join(name)) {
                Ok(f) => {
                    f.sync_all()?;
                    synced += 1;
                }
                // sled removed it meanwhile (garbage collection): nothing left to make durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.synced_through = due
            .iter()
            .map(|(lsn, _)| *lsn)
            .max()
            .or(self.synced_through);
        Ok(synced)
    }
}

/// The blob files among `names` that still need an fsync, given the highest sequence number
/// already synced, in sequence order. Names that are not sequence numbers are not sled's blobs.
pub fn blobs_to_sync(names: Vec<String>, synced_through: Option<u64>) -> Vec<(u64, String)> {
    let mut due: Vec<(u64, String)> = names
        .into_iter()
        .filter_map(|n| Some((n.parse::<u64>().ok()?, n)))
        .filter(|(lsn, _)| synced_through.is_none_or(|s| *lsn > s))
        .collect();
    due.sort_unstable();
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ns: &[&str]) -> Vec<String> {
        ns.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_blobs_newer_than_the_last_synced_are_due() {
        let all = names(&["300", "12", "4096", "tmp", ".x"]);
        assert_eq!(
            blobs_to_sync(all.clone(), None),
            vec![
                (12, "12".into()),
                (300, "300".into()),
                (4096, "4096".into())
            ]
        );
        assert_eq!(
            blobs_to_sync(all.clone(), Some(300)),
            vec![(4096, "4096".into())]
        );
        assert!(blobs_to_sync(all, Some(4096)).is_empty());
    }

    #[test]
    fn sync_covers_new_files_once_and_tolerates_a_missing_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut sync = BlobSync::new(tmp.path().to_path_buf());
        assert_eq!(sync.sync().expect("no blobs dir"), 0);
        std::fs::create_dir(tmp.path().join("blobs")).expect("mkdir");
        std::fs::write(tmp.path().join("blobs/17"), b"x").expect("write");
        std::fs::write(tmp.path().join("blobs/5"), b"y").expect("write");
        assert_eq!(sync.sync().expect("sync"), 2);
        assert_eq!(sync.sync().expect("sync"), 0, "already synced");
        std::fs::write(tmp.path().join("blobs/40"), b"z").expect("write");
        assert_eq!(sync.sync().expect("sync"), 1);
    }
}
