//! The LB's status page (`GET /`, CONTRACT section 9): its registration in ZooKeeper, queue
//! and calls, the row of its service (`data-service`) and a row per worker (`data-state`:
//! booting, ready, stopping or hung) with its pid, calls in flight, calls served and the age
//! of its oldest call; and the supervision, when the LB starts its workers. [`body`] draws it
//! on the server from the `/status` document; [`SCRIPT`] draws the same markup from
//! `/status` every two seconds. Everything shown goes through [`escape`] (markup) or is set
//! as text and attribute values (script).

use std::fmt::Write as _;

use rpc_admin::page::{badge, escape, fmt_ms};
use serde_json::Value;

/// The page's `<body>` content for the `/status` document `status`.
pub fn body(status: &Value) -> String {
    let workers = status["workers"].as_array().map_or(&[][..], Vec::as_slice);
    let mut out = String::with_capacity(4096 + workers.len() * 512);
    let fact = |id: &str, label: &str, value: String| {
        format!(r#"<div><dt>{label}</dt><dd id="{id}">{value}</dd></div>"#)
    };
    let ready = workers.iter().filter(|w| w["state"] == "ready").count();
    let _ = write!(
        out,
        concat!(
            "<header><h1>rpc_lb <span id=\"state\">{state}</span></h1><dl class=\"facts\">",
            "{service}{registration}{queue}{inflight}{workers}{connections}{pid}{version}",
            "</dl><p id=\"supervision\" class=\"updated\">{supervision}</p></header>\n",
            "<p id=\"updated\" class=\"updated\">Drawn by the server; the page refreshes ",
            "itself every 2 s.</p>\n<main id=\"page\" data-rendered=\"server\">\n",
            "<table id=\"workers\"><thead><tr><th>service / worker</th><th>state</th>",
            "<th class=\"num\">in flight</th><th class=\"num\">calls served</th>",
            "<th class=\"num\">oldest call</th><th>slot · generation</th></tr></thead>\n",
        ),
        state = badge(&text(&status["state"])),
        service = fact("service", "service", escape(&text(&status["service"]))),
        registration = fact("registration", "ZooKeeper", badge(registration(status))),
        queue = fact(
            "queue",
            "queued calls",
            escape(&text(&status["queue_depth"]))
        ),
        inflight = fact("inflight", "in flight", escape(&text(&status["inflight"]))),
        workers = fact(
            "ready",
            "workers ready",
            format!("{ready} of {}", workers.len())
        ),
        connections = fact(
            "connections",
            "proxy connections",
            escape(&text(&status["client_connections"]))
        ),
        pid = fact("pid", "pid", escape(&text(&status["pid"]))),
        version = fact("version", "version", escape(&text(&status["version"]))),
        supervision = escape(&supervision(&status["supervision"])),
    );
    let _ = write!(
        out,
        concat!(
            "<tbody><tr class=\"service\" data-service=\"{name}\"><th scope=\"row\">{name}</th>",
            "<td>{registration}</td><td class=\"num\">{inflight}</td>",
            "<td class=\"detail\" colspan=\"3\">{detail}</td></tr>\n"
        ),
        name = escape(&text(&status["service"])),
        registration = badge(registration(status)),
        inflight = escape(&text(&status["inflight"])),
        detail = escape(&format!(
            "calls {} · errors {} · queued {}",
            text(&status["calls"]),
            text(&status["errors"]),
            text(&status["queue_depth"])
        )),
    );
    for worker in workers {
        let state = text(&worker["state"]);
        let _ = write!(
            out,
            concat!(
                "<tr class=\"worker\" data-state=\"{state_attr}\" data-pid=\"{pid}\">",
                "<td class=\"mono\">{who}</td><td>{badge}</td><td class=\"num\">{load}</td>",
                "<td class=\"num\">{served}</td><td class=\"num\">{oldest}</td>",
                "<td>{slot}</td></tr>\n"
            ),
            state_attr = escape(&state),
            pid = escape(&text(&worker["pid"])),
            who = escape(&who(worker)),
            badge = badge(&state),
            load = escape(&load(worker)),
            served = escape(&text(&worker["served"])),
            oldest = escape(&fmt_ms(worker["oldest_call_ms"].as_f64())),
            slot = escape(&slot(worker)),
        );
    }
    let hidden = if workers.is_empty() { "" } else { " hidden" };
    let _ = write!(
        out,
        concat!(
            "</tbody></table>\n<p id=\"empty\" class=\"empty\"{hidden}>No worker: calls are ",
            "refused until one is ready.</p>\n</main>"
        ),
        hidden = hidden
    );
    out
}

/// `registered`, `maintenance` (drained by `POST /drain`) or `unregistered`.
fn registration(status: &Value) -> &'static str {
    if status["maintenance"] == Value::Bool(true) {
        "maintenance"
    } else if status["registered"] == Value::Bool(true) {
        "registered"
    } else {
        "unregistered"
    }
}

/// `pid 123`, with `(no new calls)` for a worker out of rotation.
fn who(worker: &Value) -> String {
    let mut who = match worker["pid"].as_u64() {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".into(),
    };
    if worker["active"] == Value::Bool(false) {
        who.push_str(" (no new calls)");
    }
    who
}

/// Calls in flight of its capacity.
fn load(worker: &Value) -> String {
    format!(
        "{} / {}",
        text(&worker["inflight"]),
        text(&worker["capacity"])
    )
}

/// `0 · 2` for a worker the LB started, `-` for one that dialled in.
fn slot(worker: &Value) -> String {
    match (&worker["slot"], &worker["generation"]) {
        (Value::Null, _) => "-".into(),
        (slot, generation) => format!("{} · {}", text(slot), text(generation)),
    }
}

/// One line on the supervision: the command, processes, generation, restarts pending.
fn supervision(supervision: &Value) -> String {
    if supervision.is_null() {
        return "Workers dial in (no worker_command).".into();
    }
    let mut line = format!(
        "Supervised: {} processes of `{}`, generation {}",
        text(&supervision["processes"]),
        text(&supervision["command"]),
        text(&supervision["generation"]),
    );
    if supervision["rolling_restart"] == Value::Bool(true) {
        line.push_str(", rolling restart under way");
    }
    for restart in supervision["restarting"].as_array().into_iter().flatten() {
        let _ = write!(
            line,
            "; slot {} restarts in {} ms (last exit: {})",
            text(&restart["slot"]),
            text(&restart["restart_in_ms"]),
            text(&restart["last_exit"]),
        );
    }
    line.push('.');
    line
}

/// A JSON value as the page shows it (still to be escaped).
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Draws the page again from `status` every 2 s: the same markup as [`body`], built with the
/// helpers of [`rpc_admin::page::SCRIPT`].
pub const SCRIPT: &str = r#"const text = (v) => (v === null || v === undefined ? "-" : String(v));
function registration(s) {
  return s.maintenance === true ? "maintenance" : s.registered === true ? "registered" : "unregistered";
}
function who(w) {
  let who = typeof w.pid === "number" ? "pid " + w.pid : "pid unknown";
  if (w.active === false) who += " (no new calls)";
  return who;
}
function supervision(s) {
  if (s === null || s === undefined) return "Workers dial in (no worker_command).";
  let line = "Supervised: " + text(s.processes) + " processes of `" + text(s.command) + "`, generation " + text(s.generation);
  if (s.rolling_restart === true) line += ", rolling restart under way";
  for (const r of s.restarting || []) {
    line += "; slot " + text(r.slot) + " restarts in " + text(r.restart_in_ms) + " ms (last exit: " + text(r.last_exit) + ")";
  }
  return line + ".";
}
function render(status) {
  const workers = status.workers || [];
  const ready = workers.filter((w) => w.state === "ready").length;
  document.getElementById("state").replaceChildren(badge(text(status.state)));
  document.getElementById("service").textContent = text(status.service);
  document.getElementById("registration").replaceChildren(badge(registration(status)));
  document.getElementById("queue").textContent = text(status.queue_depth);
  document.getElementById("inflight").textContent = text(status.inflight);
  document.getElementById("ready").textContent = ready + " of " + workers.length;
  document.getElementById("connections").textContent = text(status.client_connections);
  document.getElementById("pid").textContent = text(status.pid);
  document.getElementById("version").textContent = text(status.version);
  document.getElementById("supervision").textContent = supervision(status.supervision);
  const rows = [h("tr", {class: "service", "data-service": text(status.service)},
    h("th", {scope: "row"}, text(status.service)),
    h("td", null, badge(registration(status))),
    h("td", {class: "num"}, text(status.inflight)),
    h("td", {class: "detail", colspan: 3},
      "calls " + text(status.calls) + " · errors " + text(status.errors) + " · queued " + text(status.queue_depth)))];
  for (const w of workers) {
    rows.push(h("tr", {class: "worker", "data-state": text(w.state), "data-pid": text(w.pid)},
      h("td", {class: "mono"}, who(w)),
      h("td", null, badge(text(w.state))),
      h("td", {class: "num"}, text(w.inflight) + " / " + text(w.capacity)),
      h("td", {class: "num"}, text(w.served)),
      h("td", {class: "num"}, fmtMs(typeof w.oldest_call_ms === "number" ? w.oldest_call_ms : null)),
      h("td", null, w.slot === null || w.slot === undefined ? "-" : text(w.slot) + " · " + text(w.generation))));
  }
  const table = document.getElementById("workers");
  table.querySelectorAll("tbody").forEach((b) => b.remove());
  table.append(h("tbody", null, ...rows));
  document.getElementById("empty").hidden = workers.length > 0;
}
poll(["status"], render);
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOSTILE: &str = r#"<script>alert(1)</script>"'&"#;
    const ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;";

    fn status() -> Value {
        json!({
            "service": HOSTILE, "state": "serving", "registered": true, "maintenance": false,
            "queue_depth": 3, "inflight": 2, "calls": 10, "errors": 1, "client_connections": 1,
            "pid": 9, "version": "0.1.0",
            "workers": [
                {"id": 1, "pid": 4242, "state": "ready", "inflight": 2, "capacity": 4,
                    "active": true, "served": 7, "oldest_call_ms": 1500, "slot": 0,
                    "generation": 2},
                {"id": 2, "pid": null, "state": "hung", "inflight": 0, "capacity": 1,
                    "active": false, "served": 3, "oldest_call_ms": null, "slot": null,
                    "generation": null},
            ],
            "supervision": {"command": HOSTILE, "processes": 1, "generation": 2,
                "rolling_restart": false,
                "restarting": [{"slot": 1, "restart_in_ms": 800, "last_exit": HOSTILE}]},
        })
    }

    #[test]
    fn workers_rows_carry_their_state_and_names_are_escaped() {
        let html = body(&status());
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains(&format!(
            r#"<tr class="service" data-service="{ESCAPED}"><th scope="row">{ESCAPED}</th>"#
        )));
        assert!(html.contains(r#"<tr class="worker" data-state="ready" data-pid="4242">"#));
        assert!(html.contains(r#"<tr class="worker" data-state="hung" data-pid="-">"#));
        assert!(html.contains(r#"<td class="num">1.50 s</td>"#), "{html}");
        assert!(html.contains("<td>0 · 2</td>"));
        assert!(html.contains("pid unknown (no new calls)"));
        assert!(html.contains(r#"<dd id="ready">1 of 2</dd>"#));
        assert!(html.contains(r#"<dd id="queue">3</dd>"#));
        assert!(html.contains("calls 10 · errors 1 · queued 3</td>"));
        assert!(html.contains(&format!("of `{ESCAPED}`, generation 2; slot 1 restarts")));
        assert!(html.contains(r#"data-badge="registered""#));
        assert!(html.contains(r#"<p id="empty" class="empty" hidden>"#));
    }

    #[test]
    fn no_worker_says_so() {
        let html = body(&json!({"service": "echo", "state": "unregistered",
            "registered": false, "workers": [], "supervision": null}));
        assert!(html.contains(r#"<p id="empty" class="empty">"#));
        assert!(html.contains(r#"data-badge="unregistered""#));
        assert!(html.contains("Workers dial in (no worker_command)."));
    }
}
