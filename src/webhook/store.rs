//! Where webhooks are kept, in two parts per webhook:
//! - the **definition** ([`Def`]), written by whichever server takes the `PUT`;
//! - the **delivery state** ([`State`]: cursor, batch in flight), written only by the server
//!   delivering the webhook, before the step it records is taken (the batch before its first
//!   attempt, the cursor after its 2xx).
//!
//! [`FileStore`] keeps them as files beside the sled log, for one server. The JetStream mode
//! keeps them in KV buckets shared by every gateway ([`super::kv::KvStore`]), where a lease
//! ([`Store::claim`]) lets one gateway at a time deliver each webhook.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::spec::Request;
use crate::log::BoxFuture;

/// Errors of the webhook store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the state failed; what was being recorded is not recorded.
    #[error("webhook state: {0}")]
    Io(String),
    /// A stored record cannot be read back.
    #[error("webhook state {name:?} is unreadable: {why}")]
    Corrupt {
        /// The record.
        name: String,
        /// Why.
        why: String,
    },
}

impl StoreError {
    /// The record `name` cannot be read back, for the reason `e`.
    pub fn corrupt(name: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            name: name.to_owned(),
            why: e.to_string(),
        }
    }
}

/// A webhook's definition as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Def {
    /// The definition, secret included (`name` set).
    pub spec: Request,
    /// Bumped by every put that changes where or what is delivered, or moves the cursor: the
    /// delivering server then drops the batch in flight (and moves the cursor to `since`).
    pub epoch: u64,
    /// The cursor the put of this epoch asked for.
    pub since: Option<u64>,
}

/// A batch recorded before its first attempt: every retry, also after a crash, sends exactly
/// this body under this `webhook-id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InFlight {
    /// The Standard Webhooks `webhook-id` of every attempt of this batch.
    pub webhook_id: String,
    /// Id of its first event (the gap's `oldest - 1` when it holds only a gap).
    pub first_id: u64,
    /// The cursor once it is delivered.
    pub last_id: u64,
    /// Events it holds.
    pub events: u64,
    /// The JSON body, stored as JSON (not as an escaped string: a record is about as large
    /// as the body it holds).
    pub body: Box<serde_json::value::RawValue>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        self.webhook_id == other.webhook_id
            && (self.first_id, self.last_id, self.events)
                == (other.first_id, other.last_id, other.events)
            && self.body.get() == other.body.get()
    }
}

/// Delivery counters and the last outcome, kept with the state so they survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Events delivered (a re-sent batch counts again).
    pub delivered_events: u64,
    /// Batches answered 2xx.
    pub delivered_batches: u64,
    /// When the last 2xx came (Unix ms).
    pub last_success_at: Option<u64>,
    /// The last failure, for a person.
    pub last_error: Option<String>,
    /// When it happened (Unix ms).
    pub last_error_at: Option<u64>,
    /// Failed attempts of the batch in flight.
    #[serde(default)]
    pub attempts: u64,
    /// When the next attempt is due (Unix ms), while backing off.
    #[serde(default)]
    pub next_attempt_at: Option<u64>,
}

/// A webhook's delivery state as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The definition epoch this state follows.
    pub epoch: u64,
    /// Every matching event up to this id has been delivered (answered 2xx).
    pub cursor: u64,
    /// The batch being delivered, if any.
    pub in_flight: Option<InFlight>,
    /// Why delivery stopped by itself (the receiver answered 410), until a put resumes it.
    pub disabled: Option<String>,
    /// Counters and the last outcome.
    #[serde(default)]
    pub progress: Progress,
}

/// Durable storage of webhook definitions and states.
pub trait Store: Send + Sync + 'static {
    /// Every stored definition, with a revision that changes whenever it is put again.
    fn defs(&self) -> BoxFuture<'_, Result<Vec<(Def, u64)>, StoreError>>;
    /// Stores the definition of `name`, durably once this resolves; its new revision.
    fn put_def<'a>(&'a self, name: &'a str, def: &'a Def)
        -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Removes the definition and the state of `name` (absent is fine), durably.
    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The delivery state of `name`, if any was stored.
    fn state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<State>, StoreError>>;
    /// Stores the delivery state of `name`, durably once this resolves.
    fn save_state<'a>(
        &'a self,
        name: &'a str,
        state: &'a State,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Takes or renews the right to deliver `name` for [`Store::lease`]; `false` when another
    /// server holds it. A store used by one server only always grants it.
    fn claim<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Gives the right to deliver `name` up (best effort: it also lapses by itself).
    fn release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()>;
    /// How long a claim lasts unless renewed; `None` for a store used by one server only
    /// (then nothing else writes it, and nothing needs to be synchronised).
    fn lease(&self) -> Option<std::time::Duration>;

    /// Largest batch body a state can record (a NATS message is bounded); `None`: no bound
    /// beyond the webhook's own `batch_max_bytes`.
    fn max_batch_bytes(&self) -> Option<usize> {
        None
    }
}

/// Definitions and states as `<dir>/<name>.def.json` and `<dir>/<name>.state.json`, each
/// replaced atomically and fsynced. For one server: claims always succeed.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// The directory, inside the data directory, that holds the webhooks' files.
pub const DIR: &str = "webhooks";
const DEF_SUFFIX: &str = ".def.json";
const STATE_SUFFIX: &str = ".state.json";

impl FileStore {
    /// A store in `dir` (created when missing).
    pub fn open(dir: PathBuf) -> Result<FileStore, StoreError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        Ok(FileStore { dir })
    }

    fn write(
        &self,
        file: String,
        bytes: Result<Vec<u8>, serde_json::Error>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let bytes = bytes.map_err(|e| StoreError::Io(e.to_string()))?;
            blocking(move || crate::durable::replace_file(&dir, &file, &bytes)).await
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(format!("store task: {e}")))?
        .map_err(|e| StoreError::Io(e.to_string()))
}

impl Store for FileStore {
    fn defs(&self) -> BoxFuture<'_, Result<Vec<(Def, u64)>, StoreError>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let files = blocking(move || {
                let mut out = Vec::new();
                for entry in std::fs::read_dir(&dir)? {
                    let path = entry?.path();
                    let file = path
                        .file_name()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    // Leftover `.tmp` files are writes a crash interrupted: the old one stands.
                    if let Some(name) = file.strip_suffix(DEF_SUFFIX) {
                        out.push((name.to_owned(), std::fs::read(&path)?));
                    }
                }
                Ok(out)
            })
            .await?;
            files
                .into_iter()
                .map(|(name, bytes)| {
                    let def: Def = serde_json::from_slice(&bytes)
                        .map_err(|e| StoreError::corrupt(&name, e))?;
                    Ok((def, 0))
                })
                .collect()
        })
    }

    fn put_def<'a>(
        &'a self,
        name: &'a str,
        def: &'a Def,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let write = self.write(format!("{name}{DEF_SUFFIX}"), serde_json::to_vec(def));
        Box::pin(async move { write.await.map(|()| 0) })
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let dir = self.dir.clone();
        let (def, state) = (
            format!("{name}{DEF_SUFFIX}"),
            format!("{name}{STATE_SUFFIX}"),
        );
        Box::pin(async move {
            blocking(move || {
                crate::durable::remove_file(&dir, &def)?;
                crate::durable::remove_file(&dir, &state)
            })
            .await
        })
    }

    fn state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<State>, StoreError>> {
        let path = self.dir.join(format!("{name}{STATE_SUFFIX}"));
        Box::pin(async move {
            let bytes = blocking(move || match std::fs::read(&path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            })
            .await?;
            bytes
                .map(|b| serde_json::from_slice(&b).map_err(|e| StoreError::corrupt(name, e)))
                .transpose()
        })
    }

    fn save_state<'a>(
        &'a self,
        name: &'a str,
        state: &'a State,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.write(format!("{name}{STATE_SUFFIX}"), serde_json::to_vec(state))
    }

    fn claim<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async { Ok(true) })
    }

    fn release<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn lease(&self) -> Option<std::time::Duration> {
        None
    }
}
