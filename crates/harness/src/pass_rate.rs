//! Pass rates of repeated scenarios (`cargo xtask e2e --repeat N`): each scenario's share of
//! passing runs with a 95 % Wilson score interval, and the gate `--min-pass-rate` applies.
//!
//! A single run says little about a scenario that fails one time in fifty; N runs give a rate
//! and an interval a reader can weigh (3 passes in 3 runs: 100 %, interval 44 %..100 %).
//! Skipped runs count for nothing: a scenario skipped on this backend has no rate.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::result::{ScenarioResult, Status};

/// z for a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// A closed interval of rates in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Interval {
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// The Wilson score interval (95 %) of `passed` successes in `runs` trials; `[0, 1]` for none.
pub fn wilson(passed: u32, runs: u32) -> Interval {
    if runs == 0 {
        return Interval {
            low: 0.0,
            high: 1.0,
        };
    }
    let n = f64::from(runs);
    let p = f64::from(passed.min(runs)) / n;
    let z2 = Z95 * Z95;
    let centre = p + z2 / (2.0 * n);
    let spread = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let denominator = 1.0 + z2 / n;
    Interval {
        low: ((centre - spread) / denominator).clamp(0.0, 1.0),
        high: ((centre + spread) / denominator).clamp(0.0, 1.0),
    }
}

/// How a repeated scenario behaved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every run passed.
    Stable,
    /// Some runs passed, some failed.
    Flaky,
    /// Every run failed.
    Broken,
    /// Every run was skipped.
    Skipped,
}

/// One scenario's runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PassRate {
    /// Scenario name.
    pub scenario: String,
    /// Runs that were not skipped.
    pub runs: u32,
    /// Runs that passed.
    pub passed: u32,
    /// Runs that were skipped (not in `runs`).
    pub skipped: u32,
    /// `passed / runs` (0 when nothing ran).
    pub rate: f64,
    /// 95 % Wilson interval of `rate`.
    pub interval: Interval,
    /// Stable, flaky, broken or skipped.
    pub verdict: Verdict,
}

impl PassRate {
    /// Whether the gate `min` (a rate in `[0, 1]`) holds: the observed rate reaches it. Skipped
    /// scenarios hold any gate (their reason is reported elsewhere).
    pub fn meets(&self, min: f64) -> bool {
        self.verdict == Verdict::Skipped || self.rate + 1e-9 >= min
    }
}

/// Pass rates by scenario, sorted by name.
pub fn pass_rates(scenarios: &[ScenarioResult]) -> Vec<PassRate> {
    let mut counts: BTreeMap<&str, (u32, u32, u32)> = BTreeMap::new();
    for result in scenarios {
        let entry = counts.entry(result.name.as_str()).or_default();
        match result.status {
            Status::Passed => {
                entry.0 += 1;
                entry.1 += 1;
            }
            Status::Failed => entry.0 += 1,
            Status::Skipped => entry.2 += 1,
        }
    }
    counts
        .into_iter()
        .map(|(name, (runs, passed, skipped))| PassRate {
            scenario: name.to_owned(),
            runs,
            passed,
            skipped,
            rate: if runs == 0 {
                0.0
            } else {
                f64::from(passed) / f64::from(runs)
            },
            interval: wilson(passed, runs),
            verdict: match (runs, passed) {
                (0, _) => Verdict::Skipped,
                (r, p) if p == r => Verdict::Stable,
                (_, 0) => Verdict::Broken,
                _ => Verdict::Flaky,
            },
        })
        .collect()
}

/// A rate as a percentage with no decimals (`67 %`).
pub fn percent(rate: f64) -> String {
    format!("{:.0} %", rate * 100.0)
}

/// The terminal table: one line per scenario that ran more than once, or was flaky or below
/// `min`; empty when every scenario ran once and the gate (if any) holds.
pub fn table(rates: &[PassRate], min: Option<f64>) -> String {
    let shown: Vec<&PassRate> = rates
        .iter()
        .filter(|r| r.runs + r.skipped > 1 || min.is_some_and(|m| !r.meets(m)))
        .collect();
    if shown.is_empty() {
        return String::new();
    }
    let width = shown
        .iter()
        .map(|r| r.scenario.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut out = format!(
        "{:<width$}  {:>6}  {:>6}  {:>15}  verdict\n",
        "scenario", "passed", "rate", "95 % interval"
    );
    for rate in shown {
        let gate = match min {
            Some(m) if !rate.meets(m) => format!(" (below --min-pass-rate {})", percent(m)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>6}  {:>15}  {:?}{gate}",
            rate.scenario,
            format!("{}/{}", rate.passed, rate.runs),
            percent(rate.rate),
            format!(
                "{}..{}",
                percent(rate.interval.low),
                percent(rate.interval.high)
            ),
            rate.verdict
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn run(name: &str, attempt: u32, status: Status) -> ScenarioResult {
        ScenarioResult {
            name: name.into(),
            attempt,
            labels: vec![],
            status,
            duration: Duration::from_secs(1),
            failure: None,
            steps: vec![],
            cleanup_error: None,
            evidence: None,
            series: vec![],
            loads: vec![],
            kept: None,
            skipped: None,
        }
    }

    /// Values from the Wilson formula worked by hand (and R's `binom.confint(method="wilson")`).
    #[test]
    fn wilson_matches_known_values() {
        let close = |a: f64, b: f64| (a - b).abs() < 5e-4;
        let all = wilson(3, 3);
        assert!(close(all.low, 0.4385) && close(all.high, 1.0), "{all:?}");
        let half = wilson(5, 10);
        assert!(
            close(half.low, 0.2366) && close(half.high, 0.7634),
            "{half:?}"
        );
        let none = wilson(0, 20);
        assert!(close(none.low, 0.0) && close(none.high, 0.1611), "{none:?}");
        let many = wilson(49, 50);
        assert!(
            close(many.low, 0.8950) && close(many.high, 0.9965),
            "{many:?}"
        );
        assert_eq!(
            wilson(0, 0),
            Interval {
                low: 0.0,
                high: 1.0
            }
        );
    }

    /// Rates group attempts by scenario; skipped runs are left out of the rate.
    #[test]
    fn rates_group_attempts_and_leave_out_skips() {
        let rates = pass_rates(&[
            run("a", 0, Status::Passed),
            run("b", 0, Status::Failed),
            run("a", 1, Status::Failed),
            run("a", 2, Status::Passed),
            run("b", 1, Status::Failed),
            run("c", 0, Status::Skipped),
            run("d", 0, Status::Passed),
            run("d", 1, Status::Skipped),
        ]);
        let summary: Vec<(&str, u32, u32, Verdict)> = rates
            .iter()
            .map(|r| (r.scenario.as_str(), r.passed, r.runs, r.verdict))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", 2, 3, Verdict::Flaky),
                ("b", 0, 2, Verdict::Broken),
                ("c", 0, 0, Verdict::Skipped),
                ("d", 1, 1, Verdict::Stable),
            ]
        );
        assert!(rates[0].meets(0.66) && !rates[0].meets(0.67));
        assert!(!rates[1].meets(0.01));
        assert!(rates[2].meets(1.0), "a skipped scenario holds any gate");
        let text = table(&rates, Some(0.9));
        assert!(text.contains("2/3") && text.contains("67 %"), "{text}");
        assert!(text.contains("below --min-pass-rate 90 %"), "{text}");
        assert!(
            table(&pass_rates(&[run("e", 0, Status::Passed)]), None).is_empty(),
            "one run, no table"
        );
    }
}
