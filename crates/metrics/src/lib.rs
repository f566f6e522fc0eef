//! The Prometheus metrics of `rpc_proxy` and `rpc_lb`: a [`Registry`] holding the
//! `process_*` metrics, rendering in the classic text format (what `promtool check metrics`
//! 2.42 accepts, unlike OpenMetrics), and [`CallMetrics`], the per-call counters and
//! histograms. It sits on the call path (a call bumps a few atomics, see below); the admin
//! endpoint only reads it, when scraped. Depends on `prometheus` and `tracing` only: no
//! HTTP, no tokio.
//!
//! # Layout
//! - Registries: [`registry()`] (with the `process_*` metrics), [`register`], [`gauge`],
//!   [`gauge_vec`], [`counter`], [`counter_vec`], [`register_build_info`]; [`render`], the
//!   text a `GET /metrics` answers.
//! - Outcomes: [`Outcome`], the closed set of ways a call ends, declared with
//!   [`outcomes!`].
//! - Calls: [`CallMetrics`] (one per binary) hands out a [`ServiceCalls`] per service,
//!   which counts each method in a [`MethodCalls`]; a [`CallGuard`] times one call;
//!   [`Totals`] sums a service for status output.
//!
//! # Cost on the call path
//! The counters of a `(service, method)` pair are made once, on its first answered call (see
//! below), and found again in a small open-addressing table behind the service's [`ServiceCalls`] (which the caller
//! keeps with its own per-service state): a lookup hashes the method name and reads a slot,
//! with no lock, no allocation and no reference counting. A call then costs two
//! `Instant::now()` and four relaxed atomic adds on its own method's counters (started, one
//! outcome, one duration bucket, the duration sum); a call of a method without a label yet
//! also copies its name. The Prometheus families are built from
//! these atomics only when scraped, with series only for outcomes that happened.
//!
//! # Bounded labels
//! At most [`MAX_SERVICES`] service names and [`MAX_METHODS`] methods per service get their
//! own label value; later ones are counted under [`OTHER`]. Callers count calls for services
//! they do not know under one service of their choice (the binaries use `unknown`), never
//! under a name a client made up.
//!
//! Method names come from clients too, so a method gets its own label only once the backend
//! answered a call of it ([`Outcome::is_answer`]: a reply, declared exceptions included).
//! Until then its calls count under [`OTHER`]: a client sending hundreds of made-up names
//! (which only ever fail) cannot fill the table and push the real methods into [`OTHER`].
//! A call is counted where it started, so in-flight counts add up: under [`OTHER`] when its
//! method had no label yet; the one answered call that gives its method a label moves there
//! (started and finished both), as does any answered call of a method labelled meanwhile.
//! The binaries' placeholder [`UNKNOWN`] is labelled from its first call.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Services with a label value of their own; later ones count under [`OTHER`].
pub const MAX_SERVICES: usize = 1024;
/// Methods per service with a label value of their own; later ones count under [`OTHER`].
pub const MAX_METHODS: usize = 256;
/// The label value of the services and methods past the bounds, and of methods no call of
/// which was answered yet.
pub const OTHER: &str = "other";
/// The method label value the binaries count calls under when they have no method name to
/// give (a frame that names none, a service that is not known): a placeholder of theirs, not
/// a name from a client, so it is its own series from the first call, answered or not.
pub const UNKNOWN: &str = "unknown";

/// Upper bounds (seconds) of the request duration histograms: 0.5 ms to 30 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A fresh registry with the `process_*` metrics (CPU seconds, resident memory, open file
/// descriptors, start time, ...) of this process.
pub fn registry() -> Registry {
    let registry = Registry::new();
    register_process_metrics(&registry);
    registry
}

#[cfg(target_os = "linux")]
fn register_process_metrics(registry: &Registry) {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    if let Err(e) = registry.register(Box::new(collector)) {
        tracing::warn!(error = %e, "process metrics unavailable");
    }
}

#[cfg(not(target_os = "linux"))]
fn register_process_metrics(_registry: &Registry) {}

/// Registers `collector`, which must be new to `registry`.
///
/// # Panics
/// When the name is taken or invalid: a programming error, caught by the first test.
pub fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are static and registered once");
    collector
}

/// Registers a gauge.
///
/// # Panics
/// See [`register`].
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("valid metric name"),
    )
}

/// Registers a gauge with labels.
///
/// # Panics
/// See [`register`].
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name"),
    )
}

/// Registers a counter.
///
/// # Panics
/// See [`register`].
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid metric name"),
    )
}

/// Registers a counter with labels.
///
/// # Panics
/// See [`register`].
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name"),
    )
}

/// Registers `<prefix>_build_info{version}`, always 1.
pub fn register_build_info(registry: &Registry, prefix: &str, version: &str) {
    let info = gauge_vec(
        registry,
        &format!("{prefix}_build_info"),
        "Always 1; the version label tells which build runs.",
        &["version"],
    );
    info.with_label_values(&[version]).set(1);
}

/// Every metric of `registry` in the Prometheus text format (version 0.0.4).
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    out
}

/// How a call ended, as a closed set of label values.
pub trait Outcome: Copy + Send + Sync + 'static {
    /// Every outcome, each at its [`Outcome::index`].
    const ALL: &'static [Self];
    /// The outcome of a call whose [`CallGuard`] was dropped unfinished (caller gone).
    const DROPPED: Self;
    /// The position of this outcome in [`Outcome::ALL`].
    fn index(self) -> usize;
    /// The `outcome` label value.
    fn label(self) -> &'static str;
    /// Whether it counts as an error in status lines.
    fn is_error(self) -> bool;
    /// Whether the backend answered the call (a reply; declared exceptions are replies):
    /// this proves the method name real, so it may get its own label (see the crate doc).
    /// A `TApplicationException` is no proof: a backend answers made-up names with one.
    fn is_answer(self) -> bool;
}

/// Declares a call-outcome enum and its [`Outcome`] impl from one list of
/// `Variant => "label"` (in `ALL` order, each with its doc): `ok` names the one outcome that
/// is no error and the one that is an answer of the backend ([`Outcome::is_answer`]: give it
/// only to replies), `dropped` the [`Outcome::DROPPED`] one.
///
/// ```
/// rpc_metrics::outcomes! {
///     /// How a call ended.
///     pub enum Done {
///         /// Answered.
///         Ok => "ok",
///         /// The caller left.
///         Cancelled => "cancelled",
///     }
///     ok = Ok;
///     dropped = Cancelled;
/// }
/// use rpc_metrics::Outcome;
/// assert_eq!(Done::Cancelled.label(), "cancelled");
/// assert!(!Done::Ok.is_error());
/// assert!(Done::Ok.is_answer() && !Done::Cancelled.is_answer());
/// ```
#[macro_export]
macro_rules! outcomes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal, )+
        }
        ok = $ok:ident;
        dropped = $dropped:ident;
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $crate::Outcome for $name {
            const ALL: &'static [Self] = &[$($name::$variant,)+];
            const DROPPED: Self = $name::$dropped;

            fn index(self) -> usize {
                self as usize
            }

            fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            fn is_error(self) -> bool {
                self != $name::$ok
            }

            fn is_answer(self) -> bool {
                self == $name::$ok
            }
        }
    };
}

/// Calls and errors of one service since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls finished.
    pub calls: u64,
    /// Of which ended in an error outcome.
    pub errors: u64,
}

/// The bucket bounds in nanoseconds, for the call path (no float maths there).
fn bucket_bounds_ns() -> &'static [u64] {
    static BOUNDS: OnceLock<Vec<u64>> = OnceLock::new();
    BOUNDS.get_or_init(|| {
        DURATION_BUCKETS
            .iter()
            .map(|s| (s * 1e9).round() as u64)
            .collect()
    })
}

/// FNV-1a: a cheap hash for short method names (the table is not exposed to collisions
/// an attacker could exploit: only names the backend answered enter it, at most
/// [`MAX_METHODS`] of them).
fn fnv1a(text: &str) -> usize {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) as usize
}

// === impl CallMetrics ===

/// `<prefix>_requests_total{service,method,outcome}`,
/// `<prefix>_request_duration_seconds{service,method}` and
/// `<prefix>_inflight_requests{service}`: one collector over plain atomics per
/// `(service, method)`.
///
/// Handles live as long as the process (they are leaked on purpose, at most
/// [`MAX_SERVICES`] x ([`MAX_METHODS`] + 1) of them): a handle is a plain `&'static` reference, so
/// the call path does no reference counting and takes no lock.
#[derive(Debug)]
pub struct CallMetrics<O: Outcome> {
    shared: Arc<Shared<O>>,
}

#[derive(Debug)]
struct Shared<O: Outcome> {
    descs: [Desc; 3],
    services: Mutex<HashMap<String, &'static ServiceCalls<O>>>,
    max_services: usize,
    max_methods: usize,
}

impl<O: Outcome> CallMetrics<O> {
    /// Registers the three families under `prefix` (`rpc_proxy`, `rpc_lb`).
    ///
    /// # Panics
    /// See [`register`].
    pub fn register(registry: &Registry, prefix: &str) -> Self {
        Self::with_limits(registry, prefix, MAX_SERVICES, MAX_METHODS)
    }

    /// As [`CallMetrics::register`], with other label bounds (tests).
    ///
    /// # Panics
    /// See [`register`].
    pub fn with_limits(
        registry: &Registry,
        prefix: &str,
        max_services: usize,
        max_methods: usize,
    ) -> Self {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                format!("{prefix}_{name}"),
                help.to_owned(),
                labels.iter().map(|l| (*l).to_owned()).collect(),
                HashMap::new(),
            )
            .expect("valid metric name")
        };
        let shared = Arc::new(Shared {
            descs: [
                desc(
                    "requests_total",
                    "Calls finished, by service, method and outcome.",
                    &["service", "method", "outcome"],
                ),
                desc(
                    "request_duration_seconds",
                    "Time from receiving a call to its reply (or failure), in seconds.",
                    &["service", "method"],
                ),
                desc(
                    "inflight_requests",
                    "Calls received and not yet answered, by service.",
                    &["service"],
                ),
            ],
            services: Mutex::new(HashMap::new()),
            max_services,
            max_methods: max_methods.max(1),
        });
        registry
            .register(Box::new(Collect(shared.clone())))
            .expect("metric names are static and registered once");
        CallMetrics { shared }
    }

    /// The handles of `service` (made on first use; the same reference after that).
    /// Callers keep it with their per-service state, so calls do not look it up.
    pub fn service(&self, service: &str) -> &'static ServiceCalls<O> {
        let mut services = self
            .shared
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(found) = services.get(service) {
            return found;
        }
        let label = if services.len() >= self.shared.max_services {
            OTHER
        } else {
            service
        };
        if let Some(other) = services.get(label) {
            return other;
        }
        let calls: &'static ServiceCalls<O> = Box::leak(Box::new(ServiceCalls {
            name: label.to_owned(),
            table: OnceLock::new(),
            methods: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            other: OnceLock::new(),
            max_methods: self.shared.max_methods,
        }));
        services.insert(label.to_owned(), calls);
        calls
    }
}

/// The registered side of [`CallMetrics`]: builds the families when scraped.
struct Collect<O: Outcome>(Arc<Shared<O>>);

impl<O: Outcome> Collector for Collect<O> {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut services: Vec<&'static ServiceCalls<O>> = {
            let map = self.0.services.lock().unwrap_or_else(|e| e.into_inner());
            map.values().copied().collect()
        };
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let (mut requests, mut durations, mut inflight) = (Vec::new(), Vec::new(), Vec::new());
        for service in services {
            let mut service_inflight = 0u64;
            for method in service.methods() {
                let counts = method.read();
                service_inflight += counts.inflight;
                for (outcome, count) in O::ALL.iter().zip(&counts.outcomes) {
                    if *count > 0 {
                        let mut counter = proto::Counter::default();
                        counter.set_value(*count as f64);
                        let mut metric = proto::Metric::from_label(labels(&[
                            ("service", &service.name),
                            ("method", &method.method),
                            ("outcome", outcome.label()),
                        ]));
                        metric.set_counter(counter);
                        requests.push(metric);
                    }
                }
                if counts.timed > 0 {
                    let mut histogram = proto::Histogram::default();
                    histogram.set_sample_count(counts.timed);
                    histogram.set_sample_sum(counts.sum_seconds);
                    let mut cumulative = 0;
                    let buckets = DURATION_BUCKETS
                        .iter()
                        .zip(&counts.buckets)
                        .map(|(bound, count)| {
                            cumulative += count;
                            let mut bucket = proto::Bucket::default();
                            bucket.set_upper_bound(*bound);
                            bucket.set_cumulative_count(cumulative);
                            bucket
                        })
                        .collect();
                    histogram.set_bucket(buckets);
                    let mut metric = proto::Metric::from_label(labels(&[
                        ("service", &service.name),
                        ("method", &method.method),
                    ]));
                    metric.set_histogram(histogram);
                    durations.push(metric);
                }
            }
            let mut gauge = proto::Gauge::default();
            gauge.set_value(service_inflight as f64);
            let mut metric = proto::Metric::from_label(labels(&[("service", &service.name)]));
            metric.set_gauge(gauge);
            inflight.push(metric);
        }
        let [requests_desc, duration_desc, inflight_desc] = &self.0.descs;
        vec![
            family(requests_desc, MetricType::COUNTER, requests),
            family(duration_desc, MetricType::HISTOGRAM, durations),
            family(inflight_desc, MetricType::GAUGE, inflight),
        ]
    }
}

/// Label pairs sorted by name, as the crate's own metric vectors write them.
fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    let mut pairs = pairs.to_vec();
    pairs.sort_unstable_by_key(|(name, _)| *name);
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = proto::LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

// === impl ServiceCalls ===

/// The call metrics of one service: a method table filled with each method the backend
/// answered (see the crate doc), read without a lock.
#[derive(Debug)]
pub struct ServiceCalls<O: Outcome> {
    name: String,
    /// Open addressing over `2 * max_methods` (rounded up) slots, made on the first call;
    /// slots are only ever filled, so a probe that meets an empty slot has missed. Never
    /// holds [`OTHER`].
    table: OnceLock<Box<[OnceLock<&'static MethodCalls<O>>]>>,
    /// Every series ([`OTHER`] included) in order of creation; its lock also serialises
    /// inserts.
    methods: Mutex<Vec<&'static MethodCalls<O>>>,
    /// Methods in `table`, at most `max_methods`; changed under the `methods` lock only.
    count: AtomicUsize,
    /// The handles of the methods without a label of their own.
    other: OnceLock<&'static MethodCalls<O>>,
    max_methods: usize,
}

impl<O: Outcome> ServiceCalls<O> {
    /// The service label value.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn table(&self) -> &[OnceLock<&'static MethodCalls<O>>] {
        self.table.get_or_init(|| {
            let slots = (self.max_methods * 2).next_power_of_two();
            (0..slots).map(|_| OnceLock::new()).collect()
        })
    }

    /// Where `method` is in `table`, or the empty slot where it would go.
    fn probe<'t>(
        table: &'t [OnceLock<&'static MethodCalls<O>>],
        method: &str,
    ) -> Result<&'static MethodCalls<O>, &'t OnceLock<&'static MethodCalls<O>>> {
        let mask = table.len() - 1;
        let mut index = fnv1a(method) & mask;
        // The table is at most half full, so an empty slot is always found.
        loop {
            let slot = &table[index];
            match slot.get() {
                Some(found) if found.method == method => return Ok(found),
                Some(_) => index = (index + 1) & mask,
                None => return Err(slot),
            }
        }
    }

    /// The handles `method` is counted under now: its own once labelled (for [`UNKNOWN`]:
    /// made on first use), else [`OTHER`]'s.
    pub fn method(&self, method: &str) -> &'static MethodCalls<O> {
        match Self::probe(self.table(), method) {
            Ok(found) => found,
            Err(_) if method == UNKNOWN => self.label(method).unwrap_or_else(|| self.other()),
            Err(_) => self.other(),
        }
    }

    /// The handles of [`OTHER`] (also those of a method of that very name: one series).
    fn other(&self) -> &'static MethodCalls<O> {
        if let Some(other) = self.other.get() {
            return other;
        }
        let mut methods = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        self.other.get_or_init(|| {
            let other = MethodCalls::leak(OTHER);
            methods.push(other);
            other
        })
    }

    /// Whether `method`, unlabelled now, may still get a label of its own.
    fn may_label(&self, method: &str) -> bool {
        method != OTHER && self.count.load(Ordering::Relaxed) < self.max_methods
    }

    /// Gives `method`, which the backend answered, its own label (made on first answer):
    /// `None` for [`OTHER`] and past the bound.
    fn label(&self, method: &str) -> Option<&'static MethodCalls<O>> {
        let table = self.table();
        if let Ok(found) = Self::probe(table, method) {
            return Some(found);
        }
        if !self.may_label(method) {
            return None;
        }
        let mut methods = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        match Self::probe(table, method) {
            Ok(found) => Some(found),
            Err(_) if !self.may_label(method) => None,
            Err(slot) => {
                let calls = MethodCalls::leak(method);
                // Inserts hold the lock, so the slot found empty is still empty.
                let _ = slot.set(calls);
                methods.push(calls);
                self.count.fetch_add(1, Ordering::Relaxed);
                Some(calls)
            }
        }
    }

    fn methods(&self) -> Vec<&'static MethodCalls<O>> {
        self.methods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts timing a call of `method` now; it counts as in flight until finished.
    pub fn start(&'static self, method: &str) -> CallGuard<O> {
        self.start_at(method, Instant::now())
    }

    /// Starts timing a call of `method` that arrived at `started`. Under [`OTHER`] while
    /// `method` has no label; an answer gives it one (see the crate doc). Only such calls
    /// allocate (a copy of the name).
    pub fn start_at(&'static self, method: &str, started: Instant) -> CallGuard<O> {
        let (calls, unlabelled) = match Self::probe(self.table(), method) {
            Ok(found) => (found, None),
            Err(_) if method == UNKNOWN => (self.method(method), None),
            Err(_) => (
                self.other(),
                self.may_label(method).then(|| Unlabelled {
                    service: self,
                    method: method.into(),
                }),
            ),
        };
        calls.started.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            calls: Some(calls),
            unlabelled,
            started,
        }
    }

    /// Counts a call of `method` that ended at once with `outcome` (no duration: it never
    /// got going, e.g. a protocol error). It never reached a backend, so it gives `method`
    /// no label.
    pub fn record(&self, method: &str, outcome: O) {
        let calls = self.method(method);
        calls.started.fetch_add(1, Ordering::Relaxed);
        calls.outcomes[outcome.index()].fetch_add(1, Ordering::Release);
    }

    /// Calls received and not answered now.
    pub fn inflight(&self) -> u64 {
        self.methods().iter().map(|m| m.read().inflight).sum()
    }

    /// Calls and errors since start, summed over methods.
    pub fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for method in self.methods() {
            let counts = method.read();
            for (outcome, count) in O::ALL.iter().zip(&counts.outcomes) {
                totals.calls += count;
                if outcome.is_error() {
                    totals.errors += count;
                }
            }
        }
        totals
    }

    /// Calls timed since start per duration bucket, summed over methods: one count per bound
    /// of [`DURATION_BUCKETS`], then the calls past every bound (not cumulative). The
    /// difference of two readings is the histogram of the calls between them, for
    /// [`quantile`].
    pub fn duration_buckets(&self) -> Vec<u64> {
        let mut sums = vec![0; DURATION_BUCKETS.len() + 1];
        for method in self.methods() {
            for (sum, count) in sums.iter_mut().zip(method.read().buckets) {
                *sum += count;
            }
        }
        sums
    }
}

/// The `q`-quantile (`0.0` to `1.0`), in seconds, of the durations counted in `buckets` (as
/// [`ServiceCalls::duration_buckets`] reads them, or the difference of two readings),
/// estimated as Prometheus' `histogram_quantile` does: linearly within the bucket it falls
/// in, the first bucket starting at 0. Calls past the last bound count as that bound. `None`
/// when `buckets` holds no call.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = DURATION_BUCKETS.get(i) else {
                break;
            };
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            return Some(lower + (upper - lower) * (rank - below as f64) / count as f64);
        }
        below += count;
    }
    DURATION_BUCKETS.last().copied()
}

// === impl MethodCalls ===

/// The counters of one `(service, method)` pair.
#[derive(Debug)]
pub struct MethodCalls<O: Outcome> {
    method: String,
    /// Calls started; in flight = started - finished.
    started: AtomicU64,
    /// Calls finished, per outcome (indexed by [`Outcome::index`]).
    outcomes: Box<[AtomicU64]>,
    /// Timed calls per duration bucket (non-cumulative; the last one is past every bound).
    buckets: Box<[AtomicU64]>,
    /// Sum of the durations timed, in nanoseconds.
    sum_ns: AtomicU64,
    _outcome: PhantomData<O>,
}

/// One consistent-enough reading of a [`MethodCalls`].
struct Counts {
    outcomes: Vec<u64>,
    buckets: Vec<u64>,
    timed: u64,
    sum_seconds: f64,
    inflight: u64,
}

impl<O: Outcome> MethodCalls<O> {
    fn leak(method: &str) -> &'static Self {
        Box::leak(Box::new(MethodCalls {
            method: method.to_owned(),
            started: AtomicU64::new(0),
            outcomes: O::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            buckets: (0..=DURATION_BUCKETS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum_ns: AtomicU64::new(0),
            _outcome: PhantomData,
        }))
    }

    /// The method label value.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Calls of this method that ended with `outcome`.
    pub fn count(&self, outcome: O) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Acquire)
    }

    fn finish(&self, outcome: O, started: Instant) {
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bucket = bucket_bounds_ns().partition_point(|bound| *bound < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(nanos, Ordering::Relaxed);
        // Release: a reader that sees this finish also sees the start before it.
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Release);
    }

    fn read(&self) -> Counts {
        // Finished before started: every finish seen has its start seen too.
        let outcomes: Vec<u64> = self
            .outcomes
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect();
        let started = self.started.load(Ordering::Relaxed);
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        Counts {
            inflight: started.saturating_sub(outcomes.iter().sum()),
            timed: buckets.iter().sum(),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            outcomes,
            buckets,
        }
    }
}

// === impl CallGuard ===

/// One call being timed. [`CallGuard::finish`] records its outcome and duration; dropping it
/// unfinished records [`Outcome::DROPPED`].
#[derive(Debug)]
pub struct CallGuard<O: Outcome> {
    /// Where the call was counted as started.
    calls: Option<&'static MethodCalls<O>>,
    /// Set when it started under [`OTHER`] for a method that may still get a label.
    unlabelled: Option<Unlabelled<O>>,
    started: Instant,
}

/// A call's method that had no label when the call started.
#[derive(Debug)]
struct Unlabelled<O: Outcome> {
    service: &'static ServiceCalls<O>,
    method: Box<str>,
}

impl<O: Outcome> CallGuard<O> {
    /// A guard that records nothing (tests, and calls not worth counting).
    pub fn detached() -> Self {
        CallGuard {
            calls: None,
            unlabelled: None,
            started: Instant::now(),
        }
    }

    /// When the call arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records how the call ended. An answer ([`Outcome::is_answer`]) gives its method its
    /// own label if it had none, and the call moves there.
    pub fn finish(mut self, outcome: O) {
        let Some(mut calls) = self.calls.take() else {
            return;
        };
        if let Some(unlabelled) = self.unlabelled.take()
            && outcome.is_answer()
            && let Some(labelled) = unlabelled.service.label(&unlabelled.method)
        {
            // Started under the label before unstarted under `other`: a scrape in between
            // may count the call in flight twice, never a finish without its start.
            labelled.started.fetch_add(1, Ordering::Relaxed);
            calls.started.fetch_sub(1, Ordering::Relaxed);
            calls = labelled;
        }
        calls.finish(outcome, self.started);
    }

    /// Records how the call ended without taking `outcome` as an answer of the backend,
    /// whatever it is: for a ONEWAY call, done once written, which no backend answers. Its
    /// method gets no label from it.
    pub fn finish_unanswered(mut self, outcome: O) {
        self.unlabelled = None;
        if let Some(calls) = self.calls.take() {
            calls.finish(outcome, self.started);
        }
    }
}

impl<O: Outcome> Drop for CallGuard<O> {
    fn drop(&mut self) {
        if let Some(calls) = self.calls.take() {
            calls.finish(O::DROPPED, self.started);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Test {
        Ok,
        Failed,
        Cancelled,
    }

    impl Outcome for Test {
        const ALL: &'static [Self] = &[Test::Ok, Test::Failed, Test::Cancelled];
        const DROPPED: Self = Test::Cancelled;
        fn index(self) -> usize {
            self as usize
        }
        fn label(self) -> &'static str {
            match self {
                Test::Ok => "ok",
                Test::Failed => "failed",
                Test::Cancelled => "cancelled",
            }
        }
        fn is_error(self) -> bool {
            self != Test::Ok
        }
        fn is_answer(self) -> bool {
            self == Test::Ok
        }
    }

    fn text(registry: &Registry) -> String {
        String::from_utf8(render(registry)).unwrap()
    }

    #[test]
    fn calls_are_counted_by_service_method_and_outcome() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        let echo = metrics.service("echo");
        assert!(std::ptr::eq(echo, metrics.service("echo")), "cached");
        let guard = echo.start("echo");
        assert_eq!(echo.inflight(), 1);
        guard.finish(Test::Ok);
        echo.start("echo").finish(Test::Failed);
        // Never answered: no label of its own.
        drop(echo.start("add"));
        echo.record("add", Test::Failed);
        assert_eq!(echo.method("add").method(), OTHER);
        assert_eq!(echo.inflight(), 0);
        assert_eq!(
            echo.totals(),
            Totals {
                calls: 4,
                errors: 3
            }
        );
        assert_eq!(echo.method("echo").count(Test::Ok), 1);
        let out = text(&registry);
        for line in [
            "# TYPE t_requests_total counter",
            r#"t_requests_total{method="echo",outcome="ok",service="echo"} 1"#,
            r#"t_requests_total{method="echo",outcome="failed",service="echo"} 1"#,
            r#"t_requests_total{method="other",outcome="cancelled",service="echo"} 1"#,
            r#"t_requests_total{method="other",outcome="failed",service="echo"} 1"#,
            "# TYPE t_request_duration_seconds histogram",
            r#"t_request_duration_seconds_count{method="echo",service="echo"} 2"#,
            r#"t_request_duration_seconds_count{method="other",service="echo"} 1"#,
            r#"t_request_duration_seconds_bucket{method="echo",service="echo",le="+Inf"} 2"#,
            r#"t_inflight_requests{service="echo"} 0"#,
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        assert!(
            !out.contains(r#"method="echo",outcome="cancelled""#),
            "no series for outcomes that never happened"
        );
    }

    #[test]
    fn duration_buckets_sum_methods_and_quantiles_interpolate() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        let echo = metrics.service("echo");
        let started = Instant::now() - std::time::Duration::from_secs(60);
        echo.start("echo").finish(Test::Ok);
        echo.start_at("add", started).finish(Test::Failed);
        let buckets = echo.duration_buckets();
        assert_eq!(buckets.len(), DURATION_BUCKETS.len() + 1);
        assert_eq!(buckets.iter().sum::<u64>(), 2, "both methods, `other` too");
        assert_eq!(
            buckets[DURATION_BUCKETS.len()],
            1,
            "60 s is past every bound"
        );

        assert_eq!(quantile(&[0; 16], 0.5), None);
        // 10 calls in (0.5 ms, 1 ms], 10 in (1 ms, 2.5 ms].
        let mut two = vec![0; 16];
        two[1] = 10;
        two[2] = 10;
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-9;
        assert!(close(quantile(&two, 0.5), 0.001));
        assert!(close(quantile(&two, 0.25), 0.00075));
        assert!(close(quantile(&two, 1.0), 0.0025));
        // Past the last bound: that bound.
        assert_eq!(quantile(&buckets, 0.99), Some(30.0));
    }

    #[test]
    fn labels_are_bounded() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::with_limits(&registry, "t", 2, 3);
        let a = metrics.service("a");
        metrics.service("b");
        assert_eq!(metrics.service("c").name(), OTHER);
        assert!(std::ptr::eq(metrics.service("d"), metrics.service("c")));
        for n in 0..10 {
            a.start(&format!("m{n}")).finish(Test::Ok);
        }
        assert_eq!(a.method("m9").method(), OTHER);
        assert_eq!(a.method("m1").method(), "m1");
        let b = metrics.service("b");
        b.start(OTHER).finish(Test::Ok);
        for n in 0..5 {
            b.start(&format!("n{n}")).finish(Test::Ok);
        }
        assert!(
            std::ptr::eq(b.method("n4"), b.method(OTHER)),
            "one `other` series, even with a method of that name"
        );
        let out = text(&registry);
        assert!(out.contains(r#"t_requests_total{method="other",outcome="ok",service="a"} 7"#));
        assert!(out.contains(r#"t_requests_total{method="other",outcome="ok",service="b"} 3"#));
        assert!(!out.contains("m3"), "{out}");
    }

    /// A client sends calls of 300 made-up methods first (each only ever fails), then calls
    /// of a real one that the backend answers: the real one still gets its own label, the
    /// made-up ones never do.
    #[test]
    fn made_up_method_names_never_push_real_ones_out() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        let echo = metrics.service("echo");
        for n in 0..300 {
            let junk = format!("junk{n}");
            echo.start(&junk).finish(Test::Failed);
            drop(echo.start(&junk));
            echo.record(&junk, Test::Failed);
        }
        for _ in 0..3 {
            echo.start("echo").finish(Test::Ok);
        }
        assert_eq!(echo.method("echo").method(), "echo");
        assert_eq!(echo.method("junk7").method(), OTHER);
        let out = text(&registry);
        for line in [
            r#"t_requests_total{method="echo",outcome="ok",service="echo"} 3"#,
            r#"t_requests_total{method="other",outcome="failed",service="echo"} 600"#,
            r#"t_requests_total{method="other",outcome="cancelled",service="echo"} 300"#,
            r#"t_inflight_requests{service="echo"} 0"#,
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        assert!(!out.contains("junk"), "{out}");
        assert!(!out.contains(r#"method="other",outcome="ok""#), "{out}");
    }

    /// Calls of a method not labelled yet are counted where they started: in flight under
    /// `other` until they end, there unless answered.
    #[test]
    fn calls_stay_where_they_started_until_answered() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        let echo = metrics.service("echo");
        let failing = echo.start("m");
        let answered = echo.start("m");
        let held = echo.start("m");
        assert_eq!(echo.other().read().inflight, 3);
        answered.finish(Test::Ok);
        assert_eq!(echo.method("m").method(), "m");
        assert_eq!(echo.other().read().inflight, 2, "the answered call moved");
        assert_eq!(echo.method("m").read().inflight, 0);
        assert_eq!(echo.inflight(), 2);
        failing.finish(Test::Failed);
        // Answered after its method got a label: moves there too.
        held.finish(Test::Ok);
        // ONEWAY: done once written, no answer, no label.
        echo.start("send").finish_unanswered(Test::Ok);
        assert_eq!(echo.method("send").method(), OTHER);
        assert_eq!(echo.inflight(), 0);
        assert_eq!(echo.method("m").count(Test::Ok), 2);
        assert_eq!(echo.other().count(Test::Failed), 1);
        assert_eq!(echo.other().count(Test::Ok), 1);
        assert_eq!(
            echo.totals(),
            Totals {
                calls: 4,
                errors: 1
            }
        );
        let out = text(&registry);
        assert!(
            out.contains(r#"t_request_duration_seconds_count{method="m",service="echo"} 2"#),
            "{out}"
        );
    }

    #[test]
    fn the_unknown_placeholder_is_labelled_from_the_first_call() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        let unknown = metrics.service(UNKNOWN);
        unknown.record(UNKNOWN, Test::Failed);
        unknown.start(UNKNOWN).finish(Test::Failed);
        assert_eq!(unknown.method(UNKNOWN).method(), UNKNOWN);
        assert_eq!(unknown.method(UNKNOWN).count(Test::Failed), 2);
        let out = text(&registry);
        assert!(
            out.contains(
                r#"t_requests_total{method="unknown",outcome="failed",service="unknown"} 2"#
            ),
            "{out}"
        );
    }

    /// Once `max_methods` methods have labels, a newly answered one stays under `other`.
    #[test]
    fn answered_methods_past_the_bound_stay_other() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::with_limits(&registry, "t", 4, 2);
        let echo = metrics.service("echo");
        for name in ["a", "b", "c", "c"] {
            echo.start(name).finish(Test::Ok);
        }
        assert_eq!(echo.method("b").method(), "b");
        assert_eq!(echo.method("c").method(), OTHER);
        assert_eq!(echo.other().count(Test::Ok), 2);
        assert_eq!(echo.inflight(), 0);
    }

    #[test]
    fn concurrent_first_sights_make_one_series_each() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        let echo = metrics.service("echo");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for n in 0..2000 {
                        echo.start(&format!("m{}", n % 50)).finish(Test::Ok);
                    }
                });
            }
        });
        assert_eq!(echo.methods().len(), 51, "50 methods and `other`");
        assert_eq!(echo.totals().calls, 8000);
        assert_eq!(echo.inflight(), 0);
        assert_eq!(echo.method("m7").count(Test::Ok), 160);
        assert_eq!(
            echo.other().count(Test::Ok),
            0,
            "every answered call moved to its label"
        );
    }

    #[test]
    fn durations_land_in_their_bucket() {
        let registry = Registry::new();
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        let echo = metrics.service("echo");
        let now = Instant::now();
        let ago = |ms| {
            now.checked_sub(std::time::Duration::from_millis(ms))
                .unwrap()
        };
        echo.start_at("m", ago(3)).finish(Test::Ok);
        echo.start_at("m", ago(60_000)).finish(Test::Ok);
        let out = text(&registry);
        for line in [
            r#"t_request_duration_seconds_bucket{method="m",service="echo",le="0.0025"} 0"#,
            r#"t_request_duration_seconds_bucket{method="m",service="echo",le="0.005"} 1"#,
            r#"t_request_duration_seconds_bucket{method="m",service="echo",le="30"} 1"#,
            r#"t_request_duration_seconds_bucket{method="m",service="echo",le="+Inf"} 2"#,
            r#"t_request_duration_seconds_count{method="m",service="echo"} 2"#,
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
    }

    #[test]
    fn detached_guard_records_nothing() {
        let guard = CallGuard::<Test>::detached();
        assert!(guard.started() <= Instant::now());
        guard.finish(Test::Ok);
    }

    #[test]
    fn registry_has_process_metrics_and_build_info() {
        let registry = registry();
        register_build_info(&registry, "t", "1.2.3");
        let out = text(&registry);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            r#"t_build_info{version="1.2.3"} 1"#,
        ] {
            assert!(out.contains(name), "missing {name} in\n{out}");
        }
    }

    /// The rendered text passes `promtool check metrics` (when promtool is installed).
    #[test]
    fn promtool_accepts_the_text() {
        let registry = registry();
        register_build_info(&registry, "t", "1");
        let metrics = CallMetrics::<Test>::register(&registry, "t");
        metrics.service("echo").start("echo").finish(Test::Ok);
        counter(&registry, "t_things_total", "Things.").inc();
        gauge(&registry, "t_queue_depth", "Queue.").set(3);
        let mut child = match std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!("skipped: promtool not runnable ({e}); apt-get install prometheus");
                return;
            }
        };
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&render(&registry))
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
