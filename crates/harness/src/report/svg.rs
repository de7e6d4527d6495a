//! Inline SVG charts (line chart, histogram) for the HTML report, with no JavaScript.

use std::fmt::Write as _;

use super::escape;
use crate::result::LoadSample;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 55.0;
const BOTTOM: f64 = 30.0;
const TOP: f64 = 25.0;
const RIGHT: f64 = 15.0;

fn frame(title: &str, body: &str, x_label: &str, x_max: f64, y_max: f64) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\">\
         <text x=\"{LEFT}\" y=\"16\" font-size=\"13\" font-family=\"sans-serif\">{}</text>",
        escape(title)
    );
    let plot_bottom = HEIGHT - BOTTOM;
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{plot_bottom}\" stroke=\"#444\"/>\
         <line x1=\"{LEFT}\" y1=\"{plot_bottom}\" x2=\"{}\" y2=\"{plot_bottom}\" stroke=\"#444\"/>",
        WIDTH - RIGHT
    );
    for i in 0..=4 {
        let fraction = f64::from(i) / 4.0;
        let y = plot_bottom - fraction * (plot_bottom - TOP);
        let x = LEFT + fraction * (WIDTH - LEFT - RIGHT);
        let _ = write!(
            out,
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\" font-family=\"sans-serif\">{}</text>\
             <line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>\
             <text x=\"{x}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\" font-family=\"sans-serif\">{}</text>",
            LEFT - 4.0,
            y + 3.0,
            tick(fraction * y_max),
            WIDTH - RIGHT,
            plot_bottom + 13.0,
            tick(fraction * x_max)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\" font-family=\"sans-serif\">{}</text>{body}</svg>",
        WIDTH - RIGHT,
        HEIGHT - 2.0,
        escape(x_label)
    );
    out
}

fn tick(value: f64) -> String {
    if value >= 100.0 || value == value.round() {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn nice_max(value: f64) -> f64 {
    if value <= 0.0 { 1.0 } else { value * 1.05 }
}

/// A line chart of `(x, y)` points.
pub(crate) fn line_chart(
    title: &str,
    x_label: &str,
    series_name: &str,
    points: &[(f64, f64)],
) -> String {
    if points.is_empty() {
        return format!("<p>{}: no samples</p>", escape(title));
    }
    let x_min = points.first().map_or(0.0, |p| p.0);
    let x_max = nice_max(points.last().map_or(1.0, |p| p.0) - x_min);
    let y_max = nice_max(points.iter().map(|p| p.1).fold(0.0, f64::max));
    let sx = |x: f64| LEFT + (x - x_min) / x_max * (WIDTH - LEFT - RIGHT);
    let sy = |y: f64| HEIGHT - BOTTOM - y / y_max * (HEIGHT - BOTTOM - TOP);
    let path: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
        .collect();
    let body = format!(
        "<polyline fill=\"none\" stroke=\"#0969da\" stroke-width=\"1.5\" points=\"{}\"><title>{}</title></polyline>",
        path.join(" "),
        escape(series_name)
    );
    frame(
        title,
        &body,
        &format!("{x_label} (from {x_min:.1})"),
        x_max,
        y_max,
    )
}

/// A histogram of values (20 buckets).
pub(crate) fn histogram(title: &str, unit: &str, values: &[f64]) -> String {
    if values.is_empty() {
        return format!("<p>{}: no samples</p>", escape(title));
    }
    const BUCKETS: usize = 20;
    let max = nice_max(values.iter().copied().fold(0.0, f64::max));
    let mut counts = [0u64; BUCKETS];
    for value in values {
        let bucket = ((value / max) * BUCKETS as f64).floor() as usize;
        counts[bucket.min(BUCKETS - 1)] += 1;
    }
    let y_max = nice_max(*counts.iter().max().unwrap_or(&1) as f64);
    let bar_width = (WIDTH - LEFT - RIGHT) / BUCKETS as f64;
    let mut body = String::new();
    for (i, count) in counts.iter().enumerate() {
        let h = *count as f64 / y_max * (HEIGHT - BOTTOM - TOP);
        let _ = write!(
            body,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#54aeff\"><title>{} requests</title></rect>",
            LEFT + i as f64 * bar_width + 1.0,
            HEIGHT - BOTTOM - h,
            bar_width - 2.0,
            count
        );
    }
    frame(title, &body, unit, max, y_max)
}

/// Error rate per second of a load run, as `(t, rate)` points.
pub(crate) fn error_rate(samples: &[LoadSample]) -> Vec<(f64, f64)> {
    let mut buckets: std::collections::BTreeMap<i64, (u64, u64)> =
        std::collections::BTreeMap::new();
    for sample in samples {
        let entry = buckets.entry(sample.t.floor() as i64).or_default();
        entry.0 += 1;
        entry.1 += u64::from(!sample.ok);
    }
    buckets
        .into_iter()
        .map(|(t, (n, failed))| (t as f64, failed as f64 / n as f64))
        .collect()
}

/// A fault or recovery on the time axis: when, a short label, and whether it breaks (red) or
/// heals (green) something.
pub(crate) struct Mark {
    /// Seconds on the scenario's axis.
    pub at: f64,
    /// Shown on hover and abbreviated beside the line.
    pub label: String,
    /// Injects a fault (true) or recovers (false).
    pub breaks: bool,
}

/// Every request of a load as a dot (latency against the time it was sent; failed ones red),
/// with the scenario's faults and recoveries as vertical lines on the same axis.
pub(crate) fn timeline(title: &str, samples: &[LoadSample], marks: &[Mark]) -> String {
    if samples.is_empty() {
        return format!("<p>{}: no samples</p>", escape(title));
    }
    let end = samples
        .iter()
        .map(|s| s.t + s.latency_ms / 1000.0)
        .chain(marks.iter().map(|m| m.at))
        .fold(0.0, f64::max);
    let x_max = nice_max(end);
    let y_max = nice_max(samples.iter().map(|s| s.latency_ms).fold(0.0, f64::max));
    let sx = |x: f64| LEFT + x / x_max * (WIDTH - LEFT - RIGHT);
    let sy = |y: f64| HEIGHT - BOTTOM - y / y_max * (HEIGHT - BOTTOM - TOP);
    let mut body = String::new();
    for (i, mark) in marks.iter().enumerate() {
        let x = sx(mark.at);
        let colour = if mark.breaks { "#cf222e" } else { "#1a7f37" };
        let short: String = mark.label.chars().take(18).collect();
        let _ = write!(
            body,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-dasharray=\"3,2\"><title>{:.1}s {}</title></line>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"8\" fill=\"{colour}\" font-family=\"sans-serif\">{}</text>",
            HEIGHT - BOTTOM,
            mark.at,
            escape(&mark.label),
            x + 2.0,
            TOP + 9.0 + (i % 6) as f64 * 9.0,
            escape(&short)
        );
    }
    for sample in samples {
        let _ = write!(
            body,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.6\" fill=\"{}\"/>",
            sx(sample.t),
            sy(sample.latency_ms),
            if sample.ok { "#0969da" } else { "#cf222e" }
        );
    }
    frame(title, &body, "s (ms: latency)", x_max, y_max)
}
