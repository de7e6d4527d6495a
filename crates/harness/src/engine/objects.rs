//! Kubernetes objects and commands: `apply`, `create`, `patch`, `delete`, `assert`, `error`,
//! `kubectl`, `exec` and `script`, their execution and their lint rules.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    APPLY_CONCURRENCY, Created, Engine, OpResultT, POLL, fail, first_line, split_args, tail_text,
    yaml,
};
use crate::bindings::Bindings;
use crate::kube_ops::{Kube, KubeError, ObjectRef};
use crate::lint::{Linter, Seg, with};
use crate::matcher;
use crate::result::Failure;
use crate::scenario::{
    ApplyOp, Args, AssertOp, ClusterName, CommandExpect, Count, DeleteOp, ExecOp, KubectlOp,
    OutputFormat, ScriptOp,
};

/// Which kind of apply.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ApplyMode {
    Apply,
    Create,
    Patch,
}

/// What an apply sent and what the API server answered (`true`: the object was created).
type Applied = Vec<(Value, Result<bool, KubeError>)>;

impl Engine {
    /// Objects of an apply/assert, with bindings substituted.
    pub(super) fn load_objects(
        &self,
        object: &Option<Value>,
        file: &Option<String>,
        bindings: &Bindings,
    ) -> Result<Vec<Value>, Failure> {
        let raw = match (object, file) {
            (Some(object), _) => vec![object.clone()],
            (None, Some(file)) => {
                let path = self.scenario_dir.join(self.text(file)?);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
                let mut docs = Vec::new();
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let value = serde_json::to_value(
                        serde::Deserialize::deserialize(doc)
                            .map(|v: serde_yaml::Value| v)
                            .map_err(|e| fail(format!("{}: {e}", path.display())))?,
                    )
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                    if !value.is_null() {
                        docs.push(value);
                    }
                }
                docs
            }
            (None, None) => return Err(fail("no object given")),
        };
        raw.iter()
            .map(|v| bindings.substitute(v).map_err(|e| fail(e.to_string())))
            .collect()
    }

    /// The objects of an apply: one set, or one per `forEach` item or `count` index.
    fn expand_objects(&self, op: &ApplyOp) -> Result<Vec<Value>, Failure> {
        let mut expanded: Vec<Value> = Vec::new();
        if let Some(for_each) = &op.for_each {
            let list = self
                .bindings
                .substitute_str(for_each)
                .map_err(|e| fail(e.to_string()))?;
            let Value::Array(items) = list else {
                return Err(fail(format!("forEach `{for_each}` is not a list")));
            };
            for (index, item) in items.into_iter().enumerate() {
                let mut bindings = self.bindings.clone();
                bindings.set("item", item);
                bindings.set("index", json!(index));
                expanded.extend(self.load_objects(&op.object, &op.file, &bindings)?);
            }
        } else if let Some(count) = &op.count {
            for index in 0..self.count(count)? {
                let mut bindings = self.bindings.clone();
                bindings.set("index", json!(index));
                expanded.extend(self.load_objects(&op.object, &op.file, &bindings)?);
            }
        } else {
            expanded = self.load_objects(&op.object, &op.file, &self.bindings)?;
        }
        Ok(expanded)
    }

    pub(super) async fn apply(
        &mut self,
        op: &ApplyOp,
        mode: ApplyMode,
        timeout: Duration,
    ) -> OpResultT {
        let expanded = self.expand_objects(op)?;
        let kube = self.kube(op.cluster).await?;
        for object in &expanded {
            if let Some(namespace) = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                && mode != ApplyMode::Patch
            {
                self.ensure_namespace(op.cluster, namespace).await?;
            }
        }
        let results = send_objects(&kube, expanded, mode, timeout).await;
        self.applied(op, results)
    }

    /// Remembers what an apply created and checks the answers against `expectError`.
    fn applied(&mut self, op: &ApplyOp, results: Applied) -> OpResultT {
        let mut errors = Vec::new();
        for (object, res) in results {
            let reference = ObjectRef::of(&object).map_err(|e| fail(e.to_string()))?;
            if let Ok(true) = res {
                self.created.push(Created {
                    cluster: op.cluster,
                    reference: reference.clone(),
                });
            }
            match (res, &op.expect_error) {
                (Ok(_), None) => {}
                (Ok(_), Some(wanted)) => errors.push(Failure {
                    message: format!("{reference}: the API server accepted the object"),
                    awaited: Some(format!("a rejection containing `{wanted}`")),
                    last_seen: Some(yaml(&object)),
                    diff: None,
                }),
                (Err(err), Some(wanted)) if err.to_string().contains(wanted.as_str()) => {}
                (Err(err), Some(wanted)) => errors.push(Failure {
                    message: format!("{reference}: rejected, but not with the expected message"),
                    awaited: Some(format!("a rejection containing `{wanted}`")),
                    last_seen: Some(err.to_string()),
                    diff: None,
                }),
                (Err(err), None) => errors.push(fail(format!("{reference}: {err}"))),
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            n => {
                let mut first = errors.remove(0);
                first.message = format!("{} (and {} more objects failed)", first.message, n - 1);
                Err(first)
            }
        }
    }

    /// One check of an assertion: `Ok(None)` when it matches, else the closest object seen.
    pub(super) async fn check_objects(
        &self,
        cluster: ClusterName,
        expected: &Value,
    ) -> Result<Result<Value, Option<Value>>, Failure> {
        let kube = self.kube(cluster).await?;
        let reference = ObjectRef::of(expected).map_err(|e| fail(e.to_string()))?;
        let candidates = if reference.name.is_some() {
            match kube.get(&reference).await {
                Ok(found) => found.into_iter().collect(),
                Err(KubeError::Client(err)) => return Ok(Err(Some(json!({"error": err})))),
                Err(err) => return Err(fail(format!("reading {reference}: {err}"))),
            }
        } else {
            let labels = expected
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|labels| {
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            match kube.list(&reference, &labels).await {
                Ok(items) => items,
                Err(KubeError::Client(err)) => return Ok(Err(Some(json!({"error": err})))),
                Err(err) => return Err(fail(format!("listing {reference}: {err}"))),
            }
        };
        if let Some(found) = candidates.iter().find(|c| matcher::matches(expected, c)) {
            return Ok(Ok(found.clone()));
        }
        let closest = candidates
            .into_iter()
            .min_by_key(|c| matcher::mismatches(expected, c).len());
        Ok(Err(closest))
    }

    pub(super) fn assertion_failure(
        what: &str,
        expected: &Value,
        closest: Option<Value>,
        timeout: Duration,
    ) -> Failure {
        let reference = ObjectRef::of(expected)
            .map(|r| r.to_string())
            .unwrap_or_default();
        match closest {
            Some(actual) if actual.get("error").is_none() || actual.get("kind").is_some() => {
                let mismatches = matcher::mismatches(expected, &actual);
                Failure {
                    message: format!(
                        "{reference} did not {what} within {}: {}",
                        crate::duration::pretty(timeout),
                        mismatches
                            .iter()
                            .take(3)
                            .map(|m| m.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    awaited: Some(format!("{reference} to {what}")),
                    last_seen: Some(yaml(&matcher::project(expected, &actual))),
                    diff: Some(matcher::diff(expected, &actual)),
                }
            }
            Some(error) => Failure {
                message: format!(
                    "{reference}: the API server could not be read within {}",
                    crate::duration::pretty(timeout)
                ),
                awaited: Some(format!("{reference} to {what}")),
                last_seen: Some(error.to_string()),
                diff: None,
            },
            None => Failure {
                message: format!(
                    "{reference} not found within {}",
                    crate::duration::pretty(timeout)
                ),
                awaited: Some(format!("{reference} to {what}")),
                last_seen: Some("no such object".into()),
                diff: None,
            },
        }
    }

    pub(super) async fn assert(&self, op: &AssertOp, timeout: Duration, absent: bool) -> OpResultT {
        let expected = self.load_objects(&op.object, &op.file, &self.bindings)?;
        let deadline = Instant::now() + timeout;
        for expected in &expected {
            loop {
                let check = self.check_objects(op.cluster, expected).await?;
                match (check, absent) {
                    (Ok(_), false) | (Err(_), true) => break,
                    (Err(closest), false) => {
                        if Instant::now() >= deadline {
                            return Err(Self::assertion_failure(
                                "match", expected, closest, timeout,
                            ));
                        }
                    }
                    (Ok(found), true) => {
                        if Instant::now() >= deadline {
                            return Err(still_matches(expected, &found, timeout));
                        }
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// The `delete` operation.
    pub(super) async fn delete_op(&mut self, op: &DeleteOp, timeout: Duration) -> OpResultT {
        let objects = self.load_objects(&op.object, &op.file, &self.bindings)?;
        let res = self.delete(op.cluster, objects, op.wait, timeout).await;
        if op.continue_on_error { Ok(()) } else { res }
    }

    pub(super) async fn delete(
        &mut self,
        cluster: ClusterName,
        objects: Vec<Value>,
        wait: bool,
        timeout: Duration,
    ) -> OpResultT {
        let kube = self.kube(cluster).await?;
        let deadline = Instant::now() + timeout;
        for object in objects {
            let reference = ObjectRef::of(&object).map_err(|e| fail(e.to_string()))?;
            kube.delete(&reference)
                .await
                .map_err(|e| fail(format!("deleting {reference}: {e}")))?;
            self.created
                .retain(|c| !(c.cluster == cluster && c.reference == reference));
            if wait {
                wait_deleted(&kube, &reference, deadline, timeout).await?;
            }
        }
        Ok(())
    }

    /// The `kubectl` operation: the real kubectl against one cluster.
    pub(super) async fn kubectl(&mut self, op: &KubectlOp, timeout: Duration) -> OpResultT {
        let access = self.env.cluster(op.cluster);
        let mut args = vec![
            "--kubeconfig".to_string(),
            access.kubeconfig.display().to_string(),
            "--context".into(),
            access.context,
        ];
        match &op.args {
            Args::Line(line) => args.extend(split_args(&self.text(line)?)),
            Args::List(list) => {
                for arg in list {
                    args.push(self.text(arg)?);
                }
            }
        }
        let stdin = op.stdin.as_ref().map(|s| self.text(s)).transpose()?;
        let env = self.command_env();
        let res = self
            .run_command(
                "kubectl",
                args,
                stdin,
                env,
                &op.expect,
                &op.output,
                op.output_format,
                timeout,
            )
            .await;
        if op.continue_on_error { Ok(()) } else { res }
    }

    /// The `exec` operation: a program run directly.
    pub(super) async fn exec(&mut self, op: &ExecOp, timeout: Duration) -> OpResultT {
        let mut command = op
            .command
            .iter()
            .map(|a| self.text(a))
            .collect::<Result<Vec<_>, _>>()?;
        if command.is_empty() {
            return Err(fail("empty command"));
        }
        let program = command.remove(0);
        let mut env = self.command_env();
        env.extend(
            op.env
                .iter()
                .map(|(k, v)| (k.clone(), self.text(v).unwrap_or_default())),
        );
        let res = self
            .run_command(
                &program,
                command,
                None,
                env,
                &op.expect,
                &op.output,
                op.output_format,
                timeout,
            )
            .await;
        if op.continue_on_error { Ok(()) } else { res }
    }

    /// The `script` operation: `sh -c` with `set -e`.
    pub(super) async fn script(&mut self, op: &ScriptOp, timeout: Duration) -> OpResultT {
        let content = self.text(&op.content)?;
        let mut env = self.command_env();
        env.extend(
            op.env
                .iter()
                .map(|(k, v)| (k.clone(), self.text(v).unwrap_or_default())),
        );
        let args = vec!["-c".to_string(), format!("set -e\n{content}")];
        let res = self
            .run_command(
                "sh",
                args,
                None,
                env,
                &op.expect,
                &op.output,
                op.output_format,
                timeout,
            )
            .await;
        if op.continue_on_error { Ok(()) } else { res }
    }

    fn command_env(&self) -> BTreeMap<String, String> {
        let text = |name: &str| {
            self.bindings
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        BTreeMap::from([
            ("KUBECONFIG".to_string(), self.env.kubeconfig_env()),
            ("CONTROL_CONTEXT".to_string(), text("controlContext")),
            ("BUILD_CONTEXT".to_string(), text("buildContext")),
            ("NAMESPACE".to_string(), text("namespace")),
            ("PLANE_ID".to_string(), text("planeID")),
        ])
    }

    #[allow(clippy::too_many_arguments)] // One call site per command-like operation.
    async fn run_command(
        &mut self,
        program: &str,
        args: Vec<String>,
        stdin: Option<String>,
        env: BTreeMap<String, String>,
        expect: &CommandExpect,
        output: &Option<String>,
        format: OutputFormat,
        timeout: Duration,
    ) -> OpResultT {
        use tokio::io::AsyncWriteExt;
        let shown = match (program, args.as_slice()) {
            ("sh", [flag, script]) if flag == "-c" => {
                let body = script.strip_prefix("set -e\n").unwrap_or(script);
                format!("script `{}`", first_line(body))
            }
            _ => format!("{program} {}", args.join(" ")),
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(&args)
            .envs(&env)
            .current_dir(&self.scenario_dir)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| fail(format!("running `{shown}`: {e}")))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        let result = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                fail(format!(
                    "`{shown}` did not finish within {}",
                    crate::duration::pretty(timeout)
                ))
            })?
            .map_err(|e| fail(format!("running `{shown}`: {e}")))?;
        let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        let code = result.status.code().unwrap_or(-1);
        self.check_command(&shown, code, &stdout, &stderr, expect)?;
        if let Some(output) = output {
            self.bindings
                .set(output.clone(), command_output(stdout, format)?);
        }
        Ok(())
    }

    /// Checks a finished command's exit code and output against `expect`.
    fn check_command(
        &self,
        shown: &str,
        code: i32,
        stdout: &str,
        stderr: &str,
        expect: &CommandExpect,
    ) -> OpResultT {
        let wanted = expect.exit_code.unwrap_or(0);
        let seen = || {
            format!(
                "exit code {code}\nstdout:\n{}\nstderr:\n{}",
                tail_text(stdout),
                tail_text(stderr)
            )
        };
        if code != wanted {
            return Err(Failure {
                message: format!(
                    "`{shown}` exited with {code}, expected {wanted}: {}",
                    first_line(stderr)
                ),
                awaited: None,
                last_seen: Some(seen()),
                diff: None,
            });
        }
        for (stream, text, needle) in [
            ("stdout", stdout, &expect.stdout_contains),
            ("stderr", stderr, &expect.stderr_contains),
        ] {
            if let Some(needle) = needle {
                let needle = self.text(needle)?;
                if !text.contains(&needle) {
                    return Err(Failure {
                        message: format!("`{shown}`: {stream} does not contain `{needle}`"),
                        awaited: None,
                        last_seen: Some(seen()),
                        diff: None,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Sends every object (transport errors retried until the timeout), sixteen at a time.
async fn send_objects(
    kube: &Kube,
    objects: Vec<Value>,
    mode: ApplyMode,
    timeout: Duration,
) -> Applied {
    let deadline = Instant::now() + timeout;
    futures::stream::iter(objects.into_iter().map(|object| async move {
        let res = loop {
            let res = match mode {
                ApplyMode::Apply => kube.apply(&object).await,
                ApplyMode::Create => kube.create(&object).await.map(|_| true),
                ApplyMode::Patch => kube.patch(&object).await.map(|_| false),
            };
            // Transport errors (an API server restarting) are retried until the timeout.
            match &res {
                Err(KubeError::Client(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await
                }
                _ => break res,
            }
        };
        (object, res)
    }))
    .buffer_unordered(APPLY_CONCURRENCY)
    .collect()
    .await
}

/// The failure of an `error` assertion whose object still matches at the deadline.
fn still_matches(expected: &Value, found: &Value, timeout: Duration) -> Failure {
    let reference = ObjectRef::of(expected)
        .map(|r| r.to_string())
        .unwrap_or_default();
    Failure {
        message: format!(
            "{reference} still matches after {}",
            crate::duration::pretty(timeout)
        ),
        awaited: Some(format!("no {reference} matching the expected object")),
        last_seen: Some(yaml(found)),
        diff: None,
    }
}

/// Waits until a deleted object is gone, until `deadline`.
async fn wait_deleted(
    kube: &Kube,
    reference: &ObjectRef,
    deadline: Instant,
    timeout: Duration,
) -> OpResultT {
    loop {
        match kube.get(reference).await {
            Ok(None) => return Ok(()),
            Ok(Some(found)) if Instant::now() >= deadline => {
                return Err(Failure {
                    message: format!(
                        "{reference} still exists {} after deletion",
                        crate::duration::pretty(timeout)
                    ),
                    awaited: Some(format!("{reference} to be gone")),
                    last_seen: Some(yaml(&found)),
                    diff: None,
                });
            }
            Err(err) if Instant::now() >= deadline => {
                return Err(fail(format!("reading {reference}: {err}")));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// A command's stdout as the binding `outputFormat` asks for.
fn command_output(stdout: String, format: OutputFormat) -> Result<Value, Failure> {
    Ok(match format {
        OutputFormat::Text => Value::String(stdout),
        OutputFormat::Trimmed => Value::String(stdout.trim().to_string()),
        OutputFormat::Json => {
            serde_json::from_str(&stdout).map_err(|e| fail(format!("stdout is not JSON: {e}")))?
        }
        OutputFormat::Yaml => {
            serde_yaml::from_str(&stdout).map_err(|e| fail(format!("stdout is not YAML: {e}")))?
        }
        OutputFormat::Base64 => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(stdout.trim())
                .map_err(|e| fail(format!("stdout is not base64: {e}")))?;
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }
    })
}

/// Lint rules of this family (called from [`Linter::operation`]).
impl Linter<'_> {
    pub(crate) fn objects(&mut self, path: &[Seg], object: &Option<Value>, file: &Option<String>) {
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

    pub(crate) fn apply(&mut self, path: &[Seg], op: &ApplyOp) {
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

    pub(crate) fn assert(&mut self, path: &[Seg], op: &AssertOp) {
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

    pub(crate) fn delete(&mut self, path: &[Seg], op: &DeleteOp) {
        self.objects(path, &op.object, &op.file);
        if let Some(object) = &op.object {
            self.check_refs_in_value(&with(path, "object"), object, &[]);
        }
    }

    pub(crate) fn exec(&mut self, path: &[Seg], op: &ExecOp) {
        if op.command.is_empty() {
            self.error(&with(path, "command"), "the command is empty");
        }
        for arg in &op.command {
            self.check_refs(&with(path, "command"), arg, &[]);
        }
        self.output(&op.output);
    }

    pub(crate) fn kubectl(&mut self, path: &[Seg], op: &KubectlOp) {
        match &op.args {
            Args::Line(line) => self.check_refs(&with(path, "args"), line, &[]),
            Args::List(list) => {
                for arg in list {
                    self.check_refs(&with(path, "args"), arg, &[]);
                }
            }
        }
        if let Some(stdin) = &op.stdin {
            self.check_refs(&with(path, "stdin"), stdin, &[]);
        }
        self.output(&op.output);
    }

    pub(crate) fn script(&mut self, path: &[Seg], op: &ScriptOp) {
        self.check_refs(&with(path, "content"), &op.content, &[]);
        self.output(&op.output);
    }
}
