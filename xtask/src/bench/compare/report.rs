//! The result of `--compare`: one row per figure, the Markdown table, the JSON and the exit.

use std::{collections::BTreeSet, fmt::Write as _, path::Path, time::Duration};

use anyhow::bail;
use serde_json::{Value, json};

use super::{
    Problems, Profile, Revision,
    stats::{Ratio, Verdict, geometric_mean, paired_ratio},
};
use crate::bench::{Better, Figures, fmt};

/// One figure of the comparison.
pub(super) struct Row {
    name: String,
    unit: &'static str,
    better: Better,
    /// One value per round, `None` where the side did not produce the figure.
    a: Vec<Option<f64>>,
    b: Vec<Option<f64>>,
    ratio: Option<Ratio>,
    verdict: Verdict,
}

/// The confidence of all intervals together. Each interval is at 1 − 5 % / m, m being the
/// figures with two pairs or more (Bonferroni), so that a build that changed nothing fails with
/// at most 2.5 % probability however many figures are compared.
const JOINT_CONFIDENCE: f64 = 0.95;

/// Every figure either side produced in any round, by name, and the confidence of each
/// figure's interval.
pub(super) fn rows(a: &[Figures], b: &[Figures], threshold: f64) -> (Vec<Row>, f64) {
    let names: BTreeSet<&String> = a.iter().chain(b).flat_map(|run| run.0.keys()).collect();
    let n_compared = names
        .iter()
        .filter(|name| pairs(&values(a, name), &values(b, name)).len() >= 2)
        .count();
    let confidence = 1.0 - (1.0 - JOINT_CONFIDENCE) / n_compared.max(1) as f64;
    let rows = names
        .into_iter()
        .map(|name| row(name, a, b, confidence, threshold))
        .collect();
    (rows, confidence)
}

/// The figure's value in each round, `None` where the run lacks it.
fn values(runs: &[Figures], name: &str) -> Vec<Option<f64>> {
    runs.iter().map(|run| run.get(name)).collect()
}

/// The rounds where both sides have the figure.
fn pairs(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<(f64, f64)> {
    a.iter()
        .zip(b)
        .filter_map(|(a, b)| Some(((*a)?, (*b)?)))
        .collect()
}

fn row(name: &str, a: &[Figures], b: &[Figures], confidence: f64, threshold: f64) -> Row {
    let (a_values, b_values) = (values(a, name), values(b, name));
    // `name` comes from one of the runs, so one of them has it.
    let figure = b
        .iter()
        .chain(a)
        .find_map(|run| run.0.get(name))
        .expect("the figure is in a run");
    let ratio = paired_ratio(&pairs(&a_values, &b_values), confidence);
    let verdict = if a_values.iter().all(Option::is_none) {
        Verdict::MissingInA
    } else if b_values.iter().all(Option::is_none) {
        Verdict::MissingInB
    } else {
        ratio.map_or(Verdict::Inconclusive, |ratio| {
            Verdict::of(ratio, figure.better, threshold)
        })
    };
    Row {
        name: name.to_owned(),
        unit: figure.unit,
        better: figure.better,
        a: a_values,
        b: b_values,
        ratio,
        verdict,
    }
}

/// A finished comparison.
pub(super) struct Comparison {
    pub(super) a: Revision,
    pub(super) b: Revision,
    pub(super) rounds: u32,
    /// Percent.
    pub(super) threshold: f64,
    /// Of each figure's interval (`rows`).
    pub(super) confidence: f64,
    pub(super) subset: &'static str,
    pub(super) profile: Profile,
    pub(super) rows: Vec<Row>,
    pub(super) problems: Problems,
    pub(super) built: Duration,
    pub(super) measured: Duration,
}

impl Comparison {
    fn regressed(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|row| row.verdict == Verdict::Regressed)
            .map(|row| row.name.as_str())
            .collect()
    }

    /// Prints the table on stdout and writes `compare.md` and `compare.json` to `dir`.
    pub(super) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let markdown = self.markdown();
        print!("{markdown}");
        std::fs::write(dir.join("compare.md"), &markdown)?;
        std::fs::write(
            dir.join("compare.json"),
            serde_json::to_string_pretty(&self.json())?,
        )?;
        eprintln!(
            "wrote {} and {}; built in {} s, measured in {} s",
            dir.join("compare.md").display(),
            dir.join("compare.json").display(),
            self.built.as_secs(),
            self.measured.as_secs()
        );
        Ok(())
    }

    /// Fails on B's problems, and on a regression unless `quick`.
    pub(super) fn exit(&self, quick: bool) -> anyhow::Result<()> {
        let mut failed = self.problems.errors.clone();
        let regressed = self.regressed();
        if !regressed.is_empty() {
            let message = format!(
                "{} figure(s) regressed beyond {}%: {}",
                regressed.len(),
                self.threshold,
                regressed.join(", ")
            );
            if quick {
                eprintln!("--quick does not fail on timings; {message}");
            } else {
                failed.push(message);
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("\n"));
        }
        Ok(())
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Benchmarks: B against A\n");
        let _ = writeln!(md, "A: {}. B: {}.", self.a, self.b);
        let _ = writeln!(
            md,
            "{} rounds, each running every bench on A and on B (A first in odd rounds, B in even ones); {} build, {} subset.",
            self.rounds,
            match self.profile {
                Profile::Dev => "dev (`--quick`, not representative)",
                Profile::Release => "release",
            },
            self.subset
        );
        let _ = writeln!(
            md,
            "A and B are geometric means over the rounds; ↑ higher is better, ↓ lower is better."
        );
        let _ = writeln!(
            md,
            "B/A is the geometric mean of the per-round ratios, with Student's t interval on their logarithms at {:.2}% each, so that all intervals hold together with {}% (Bonferroni).",
            self.confidence * 100.0,
            JOINT_CONFIDENCE * 100.0
        );
        let _ = writeln!(
            md,
            "A figure regresses when its whole interval is more than {}% worse.\n",
            self.threshold
        );
        let _ = writeln!(md, "| figure | A | B | B/A | interval | verdict |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for row in &self.rows {
            let _ = writeln!(md, "{}", markdown_row(row));
        }
        let regressed = self.regressed();
        let _ = writeln!(
            md,
            "\n{}",
            match regressed.len() {
                0 => format!("No figure regressed beyond {}%.", self.threshold),
                n => format!("**{n} figure(s) regressed**: {}.", regressed.join(", ")),
            }
        );
        for note in &self.problems.notes {
            let _ = writeln!(md, "- note: {note}");
        }
        for error in &self.problems.errors {
            let _ = writeln!(md, "- **error**: {error}");
        }
        let _ = writeln!(
            md,
            "\nBuilds {} s, measurement {} s.",
            self.built.as_secs(),
            self.measured.as_secs()
        );
        md
    }

    fn json(&self) -> Value {
        let revision = |r: &Revision| json!({"name": r.name, "sha": r.sha, "dirty": r.dirty});
        json!({
            "a": revision(&self.a),
            "b": revision(&self.b),
            "rounds": self.rounds,
            "threshold_percent": self.threshold,
            "confidence": self.confidence,
            "joint_confidence": JOINT_CONFIDENCE,
            "subset": self.subset,
            "figures": self.rows.iter().map(row_json).collect::<Vec<_>>(),
            "regressed": self.regressed(),
            "notes": self.problems.notes,
            "errors": self.problems.errors,
            "build_secs": self.built.as_secs(),
            "measure_secs": self.measured.as_secs(),
        })
    }
}

fn arrow(better: Better) -> &'static str {
    match better {
        Better::Higher => "↑",
        Better::Lower => "↓",
    }
}

fn markdown_row(row: &Row) -> String {
    let (ratio, interval) = match row.ratio {
        Some(r) if r.high.is_finite() => (
            format!("{:.3}", r.point),
            format!("{:.3} – {:.3}", r.low, r.high),
        ),
        Some(r) => (format!("{:.3}", r.point), "–".into()),
        None => ("–".into(), "–".into()),
    };
    let verdict = match row.verdict {
        Verdict::Regressed => "**regressed**",
        verdict => verdict.label(),
    };
    format!(
        "| {} ({} {}) | {} | {} | {ratio} | {interval} | {verdict} |",
        row.name,
        row.unit,
        arrow(row.better),
        fmt(geometric_mean(&row.a)),
        fmt(geometric_mean(&row.b)),
    )
}

fn row_json(row: &Row) -> Value {
    json!({
        "name": row.name,
        "unit": row.unit,
        "better": if row.better == Better::Higher { "higher" } else { "lower" },
        "a": row.a,
        "b": row.b,
        "ratio": row.ratio.map(|r| r.point),
        "ci": row.ratio.filter(|r| r.high.is_finite()).map(|r| [r.low, r.high]),
        "verdict": row.verdict.label(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(values: &[(&str, f64, Better)]) -> Figures {
        let mut figures = Figures::default();
        for &(name, value, better) in values {
            figures.put(name, value, "MiB/s", better);
        }
        figures
    }

    /// `n` rounds with the same figures.
    fn rounds(n: usize, values: &[(&str, f64, Better)]) -> Vec<Figures> {
        (0..n).map(|_| figures(values)).collect()
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-3
    }

    /// A figure that A does not produce in any round is "missing in A" and fails nothing.
    #[test]
    fn figure_missing_in_a_does_not_fail() {
        let a = rounds(3, &[("old", 100.0, Better::Higher)]);
        let b = rounds(
            3,
            &[("old", 100.0, Better::Higher), ("new", 1.0, Better::Higher)],
        );
        let (rows, confidence) = rows(&a, &b, 10.0);
        let verdicts: Vec<(&str, Verdict)> =
            rows.iter().map(|r| (r.name.as_str(), r.verdict)).collect();
        assert_eq!(
            verdicts,
            [("new", Verdict::MissingInA), ("old", Verdict::Unchanged)]
        );
        assert!(comparison((rows, confidence)).exit(false).is_ok());
    }

    /// A figure B no longer produces is "missing in B".
    #[test]
    fn figure_missing_in_b_is_reported() {
        let a = rounds(2, &[("gone", 100.0, Better::Higher)]);
        let b = rounds(2, &[]);
        let (rows, _) = rows(&a, &b, 10.0);
        assert_eq!(rows[0].verdict, Verdict::MissingInB);
        assert_eq!(rows[0].a, [Some(100.0), Some(100.0)]);
    }

    /// A round where one side lacks the figure drops that pair only.
    #[test]
    fn incomplete_round_drops_its_pair() {
        let a = vec![
            figures(&[("x", 100.0, Better::Higher)]),
            Figures::default(),
            figures(&[("x", 100.0, Better::Higher)]),
        ];
        let b = rounds(3, &[("x", 50.0, Better::Higher)]);
        let row = &rows(&a, &b, 10.0).0[0];
        let ratio = row.ratio.expect("two pairs");
        assert!(
            close(ratio.point, 0.5) && close(ratio.low, 0.5),
            "{ratio:?}"
        );
        assert_eq!(row.verdict, Verdict::Regressed);
    }

    /// Only a regression fails the run; its name is in the error.
    #[test]
    fn regression_fails_the_run() {
        let a = rounds(
            3,
            &[
                ("latency", 1.0, Better::Lower),
                ("throughput", 100.0, Better::Higher),
            ],
        );
        let b: Vec<Figures> = [2.0, 2.1, 1.9]
            .iter()
            .map(|&latency| {
                figures(&[
                    ("latency", latency, Better::Lower),
                    ("throughput", 101.0, Better::Higher),
                ])
            })
            .collect();
        let comparison = comparison(rows(&a, &b, 10.0));
        let err = comparison.exit(false).expect_err("latency doubled");
        assert!(
            err.to_string()
                .contains("1 figure(s) regressed beyond 10%: latency"),
            "{err}"
        );
        assert!(
            comparison.exit(true).is_ok(),
            "--quick never fails on timings"
        );
    }

    /// The table has one row per figure with A, B, B/A, the interval and the verdict.
    #[test]
    fn markdown_row_shows_means_ratio_interval_and_verdict() {
        let a = rounds(2, &[("e2e.1KiB_c64.v2", 16.0, Better::Higher)]);
        let b = vec![
            figures(&[("e2e.1KiB_c64.v2", 8.0, Better::Higher)]),
            figures(&[("e2e.1KiB_c64.v2", 8.5, Better::Higher)]),
        ];
        let (rows, _) = rows(&a, &b, 10.0);
        assert_eq!(
            markdown_row(&rows[0]),
            "| e2e.1KiB_c64.v2 (MiB/s ↑) | 16.0 | 8.25 | 0.515 | 0.351 – 0.758 | **regressed** |"
        );
        let missing = rows_missing_in_a();
        assert_eq!(
            markdown_row(&missing[0]),
            "| new (MiB/s ↑) | – | 1.00 | – | – | missing in A |"
        );
    }

    fn rows_missing_in_a() -> Vec<Row> {
        let a = rounds(2, &[]);
        rows(&a, &rounds(2, &[("new", 1.0, Better::Higher)]), 10.0).0
    }

    /// Each interval is at 1 − 5 % / m for the m figures both sides produced: 97.5 % for two.
    #[test]
    fn intervals_hold_together_over_all_figures() {
        let a = rounds(
            3,
            &[
                ("x", 100.0, Better::Higher),
                ("y", 100.0, Better::Higher),
                ("only_in_a", 1.0, Better::Higher),
            ],
        );
        let b: Vec<Figures> = [90.0, 100.0, 95.0]
            .iter()
            .map(|&v| figures(&[("x", v, Better::Higher), ("y", v, Better::Higher)]))
            .collect();
        let (rows, confidence) = rows(&a, &b, 10.0);
        assert!(close(confidence, 0.975), "{confidence}");
        let expected = paired_ratio(&[(100.0, 90.0), (100.0, 100.0), (100.0, 95.0)], 0.975);
        assert_eq!(rows[1].name, "x");
        assert_eq!(rows[1].ratio, expected);
    }

    fn comparison((rows, confidence): (Vec<Row>, f64)) -> Comparison {
        let revision = |name: &str| Revision {
            name: name.into(),
            sha: "0123456789abcdef".into(),
            dirty: false,
        };
        Comparison {
            a: revision("main"),
            b: revision("working tree"),
            rounds: 3,
            threshold: 10.0,
            confidence,
            subset: "pull-request",
            profile: Profile::Release,
            rows,
            problems: Problems::default(),
            built: Duration::ZERO,
            measured: Duration::ZERO,
        }
    }
}
