//! Outlier ejection per endpoint and the retry budget per service (CONTRACT section 9, "Proxy
//! resilience"). Sits beside the routing table: the router's pick asks an endpoint's
//! [`Outlier`] state whether it may take a call ([`ServiceHealth::admission`]) and how loaded
//! it looks ([`Outlier::penalty`]); the client connection's forward loop reports the verdict
//! of each attempt ([`ServiceHealth::record`]) and asks the service's budget before a retry
//! ([`ServiceHealth::try_retry`]).
//!
//! One [`ServiceHealth`] per service name lives as long as the process (the router keeps it
//! across table changes), so every connection and every endpoint of a service shares one
//! budget and one ejection count. An endpoint's [`Outlier`] lives in its
//! [`Endpoint`](crate::upstream::Endpoint), which the router also keeps across table changes.
//!
//! # Rules
//! - Counted failures (connect failure, reset, heartbeat loss, the proxy's own timeout, an
//!   exception an LB marked with field 3) in a row eject an endpoint once they reach
//!   `outlier_consecutive_failures`; anything else that comes back resets the count.
//! - The n-th ejection in a row lasts n x `outlier_base_ejection_ms` (at most 10x), jittered
//!   +-10 %; n decays by one for each base period the endpoint has served since.
//! - At most `outlier_max_ejection_percent` of a service's endpoints are ejected (at least one
//!   may be). After its ejection time an endpoint gets one probe call: success readmits it,
//!   a counted failure ejects it again. The router balances over every endpoint when all of
//!   them would be ejected; such calls act as probes too.
//! - Each counted failure also adds one to the endpoint's balancing penalty, which fades over
//!   [`PENALTY_WINDOW`]: an endpoint that answers fast with refusals or failures does not
//!   look least loaded.
//! - Retries of a service in the last 10 s stay within `retry_budget_percent` of its calls in
//!   those 10 s plus `retry_min_per_sec` x 10 (Finagle's `RetryBudget`, counted in ten
//!   one-second slots).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};
use rand::Rng;
use rpc_config::ResilienceConfig;

use crate::upstream::SharedSettings;

/// How long a counted failure weighs on an endpoint's balancing score (fading linearly).
pub const PENALTY_WINDOW: Duration = Duration::from_secs(1);

/// The longest ejection, in multiples of `outlier_base_ejection_ms`.
const MAX_EJECTION_FACTOR: u64 = 10;

/// The budget's window, in one-second slots.
const BUDGET_SLOTS: usize = 10;

/// Largest penalty an endpoint carries (failures counted within one window).
const MAX_PENALTY: u32 = 1024;

/// Milliseconds since the first call of this function, plus one: 0 is free to mean "unset"
/// in the atomics below.
fn now_ms() -> u64 {
    ms_since_origin(Instant::now())
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn ms_since_origin(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin()).as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// What an attempt on an endpoint showed about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered (a reply, a declared or unmarked exception): it works.
    Answered,
    /// A counted failure.
    Failed,
}

/// Why a call goes to another endpoint (the `reason` label of `rpc_proxy_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// It was never written to the endpoint tried.
    NotSent,
    /// An LB refused it before dispatch (field 3 = 1).
    Refused,
}

impl RetryReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RetryReason::NotSent => "not_sent",
            RetryReason::Refused => "refused",
        }
    }
}

/// Whether an endpoint may take a call now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not ejected.
    Open,
    /// Ejected and not due for a probe (or its probe is out).
    Ejected,
    /// Its ejection time is over and this call is its probe.
    Probe,
}

/// The counters and gauge of one service (`rpc_proxy_retries_total`,
/// `rpc_proxy_retry_budget_exhausted_total`, `rpc_proxy_ejections_total`,
/// `rpc_proxy_ejected_endpoints`), resolved once per service.
#[derive(Debug, Clone)]
pub struct HealthMetrics {
    /// `rpc_proxy_retries_total{reason="not_sent"}`.
    pub retries_not_sent: IntCounter,
    /// `rpc_proxy_retries_total{reason="refused"}`.
    pub retries_refused: IntCounter,
    /// `rpc_proxy_retry_budget_exhausted_total`.
    pub budget_exhausted: IntCounter,
    /// `rpc_proxy_ejections_total{reason="consecutive_failures"}`.
    pub ejections_consecutive: IntCounter,
    /// `rpc_proxy_ejections_total{reason="failed_probe"}`.
    pub ejections_failed_probe: IntCounter,
    /// `rpc_proxy_ejected_endpoints`.
    pub ejected: IntGauge,
}

impl HealthMetrics {
    /// Handles registered nowhere (tests).
    pub fn detached() -> Self {
        let counter = || IntCounter::new("detached", "detached").expect("a valid metric name");
        HealthMetrics {
            retries_not_sent: counter(),
            retries_refused: counter(),
            budget_exhausted: counter(),
            ejections_consecutive: counter(),
            ejections_failed_probe: counter(),
            ejected: IntGauge::new("detached", "detached").expect("a valid metric name"),
        }
    }
}

// === impl Outlier ===

/// The ejection state of one endpoint. Every field is an atomic read on the call path only
/// when set: an endpoint that never failed costs two loads per pick.
#[derive(Debug, Default)]
pub struct Outlier {
    /// Counted failures since the last answer.
    consecutive: AtomicU32,
    /// 0 = admitted; else ejected until this [`now_ms`] (it stays set, past that time, until a
    /// probe readmits it).
    ejected_until: AtomicU64,
    /// The n of the last ejection.
    ejections: AtomicU32,
    /// When it was last readmitted ([`now_ms`]; 0 = never ejected).
    readmitted_at: AtomicU64,
    /// When its probe was handed out ([`now_ms`]; 0 = none out).
    probe_at: AtomicU64,
    /// Counted failures within the current penalty window.
    penalty: AtomicU32,
    /// When the last of them came ([`now_ms`]).
    penalty_at: AtomicU64,
}

impl Outlier {
    /// Whether the endpoint is ejected (waiting out its time, or for its probe).
    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Counted failures in a row now.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// The n of its last ejection (0 = never ejected).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// What recent counted failures add to the endpoint's load for balancing: their number,
    /// fading linearly to 0 over [`PENALTY_WINDOW`] after the last one.
    pub fn penalty(&self) -> usize {
        if self.penalty.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.penalty_at_time(now_ms())
    }

    /// [`Outlier::penalty`] at `now` ([`now_ms`]).
    fn penalty_at_time(&self, now: u64) -> usize {
        let count = self.penalty.load(Ordering::Relaxed);
        let window = PENALTY_WINDOW.as_millis() as u64;
        let since = now.saturating_sub(self.penalty_at.load(Ordering::Relaxed));
        if since >= window {
            self.penalty.store(0, Ordering::Relaxed);
            return 0;
        }
        // Rounded up: a failure a moment ago weighs a whole call.
        (u64::from(count) * (window - since)).div_ceil(window) as usize
    }

    fn add_penalty(&self, now: u64) {
        let window = PENALTY_WINDOW.as_millis() as u64;
        let last = self.penalty_at.swap(now, Ordering::Relaxed);
        if now.saturating_sub(last) >= window {
            self.penalty.store(1, Ordering::Relaxed);
        } else if self.penalty.load(Ordering::Relaxed) < MAX_PENALTY {
            self.penalty.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// === impl RetryBudget ===

/// One second of a service's calls and retries.
#[derive(Debug, Default)]
struct Slot {
    /// The second ([`second_of`]) counted here; 0 = unused.
    second: AtomicU64,
    calls: AtomicU64,
    retries: AtomicU64,
}

/// Finagle's `RetryBudget` in ten one-second slots: a deposit per call (two atomics), a
/// withdrawal per retry checked against the sum of the window.
#[derive(Debug, Default)]
struct RetryBudget {
    slots: [Slot; BUDGET_SLOTS],
    /// Withdrawals one at a time, so two retries cannot both take the last token.
    withdraw: Mutex<()>,
}

/// The whole second of `at` since [`origin`], plus one (0 marks an unused slot).
fn second_of(at: Instant) -> u64 {
    at.saturating_duration_since(origin())
        .as_secs()
        .saturating_add(1)
}

impl RetryBudget {
    /// The slot of `second`, emptied first when it still holds an older second. (A count
    /// racing with the emptying may be lost: the budget is an estimate, never a hard cap on
    /// calls.)
    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % BUDGET_SLOTS as u64) as usize];
        let held = slot.second.load(Ordering::Acquire);
        if held < second
            && slot
                .second
                .compare_exchange(held, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.calls.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    fn deposit(&self, at: Instant) {
        self.slot(second_of(at))
            .calls
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry if the window allows it.
    fn try_withdraw(&self, now: Instant, config: &ResilienceConfig) -> bool {
        let _one_at_a_time = self.withdraw.lock().unwrap_or_else(|e| e.into_inner());
        let second = second_of(now);
        let (calls, retries) = self
            .slots
            .iter()
            .filter(|s| {
                let at = s.second.load(Ordering::Acquire);
                at != 0 && at <= second && second - at < BUDGET_SLOTS as u64
            })
            .fold((0u64, 0u64), |(c, r), s| {
                (
                    c + s.calls.load(Ordering::Relaxed),
                    r + s.retries.load(Ordering::Relaxed),
                )
            });
        let allowed = calls * u64::from(config.retry_budget_percent) / 100
            + u64::from(config.retry_min_per_sec) * BUDGET_SLOTS as u64;
        if retries < allowed {
            self.slot(second).retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

// === impl ServiceHealth ===

/// The shared resilience state of one service.
#[derive(Debug)]
pub struct ServiceHealth {
    name: String,
    /// The keys (`resilience`) and the request timeout in force: a reload changes them.
    settings: SharedSettings,
    budget: RetryBudget,
    /// Endpoints of the service in the routing table now.
    endpoints: AtomicUsize,
    /// Of them, ejected now.
    ejected: AtomicUsize,
    metrics: HealthMetrics,
}

impl ServiceHealth {
    /// The state of `name`, under `settings`.
    pub fn new(name: &str, settings: SharedSettings, metrics: HealthMetrics) -> Self {
        ServiceHealth {
            name: name.to_owned(),
            settings,
            budget: RetryBudget::default(),
            endpoints: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Notes how many endpoints the service has now (the ejection cap's base).
    pub fn set_endpoints(&self, count: usize) {
        self.endpoints.store(count, Ordering::Relaxed);
    }

    /// Endpoints ejected now.
    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Relaxed)
    }

    /// The service's counters, for status output.
    pub fn metrics(&self) -> &HealthMetrics {
        &self.metrics
    }

    /// The outlier and retry keys in force.
    fn config(&self) -> ResilienceConfig {
        self.settings.load().resilience
    }

    /// A probe handed out this long ago without a verdict (its caller went away) is given up,
    /// and the next call probes: once its call would have timed out, with a margin.
    fn probe_expiry(&self) -> Duration {
        self.settings.load().request_timeout * 2
    }

    /// Whether retries are possible at all (a budget of 0 % and 0 per second allows none).
    pub fn may_retry(&self) -> bool {
        let config = self.config();
        config.retry_budget_percent > 0 || config.retry_min_per_sec > 0
    }

    /// Counts one call of the service (read at `started`) into the retry budget.
    pub fn deposit(&self, started: Instant) {
        self.budget.deposit(started);
    }

    /// Takes one retry for `reason` from the budget; false (and counted as exhausted) when
    /// the window has none left.
    pub fn try_retry(&self, reason: RetryReason) -> bool {
        if self.budget.try_withdraw(Instant::now(), &self.config()) {
            match reason {
                RetryReason::NotSent => self.metrics.retries_not_sent.inc(),
                RetryReason::Refused => self.metrics.retries_refused.inc(),
            }
            true
        } else {
            self.metrics.budget_exhausted.inc();
            false
        }
    }

    /// Whether the endpoint with `outlier` may take a call now; hands out its probe when its
    /// ejection time is over and no probe is out.
    pub fn admission(&self, outlier: &Outlier) -> Admission {
        let until = outlier.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return Admission::Open;
        }
        let now = now_ms();
        if now < until {
            return Admission::Ejected;
        }
        let out = outlier.probe_at.load(Ordering::Relaxed);
        if out != 0 && now.saturating_sub(out) < self.probe_expiry().as_millis() as u64 {
            return Admission::Ejected;
        }
        match outlier
            .probe_at
            .compare_exchange(out, now, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Ejected,
        }
    }

    /// Records what an attempt on the endpoint `label` (with `outlier`, `outstanding` calls
    /// still queued or in flight to it) showed; `probe` says whether the call was its probe.
    pub fn record(
        &self,
        outlier: &Outlier,
        verdict: Verdict,
        probe: bool,
        label: &str,
        outstanding: usize,
    ) {
        match verdict {
            Verdict::Answered => {
                if outlier.is_ejected() {
                    // Answers of calls sent before the ejection do not readmit: only a probe.
                    if probe {
                        self.readmit(outlier, label);
                    }
                } else if outlier.consecutive.load(Ordering::Relaxed) != 0 {
                    outlier.consecutive.store(0, Ordering::Relaxed);
                }
            }
            Verdict::Failed => {
                let now = now_ms();
                outlier.add_penalty(now);
                let until = outlier.ejected_until.load(Ordering::Relaxed);
                if until != 0 {
                    // Failures of calls sent before the ejection do not extend it; a failed
                    // probe does.
                    if probe && now >= until {
                        self.eject(outlier, now, label, outstanding, true);
                    }
                    return;
                }
                let failures = outlier.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                let threshold = self.config().consecutive_failures;
                if threshold > 0 && failures >= threshold {
                    self.try_eject(outlier, now, label, outstanding, failures);
                }
            }
        }
    }

    /// Un-ejects an endpoint leaving the table (it no longer counts against the cap).
    pub fn release(&self, outlier: &Outlier) {
        if outlier.ejected_until.swap(0, Ordering::Relaxed) != 0 {
            self.ejected.fetch_sub(1, Ordering::Relaxed);
            self.metrics.ejected.dec();
        }
    }

    /// The most endpoints that may be ejected at once.
    fn max_ejected(&self) -> usize {
        let endpoints = self.endpoints.load(Ordering::Relaxed);
        (endpoints * self.config().max_ejection_percent as usize / 100).max(1)
    }

    /// Ejects an admitted endpoint after `failures` in a row, if the cap allows.
    fn try_eject(
        &self,
        outlier: &Outlier,
        now: u64,
        label: &str,
        outstanding: usize,
        failures: u32,
    ) {
        // Claimed first, so two failures racing here eject once.
        if outlier
            .ejected_until
            .compare_exchange(0, u64::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let max = self.max_ejected();
        let admitted = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            outlier.ejected_until.store(0, Ordering::Relaxed);
            tracing::debug!(
                service = self.name,
                endpoint = label,
                failures,
                max_ejected = max,
                "endpoint not ejected: the ejection cap is reached"
            );
            return;
        }
        self.metrics.ejected.inc();
        self.eject(outlier, now, label, outstanding, false);
    }

    /// Sets the ejection time of an endpoint already counted as ejected.
    fn eject(
        &self,
        outlier: &Outlier,
        now: u64,
        label: &str,
        outstanding: usize,
        failed_probe: bool,
    ) {
        let config = self.config();
        let base = config.base_ejection.as_millis() as u64;
        // n decays by one per base period served since the last readmission.
        let previous = u64::from(outlier.ejections.load(Ordering::Relaxed));
        let readmitted = outlier.readmitted_at.load(Ordering::Relaxed);
        let served = if failed_probe || readmitted == 0 {
            0
        } else {
            now.saturating_sub(readmitted) / base.max(1)
        };
        let n = (previous.saturating_sub(served) + 1).min(MAX_EJECTION_FACTOR);
        let jitter = rand::rng().random_range(0.9..1.1);
        let ejection_ms = ((base * n) as f64 * jitter) as u64;
        outlier.ejections.store(n as u32, Ordering::Relaxed);
        outlier.probe_at.store(0, Ordering::Relaxed);
        outlier
            .ejected_until
            .store(now.saturating_add(ejection_ms).max(1), Ordering::Relaxed);
        outlier.consecutive.store(0, Ordering::Relaxed);
        let reason = if failed_probe {
            self.metrics.ejections_failed_probe.inc();
            "failed_probe"
        } else {
            self.metrics.ejections_consecutive.inc();
            "consecutive_failures"
        };
        tracing::warn!(
            service = self.name,
            endpoint = label,
            reason,
            failures = config.consecutive_failures,
            ejection_ms,
            n,
            outstanding,
            "endpoint ejected"
        );
    }

    fn readmit(&self, outlier: &Outlier, label: &str) {
        if outlier.ejected_until.swap(0, Ordering::Relaxed) == 0 {
            return;
        }
        outlier.consecutive.store(0, Ordering::Relaxed);
        outlier.probe_at.store(0, Ordering::Relaxed);
        outlier.readmitted_at.store(now_ms(), Ordering::Relaxed);
        self.ejected.fetch_sub(1, Ordering::Relaxed);
        self.metrics.ejected.dec();
        tracing::info!(
            service = self.name,
            endpoint = label,
            "endpoint readmitted after a successful probe"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(failures: u32, base_ms: u64) -> ResilienceConfig {
        ResilienceConfig {
            consecutive_failures: failures,
            base_ejection: Duration::from_millis(base_ms),
            ..ResilienceConfig::default()
        }
    }

    fn health_with(
        resilience: ResilienceConfig,
        request_timeout: Duration,
        endpoints: usize,
    ) -> ServiceHealth {
        let settings = crate::upstream::shared(crate::upstream::UpstreamSettings {
            resilience,
            request_timeout,
            ..Default::default()
        });
        let h = ServiceHealth::new("svc", settings, HealthMetrics::detached());
        h.set_endpoints(endpoints);
        h
    }

    fn health(config: ResilienceConfig, endpoints: usize) -> ServiceHealth {
        health_with(config, Duration::from_secs(5), endpoints)
    }

    fn fail(h: &ServiceHealth, o: &Outlier, times: u32) {
        for _ in 0..times {
            h.record(o, Verdict::Failed, false, "e", 0);
        }
    }

    /// Makes an ejected endpoint due for its probe without waiting.
    fn expire(o: &Outlier) {
        o.ejected_until.store(1, Ordering::Relaxed);
    }

    #[test]
    fn consecutive_failures_eject_and_an_answer_resets_the_count() {
        let h = health(config(5, 30_000), 2);
        let o = Outlier::default();
        fail(&h, &o, 4);
        h.record(&o, Verdict::Answered, false, "e", 0);
        fail(&h, &o, 4);
        assert!(!o.is_ejected(), "4 in a row, twice, is not 5 in a row");
        fail(&h, &o, 1);
        assert!(o.is_ejected());
        assert_eq!(h.ejected(), 1);
        assert_eq!(h.metrics().ejections_consecutive.get(), 1);
        assert_eq!(h.metrics().ejected.get(), 1);
        assert_eq!(h.admission(&o), Admission::Ejected);
    }

    #[test]
    fn zero_turns_ejection_off() {
        let h = health(config(0, 30_000), 2);
        let o = Outlier::default();
        fail(&h, &o, 100);
        assert!(!o.is_ejected());
        assert_eq!(h.admission(&o), Admission::Open);
    }

    #[test]
    fn one_probe_at_a_time_and_its_answer_readmits() {
        let h = health(config(1, 30_000), 2);
        let o = Outlier::default();
        fail(&h, &o, 1);
        // An answer of a call sent before the ejection does not readmit.
        h.record(&o, Verdict::Answered, false, "e", 0);
        assert!(o.is_ejected());
        expire(&o);
        assert_eq!(h.admission(&o), Admission::Probe);
        assert_eq!(
            h.admission(&o),
            Admission::Ejected,
            "one probe out at a time"
        );
        h.record(&o, Verdict::Answered, true, "e", 0);
        assert!(!o.is_ejected());
        assert_eq!(h.ejected(), 0);
        assert_eq!(h.metrics().ejected.get(), 0);
        assert_eq!(h.admission(&o), Admission::Open);
    }

    #[test]
    fn a_failed_probe_ejects_for_longer_and_old_failures_do_not() {
        let h = health(config(1, 1_000), 2);
        let o = Outlier::default();
        fail(&h, &o, 1);
        let first = o.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!((850..=1_100).contains(&first), "{first}");
        fail(&h, &o, 3);
        assert_eq!(o.ejections(), 1, "failures while ejected do not extend it");
        expire(&o);
        assert_eq!(h.admission(&o), Admission::Probe);
        h.record(&o, Verdict::Failed, true, "e", 0);
        assert_eq!(o.ejections(), 2);
        let second = o.ejected_until.load(Ordering::Relaxed) - now_ms();
        assert!((1_700..=2_200).contains(&second), "{second}");
        assert_eq!(h.metrics().ejections_failed_probe.get(), 1);
        assert_eq!(h.ejected(), 1, "still one endpoint ejected");
        for _ in 0..20 {
            expire(&o);
            assert_eq!(h.admission(&o), Admission::Probe);
            h.record(&o, Verdict::Failed, true, "e", 0);
        }
        assert_eq!(o.ejections(), 10, "capped at 10x");
    }

    #[test]
    fn the_cap_allows_half_of_three_and_at_least_one() {
        let h = health(config(1, 30_000), 3);
        let (a, b, c) = (Outlier::default(), Outlier::default(), Outlier::default());
        fail(&h, &a, 1);
        fail(&h, &b, 5);
        fail(&h, &c, 5);
        assert!(a.is_ejected());
        assert!(!b.is_ejected() && !c.is_ejected(), "50 % of 3 is 1");
        assert_eq!(h.ejected(), 1);
        let single = health(config(1, 30_000), 1);
        let only = Outlier::default();
        fail(&single, &only, 1);
        assert!(only.is_ejected(), "at least one may be ejected");
        single.release(&only);
        assert_eq!(single.ejected(), 0);
        assert!(!only.is_ejected());
    }

    #[test]
    fn a_lost_probe_is_given_up() {
        let h = health_with(config(1, 30_000), Duration::ZERO, 2);
        let o = Outlier::default();
        fail(&h, &o, 1);
        expire(&o);
        assert_eq!(h.admission(&o), Admission::Probe);
        assert_eq!(h.admission(&o), Admission::Probe, "expired at once");
    }

    #[test]
    fn penalty_counts_recent_failures_and_fades() {
        let h = health(config(0, 30_000), 2);
        let o = Outlier::default();
        assert_eq!(o.penalty(), 0);
        fail(&h, &o, 3);
        assert_eq!(o.penalty(), 3);
        let at = o.penalty_at.load(Ordering::Relaxed);
        let window = PENALTY_WINDOW.as_millis() as u64;
        assert_eq!(
            o.penalty_at_time(at + window / 2),
            2,
            "half faded, rounded up"
        );
        assert_eq!(o.penalty_at_time(at + window - 1), 1);
        assert_eq!(o.penalty_at_time(at + window), 0);
        assert_eq!(o.penalty(), 0, "reset once faded");
        h.record(&o, Verdict::Answered, false, "e", 0);
        assert_eq!(o.penalty(), 0);
    }

    #[test]
    fn budget_allows_percent_of_calls_plus_the_floor() {
        let cfg = ResilienceConfig {
            retry_budget_percent: 20,
            retry_min_per_sec: 1,
            ..ResilienceConfig::default()
        };
        let h = health(cfg, 2);
        let now = Instant::now();
        for _ in 0..100 {
            h.deposit(now);
        }
        // 20 % of 100 + 1 x 10.
        let granted = (0..100)
            .filter(|_| h.try_retry(RetryReason::Refused))
            .count();
        assert_eq!(granted, 30);
        assert_eq!(h.metrics().retries_refused.get(), 30);
        assert_eq!(h.metrics().budget_exhausted.get(), 70);
        let none = health(
            ResilienceConfig {
                retry_budget_percent: 0,
                retry_min_per_sec: 0,
                ..ResilienceConfig::default()
            },
            2,
        );
        assert!(!none.may_retry());
        assert!(!none.try_retry(RetryReason::NotSent));
    }

    #[test]
    fn budget_slots_forget_old_seconds() {
        let budget = RetryBudget::default();
        let cfg = ResilienceConfig {
            retry_budget_percent: 100,
            retry_min_per_sec: 0,
            ..ResilienceConfig::default()
        };
        let start = origin() + Duration::from_secs(100);
        budget.deposit(start);
        assert!(budget.try_withdraw(start, &cfg));
        assert!(!budget.try_withdraw(start, &cfg), "one call, one retry");
        let later = start + Duration::from_secs(9);
        assert!(!budget.try_withdraw(later, &cfg), "still in the window");
        let gone = start + Duration::from_secs(10);
        budget.deposit(gone);
        assert!(
            budget.try_withdraw(gone, &cfg),
            "the old retry left the window"
        );
    }
}
