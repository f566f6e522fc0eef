//! The admin HTTP endpoint shared by `rpc_proxy` and `rpc_lb` (`admin_address`, off when
//! unset): a small HTTP/1.1 responder that answers one request per connection, a route
//! table, and the Prometheus plumbing both binaries use. It sits beside the data path, never
//! on it: a scrape reads counters the call path bumps with a few atomic operations.
//!
//! # Layout
//! - [`http`]: [`AdminListener`], [`serve`]: accept, read one bounded request, answer it,
//!   close. Requests and answers are [`Request`] and [`Response`].
//! - [`routes`]: [`Routes`], the `(method, path) -> handler` table, with 404 and 405.
//! - [`metrics`]: a registry with the `process_*` metrics, text rendering for
//!   `promtool check metrics`, and [`CallMetrics`]: calls by service, method and outcome
//!   plus a duration histogram, with the label handles cached and the label sets bounded
//!   (a method is labelled once the backend answered it, so clients cannot pick labels).
//!
//! # Shutdown
//! [`serve`] returns as soon as its token is cancelled, abandoning requests in progress:
//! the admin endpoint must never hold up a binary's graceful stop. Binaries cancel it last,
//! so `/healthz` keeps answering 503 while they drain.

pub mod http;
pub mod metrics;
pub mod routes;

pub use http::{AdminListener, Request, Response, serve};
pub use metrics::{CallGuard, CallMetrics, MethodCalls, Outcome, ServiceCalls};
pub use routes::Routes;
