//! Loading and linting scenario files: every mistake names the file, the line and the field.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::bindings::references;
use crate::scenario::{Operation, Scenario};

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
pub(crate) enum Seg {
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

/// The lint state of one scenario file; each operation's rules are methods in its family's
/// module of the engine (`engine/objects.rs`, `engine/components.rs`, ...).
pub(crate) struct Linter<'a> {
    pub(crate) file: &'a Path,
    text: &'a str,
    errors: Vec<LintError>,
    /// Bindings defined so far.
    pub(crate) known: BTreeSet<String>,
    /// Names of background operations started so far.
    pub(crate) backgrounds: BTreeSet<String>,
    /// Series recorded so far.
    pub(crate) series: BTreeSet<String>,
    /// Agents started so far.
    pub(crate) agents: BTreeSet<String>,
    /// Gateway replicas of the scenario (`gatewayReplicas`).
    pub(crate) replicas: u32,
    /// Replicas a `partition` cut off so far (a replica's `heal` needs one).
    pub(crate) partitioned: BTreeSet<String>,
}

impl Linter<'_> {
    pub(crate) fn error(&mut self, path: &[Seg], message: impl Into<String>) {
        self.errors.push(LintError {
            file: self.file.to_path_buf(),
            line: locate(self.text, path),
            field: render(path),
            message: message.into(),
        });
    }

    pub(crate) fn check_refs_in_value(&mut self, path: &[Seg], value: &Value, extra: &[&str]) {
        let mut texts = Vec::new();
        collect_strings(value, &mut texts);
        for text in texts {
            self.check_refs(path, &text, extra);
        }
    }

    pub(crate) fn check_refs(&mut self, path: &[Seg], text: &str, extra: &[&str]) {
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

    /// An operation's `output` becomes a binding for later operations.
    pub(crate) fn output(&mut self, output: &Option<String>) {
        if let Some(output) = output {
            self.known.insert(output.clone());
        }
    }

    /// Dispatches to the rules of the operation's family (in `engine/`).
    fn operation(&mut self, path: &[Seg], op: &Operation) {
        let path = with(path, op.kind());
        match op {
            // engine/objects.rs
            Operation::Apply(op) | Operation::Create(op) | Operation::Patch(op) => {
                self.apply(&path, op)
            }
            Operation::Assert(op) | Operation::Error(op) => self.assert(&path, op),
            Operation::Delete(op) => self.delete(&path, op),
            Operation::Exec(op) => self.exec(&path, op),
            Operation::Kubectl(op) => self.kubectl(&path, op),
            Operation::Script(op) => self.script(&path, op),
            // engine/components.rs
            Operation::Start(op) => self.component(&path, op, true),
            Operation::Kill(op) | Operation::Stop(op) | Operation::Restart(op) => {
                self.component(&path, op, false)
            }
            Operation::Fault(op) => self.fault(&path, op),
            Operation::Heal(op) => self.heal(&path, op),
            Operation::Partition(op) => self.partition(&path, op),
            Operation::GenerateCa(op) => {
                self.known.insert(op.output.clone());
            }
            Operation::RotateCa(op) => self.output(&op.output),
            Operation::RenewLeaf(_) | Operation::Sleep(_) => {}
            // engine/http.rs
            Operation::Request(op) => self.request_op(&path, op),
            Operation::Load(op) => self.load(&path, op),
            Operation::Await(op) => self.await_op(&path, op),
            // engine/watches.rs
            Operation::Watch(op) => self.watch(&path, op),
            Operation::Metric(op) => self.metric(&path, op),
            Operation::Record(op) => self.record(op),
            Operation::CheckSeries(op) => self.check_series(&path, op),
            Operation::Consistently(op) => self.consistently(&path, op),
        }
    }
}

pub(crate) fn with(path: &[Seg], key: &str) -> Vec<Seg> {
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
