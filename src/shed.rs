//! Load shedding: a cap on requests in flight (per route, and for the whole gateway) with an
//! optional bounded wait queue. A request holds its permits in its context until it ends. The
//! shedders live outside snapshots (keyed by scope and limits), so a reload that keeps a limit
//! keeps counting the requests already in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShedSpec {
    pub max_inflight: usize,
    /// Requests that may wait for a slot (0 = refuse at once).
    pub queue: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug)]
pub struct Shedder {
    pub spec: ShedSpec,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Shedder {
    pub fn new(spec: ShedSpec) -> Self {
        Self {
            spec,
            slots: Arc::new(Semaphore::new(spec.max_inflight)),
            waiting: AtomicUsize::new(0),
        }
    }

    /// A slot, at once or after a bounded wait; `None` = shed the request.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        if self.spec.queue == 0 {
            return None;
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.spec.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let got =
            tokio::time::timeout(self.spec.queue_timeout, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        got.ok().and_then(Result::ok)
    }

    pub fn in_flight(&self) -> usize {
        self.spec.max_inflight - self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sheds_exactly_at_the_limit_and_queues_within_bounds() {
        let s = Shedder::new(ShedSpec {
            max_inflight: 2,
            queue: 0,
            queue_timeout: Duration::ZERO,
        });
        let a = s.admit().await;
        let b = s.admit().await;
        assert!(a.is_some() && b.is_some());
        assert!(s.admit().await.is_none());
        drop(a);
        assert!(s.admit().await.is_some());

        let q = Arc::new(Shedder::new(ShedSpec {
            max_inflight: 1,
            queue: 1,
            queue_timeout: Duration::from_secs(5),
        }));
        let held = q.admit().await;
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.admit().await.is_some() }
        });
        while q.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // The queue is full: a third caller is shed at once.
        assert!(q.admit().await.is_none());
        drop(held);
        assert!(waiter.await.expect("join"));
    }
}
