//! Loading and linting scenario files: every mistake names the file, the line and the field.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::bindings::references;
use crate::scenario::{
    ApplyOp, AssertOp, ComponentKind, ComponentOp, Count, Operation, RequestOp, Scenario,
};

/// Bindings every scenario has without declaring them.
pub const BUILTIN_BINDINGS: [&str; 7] = [
    "namespace",
    "planeID",
    "run",
    "controlContext",
    "buildContext",
    "kubeconfig",
    "profile",
];

/// One problem in a scenario file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Field path such as `steps[2].try[0].apply.object`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A parsed scenario with its origin.
#[derive(Clone, Debug)]
pub struct LoadedScenario {
    /// The parsed scenario.
    pub scenario: Scenario,
    /// Where it came from.
    pub path: PathBuf,
}

/// A field path segment.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Column and text of a line's content after any `- ` list markers.
fn content(line: &str) -> (usize, &str) {
    let mut col = line.len() - line.trim_start().len();
    let mut text = line.trim_start();
    while let Some(rest) = text.strip_prefix("- ") {
        let extra = rest.len() - rest.trim_start().len();
        col += 2 + extra;
        text = rest.trim_start();
    }
    (col, text)
}

fn significant(line: &str) -> bool {
    let trimmed = line.trim_start();
    !trimmed.is_empty() && !trimmed.starts_with('#')
}

/// Finds the 1-based line of a field path in block-style YAML (best effort).
fn locate(text: &str, path: &[Seg]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let (mut start, mut end) = (0usize, lines.len());
    let mut parent_col: isize = -1;
    let mut found = None;
    for seg in path {
        match seg {
            Seg::Key(key) => {
                let wanted = format!("{key}:");
                // A key written in flow style (`{name: x}`) has no line of its own: stop at the
                // deepest line found.
                let Some(position) = (start..end).find(|&i| {
                    let (col, body) = content(lines[i]);
                    significant(lines[i]) && col as isize > parent_col && body.starts_with(&wanted)
                }) else {
                    break;
                };
                let (col, _) = content(lines[position]);
                let block_end = (position + 1..end)
                    .find(|&i| {
                        significant(lines[i])
                            && content(lines[i]).0 <= col
                            && !lines[i].trim_start().starts_with("- ")
                            || {
                                significant(lines[i])
                                    && (lines[i].len() - lines[i].trim_start().len()) < col
                            }
                    })
                    .unwrap_or(end);
                start = position;
                end = block_end;
                parent_col = col as isize;
                found = Some(position);
            }
            Seg::Index(n) => {
                let dashes: Vec<usize> = (start..end)
                    .filter(|&i| {
                        let indent = lines[i].len() - lines[i].trim_start().len();
                        lines[i].trim_start().starts_with("- ") && indent as isize >= parent_col
                    })
                    .collect();
                let Some(min_indent) = dashes
                    .iter()
                    .map(|&i| lines[i].len() - lines[i].trim_start().len())
                    .min()
                else {
                    break;
                };
                let items: Vec<usize> = dashes
                    .into_iter()
                    .filter(|&i| lines[i].len() - lines[i].trim_start().len() == min_indent)
                    .collect();
                let Some(&position) = items.get(*n) else {
                    break;
                };
                start = position;
                end = items.get(n + 1).copied().unwrap_or(end);
                parent_col = min_indent as isize;
                found = Some(position);
            }
        }
    }
    found.map(|i| i + 1)
}

/// Splits serde_yaml's `path: message at line L column C` into (path, message).
fn split_serde_message(message: &str) -> (String, String) {
    let message = match message.rfind(" at line ") {
        Some(pos) => &message[..pos],
        None => message,
    };
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && !path.is_empty() => {
            (path.to_string(), rest.to_string())
        }
        _ => (String::new(), message.to_string()),
    }
}

/// Parses a scenario from text; errors carry `file` for display.
pub fn parse(file: &Path, text: &str) -> Result<Scenario, Vec<LintError>> {
    serde_yaml::from_str::<Scenario>(text).map_err(|err| {
        let (field, message) = split_serde_message(&err.to_string());
        vec![LintError {
            file: file.to_path_buf(),
            line: err.location().map(|l| l.line()),
            field,
            message,
        }]
    })
}

/// Reads, parses and lints one file.
pub fn load(path: &Path) -> Result<LoadedScenario, Vec<LintError>> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        vec![LintError {
            file: path.to_path_buf(),
            line: None,
            field: String::new(),
            message: format!("cannot read: {err}"),
        }]
    })?;
    let scenario = parse(path, &text)?;
    let errors = lint(path, &text, &scenario);
    if errors.is_empty() {
        Ok(LoadedScenario {
            scenario,
            path: path.to_path_buf(),
        })
    } else {
        Err(errors)
    }
}

/// Loads every `*.yaml` in a directory, sorted by name; returns the scenarios and all errors.
pub fn load_dir(dir: &Path) -> (Vec<LoadedScenario>, Vec<LintError>) {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect(),
        Err(err) => {
            return (
                Vec::new(),
                vec![LintError {
                    file: dir.to_path_buf(),
                    line: None,
                    field: String::new(),
                    message: format!("cannot list: {err}"),
                }],
            );
        }
    };
    paths.sort();
    let mut scenarios = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match load(&path) {
            Ok(loaded) => scenarios.push(loaded),
            Err(errs) => errors.extend(errs),
        }
    }
    let mut names = BTreeSet::new();
    for loaded in &scenarios {
        if !names.insert(loaded.scenario.name.clone()) {
            errors.push(LintError {
                file: loaded.path.clone(),
                line: Some(1),
                field: "name".into(),
                message: format!("duplicate scenario name `{}`", loaded.scenario.name),
            });
        }
    }
    (scenarios, errors)
}

struct Linter<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<LintError>,
    known: BTreeSet<String>,
    backgrounds: BTreeSet<String>,
    series: BTreeSet<String>,
    agents: BTreeSet<String>,
    /// Gateway replicas of the scenario (`gatewayReplicas`).
    replicas: u32,
    /// Replicas a `partition` cut off so far (a replica's `heal` needs one).
    partitioned: BTreeSet<String>,
}

impl Linter<'_> {
    /// A gateway replica named in `partition` or `heal`: `gateway` and `gateway-<n>` of the
    /// scenario's replicas.
    fn replica(&mut self, path: &[Seg], component: Option<ComponentKind>, name: &str) {
        if component != Some(ComponentKind::Gateway) {
            self.error(
                &with(path, "component"),
                "only a gateway replica is partitioned (`component: gateway`)",
            );
        }
        let index = name
            .strip_prefix("gateway-")
            .and_then(|n| n.parse::<u32>().ok());
        if self.replicas <= 1 {
            self.error(
                path,
                "partitioning a replica needs `gatewayReplicas` above 1 (a single gateway is cut off with `fault: {link: ..., partition: true}`)",
            );
        } else if index.is_none_or(|i| i >= self.replicas) {
            self.error(
                &with(path, "name"),
                format!(
                    "`{name}` is not a replica of this scenario (gateway-0 .. gateway-{})",
                    self.replicas - 1
                ),
            );
        }
    }

    fn error(&mut self, path: &[Seg], message: impl Into<String>) {
        self.errors.push(LintError {
            file: self.file.to_path_buf(),
            line: locate(self.text, path),
            field: render(path),
            message: message.into(),
        });
    }

    fn check_refs_in_value(&mut self, path: &[Seg], value: &Value, extra: &[&str]) {
        let mut texts = Vec::new();
        collect_strings(value, &mut texts);
        for text in texts {
            self.check_refs(path, &text, extra);
        }
    }

    fn check_refs(&mut self, path: &[Seg], text: &str, extra: &[&str]) {
        for name in references(text) {
            if !self.known.contains(&name) && !extra.contains(&name.as_str()) {
                let known = self.known.iter().cloned().collect::<Vec<_>>().join(", ");
                self.error(
                    path,
                    format!("unknown binding `$({name})` (known here: {known})"),
                );
            }
        }
    }

    fn objects(&mut self, path: &[Seg], object: &Option<Value>, file: &Option<String>) {
        match (object, file) {
            (Some(_), Some(_)) => self.error(path, "give either `object` or `file`, not both"),
            (None, None) => self.error(path, "missing `object` or `file`"),
            (None, Some(file)) => {
                let base = self.file.parent().unwrap_or(Path::new("."));
                if !file.contains("$(") && !base.join(file).exists() {
                    self.error(
                        &with(path, "file"),
                        format!("file `{file}` does not exist (relative to the scenario)"),
                    );
                }
            }
            (Some(_), None) => {}
        }
    }

    fn apply(&mut self, path: &[Seg], op: &ApplyOp) {
        self.objects(path, &op.object, &op.file);
        let mut extra = vec![];
        if op.for_each.is_some() && op.count.is_some() {
            self.error(path, "give either `forEach` or `count`, not both");
        }
        if let Some(for_each) = &op.for_each {
            self.check_refs(&with(path, "forEach"), for_each, &[]);
            extra = vec!["item", "index"];
        }
        if let Some(count) = &op.count {
            if let Count::Bound(text) = count {
                self.check_refs(&with(path, "count"), text, &[]);
            }
            extra = vec!["index"];
        }
        if let Some(object) = &op.object {
            self.check_refs_in_value(&with(path, "object"), object, &extra);
            if object.get("apiVersion").is_none() || object.get("kind").is_none() {
                self.error(
                    &with(path, "object"),
                    "the object needs `apiVersion` and `kind`",
                );
            }
        }
    }

    fn assert(&mut self, path: &[Seg], op: &AssertOp) {
        self.objects(path, &op.object, &op.file);
        if let Some(object) = &op.object {
            self.check_refs_in_value(&with(path, "object"), object, &[]);
            if object.get("apiVersion").is_none() || object.get("kind").is_none() {
                self.error(
                    &with(path, "object"),
                    "the expected object needs `apiVersion` and `kind`",
                );
            }
        }
    }

    fn request(&mut self, path: &[Seg], op: &RequestOp) {
        self.check_refs(&with(path, "path"), &op.path, &[]);
        if let Some(body) = &op.body {
            self.check_refs_in_value(&with(path, "body"), body, &[]);
        }
        if let Some(body) = &op.expect.body {
            self.check_refs_in_value(&with(path, "expect"), body, &[]);
        }
        if !op.path.starts_with('/') {
            self.error(&with(path, "path"), "the path must start with `/`");
        }
    }

    fn component(&mut self, path: &[Seg], op: &ComponentOp, starting: bool) {
        let Some(kind) = op.component else {
            self.error(
                path,
                "missing `component` (agent, apiserver, controller, gateway or swarm)",
            );
            return;
        };
        if matches!(kind, ComponentKind::Agent | ComponentKind::Swarm) && op.name.is_none() {
            self.error(path, format!("`{}` needs a `name`", kind.as_str()));
        }
        if kind == ComponentKind::Apiserver && op.cluster.is_none() {
            self.error(path, "`apiserver` needs a `cluster`");
        }
        if starting && kind == ComponentKind::Agent {
            let name = op.name.clone().unwrap_or_default();
            if op.plane_id.is_some() {
                self.agents.insert(name);
            } else if !self.agents.contains(&name) {
                self.error(path, "starting a new agent needs `planeID` (only a stopped agent restarts without one)");
            }
        }
        if starting
            && kind == ComponentKind::Swarm
            && (op.count.is_none() || op.plane_id_prefix.is_none())
        {
            self.error(path, "starting a swarm needs `count` and `planeIDPrefix`");
        }
        for text in [
            &op.plane_id,
            &op.plane_id_prefix,
            &op.name,
            &op.identity_namespace,
        ]
        .into_iter()
        .flatten()
        {
            self.check_refs(path, text, &[]);
        }
        if let Some(Count::Bound(text)) = &op.count {
            self.check_refs(&with(path, "count"), text, &[]);
        }
        for arg in &op.args {
            self.check_refs(&with(path, "args"), arg, &[]);
        }
        if let Some(output) = &op.output {
            self.known.insert(output.clone());
        }
    }

    fn operation(&mut self, path: &[Seg], op: &Operation) {
        let path = with(path, op.kind());
        match op {
            Operation::Apply(op) | Operation::Create(op) | Operation::Patch(op) => {
                self.apply(&path, op)
            }
            Operation::Assert(op) | Operation::Error(op) => self.assert(&path, op),
            Operation::Await(op) => {
                if !self.backgrounds.contains(&op.name) {
                    self.error(
                        &with(&path, "name"),
                        format!(
                            "no earlier operation runs in the background as `{}`",
                            op.name
                        ),
                    );
                }
            }
            Operation::CheckSeries(op) => {
                if !self.series.contains(&op.name) {
                    self.error(
                        &with(&path, "name"),
                        format!("no earlier `record` names the series `{}`", op.name),
                    );
                }
            }
            Operation::Consistently(op) => {
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
                        &path,
                        "give exactly one of `assert`, `error`, `request`, `metric`",
                    );
                }
                if let Some(assert) = op.assert.as_ref().or(op.error.as_ref()) {
                    self.assert(&path, assert);
                }
                if let Some(request) = &op.request {
                    self.request(&with(&path, "request"), request);
                }
            }
            Operation::Delete(op) => {
                self.objects(&path, &op.object, &op.file);
                if let Some(object) = &op.object {
                    self.check_refs_in_value(&with(&path, "object"), object, &[]);
                }
            }
            Operation::Exec(op) => {
                if op.command.is_empty() {
                    self.error(&with(&path, "command"), "the command is empty");
                }
                for arg in &op.command {
                    self.check_refs(&with(&path, "command"), arg, &[]);
                }
                if let Some(output) = &op.output {
                    self.known.insert(output.clone());
                }
            }
            Operation::Fault(op) => {
                let n_faults = [
                    op.latency.is_some(),
                    op.bandwidth_kbps.is_some(),
                    op.blackhole,
                    op.reset,
                    op.slicer.is_some(),
                    op.partition,
                ]
                .into_iter()
                .filter(|set| *set)
                .count();
                if n_faults == 0 {
                    self.error(&path, "a fault needs at least one of latency, bandwidthKbps, blackhole, reset, slicer, partition");
                }
                if op.jitter.is_some() && op.latency.is_none() {
                    self.error(&with(&path, "jitter"), "`jitter` needs `latency`");
                }
            }
            Operation::Heal(op) => match (&op.link, op.component, &op.name) {
                (Some(_), None, None) => {}
                (None, component, Some(name)) => {
                    self.replica(&path, component, name);
                    if !self.partitioned.contains(name) {
                        self.error(
                            &with(&path, "name"),
                            format!("no earlier `partition` of `{name}` to heal"),
                        );
                    }
                }
                _ => self.error(
                    &path,
                    "give `link` (a link's faults), or `component: gateway` and `name` (a replica's partition)",
                ),
            },
            Operation::Partition(op) => {
                self.replica(&path, Some(op.component), &op.name);
                self.partitioned.insert(op.name.clone());
            }
            Operation::Sleep(_) => {}
            Operation::GenerateCa(op) => {
                self.known.insert(op.output.clone());
            }
            Operation::Kill(op) | Operation::Stop(op) => self.component(&path, op, false),
            Operation::Restart(op) => self.component(&path, op, false),
            Operation::Start(op) => self.component(&path, op, true),
            Operation::Kubectl(op) => {
                match &op.args {
                    crate::scenario::Args::Line(line) => {
                        self.check_refs(&with(&path, "args"), line, &[])
                    }
                    crate::scenario::Args::List(list) => {
                        for arg in list {
                            self.check_refs(&with(&path, "args"), arg, &[]);
                        }
                    }
                }
                if let Some(stdin) = &op.stdin {
                    self.check_refs(&with(&path, "stdin"), stdin, &[]);
                }
                if let Some(output) = &op.output {
                    self.known.insert(output.clone());
                }
            }
            Operation::Load(op) => {
                if op.paths.is_empty() {
                    self.error(&with(&path, "paths"), "give at least one path");
                }
                for p in &op.paths {
                    self.check_refs(&with(&path, "paths"), p, &[]);
                }
                if op.rate <= 0.0 {
                    self.error(&with(&path, "rate"), "the rate must be positive");
                }
                match &op.background {
                    Some(name) => {
                        self.backgrounds.insert(name.clone());
                    }
                    None if op.duration.is_none() => {
                        self.error(&path, "a load in the foreground needs a `duration`")
                    }
                    None => {}
                }
            }
            Operation::Metric(op) => {
                self.check_refs(&with(&path, "value"), &op.value, &[]);
                if !op.value.contains("$(") && crate::matcher::parse_comparison(&op.value).is_none()
                {
                    self.error(
                        &with(&path, "value"),
                        format!("`{}` is not a comparison such as `>= 3`", op.value),
                    );
                }
            }
            Operation::Record(op) => {
                self.series.insert(op.name.clone());
            }
            Operation::RenewLeaf(_) => {}
            Operation::Request(op) => {
                self.request(&path, op);
                if let Some(name) = &op.background {
                    self.backgrounds.insert(name.clone());
                }
                if let Some(output) = &op.output {
                    self.known.insert(output.clone());
                }
            }
            Operation::RotateCa(op) => {
                if let Some(output) = &op.output {
                    self.known.insert(output.clone());
                }
            }
            Operation::Script(op) => {
                self.check_refs(&with(&path, "content"), &op.content, &[]);
                if let Some(output) = &op.output {
                    self.known.insert(output.clone());
                }
            }
            Operation::Watch(op) => {
                self.check_refs(&with(&path, "path"), &op.path, &[]);
                if let Some(name) = &op.background {
                    self.backgrounds.insert(name.clone());
                }
            }
        }
    }
}

fn with(path: &[Seg], key: &str) -> Vec<Seg> {
    let mut out = path.to_vec();
    out.push(Seg::Key(key.to_string()));
    out
}

fn at(path: &[Seg], index: usize) -> Vec<Seg> {
    let mut out = path.to_vec();
    out.push(Seg::Index(index));
    out
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            out.push(k.clone());
            collect_strings(v, out);
        }),
        _ => {}
    }
}

/// Checks what the schema cannot: names, references, exclusive fields, files.
pub fn lint(file: &Path, text: &str, scenario: &Scenario) -> Vec<LintError> {
    let mut linter = Linter {
        file,
        text,
        errors: Vec::new(),
        known: BUILTIN_BINDINGS.iter().map(|s| s.to_string()).collect(),
        backgrounds: BTreeSet::new(),
        series: BTreeSet::new(),
        agents: BTreeSet::new(),
        replicas: scenario.gateway_replicas,
        partitioned: BTreeSet::new(),
    };
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if !stem.is_empty() && scenario.name != stem {
        linter.error(
            &[Seg::Key("name".into())],
            format!(
                "the name `{}` differs from the file name `{stem}`",
                scenario.name
            ),
        );
    }
    if !scenario.description.to_lowercase().contains("fail") {
        linter.error(
            &[Seg::Key("description".into())],
            "the description must say how the scenario was seen to fail when the behaviour it guards is broken",
        );
    }
    if scenario.steps.is_empty() {
        linter.error(
            &[Seg::Key("steps".into())],
            "a scenario needs at least one step",
        );
    }
    let needed = scenario.needed_capabilities();
    let unneeded: Vec<String> = scenario
        .requires
        .iter()
        .filter(|c| !needed.contains(c))
        .map(|c| c.to_string())
        .collect();
    if !unneeded.is_empty() {
        linter.error(
            &[Seg::Key("requires".into())],
            format!(
                "no operation needs {}: it would skip the scenario on backends that could run it",
                unneeded.join(", ")
            ),
        );
    }
    let undeclared: Vec<String> = needed
        .into_iter()
        .filter(|c| !scenario.requires.contains(c))
        .map(|c| c.to_string())
        .collect();
    if !undeclared.is_empty() {
        linter.error(
            &[Seg::Key("name".into())],
            format!(
                "its operations need {}: declare `requires: [{}]`, so backends without it skip the scenario instead of failing it",
                undeclared.join(", "),
                undeclared.join(", ")
            ),
        );
    }
    for (name, value) in &scenario.bindings {
        let path = vec![Seg::Key("bindings".into()), Seg::Key(name.clone())];
        linter.check_refs_in_value(&path, value, &[]);
        linter.known.insert(name.clone());
    }
    for (profile, values) in &scenario.profiles {
        for name in values.keys() {
            if !scenario.bindings.contains_key(name) {
                linter.error(
                    &[
                        Seg::Key("profiles".into()),
                        Seg::Key(profile.clone()),
                        Seg::Key(name.clone()),
                    ],
                    format!(
                        "profile `{profile}` overrides `{name}`, which `bindings` does not declare"
                    ),
                );
            }
        }
    }
    for (i, step) in scenario.steps.iter().enumerate() {
        let step_path = at(&[Seg::Key("steps".into())], i);
        for (name, value) in &step.bindings {
            linter.check_refs_in_value(&with(&with(&step_path, "bindings"), name), value, &[]);
            linter.known.insert(name.clone());
        }
        if step.try_.is_empty() {
            linter.error(
                &with(&step_path, "try"),
                "`try` needs at least one operation",
            );
        }
        for (section, ops) in [
            ("try", &step.try_),
            ("catch", &step.catch),
            ("finally", &step.finally),
        ] {
            for (j, op) in ops.iter().enumerate() {
                linter.operation(&at(&with(&step_path, section), j), op);
            }
        }
    }
    linter.errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint_text(text: &str) -> Vec<LintError> {
        let file = Path::new("scenarios/demo.yaml");
        match parse(file, text) {
            Ok(scenario) => lint(file, text, &scenario),
            Err(errors) => errors,
        }
    }

    const GOOD: &str = "\
name: demo
description: Guards X. Seen to fail when X is broken.
labels: [fast]
steps:
  - name: one
    try:
      - apply:
          object:
            apiVersion: v1
            kind: ConfigMap
            metadata: {name: a, namespace: $(namespace)}
      - assert:
          timeout: 5s
          object:
            apiVersion: v1
            kind: ConfigMap
            metadata: {name: a}
";

    /// A well-formed scenario has no lint errors.
    #[test]
    fn accepts_a_well_formed_scenario() {
        assert_eq!(lint_text(GOOD), vec![]);
    }

    /// A misspelt field is reported with its line and path.
    #[test]
    fn names_line_and_field_of_unknown_fields() {
        let text = GOOD.replace("timeout: 5s", "timeot: 5s");
        let errors = lint_text(&text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(13), "{}", errors[0]);
        assert!(errors[0].field.contains("steps[0].try[1]"), "{}", errors[0]);
        assert!(errors[0].message.contains("timeot"), "{}", errors[0]);
    }

    /// An unknown operation is reported with the list of known ones.
    #[test]
    fn reports_unknown_operations() {
        let text = GOOD.replace("      - apply:", "      - aply:");
        let errors = lint_text(&text);
        assert_eq!(errors[0].line, Some(7), "{}", errors[0]);
        assert!(errors[0].message.contains("aply"), "{}", errors[0]);
    }

    /// A bad duration names the field.
    #[test]
    fn reports_bad_durations() {
        let errors = lint_text(&GOOD.replace("timeout: 5s", "timeout: 5"));
        assert!(
            errors[0].to_string().contains("invalid duration `5`"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[0].line, Some(13));
    }

    /// A typo in a binding is found by lint, with its line, before anything runs.
    #[test]
    fn reports_unknown_bindings_with_line() {
        let errors = lint_text(&GOOD.replace("$(namespace)", "$(namspace)"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "steps[0].try[0].apply.object");
        assert_eq!(errors[0].line, Some(8), "{}", errors[0]);
        assert!(errors[0].message.contains("namspace"));
    }

    /// Semantic rules: the name matches the file and the description says how it fails.
    #[test]
    fn requires_matching_name_and_failure_description() {
        let errors = lint_text(
            &GOOD
                .replace("name: demo", "name: other")
                .replace("Seen to fail when X is broken.", ""),
        );
        let fields: Vec<_> = errors.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(fields, vec![("name", Some(1)), ("description", Some(2))]);
    }

    /// A scenario declares the capabilities its operations need, and no more: a fault without
    /// `requires: [linkFaults]` would fail on k3d instead of being skipped there.
    #[test]
    fn requires_declared_capabilities_and_no_more() {
        let with_fault = GOOD.replace(
            "      - assert:",
            "      - fault: {link: bp, latency: 1s}\n      - assert:",
        );
        let errors = lint_text(&with_fault);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0]
                .message
                .contains("declare `requires: [linkFaults]`"),
            "{}",
            errors[0]
        );
        let declared =
            with_fault.replace("labels: [fast]", "labels: [fast]\nrequires: [linkFaults]");
        assert_eq!(lint_text(&declared), vec![]);
        let extra = GOOD.replace(
            "labels: [fast]",
            "labels: [fast]\nrequires: [apiServerLifecycle]",
        );
        let errors = lint_text(&extra);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "requires");
        assert!(
            errors[0]
                .message
                .contains("no operation needs apiServerLifecycle")
        );
    }

    /// A partition names a replica of the scenario and needs `replicaPartitions`; a replica's
    /// heal needs an earlier partition of it; a heal is a link's or a replica's, not both.
    #[test]
    fn partitions_name_replicas_and_heal_them() {
        let replicated = GOOD.replace(
            "labels: [fast]",
            "labels: [fast]\ngatewayReplicas: 3\nrequires: [gatewayReplicas, replicaPartitions]",
        );
        let ops =
            |ops: &str| replicated.replace("      - assert:", &format!("{ops}      - assert:"));
        let good = ops(
            "      - partition: {component: gateway, name: gateway-1, from: agents}\n      - heal: {component: gateway, name: gateway-1}\n",
        );
        assert_eq!(lint_text(&good), vec![]);
        let undeclared = good.replace(", replicaPartitions]", "]");
        let errors = lint_text(&undeclared);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].message.contains("replicaPartitions"),
            "{}",
            errors[0]
        );
        let errors = lint_text(&ops(
            "      - partition: {component: gateway, name: gateway-3}\n      - heal: {component: gateway, name: gateway-3}\n",
        ));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].message.contains("not a replica"), "{}", errors[0]);
        let errors = lint_text(&ops(
            "      - heal: {component: gateway, name: gateway-0}\n",
        ));
        assert!(
            errors
                .iter()
                .any(|e| e.message.contains("no earlier `partition`")),
            "{errors:?}"
        );
        let errors = lint_text(&ops(
            "      - partition: {component: agent, name: gateway-0}\n",
        ));
        assert!(
            errors
                .iter()
                .any(|e| e.message.contains("only a gateway replica")),
            "{errors:?}"
        );
        let errors = lint_text(&ops(
            "      - heal: {link: bp, component: gateway, name: gateway-0}\n",
        ));
        assert!(
            errors.iter().any(|e| e.message.contains("give `link`")),
            "{errors:?}"
        );
    }

    /// `await` must refer to an earlier background operation.
    #[test]
    fn requires_await_to_follow_a_background_operation() {
        let text = format!("{GOOD}      - await: {{name: load}}\n");
        let errors = lint_text(&text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, Some(18));
        assert!(errors[0].message.contains("`load`"));
    }

    /// Outputs of earlier operations are bindings for later ones.
    #[test]
    fn outputs_become_bindings() {
        let text = GOOD.replace(
            "      - assert:",
            "      - kubectl: {cluster: build, args: get ns, output: ca}\n      - script: {content: echo $(ca)}\n      - assert:",
        );
        assert_eq!(lint_text(&text), vec![]);
    }

    /// The line locator finds keys inside list items and nested maps.
    #[test]
    fn locates_nested_paths() {
        let path = [
            Seg::Key("steps".into()),
            Seg::Index(0),
            Seg::Key("try".into()),
            Seg::Index(1),
            Seg::Key("assert".into()),
            Seg::Key("object".into()),
        ];
        assert_eq!(locate(GOOD, &path), Some(14));
    }
}
