//! The directory's lock: sled's exclusive `flock` on its `db` file, and how an open waits for it.
//!
//! sled takes the lock at open and keeps it for as long as any of its threads holds the file,
//! which is not the same as for as long as a handle is open: its background I/O threads hold
//! the file while they finish a write or a truncation (`set_len` and an fsync) queued before
//! the last handle dropped, and sled does not wait for them. So a close followed at once by
//! an open in the same process (a restart in place, the checkpoint after a stop, a test) can
//! find the directory still locked for as long as that fsync takes on a busy disk.
//!
//! An open therefore asks the kernel who holds the lock (`/proc/locks`, on Linux) and waits
//! by holder: a lock this process holds is sled finishing its own work and is waited out for
//! up to [`LockWait::own`]; a lock another process holds (one still exiting after a
//! `kill -9`, or a second server on the same directory) is waited for [`LockWait::other`],
//! and the error then names that process. Where the holder cannot be found out, the short
//! wait applies.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long an open waits for the directory's lock, by who holds it.
#[derive(Debug, Clone, Copy)]
pub(super) struct LockWait {
    /// A lock held by another process, or by a holder that cannot be found out.
    pub other: Duration,
    /// A lock held by this process: sled's background threads finishing after a close.
    pub own: Duration,
}

impl LockWait {
    /// For opening the log: a process that is exiting gets a moment, sled's own late release
    /// of the last handle gets as long as a slow disk's fsync can plausibly take.
    pub const OPEN: LockWait = LockWait {
        other: Duration::from_secs(2),
        own: Duration::from_secs(30),
    };
    /// For the checkpoint at a clean stop, which is worth a short wait only: without it the
    /// next start replays sled's log, and a stop must not be held up.
    pub const CHECKPOINT: LockWait = LockWait {
        other: Duration::from_secs(2),
        own: Duration::from_secs(2),
    };
}

/// Who holds a lock, as far as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// This process (sled's threads, or a handle still open here).
    This,
    /// Another process; its id when it is visible from here.
    Other(Option<u32>),
    /// Not known: no `/proc/locks`, or the lock is not found there (released meanwhile, or
    /// a file system that reports another device than `stat` does).
    Unknown,
}

/// Opens sled with `config` (whose path is `dir`), waiting while the directory's lock is
/// held, as long as `wait` allows for its holder; any other error is returned at once. The
/// error for a lock still held says who holds it.
pub(super) fn open_db(config: &sled::Config, dir: &Path, wait: LockWait) -> sled::Result<sled::Db> {
    let started = Instant::now();
    let db_file = dir.join("db");
    loop {
        let err = match config.open() {
            // sled reports a held lock only in its message (an `Other` I/O error).
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => e,
            other => return other,
        };
        let holder = holder_of(&db_file);
        let patience = match holder {
            Holder::This => wait.own,
            Holder::Other(_) | Holder::Unknown => wait.other,
        };
        if started.elapsed() >= patience {
            let who = match holder {
                Holder::This => "held by this process (a log still open here)".to_string(),
                Holder::Other(Some(pid)) => format!(
                    "held by process {pid} (another tidewire on this directory, or one still \
                     exiting)"
                ),
                Holder::Other(None) => "held by another process".to_string(),
                Holder::Unknown => "held by another handle".to_string(),
            };
            return Err(sled::Error::Io(std::io::Error::other(format!(
                "{err}; {who}"
            ))));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Who holds the `flock` on `file`, from `/proc/locks`.
#[cfg(target_os = "linux")]
fn holder_of(file: &Path) -> Holder {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(locks)) = (
        std::fs::metadata(file),
        std::fs::read_to_string("/proc/locks"),
    ) else {
        return Holder::Unknown;
    };
    classify(
        &flock_holders(&locks, dev_major_minor(meta.dev()), meta.ino()),
        std::process::id(),
    )
}

/// Who holds the lock: not found out off Linux.
#[cfg(not(target_os = "linux"))]
fn holder_of(_file: &Path) -> Holder {
    Holder::Unknown
}

/// The holder, given the process ids `/proc/locks` shows for the lock (0 for a process not
/// visible from this one's pid namespace).
fn classify(pids: &[u32], own: u32) -> Holder {
    match pids {
        [] => Holder::Unknown,
        _ if pids.iter().all(|p| *p == own) => Holder::This,
        _ => Holder::Other(pids.iter().copied().find(|p| *p != own && *p != 0)),
    }
}

/// A `stat` device number as the kernel's major and minor numbers (glibc's encoding).
fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// The process ids holding (not waiting for) a `flock` on the inode `ino` of device `dev`,
/// from the text of `/proc/locks`. Lines it does not understand are skipped. Pure.
fn flock_holders(locks: &str, dev: (u64, u64), ino: u64) -> Vec<u32> {
    locks
        .lines()
        .filter_map(|line| {
            // `1: FLOCK  ADVISORY  WRITE 4062 08:01:1234567 0 EOF`; a waiter has `->` after
            // the number.
            let mut fields = line.split_whitespace().skip(1);
            if fields.next()? != "FLOCK" {
                return None;
            }
            let pid: u32 = fields.nth(2)?.parse().ok()?;
            let mut place = fields.next()?.split(':');
            let major = u64::from_str_radix(place.next()?, 16).ok()?;
            let minor = u64::from_str_radix(place.next()?, 16).ok()?;
            let inode: u64 = place.next()?.parse().ok()?;
            ((major, minor) == dev && inode == ino).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;

    use super::*;

    /// A sled directory in `tmp`, created and closed. sled may keep its lock for a moment
    /// after the drop: whoever locks next waits for it.
    fn sled_dir(tmp: &tempfile::TempDir) -> (sled::Config, std::path::PathBuf) {
        let dir = tmp.path().join("db");
        let config = sled::Config::new().path(&dir);
        drop(open_db(&config, &dir, LockWait::OPEN).expect("create"));
        (config, dir)
    }

    /// Takes the exclusive `flock` sled takes, on a descriptor of this process's own.
    fn flock(dir: &Path) -> std::fs::File {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("db"))
            .expect("open db");
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            assert!(Instant::now() < deadline, "the lock never came free");
            std::thread::sleep(Duration::from_millis(5));
        }
        file
    }

    #[test]
    fn an_open_waits_for_a_lock_its_last_holder_releases_moments_later() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let config = sled::Config::new().path(&dir);
        let held = config.open().expect("first open");
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let waiter = {
            let (config, dir) = (config.clone(), dir.clone());
            std::thread::spawn(move || {
                let got = open_db(&config, &dir, LockWait::OPEN);
                let _ = opened_tx.send(());
                got.map(drop)
            })
        };
        // The waiter finds the lock held and keeps trying instead of failing.
        assert!(
            opened_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the open returned while the lock was held"
        );
        drop(held);
        waiter
            .join()
            .expect("waiter thread")
            .expect("the open after the holder let go");
    }

    /// What sled's I/O threads do after the last handle drops, and what made a restart in
    /// place fail when the open gave up after the short wait: this process keeps the lock
    /// for longer than another process would be waited for.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_lock_this_process_holds_is_waited_out_past_the_wait_for_another_process() {
        let tmp = tempfile::tempdir().unwrap();
        let (config, dir) = sled_dir(&tmp);
        let wait = LockWait {
            other: Duration::from_millis(300),
            own: Duration::from_secs(20),
        };
        let held = flock(&dir);
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(wait.other + Duration::from_millis(700));
            drop(held);
        });
        let started = Instant::now();
        let db = open_db(&config, &dir, wait).expect("opens once this process lets go");
        assert!(
            started.elapsed() >= wait.other + Duration::from_millis(500),
            "opened while the lock was held"
        );
        drop(db);
        releaser.join().expect("releaser");
    }

    #[test]
    fn an_open_of_a_directory_a_live_handle_holds_fails_after_the_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let (config, dir) = sled_dir(&tmp);
        // Through open_db: sled may still hold the lock from sled_dir's last drop.
        let _held = open_db(&config, &dir, LockWait::OPEN).expect("first open");
        let wait = LockWait {
            other: Duration::from_millis(200),
            own: Duration::from_millis(200),
        };
        let started = Instant::now();
        let err = open_db(&config, &dir, wait).expect_err("the lock is held");
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
        if cfg!(target_os = "linux") {
            assert!(err.to_string().contains("held by this process"), "{err}");
        }
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// A second server on the same directory, or one still exiting: the short wait, then an
    /// error that names the process, so an operator knows what to stop.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_open_of_a_directory_another_process_holds_fails_after_the_short_wait_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (config, dir) = sled_dir(&tmp);
        let mut holder = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import fcntl, sys, time\n\
                 f = open(sys.argv[1], 'r+b')\n\
                 fcntl.flock(f, fcntl.LOCK_EX)\n\
                 print('locked', flush=True)\n\
                 time.sleep(60)\n",
            )
            .arg(dir.join("db"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (installed by .ci/run)");
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the holder's word");
        assert_eq!(line.trim(), "locked");
        let wait = LockWait {
            other: Duration::from_millis(300),
            own: Duration::from_secs(20),
        };
        let started = Instant::now();
        let got = open_db(&config, &dir, wait);
        let took = started.elapsed();
        let _ = holder.kill();
        let _ = holder.wait();
        let err = got.expect_err("another process holds the lock");
        assert!(
            err.to_string()
                .contains(&format!("held by process {}", holder.id())),
            "{err}"
        );
        assert!(took >= wait.other, "gave up before the wait: {took:?}");
        assert!(
            took < Duration::from_secs(10),
            "waited as if this process held it: {took:?}"
        );
    }

    const LOCKS: &str = "\
1: FLOCK  ADVISORY  WRITE 4062 fd:01:1234567 0 EOF
1: -> FLOCK  ADVISORY  WRITE 4070 fd:01:1234567 0 EOF
2: POSIX  ADVISORY  WRITE 4063 fd:01:1234567 0 EOF
3: FLOCK  ADVISORY  WRITE 4064 fd:01:7654321 0 EOF
4: FLOCK  ADVISORY  WRITE 4065 08:01:1234567 0 EOF
5: OFDLCK ADVISORY  READ  -1 fd:01:1234567 0 EOF
garbage
";

    #[test]
    fn only_the_flock_holders_of_that_inode_on_that_device_are_found() {
        assert_eq!(flock_holders(LOCKS, (0xfd, 1), 1234567), [4062]);
        assert_eq!(flock_holders(LOCKS, (0xfd, 1), 7654321), [4064]);
        assert_eq!(flock_holders(LOCKS, (8, 1), 1234567), [4065]);
        assert!(flock_holders(LOCKS, (0xfd, 2), 1234567).is_empty());
        assert!(flock_holders("", (0xfd, 1), 1234567).is_empty());
    }

    #[test]
    fn holders_are_this_process_another_or_unknown() {
        assert_eq!(classify(&[7], 7), Holder::This);
        assert_eq!(classify(&[8], 7), Holder::Other(Some(8)));
        assert_eq!(classify(&[7, 8], 7), Holder::Other(Some(8)));
        assert_eq!(classify(&[0], 7), Holder::Other(None));
        assert_eq!(classify(&[], 7), Holder::Unknown);
    }

    /// glibc's `makedev`.
    fn makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
    }

    #[test]
    fn device_numbers_split_as_the_kernel_prints_them() {
        assert_eq!(dev_major_minor(0xfd01), (253, 1));
        for (major, minor) in [(8, 1), (259, 0x12345), (0x1234, 0xabcdef)] {
            assert_eq!(dev_major_minor(makedev(major, minor)), (major, minor));
        }
    }
}
