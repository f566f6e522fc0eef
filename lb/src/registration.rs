//! Keeps the LB's ZooKeeper node in step with its workers: registered while at least one
//! worker takes calls (and the LB is not in maintenance), deregistered when the last one is
//! gone, on `POST /drain`, or when the LB stops. Session expiry is handled inside
//! [`rpc_registry::Registration`] (it registers again by itself); this task polls it so the
//! registered state (`/healthz`, metrics) shows the gap. Sits between the worker events and
//! ZooKeeper.
//!
//! The node data always announces `"marks": 1` ([`MARKS`], [`node_data`]): this LB marks the
//! `TApplicationException`s it raises itself (CONTRACT section 9), and proxies trust those
//! marks only from nodes that say so.

use std::time::Duration;

use rpc_registry::{EndpointInfo, Registration, ZkSettings};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::RegistrationMetrics;

/// How often a live registration is checked for a lost session.
const SESSION_POLL: Duration = Duration::from_millis(250);

/// The `marks` this LB announces in its node data: `1`, it adds field 3 to the
/// `TApplicationException`s it raises itself (CONTRACT section 9, "LB refusals and LB
/// failures, marked").
pub const MARKS: u32 = 1;

/// The node data registered for `info`: `info` with `marks` set to [`MARKS`], whatever it
/// said (the marks are this crate's doing, not its caller's).
pub fn node_data(info: EndpointInfo) -> EndpointInfo {
    EndpointInfo {
        marks: MARKS,
        ..info
    }
}

/// Handle to the registration task.
#[derive(Debug)]
pub struct Registrar {
    want: watch::Sender<bool>,
    registered: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Registrar {
    /// Starts the task; nothing is registered until [`Registrar::want`] says so. The node
    /// data is [`node_data`] of `info` (it announces the marks).
    pub fn spawn(
        settings: ZkSettings,
        product: String,
        info: EndpointInfo,
        metrics: RegistrationMetrics,
    ) -> Self {
        let (want, want_rx) = watch::channel(false);
        let (registered_tx, registered) = watch::channel(false);
        let task = tokio::spawn(run(
            settings,
            product,
            node_data(info),
            want_rx,
            registered_tx,
            metrics,
        ));
        Registrar {
            want,
            registered,
            task,
        }
    }

    /// Asks for the node to exist (`true`) or not (`false`).
    pub fn want(&self, registered: bool) {
        self.want
            .send_if_modified(|w| std::mem::replace(w, registered) != registered);
    }

    /// Whether the node exists now (as far as this LB knows).
    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// A receiver of the registered state.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Deregisters and ends the task; waits at most `bound`.
    pub async fn shutdown(self, bound: Duration) {
        let _ = self.want.send(false);
        let mut registered = self.registered.clone();
        let gone = registered.wait_for(|r| !*r);
        if tokio::time::timeout(bound, gone).await.is_err() {
            tracing::warn!("zookeeper node not confirmed deleted in time");
        }
        drop(self.want);
        let _ = tokio::time::timeout(bound, self.task).await;
    }
}

async fn run(
    settings: ZkSettings,
    product: String,
    info: EndpointInfo,
    mut want: watch::Receiver<bool>,
    registered: watch::Sender<bool>,
    metrics: RegistrationMetrics,
) {
    let mut current: Option<Registration> = None;
    let mut failures = 0u32;
    loop {
        let wanted = *want.borrow_and_update();
        if wanted && current.is_none() {
            let attempt = Registration::register(settings.clone(), product.clone(), info.clone());
            tokio::select! {
                result = attempt => match result {
                    Ok(registration) => {
                        // rpc_registry logs the state change at info.
                        tracing::debug!(path = registration.path(), frontend = info.frontend, "registered in zookeeper");
                        current = Some(registration);
                        failures = 0;
                        metrics.registrations.inc();
                        let _ = registered.send(true);
                    }
                    Err(e) => {
                        failures += 1;
                        metrics.failures.inc();
                        // Capped at 1 s: an LB started while ZooKeeper is away registers
                        // within about a second of its return.
                        let delay = Duration::from_millis(100u64 << failures.min(4)).min(Duration::from_secs(1));
                        tracing::warn!(error = %e, retry_in = ?delay, "zookeeper registration failed");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            changed = want.changed() => if changed.is_err() { return },
                        }
                    }
                },
                // The wish changed while registering: start over (a half-made session is
                // dropped with the future, taking its ephemeral node with it).
                changed = want.changed() => if changed.is_err() { return },
            }
            continue;
        }
        if !wanted && let Some(registration) = current.take() {
            let path = registration.path().to_owned();
            match registration.deregister().await {
                Ok(()) => tracing::debug!(path, "deregistered from zookeeper"),
                Err(e) => {
                    tracing::warn!(path, error = %e, "deregistration failed; the session is closed anyway")
                }
            }
            let _ = registered.send(false);
            continue;
        }
        let changed = match &current {
            // Registered: also watch for a lost session (the registration re-registers by
            // itself; the node is missing meanwhile).
            Some(registration) => tokio::select! {
                changed = want.changed() => changed,
                _ = tokio::time::sleep(SESSION_POLL) => {
                    let alive = registration.is_registered();
                    if alive != *registered.borrow() {
                        if alive {
                            metrics.registrations.inc();
                        } else {
                            metrics.expiries.inc();
                        }
                        registered.send_replace(alive);
                    }
                    Ok(())
                }
            },
            None => want.changed().await,
        };
        if changed.is_err() {
            if let Some(registration) = current.take() {
                let _ = registration.deregister().await;
                let _ = registered.send(false);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_data_announces_the_marks() {
        let info = EndpointInfo {
            service: "echo".into(),
            service_id: "127_0_0_1_5550".into(),
            frontend: "127.0.0.1:5550".into(),
            ..Default::default()
        };
        let data = node_data(info.clone());
        assert_eq!(data.marks, 1);
        assert_eq!(
            EndpointInfo {
                marks: 0,
                ..data.clone()
            },
            info,
            "nothing else changes"
        );
        // What rpc_registry writes into the node.
        let json = serde_json::to_string(&data).unwrap();
        assert!(json.contains(r#""marks":1"#), "{json}");
    }
}
