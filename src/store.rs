//! The shared store: one Redis connection (pingora-independent, auto-reconnecting) that every
//! Redis call goes through, so each call is bounded by the configured timeout and the number of
//! calls in flight is capped. Redis down, slow or refusing is an `Err(StoreError)` the caller
//! turns into its documented fallback; it is never a panic and never a hang. The up/down state
//! is tracked here, logged once per transition and exported as a metric.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::aio::ConnectionManagerConfig;
use tokio::sync::Semaphore;

use crate::metrics;

/// Keys carry this hash tag so every Tollgate key lives in one Redis Cluster slot group.
pub const PREFIX: &str = "tollgate:{tg}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// No answer within the timeout.
    Timeout,
    /// Too many calls already in flight.
    Busy,
    /// Connection refused, reset, or Redis answered with an error.
    Failed,
    /// Redis is known to be down (an earlier call failed and no background call has reached it
    /// since): a request's call fails at once instead of waiting out the timeout.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSpec {
    pub url: String,
    pub timeout: Duration,
    pub max_pending: usize,
}

pub struct Store {
    pub spec: StoreSpec,
    pub client: redis::Client,
    /// Background chores (heartbeat, batched sync, admin, purges).
    conn: ConnectionManager,
    /// Calls made while a request waits (rate-limit scripts, key lookups, cache reads). Its own
    /// connection, opened lazily by the first such call, so its driver task runs on the proxy's
    /// worker threads: a call costs no wake-up of another thread (one per call, and a context
    /// switch each way, when the chores' connection on the control runtime carried them).
    request_conn: ConnectionManager,
    permits: Semaphore,
    up: AtomicBool,
}

impl Store {
    /// Connects lazily: a Redis that is down at start-up only makes the first calls fail.
    pub fn new(spec: StoreSpec) -> Result<Self, String> {
        let client = redis::Client::open(spec.url.as_str())
            .map_err(|e| format!("invalid Redis URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(spec.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(spec.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        let request_conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        Ok(Self {
            permits: Semaphore::new(spec.max_pending),
            spec,
            client,
            conn,
            request_conn,
            up: AtomicBool::new(true),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Run one Redis operation with the timeout and the in-flight cap (background work).
    pub async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.call_on(&self.conn, op, f).await
    }

    /// The same, for a call a request is waiting for: over the request-path connection. While
    /// Redis is known down it fails at once (`StoreError::Down`): an outage costs a node one
    /// timeout, not one per request. The background calls (the one-second heartbeat) keep
    /// trying and clear the state when Redis answers again.
    pub async fn call_for_request<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            metrics::REDIS_ERRORS.with_label_values(&[op, "down"]).inc();
            return Err(StoreError::Down);
        }
        self.call_on(&self.request_conn, op, f).await
    }

    async fn call_on<T, F, Fut>(
        &self,
        conn: &ConnectionManager,
        op: &'static str,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Ok(_permit) = self.permits.try_acquire() else {
            metrics::REDIS_ERRORS.with_label_values(&[op, "busy"]).inc();
            return Err(StoreError::Busy);
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.spec.timeout, f(conn.clone())).await;
        metrics::REDIS_SECONDS
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                log::debug!("redis {op}: {e}");
                Err(StoreError::Failed)
            }
            Err(_) => Err(StoreError::Timeout),
        };
        match &outcome {
            Ok(_) => self.mark(true),
            Err(e) => {
                let kind = if *e == StoreError::Timeout {
                    "timeout"
                } else {
                    "error"
                };
                metrics::REDIS_ERRORS.with_label_values(&[op, kind]).inc();
                self.mark(false);
            }
        }
        outcome
    }

    /// The URL without credentials, for logs.
    pub fn display_url(&self) -> String {
        match self.spec.url.split_once('@') {
            Some((scheme_user, host)) => {
                let scheme = scheme_user.split("://").next().unwrap_or("redis");
                format!("{scheme}://***@{host}")
            }
            None => self.spec.url.clone(),
        }
    }

    fn mark(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            metrics::REDIS_UP.set(i64::from(up));
            if up {
                log::warn!("redis {}: reachable again", self.display_url());
            } else {
                log::error!(
                    "redis {}: unreachable or too slow; falling back",
                    self.display_url()
                );
            }
        }
    }
}
