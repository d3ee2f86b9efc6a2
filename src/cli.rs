//! The command line: `serve`, `publish`, `tail`. Parses flags, builds the runtime, and calls
//! the library; holds no logic of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::Config;
use crate::log::FsyncPolicy;

/// tidewire: push live events to devices, dashboards and browsers, and never lose one.
#[derive(Debug, Parser)]
#[command(name = "tidewire", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Publish one event and print the receipt.
    Publish(PublishArgs),
    /// Follow topics over SSE, printing one event envelope per line; resumes after drops.
    Tail(TailArgs),
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Flags of `serve`. Each overrides the config file and `TIDEWIRE_*` variables.
#[derive(Debug, Args, Serialize)]
pub struct ServeArgs {
    /// TOML config file (see deploy/tidewire.toml).
    #[arg(long, env = "TIDEWIRE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7700].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Directory of the embedded log [default: ./tidewire-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Allow listening on a non-loopback address without authentication.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub insecure_open: bool,
    /// When a publish is acknowledged: always (after its fsync), interval=100ms (after the
    /// write, fsync at least that often) or never (fsync left to the storage) [default: always].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsync: Option<FsyncPolicy>,
    /// Seconds between SSE heartbeat comments [default: 15].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sse_heartbeat_secs: Option<u64>,
    /// Largest request body, bytes [default: 1048576].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Origin allowed to read cross-origin (repeatable; `*` for any).
    #[arg(long = "allowed-origin")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
}

/// Flags of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Topic to publish to, e.g. sensors/room-12/temperature.
    pub topic: String,
    /// The data: JSON (e.g. '{"t":21.5}'), or any other text, sent as a JSON string. Text that
    /// starts with `{` or `[` must be valid JSON.
    pub data: String,
    /// Event type (SSE `event:` name).
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Producer-chosen id, so a retry is not stored twice.
    #[arg(long)]
    pub msg_id: Option<String>,
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:7700", env = "TIDEWIRE_SERVER")]
    pub server: String,
}

/// Flags of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Topic patterns, e.g. 'sensors/**' (`*` is one segment, a trailing `**` any number).
    #[arg(required = true)]
    pub patterns: Vec<String>,
    /// Start after this event id (0: from the oldest retained); live only when absent.
    #[arg(long)]
    pub since: Option<u64>,
    /// Stop after printing this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:7700", env = "TIDEWIRE_SERVER")]
    pub server: String,
}

/// Runs a parsed command line to completion.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidewire: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Publish(a) => crate::client::publish(
                &a.server,
                &a.topic,
                &a.data,
                a.event_type.as_deref(),
                a.msg_id.as_deref(),
            )
            .await
            .map(|receipt| println!("{receipt}"))
            .map_err(|e| e.to_string()),
            Command::Tail(a) => crate::client::tail(&a.server, &a.patterns, a.since, a.count)
                .await
                .map_err(|e| e.to_string()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidewire: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::load(args.config.as_deref(), &args).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    crate::server::run(listener, config, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
