//! The periodic status log line (`status_interval_ms`, default 10 s, off when 0): one line
//! with the workers, their load, the queue, the calls and errors of the interval, the calls
//! in flight, and the registration.

use std::sync::Arc;
use std::time::Duration;

use rpc_metrics::Totals;

use crate::admin::LbState;

/// Logs a status line every `every`, forever (the caller aborts the task).
pub async fn run(state: Arc<LbState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = Totals::default();
    loop {
        tick.tick().await;
        let now = state.snapshot();
        let totals = state.metrics.calls.totals();
        let active: Vec<_> = now.workers.iter().filter(|w| w.active).collect();
        tracing::info!(
            service = state.service,
            workers = active.len(),
            stopping_workers = now.workers.len() - active.len(),
            slots = active.iter().map(|w| w.capacity).sum::<usize>(),
            busy_slots = now.workers.iter().map(|w| w.inflight).sum::<usize>(),
            queued = now.queued,
            calls = totals.calls.saturating_sub(last.calls),
            errors = totals.errors.saturating_sub(last.errors),
            inflight = state.metrics.calls.inflight(),
            connections = now.client_connections,
            state = state.health().label(),
            "status"
        );
        last = totals;
    }
}
