//! The proxy's status page (`GET /`, CONTRACT section 9): the ZooKeeper session and the
//! routing table, a row per service (`data-service`: calls/s, errors, p50 and p99 over the
//! last minute with a chart of each, calls in flight) followed by a row per endpoint
//! (`data-state`: connected, idle, backoff, draining or ejected). [`body`] draws it on the
//! server from the `/status` and `/status/history` documents; [`SCRIPT`] draws the same
//! markup from the same two routes every two seconds. Service names and endpoint addresses
//! come from ZooKeeper: markup gets them through [`escape`] only, the script as text and
//! attribute values only.

use std::fmt::Write as _;

use rpc_admin::page::{badge, escape, fmt_ms, fmt_rate, sparkline};
use serde_json::Value;

use super::history::WINDOW;

/// Endpoint states in the order the service row counts them (others follow, as met).
const STATES: [&str; 5] = ["connected", "idle", "backoff", "draining", "ejected"];

/// The page's `<body>` content for the `/status` document `status` and the
/// `/status/history` document `history`.
pub fn body(status: &Value, history: &Value) -> String {
    let services = status["services"].as_array().map_or(&[][..], Vec::as_slice);
    let mut out = String::with_capacity(4096 + services.len() * 4096);
    let fact = |id: &str, label: &str, value: String| {
        format!(r#"<div><dt>{label}</dt><dd id="{id}">{value}</dd></div>"#)
    };
    let _ = write!(
        out,
        concat!(
            "<header><h1>rpc_proxy <span id=\"state\">{state}</span></h1><dl class=\"facts\">",
            "{zk}{synced}{services}{connections}{unknown}{pid}{version}</dl></header>\n",
            "<p id=\"updated\" class=\"updated\">Drawn by the server; the page refreshes ",
            "itself every 2 s.</p>\n<main id=\"page\" data-rendered=\"server\">\n",
            "<table id=\"routing\"><caption>calls/s, errors, p50 and p99: over the last ",
            "minute; charts: a point a second, the newest on the right.</caption>",
            "<thead><tr><th>service / endpoint</th><th>state</th><th>calls/s</th>",
            "<th>errors</th><th>p50</th><th>p99</th><th class=\"num\">in flight</th></tr>",
            "</thead>\n",
        ),
        state = badge(&text(&status["state"])),
        zk = fact(
            "zookeeper",
            "ZooKeeper session",
            badge(&text(&status["zookeeper"]))
        ),
        synced = fact("synced", "routing table", synced(&status["synced"]).into()),
        services = fact("services", "services", services.len().to_string()),
        connections = fact(
            "connections",
            "client connections",
            escape(&text(&status["client_connections"]))
        ),
        unknown = fact(
            "unknown",
            "calls for unknown services",
            escape(&text(&status["unknown_service_calls"]))
        ),
        pid = fact("pid", "pid", escape(&text(&status["pid"]))),
        version = fact("version", "version", escape(&text(&status["version"]))),
    );
    let no_history = Value::Null;
    for service in services {
        let name = text(&service["name"]);
        let found = history["services"]
            .as_array()
            .and_then(|all| all.iter().find(|h| h["name"].as_str() == Some(&name)))
            .unwrap_or(&no_history);
        service_rows(&mut out, service, found);
    }
    let hidden = if services.is_empty() { "" } else { " hidden" };
    let _ = write!(
        out,
        "</table>\n<p id=\"empty\" class=\"empty\"{hidden}>No service in the routing table.</p>\n</main>"
    );
    out
}

/// One `<tbody>`: the service's row, then one row per endpoint.
fn service_rows(out: &mut String, service: &Value, history: &Value) {
    let name = escape(&text(&service["name"]));
    let endpoints = service["endpoints"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let minute = &history["minute"];
    let series = |key: &str| -> Vec<Option<f64>> {
        history["series"][key]
            .as_array()
            .map(|values| values.iter().map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let errors = if minute.is_null() {
        "-".to_owned()
    } else {
        text(&minute["errors"])
    };
    let _ = write!(
        out,
        concat!(
            "<tbody><tr class=\"service\" data-service=\"{name}\"><th scope=\"row\">{name}</th>",
            "<td class=\"summary\">{summary}</td>{calls}{errors}{p50}{p99}",
            "<td class=\"num\">{inflight}</td></tr>\n"
        ),
        name = name,
        summary = escape(&summary(endpoints)),
        calls = metric(
            &fmt_rate(minute["calls_per_s"].as_f64()),
            &series("calls_per_s"),
            "calls"
        ),
        errors = metric(&errors, &series("errors"), "errors"),
        p50 = metric(&fmt_ms(minute["p50_ms"].as_f64()), &series("p50_ms"), "p50"),
        p99 = metric(&fmt_ms(minute["p99_ms"].as_f64()), &series("p99_ms"), "p99"),
        inflight = escape(&text(&service["inflight"])),
    );
    for endpoint in endpoints {
        let address = escape(&text(&endpoint["address"]));
        let state = text(&endpoint["state"]);
        let _ = write!(
            out,
            concat!(
                "<tr class=\"endpoint\" data-state=\"{state_attr}\" data-address=\"{address}\">",
                "<td class=\"mono\">{address}</td><td>{badge}</td>",
                "<td class=\"detail\" colspan=\"4\">{detail}</td>",
                "<td class=\"num\">{outstanding}</td></tr>\n"
            ),
            state_attr = escape(&state),
            address = address,
            badge = badge(&state),
            detail = escape(&detail(endpoint)),
            outstanding = escape(&text(&endpoint["outstanding"])),
        );
    }
    out.push_str("</tbody>\n");
}

/// A chart cell: the minute's figure, then the chart of its intervals.
fn metric(value: &str, series: &[Option<f64>], class: &str) -> String {
    format!(
        r#"<td class="metric"><span class="value">{}</span>{}</td>"#,
        escape(value),
        sparkline(series, WINDOW, class)
    )
}

/// `2 connected · 1 backoff`, or `no endpoint`.
fn summary(endpoints: &[Value]) -> String {
    if endpoints.is_empty() {
        return "no endpoint".into();
    }
    let mut counts: Vec<(String, usize)> = Vec::new();
    for endpoint in endpoints {
        let state = text(&endpoint["state"]);
        match counts.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => counts.push((state, 1)),
        }
    }
    counts.sort_by_key(|(s, _)| STATES.iter().position(|k| k == s).unwrap_or(STATES.len()));
    counts
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The endpoint's outlier counts.
fn detail(endpoint: &Value) -> String {
    let mut detail = format!(
        "failures in a row {} · ejections {}",
        text(&endpoint["consecutive_failures"]),
        text(&endpoint["ejections"])
    );
    if endpoint["marks"] == Value::Bool(true) {
        detail.push_str(" · marks its refusals");
    }
    detail
}

fn synced(value: &Value) -> &'static str {
    if value.as_bool() == Some(true) {
        "synced"
    } else {
        "not synced yet"
    }
}

/// A JSON value as the page shows it (still to be escaped).
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Draws the page again from `status` and `status/history` every 2 s: the same markup as
/// [`body`], built with the helpers of [`rpc_admin::page::SCRIPT`].
pub const SCRIPT: &str = r#"const STATES = ["connected", "idle", "backoff", "draining", "ejected"];
const text = (v) => (v === null || v === undefined ? "-" : String(v));
function summary(endpoints) {
  if (!endpoints.length) return "no endpoint";
  const counts = new Map();
  for (const e of endpoints) counts.set(text(e.state), (counts.get(text(e.state)) || 0) + 1);
  const rank = (s) => (STATES.includes(s) ? STATES.indexOf(s) : STATES.length);
  return [...counts.keys()].sort((a, b) => rank(a) - rank(b)).map((s) => counts.get(s) + " " + s).join(" · ");
}
function detail(e) {
  let d = "failures in a row " + text(e.consecutive_failures) + " · ejections " + text(e.ejections);
  if (e.marks === true) d += " · marks its refusals";
  return d;
}
function metric(value, values, cls, window) {
  return h("td", {class: "metric"}, h("span", {class: "value"}, value), spark(values || [], window, cls));
}
function render(status, history) {
  const services = status.services || [];
  document.getElementById("state").replaceChildren(badge(text(status.state)));
  document.getElementById("zookeeper").replaceChildren(badge(text(status.zookeeper)));
  document.getElementById("synced").textContent = status.synced === true ? "synced" : "not synced yet";
  document.getElementById("services").textContent = String(services.length);
  document.getElementById("connections").textContent = text(status.client_connections);
  document.getElementById("unknown").textContent = text(status.unknown_service_calls);
  document.getElementById("pid").textContent = text(status.pid);
  document.getElementById("version").textContent = text(status.version);
  const past = new Map((history.services || []).map((s) => [s.name, s]));
  const win = history.window || 60;
  const bodies = services.map((service) => {
    const found = past.get(service.name) || {minute: null, series: {}};
    const m = found.minute, series = found.series || {};
    const rows = [h("tr", {class: "service", "data-service": text(service.name)},
      h("th", {scope: "row"}, text(service.name)),
      h("td", {class: "summary"}, summary(service.endpoints || [])),
      metric(fmtRate(m ? m.calls_per_s : null), series.calls_per_s, "calls", win),
      metric(m ? text(m.errors) : "-", series.errors, "errors", win),
      metric(fmtMs(m ? m.p50_ms : null), series.p50_ms, "p50", win),
      metric(fmtMs(m ? m.p99_ms : null), series.p99_ms, "p99", win),
      h("td", {class: "num"}, text(service.inflight)))];
    for (const e of service.endpoints || []) {
      rows.push(h("tr", {class: "endpoint", "data-state": text(e.state), "data-address": text(e.address)},
        h("td", {class: "mono"}, text(e.address)),
        h("td", null, badge(text(e.state))),
        h("td", {class: "detail", colspan: 4}, detail(e)),
        h("td", {class: "num"}, text(e.outstanding))));
    }
    return h("tbody", null, ...rows);
  });
  const table = document.getElementById("routing");
  table.querySelectorAll("tbody").forEach((b) => b.remove());
  table.append(...bodies);
  document.getElementById("empty").hidden = services.length > 0;
}
poll(["status", "status/history"], render);
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOSTILE: &str = r#"<script>alert(1)</script>"'&"#;
    const ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;";

    fn status(name: &str, address: &str) -> Value {
        json!({
            "state": "serving", "zookeeper": "connected", "synced": true, "pid": 7,
            "version": "0.1.0", "client_connections": 2, "unknown_service_calls": 0,
            "services": [{
                "name": name, "inflight": 1, "calls": 3, "errors": 1,
                "endpoints": [
                    {"address": address, "state": "backoff", "outstanding": 0, "marks": false,
                        "consecutive_failures": 2, "ejections": 0},
                    {"address": "127.0.0.1:1", "state": "connected", "outstanding": 1,
                        "marks": true, "consecutive_failures": 0, "ejections": 1},
                    {"address": "127.0.0.1:2", "state": "connected", "outstanding": 0,
                        "marks": true, "consecutive_failures": 0, "ejections": 0},
                ],
            }],
        })
    }

    #[test]
    fn peer_names_are_escaped_in_text_and_attributes() {
        let history = json!({"window": 60, "services": [{
            "name": HOSTILE,
            "minute": {"calls_per_s": 1.5, "errors": 1, "p50_ms": 0.4, "p99_ms": 250.0},
            "series": {"calls_per_s": [1.0, 2.0], "errors": [0, 1], "p50_ms": [0.4, null],
                "p99_ms": [250.0, null]},
        }]});
        let html = body(&status(HOSTILE, HOSTILE), &history);
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains(r#"'&"#), "{html}");
        assert!(
            html.contains(&format!(
                r#"data-service="{ESCAPED}"><th scope="row">{ESCAPED}</th>"#
            )),
            "{html}"
        );
        assert!(
            html.contains(&format!(
                r#"data-address="{ESCAPED}"><td class="mono">{ESCAPED}</td>"#
            )),
            "{html}"
        );
        // The service's history was found under its name.
        assert!(
            html.contains(r#"<span class="value">1.50</span>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"<span class="value">250 ms</span>"#),
            "{html}"
        );
    }

    #[test]
    fn rows_carry_service_and_endpoint_states() {
        let html = body(&status("echo", "/run/echo.sock"), &json!({"services": []}));
        assert_eq!(html.matches("<tr class=\"service\"").count(), 1);
        assert!(html.contains(r#"<tr class="service" data-service="echo">"#));
        let states: Vec<&str> = html
            .split(r#"<tr class="endpoint" data-state=""#)
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap())
            .collect();
        assert_eq!(states, ["backoff", "connected", "connected"]);
        assert!(
            html.contains(r#"<td class="summary">2 connected · 1 backoff</td>"#),
            "{html}"
        );
        assert!(html.contains("failures in a row 2 · ejections 0</td>"));
        assert!(html.contains("ejections 1 · marks its refusals</td>"));
        // No history yet: dashes, empty charts.
        assert!(html.contains(r#"<span class="value">-</span>"#));
        assert!(!html.contains("<polyline"));
        assert!(html.contains(r#"<p id="empty" class="empty" hidden>"#));
        assert!(html.contains(r#"<dd id="zookeeper"><span class="badge" data-badge="connected">"#));
    }

    #[test]
    fn an_empty_table_says_so() {
        let html = body(
            &json!({"state": "starting", "zookeeper": "connecting", "synced": false,
                "services": []}),
            &json!({}),
        );
        assert!(html.contains(r#"<p id="empty" class="empty">"#));
        assert!(html.contains("not synced yet"));
        assert!(html.contains(r#"data-badge="starting""#));
    }
}
