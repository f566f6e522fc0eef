//! Results: every measured point keeps one sample per round (a map of metric to value);
//! the report gives each metric as its median with the min-max over rounds, as Markdown
//! tables and as JSON. Ratios are computed per round against the baseline of the same round,
//! then summarised, so they survive a noisy machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// One round's metrics of one point.
pub type Sample = BTreeMap<String, f64>;

/// Median and range of a metric over rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many rounds had the metric.
    pub n: usize,
}

/// One thing measured: a scenario, a case within it (load shape), a target (system).
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Scenario id (`1`, `1-pinned`, `2`, ...).
    pub scenario: String,
    /// The load shape, e.g. `64 in flight`.
    pub case: String,
    /// The system measured, e.g. `rpc_proxy`.
    pub target: String,
    /// One sample per round.
    pub samples: Vec<Sample>,
    /// Per metric: median and range (filled by [`Results::finish`]).
    pub summary: BTreeMap<String, Summary>,
    /// Problems seen (errors, failed rounds).
    pub notes: Vec<String>,
}

/// A target of the issue, checked against the medians.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Scenario id.
    pub scenario: String,
    /// The goal as stated.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Whether it was met (`None`: not measured).
    pub met: Option<bool>,
}

/// Everything a run produced.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// Run parameters and environment.
    pub meta: BTreeMap<String, serde_json::Value>,
    /// Every point, in the order first measured.
    pub points: Vec<Point>,
    /// Targets not run, with the reason.
    pub skipped: Vec<String>,
    /// Target checks.
    pub checks: Vec<Check>,
}

// === impl Results ===

impl Results {
    fn point_mut(&mut self, scenario: &str, case: &str, target: &str) -> &mut Point {
        let found = self
            .points
            .iter()
            .position(|p| p.scenario == scenario && p.case == case && p.target == target);
        let index = match found {
            Some(i) => i,
            None => {
                self.points.push(Point {
                    scenario: scenario.to_owned(),
                    case: case.to_owned(),
                    target: target.to_owned(),
                    samples: Vec::new(),
                    summary: BTreeMap::new(),
                    notes: Vec::new(),
                });
                self.points.len() - 1
            }
        };
        &mut self.points[index]
    }

    /// Adds one round's sample of a point.
    pub fn add(&mut self, scenario: &str, case: &str, target: &str, sample: Sample) {
        self.point_mut(scenario, case, target).samples.push(sample);
    }

    /// Adds (or overwrites) metrics of the latest sample of a point.
    pub fn extend_last(&mut self, scenario: &str, case: &str, target: &str, extra: &Sample) {
        if let Some(last) = self.point_mut(scenario, case, target).samples.last_mut() {
            last.extend(extra.iter().map(|(k, v)| (k.clone(), *v)));
        }
    }

    /// The latest value of a metric of a point.
    pub fn last(&self, scenario: &str, case: &str, target: &str, metric: &str) -> Option<f64> {
        self.find(scenario, case, target)?
            .samples
            .last()?
            .get(metric)
            .copied()
    }

    /// Notes a problem with a point (the point exists from then on, maybe without samples).
    pub fn note(&mut self, scenario: &str, case: &str, target: &str, note: String) {
        eprintln!("rpc-bench: scenario {scenario} {case} {target}: {note}");
        let point = self.point_mut(scenario, case, target);
        if !point.notes.contains(&note) {
            point.notes.push(note);
        }
    }

    /// Records a target that was not run.
    pub fn skip(&mut self, what: String) {
        eprintln!("rpc-bench: skipped: {what}");
        if !self.skipped.contains(&what) {
            self.skipped.push(what);
        }
    }

    /// A point, if measured.
    pub fn find(&self, scenario: &str, case: &str, target: &str) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.scenario == scenario && p.case == case && p.target == target)
    }

    /// The summary of one metric of a point.
    pub fn summary(
        &self,
        scenario: &str,
        case: &str,
        target: &str,
        metric: &str,
    ) -> Option<Summary> {
        summarise(self.find(scenario, case, target)?, metric)
    }

    /// Fills every point's summary.
    pub fn finish(&mut self) {
        for point in &mut self.points {
            let metrics: std::collections::BTreeSet<String> = point
                .samples
                .iter()
                .flat_map(|s| s.keys().cloned())
                .collect();
            point.summary = metrics
                .into_iter()
                .filter_map(|m| summarise(point, &m).map(|s| (m, s)))
                .collect();
        }
    }
}

fn summarise(point: &Point, metric: &str) -> Option<Summary> {
    let mut values: Vec<f64> = point
        .samples
        .iter()
        .filter_map(|s| s.get(metric).copied())
        .filter(|v| v.is_finite())
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: values[0],
        max: values[n - 1],
        n,
    })
}

// === Markdown ===

/// How a metric is printed.
#[derive(Debug, Clone, Copy)]
pub enum Fmt {
    /// 52.1k
    Count,
    /// 0.52x
    Ratio,
    /// One decimal.
    Dec1,
    /// Two decimals.
    Dec2,
    /// Whole number.
    Int,
}

fn number(fmt: Fmt, v: f64) -> String {
    match fmt {
        Fmt::Count if v.abs() >= 1e6 => format!("{:.2}M", v / 1e6),
        Fmt::Count if v.abs() >= 1e4 => format!("{:.1}k", v / 1e3),
        Fmt::Count if v.abs() >= 1e3 => format!("{:.2}k", v / 1e3),
        Fmt::Count => format!("{v:.0}"),
        Fmt::Ratio => format!("{v:.2}x"),
        Fmt::Dec1 => format!("{v:.1}"),
        Fmt::Dec2 => format!("{v:.2}"),
        Fmt::Int => format!("{v:.0}"),
    }
}

/// `median (min-max)`, or the one value of a single round.
pub fn cell(summary: Option<Summary>, fmt: Fmt) -> String {
    match summary {
        None => "-".to_owned(),
        Some(s) if s.n == 1 || s.min == s.max => number(fmt, s.median),
        Some(s) => format!(
            "{} ({}-{})",
            number(fmt, s.median),
            number(fmt, s.min),
            number(fmt, s.max)
        ),
    }
}

/// A column of a scenario table.
pub struct Col {
    /// Header text.
    pub header: &'static str,
    /// The metric shown.
    pub metric: &'static str,
    /// How it is printed.
    pub fmt: Fmt,
}

/// Shorthand for a [`Col`].
pub const fn col(header: &'static str, metric: &'static str, fmt: Fmt) -> Col {
    Col {
        header,
        metric,
        fmt,
    }
}

/// A Markdown table of every point of `scenario`: case, target, then `cols`.
pub fn table(results: &Results, scenario: &str, cols: &[Col]) -> String {
    table_headed(results, scenario, ["case", "target"], cols)
}

/// [`table`] with other headers for the case and target columns.
pub fn table_headed(
    results: &Results,
    scenario: &str,
    [case, target]: [&str; 2],
    cols: &[Col],
) -> String {
    let mut out = format!("| {case} | {target} |");
    for c in cols {
        let _ = write!(out, " {} |", c.header);
    }
    out.push_str("\n|---|---|");
    for _ in cols {
        out.push_str("---:|");
    }
    out.push('\n');
    for point in results.points.iter().filter(|p| p.scenario == scenario) {
        let _ = write!(out, "| {} | {} |", point.case, point.target);
        for c in cols {
            let _ = write!(out, " {} |", cell(summarise(point, c.metric), c.fmt));
        }
        out.push('\n');
    }
    let notes: Vec<String> = results
        .points
        .iter()
        .filter(|p| p.scenario == scenario)
        .flat_map(|p| {
            p.notes
                .iter()
                .map(move |n| format!("- {} / {}: {n}", p.case, p.target))
        })
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    out
}

/// The table of target checks.
pub fn checks_table(results: &Results) -> String {
    let mut out =
        String::from("| scenario | target | measured (median) | met |\n|---|---|---|---|\n");
    for c in &results.checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None if c.goal.starts_with("reference") => "(reference)",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {met} |",
            c.scenario, c.goal, c.measured
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let mut r = Results::default();
        for v in [3.0, 1.0, 2.0, 10.0] {
            r.add("1", "c", "t", Sample::from([("x".to_owned(), v)]));
        }
        let s = r.summary("1", "c", "t", "x").unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        assert_eq!(cell(Some(s), Fmt::Dec1), "2.5 (1.0-10.0)");
        assert_eq!(number(Fmt::Count, 52_140.0), "52.1k");
        assert_eq!(cell(None, Fmt::Ratio), "-");
    }
}
