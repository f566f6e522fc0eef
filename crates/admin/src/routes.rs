//! The admin route table: `(method, path) -> handler`. A path no route has gets 404; a known
//! path with another method gets 405 with an `Allow` header; HEAD is served as GET without
//! the body. Each binary builds its table from closures over its own state.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::http::{Request, Response};

/// What an asynchronous handler returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

type Handler = Box<dyn Fn(&Request) -> ResponseFuture + Send + Sync>;

struct Route {
    method: &'static str,
    path: String,
    handler: Handler,
}

/// The route table of one admin endpoint.
#[derive(Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|r| (r.method, &r.path)))
            .finish()
    }
}

// === impl Routes ===

impl Routes {
    /// An empty table (every request gets 404).
    pub fn new() -> Self {
        Routes::default()
    }

    /// Adds `GET path` (HEAD too), answered at once by `handler`.
    pub fn get<F>(self, path: &str, handler: F) -> Self
    where
        F: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        self.route_async("GET", path, move |r| std::future::ready(handler(r)))
    }

    /// Adds `POST path`, answered at once by `handler`.
    pub fn post<F>(self, path: &str, handler: F) -> Self
    where
        F: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        self.route_async("POST", path, move |r| std::future::ready(handler(r)))
    }

    /// Adds `method path` with a handler that may wait (bounded by
    /// [`crate::http::HANDLER_TIMEOUT`]).
    pub fn route_async<F, Fut>(mut self, method: &'static str, path: &str, handler: F) -> Self
    where
        F: Fn(&Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.routes.push(Route {
            method,
            path: path.to_owned(),
            handler: Box::new(move |r| Box::pin(handler(r))),
        });
        self
    }

    /// Answers one request.
    pub async fn dispatch(&self, request: &Request) -> Response {
        let method = match request.method.as_str() {
            "HEAD" => "GET",
            other => other,
        };
        let mut allowed: Vec<&str> = Vec::new();
        for route in self.routes.iter().filter(|r| r.path == request.path) {
            if route.method == method {
                return (route.handler)(request).await;
            }
            allowed.push(route.method);
            if route.method == "GET" {
                allowed.push("HEAD");
            }
        }
        if allowed.is_empty() {
            let paths: Vec<&str> = self.routes.iter().map(|r| r.path.as_str()).collect();
            return Response::text(
                404,
                format!("no such admin path; try one of: {}", paths.join(" ")),
            );
        }
        Response::text(405, "method not allowed").with_header("Allow", &allowed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dispatch_by_method_and_path() {
        let routes = Routes::new()
            .get("/a", |_| Response::text(200, "get a"))
            .post("/a", |_| Response::text(200, "post a"))
            .route_async("POST", "/slow", |_| async {
                tokio::task::yield_now().await;
                Response::text(202, "later")
            });
        let body = |r: Response| (r.status, String::from_utf8(r.body).unwrap());
        assert_eq!(
            body(routes.dispatch(&Request::new("GET", "/a")).await),
            (200, "get a\n".into())
        );
        assert_eq!(
            body(routes.dispatch(&Request::new("HEAD", "/a")).await).0,
            200
        );
        assert_eq!(
            body(routes.dispatch(&Request::new("POST", "/a?x")).await),
            (200, "post a\n".into())
        );
        assert_eq!(
            routes.dispatch(&Request::new("POST", "/slow")).await.status,
            202
        );
        let refused = routes.dispatch(&Request::new("GET", "/slow")).await;
        assert_eq!(refused.status, 405);
        assert_eq!(refused.headers, vec![("Allow".into(), "POST".into())]);
        let missing = routes.dispatch(&Request::new("GET", "/b")).await;
        assert_eq!(missing.status, 404);
        assert!(String::from_utf8(missing.body).unwrap().contains("/slow"));
    }
}
