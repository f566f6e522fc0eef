//! Outlier ejection and safe retries (CONTRACT section 9, "Proxy resilience") without
//! ZooKeeper: a proxy in-process, fake upstreams that answer with marked or unmarked
//! exceptions, and a raw client making one call at a time, so every count is exact.

// Each test binary uses its own part of the shared harness.
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rpc_frame::{ExceptionCode, Mark, Message, MessageType};
use support::{Action, FakeUpstream, ProxyHandle, assert_reply, code, exception, start_proxy};

/// Bound for conditions the proxy should reach quickly.
const SOON: Duration = Duration::from_secs(5);

async fn marked(proxy: &ProxyHandle, upstreams: &[(&FakeUpstream, bool)]) {
    let endpoints: Vec<_> = upstreams
        .iter()
        .map(|(u, marks)| (u.frontend(), *marks))
        .collect();
    proxy.set_marked_endpoints("echo", &endpoints).await;
    proxy.synced().await;
}

/// Runs `clients` connections at once, each making `calls` calls one after the other; returns
/// every answer. Calls waiting on a slow healthy endpoint make it look loaded, so a failing
/// one keeps being picked until its failures weigh more, or eject it.
async fn load(proxy: &ProxyHandle, clients: i32, calls: i32) -> Vec<(i32, Message)> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = proxy.client().await;
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..calls {
                let seqid = c * calls + i;
                answers.push((seqid, client.call("echo:method", seqid, b"x").await));
            }
            answers
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client task"));
    }
    all
}

/// Concurrent clients (the calls a failing endpoint may already hold when it is ejected).
const CLIENTS: i32 = 8;

/// A healthy endpoint that takes a while: calls pile up on it during a burst.
async fn slow_healthy() -> FakeUpstream {
    FakeUpstream::start(|_| Action::ReplyAfter(Duration::from_millis(30))).await
}

/// An LB that refuses before dispatch (field 3 = 1): each refused call is answered by the
/// other LB, and after five refusals in a row the refusing one is ejected and gets no more.
#[tokio::test]
async fn refusals_are_retried_elsewhere_and_eject_the_refusing_endpoint() {
    let refusing = FakeUpstream::start(|_| Action::Raise(Some(Mark::Refused))).await;
    let healthy = slow_healthy().await;
    let proxy = start_proxy("").await;
    marked(&proxy, &[(&refusing, true), (&healthy, true)]).await;
    for (seqid, reply) in load(&proxy, CLIENTS, 10).await {
        assert_reply(&reply, seqid, b"x");
    }
    let refused = refusing.call_count();
    assert!(
        (5..=5 + CLIENTS as usize).contains(&refused),
        "{refused} refusals"
    );
    assert_eq!(
        healthy.call_count(),
        80,
        "every call answered by the healthy LB"
    );
    for (seqid, reply) in load(&proxy, CLIENTS, 10).await {
        assert_reply(&reply, seqid, b"x");
    }
    assert_eq!(refusing.call_count(), refused, "ejected: no more calls");
}

/// A failure after dispatch (field 3 = 2) is never retried: the caller gets it. Five in a
/// row eject the endpoint.
#[tokio::test]
async fn failures_after_dispatch_reach_the_caller_and_eject() {
    let failing = FakeUpstream::start(|_| Action::Raise(Some(Mark::Failed))).await;
    let healthy = slow_healthy().await;
    let proxy = start_proxy("").await;
    marked(&proxy, &[(&failing, true), (&healthy, true)]).await;
    let mut failed = 0;
    for (seqid, reply) in load(&proxy, CLIENTS, 20).await {
        if reply.message_type() == MessageType::Exception {
            let (got, text) = exception(&reply, seqid);
            assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
            failed += 1;
        }
    }
    assert!(
        (5..=5 + CLIENTS as usize).contains(&failed),
        "{failed} failures"
    );
    assert_eq!(failing.call_count(), failed);
    assert_eq!(healthy.call_count(), 160 - failed, "nothing was sent twice");
}

/// Field 3 from an endpoint that does not announce marks (a Go LB, a plain server) means
/// nothing: the exception reaches the caller, no retry, no ejection.
#[tokio::test]
async fn unmarked_endpoints_are_never_retried_or_ejected() {
    let plain = FakeUpstream::start(|_| Action::Raise(Some(Mark::Refused))).await;
    let healthy = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    marked(&proxy, &[(&plain, false), (&healthy, true)]).await;
    let mut client = proxy.client().await;
    let mut exceptions = 0;
    for seqid in 0..100 {
        let reply = client.call("echo:method", seqid, b"x").await;
        if reply.message_type() == MessageType::Exception {
            exceptions += 1;
        }
    }
    assert_eq!(
        plain.call_count() + healthy.call_count(),
        100,
        "one attempt each"
    );
    assert_eq!(exceptions, plain.call_count());
    assert!(
        plain.call_count() > 20,
        "never ejected: {}",
        plain.call_count()
    );
}

/// A handler's exception (no field 3) from a marking LB is an answer: not retried, never
/// counted.
#[tokio::test]
async fn handler_exceptions_are_not_retried() {
    let raising = FakeUpstream::start(|_| Action::Raise(None)).await;
    let healthy = FakeUpstream::echo().await;
    let proxy = start_proxy("").await;
    marked(&proxy, &[(&raising, true), (&healthy, true)]).await;
    let mut client = proxy.client().await;
    for seqid in 0..100 {
        client.call("echo:method", seqid, b"x").await;
    }
    assert_eq!(raising.call_count() + healthy.call_count(), 100);
    assert!(raising.call_count() > 20, "{}", raising.call_count());
}

/// After its ejection time an endpoint gets one probe; once it answers, it is back.
#[tokio::test]
async fn a_probe_readmits_a_recovered_endpoint() {
    let sick = Arc::new(AtomicBool::new(true));
    let flag = sick.clone();
    let flaky = FakeUpstream::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Action::Raise(Some(Mark::Failed))
        } else {
            Action::Reply
        }
    })
    .await;
    let healthy = slow_healthy().await;
    let proxy = start_proxy("outlier_base_ejection_ms=300").await;
    marked(&proxy, &[(&flaky, true), (&healthy, true)]).await;
    load(&proxy, CLIENTS, 10).await;
    let ejected_at = flaky.call_count();
    assert!(
        (5..=5 + CLIENTS as usize).contains(&ejected_at),
        "{ejected_at}"
    );
    sick.store(false, Ordering::SeqCst);
    let mut client = proxy.client().await;
    // The probe goes out with the first call after the ejection time (300 ms +-10 %); the
    // endpoint then takes its share again.
    let deadline = tokio::time::Instant::now() + SOON;
    let mut seqid = 100;
    while flaky.call_count() <= ejected_at + 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not readmitted: {} calls",
            flaky.call_count()
        );
        let reply = client.call("echo:method", seqid, b"x").await;
        assert_reply(&reply, seqid, b"x");
        seqid += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// With every endpoint refusing, retries stay within the budget: here 0 % of calls plus 1
/// per second over the 10 s window, so 10 retries for 40 calls.
#[tokio::test]
async fn retries_stay_within_the_budget() {
    let a = FakeUpstream::start(|_| Action::Raise(Some(Mark::Refused))).await;
    let b = FakeUpstream::start(|_| Action::Raise(Some(Mark::Refused))).await;
    let proxy =
        start_proxy("retry_budget_percent=0\nretry_min_per_sec=1\noutlier_consecutive_failures=0")
            .await;
    marked(&proxy, &[(&a, true), (&b, true)]).await;
    let mut client = proxy.client().await;
    for seqid in 0..40 {
        let reply = client.call("echo:method", seqid, b"x").await;
        let (got, text) = exception(&reply, seqid);
        assert_eq!(got, code(ExceptionCode::InternalError), "{text}");
        assert_eq!(text, "raised by the fake upstream", "the LB's own refusal");
    }
    assert_eq!(a.call_count() + b.call_count(), 40 + 10);
}

/// A single endpoint is ejectable, but when every endpoint is ejected calls still go to
/// them (there is nowhere else).
#[tokio::test]
async fn when_every_endpoint_is_ejected_calls_go_to_all() {
    let failing = FakeUpstream::start(|_| Action::Raise(Some(Mark::Failed))).await;
    let proxy = start_proxy("").await;
    marked(&proxy, &[(&failing, true)]).await;
    let mut client = proxy.client().await;
    for seqid in 0..20 {
        let reply = client.call("echo:method", seqid, b"x").await;
        let (_, text) = exception(&reply, seqid);
        assert_eq!(text, "raised by the fake upstream");
    }
    assert_eq!(failing.call_count(), 20);
}
