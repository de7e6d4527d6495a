//! Reports: JUnit XML (CI), JSON (tools) and a self-contained HTML page with inline SVG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::pass_rate::{PassRate, pass_rates, percent};
use crate::result::{ScenarioResult, Status, SuiteResult};

mod svg;

/// Writes `junit.xml`, `report.json` and `report.html` into `dir`; returns their paths.
pub fn write_all(suite: &SuiteResult, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let files = [
        (dir.join("junit.xml"), junit(suite)),
        (dir.join("report.json"), json(suite)),
        (dir.join("report.html"), html(suite)),
    ];
    let mut paths = Vec::new();
    for (path, text) in files {
        std::fs::write(&path, text)?;
        paths.push(path);
    }
    Ok(paths)
}

/// The suite with each scenario's pass rate (`pass_rates`, by name).
pub fn json(suite: &SuiteResult) -> String {
    #[derive(serde::Serialize)]
    struct Report<'a> {
        #[serde(flatten)]
        suite: &'a SuiteResult,
        pass_rates: Vec<PassRate>,
    }
    serde_json::to_string_pretty(&Report {
        suite,
        pass_rates: pass_rates(&suite.scenarios),
    })
    .unwrap_or_default()
}

/// Escapes text for XML and HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // XML 1.0 forbids most control characters.
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' && c != '\r' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

fn scenario_text(result: &ScenarioResult) -> String {
    let mut out = String::new();
    if let Some(failure) = &result.failure {
        out.push_str(&failure.render());
        out.push('\n');
    }
    if let Some(cleanup) = &result.cleanup_error {
        let _ = writeln!(out, "cleanup: {cleanup}");
    }
    if let Some(evidence) = &result.evidence {
        if let Some(connections) = &evidence.connections {
            let _ = writeln!(out, "\n--- gateway connections ---\n{connections}");
        }
        if let Some(events) = &evidence.events {
            let _ = writeln!(out, "\n--- events ---\n{events}");
        }
        for (name, dump) in &evidence.objects {
            let _ = writeln!(out, "\n--- object {name} ---\n{dump}");
        }
        for (name, log) in &evidence.logs {
            let _ = writeln!(out, "\n--- log {name} (tail) ---\n{log}");
        }
    }
    out
}

/// JUnit XML: one testsuite, one testcase per scenario (steps in system-out). Repeated runs
/// (`--repeat`) are one testcase, as Maven Surefire writes reruns: a scenario that failed in some
/// runs and passed in others passes with a `flakyFailure` per failed run; one that failed in
/// every run has a `failure` and a `rerunFailure` per further run.
pub fn junit(suite: &SuiteResult) -> String {
    let mut cases: Vec<(&str, Vec<&ScenarioResult>)> = Vec::new();
    for result in &suite.scenarios {
        match cases.iter_mut().find(|(name, _)| *name == result.name) {
            Some((_, runs)) => runs.push(result),
            None => cases.push((&result.name, vec![result])),
        }
    }
    for (_, runs) in &mut cases {
        runs.sort_by_key(|r| r.attempt);
    }
    let broken = cases
        .iter()
        .filter(|(_, runs)| {
            runs.iter().any(|r| r.status == Status::Failed)
                && runs.iter().all(|r| r.status != Status::Passed)
        })
        .count();
    let skipped = cases
        .iter()
        .filter(|(_, runs)| runs.iter().all(|r| r.status == Status::Skipped))
        .count();
    let time: f64 = suite.duration.as_secs_f64();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"buildplane-e2e\" tests=\"{}\" failures=\"{broken}\" skipped=\"{skipped}\" time=\"{time:.3}\">",
        cases.len(),
    );
    let _ = writeln!(
        out,
        "  <testsuite name=\"e2e-{}-{}\" tests=\"{}\" failures=\"{broken}\" skipped=\"{skipped}\" time=\"{time:.3}\" timestamp=\"{}\">",
        escape(&suite.backend),
        escape(&suite.profile),
        cases.len(),
        escape(&suite.started)
    );
    for (name, runs) in &cases {
        junit_case(&mut out, name, runs);
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

/// One scenario's testcase over its runs.
fn junit_case(out: &mut String, name: &str, runs: &[&ScenarioResult]) {
    let time: f64 = runs.iter().map(|r| r.duration.as_secs_f64()).sum();
    let _ = write!(
        out,
        "    <testcase classname=\"scenarios\" name=\"{}\" time=\"{time:.3}\">",
        escape(name),
    );
    let failed: Vec<&ScenarioResult> = runs
        .iter()
        .copied()
        .filter(|r| r.status == Status::Failed)
        .collect();
    let any_passed = runs.iter().any(|r| r.status == Status::Passed);
    let message = |r: &ScenarioResult| {
        let first = r.failure.as_ref().map(|f| f.message.as_str()).unwrap_or("");
        if runs.len() > 1 {
            format!("run {}: {first}", r.attempt + 1)
        } else {
            first.to_owned()
        }
    };
    for (index, result) in failed.iter().enumerate() {
        let element = match (any_passed, index) {
            (true, _) => "flakyFailure",
            (false, 0) => "failure",
            (false, _) => "rerunFailure",
        };
        if element == "failure" {
            let _ = write!(
                out,
                "\n      <failure message=\"{}\" type=\"ScenarioFailure\">{}</failure>",
                escape(&message(result)),
                escape(&scenario_text(result))
            );
        } else {
            let _ = write!(
                out,
                "\n      <{element} message=\"{}\" type=\"ScenarioFailure\"><stackTrace>{}</stackTrace></{element}>",
                escape(&message(result)),
                escape(&scenario_text(result))
            );
        }
    }
    if runs.iter().all(|r| r.status == Status::Skipped) {
        let _ = write!(
            out,
            "\n      <skipped message=\"{}\"/>",
            escape(runs[0].skipped.as_deref().unwrap_or_default())
        );
    }
    let mut steps = String::new();
    for result in runs {
        if runs.len() > 1 {
            let _ = writeln!(steps, "run {} [{:?}]", result.attempt + 1, result.status);
        }
        for step in &result.steps {
            let _ = writeln!(
                steps,
                "step {} [{:?}] {:.2}s",
                step.name,
                step.status,
                step.duration.as_secs_f64()
            );
            for op in &step.operations {
                let _ = writeln!(
                    steps,
                    "  {} {} {} [{:?}] {:.2}s",
                    op.phase,
                    op.kind,
                    op.summary,
                    op.status,
                    op.duration.as_secs_f64()
                );
            }
        }
    }
    let _ = write!(
        out,
        "\n      <system-out>{}</system-out>\n    </testcase>\n",
        escape(&steps)
    );
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}\
.passed{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}.skipped{color:#888}\
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px;max-height:400px}\
details{margin:6px 0}summary{cursor:pointer}h2{margin-top:2em}svg{background:#fff;border:1px solid #ddd;margin:6px 0}";

fn status_class(status: Status) -> &'static str {
    match status {
        Status::Passed => "passed",
        Status::Failed => "failed",
        Status::Skipped => "skipped",
    }
}

/// A self-contained HTML page (no external scripts or styles).
pub fn html(suite: &SuiteResult) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>buildplane e2e</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        out,
        "<h1>buildplane e2e</h1><p>backend <b>{}</b>, profile <b>{}</b>, started {}, wall time {:.1}s: \
         <span class=\"passed\">{} passed</span>, <span class=\"failed\">{} failed</span></p>",
        escape(&suite.backend),
        escape(&suite.profile),
        escape(&suite.started),
        suite.duration.as_secs_f64(),
        suite.passed(),
        suite.failed()
    );
    let rates = pass_rates(&suite.scenarios);
    if rates.iter().any(|r| r.runs + r.skipped > 1) {
        html_pass_rates(&mut out, &rates);
    }
    out.push_str(
        "<table><tr><th>scenario</th><th>result</th><th>duration</th><th>first failure</th></tr>",
    );
    let mut sorted: Vec<_> = suite.scenarios.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then(a.attempt.cmp(&b.attempt)));
    for result in &sorted {
        let _ = write!(
            out,
            "<tr><td><a href=\"#{0}-{1}\">{0}</a></td><td class=\"{2}\">{2}</td><td>{3:.2}s</td><td>{4}</td></tr>",
            escape(&result.name),
            result.attempt,
            status_class(result.status),
            result.duration.as_secs_f64(),
            escape(
                result
                    .failure
                    .as_ref()
                    .map(|f| f.message.as_str())
                    .unwrap_or("")
            )
        );
    }
    out.push_str("</table>");
    for result in &sorted {
        let _ = write!(
            out,
            "<h2 id=\"{0}-{1}\">{0} <span class=\"{2}\">{2}</span></h2><p>labels: {3}; {4:.2}s</p>",
            escape(&result.name),
            result.attempt,
            status_class(result.status),
            escape(&result.labels.join(", ")),
            result.duration.as_secs_f64()
        );
        if result.status == Status::Failed {
            let _ = write!(out, "<pre>{}</pre>", escape(&scenario_text(result)));
        }
        if let Some(kept) = &result.kept {
            let _ = write!(out, "<p>files kept in <code>{}</code></p>", escape(kept));
        }
        for series in &result.series {
            out.push_str(&svg::line_chart(
                &format!("{} over time", series.name),
                "s",
                &series.name,
                &series.points,
            ));
        }
        for load in &result.loads {
            let _ = write!(
                out,
                "<p>load <b>{}</b>: {} requests, {} failed, p50 {:.1}ms, p90 {:.1}ms, p99 {:.1}ms (latency from each request's scheduled start; generator: {})</p>",
                escape(&load.name),
                load.total,
                load.failed,
                load.p50_ms,
                load.p90_ms,
                load.p99_ms,
                load.generator.as_str()
            );
            let marks = fault_marks(result);
            if !marks.is_empty() {
                out.push_str(&svg::timeline(
                    &format!("{}: every request against the faults", load.name),
                    &load.samples,
                    &marks,
                ));
            }
            let latencies: Vec<f64> = load.samples.iter().map(|s| s.latency_ms).collect();
            out.push_str(&svg::histogram(
                &format!("{} latency distribution", load.name),
                "ms",
                &latencies,
            ));
            out.push_str(&svg::line_chart(
                &format!("{} error rate over time", load.name),
                "s",
                "error rate",
                &svg::error_rate(&load.samples),
            ));
        }
        out.push_str("<details><summary>steps</summary><table><tr><th>step</th><th>phase</th><th>operation</th><th>result</th><th>time</th></tr>");
        for step in &result.steps {
            for op in &step.operations {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{} {}</td><td class=\"{4}\">{4}</td><td>{5:.2}s</td></tr>",
                    escape(&step.name),
                    op.phase,
                    escape(&op.kind),
                    escape(&op.summary),
                    status_class(op.status),
                    op.duration.as_secs_f64()
                );
            }
        }
        out.push_str("</table></details>");
    }
    out.push_str("</body></html>\n");
    out
}

/// The operations of a scenario that break or mend something (kills, stops, starts, link
/// faults and heals, partitions, CA changes, deletes), as marks on the time axis.
fn fault_marks(result: &ScenarioResult) -> Vec<svg::Mark> {
    result
        .steps
        .iter()
        .flat_map(|step| &step.operations)
        .filter(|op| op.status != Status::Skipped)
        .filter_map(|op| {
            let breaks = match op.kind.as_str() {
                "kill" | "stop" | "fault" | "partition" | "delete" | "rotateCa" | "restart" => true,
                "start" | "heal" => false,
                _ => return None,
            };
            Some(svg::Mark {
                at: op.at,
                label: format!("{} {}", op.kind, op.summary),
                breaks,
            })
        })
        .collect()
}

/// Pass rates with their 95 % intervals drawn as bars on a 0–100 % scale.
fn html_pass_rates(out: &mut String, rates: &[PassRate]) {
    out.push_str(
        "<h2>pass rates</h2><table><tr><th>scenario</th><th>passed</th><th>rate</th>\
         <th>95 % interval (Wilson)</th><th></th><th>verdict</th></tr>",
    );
    for rate in rates {
        let (low, high) = (rate.interval.low * 200.0, rate.interval.high * 200.0);
        let colour = match rate.verdict {
            crate::pass_rate::Verdict::Stable => "#1a7f37",
            crate::pass_rate::Verdict::Flaky => "#bf8700",
            crate::pass_rate::Verdict::Broken => "#cf222e",
            crate::pass_rate::Verdict::Skipped => "#888",
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}/{}</td><td>{}</td><td>{}..{}</td>\
             <td><svg width=\"204\" height=\"14\"><line x1=\"2\" y1=\"7\" x2=\"202\" y2=\"7\" stroke=\"#ddd\"/>\
             <rect x=\"{:.1}\" y=\"3\" width=\"{:.1}\" height=\"8\" fill=\"{colour}\" opacity=\"0.5\"/>\
             <circle cx=\"{:.1}\" cy=\"7\" r=\"3\" fill=\"{colour}\"/></svg></td><td>{:?}</td></tr>",
            escape(&rate.scenario),
            rate.passed,
            rate.runs,
            percent(rate.rate),
            percent(rate.interval.low),
            percent(rate.interval.high),
            2.0 + low,
            (high - low).max(1.0),
            2.0 + rate.rate * 200.0,
            rate.verdict
        );
    }
    out.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::result::{Failure, LoadReport, LoadSample, Series};

    fn suite() -> SuiteResult {
        let scenario = |name: &str, status| ScenarioResult {
            name: name.into(),
            attempt: 0,
            labels: vec!["fast".into()],
            status,
            duration: Duration::from_millis(1500),
            failure: (status == Status::Failed).then(|| Failure {
                message: "BuildPlane a/b did not match <in time>".into(),
                awaited: Some("Ready".into()),
                last_seen: Some("status: False".into()),
                diff: Some("- True\n+ False".into()),
            }),
            steps: vec![crate::result::StepResult {
                name: "faults".into(),
                status: Status::Passed,
                duration: Duration::from_millis(200),
                operations: vec![crate::result::OpResult {
                    phase: "try",
                    kind: "kill".into(),
                    summary: "gateway".into(),
                    at: 0.3,
                    status: Status::Passed,
                    duration: Duration::from_millis(100),
                    failure: None,
                }],
            }],
            cleanup_error: None,
            evidence: None,
            series: vec![Series {
                name: "connected".into(),
                points: vec![(0.0, 0.0), (1.0, 10.0), (2.0, 8.0)],
            }],
            loads: vec![LoadReport {
                name: "steady".into(),
                samples: vec![
                    LoadSample {
                        t: 0.1,
                        latency_ms: 3.0,
                        ok: true,
                    },
                    LoadSample {
                        t: 0.5,
                        latency_ms: 9.0,
                        ok: false,
                    },
                ],
                total: 2,
                failed: 1,
                ..LoadReport::default()
            }],
            kept: None,
            skipped: None,
        };
        SuiteResult {
            backend: "sim".into(),
            profile: "default".into(),
            started: "2026-01-01T00:00:00Z".into(),
            duration: Duration::from_secs(3),
            scenarios: vec![scenario("a", Status::Passed), scenario("b", Status::Failed)],
        }
    }

    /// JUnit carries counts, escapes the failure text and includes the diff.
    #[test]
    fn junit_counts_and_escapes() {
        let xml = junit(&suite());
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert!(xml.contains("did not match &lt;in time&gt;"), "{xml}");
        assert!(xml.contains("+ False"), "{xml}");
    }

    /// Repeated runs are one testcase each: flaky ones pass with a `flakyFailure` per failed
    /// run, broken ones carry a `failure` and a `rerunFailure`; JSON and HTML carry the rates.
    #[test]
    fn repeated_runs_are_one_testcase_with_flaky_and_rerun_failures() {
        let mut suite = suite();
        let mut again = suite.scenarios.clone();
        for run in &mut again {
            run.attempt = 1;
        }
        again[0].status = Status::Failed;
        again[0].failure = suite.scenarios[1].failure.clone();
        suite.scenarios.extend(again);
        let xml = junit(&suite);
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert_eq!(xml.matches("<testcase").count(), 2, "{xml}");
        let case_a = &xml[xml.find("name=\"a\"").expect("a")..xml.find("name=\"b\"").expect("b")];
        assert!(
            case_a.contains("<flakyFailure message=\"run 2: "),
            "{case_a}"
        );
        assert!(!case_a.contains("<failure"), "{case_a}");
        let case_b = &xml[xml.find("name=\"b\"").expect("b")..];
        assert!(case_b.contains("<failure message=\"run 1: "), "{case_b}");
        assert!(
            case_b.contains("<rerunFailure message=\"run 2: "),
            "{case_b}"
        );
        let json: serde_json::Value = serde_json::from_str(&json(&suite)).expect("json");
        assert_eq!(json["pass_rates"][0]["verdict"], "flaky");
        assert_eq!(json["pass_rates"][1]["verdict"], "broken");
        assert_eq!(json["scenarios"].as_array().map(Vec::len), Some(4));
        let page = html(&suite);
        assert!(
            page.contains("pass rates") && page.contains("Flaky"),
            "{page}"
        );
    }

    /// The HTML page has plots and no external resources.
    #[test]
    fn html_is_self_contained_with_plots() {
        let page = html(&suite());
        assert!(page.contains("<svg"), "plots are inline SVG");
        assert!(page.contains("connected over time"));
        assert!(page.contains("latency distribution"));
        assert!(page.contains("error rate over time"));
        assert!(
            page.contains("every request against the faults") && page.contains("kill gateway"),
            "the faults are drawn on the load's time axis"
        );
        assert!(
            !page.contains("<script src") && !page.contains("<link"),
            "no external resources"
        );
        assert!(page.contains("1 passed") && page.contains("1 failed"));
    }
}
