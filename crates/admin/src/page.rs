//! The building blocks of the status pages at `GET /` (CONTRACT section 9): one [`escape`]
//! for everything that came from the wire or ZooKeeper, the page skeleton ([`html_page`])
//! with its inline style and script, and the pieces both binaries draw with ([`badge`],
//! [`sparkline`], the number formats). Each binary's `page` module lays its page out from its
//! `/status` document with these, on the server for the first paint, and ships a script that
//! draws the same markup again every two seconds from the JSON routes, with the helpers of
//! [`SCRIPT`] (which mirror the ones here).
//!
//! # Safety of the page
//! - Server side, every string that is not a literal of this code goes through [`escape`]
//!   (text and quoted attribute values alike). The script never puts data into markup: it
//!   builds nodes and sets `textContent` and attributes.
//! - No data is ever inlined into the script: it fetches the JSON routes of its own origin.
//! - [`html_page`] answers with a `Content-Security-Policy` that lets only the page's own
//!   style and script run (a fresh nonce per answer), allows requests to its own origin only,
//!   and loads nothing else: markup slipped past the escaping could not run a script nor
//!   reach another host.

use std::fmt::Write as _;

use crate::http::Response;

/// Width and height of a [`sparkline`], in pixels.
pub const SPARK_SIZE: (f64, f64) = (96.0, 24.0);
/// Room left free at each edge of a [`sparkline`], so strokes are not cut.
const SPARK_PAD: f64 = 2.0;

/// `text` made safe for HTML text and for an attribute value in double or single quotes:
/// `&`, `<`, `>`, `"` and `'` become character references.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A state badge: `state` as text, and as `data-badge` for its colour.
pub fn badge(state: &str) -> String {
    let state = escape(state);
    format!(r#"<span class="badge" data-badge="{state}">{state}</span>"#)
}

/// A rate per second: `-` when unknown, 2 significant decimals for small values.
pub fn fmt_rate(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(0.0) => "0".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// A duration given in milliseconds: `-` when unknown, `0.37 ms`, `12 ms`, `1.50 s`.
pub fn fmt_ms(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(v) if v < 1.0 => format!("{v:.2} ms"),
        Some(v) if v < 10.0 => format!("{v:.1} ms"),
        Some(v) if v < 1000.0 => format!("{v:.0} ms"),
        Some(v) => format!("{:.2} s", v / 1000.0),
    }
}

/// A small line chart of `values` (oldest first; `None` leaves a gap) as inline SVG, drawn
/// in a frame of `slots` points with the newest at the right edge, scaled to its largest
/// value (a flat line at the bottom when all are 0). `class` is added to `spark` (a literal
/// of the caller's, not data).
pub fn sparkline(values: &[Option<f64>], slots: usize, class: &str) -> String {
    let (width, height) = SPARK_SIZE;
    let inner = height - 2.0 * SPARK_PAD;
    let max = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
    let max = if max > 0.0 { max } else { 1.0 };
    let step = (width - 2.0 * SPARK_PAD) / (slots.max(2) - 1) as f64;
    let first_x = width - SPARK_PAD - values.len().saturating_sub(1) as f64 * step;
    let mut svg = format!(
        r#"<svg class="spark {}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" aria-hidden="true"><line x1="0" y1="{base:.1}" x2="{width}" y2="{base:.1}"></line>"#,
        escape(class),
        base = height - SPARK_PAD,
    );
    let mut run: Vec<String> = Vec::new();
    let flush = |run: &mut Vec<String>, svg: &mut String| {
        if run.len() == 1 {
            // One point alone: a zero-length line, which round caps draw as a dot.
            run.push(run[0].clone());
        }
        if !run.is_empty() {
            let _ = write!(svg, r#"<polyline points="{}"></polyline>"#, run.join(" "));
        }
        run.clear();
    };
    for (i, value) in values.iter().enumerate() {
        match value {
            Some(v) => {
                let x = first_x + i as f64 * step;
                let y = height - SPARK_PAD - v / max * inner;
                run.push(format!("{x:.1},{y:.1}"));
            }
            None => flush(&mut run, &mut svg),
        }
    }
    flush(&mut run, &mut svg);
    svg.push_str("</svg>");
    svg
}

/// The whole page: `title` (escaped here), `body` (markup the caller escaped), and `script`
/// (a literal of the caller's, run after [`SCRIPT`]), with [`STYLE`], answered with a
/// `Content-Security-Policy` under a fresh nonce (see the module doc).
pub fn html_page(title: &str, body: &str, script: &str) -> Response {
    let nonce = format!("{:032x}", rand::random::<u128>());
    let html = format!(
        concat!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
            "<title>{title}</title><link rel=\"icon\" href=\"data:,\">",
            "<style nonce=\"{nonce}\">{style}</style></head>\n<body>\n{body}\n",
            "<script nonce=\"{nonce}\">{common}\n{script}</script>\n</body></html>\n"
        ),
        title = escape(title),
        nonce = nonce,
        style = STYLE,
        body = body,
        common = SCRIPT,
        script = script,
    );
    let policy = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    Response::new(200, "text/html; charset=utf-8", html)
        .with_header("Content-Security-Policy", &policy)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Referrer-Policy", "no-referrer")
}

/// The style of both pages.
pub const STYLE: &str = r#"
:root{--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--mute:#656d76;--line:#d0d7de;--ink:#1f2328;
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:#f6f8fa}
body{margin:0;padding:16px 24px 32px}
h1{font-size:20px;margin:0 0 10px;display:flex;gap:10px;align-items:center}
.facts{display:flex;flex-wrap:wrap;gap:6px 28px;margin:0}
.facts div{display:flex;gap:6px;align-items:baseline}
.facts dt{color:var(--mute)}.facts dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
.updated{color:var(--mute);font-size:12px;margin:10px 0 14px}
.updated[data-error]{color:var(--bad);font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid var(--line)}
caption{caption-side:bottom;text-align:left;color:var(--mute);font-size:12px;padding:6px 2px}
th,td{padding:5px 10px;text-align:left;border-top:1px solid #eaeef2;vertical-align:middle;white-space:nowrap}
thead th{background:#eaeef2;font-size:12px;font-weight:600;color:#424a53;border-top:0}
tr.service>*{border-top:2px solid #afb8c1}
tr.service th{font-size:15px;white-space:normal;overflow-wrap:anywhere;min-width:8em;max-width:17em}
tr.endpoint td.mono{white-space:normal;overflow-wrap:anywhere;max-width:21em}
td.summary{white-space:normal;min-width:7em}
tr.endpoint td:first-child,tr.worker td:first-child{padding-left:26px}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
.num{text-align:right;font-variant-numeric:tabular-nums}
.metric{white-space:nowrap}
.metric .value{display:inline-block;min-width:4.2em;margin-right:6px;text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
.mute,.detail{color:var(--mute)}
svg.spark{vertical-align:middle;background:#f6f8fa;border-radius:3px}
svg.spark line{stroke:var(--line);stroke-width:1}
svg.spark polyline{fill:none;stroke:#0969da;stroke-width:1.5;stroke-linecap:round;stroke-linejoin:round}
svg.spark.errors polyline{stroke:var(--bad)}
svg.spark.p99 polyline{stroke:#8250df}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;background:#eaeef2;color:#424a53}
[data-badge=connected],[data-badge=serving],[data-badge=ready],[data-badge=registered]{background:#dafbe1;color:var(--ok)}
[data-badge=backoff],[data-badge=draining],[data-badge=booting],[data-badge=starting],[data-badge=stopping],[data-badge=disconnected],[data-badge=connecting],[data-badge=maintenance]{background:#fff8c5;color:var(--warn)}
[data-badge=ejected],[data-badge=hung],[data-badge=expired],[data-badge=unregistered]{background:#ffebe9;color:var(--bad)}
.empty{padding:14px;color:var(--mute);background:#fff;border:1px solid var(--line);border-top:0}
"#;

/// The helpers of both pages' scripts, mirroring the ones of this module: `h` (an element
/// with attributes and children; strings become text nodes), `badge`, `spark`, `fmtRate`,
/// `fmtMs`, and `poll(urls, render)`, which fetches `urls` (same origin) every 2 s and calls
/// `render` with their JSON documents.
pub const SCRIPT: &str = r#""use strict";
const SVG_NS = "http://www.w3.org/2000/svg";
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) el.setAttribute(name, String(value));
  }
  for (const kid of kids) {
    if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}
function badge(state) {
  return h("span", {class: "badge", "data-badge": state}, state);
}
function fmtRate(v) {
  if (v === null || v === undefined) return "-";
  if (v === 0) return "0";
  return v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0);
}
function fmtMs(v) {
  if (v === null || v === undefined) return "-";
  if (v < 1) return v.toFixed(2) + " ms";
  if (v < 10) return v.toFixed(1) + " ms";
  if (v < 1000) return v.toFixed(0) + " ms";
  return (v / 1000).toFixed(2) + " s";
}
function spark(values, slots, cls) {
  const W = 96, H = 24, P = 2;
  const svg = document.createElementNS(SVG_NS, "svg");
  const set = (el, attrs) => { for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v)); return el; };
  set(svg, {class: "spark " + cls, width: W, height: H, viewBox: "0 0 " + W + " " + H, "aria-hidden": "true"});
  svg.append(set(document.createElementNS(SVG_NS, "line"), {x1: 0, y1: (H - P).toFixed(1), x2: W, y2: (H - P).toFixed(1)}));
  let max = 0;
  for (const v of values) if (v !== null && v > max) max = v;
  if (!(max > 0)) max = 1;
  const step = (W - 2 * P) / (Math.max(slots, 2) - 1);
  const firstX = W - P - Math.max(values.length - 1, 0) * step;
  let run = [];
  const flush = () => {
    if (run.length === 1) run.push(run[0]);
    if (run.length) svg.append(set(document.createElementNS(SVG_NS, "polyline"), {points: run.join(" ")}));
    run = [];
  };
  values.forEach((v, i) => {
    if (v === null) { flush(); return; }
    run.push((firstX + i * step).toFixed(1) + "," + (H - P - v / max * (H - 2 * P)).toFixed(1));
  });
  flush();
  return svg;
}
function poll(urls, render) {
  const note = document.getElementById("updated");
  const tick = async () => {
    try {
      const docs = await Promise.all(urls.map(async (url) => {
        const answer = await fetch(url, {cache: "no-store", credentials: "omit"});
        if (!answer.ok) throw new Error(url + ": HTTP " + answer.status);
        return answer.json();
      }));
      render(...docs);
      document.getElementById("page").setAttribute("data-rendered", "script");
      note.textContent = "Updated " + new Date().toLocaleTimeString() + ", every 2 s.";
      note.removeAttribute("data-error");
    } catch (err) {
      note.textContent = "Update failed (" + err.message + "); trying again every 2 s.";
      note.setAttribute("data-error", "");
    }
    setTimeout(tick, 2000);
  };
  tick();
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = r#"<script>alert(1)</script>"'&"#;

    #[test]
    fn escape_covers_text_and_both_attribute_quotes() {
        assert_eq!(
            escape(HOSTILE),
            "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"
        );
        assert_eq!(escape("echo.v2 ü"), "echo.v2 ü");
        let badge = badge(HOSTILE);
        assert!(!badge.contains("<script"), "{badge}");
        assert!(badge.contains(r#"data-badge="&lt;script&gt;"#), "{badge}");
    }

    #[test]
    fn numbers_are_formatted_like_the_script_does() {
        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_rate(Some(0.0)), "0");
        assert_eq!(fmt_rate(Some(1.234)), "1.23");
        assert_eq!(fmt_rate(Some(12.34)), "12.3");
        assert_eq!(fmt_rate(Some(1234.4)), "1234");
        assert_eq!(fmt_ms(Some(0.374)), "0.37 ms");
        assert_eq!(fmt_ms(Some(2.26)), "2.3 ms");
        assert_eq!(fmt_ms(Some(123.4)), "123 ms");
        assert_eq!(fmt_ms(Some(1500.0)), "1.50 s");
    }

    #[test]
    fn sparkline_draws_runs_right_aligned_with_gaps() {
        let svg = sparkline(&[Some(0.0), Some(2.0), None, Some(1.0)], 5, "p99");
        assert!(svg.starts_with(r#"<svg class="spark p99" width="96" height="24""#));
        // Step 23 over 5 slots; four values end at the right edge (x = 94).
        assert!(
            svg.contains(r#"<polyline points="25.0,22.0 48.0,2.0"></polyline>"#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"<polyline points="94.0,12.0 94.0,12.0"></polyline>"#),
            "a lone point is a dot: {svg}"
        );
        let flat = sparkline(&[Some(0.0), Some(0.0)], 2, "");
        assert!(flat.contains(r#"points="2.0,22.0 94.0,22.0""#), "{flat}");
        assert!(!sparkline(&[], 60, "").contains("polyline"));
    }

    #[test]
    fn page_runs_only_its_own_script_and_style() {
        let r = html_page(HOSTILE, "<main id=\"page\"></main>", "poll([], () => {});");
        assert_eq!(r.content_type, "text/html; charset=utf-8");
        let body = String::from_utf8(r.body).unwrap();
        assert!(body.starts_with("<!doctype html>"));
        assert!(body.contains("<title>&lt;script&gt;alert(1)"), "{body}");
        let policy = &r
            .headers
            .iter()
            .find(|(name, _)| name == "Content-Security-Policy")
            .unwrap()
            .1;
        let nonce = policy
            .split("'nonce-")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .unwrap();
        assert_eq!(nonce.len(), 32);
        assert!(policy.starts_with("default-src 'none'"), "{policy}");
        assert!(policy.contains("connect-src 'self'"), "{policy}");
        assert_eq!(body.matches("<script").count(), 1);
        assert!(body.contains(&format!("<script nonce=\"{nonce}\">")));
        assert!(body.contains(&format!("<style nonce=\"{nonce}\">")));
        // Nothing is loaded from anywhere (the SVG namespace is a name, not a request).
        let loaded = body.replace("\"http://www.w3.org/2000/svg\"", "");
        for outside in ["http://", "https://", " src=", "@import", "url("] {
            assert!(!loaded.contains(outside), "{outside} in the page");
        }
        let again = html_page("t", "", "");
        assert!(
            !again.headers[0].1.contains(nonce),
            "a fresh nonce per answer"
        );
    }
}
