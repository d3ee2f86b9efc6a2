//! `tidewire bench`: a load generator for a running server, like `nats bench` or
//! `redis-benchmark`, so users can measure their own deployment and compare it with nginx +
//! Nchan on the same machine (`benches/compare.sh`).
//!
//! Four modes, each bounded in count and time and aimed at loopback unless told otherwise:
//!
//! - [`publish`](PublishArgs): N connections publishing as fast as the server acknowledges
//!   (HTTP or WebSocket; event size, batch size, JSON/NDJSON/MessagePack, gzip).
//! - [`fanout`](FanoutArgs): N SSE / WebSocket / long-poll subscribers of one topic while
//!   publishers offer a fixed rate: delivered events/s, lost events and publish-to-receive
//!   latency, from the `"ts":<unix µs>` the publisher puts in each event's data.
//! - [`idle`](IdleArgs): N idle subscriptions held open; the server's resident memory growth per
//!   connection, read from `/proc/<pid>/status` (summed over several `--pid`s: nginx workers).
//! - [`resume`](ResumeArgs): N events published, then one subscriber replaying them from the
//!   start: events/s.
//!
//! Each prints a table, or with `--json` one JSON object, and reports the CPU it used itself
//! (`/proc/self/stat`), so a run where the tool was the bottleneck can be recognised, and the
//! server's CPU when `--pid` names it. Progress goes to stderr every 2 s on runs over 5 s.
//!
//! Where each piece lives: [`target`] (server flavours and URL templates), `wire` (the client
//! side of each transport and the scanners that find `"ts":` without parsing envelopes),
//! `payload` (event data and publish bodies), `report` (the table, percentiles, progress),
//! `procfs` (CPU and memory of processes), and one module per mode.

mod fanout;
mod idle;
mod payload;
mod procfs;
mod publish;
mod report;
mod resume;
pub mod target;
mod wire;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};

pub use fanout::FanoutArgs;
pub use idle::IdleArgs;
pub use publish::PublishArgs;
pub use resume::ResumeArgs;
use target::Target;

/// The longest `--duration`, `--hold` or `--grace` any mode accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// The most connections (publishers, subscribers, idle subscriptions) any mode opens.
pub const MAX_CONNECTIONS: u64 = 50_000;
/// The most events `resume` publishes (topic plus noise) or `publish --events` sends.
pub const MAX_EVENTS: u64 = 100_000_000;
/// The highest publish rate `fanout` and `idle` offer, events per second.
pub const MAX_RATE: u64 = 1_000_000;

/// What went wrong in a bench run (connecting, a refused request, a bad answer, an option).
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// An [`Error`] carrying `msg`.
pub(crate) fn fail(msg: impl Into<String>) -> Error {
    msg.into().into()
}

/// Flags of `tidewire bench`.
#[derive(Debug, Args)]
#[command(
    about = "Load generator for a running server (tidewire, or nginx + Nchan for comparison)",
    long_about = "Load generator for a running server: tidewire, or nginx with the Nchan module \
                  for comparison (--target nchan). Every run is bounded in time and count and \
                  aims at 127.0.0.1:7700 unless told otherwise. Prints a table, or one JSON \
                  object with --json; progress on stderr every 2 s for runs over 5 s."
)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub mode: Mode,
}

/// The bench modes.
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Publish from N connections as fast as acknowledgements come: requests/s, events/s and
    /// request latency p50/p99/max.
    Publish(PublishArgs),
    /// N subscribers of one topic (SSE, WebSocket or long-poll) while publishers offer a fixed
    /// rate: delivered events/s, lost events, publish-to-receive latency p50/p99/max.
    Fanout(FanoutArgs),
    /// Hold N idle subscriptions open and report the server's resident memory growth per
    /// connection (needs --pid of the server's processes).
    Idle(IdleArgs),
    /// Publish N events (optionally behind M events of other topics), then time one
    /// subscriber replaying them from the start: events/s.
    Resume(ResumeArgs),
}

/// Flags every mode takes: where the server is, what it is, and how to report.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server and report")]
pub struct Common {
    /// host:port of the server (the default URLs of --target are relative to it).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub addr: String,
    /// The server's flavour: picks the default URLs and the wire format of publishes and
    /// deliveries.
    #[arg(long, value_enum, default_value_t = Target::Tidewire)]
    pub target: Target,
    /// Publish URL template, `{topic}` replaced: a path on --addr (`/pub?id={topic}`) or a full
    /// `http://host:port/…` (or `ws://…` with --transport ws) URL.
    #[arg(long, value_name = "TEMPLATE")]
    pub pub_url: Option<String>,
    /// Live subscribe URL template (SSE, WebSocket or long-poll per --transport), `{topic}`
    /// replaced.
    #[arg(long, value_name = "TEMPLATE")]
    pub sub_url: Option<String>,
    /// Replay-from-the-start URL template (`resume`), `{topic}` replaced.
    #[arg(long, value_name = "TEMPLATE")]
    pub replay_url: Option<String>,
    /// PID of a server process whose CPU (and, for `idle`, resident memory) to report;
    /// repeatable or comma-separated, summed (nginx: its worker processes). Local servers only.
    #[arg(long = "pid", value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Bearer token sent with every publish and subscribe (see `tidewire token`).
    #[arg(long, env = "TIDEWIRE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs one bench mode to completion and prints its report on stdout.
///
/// Guarantees: every connection it opens goes to the addresses given (127.0.0.1:7700 by
/// default), every wait is bounded ([`MAX_DURATION`] per phase, plus fixed grace periods), and
/// it never panics on what the server sends: a refused or malformed answer is counted as an
/// error in the report, or ends the run with a message.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    let result = match args.mode {
        Mode::Publish(a) => publish::run(a).await,
        Mode::Fanout(a) => fanout::run(a).await,
        Mode::Idle(a) => idle::run(a).await,
        Mode::Resume(a) => resume::run(a).await,
    };
    result.map_err(|e| format!("bench: {e}"))
}

/// Parses a duration given as seconds (`10`, `2.5`) or with a unit (`500ms`, `10s`, `2m`),
/// and refuses more than [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let secs: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use 10, 10s, 500ms or 2m"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    let d = Duration::from_secs_f64(secs * scale);
    if d > MAX_DURATION {
        return Err(format!(
            "{s:?} is longer than the {} s a bench run may last",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(d)
}

/// The wall clock in microseconds since the Unix epoch: the `ts` publishers stamp and
/// subscribers subtract.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A topic name unique to this run (`bench/<what>-<unix µs>`), so runs against one server
/// never see each other's events.
pub(crate) fn run_topic(what: &str) -> String {
    format!("bench/{what}-{}", now_us())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_or_without_units_and_are_capped() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("601").is_err());
        assert!(parse_duration("11m").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
