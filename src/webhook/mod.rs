//! Webhooks: events pushed to HTTP endpoints (serverless functions, services), signed per
//! Standard Webhooks, in id order, at least once.
//!
//! Guarantees, per webhook:
//! - **order**: batches go out in id order, and the next one only after the previous one
//!   was answered 2xx;
//! - **at least once**: the batch in flight (body and `webhook-id`) is recorded durably before
//!   its first attempt, and the cursor moves durably only after its 2xx, so a crash re-sends
//!   that batch, whole, under the same `webhook-id`, and never skips one;
//! - **nothing dropped silently**: failures are retried until they succeed (see
//!   [`backoff`]); a `410 Gone` disables the webhook, keeping its cursor and batch, until it
//!   is put again; retention passing the cursor is told with the `gap` member;
//! - **destinations**: only what `webhook_allow` lists, checked on the resolved addresses
//!   at every attempt, connecting to the address checked; redirects are never followed.
//!
//! Modules: [`spec`] (the definition), [`sign`] (signatures), [`allow`] (the allow-list),
//! [`backoff`] (when to retry), [`sender`] (one call), [`store`] (the records), `delivery`
//! (each webhook's task; this module is the manager the HTTP API talks to).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::envelope::EventId;
use crate::hub::Hub;
use crate::log::{EventLog, LogError};
use crate::metrics::Metrics;

pub mod allow;
pub mod backoff;
mod delivery;
pub mod sender;
pub mod sign;
pub mod spec;
pub mod store;

pub use delivery::Status;
use delivery::{Command, Task};
use spec::{Name, Request, Spec};
use store::{Record, Store, StoreError};

/// Most matching events counted for a webhook's `lag` (a longer backlog shows this many).
pub const LAG_COUNT_CAP: u64 = 10_000;

/// Errors of the webhook layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WebhookError {
    /// The definition is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The destination is not in `webhook_allow`.
    #[error("{0}")]
    NotAllowed(String),
    /// No webhook has this name.
    #[error("no webhook named {0:?}")]
    NotFound(String),
    /// The state could not be recorded; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The log could not answer.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// How webhooks behave, from the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where webhooks may point.
    pub allow: allow::AllowList,
    /// The retry delays.
    pub backoff: backoff::Backoff,
    /// Events read from the log per step.
    pub page_size: usize,
}

/// What every delivery task shares.
struct Context {
    log: Arc<dyn EventLog>,
    hub: Hub,
    metrics: Metrics,
    store: Arc<dyn Store>,
    allow: allow::AllowList,
    backoff: backoff::Backoff,
    page_size: usize,
    connector: sender::Connector,
}

struct Handle {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<Status>>,
    task: tokio::task::JoinHandle<()>,
}

/// Every webhook of this server, each delivered by its own task.
pub struct Webhooks {
    ctx: Arc<Context>,
    /// Held across a whole put or delete, so changes to webhooks are applied one at a time.
    tasks: tokio::sync::Mutex<BTreeMap<Name, Handle>>,
}

/// A webhook as the API shows it (never its secret or header values).
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// Its name.
    pub name: String,
    /// Where calls go.
    pub url: String,
    /// Topic patterns delivered.
    pub topics: Vec<String>,
    /// Most events per call.
    pub batch_max_events: usize,
    /// Most body bytes per call.
    pub batch_max_bytes: usize,
    /// Time allowed for one call.
    pub timeout_ms: u64,
    /// Names of the static headers added to calls.
    pub header_names: Vec<String>,
    /// `active`, `retrying` (the batch in flight failed at least once) or `disabled`.
    pub state: &'static str,
    /// Why it is disabled, when it is.
    pub disabled_reason: Option<String>,
    /// Every matching event up to this id was delivered.
    pub cursor: u64,
    /// Matching events after the cursor (counted up to [`LAG_COUNT_CAP`]).
    pub lag: u64,
    /// Failed attempts of the batch in flight.
    pub attempts: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it happened (Unix ms).
    pub last_error_at: Option<u64>,
    /// When the last 2xx came (Unix ms).
    pub last_success_at: Option<u64>,
    /// Events delivered (re-sent batches count again).
    pub delivered_events: u64,
    /// Batches answered 2xx.
    pub delivered_batches: u64,
    /// When the next attempt is due (Unix ms), while backing off.
    pub next_attempt_at: Option<u64>,
    /// The batch being delivered.
    pub in_flight: Option<InFlightView>,
}

/// The batch in flight, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InFlightView {
    /// Its `webhook-id`.
    pub webhook_id: String,
    /// Id of its first event.
    pub first_id: u64,
    /// Id of its last event.
    pub last_id: u64,
    /// Events it holds.
    pub events: u64,
}

impl Webhooks {
    /// Loads the stored webhooks, applies the ones `declared` in the configuration (created
    /// when missing, updated otherwise: their cursors are kept), and starts delivering.
    pub async fn start(
        log: Arc<dyn EventLog>,
        hub: Hub,
        metrics: Metrics,
        store: Arc<dyn Store>,
        opts: Options,
        declared: &[Request],
    ) -> Result<Webhooks, WebhookError> {
        let records = store.load().await?;
        let hooks = Webhooks {
            ctx: Arc::new(Context {
                log,
                hub,
                metrics,
                store,
                allow: opts.allow,
                backoff: opts.backoff,
                page_size: opts.page_size,
                connector: sender::Connector::new(),
            }),
            tasks: tokio::sync::Mutex::new(BTreeMap::new()),
        };
        {
            let mut tasks = hooks.tasks.lock().await;
            for record in records {
                let name = record.spec.name.clone().unwrap_or_default();
                let spec = Name::parse(&name)
                    .and_then(|n| Spec::apply(n, &record.spec, None))
                    .map_err(|why| {
                        WebhookError::Store(StoreError::Corrupt {
                            name: name.clone(),
                            why,
                        })
                    })?;
                let handle = hooks.spawn(spec.clone(), record);
                tasks.insert(spec.name, handle);
            }
        }
        for req in declared {
            let name = req.name.clone().unwrap_or_default();
            let mut req = req.clone();
            req.name = None;
            hooks
                .put(&name, req)
                .await
                .map_err(|e| WebhookError::Invalid(format!("[[webhooks]] {name:?}: {e}")))?;
        }
        Ok(hooks)
    }

    fn spawn(&self, spec: Spec, record: Record) -> Handle {
        let status = Arc::new(Mutex::new(Status {
            spec: spec.clone(),
            record: record.clone(),
            attempts: 0,
            next_attempt_at: None,
        }));
        let (tx, rx) = mpsc::channel(4);
        let task = Task::new(self.ctx.clone(), spec, record, status.clone());
        Handle {
            commands: tx,
            status,
            task: tokio::spawn(task.run(rx)),
        }
    }

    /// Creates (`true`) or updates (`false`) the webhook `name` as `req` says, once its
    /// destination passed the allow-list; durable when this returns.
    pub async fn put(&self, name: &str, req: Request) -> Result<(View, bool), WebhookError> {
        let name = Name::parse(name).map_err(WebhookError::Invalid)?;
        if req.name.as_deref().is_some_and(|n| n != name.as_str()) {
            return Err(WebhookError::Invalid(
                "the body's name differs from the path's".into(),
            ));
        }
        let mut tasks = self.tasks.lock().await;
        let current = match tasks.get(&name) {
            Some(h) => h.status.lock().ok().map(|s| s.spec.clone()),
            None => None,
        };
        let spec =
            Spec::apply(name.clone(), &req, current.as_ref()).map_err(WebhookError::Invalid)?;
        if req.url.is_some() || current.is_none() {
            check_destination(&self.ctx.allow, &spec).await?;
        }
        let created = match tasks.get(&name) {
            Some(handle) => {
                let (reply, done) = oneshot::channel();
                let sent = handle
                    .commands
                    .send(Command::Update {
                        spec: Box::new(spec),
                        since: req.since,
                        reply,
                    })
                    .await;
                if sent.is_err() {
                    return Err(StoreError::Io("the webhook's task has ended".into()).into());
                }
                done.await
                    .map_err(|_| StoreError::Io("the webhook's task has ended".into()))??;
                false
            }
            None => {
                let record = Record {
                    spec: spec.to_request(),
                    cursor: match req.since {
                        Some(c) => c,
                        None => self.ctx.log.head().0,
                    },
                    in_flight: None,
                    disabled: None,
                    progress: Default::default(),
                };
                self.ctx.store.save(name.as_str(), &record).await?;
                let handle = self.spawn(spec, record);
                tasks.insert(name.clone(), handle);
                true
            }
        };
        let status = tasks
            .get(&name)
            .and_then(|h| h.status.lock().ok().map(|s| s.clone()));
        drop(tasks);
        let status = status.ok_or_else(|| WebhookError::NotFound(name.as_str().into()))?;
        Ok((self.view(status).await, created))
    }

    /// The webhook `name` as it stands.
    pub async fn get(&self, name: &str) -> Result<View, WebhookError> {
        let status = {
            let tasks = self.tasks.lock().await;
            Name::parse(name).ok().and_then(|n| {
                tasks
                    .get(&n)
                    .and_then(|h| h.status.lock().ok().map(|s| s.clone()))
            })
        };
        match status {
            Some(s) => Ok(self.view(s).await),
            None => Err(WebhookError::NotFound(name.into())),
        }
    }

    /// Every webhook, in name order.
    pub async fn list(&self) -> Vec<View> {
        let all: Vec<Status> = {
            let tasks = self.tasks.lock().await;
            tasks
                .values()
                .filter_map(|h| h.status.lock().ok().map(|s| s.clone()))
                .collect()
        };
        let mut out = Vec::with_capacity(all.len());
        for s in all {
            out.push(self.view(s).await);
        }
        out
    }

    /// Deletes the webhook `name` and its record; no call of it starts after this returns.
    pub async fn delete(&self, name: &str) -> Result<(), WebhookError> {
        let mut tasks = self.tasks.lock().await;
        let key = Name::parse(name).map_err(|_| WebhookError::NotFound(name.into()))?;
        let Some(handle) = tasks.get(&key) else {
            return Err(WebhookError::NotFound(name.into()));
        };
        let (reply, done) = oneshot::channel();
        if handle
            .commands
            .send(Command::Delete { reply })
            .await
            .is_err()
        {
            return Err(StoreError::Io("the webhook's task has ended".into()).into());
        }
        done.await
            .map_err(|_| StoreError::Io("the webhook's task has ended".into()))??;
        if let Some(h) = tasks.remove(&key) {
            let _ = h.task.await;
        }
        Ok(())
    }

    /// Stops every delivery task (a call in flight is abandoned: its batch goes again after
    /// the restart) and waits for them, at most `grace`.
    pub async fn stop(&self, grace: Duration) {
        let mut tasks = self.tasks.lock().await;
        for h in tasks.values() {
            let _ = h.commands.try_send(Command::Stop);
        }
        let joins: Vec<_> = std::mem::take(&mut *tasks)
            .into_values()
            .map(|h| h.task)
            .collect();
        let all = futures_util::future::join_all(joins);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("webhook tasks still busy after the grace period");
        }
    }

    async fn view(&self, s: Status) -> View {
        let lag = self.lag(&s).await;
        let r = &s.record;
        let state = if !s.spec.enabled || r.disabled.is_some() {
            "disabled"
        } else if s.attempts > 0 {
            "retrying"
        } else {
            "active"
        };
        View {
            name: s.spec.name.as_str().to_owned(),
            url: s.spec.target.text.clone(),
            topics: s
                .spec
                .topics
                .patterns()
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            batch_max_events: s.spec.batch_max_events,
            batch_max_bytes: s.spec.batch_max_bytes,
            timeout_ms: s.spec.timeout_ms,
            header_names: s
                .spec
                .headers
                .iter()
                .map(|(k, _)| k.as_str().to_owned())
                .collect(),
            state,
            disabled_reason: match (&r.disabled, s.spec.enabled) {
                (Some(why), _) => Some(why.clone()),
                (None, false) => Some("disabled by its definition (enabled: false)".into()),
                (None, true) => None,
            },
            cursor: r.cursor,
            lag,
            attempts: s.attempts,
            last_error: r.progress.last_error.clone(),
            last_error_at: r.progress.last_error_at,
            last_success_at: r.progress.last_success_at,
            delivered_events: r.progress.delivered_events,
            delivered_batches: r.progress.delivered_batches,
            next_attempt_at: s.next_attempt_at,
            in_flight: r.in_flight.as_ref().map(|b| InFlightView {
                webhook_id: b.webhook_id.clone(),
                first_id: b.first_id,
                last_id: b.last_id,
                events: b.events,
            }),
        }
    }

    /// Matching events after the cursor, counted up to [`LAG_COUNT_CAP`] (0 when the log
    /// cannot be read now).
    async fn lag(&self, s: &Status) -> u64 {
        let mut n = 0u64;
        let mut after = EventId(s.record.cursor);
        while n < LAG_COUNT_CAP {
            let Ok(page) = self.ctx.log.read(s.spec.topics.clone(), after, 1000).await else {
                break;
            };
            n += page.events.len() as u64;
            if page.complete || page.through <= after {
                break;
            }
            after = page.through;
        }
        n.min(LAG_COUNT_CAP)
    }
}

/// Resolves the destination of `spec` and checks it against the allow-list.
async fn check_destination(allow: &allow::AllowList, spec: &Spec) -> Result<(), WebhookError> {
    match allow::resolve(allow, &spec.target.dest).await {
        Ok(_) => Ok(()),
        Err(r @ allow::Refusal::Unresolved(_)) => Err(WebhookError::Invalid(format!(
            "url {:?}: {r}",
            spec.target.text
        ))),
        Err(r @ allow::Refusal::NotAllowed(_)) => Err(WebhookError::NotAllowed(format!(
            "url {:?}: {r}",
            spec.target.text
        ))),
    }
}
