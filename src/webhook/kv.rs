//! Webhook state for gateways over NATS JetStream (`--log nats`): definitions and delivery
//! states in one KV bucket shared by every gateway (`d.<name>`, `s.<name>`), and leases in a
//! second bucket whose entries lapse after [`LEASE`] unless renewed, so that one gateway at a
//! time delivers each webhook and another takes over when it dies. Writes are acknowledged by
//! JetStream after the bucket's replicas hold them, the same promise as the event log's.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use super::store::{Def, State, Store, StoreError};
use crate::log::BoxFuture;

/// Bytes of a state record around its batch body.
const STATE_OVERHEAD: usize = 16 << 10;

/// How long a gateway's claim on a webhook lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(6);

/// The KV buckets of the webhooks of one stream.
pub struct KvStore {
    /// The largest message the NATS servers take (`max_payload`).
    max_payload: usize,
    data: kv::Store,
    leases: kv::Store,
    /// This gateway, as written in the leases it holds.
    owner: String,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("NATS KV: {e}"))
}

async fn bucket(
    js: &jetstream::Context,
    name: String,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, StoreError> {
    if let Ok(b) = js.get_key_value(&name).await {
        return Ok(b);
    }
    let config = kv::Config {
        bucket: name.clone(),
        description: "tidewire webhooks".into(),
        history: 1,
        max_age,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(b) => Ok(b),
        // Another gateway created it meanwhile.
        Err(e) => js
            .get_key_value(&name)
            .await
            .map_err(|_| io(format!("bucket {name}: {e}"))),
    }
}

impl KvStore {
    /// Opens (creating when missing) the buckets of `stream`'s webhooks, with `replicas`.
    pub async fn open(
        client: &async_nats::Client,
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
    ) -> Result<KvStore, StoreError> {
        let data = bucket(
            js,
            format!("tidewire_webhooks_{stream}"),
            replicas,
            Duration::ZERO,
        )
        .await?;
        let leases = bucket(
            js,
            format!("tidewire_webhook_leases_{stream}"),
            replicas,
            LEASE,
        )
        .await?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(KvStore {
            max_payload: client.server_info().max_payload,
            data,
            leases,
            owner: format!("{}-{nanos:x}", std::process::id()),
        })
    }
}

fn def_key(name: &str) -> String {
    format!("d.{name}")
}

fn state_key(name: &str) -> String {
    format!("s.{name}")
}

impl Store for KvStore {
    fn defs(&self) -> BoxFuture<'_, Result<Vec<(Def, u64)>, StoreError>> {
        Box::pin(async move {
            use futures_util::TryStreamExt;
            let keys: Vec<String> = self
                .data
                .keys()
                .await
                .map_err(io)?
                .try_collect()
                .await
                .map_err(io)?;
            let mut out = Vec::new();
            for key in keys.iter().filter(|k| k.starts_with("d.")) {
                let Some(entry) = self.data.entry(key.as_str()).await.map_err(io)? else {
                    continue;
                };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let def: Def = serde_json::from_slice(&entry.value)
                    .map_err(|e| StoreError::corrupt(key, e))?;
                out.push((def, entry.revision));
            }
            Ok(out)
        })
    }

    fn put_def<'a>(
        &'a self,
        name: &'a str,
        def: &'a Def,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let bytes = serde_json::to_vec(def).map_err(io)?;
            self.data
                .put(def_key(name), Bytes::from(bytes))
                .await
                .map_err(io)
        })
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.data.delete(def_key(name)).await.map_err(io)?;
            self.data.delete(state_key(name)).await.map_err(io)
        })
    }

    fn state<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<State>, StoreError>> {
        Box::pin(async move {
            match self.data.entry(state_key(name)).await.map_err(io)? {
                Some(e) if e.operation == kv::Operation::Put => Ok(Some(
                    serde_json::from_slice(&e.value).map_err(|e| StoreError::corrupt(name, e))?,
                )),
                _ => Ok(None),
            }
        })
    }

    fn save_state<'a>(
        &'a self,
        name: &'a str,
        state: &'a State,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let bytes = serde_json::to_vec(state).map_err(io)?;
            self.data
                .put(state_key(name), Bytes::from(bytes))
                .await
                .map(|_| ())
                .map_err(io)
        })
    }

    fn claim<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let owner = Bytes::from(self.owner.clone());
            match self.leases.entry(name).await.map_err(io)? {
                Some(e) if e.operation == kv::Operation::Put => {
                    if e.value != owner {
                        return Ok(false);
                    }
                    // Renew: only if nobody took it over since (it lapsed and was claimed).
                    Ok(self.leases.update(name, owner, e.revision).await.is_ok())
                }
                _ => match self.leases.create(name, owner).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(io(e)),
                },
            }
        })
    }

    fn release<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(Some(e)) = self.leases.entry(name).await {
                if e.operation == kv::Operation::Put && e.value == self.owner.as_bytes() {
                    let _ = self
                        .leases
                        .delete_expect_revision(name, Some(e.revision))
                        .await;
                }
            }
        })
    }

    fn lease(&self) -> Option<Duration> {
        Some(LEASE)
    }

    fn max_batch_bytes(&self) -> Option<usize> {
        // Room for the state around the body (ids, counters, the last error).
        Some(self.max_payload.saturating_sub(STATE_OVERHEAD).max(1024))
    }
}
