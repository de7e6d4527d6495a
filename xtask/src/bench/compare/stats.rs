//! The statistics of `--compare`: B/A over paired rounds with its confidence interval, and the
//! verdict.

use std::f64::consts::PI;

use crate::bench::Better;

/// B/A of one figure: the geometric mean of the per-round ratios and its confidence interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Ratio {
    pub(super) point: f64,
    pub(super) low: f64,
    /// Infinite with a single pair: one round says nothing about the noise.
    pub(super) high: f64,
}

/// The ratio of paired values `(a, b)`, one pair per round, with a two-sided interval at
/// `confidence` (0.95 for 95 %); `None` without a pair, or when a value is not positive (its
/// logarithm is undefined).
pub(super) fn paired_ratio(pairs: &[(f64, f64)], confidence: f64) -> Option<Ratio> {
    if pairs.is_empty() || pairs.iter().any(|&(a, b)| !(a > 0.0 && b > 0.0)) {
        return None;
    }
    let logs: Vec<f64> = pairs.iter().map(|&(a, b)| (b / a).ln()).collect();
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let half_width = if logs.len() == 1 {
        f64::INFINITY
    } else {
        let variance = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        student_t_quantile(0.5 + confidence / 2.0, logs.len() - 1) * (variance / n).sqrt()
    };
    Some(Ratio {
        point: mean.exp(),
        low: (mean - half_width).exp(),
        high: (mean + half_width).exp(),
    })
}

/// The `p` quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection on its
/// distribution function.
fn student_t_quantile(p: f64, df: usize) -> f64 {
    let mut high = 1.0;
    while student_t_cdf(high, df) < p {
        high *= 2.0;
        if high > 1e12 {
            return f64::INFINITY;
        }
    }
    let mut low = 0.0;
    while high - low > 1e-9 * high {
        let middle = (low + high) / 2.0;
        if student_t_cdf(middle, df) < p {
            low = middle;
        } else {
            high = middle;
        }
    }
    high
}

/// P(T ≤ t) for t ≥ 0: 1 − I_x(df/2, 1/2) / 2 with x = df / (df + t²).
fn student_t_cdf(t: f64, df: usize) -> f64 {
    let df = df as f64;
    1.0 - 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
}

/// The regularized incomplete beta function I_x(a, b), by its continued fraction (Numerical
/// Recipes, `betai`).
fn regularized_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_fraction(1.0 - x, b, a) / b
    }
}

/// The continued fraction of the incomplete beta function, by Lentz's method (`betacf`).
fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let not_zero = |v: f64| if v.abs() < TINY { TINY } else { v };
    let mut c = 1.0;
    let mut d = 1.0 / not_zero(1.0 - (a + b) * x / (a + 1.0));
    let mut fraction = d;
    for m in 1..=300 {
        let m = f64::from(m);
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 / not_zero(1.0 + even * d);
        c = not_zero(1.0 + even / c);
        fraction *= d * c;
        let odd = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 / not_zero(1.0 + odd * d);
        c = not_zero(1.0 + odd / c);
        fraction *= d * c;
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    fraction
}

/// ln Γ(x) for x ≥ 1/2, by Lanczos' approximation (g = 7, nine terms; about 15 digits).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let series = COEFFICIENTS[1..]
        .iter()
        .enumerate()
        .fold(COEFFICIENTS[0], |sum, (i, c)| {
            sum + c / (x + i as f64 + 1.0)
        });
    let t = x + 7.5;
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

/// What the interval says about B against A.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Verdict {
    /// The whole interval is better than the threshold.
    Improved,
    /// The interval reaches past ± the threshold: more rounds could tell.
    Inconclusive,
    /// Only B has the figure: A predates it, or its bench failed there.
    MissingInA,
    /// Only A has the figure.
    MissingInB,
    /// The whole interval is worse than the threshold: the one verdict that fails the run.
    Regressed,
    /// The whole interval lies within ± the threshold.
    Unchanged,
}

impl Verdict {
    /// `threshold` in percent; worse is lower for `Better::Higher`, higher for `Better::Lower`.
    pub(super) fn of(ratio: Ratio, better: Better, threshold: f64) -> Verdict {
        let (lower, upper) = (1.0 - threshold / 100.0, 1.0 + threshold / 100.0);
        let (worse, improved) = match better {
            Better::Higher => (ratio.high < lower, ratio.low > upper),
            Better::Lower => (ratio.low > upper, ratio.high < lower),
        };
        if worse {
            Verdict::Regressed
        } else if improved {
            Verdict::Improved
        } else if ratio.low >= lower && ratio.high <= upper {
            Verdict::Unchanged
        } else {
            Verdict::Inconclusive
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Verdict::Improved => "improved",
            Verdict::Inconclusive => "inconclusive",
            Verdict::MissingInA => "missing in A",
            Verdict::MissingInB => "missing in B",
            Verdict::Regressed => "regressed",
            Verdict::Unchanged => "unchanged",
        }
    }
}

/// The geometric mean of the values present (the mean the ratio is consistent with).
pub(super) fn geometric_mean(values: &[Option<f64>]) -> Option<f64> {
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    if present.is_empty() || present.iter().any(|&v| v <= 0.0) {
        return None;
    }
    Some((present.iter().map(|v| v.ln()).sum::<f64>() / present.len() as f64).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point estimate is the geometric mean of the per-round ratios.
    #[test]
    fn ratio_is_geometric_mean_of_round_ratios() {
        let ratio = paired_ratio(&[(100.0, 110.0), (200.0, 180.0)], 0.95).expect("positive pairs");
        assert!(close(ratio.point, (1.1f64 * 0.9).sqrt()), "{ratio:?}");
    }

    /// The interval is Student's t on the log ratios, checked against a hand computation.
    #[test]
    fn interval_is_student_t_on_log_ratios() {
        // Log ratios 0, 0.1, 0.2: mean 0.1, sd 0.1, t(2) = 4.3027, half-width 0.24842.
        let pairs = [(1.0, 1.0), (1.0, 0.1f64.exp()), (1.0, 0.2f64.exp())];
        let ratio = paired_ratio(&pairs, 0.95).expect("positive pairs");
        let expected = Ratio {
            point: 0.1f64.exp(),
            low: (0.1f64 - 0.24842).exp(),
            high: (0.1f64 + 0.24842).exp(),
        };
        assert!(
            close(ratio.point, expected.point)
                && close(ratio.low, expected.low)
                && close(ratio.high, expected.high),
            "{ratio:?} != {expected:?}"
        );
    }

    /// More rounds with the same spread give a narrower interval (t and √n both shrink it).
    #[test]
    fn more_rounds_narrow_the_interval() {
        let rounds = |n: usize| -> Vec<(f64, f64)> {
            (0..n)
                .map(|i| (100.0, if i % 2 == 0 { 95.0 } else { 105.0 }))
                .collect()
        };
        let width = |n| {
            let r = paired_ratio(&rounds(n), 0.95).expect("positive pairs");
            r.high / r.low
        };
        assert!(
            width(2) > width(4) && width(4) > width(10),
            "{} {} {}",
            width(2),
            width(4),
            width(10)
        );
    }

    /// One pair has a point estimate but an unbounded interval; none, or a zero, has no ratio.
    #[test]
    fn ratio_needs_positive_pairs() {
        let one = paired_ratio(&[(100.0, 50.0)], 0.95).expect("one pair");
        assert!(
            close(one.point, 0.5) && one.low == 0.0 && one.high == f64::INFINITY,
            "{one:?}"
        );
        assert_eq!(paired_ratio(&[], 0.95), None);
        assert_eq!(paired_ratio(&[(0.0, 1.0), (1.0, 1.0)], 0.95), None);
        assert_eq!(paired_ratio(&[(1.0, -1.0), (1.0, 1.0)], 0.95), None);
    }

    /// A and B columns are geometric means of the rounds that have the figure.
    #[test]
    fn mean_is_geometric_over_present_rounds() {
        assert_eq!(geometric_mean(&[Some(1.0), None, Some(4.0)]), Some(2.0));
        assert_eq!(geometric_mean(&[None, None]), None);
        assert_eq!(geometric_mean(&[Some(0.0), Some(4.0)]), None);
    }

    /// A higher confidence widens the interval: 99.9 % against 95 % with 5 rounds is
    /// t(0.9995, 4) / t(0.975, 4) = 8.6103 / 2.7764 times as wide in logarithms.
    #[test]
    fn higher_confidence_widens_the_interval() {
        let pairs = [(1.0, 1.0), (1.0, 1.1), (1.0, 0.9), (1.0, 1.05), (1.0, 0.95)];
        let half_width = |confidence| {
            let ratio = paired_ratio(&pairs, confidence).expect("positive pairs");
            (ratio.high / ratio.point).ln()
        };
        let widening = half_width(0.999) / half_width(0.95);
        assert!(close(widening, 8.6103 / 2.7764), "{widening}");
    }

    /// Quantiles of Student's t against published values: the 97.5 % column for 1 to 30
    /// degrees of freedom, a few far tails, and df = 1 where t is a tangent.
    #[test]
    fn student_t_quantiles_match_tables() {
        const T_975: [f64; 30] = [
            12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
            2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796,
            2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
        ];
        let mut cases: Vec<(f64, usize, f64)> =
            (1..=30).map(|df| (0.975, df, T_975[df - 1])).collect();
        cases.extend([
            (0.975, 120, 1.9799),
            (0.995, 4, 4.6041),
            (0.9995, 4, 8.6103),
            (0.9995, 10, 4.5869),
            (1.0 - 0.025 / 18.0, 9, 4.0752),
            (1.0 - 0.025 / 18.0, 1, (PI * (0.5 - 0.025 / 18.0)).tan()),
        ]);
        for (p, df, expected) in cases {
            let actual = student_t_quantile(p, df);
            assert!(
                (actual - expected).abs() < 1e-4 * expected.max(1.0),
                "t({p}, {df}) = {actual}, expected {expected}"
            );
        }
    }

    /// ln Γ at half-integers and integers, where Γ is known exactly: √π and 9!.
    #[test]
    fn ln_gamma_matches_exact_values() {
        let cases = [
            (0.5, PI.sqrt().ln()),
            (1.0, 0.0),
            (2.5, (0.75 * PI.sqrt()).ln()),
            (10.0, 362_880f64.ln()),
        ];
        for (x, expected) in cases {
            let actual = ln_gamma(x);
            assert!(
                (actual - expected).abs() < 1e-12,
                "ln Γ({x}) = {actual}, expected {expected}"
            );
        }
    }

    /// Verdicts as data: (better, low, high, expected) with a 10 % threshold.
    #[test]
    fn verdict_respects_direction_and_threshold() {
        use Better::{Higher, Lower};
        let cases = [
            // Throughput down by 11 % to 20 %: the whole interval is below 0.9.
            (Higher, 0.80, 0.89, Verdict::Regressed),
            // The same interval for a latency is an improvement beyond 10 %.
            (Lower, 0.80, 0.89, Verdict::Improved),
            // Latency 15 % up, wholly above 1.1.
            (Lower, 1.12, 1.18, Verdict::Regressed),
            (Higher, 1.12, 1.18, Verdict::Improved),
            // Significantly worse, but not beyond the threshold: no failure.
            (Higher, 0.92, 0.97, Verdict::Unchanged),
            (Lower, 1.03, 1.08, Verdict::Unchanged),
            // Worse on the point estimate, but the interval reaches 1: more rounds needed.
            (Higher, 0.70, 1.02, Verdict::Inconclusive),
            (Lower, 0.98, 1.40, Verdict::Inconclusive),
            // Exactly at the threshold is not beyond it.
            (Higher, 0.80, 0.90, Verdict::Inconclusive),
            (Lower, 1.10, 1.20, Verdict::Inconclusive),
            // One round: unbounded interval.
            (Higher, 0.0, f64::INFINITY, Verdict::Inconclusive),
        ];
        for (better, low, high, expected) in cases {
            let ratio = Ratio {
                point: (low * high).sqrt(),
                low,
                high,
            };
            assert_eq!(
                Verdict::of(ratio, better, 10.0),
                expected,
                "{} [{low}, {high}]",
                if better == Higher { "higher" } else { "lower" }
            );
        }
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-3
    }
}
