//! The periodic status log line (`status_interval_ms`, default 10 s, off when 0): one line
//! with the workers by state, their load, the queue, the calls and errors of the interval,
//! the calls in flight, the registration, and each worker (`pid:state:generation:served:
//! oldest call ms`, `-` for what is not known).

use std::sync::Arc;
use std::time::Duration;

use rpc_metrics::Totals;

use crate::admin::{LbState, WorkerView, millis};
use crate::dispatch::WorkerState;

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
        let views = state.workers();
        let count = |s: WorkerState| views.iter().filter(|w| w.state == s).count();
        tracing::info!(
            service = state.service,
            workers = active.len(),
            booting_workers = count(WorkerState::Booting),
            stopping_workers = count(WorkerState::Stopping),
            hung_workers = count(WorkerState::Hung),
            slots = active.iter().map(|w| w.capacity).sum::<usize>(),
            busy_slots = now.workers.iter().map(|w| w.inflight).sum::<usize>(),
            queued = now.queued,
            calls = totals.calls.saturating_sub(last.calls),
            errors = totals.errors.saturating_sub(last.errors),
            inflight = state.metrics.calls.inflight(),
            connections = now.client_connections,
            state = state.health().label(),
            each = describe(&views),
            "status"
        );
        last = totals;
    }
}

/// Each worker as `pid:state:generation:served:oldest_ms`, space separated.
fn describe(views: &[WorkerView]) -> String {
    fn or_dash<T: ToString>(v: Option<T>) -> String {
        v.map_or_else(|| "-".to_owned(), |v| v.to_string())
    }
    views
        .iter()
        .map(|w| {
            format!(
                "{}:{}:{}:{}:{}",
                or_dash(w.pid),
                w.state.label(),
                or_dash(w.generation),
                w.served,
                or_dash(w.oldest_call.map(millis)),
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_in_one_field() {
        let view = |pid, state, generation, served, oldest: Option<u64>| WorkerView {
            id: None,
            pid,
            state,
            inflight: 0,
            capacity: 1,
            active: true,
            served,
            oldest_call: oldest.map(Duration::from_millis),
            slot: None,
            generation,
        };
        assert_eq!(
            describe(&[
                view(Some(12), WorkerState::Ready, Some(1), 40, Some(250)),
                view(None, WorkerState::Stopping, None, 3, None),
                view(Some(13), WorkerState::Booting, Some(2), 0, None),
            ]),
            "12:ready:1:40:250 -:stopping:-:3:- 13:booting:2:0:-"
        );
    }
}
