//! Watches and series: `watch`, `record`, `checkSeries`, `metric` and `consistently`, their
//! execution and their lint rules, and the readers of connection tables and Prometheus text.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::time::Instant;

use super::http::request_once;
use super::{Background, Engine, OpResultT, fail, yaml};
use crate::backend::{ComponentTarget, GatewayAccess};
use crate::duration::Dur;
use crate::lint::{Linter, Seg, with};
use crate::matcher;
use crate::result::Failure;
use crate::scenario::{
    CheckSeriesOp, ComponentKind, ConsistentlyOp, MetricOp, RecordOp, RecordSource, TimeoutKind,
    Timeouts, WatchOp,
};

impl Engine {
    pub(super) async fn watch(&mut self, op: &WatchOp, timeout: Duration) -> OpResultT {
        let gateway = self.gateway()?;
        let mut path = self.text(&op.path)?;
        if !path.contains("watch=") {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str("watch=true");
        }
        let expected = op
            .events
            .iter()
            .map(|e| {
                Ok((
                    e.type_.clone(),
                    e.object.as_ref().map(|o| self.sub(o)).transpose()?,
                ))
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let task = async move { watch_until(&gateway, &path, &expected, timeout).await };
        match &op.background {
            Some(name) => {
                let handle = tokio::spawn(task);
                self.backgrounds
                    .insert(name.clone(), Background { handle, stop: None });
                Ok(())
            }
            None => task.await,
        }
    }

    async fn metric_value(&self, op: &MetricOp) -> Result<Option<f64>, String> {
        let target = ComponentTarget {
            kind: op.component,
            name: op.instance.clone(),
            cluster: None,
        };
        let labels = op
            .labels
            .iter()
            .map(|(name, value)| Ok((name.clone(), self.text(value)?)))
            .collect::<Result<BTreeMap<_, _>, Failure>>()
            .map_err(|failure| failure.message)?;
        let text = self.env.metrics(target).await.map_err(|e| e.to_string())?;
        Ok(prometheus_sum(&text, &op.name, &labels))
    }

    async fn metric_once(&self, op: &MetricOp) -> Result<(bool, String), Failure> {
        let wanted = self.text(&op.value)?;
        let (cmp, number) = matcher::parse_comparison(&wanted)
            .ok_or_else(|| fail(format!("`{wanted}` is not a comparison such as `>= 3`")))?;
        Ok(match self.metric_value(op).await {
            Ok(Some(value)) => (
                matcher::compare_number(cmp, value, number),
                format!("{} = {value}", op.name),
            ),
            Ok(None) => (false, format!("{} is not exposed", op.name)),
            Err(err) => (false, format!("scrape failed: {err}")),
        })
    }

    pub(super) async fn metric(&self, op: &MetricOp, timeout: Duration) -> OpResultT {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, seen) = self.metric_once(op).await?;
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Failure {
                    message: format!(
                        "metric {} did not reach `{}` within {}",
                        op.name,
                        op.value,
                        crate::duration::pretty(timeout)
                    ),
                    awaited: Some(format!(
                        "{} {} on {}",
                        op.name,
                        self.text(&op.value)?,
                        op.component.as_str()
                    )),
                    last_seen: Some(seen),
                    diff: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(super) fn record(&mut self, op: &RecordOp) -> OpResultT {
        let points = Arc::new(Mutex::new(Vec::new()));
        self.series.insert(op.name.clone(), points.clone());
        let interval: Duration = op.interval.unwrap_or(Dur::millis(250)).into();
        let started = self.started;
        let env = self.env.clone();
        let source = op.source;
        let component = op.component.unwrap_or(ComponentKind::Gateway);
        let metric = op.metric.clone().unwrap_or_default();
        let gateway = self.env.gateway().ok();
        self.samplers.push(tokio::spawn(async move {
            loop {
                let value = match source {
                    RecordSource::GatewayConnections => match &gateway {
                        Some(gateway) => connection_count(gateway).await,
                        None => None,
                    },
                    RecordSource::Metric => {
                        let target = ComponentTarget {
                            kind: component,
                            name: None,
                            cluster: None,
                        };
                        match env.metrics(target).await {
                            Ok(text) => prometheus_sum(&text, &metric, &BTreeMap::new()),
                            Err(_) => None,
                        }
                    }
                };
                // An unreachable gateway counts as zero connections (it is down).
                let value = value.unwrap_or(0.0);
                points
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((started.elapsed().as_secs_f64(), value));
                tokio::time::sleep(interval).await;
            }
        }));
        Ok(())
    }

    /// The `checkSeries` operation: checked until it passes or `within` ends.
    pub(super) async fn check_series_within(&self, op: &CheckSeriesOp) -> OpResultT {
        let deadline = Instant::now() + op.within.map(Duration::from).unwrap_or_default();
        loop {
            match self.check_series(op) {
                Err(failure) if Instant::now() < deadline => {
                    let _ = failure;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                res => break res,
            }
        }
    }

    fn check_series(&self, op: &CheckSeriesOp) -> OpResultT {
        let points = self
            .series
            .get(&op.name)
            .ok_or_else(|| fail(format!("no series `{}`", op.name)))?;
        let points = points.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(max_rise) = &op.max_rise_per_second {
            let max_rise = self.count(max_rise)? as f64;
            let rise = max_rise_per_second(&points);
            if rise > max_rise {
                return Err(Failure {
                    message: format!(
                        "series {} rose by {rise} within one second (limit {max_rise})",
                        op.name
                    ),
                    awaited: Some(format!("at most {max_rise} per second")),
                    last_seen: Some(format!("{} samples; max rise {rise}", points.len())),
                    diff: None,
                });
            }
        }
        if let Some(at_least) = &op.final_at_least {
            let wanted = self.count(at_least)? as f64;
            let last = points.last().map_or(0.0, |p| p.1);
            if last < wanted {
                return Err(Failure {
                    message: format!(
                        "series {} ended at {last}, expected at least {wanted}",
                        op.name
                    ),
                    awaited: Some(format!("at least {wanted}")),
                    last_seen: Some(format!("{last}")),
                    diff: None,
                });
            }
        }
        Ok(())
    }

    pub(super) async fn consistently(
        &mut self,
        op: &ConsistentlyOp,
        timeouts: &Timeouts,
    ) -> OpResultT {
        let interval: Duration = op.interval.unwrap_or(Dur::millis(250)).into();
        let total: Duration = op.for_.into();
        let started = Instant::now();
        let request_timeout: Duration = timeouts
            .get(TimeoutKind::Request)
            .unwrap_or(Dur::secs(10))
            .into();
        let mut checks = 0u64;
        loop {
            let elapsed = started.elapsed();
            if let Err(failure) = self.holds(op, elapsed, request_timeout).await? {
                return Err(Failure {
                    message: format!(
                        "stopped holding after {} (check {}, needed {}): {}",
                        crate::duration::pretty(elapsed),
                        checks + 1,
                        crate::duration::pretty(total),
                        failure.message
                    ),
                    ..failure
                });
            }
            checks += 1;
            if started.elapsed() >= total {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// One check of `consistently`: the inner result is whether the check held.
    async fn holds(
        &self,
        op: &ConsistentlyOp,
        elapsed: Duration,
        request_timeout: Duration,
    ) -> Result<OpResultT, Failure> {
        if let Some(assert) = &op.assert {
            let expected = self.load_objects(&assert.object, &assert.file, &self.bindings)?;
            for expected in &expected {
                if let Err(closest) = self.check_objects(assert.cluster, expected).await? {
                    return Ok(Err(Self::assertion_failure(
                        "keep matching",
                        expected,
                        closest,
                        elapsed,
                    )));
                }
            }
        }
        if let Some(error) = &op.error {
            let expected = self.load_objects(&error.object, &error.file, &self.bindings)?;
            for expected in &expected {
                if let Ok(found) = self.check_objects(error.cluster, expected).await? {
                    return Ok(Err(Failure {
                        message: "an object matched that must not".into(),
                        last_seen: Some(yaml(&found)),
                        ..Failure::default()
                    }));
                }
            }
        }
        if let Some(request) = &op.request {
            let bound = self.bound_request(request)?;
            let gateway = self.gateway()?;
            let timeout = request
                .timeout
                .map(Duration::from)
                .unwrap_or(request_timeout);
            if let Err(failure) = request_once(&gateway, &bound, timeout).await {
                return Ok(Err(failure));
            }
        }
        if let Some(metric) = &op.metric {
            let (ok, seen) = self.metric_once(metric).await?;
            if !ok {
                return Ok(Err(Failure {
                    message: format!("metric {} no longer {}", metric.name, metric.value),
                    last_seen: Some(seen),
                    ..Failure::default()
                }));
            }
        }
        Ok(Ok(()))
    }
}

async fn watch_until(
    gateway: &GatewayAccess,
    path: &str,
    expected: &[(String, Option<Value>)],
    timeout: Duration,
) -> OpResultT {
    let url = format!("{}{path}", gateway.base_url);
    let mut seen: Vec<String> = Vec::new();
    let mut next = 0usize;
    let work = async {
        let res = gateway
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(format!("GET {path}: {e}")))?;
        if !res.status().is_success() {
            let status = res.status();
            let text = res.text().await.unwrap_or_default();
            return Err(Failure {
                message: format!("GET {path}: status {status}"),
                last_seen: Some(text),
                ..Failure::default()
            });
        }
        let mut stream = res.bytes_stream();
        let mut lines = buildplane_runtime::LineBuffer::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(format!("watch stream broke: {e}")))?;
            lines.push(&chunk);
            while let Some(line) = lines.next_line() {
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if event_matches(&event, &expected[next], &mut seen) {
                    next += 1;
                    if next == expected.len() {
                        return Ok(());
                    }
                }
            }
        }
        Err(fail(
            "the watch stream ended before every expected event arrived",
        ))
    };
    let res = tokio::time::timeout(timeout, work).await;
    let describe = |failure: Failure| Failure {
        awaited: Some(format!(
            "events in order: {}",
            expected
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        last_seen: Some(format!(
            "matched {next} of {}; events seen: {}",
            expected.len(),
            seen.join(", ")
        )),
        ..failure
    };
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(failure)) => Err(describe(failure)),
        Err(_) => Err(describe(fail(format!(
            "not every event arrived within {}",
            crate::duration::pretty(timeout)
        )))),
    }
}

/// Whether a watch event is the one awaited next; every event goes into `seen`.
fn event_matches(
    event: &Value,
    (want_kind, want_object): &(String, Option<Value>),
    seen: &mut Vec<String>,
) -> bool {
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = event
        .pointer("/object/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    seen.push(format!("{kind} {name}"));
    let object_ok = want_object
        .as_ref()
        .is_none_or(|o| matcher::matches(o, event.get("object").unwrap_or(&Value::Null)));
    *want_kind == kind && object_ok
}

/// Number of live connections in the gateway's `/api/v1/connections` answer.
async fn connection_count(gateway: &GatewayAccess) -> Option<f64> {
    let url = format!("{}/api/v1/connections", gateway.base_url);
    let res = gateway
        .client
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let value: Value = res.json().await.ok()?;
    count_connections(&value)
}

/// Reads a connection count out of the connection table in its likely shapes.
pub fn count_connections(value: &Value) -> Option<f64> {
    match value {
        Value::Array(items) => Some(items.len() as f64),
        Value::Object(map) => {
            for key in ["connections", "items"] {
                if let Some(Value::Array(items)) = map.get(key) {
                    return Some(items.len() as f64);
                }
            }
            map.get("total").and_then(Value::as_f64)
        }
        _ => None,
    }
}

/// Sum of the samples of a metric (exact name, or with `_total`) whose labels match.
pub fn prometheus_sum(text: &str, name: &str, labels: &BTreeMap<String, String>) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line.rfind('}') else {
                    continue;
                };
                (
                    &line[..open],
                    Some((&line[open + 1..close], line[close + 1..].trim())),
                )
            }
            None => (line.split_whitespace().next().unwrap_or_default(), None),
        };
        if series != name && series != format!("{name}_total") {
            continue;
        }
        let (label_text, value_text) = match rest {
            Some((labels, value)) => (labels, value),
            None => ("", line[series.len()..].trim()),
        };
        let parsed: BTreeMap<&str, &str> = label_text
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if !labels
            .iter()
            .all(|(k, v)| parsed.get(k.as_str()) == Some(&v.as_str()))
        {
            continue;
        }
        let Some(value) = value_text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *sum.get_or_insert(0.0) += value;
    }
    sum
}

/// The largest increase of a series within any one-second window (across a gap of more than
/// a second between samples, the increase divided by the gap).
pub fn max_rise_per_second(points: &[(f64, f64)]) -> f64 {
    let mut best = 0.0f64;
    for pair in points.windows(2) {
        let dt = pair[1].0 - pair[0].0;
        if dt > 1.0 {
            best = best.max((pair[1].1 - pair[0].1) / dt);
        }
    }
    let mut start = 0usize;
    for end in 0..points.len() {
        while points[end].0 - points[start].0 > 1.0 {
            start += 1;
        }
        let window_min = points[start..=end]
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min);
        best = best.max(points[end].1 - window_min);
    }
    best
}

/// Lint rules of this family (called from [`Linter::operation`]).
impl Linter<'_> {
    pub(crate) fn watch(&mut self, path: &[Seg], op: &WatchOp) {
        self.check_refs(&with(path, "path"), &op.path, &[]);
        if let Some(name) = &op.background {
            self.backgrounds.insert(name.clone());
        }
    }

    pub(crate) fn metric(&mut self, path: &[Seg], op: &MetricOp) {
        self.check_refs(&with(path, "value"), &op.value, &[]);
        if !op.value.contains("$(") && matcher::parse_comparison(&op.value).is_none() {
            self.error(
                &with(path, "value"),
                format!("`{}` is not a comparison such as `>= 3`", op.value),
            );
        }
    }

    pub(crate) fn record(&mut self, op: &RecordOp) {
        self.series.insert(op.name.clone());
    }

    pub(crate) fn check_series(&mut self, path: &[Seg], op: &CheckSeriesOp) {
        if !self.series.contains(&op.name) {
            self.error(
                &with(path, "name"),
                format!("no earlier `record` names the series `{}`", op.name),
            );
        }
    }

    pub(crate) fn consistently(&mut self, path: &[Seg], op: &ConsistentlyOp) {
        let n_checks = [
            op.assert.is_some(),
            op.error.is_some(),
            op.request.is_some(),
            op.metric.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count();
        if n_checks != 1 {
            self.error(
                path,
                "give exactly one of `assert`, `error`, `request`, `metric`",
            );
        }
        if let Some(assert) = op.assert.as_ref().or(op.error.as_ref()) {
            self.assert(path, assert);
        }
        if let Some(request) = &op.request {
            self.request(&with(path, "request"), request);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Metric sums follow names (with `_total`) and label filters.
    #[test]
    fn sums_prometheus_samples() {
        let text = "# HELP x\ngw_connections{plane=\"a\"} 3\ngw_connections{plane=\"b\"} 4\ngw_handshakes_total 10\n";
        assert_eq!(
            prometheus_sum(text, "gw_connections", &BTreeMap::new()),
            Some(7.0)
        );
        let filter = BTreeMap::from([("plane".to_string(), "b".to_string())]);
        assert_eq!(prometheus_sum(text, "gw_connections", &filter), Some(4.0));
        assert_eq!(
            prometheus_sum(text, "gw_handshakes", &BTreeMap::new()),
            Some(10.0)
        );
        assert_eq!(prometheus_sum(text, "missing", &BTreeMap::new()), None);
    }

    /// The rise per second looks at one-second windows, not the whole series.
    #[test]
    fn measures_rise_per_second() {
        let points = [
            (0.0, 0.0),
            (0.5, 50.0),
            (1.0, 100.0),
            (1.5, 120.0),
            (2.0, 130.0),
            (5.0, 1000.0),
        ];
        assert_eq!(max_rise_per_second(&points[..5]), 100.0);
        assert_eq!(max_rise_per_second(&points), 290.0);
    }

    /// Connection tables are counted in their likely shapes.
    #[test]
    fn counts_connections_in_any_shape() {
        assert_eq!(count_connections(&json!([1, 2])), Some(2.0));
        assert_eq!(count_connections(&json!({"connections": [1]})), Some(1.0));
        assert_eq!(count_connections(&json!({"total": 7})), Some(7.0));
    }
}
