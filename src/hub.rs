//! The hub: fans committed events out to live subscribers, waking only those they concern.
//!
//! The log hands the hub every committed batch, in id order, after it is durable; the hub
//! never sees anything a crash could take back. Batches go into one shared, bounded ring that
//! each subscriber reads at its own pace. A subscriber more than the ring's capacity behind is
//! told it lagged, and goes back to the log from its cursor, so a slow subscriber never costs
//! memory beyond the ring, never slows publishers, and is never disconnected for being slow.
//! See [`Subscription`](crate::subscription::Subscription).
//!
//! Waking is selective: a subscriber registers its patterns, and a batch wakes only the
//! subscribers with a pattern matching one of its topics. Ten thousand idle subscribers of
//! other topics cost no CPU when an event is published. Literal patterns are found by hash;
//! wildcard patterns are grouped, so each distinct pattern is tested once per topic however
//! many subscribers share it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, Notify};

use crate::envelope::SharedEvent;
use crate::topic::{Pattern, PatternSet, Topic};

/// A batch of committed events in strictly increasing id order, shared by every subscriber.
pub type CommittedBatch = Arc<[SharedEvent]>;

/// Live fan-out of committed events. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    tx: broadcast::Sender<CommittedBatch>,
    interests: Mutex<Interests>,
}

/// Who waits for which pattern.
#[derive(Default)]
struct Interests {
    next_id: u64,
    /// Literal patterns (no wildcard), by the one topic each matches.
    literal: HashMap<Topic, Waiters>,
    /// Wildcard patterns, each once, with everyone waiting on it.
    wildcard: HashMap<Pattern, Waiters>,
}

type Waiters = HashMap<u64, Arc<Notify>>;

/// A subscriber's place in the hub: committed batches to read, and a signal that says when a
/// batch it cares about has arrived. Unregisters itself when dropped.
pub struct Registration {
    /// Every batch committed since registration, or a lag notice.
    pub live: broadcast::Receiver<CommittedBatch>,
    wake: Arc<Notify>,
    id: u64,
    patterns: PatternSet,
    inner: Arc<Inner>,
}

impl Registration {
    /// Resolves once a batch with a topic matching the registered patterns has been
    /// published since the last time this resolved (a wake-up is never lost, and may be
    /// spurious). Cancel-safe.
    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Ok(mut interests) = self.inner.interests.lock() else {
            return;
        };
        for p in self.patterns.patterns() {
            let map_entry = match p.as_topic() {
                Some(t) => interests.literal.get_mut(&t),
                None => interests.wildcard.get_mut(p),
            };
            if let Some(waiters) = map_entry {
                waiters.remove(&self.id);
                if waiters.is_empty() {
                    match p.as_topic() {
                        Some(t) => interests.literal.remove(&t),
                        None => interests.wildcard.remove(p),
                    };
                }
            }
        }
    }
}

impl Hub {
    /// A hub whose ring holds the last `capacity` committed batches.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Hub {
            inner: Arc::new(Inner {
                tx,
                interests: Mutex::new(Interests::default()),
            }),
        }
    }

    /// Hands a committed batch to every live subscriber and wakes those it concerns. Never
    /// waits on subscribers. Must be called in id order, with durable events only (the log's
    /// writer does). `topics` names every topic of the batch, each once: who is woken goes
    /// by it (the writer knows the set already, so the hub never walks a batch's events).
    pub fn publish(&self, batch: CommittedBatch, topics: &[Topic]) {
        debug_assert!(
            batch.iter().all(|e| topics.contains(e.topic())),
            "a batch's topics are all named"
        );
        // Into the ring first, then wake: a woken subscriber finds the batch there.
        let _ = self.inner.tx.send(batch.clone());
        let Ok(interests) = self.inner.interests.lock() else {
            return;
        };
        let mut woken: HashSet<u64> = HashSet::new();
        let mut wake = |waiters: &Waiters| {
            for (id, n) in waiters {
                if woken.insert(*id) {
                    n.notify_one();
                }
            }
        };
        for t in topics {
            if let Some(w) = interests.literal.get(t) {
                wake(w);
            }
        }
        for (p, w) in &interests.wildcard {
            if topics.iter().any(|t| p.matches(t)) {
                wake(w);
            }
        }
    }

    /// Registers a subscriber to `patterns`: every batch published from now on reaches its
    /// ring receiver (or it learns that it lagged), and the batches that match wake it.
    pub fn subscribe(&self, patterns: &PatternSet) -> Registration {
        let wake = Arc::new(Notify::new());
        // The receiver first: a batch published while registering is in the ring either way.
        let live = self.inner.tx.subscribe();
        let id = match self.inner.interests.lock() {
            Ok(mut interests) => {
                let id = interests.next_id;
                interests.next_id += 1;
                for p in patterns.patterns() {
                    let waiters = match p.as_topic() {
                        Some(t) => interests.literal.entry(t).or_default(),
                        None => interests.wildcard.entry(p.clone()).or_default(),
                    };
                    waiters.insert(id, wake.clone());
                }
                id
            }
            // A poisoned registry cannot wake anyone: wake this one at every chance instead.
            Err(_) => u64::MAX,
        };
        Registration {
            live,
            wake,
            id,
            patterns: patterns.clone(),
            inner: self.inner.clone(),
        }
    }

    /// Number of registered subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.inner.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::envelope::{Data, Event, EventId, NewEvent};

    fn pats(ps: &[&str]) -> PatternSet {
        PatternSet::new(ps.iter().map(|p| Pattern::parse(p).unwrap()).collect()).unwrap()
    }

    /// Publishes one event on each of `topics`, ids from `first`.
    fn publish(hub: &Hub, first: u64, topics: &[&str]) {
        let mut named: Vec<Topic> = Vec::new();
        for t in topics {
            let t = Topic::parse(t).unwrap();
            if !named.contains(&t) {
                named.push(t);
            }
        }
        hub.publish(batch(first, topics), &named);
    }

    fn batch(first: u64, topics: &[&str]) -> CommittedBatch {
        topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Arc::new(Event::new(
                    EventId(first + i as u64),
                    0,
                    NewEvent {
                        topic: Topic::parse(t).unwrap(),
                        event_type: None,
                        msg_id: None,
                        data: Data::Json("1".into()),
                    },
                ))
            })
            .collect::<Vec<_>>()
            .into()
    }

    async fn was_woken(r: &Registration) -> bool {
        tokio::time::timeout(Duration::from_millis(20), r.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_batch_wakes_only_the_subscribers_whose_patterns_match() {
        let hub = Hub::new(8);
        let exact = hub.subscribe(&pats(&["sensors/a"]));
        let star = hub.subscribe(&pats(&["sensors/*"]));
        let deep = hub.subscribe(&pats(&["sensors/**"]));
        let other = hub.subscribe(&pats(&["alarms/**", "sensors/b"]));
        publish(&hub, 1, &["sensors/a", "sensors/a/deeper"]);
        assert!(was_woken(&exact).await);
        assert!(was_woken(&star).await);
        assert!(was_woken(&deep).await);
        assert!(
            !was_woken(&other).await,
            "nothing for alarms/** or sensors/b"
        );
        // Everyone still received the batch in the ring, woken or not.
        let mut other = other;
        assert_eq!(other.live.try_recv().unwrap().len(), 2);
        publish(&hub, 3, &["alarms/x/y"]);
        assert!(was_woken(&other).await);
        assert!(!was_woken(&exact).await);
    }

    #[tokio::test]
    async fn a_wake_up_published_before_the_wait_is_not_lost() {
        let hub = Hub::new(8);
        let r = hub.subscribe(&pats(&["t"]));
        publish(&hub, 1, &["t"]);
        assert!(was_woken(&r).await);
        assert!(!was_woken(&r).await, "one batch, one wake-up");
    }

    #[tokio::test]
    async fn dropped_registrations_leave_no_interest_behind() {
        let hub = Hub::new(8);
        let a = hub.subscribe(&pats(&["x", "y/**"]));
        let b = hub.subscribe(&pats(&["y/**"]));
        drop(a);
        {
            let i = hub.inner.interests.lock().unwrap();
            assert!(i.literal.is_empty());
            assert_eq!(i.wildcard.len(), 1);
        }
        drop(b);
        let i = hub.inner.interests.lock().unwrap();
        assert!(i.wildcard.is_empty());
        assert_eq!(hub.subscriber_count(), 0);
    }
}
