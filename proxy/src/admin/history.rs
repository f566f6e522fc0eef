//! The last minute of each service, for the status page's charts (`GET /`,
//! `GET /status/history`): every [`SAMPLE_EVERY`] the sampler reads each routed service's
//! call totals and duration histogram, the counters the call path keeps anyway
//! ([`rpc_metrics`]), and keeps the readings of the last [`WINDOW`] intervals. Calls per
//! second, errors and p50/p99 come from differences of two readings, so the call path does
//! no extra work for the page.
//!
//! # Bounds
//! A service keeps at most [`WINDOW`] + 1 readings (a time, two counters and one count per
//! duration bucket each: under 200 bytes, about 12 KB a service). Only services in the routing table are
//! sampled, so ZooKeeper bounds their number; a service that leaves the table loses its
//! readings at the next sample.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rpc_metrics::quantile;
use serde_json::{Value, json};

use crate::route::Router;

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Intervals kept per service: one minute of [`SAMPLE_EVERY`].
pub const WINDOW: usize = 60;

/// One reading of a service's counters, all since the proxy started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// When it was taken.
    pub at: Instant,
    /// Calls finished.
    pub calls: u64,
    /// Of which errors.
    pub errors: u64,
    /// Timed calls per duration bucket (see [`rpc_metrics::ServiceCalls::duration_buckets`]).
    pub buckets: Vec<u64>,
}

/// What happened between two readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// Calls finished per second.
    pub calls_per_s: f64,
    /// Errors among them (a count, not a rate).
    pub errors: u64,
    /// Median duration, milliseconds; `None` without a timed call.
    pub p50_ms: Option<f64>,
    /// 99th percentile duration, milliseconds; `None` without a timed call.
    pub p99_ms: Option<f64>,
}

impl Span {
    /// The calls between `before` and `after`.
    fn between(before: &Reading, after: &Reading) -> Span {
        let seconds = after.at.saturating_duration_since(before.at).as_secs_f64();
        let calls = after.calls.saturating_sub(before.calls);
        let delta: Vec<u64> = after
            .buckets
            .iter()
            .zip(&before.buckets)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let ms = |q| quantile(&delta, q).map(|s| s * 1000.0);
        Span {
            calls_per_s: if seconds > 0.0 {
                calls as f64 / seconds
            } else {
                0.0
            },
            errors: after.errors.saturating_sub(before.errors),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }
}

/// The readings of every routed service.
#[derive(Debug, Default)]
pub struct History {
    services: Mutex<HashMap<String, VecDeque<Reading>>>,
}

// === impl History ===

impl History {
    /// No readings yet.
    pub fn new() -> Self {
        History::default()
    }

    /// Reads every service of `router`'s table now; forgets the services no longer in it.
    pub fn sample(&self, router: &Router) {
        let now = Instant::now();
        let table = router.snapshot();
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.retain(|name, _| table.iter().any(|s| &s.name == name));
        for service in &table {
            let totals = service.calls.totals();
            let reading = Reading {
                at: now,
                calls: totals.calls,
                errors: totals.errors,
                buckets: service.calls.duration_buckets(),
            };
            push(services.entry(service.name.clone()).or_default(), reading);
        }
    }

    /// Adds one reading of `service` (the sampler's step, and tests').
    pub fn record(&self, service: &str, reading: Reading) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        push(services.entry(service.to_owned()).or_default(), reading);
    }

    /// The `GET /status/history` document: per service, the last minute as a whole
    /// (`minute`, `null` before two readings) and interval by interval (`series`, oldest
    /// first, at most [`WINDOW`] values each).
    pub fn to_json(&self) -> Value {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = services.keys().collect();
        names.sort();
        let services: Vec<Value> = names
            .into_iter()
            .map(|name| {
                let readings = &services[name];
                let spans: Vec<Span> = readings
                    .iter()
                    .zip(readings.iter().skip(1))
                    .map(|(before, after)| Span::between(before, after))
                    .collect();
                let minute = match (readings.front(), readings.back()) {
                    (Some(first), Some(last)) if readings.len() > 1 => {
                        let span = Span::between(first, last);
                        json!({
                            "seconds": round(last.at.saturating_duration_since(first.at).as_secs_f64()),
                            "calls_per_s": round(span.calls_per_s),
                            "errors": span.errors,
                            "p50_ms": span.p50_ms.map(round),
                            "p99_ms": span.p99_ms.map(round),
                        })
                    }
                    _ => Value::Null,
                };
                json!({
                    "name": name,
                    "minute": minute,
                    "series": {
                        "calls_per_s": spans.iter().map(|s| round(s.calls_per_s)).collect::<Vec<_>>(),
                        "errors": spans.iter().map(|s| s.errors).collect::<Vec<_>>(),
                        "p50_ms": spans.iter().map(|s| s.p50_ms.map(round)).collect::<Vec<_>>(),
                        "p99_ms": spans.iter().map(|s| s.p99_ms.map(round)).collect::<Vec<_>>(),
                    },
                })
            })
            .collect();
        json!({
            "interval_ms": SAMPLE_EVERY.as_millis() as u64,
            "window": WINDOW,
            "services": services,
        })
    }
}

/// Appends `reading`, dropping the oldest past [`WINDOW`] + 1.
fn push(readings: &mut VecDeque<Reading>, reading: Reading) {
    if readings.len() > WINDOW {
        readings.pop_front();
    }
    readings.push_back(reading);
}

/// Three decimals are plenty for a chart, and keep the JSON short.
fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Samples `router` into `history` every [`SAMPLE_EVERY`] until nothing else holds `history`
/// (the admin routes own it: the sampler ends with them).
pub async fn run(history: Weak<History>, router: Arc<Router>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(history) = history.upgrade() else {
            return;
        };
        history.sample(&router);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_registry::{DiscoveryEvent, Endpoint, EndpointInfo};

    use crate::metrics::Outcome;
    use crate::upstream::UpstreamSettings;

    fn reading(at: Instant, calls: u64, errors: u64, fast: u64, slow: u64) -> Reading {
        let mut buckets = vec![0; rpc_metrics::DURATION_BUCKETS.len() + 1];
        buckets[1] = fast; // (0.5 ms, 1 ms]
        buckets[8] = slow; // (100 ms, 250 ms]
        Reading {
            at,
            calls,
            errors,
            buckets,
        }
    }

    #[test]
    fn spans_come_from_differences_of_readings() {
        let history = History::new();
        let start = Instant::now();
        history.record("echo", reading(start, 100, 1, 100, 0));
        assert_eq!(history.to_json()["services"][0]["minute"], Value::Null);
        history.record(
            "echo",
            reading(start + Duration::from_secs(2), 120, 3, 118, 2),
        );
        history.record(
            "echo",
            reading(start + Duration::from_secs(3), 120, 3, 118, 2),
        );
        let doc = history.to_json();
        let echo = &doc["services"][0];
        assert_eq!(echo["name"], "echo");
        assert_eq!(
            echo["series"],
            json!({
                "calls_per_s": [10.0, 0.0],
                "errors": [2, 0],
                "p50_ms": [0.778, null],
                "p99_ms": [235.0, null],
            })
        );
        assert_eq!(
            echo["minute"],
            json!({"seconds": 3.0, "calls_per_s": 6.667, "errors": 2, "p50_ms": 0.778,
                "p99_ms": 235.0})
        );
        assert_eq!(doc["interval_ms"], 1000);
    }

    #[test]
    fn readings_are_bounded_to_the_window() {
        let history = History::new();
        let start = Instant::now();
        for i in 0..(WINDOW as u64 * 3) {
            history.record("echo", reading(start + Duration::from_secs(i), i, 0, i, 0));
        }
        let doc = history.to_json();
        let series = &doc["services"][0]["series"]["calls_per_s"];
        assert_eq!(series.as_array().unwrap().len(), WINDOW);
        assert_eq!(doc["services"][0]["minute"]["seconds"], WINDOW as f64);
    }

    #[tokio::test]
    async fn the_sampler_follows_the_table_and_stops_with_its_owner() {
        let router = Arc::new(Router::new(Arc::new(UpstreamSettings {
            max_pending: 100,
            ..UpstreamSettings::default()
        })));
        let endpoints = |service: &str| DiscoveryEvent::Endpoints {
            service: service.into(),
            endpoints: vec![Endpoint {
                node: "n".into(),
                info: EndpointInfo {
                    frontend: "127.0.0.1:1".into(),
                    ..Default::default()
                },
            }],
        };
        router.apply(endpoints("a"));
        router.apply(endpoints("b"));
        router.calls_for("a").start("m").finish(Outcome::Ok);
        let history = Arc::new(History::new());
        history.sample(&router);
        router.calls_for("a").start("m").finish(Outcome::Timeout);
        router.apply(DiscoveryEvent::ServiceRemoved {
            service: "b".into(),
        });
        history.sample(&router);
        let doc = history.to_json();
        let names: Vec<_> = doc["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].clone())
            .collect();
        assert_eq!(names, [json!("a")], "b left the table");
        assert_eq!(doc["services"][0]["series"]["errors"], json!([1]));

        let sampler = tokio::spawn(run(Arc::downgrade(&history), router));
        drop(history);
        tokio::time::timeout(Duration::from_secs(5), sampler)
            .await
            .expect("the sampler ends once its history is dropped")
            .unwrap();
    }
}
