//! Operator commands on a data directory: `inspect`, `verify`, `export` and `import`. They
//! open the log without serving it (sled locks the directory, so a running server's log is
//! refused with a hint), print for people (or JSON for scripts), and close it cleanly.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::envelope::EventId;
use crate::export::{self, ExportError, Format};
use crate::hub::Hub;
use crate::log::retention::RetentionPolicy;
use crate::log::{
    EventLog, FsyncPolicy, ImportEvent, LogOptions, SledLog, SpaceLimits, WalRecovery,
};
use crate::metrics::Metrics;
use crate::topic::{Pattern, PatternSet};

/// Events written per import batch (each one atomic and flushed).
const IMPORT_BATCH: usize = 10_000;

/// Opens the log in `dir` for an operator command: nothing is removed by retention while it
/// is open, and a directory in use by a running server is refused with a hint.
fn open(dir: &Path, create: bool) -> Result<Arc<SledLog>, String> {
    if !create && !dir.exists() {
        return Err(format!("{}: no such data directory", dir.display()));
    }
    let defaults = Config::default();
    let opts = LogOptions {
        dir: dir.to_path_buf(),
        cache_bytes: defaults.cache_bytes,
        dedupe: Default::default(),
        fsync: FsyncPolicy::Always,
        retention: RetentionPolicy::keep_everything(),
        space: SpaceLimits::default(),
        checkpoint_every: Duration::from_millis(defaults.storage_checkpoint_ms),
        wal_segment_bytes: defaults.storage_wal_segment_bytes,
    };
    SledLog::open(&opts, Hub::new(4), Metrics::new()).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("lock") || msg.contains("Resource temporarily unavailable") {
            format!(
                "{msg}\n(is a server running on this directory? stop it, or use \
                 `tidewire export --server URL` for an online backup)"
            )
        } else {
            msg
        }
    })
}

async fn close(log: Arc<SledLog>) -> Result<(), String> {
    log.close().await.map_err(|e| e.to_string())
}

/// `tidewire inspect`: prints what the log holds.
pub async fn inspect(dir: &Path, json: bool) -> Result<(), String> {
    let log = open(dir, false)?;
    let i = log.inspect().map_err(|e| e.to_string())?;
    close(log).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&i).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!("format              {}", i.format);
    println!("events retained     {}", i.events);
    match i.first_id {
        Some(f) => println!("ids                 {f} ..= {}", i.last_id),
        None => println!("ids                 none retained (last id {})", i.last_id),
    }
    println!(
        "topics              {} ({} trimmed by retention)",
        i.topics, i.trimmed_topics
    );
    println!("payload bytes       {}", i.bytes);
    println!("disk bytes          {}", i.disk_bytes);
    if let Some(a) = i.space_amplification {
        println!("space amplification {a:.2}x (disk bytes / payload bytes)");
    }
    println!("chunks              {}", i.chunks);
    println!("index entries       {}", i.index_entries);
    println!("remembered msg_ids  {}", i.dedupe_entries);
    print_wal(&i.wal);
    if !i.largest_topics.is_empty() {
        println!("\nlargest topics        events        bytes   first id    last id");
        for t in &i.largest_topics {
            println!(
                "  {:<20} {:>8} {:>12} {:>10} {:>10}",
                t.topic,
                t.count,
                t.bytes.unwrap_or(0),
                t.first_id
                    .map(|f| f.to_string())
                    .unwrap_or_else(|| "-".into()),
                t.last_id
            );
        }
    }
    Ok(())
}

/// Prints what the write-ahead log held when the log opened.
fn print_wal(w: &WalRecovery) {
    println!(
        "write-ahead log     {} segment(s), {} bytes, {} record(s) checked at open; {} \
         record(s) ({} events) above sled's store replayed{}",
        w.segments,
        w.bytes,
        w.records,
        w.replayed_records,
        w.replayed_events,
        if w.torn_bytes > 0 {
            format!(
                "; an unfinished last record ({} bytes) dropped",
                w.torn_bytes
            )
        } else {
            String::new()
        }
    );
}

/// `tidewire verify`: checks the log; an error (exit status 1) when it is not consistent.
pub async fn verify(dir: &Path, json: bool) -> Result<(), String> {
    let log = open(dir, false)?;
    let v = log.verify().map_err(|e| e.to_string())?;
    close(log).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "checked {} chunks, {} events, {} index entries",
            v.chunks, v.events, v.index_entries
        );
        print_wal(&v.wal);
        for p in &v.problems {
            println!("PROBLEM: {p}");
        }
    }
    if v.healthy() {
        if !json {
            println!("healthy");
        }
        Ok(())
    } else {
        Err(format!("{} problem(s) found", v.problem_count))
    }
}

/// `tidewire export`: from a stopped server's data dir, or online from a running server.
pub async fn export(
    dir: Option<&Path>,
    server: Option<&str>,
    patterns: &[String],
    since: u64,
    format: Format,
    token: Option<&str>,
) -> Result<(), String> {
    let mut out = std::io::BufWriter::new(std::io::stdout());
    if let Some(url) = server {
        if format != Format::Ndjson {
            return Err("an online export (--server) is NDJSON only".into());
        }
        let (n, cursor) = crate::client::export(url, patterns, since, token, &mut out)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!(
            "exported {n} events, complete up to id {cursor} (continue with --since {cursor})"
        );
        return Ok(());
    }
    let Some(dir) = dir else {
        return Err("give --data-dir or --server".into());
    };
    let parsed = patterns
        .iter()
        .map(|p| Pattern::parse(p).map_err(|e| format!("pattern {p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let set = PatternSet::new(parsed).ok_or("give at least one --topic pattern")?;
    let log = open(dir, false)?;
    let head = log.head().0;
    let written = export::export(log.as_ref(), set, EventId(since), format, &mut out)
        .await
        .map_err(|e| e.to_string());
    close(log).await?;
    let n = written?;
    eprintln!("exported {n} events, complete up to id {head}");
    Ok(())
}

/// `tidewire import`: restores an export into a data dir that holds no events.
pub async fn import(dir: &Path, input: Option<&Path>, format: Format) -> Result<(), String> {
    let reader: Box<dyn BufRead + Send> = match input {
        Some(p) => Box::new(BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(BufReader::new(std::io::stdin())),
    };
    let log = open(dir, true)?;
    if log.head().0 != 0 {
        close(log).await?;
        return Err(format!(
            "{}: already holds events; import restores into a new or empty data directory",
            dir.display()
        ));
    }
    let result = match format {
        Format::Ndjson => import_lines(&log, reader).await,
        Format::Msgpack => import_msgpack(&log, reader).await,
    };
    close(log).await?;
    let n = result.map_err(|e| e.to_string())?;
    eprintln!("imported {n} events");
    Ok(())
}

async fn import_msgpack(log: &SledLog, mut reader: impl BufRead) -> Result<u64, ExportError> {
    let mut batch: Vec<ImportEvent> = Vec::with_capacity(IMPORT_BATCH);
    let mut imported = 0;
    let mut record = 0u64;
    loop {
        record += 1;
        let next = export::read_msgpack(&mut reader).map_err(|reason| ExportError::Line {
            line: record,
            reason,
        })?;
        let Some(e) = next else { break };
        batch.push(e);
        if batch.len() == IMPORT_BATCH {
            imported += log.import(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        imported += log.import(batch).await?;
    }
    Ok(imported)
}

async fn import_lines(log: &SledLog, reader: impl BufRead) -> Result<u64, ExportError> {
    let mut batch: Vec<ImportEvent> = Vec::with_capacity(IMPORT_BATCH);
    let mut imported = 0;
    for (n, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let e = export::parse_line(&line).map_err(|reason| ExportError::Line {
            line: n as u64 + 1,
            reason,
        })?;
        batch.push(e);
        if batch.len() == IMPORT_BATCH {
            imported += log.import(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        imported += log.import(batch).await?;
    }
    let _ = std::io::stderr().flush();
    Ok(imported)
}
