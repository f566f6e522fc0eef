//! The admin HTTP endpoint shared by `rpc_proxy` and `rpc_lb` (`admin_address`, off when
//! unset): a small HTTP/1.1 responder that answers one request per connection, and a route
//! table. It sits beside the data path, never on it: each binary's routes read its state
//! and its metrics (`rpc-metrics`, which the call path bumps with a few atomic operations)
//! when asked.
//!
//! # Layout
//! - [`http`]: [`AdminListener`], [`serve`]: accept, read one bounded request, answer it,
//!   close. Requests and answers are [`Request`] and [`Response`].
//! - [`routes`]: [`Routes`], the `(method, path) -> handler` table, with 404 and 405.
//! - [`page`]: what the status pages at `GET /` are made of: [`page::escape`], the page
//!   skeleton under a strict `Content-Security-Policy`, badges, sparklines, the shared script.
//!
//! # Shutdown
//! [`serve`] returns as soon as its token is cancelled, abandoning requests in progress:
//! the admin endpoint must never hold up a binary's graceful stop. Binaries cancel it last,
//! so `/healthz` keeps answering 503 while they drain.

pub mod http;
pub mod page;
pub mod routes;

pub use http::{AdminListener, Request, Response, serve};
pub use routes::Routes;
