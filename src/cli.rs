//! The command line: `serve`, `publish`, `tail`, `token`, the operator commands and `bench`.
//! Parses flags, builds the runtime, and calls the library; holds no logic of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::auth::mint::{self, TokenSpec};
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
    Serve(Box<ServeArgs>),
    /// Publish one event and print the receipt.
    Publish(PublishArgs),
    /// Follow topics over SSE, printing one event envelope per line; resumes after drops.
    Tail(TailArgs),
    /// Mint a signed token (HS256/384/512) granting topic patterns, and print it.
    Token(TokenArgs),
    /// Show what a stopped server's log holds: events, ids, topics, bytes, retention.
    Inspect(InspectArgs),
    /// Check that every stored structure of a stopped server's log agrees; exit 1 if not.
    Verify(InspectArgs),
    /// Write events as NDJSON to stdout: from a stopped server's data dir, or online from a
    /// running server (`--server`) without stopping publishers.
    Export(ExportArgs),
    /// Restore an export (NDJSON on stdin or `--input`) into an empty data dir, keeping ids.
    Import(ImportArgs),
    /// Load generator for a running server (tidewire, or nginx + Nchan for comparison):
    /// publish, fanout, idle, resume.
    Bench(crate::bench::BenchArgs),
}

/// Flags of `inspect` and `verify`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Directory of the log (the server must be stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `export`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["data_dir", "server"])))]
pub struct ExportArgs {
    /// Directory of a stopped server's log.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A running server (online backup; `msg_id`s are not exported this way).
    #[arg(long)]
    pub server: Option<String>,
    /// Pattern to export (repeatable) [default: every topic].
    #[arg(long = "topic", default_value = "**")]
    pub patterns: Vec<String>,
    /// Export events with ids above this cursor.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Output format (MessagePack only from a data dir).
    #[arg(long, value_enum, default_value_t = crate::export::Format::Ndjson)]
    pub format: crate::export::Format,
    /// Bearer token for a server with authorization on.
    #[arg(long, env = "TIDEWIRE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Flags of `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Directory to restore into: new or holding a log with no events.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The export file [default: stdin].
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Input format.
    #[arg(long, value_enum, default_value_t = crate::export::Format::Ndjson)]
    pub format: crate::export::Format,
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
    /// PEM certificate chain: serve HTTPS, WSS and HTTP/2 over TLS (needs --tls-key;
    /// reloaded on SIGHUP).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the --tls-cert certificate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
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
    /// HMAC secret for HS256/384/512 tokens (shows in `ps`: prefer --jwt-secret-file or
    /// TIDEWIRE_JWT_SECRET). Setting a key turns authorization on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// File holding the HMAC secret.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key verifying RS256 (RSA) or ES256 (P-256) tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key: Option<PathBuf>,
    /// Require this `aud` in tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// Require this `iss` in tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, seconds [default: 30].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway_secs: Option<u64>,
    /// Where events are kept: sled (embedded, in --data-dir) or nats (a JetStream stream
    /// shared by every gateway) [default: sled].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<crate::config::LogBackend>,
    /// NATS server URLs, comma-separated (--log nats) [default: nats://127.0.0.1:4222].
    #[arg(long = "nats-url", value_delimiter = ',')]
    #[serde(rename = "nats_urls", skip_serializing_if = "Vec::is_empty")]
    pub nats_urls: Vec<String>,
    /// JetStream stream holding the log, created when missing [default: tidewire].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_stream: Option<String>,
    /// Replicas of the stream when a gateway creates it [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_replicas: Option<usize>,
    /// NATS credentials file (.creds).
    #[arg(long = "nats-creds")]
    #[serde(rename = "nats_creds_file", skip_serializing_if = "Option::is_none")]
    pub nats_creds_file: Option<PathBuf>,
    /// File holding an nkey seed to authenticate to NATS with.
    #[arg(long = "nats-nkey")]
    #[serde(rename = "nats_nkey_file", skip_serializing_if = "Option::is_none")]
    pub nats_nkey_file: Option<PathBuf>,
    /// NATS user (the password from TIDEWIRE_NATS_PASSWORD or the config file).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_user: Option<String>,
    /// PEM CA certificate for TLS to NATS.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_ca: Option<PathBuf>,
}

/// Flags of `token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// File holding the HMAC secret (the server's jwt_secret_file).
    #[arg(long, required_unless_present = "secret", conflicts_with = "secret")]
    pub secret_file: Option<PathBuf>,
    /// The HMAC secret itself (shows in `ps`; prefer --secret-file).
    #[arg(long)]
    pub secret: Option<String>,
    /// Pattern the token may publish to (repeatable), e.g. 'sensors/**'.
    #[arg(long)]
    pub publish: Vec<String>,
    /// Pattern the token may subscribe to (repeatable), e.g. 'dash/**'.
    #[arg(long)]
    pub subscribe: Vec<String>,
    /// Lifetime: 30s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = mint::parse_ttl)]
    pub ttl: Duration,
    /// `sub` claim (who the token is for; shown in logs).
    #[arg(long)]
    pub sub: Option<String>,
    /// `aud` claim (match the server's jwt_audience).
    #[arg(long)]
    pub aud: Option<String>,
    /// `iss` claim (match the server's jwt_issuer).
    #[arg(long)]
    pub iss: Option<String>,
    /// Signing algorithm: HS256, HS384 or HS512.
    #[arg(long, default_value = "HS256", value_parser = mint::parse_hs_alg)]
    pub alg: jsonwebtoken::Algorithm,
    /// Grant operator rights (the `admin` claim): managing webhooks.
    #[arg(long)]
    pub admin: bool,
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
    /// Bearer token for a server with authorization on (see `tidewire token`).
    #[arg(long, env = "TIDEWIRE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
    /// Bearer token for a server with authorization on (see `tidewire token`).
    #[arg(long, env = "TIDEWIRE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
            Command::Serve(args) => serve(*args).await,
            Command::Publish(a) => crate::client::publish(
                &a.server,
                &a.topic,
                &a.data,
                a.event_type.as_deref(),
                a.msg_id.as_deref(),
                a.token.as_deref(),
            )
            .await
            .map(|receipt| println!("{receipt}"))
            .map_err(|e| e.to_string()),
            Command::Tail(a) => {
                crate::client::tail(&a.server, &a.patterns, a.since, a.count, a.token.as_deref())
                    .await
                    .map_err(|e| e.to_string())
            }
            Command::Token(a) => token(a).map(|t| println!("{t}")),
            Command::Inspect(a) => crate::ops::inspect(&a.data_dir, a.json).await,
            Command::Verify(a) => crate::ops::verify(&a.data_dir, a.json).await,
            Command::Export(a) => {
                crate::ops::export(
                    a.data_dir.as_deref(),
                    a.server.as_deref(),
                    &a.patterns,
                    a.since,
                    a.format,
                    a.token.as_deref(),
                )
                .await
            }
            Command::Import(a) => {
                crate::ops::import(&a.data_dir, a.input.as_deref(), a.format).await
            }
            Command::Bench(a) => crate::bench::run(a).await,
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
    // Before binding: an unusable key or certificate must not leave a port open, even briefly.
    let keys = crate::server::Keys::load(&config).map_err(|e| e.to_string())?;
    // With TLS, SIGHUP reloads the certificate (and no longer terminates the process).
    #[cfg(unix)]
    if let Some(tls) = keys.tls.clone() {
        crate::tls::reload_on_sighup(tls).map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    crate::server::run_with_keys(listener, config, keys, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

fn token(a: TokenArgs) -> Result<String, String> {
    let secret = crate::auth::jwt::load_secret(a.secret.as_deref(), a.secret_file.as_deref())
        .map_err(|e| e.to_string())?
        .ok_or("give --secret-file or --secret")?;
    let spec = TokenSpec {
        publish: a.publish,
        subscribe: a.subscribe,
        ttl: a.ttl,
        sub: a.sub,
        aud: a.aud,
        iss: a.iss,
        alg: a.alg,
        admin: a.admin,
    };
    mint::mint(&secret, &spec).map_err(|e| e.to_string())
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
