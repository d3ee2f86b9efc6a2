//! CPU and memory of processes from Linux's `/proc`: the bench's own CPU (so a run where the
//! tool was the bottleneck shows it), the server's CPU, and the server's resident memory.

use std::time::Instant;

use super::report::Report;
use super::{fail, Error};

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on every Linux ABI).
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of `pid` (`None`: this process), in clock ticks.
pub(crate) fn cpu_ticks(pid: Option<u32>) -> Result<u64, Error> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(&path).map_err(|e| fail(format!("{path}: {e}")))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| fail(format!("{path}: unexpected format")))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64, Error> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| fail(format!("{path}: no field {i}")))
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    Ok(field(11)? + field(12)?)
}

/// Resident memory of `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn rss_kib(pid: u32) -> Result<u64, Error> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| fail(format!("{path}: {e}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| fail(format!("{path}: no VmRSS")))
}

/// Proportional resident memory of `pid` in KiB (`Pss` of `/proc/<pid>/smaps_rollup`): shared
/// pages divided among the processes sharing them, so a sum over nginx workers counts Nchan's
/// shared memory once. `None` when the kernel does not offer it.
pub(crate) fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Memory of a set of processes at one moment, summed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// Sum of VmRSS, KiB.
    pub(crate) rss_kib: u64,
    /// Sum of Pss, KiB, when every process offered it.
    pub(crate) pss_kib: Option<u64>,
}

impl Memory {
    /// Reads the memory of every process in `pids`.
    pub(crate) fn of(pids: &[u32]) -> Result<Memory, Error> {
        let mut rss = 0;
        let mut pss = Some(0);
        for &p in pids {
            rss += rss_kib(p)?;
            pss = pss.zip(pss_kib(p)).map(|(a, b)| a + b);
        }
        Ok(Memory {
            rss_kib: rss,
            pss_kib: pss,
        })
    }
}

/// CPU used by this process and by the server's processes from a start to a finish.
pub(crate) struct CpuMeter {
    started: Instant,
    own: u64,
    pids: Vec<u32>,
    server: Option<u64>,
}

impl CpuMeter {
    /// Starts measuring this process and, if any, the processes `pids`.
    pub(crate) fn start(pids: &[u32]) -> Result<CpuMeter, Error> {
        Ok(CpuMeter {
            started: Instant::now(),
            own: cpu_ticks(None)?,
            pids: pids.to_vec(),
            server: Self::server_ticks(pids)?,
        })
    }

    fn server_ticks(pids: &[u32]) -> Result<Option<u64>, Error> {
        if pids.is_empty() {
            return Ok(None);
        }
        let mut sum = 0;
        for &p in pids {
            sum += cpu_ticks(Some(p))?;
        }
        Ok(Some(sum))
    }

    /// The server's CPU seconds since the start (None without `--pid`, or when a process is
    /// gone).
    pub(crate) fn server_secs(&self) -> Option<f64> {
        let now = Self::server_ticks(&self.pids).ok().flatten()?;
        Some(now.saturating_sub(self.server?) as f64 / TICKS_PER_SEC)
    }

    /// Adds `tool_cpu_s`, `tool_cpu_pct` (of one core, over the wall time since the start) and,
    /// with `--pid`, `server_cpu_s` and `server_cpu_pct` to `report`.
    pub(crate) fn finish(&self, report: &mut Report) {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        if let Ok(now) = cpu_ticks(None) {
            let secs = now.saturating_sub(self.own) as f64 / TICKS_PER_SEC;
            report.put_f("tool_cpu_s", "load tool CPU (s)", secs, 2);
            report.put_f(
                "tool_cpu_pct",
                "load tool CPU (% of one core)",
                100.0 * secs / wall,
                1,
            );
        }
        if let Some(secs) = self.server_secs() {
            report.put_f("server_cpu_s", "server CPU (s, --pid)", secs, 2);
            report.put_f(
                "server_cpu_pct",
                "server CPU (% of one core)",
                100.0 * secs / wall,
                1,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_times_and_resident_memory() {
        assert!(cpu_ticks(None).is_ok());
        let me = std::process::id();
        assert!(rss_kib(me).expect("VmRSS") > 0);
        let m = Memory::of(&[me, me]).expect("memory");
        assert!(m.rss_kib > 0);
        assert!(rss_kib(u32::MAX).is_err());
    }
}
