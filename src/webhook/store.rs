//! Where webhooks are kept: each one's definition, cursor and in-flight batch, as one record
//! written durably before the step it records is taken (the batch before its first attempt,
//! the cursor after its 2xx). [`FileStore`] keeps them as files beside the sled log; the
//! JetStream mode keeps them in a KV bucket (see [`super::kv`]).

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

/// A batch recorded before its first attempt: every retry, also after a crash, sends exactly
/// this body under this `webhook-id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The Standard Webhooks `webhook-id` of every attempt of this batch.
    pub webhook_id: String,
    /// Id of its first event (the gap's `oldest - 1` when it holds only a gap).
    pub first_id: u64,
    /// The cursor once it is delivered.
    pub last_id: u64,
    /// Events it holds.
    pub events: u64,
    /// The JSON body.
    pub body: String,
}

/// Delivery counters and the last outcome, kept with the record so they survive restarts.
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
}

/// One webhook as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The definition, secret included.
    pub spec: Request,
    /// Every matching event up to this id has been delivered (answered 2xx).
    pub cursor: u64,
    /// The batch being delivered, if any.
    pub in_flight: Option<InFlight>,
    /// Why delivery stopped by itself (the receiver answered 410), until a PUT resumes it.
    pub disabled: Option<String>,
    /// Counters and the last outcome.
    #[serde(default)]
    pub progress: Progress,
}

/// Durable storage of webhook records.
pub trait Store: Send + Sync + 'static {
    /// Every stored record.
    fn load(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>>;
    /// Stores `record` under `name`, durably once this resolves.
    fn save<'a>(
        &'a self,
        name: &'a str,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Removes the record of `name` (absent is fine), durably once this resolves.
    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Records as `<dir>/<name>.json`, each replaced atomically and fsynced.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// The directory, inside the data directory, that holds the webhooks' records.
pub const DIR: &str = "webhooks";

impl FileStore {
    /// A store in `dir` (created when missing).
    pub fn open(dir: PathBuf) -> Result<FileStore, StoreError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        Ok(FileStore { dir })
    }
}

impl Store for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
                let mut out = Vec::new();
                for entry in std::fs::read_dir(&dir).map_err(io)? {
                    let path = entry.map_err(io)?.path();
                    // Leftover `.tmp` files are writes a crash interrupted: the old record
                    // stands.
                    if path.extension().and_then(|e| e.to_str()) != Some("json") {
                        continue;
                    }
                    let name = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let bytes = std::fs::read(&path).map_err(io)?;
                    let record: Record =
                        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                            name: name.clone(),
                            why: e.to_string(),
                        })?;
                    out.push(record);
                }
                Ok(out)
            })
            .await
            .map_err(|e| StoreError::Io(format!("load task: {e}")))?
        })
    }

    fn save<'a>(
        &'a self,
        name: &'a str,
        record: &'a Record,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let dir = self.dir.clone();
        let file = format!("{name}.json");
        let bytes = serde_json::to_vec(record);
        Box::pin(async move {
            let bytes = bytes.map_err(|e| StoreError::Io(e.to_string()))?;
            tokio::task::spawn_blocking(move || crate::durable::replace_file(&dir, &file, &bytes))
                .await
                .map_err(|e| StoreError::Io(format!("save task: {e}")))?
                .map_err(|e| StoreError::Io(e.to_string()))
        })
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let dir = self.dir.clone();
        let file = format!("{name}.json");
        Box::pin(async move {
            tokio::task::spawn_blocking(move || crate::durable::remove_file(&dir, &file))
                .await
                .map_err(|e| StoreError::Io(format!("remove task: {e}")))?
                .map_err(|e| StoreError::Io(e.to_string()))
        })
    }
}
