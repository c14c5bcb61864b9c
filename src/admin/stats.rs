//! `GET /admin/stats`: one JSON snapshot for the dashboard, read from the Prometheus metrics
//! this process keeps (summed across their labels) plus the serving snapshot's backends and
//! the reload history.
//!
//! Everything here is cumulative since the process started (counters and histogram buckets);
//! the server keeps no per-client state. A viewer computes rates and windowed quantiles from
//! the difference between two snapshots and their `timestamp_ms` (the dashboard does this every
//! second). Output size is bounded: status classes are fixed, tiers come from the config (at
//! most `MAX_TIERS` are listed), backends and reloads come from the snapshot and the bounded
//! reload history.

use std::collections::BTreeMap;
use std::time::SystemTime;

use prometheus::core::Collector;
use prometheus::proto::{Metric, MetricFamily};
use serde_json::{json, Value};

use crate::control::Control;
use crate::metrics;

/// At most this many tiers are listed (the busiest first); tiers come from the config, so this
/// only guards against a pathological config.
const MAX_TIERS: usize = 64;

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

fn label<'a>(m: &'a Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value())
        .unwrap_or("")
}

fn families(c: &dyn Collector) -> Vec<MetricFamily> {
    c.collect()
}

/// Sum of a counter family's values, optionally only where `filter` holds.
fn counter_sum(c: &dyn Collector, filter: impl Fn(&Metric) -> bool) -> u64 {
    families(c)
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| filter(m))
        .map(|m| m.get_counter().value() as u64)
        .sum()
}

/// A histogram family summed across its labels: (bucket bounds with cumulative counts, count,
/// sum). Every series of one family shares the same bounds.
fn histogram_sum(c: &dyn Collector) -> (Vec<(f64, u64)>, u64, f64) {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let (mut count, mut sum) = (0u64, 0f64);
    for m in families(c).iter().flat_map(|f| f.get_metric()) {
        let h = m.get_histogram();
        count += h.sample_count();
        sum += h.sample_sum();
        for (i, b) in h.get_bucket().iter().enumerate() {
            match buckets.get_mut(i) {
                Some(slot) if slot.0 == b.upper_bound() => slot.1 += b.cumulative_count(),
                Some(_) => {}
                None => buckets.push((b.upper_bound(), b.cumulative_count())),
            }
        }
    }
    buckets.retain(|(le, _)| le.is_finite());
    (buckets, count, sum)
}

fn latency(c: &dyn Collector) -> Value {
    let (buckets, count, sum) = histogram_sum(c);
    json!({
        "count": count,
        "sum_seconds": sum,
        "buckets": buckets
            .into_iter()
            .map(|(le, n)| json!({"le": le, "count": n}))
            .collect::<Vec<_>>(),
    })
}

pub fn stats(control: &Control) -> Value {
    // Reloads before the snapshot (see `Admin::status`): the generation is never older than
    // the last reload listed.
    let reloads = control.reload_history();
    let snap = control.current.load();
    let now = SystemTime::now();
    let timestamp_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let uptime = now
        .duration_since(control.started_at)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    let mut by_status: BTreeMap<&str, u64> = CLASSES.iter().map(|c| (*c, 0)).collect();
    for m in families(&*metrics::REQUESTS)
        .iter()
        .flat_map(|f| f.get_metric())
    {
        let class = label(m, "status");
        let slot = CLASSES
            .iter()
            .find(|c| **c == class)
            .copied()
            .unwrap_or("other");
        *by_status.entry(slot).or_default() += m.get_counter().value() as u64;
    }
    let total: u64 = by_status.values().sum();

    // tier -> [allowed, limited, unavailable]
    let mut tiers: BTreeMap<String, [u64; 3]> = snap
        .tiers
        .iter()
        .map(|t| (t.name.to_string(), [0; 3]))
        .collect();
    for m in families(&*metrics::RATE_LIMIT_DECISIONS)
        .iter()
        .flat_map(|f| f.get_metric())
    {
        let slot = match label(m, "result") {
            "allowed" => 0,
            "limited" => 1,
            "unavailable" => 2,
            _ => continue,
        };
        let counts = tiers.entry(label(m, "tier").to_string()).or_default();
        counts[slot] += m.get_counter().value() as u64;
    }
    let mut tiers: Vec<_> = tiers.into_iter().collect();
    // Busiest first (refusals, then decisions), name as the tie-break: stable across polls.
    tiers.sort_by(|(an, a), (bn, b)| {
        (b[1] + b[2], b[0])
            .cmp(&(a[1] + a[2], a[0]))
            .then_with(|| an.cmp(bn))
    });
    tiers.truncate(MAX_TIERS);
    let tiers: Vec<Value> = tiers
        .into_iter()
        .map(|(name, [allowed, limited, unavailable])| {
            json!({"tier": name, "allowed": allowed, "limited": limited, "unavailable": unavailable})
        })
        .collect();

    let upstreams = upstreams_json(&snap);

    json!({
        "timestamp_ms": timestamp_ms,
        "uptime_seconds": uptime,
        "version": env!("CARGO_PKG_VERSION"),
        "config_generation": snap.generation,
        "in_flight": metrics::IN_FLIGHT.get(),
        "requests": {
            "total": total,
            "by_status": by_status,
        },
        "latency": latency(&*metrics::REQUEST_SECONDS),
        "upstream_latency": latency(&*metrics::UPSTREAM_SECONDS),
        "retries": counter_sum(&*metrics::RETRIES, |_| true),
        "shed": counter_sum(&*metrics::SHED, |_| true),
        "auth_failures": counter_sum(&*metrics::AUTH_FAILURES, |_| true),
        "rate_limit": {
            "mode": format!("{:?}", snap.limits.mode).to_lowercase(),
            "fallback": control.limiter.in_fallback(),
            "tiers": tiers,
        },
        "redis": snap.shared.as_ref().map(|s| json!({"up": s.store.is_up()})),
        "upstreams": upstreams,
        "reloads": reloads,
        "certificates": certificates_json(control, &snap),
    })
}

/// Every served certificate with its state: files are `valid` (they were checked at load),
/// ACME certificates say where their order stands.
fn certificates_json(control: &Control, snap: &crate::snapshot::Snapshot) -> Vec<Value> {
    let mut out: Vec<Value> = snap
        .tls
        .certificates
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "source": "file",
                "state": "valid",
                "not_after": c.not_after,
                "error": null,
            })
        })
        .collect();
    out.extend(control.acme.statuses().into_iter().map(|a| {
        json!({
            "name": a.name,
            "source": "acme",
            "state": a.state,
            "not_after": a.not_after,
            "error": a.error,
        })
    }));
    out
}

/// Every upstream with its backends' weight, health, breaker and in-flight attempts (shared by
/// `/admin/upstreams` and `/admin/stats`).
pub fn upstreams_json(snap: &crate::snapshot::Snapshot) -> Vec<serde_json::Value> {
    snap.upstreams
        .iter()
        .map(|u| {
            let backends: Vec<_> = u
                .spec
                .backends
                .iter()
                .zip(&u.backends)
                .map(|(b, s)| {
                    json!({
                        "addr": b.addr.to_string(),
                        "weight": b.weight,
                        "healthy": s.is_healthy(),
                        "breaker": s.breaker.state().as_str(),
                        "breaker_transitions": s.breaker.transitions.load(std::sync::atomic::Ordering::Relaxed),
                        "in_flight": s.in_flight(),
                    })
                })
                .collect();
            json!({"name": &*u.spec.name, "backends": backends})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_sum_across_labels_and_drop_inf() {
        let h = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("t_seconds", "t").buckets(vec![0.1, 1.0]),
            &["route"],
        )
        .expect("histogram");
        h.with_label_values(&["a"]).observe(0.05);
        h.with_label_values(&["b"]).observe(0.5);
        h.with_label_values(&["b"]).observe(5.0);
        let (buckets, count, sum) = histogram_sum(&h);
        assert_eq!(buckets, vec![(0.1, 1), (1.0, 2)]);
        assert_eq!(count, 3);
        assert!((sum - 5.55).abs() < 1e-9);
    }

    #[test]
    fn counters_sum_with_a_filter() {
        let c = prometheus::IntCounterVec::new(prometheus::Opts::new("t_total", "t"), &["k"])
            .expect("counter");
        c.with_label_values(&["x"]).inc_by(2);
        c.with_label_values(&["y"]).inc_by(3);
        assert_eq!(counter_sum(&c, |_| true), 5);
        assert_eq!(counter_sum(&c, |m| label(m, "k") == "y"), 3);
    }
}
