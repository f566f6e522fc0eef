//! A minimal HTTP/1.1 responder for the admin endpoint: one request per connection, then
//! `Connection: close`. Every step is bounded (request head size, body size, read, handler
//! and write time, open connections), so a slow or hostile client costs little and cannot
//! stall the binary. Sits between the admin socket and the [`Routes`] table.
//!
//! What it understands: `METHOD target HTTP/1.x`, headers up to [`MAX_HEAD`] bytes, and a
//! `Content-Length` body up to [`MAX_BODY`] bytes, which is read and ignored (no route takes
//! a body). A chunked body gets 501, a bad head 400, a long head 431, a long body 413, a
//! client too slow to send its request 408.
//!
//! Requests that may change state (`POST`; anything but `GET` and `HEAD`) get 403 when a
//! browser may have sent them for a web page (CONTRACT section 9): with an `Origin` header,
//! or with a `Host` header that is not the address the client reached (`localhost`,
//! `127.0.0.1` and `[::1]` also taken on a loopback address). Without `Host` (HTTP/1.0
//! tools) they are served: no browser omits it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::routes::Routes;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted (and discarded).
pub const MAX_BODY: usize = 64 * 1024;
/// Longest wait for a whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a handler may take before the client gets 503.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the response to be written.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method as sent (`GET`, `POST`, ...).
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query after `?`, or empty.
    pub query: String,
    /// The `Host` header, if sent.
    pub host: Option<String>,
    /// The `Origin` header, if sent (browsers send it with every `POST`).
    pub origin: Option<String>,
}

impl Request {
    /// A request for `target` (`/path?query`, or an absolute `http://host/path` form).
    pub fn new(method: &str, target: &str) -> Self {
        // Absolute form (proxies send it): drop the scheme and authority.
        let target = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => target,
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            host: None,
            origin: None,
        }
    }
}

/// One response; serialised with `Content-Length` and `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: String,
    /// More headers (e.g. `Allow` on a 405).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

// === impl Response ===

impl Response {
    /// A response with any content type.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type: content_type.to_owned(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A `text/plain` response; a final newline is added when missing.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    /// An `application/json` response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"null".to_vec());
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    /// The `GET /metrics` answer: `text` in the Prometheus text format (version 0.0.4).
    pub fn prometheus(text: Vec<u8>) -> Self {
        Response::new(200, prometheus::TEXT_FORMAT, text)
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The bytes on the wire; `head_only` leaves the body out (HEAD) but keeps its length.
    pub fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The reason phrase of the status codes this crate uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A request that cannot be served, answered with `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    status: u16,
    why: &'static str,
}

impl Refusal {
    fn response(self) -> Response {
        Response::text(self.status, self.why)
    }
}

const fn refuse(status: u16, why: &'static str) -> Refusal {
    Refusal { status, why }
}

/// Parses a request head (everything before the blank line). Returns the request and the
/// body length announced.
fn parse_head(head: &[u8]) -> Result<(Request, usize), Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| refuse(400, "request head is not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(400, "bad request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refuse(400, "bad method"));
    }
    if !(target.starts_with('/') || target.starts_with("http://") || target == "*") {
        return Err(refuse(400, "bad request target"));
    }
    if !version.starts_with("HTTP/") {
        return Err(refuse(400, "bad protocol"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(refuse(505, "only HTTP/1.0 and HTTP/1.1 are served"));
    }
    let mut body_len = 0usize;
    let mut request = Request::new(method, target);
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(refuse(400, "bad header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            body_len = value
                .parse()
                .map_err(|_| refuse(400, "bad Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(refuse(501, "Transfer-Encoding is not supported"));
        } else if name.eq_ignore_ascii_case("host") {
            if request.host.is_some() {
                return Err(refuse(400, "more than one Host header"));
            }
            request.host = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("origin") {
            request.origin = Some(value.to_owned());
        }
    }
    if body_len > MAX_BODY {
        return Err(refuse(413, "request body too large"));
    }
    Ok((request, body_len))
}

/// Where the head ends: the index just past its blank line.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Reads one request (its body is read and dropped). `Ok(None)`: the client closed before
/// sending a whole request.
async fn read_request<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Request>, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(refuse(431, "request head too large"));
        }
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    if end > MAX_HEAD {
        return Err(refuse(431, "request head too large"));
    }
    let (request, body_len) = parse_head(&buf[..end])?;
    let mut have = buf.len() - end;
    while have < body_len {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => have += n,
        }
    }
    Ok(Some(request))
}

/// Refuses a request that may change state (any method but `GET` and `HEAD`) when a browser
/// may have sent it for a web page: it carries an `Origin` header (browsers send one with
/// every `POST` a page makes), or its `Host` header does not name `local`, the address
/// the client reached (a DNS-rebinding page sends its own host name). See [`host_is_local`]
/// for the names taken. A request without `Host` is served: browsers always send one, while
/// HTTP/1.0 tools and `nc` may not.
fn refuse_cross_site(request: &Request, local: SocketAddr) -> Option<Refusal> {
    if matches!(request.method.as_str(), "GET" | "HEAD") {
        return None;
    }
    if request.origin.is_some() {
        return Some(refuse(
            403,
            "refused: a request with an Origin header (a browser's) cannot change state; use curl",
        ));
    }
    match &request.host {
        Some(host) if !host_is_local(host, local) => Some(refuse(
            403,
            "refused: the Host header is not the admin address this request reached",
        )),
        _ => None,
    }
}

/// Whether the `Host` header value `host` names `local`: its IP address (IPv6 in brackets)
/// and port, compared case-insensitively, the port 80 when left out. On a loopback address
/// `localhost`, `127.0.0.1` and `[::1]` with the port are taken too. A host name other than
/// `localhost` never is (the admin endpoint cannot tell which names resolve to it).
fn host_is_local(host: &str, local: SocketAddr) -> bool {
    let host = host.trim();
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, port)) => match port.strip_prefix(':') {
                Some(port) => (ip, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    let port = match port {
        None => 80,
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            match digits.parse::<u16>() {
                Ok(port) => port,
                Err(_) => return false,
            }
        }
        Some(_) => return false,
    };
    if port != local.port() {
        return false;
    }
    let local_ip = local.ip().to_canonical();
    let loopback = local_ip.is_loopback();
    if name.eq_ignore_ascii_case("localhost") {
        return loopback;
    }
    let bracketed = host.starts_with('[');
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_ipv6() != bracketed => false,
        Ok(ip) => {
            ip.to_canonical() == local_ip
                || (loopback
                    && (ip == std::net::Ipv4Addr::LOCALHOST || ip == std::net::Ipv6Addr::LOCALHOST))
        }
        Err(_) => false,
    }
}

/// Reads one request, answers it, and closes. `local` is the address the client reached.
async fn serve_connection<S>(mut stream: S, local: SocketAddr, routes: &Routes)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (response, head_only) =
        match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
            Err(_) => (
                refuse(408, "request not received in time").response(),
                false,
            ),
            Ok(Err(refusal)) => (refusal.response(), false),
            Ok(Ok(None)) => return,
            Ok(Ok(Some(request))) => {
                let head_only = request.method == "HEAD";
                let response = match refuse_cross_site(&request, local) {
                    Some(refusal) => refusal.response(),
                    None => tokio::time::timeout(HANDLER_TIMEOUT, routes.dispatch(&request))
                        .await
                        .unwrap_or_else(|_| Response::text(503, "handler timed out")),
                };
                tracing::debug!(
                    method = request.method,
                    path = request.path,
                    status = response.status,
                    "admin request"
                );
                (response, head_only)
            }
        };
    let bytes = response.to_bytes(head_only);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}

// === impl AdminListener ===

/// The bound admin socket.
#[derive(Debug)]
pub struct AdminListener {
    listener: TcpListener,
    address: SocketAddr,
}

impl AdminListener {
    /// Binds `address` (`host:port`; a host name is resolved).
    ///
    /// # Errors
    /// The bind error, with the address in its message.
    pub async fn bind(address: &str) -> io::Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("admin endpoint {address}: {e}")))?;
        let address = listener.local_addr()?;
        Ok(AdminListener { listener, address })
    }

    /// The address bound (with the real port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Whether only this host can reach it.
    pub fn is_loopback(&self) -> bool {
        self.address.ip().is_loopback()
    }
}

/// Serves admin requests on `listener` with `routes` until `shutdown` is cancelled; then
/// returns at once, dropping requests in progress. Logs the address, and warns when it is
/// reachable from other hosts.
pub async fn serve(listener: AdminListener, routes: Arc<Routes>, shutdown: CancellationToken) {
    if listener.is_loopback() {
        tracing::info!(address = %listener.address, "admin endpoint listening");
    } else {
        tracing::warn!(
            address = %listener.address,
            "admin endpoint listening on a non-loopback address: other hosts can reach it (POST routes included)"
        );
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.listener.accept() => accepted,
        };
        let stream: TcpStream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the limit: close at once rather than queue.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let local = stream.local_addr().unwrap_or(listener.address);
        let (routes, shutdown) = (routes.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = serve_connection(stream, local, &routes) => {}
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn routes() -> Routes {
        Routes::new()
            .get("/healthz", |_| Response::text(200, "ok"))
            .post("/drain", |_| Response::text(200, "draining"))
    }

    /// The address the test client reached.
    const LOCAL: &str = "127.0.0.1:9901";

    /// Sends `raw` as the client to [`LOCAL`], returns everything the server wrote.
    async fn exchange(raw: &[u8]) -> String {
        exchange_at(LOCAL, raw).await
    }

    /// Sends `raw` as the client to `local`, returns everything the server wrote.
    async fn exchange_at(local: &str, raw: &[u8]) -> String {
        let (mut client, server) = duplex(64 * 1024);
        let routes = routes();
        let local = local.parse().unwrap();
        let serving = tokio::spawn(async move { serve_connection(server, local, &routes).await });
        client.write_all(raw).await.unwrap();
        // EOF after the request, as a client that sent everything it had.
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        serving.await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn status_of(response: &str) -> u16 {
        response[9..12].parse().unwrap()
    }

    #[tokio::test]
    async fn get_gets_body_with_length_and_close() {
        let out = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("Content-Length: 3\r\n"), "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nok\n"), "{out}");
    }

    #[tokio::test]
    async fn unknown_path_404_wrong_method_405_with_allow() {
        assert_eq!(
            status_of(&exchange(b"GET /nope HTTP/1.1\r\n\r\n").await),
            404
        );
        let out = exchange(b"GET /drain HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_of(&out), 405);
        assert!(out.contains("Allow: POST\r\n"), "{out}");
        let out = exchange(b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status_of(&out), 405);
        assert!(out.contains("Allow: GET, HEAD\r\n"), "{out}");
    }

    #[tokio::test]
    async fn head_has_length_but_no_body() {
        let out = exchange(b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(status_of(&out), 200);
        assert!(out.contains("Content-Length: 3\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "{out}");
    }

    #[tokio::test]
    async fn post_body_is_read_and_query_ignored() {
        let out = exchange(b"POST /drain?now=1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").await;
        assert_eq!(status_of(&out), 200, "{out}");
        assert!(out.ends_with("draining\n"));
        // Bare LF line ends are tolerated.
        assert_eq!(
            status_of(&exchange(b"GET /healthz HTTP/1.0\n\n").await),
            200
        );
    }

    #[tokio::test]
    async fn bad_requests_get_4xx_or_5xx() {
        for (raw, status) in [
            (&b"garbage\r\n\r\n"[..], 400),
            (b"GET /healthz\r\n\r\n", 400),
            (b"get /healthz HTTP/1.1\r\n\r\n", 400),
            (b"GET healthz HTTP/1.1\r\n\r\n", 400),
            (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
            (b"GET /healthz HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            (b"POST /drain HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                b"POST /drain HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
                413,
            ),
            (
                b"POST /drain HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
        ] {
            let out = exchange(raw).await;
            assert_eq!(status_of(&out), status, "{raw:?} -> {out}");
            assert!(out.contains("Connection: close\r\n"));
        }
    }

    /// A `POST` as `curl` sends it to [`LOCAL`], with more header lines.
    fn post(extra: &str) -> Vec<u8> {
        format!("POST /drain HTTP/1.1\r\n{extra}Content-Length: 0\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn post_with_an_origin_header_is_refused() {
        for origin in ["http://evil.example", "http://127.0.0.1:9901", "null"] {
            let out = exchange(&post(&format!("Host: {LOCAL}\r\nOrigin: {origin}\r\n"))).await;
            assert_eq!(status_of(&out), 403, "Origin: {origin} -> {out}");
            assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out}");
        }
    }

    #[tokio::test]
    async fn post_with_another_host_is_refused() {
        for host in [
            "evil.example:9901",
            "evil.example",
            "127.0.0.1:9902",
            "127.0.0.1",
            "127.0.0.2:9901",
            "localhost",
            "127.0.0.1:9901.evil.example",
            "",
        ] {
            let out = exchange(&post(&format!("Host: {host}\r\n"))).await;
            assert_eq!(status_of(&out), 403, "Host: {host} -> {out}");
        }
        // Not bound to loopback: only the address itself.
        for host in [
            "localhost:9901",
            "127.0.0.1:9901",
            "[::1]:9901",
            "myhost:9901",
        ] {
            let out = exchange_at("10.1.2.3:9901", &post(&format!("Host: {host}\r\n"))).await;
            assert_eq!(status_of(&out), 403, "Host: {host} -> {out}");
        }
        let out = exchange(&post(&format!("Host: {LOCAL}\r\nHost: {LOCAL}\r\n"))).await;
        assert_eq!(status_of(&out), 400, "{out}");
    }

    #[tokio::test]
    async fn post_with_the_bound_address_as_host_is_served() {
        for host in [
            LOCAL,
            "localhost:9901",
            "LocalHost:9901",
            "[::1]:9901",
            "127.0.0.1:9901 ",
        ] {
            let out = exchange(&post(&format!("Host: {host}\r\n"))).await;
            assert_eq!(status_of(&out), 200, "Host: {host} -> {out}");
        }
        for (local, host) in [
            ("10.1.2.3:9901", "10.1.2.3:9901"),
            ("[2001:db8::1]:80", "[2001:db8::1]"),
            ("[2001:db8::1]:9901", "[2001:DB8::1]:9901"),
            ("[::1]:9901", "localhost:9901"),
            ("127.0.0.1:80", "127.0.0.1"),
        ] {
            let out = exchange_at(local, &post(&format!("Host: {host}\r\n"))).await;
            assert_eq!(status_of(&out), 200, "{local}, Host: {host} -> {out}");
        }
        // No Host at all (HTTP/1.0 tools, `nc`): no browser sends that.
        assert_eq!(status_of(&exchange(&post("")).await), 200);
        assert_eq!(
            status_of(&exchange(b"POST /drain HTTP/1.0\r\n\r\n").await),
            200
        );
    }

    #[tokio::test]
    async fn get_is_served_whatever_its_origin_and_host() {
        let out = exchange(
            b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://evil.example\r\n\r\n",
        )
        .await;
        assert_eq!(status_of(&out), 200, "{out}");
        let out = exchange(b"HEAD /healthz HTTP/1.1\r\nOrigin: null\r\n\r\n").await;
        assert_eq!(status_of(&out), 200, "{out}");
    }

    #[tokio::test]
    async fn oversized_head_is_431() {
        let mut raw = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status_of(&exchange(&raw).await), 431);
    }

    #[tokio::test]
    async fn client_closing_early_gets_nothing() {
        assert_eq!(exchange(b"GET /heal").await, "");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_gets_408() {
        let (mut client, server) = duplex(1024);
        let routes = routes();
        let local = LOCAL.parse().unwrap();
        let serving = tokio::spawn(async move { serve_connection(server, local, &routes).await });
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        serving.await.unwrap();
        assert_eq!(status_of(&String::from_utf8(out).unwrap()), 408);
    }

    #[test]
    fn metrics_are_answered_in_the_prometheus_text_format() {
        let response = Response::prometheus(b"up 1\n".to_vec());
        assert_eq!(response.status, 200);
        assert_eq!(response.content_type, "text/plain; version=0.0.4");
    }

    #[test]
    fn absolute_form_and_query_split() {
        let r = Request::new("GET", "http://127.0.0.1:9/status?x=1");
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/status", "x=1"));
        assert_eq!(Request::new("GET", "http://h").path, "/");
    }

    #[tokio::test]
    async fn serve_answers_over_tcp_and_stops_on_cancel() {
        let listener = AdminListener::bind("127.0.0.1:0").await.unwrap();
        assert!(listener.is_loopback());
        let address = listener.local_addr();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(routes()), stop.clone()));
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        // A client that never sends its request does not hold the stop up.
        let _idle = TcpStream::connect(address).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("serve returns at once on cancel")
            .unwrap();
    }

    #[tokio::test]
    async fn serve_checks_post_host_against_the_address_reached() {
        let listener = AdminListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr();
        let stop = CancellationToken::new();
        let _server = tokio::spawn(serve(listener, Arc::new(routes()), stop.clone()));
        let send = |raw: String| async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(raw.as_bytes()).await.unwrap();
            let mut out = String::new();
            stream.read_to_string(&mut out).await.unwrap();
            status_of(&out)
        };
        let port = address.port();
        assert_eq!(
            send(String::from_utf8(post(&format!("Host: {address}\r\n"))).unwrap()).await,
            200
        );
        assert_eq!(
            send(String::from_utf8(post(&format!("Host: localhost:{port}\r\n"))).unwrap()).await,
            200
        );
        assert_eq!(
            send(String::from_utf8(post(&format!("Host: evil.example:{port}\r\n"))).unwrap()).await,
            403
        );
        assert_eq!(
            send(
                String::from_utf8(post(&format!(
                    "Host: {address}\r\nOrigin: http://{address}\r\n"
                )))
                .unwrap()
            )
            .await,
            403
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = AdminListener::bind("127.0.0.1:0").await.unwrap();
        let address = taken.local_addr().to_string();
        let err = AdminListener::bind(&address).await.unwrap_err();
        assert!(err.to_string().contains(&address), "{err}");
    }
}
