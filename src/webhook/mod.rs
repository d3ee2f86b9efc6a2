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
use std::sync::atomic::{AtomicU64, Ordering};
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
pub mod kv;
pub mod sender;
pub mod sign;
pub mod spec;
pub mod store;

pub use delivery::Status;
use delivery::{apply_epoch, Command, Task};
use spec::{Name, Request, Spec};
use store::{Def, State, Store, StoreError};

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

/// A running delivery task.
struct Handle {
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<Status>>,
    task: tokio::task::JoinHandle<()>,
    lease_until: Arc<AtomicU64>,
}

/// One webhook as this server knows it.
struct Entry {
    spec: Spec,
    def: Def,
    /// The store's revision of `def` (a change made by another server shows as a new one).
    revision: u64,
    /// Its delivery task, when this server delivers it.
    task: Option<Handle>,
}

type Entries = tokio::sync::Mutex<BTreeMap<Name, Entry>>;

/// Every webhook of this server (or, over JetStream, of every gateway: each webhook is
/// delivered by the one gateway holding its claim).
pub struct Webhooks {
    ctx: Arc<Context>,
    /// Held across a whole put, delete or synchronisation, so changes apply one at a time.
    entries: Arc<Entries>,
    sync: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
    /// when missing, updated otherwise: their cursors are kept), and starts delivering the
    /// ones this server may deliver. Over a shared store, a background loop follows changes
    /// made by other servers and takes over webhooks whose deliverer stopped renewing its
    /// claim.
    pub async fn start(
        log: Arc<dyn EventLog>,
        hub: Hub,
        metrics: Metrics,
        store: Arc<dyn Store>,
        opts: Options,
        declared: &[Request],
    ) -> Result<Webhooks, WebhookError> {
        let ctx = Arc::new(Context {
            log,
            hub,
            metrics,
            store,
            allow: opts.allow,
            backoff: opts.backoff,
            page_size: opts.page_size,
            connector: sender::Connector::new(),
        });
        let hooks = Webhooks {
            ctx: ctx.clone(),
            entries: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
            sync: Mutex::new(None),
        };
        sync_once(&ctx, &hooks.entries).await?;
        for req in declared {
            let name = req.name.clone().unwrap_or_default();
            let mut req = req.clone();
            req.name = None;
            // `since` only places a new webhook's cursor: one that exists keeps its own, or
            // every restart would replay its history from the configured cursor.
            let exists = match Name::parse(&name) {
                Ok(n) => hooks.entries.lock().await.contains_key(&n),
                Err(_) => false,
            };
            if exists {
                req.since = None;
            }
            hooks
                .put(&name, req)
                .await
                .map_err(|e| WebhookError::Invalid(format!("[[webhooks]] {name:?}: {e}")))?;
        }
        if let Some(lease) = ctx.store.lease() {
            let (ctx, entries) = (ctx.clone(), Arc::downgrade(&hooks.entries));
            let every = lease / 6;
            let task = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(entries) = entries.upgrade() else {
                        return;
                    };
                    if let Err(e) = sync_once(&ctx, &entries).await {
                        tracing::warn!(error = %e, "cannot read the shared webhook state; trying again");
                    }
                }
            });
            if let Ok(mut slot) = hooks.sync.lock() {
                *slot = Some(task);
            }
        }
        Ok(hooks)
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
        let mut entries = self.entries.lock().await;
        let current = entries.get(&name);
        let spec = Spec::apply(name.clone(), &req, current.map(|e| &e.spec))
            .map_err(WebhookError::Invalid)?;
        if req.url.is_some() || current.is_none() {
            check_destination(&self.ctx.allow, &spec).await?;
        }
        let created = current.is_none();
        let (epoch, since) = match current {
            Some(e) if spec.delivers_differently(&e.spec) || req.since.is_some() => {
                (e.def.epoch + 1, req.since)
            }
            Some(e) => (e.def.epoch, None),
            None => {
                // A state left by an earlier webhook of this name (written by a server that
                // had not yet seen its deletion) must not be taken over.
                let left = self.ctx.store.state(name.as_str()).await?;
                (
                    left.map_or(1, |s| s.epoch + 1),
                    Some(req.since.unwrap_or(self.ctx.log.head().0)),
                )
            }
        };
        let def = Def {
            spec: spec.to_request(),
            epoch,
            since,
        };
        let revision = self.ctx.store.put_def(name.as_str(), &def).await?;
        let entry = entries.entry(name.clone()).or_insert_with(|| Entry {
            spec: spec.clone(),
            def: def.clone(),
            revision,
            task: None,
        });
        entry.spec = spec.clone();
        entry.def = def;
        entry.revision = revision;
        match &entry.task {
            Some(handle) => {
                let (reply, done) = oneshot::channel();
                let update = Command::Update {
                    spec: Box::new(spec),
                    epoch,
                    since,
                    reply,
                };
                if handle.commands.send(update).await.is_ok() {
                    // The definition is stored and in force; a state write that failed is
                    // retried by the task.
                    if let Ok(Err(e)) = done.await {
                        tracing::warn!(webhook = name.as_str(), error = %e, "cannot record the webhook's state yet");
                    }
                }
            }
            None => adopt(&self.ctx, &name, entry).await?,
        }
        let view = match entry
            .task
            .as_ref()
            .and_then(|h| h.status.lock().ok().map(|s| s.clone()))
        {
            Some(status) => status,
            None => stored_status(&self.ctx, entry).await?,
        };
        drop(entries);
        Ok((self.view(view).await, created))
    }

    /// The webhook `name` as it stands.
    pub async fn get(&self, name: &str) -> Result<View, WebhookError> {
        let status = {
            let entries = self.entries.lock().await;
            let entry = Name::parse(name).ok().and_then(|n| {
                entries.get(&n).map(|e| {
                    (
                        e.spec.clone(),
                        e.def.clone(),
                        e.task
                            .as_ref()
                            .and_then(|h| h.status.lock().ok().map(|s| s.clone())),
                    )
                })
            });
            match entry {
                None => return Err(WebhookError::NotFound(name.into())),
                Some((_, _, Some(status))) => status,
                Some((spec, def, None)) => Status {
                    state: self
                        .ctx
                        .store
                        .state(name)
                        .await?
                        .unwrap_or_else(|| initial_state(&def)),
                    spec,
                },
            }
        };
        Ok(self.view(status).await)
    }

    /// Every webhook, in name order.
    pub async fn list(&self) -> Vec<View> {
        let names: Vec<Name> = self.entries.lock().await.keys().cloned().collect();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Ok(v) = self.get(n.as_str()).await {
                out.push(v);
            }
        }
        out
    }

    /// Deletes the webhook `name`, its definition and its state; no call of it starts on this
    /// server after this returns (another server delivering it stops within a second or so,
    /// when it sees the deletion).
    pub async fn delete(&self, name: &str) -> Result<(), WebhookError> {
        let mut entries = self.entries.lock().await;
        let key = Name::parse(name).map_err(|_| WebhookError::NotFound(name.into()))?;
        let Some(mut entry) = entries.remove(&key) else {
            return Err(WebhookError::NotFound(name.into()));
        };
        if let Some(h) = entry.task.take() {
            stop(h).await;
        }
        let removed = self.ctx.store.remove(key.as_str()).await;
        self.ctx.store.release(key.as_str()).await;
        self.ctx.metrics.set_webhook_lag(key.as_str(), 0);
        removed.map_err(Into::into)
    }

    /// Stops every delivery task (a call in flight is abandoned: its batch goes again after
    /// the restart) and gives their claims up, waiting at most `grace`.
    pub async fn stop(&self, grace: Duration) {
        if let Ok(mut slot) = self.sync.lock() {
            if let Some(t) = slot.take() {
                t.abort();
            }
        }
        let mut entries = self.entries.lock().await;
        let mut names = Vec::new();
        let mut handles = Vec::new();
        for (name, e) in entries.iter_mut() {
            if let Some(h) = e.task.take() {
                names.push(name.clone());
                handles.push(stop(h));
            }
        }
        if tokio::time::timeout(grace, futures_util::future::join_all(handles))
            .await
            .is_err()
        {
            tracing::warn!("webhook tasks still busy after the grace period");
        }
        for n in names {
            self.ctx.store.release(n.as_str()).await;
        }
    }

    async fn view(&self, s: Status) -> View {
        let lag = self.lag(&s).await;
        let r = &s.state;
        let state = if !s.spec.enabled || r.disabled.is_some() {
            "disabled"
        } else if r.progress.attempts > 0 {
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
            attempts: r.progress.attempts,
            last_error: r.progress.last_error.clone(),
            last_error_at: r.progress.last_error_at,
            last_success_at: r.progress.last_success_at,
            delivered_events: r.progress.delivered_events,
            delivered_batches: r.progress.delivered_batches,
            next_attempt_at: r.progress.next_attempt_at,
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
        let mut after = EventId(s.state.cursor);
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

/// The state of a webhook that was never delivered: at its definition's epoch and cursor.
fn initial_state(def: &Def) -> State {
    State {
        epoch: def.epoch,
        cursor: def.since.unwrap_or(0),
        ..State::default()
    }
}

/// The status of a webhook another server delivers, as stored.
async fn stored_status(ctx: &Context, entry: &Entry) -> Result<Status, WebhookError> {
    let state = ctx
        .store
        .state(entry.spec.name.as_str())
        .await?
        .unwrap_or_else(|| initial_state(&entry.def));
    Ok(Status {
        spec: entry.spec.clone(),
        state,
    })
}

/// Starts delivering `entry` when this server may (its claim is granted): loads its state
/// and brings it to the definition's epoch.
async fn adopt(ctx: &Arc<Context>, name: &Name, entry: &mut Entry) -> Result<(), WebhookError> {
    if entry.task.is_some() || !ctx.store.claim(name.as_str()).await? {
        return Ok(());
    }
    let mut state = match ctx.store.state(name.as_str()).await? {
        Some(s) => s,
        None => initial_state(&entry.def),
    };
    apply_epoch(&mut state, entry.def.epoch, entry.def.since);
    let status = Arc::new(Mutex::new(Status {
        spec: entry.spec.clone(),
        state: state.clone(),
    }));
    let lease_until = Arc::new(AtomicU64::new(lease_deadline(ctx)));
    let (tx, rx) = mpsc::channel(4);
    let task = Task::new(
        ctx.clone(),
        entry.spec.clone(),
        state,
        status.clone(),
        lease_until.clone(),
    );
    entry.task = Some(Handle {
        commands: tx,
        status,
        task: tokio::spawn(task.run(rx)),
        lease_until,
    });
    Ok(())
}

/// Until when a claim granted now may be used: its lease less a second of margin (so a
/// server stops calling before another may take over), or forever on a store of one server.
fn lease_deadline(ctx: &Context) -> u64 {
    match ctx.store.lease() {
        None => u64::MAX,
        Some(lease) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            now + lease.saturating_sub(Duration::from_secs(1)).as_millis() as u64
        }
    }
}

/// Ends a delivery task and waits for it (a state write under way is finished).
async fn stop(h: Handle) {
    let _ = h.commands.try_send(Command::Stop);
    let _ = h.task.await;
}

/// Reads the stored definitions: new ones are added, changed ones given to their task,
/// deleted ones stopped; then claims are renewed (a task whose claim is lost stops) and
/// unclaimed webhooks adopted.
async fn sync_once(ctx: &Arc<Context>, entries: &Entries) -> Result<(), WebhookError> {
    let defs = ctx.store.defs().await?;
    let mut entries = entries.lock().await;
    let mut seen = std::collections::BTreeSet::new();
    for (def, revision) in defs {
        let raw = def.spec.name.clone().unwrap_or_default();
        let spec = match Name::parse(&raw).and_then(|n| Spec::apply(n, &def.spec, None)) {
            Ok(spec) => spec,
            Err(why) => {
                tracing::warn!(webhook = %raw, %why, "a stored webhook definition is not valid; skipped");
                continue;
            }
        };
        let name = spec.name.clone();
        seen.insert(name.clone());
        match entries.get_mut(&name) {
            None => {
                entries.insert(
                    name,
                    Entry {
                        spec,
                        def,
                        revision,
                        task: None,
                    },
                );
            }
            Some(e) if e.revision != revision => {
                e.spec = spec.clone();
                e.def = def.clone();
                e.revision = revision;
                if let Some(h) = &e.task {
                    let (reply, _) = oneshot::channel();
                    let _ = h
                        .commands
                        .send(Command::Update {
                            spec: Box::new(spec),
                            epoch: def.epoch,
                            since: def.since,
                            reply,
                        })
                        .await;
                }
            }
            Some(_) => {}
        }
    }
    let gone: Vec<Name> = entries
        .keys()
        .filter(|n| !seen.contains(*n))
        .cloned()
        .collect();
    for name in gone {
        if let Some(e) = entries.remove(&name) {
            if let Some(h) = e.task {
                stop(h).await;
            }
        }
    }
    for (name, entry) in entries.iter_mut() {
        match &entry.task {
            Some(h) => {
                if ctx.store.lease().is_none() {
                    continue;
                }
                match ctx.store.claim(name.as_str()).await {
                    Ok(true) => h.lease_until.store(lease_deadline(ctx), Ordering::Release),
                    Ok(false) => {
                        tracing::warn!(
                            webhook = name.as_str(),
                            "another gateway delivers this webhook now"
                        );
                        if let Some(h) = entry.task.take() {
                            stop(h).await;
                        }
                    }
                    // Unrenewed, the claim lapses: the task stops calling at its deadline.
                    Err(e) => {
                        tracing::warn!(webhook = name.as_str(), error = %e, "cannot renew the webhook's claim")
                    }
                }
            }
            None => {
                if let Err(e) = adopt(ctx, name, entry).await {
                    tracing::warn!(webhook = name.as_str(), error = %e, "cannot take up the webhook");
                }
            }
        }
    }
    Ok(())
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
