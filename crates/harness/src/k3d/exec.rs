//! Runs plans: real processes from the repository root, or a scripted executor in tests.
//!
//! Execution is synchronous (these are short `kubectl`/`k3d`/`docker` invocations); async
//! callers run it on a blocking thread.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;

use super::K3dError;
use super::pki::K3dPki;
use super::plan::{Action, Cmd, Plan, Step, StepKind};

/// What a finished command returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Whether the command succeeded.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Why a command could not run at all.
#[derive(Debug)]
pub enum SpawnError {
    /// The program is not on `PATH`.
    NotFound,
    /// Anything else.
    Other(std::io::Error),
}

/// Runs commands.
pub trait Executor {
    /// Runs `cmd` with `stdin` and waits for it.
    fn run(&mut self, cmd: &Cmd, stdin: Option<&[u8]>) -> Result<Output, SpawnError>;

    /// The directory commands run in: relative paths of in-process steps (the PKI) resolve
    /// against it, as the commands' do. `None`: the process's working directory.
    fn base_dir(&self) -> Option<&Path> {
        None
    }
}

/// Runs real processes in a directory, with an optional `PATH`.
#[derive(Clone, Debug)]
pub struct System {
    /// Working directory (the repository root).
    pub dir: PathBuf,
    /// `PATH` for the children (the parent's when `None`).
    pub path: Option<std::ffi::OsString>,
}

impl System {
    /// Runs from `dir` with the inherited `PATH`.
    pub fn new(dir: &Path) -> System {
        System {
            dir: dir.to_path_buf(),
            path: None,
        }
    }
}

impl Executor for System {
    fn base_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn run(&mut self, cmd: &Cmd, stdin: Option<&[u8]>) -> Result<Output, SpawnError> {
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .current_dir(&self.dir)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(path) = &self.path {
            command.env("PATH", path);
        }
        let mut child = command.spawn().map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => SpawnError::NotFound,
            _ => SpawnError::Other(err),
        })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A child that exits early closes the pipe; its exit code tells why.
            let _ = pipe.write_all(input);
        }
        let output = child.wait_with_output().map_err(SpawnError::Other)?;
        Ok(Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// The one message for missing tools.
pub fn missing_tools_message(missing: &[String]) -> String {
    format!(
        "the k3d backend cannot run here: {}.\n\
         It needs a running Docker engine (https://docs.docker.com/engine/install/), \
         k3d v5 (https://k3d.io/#installation) and kubectl (https://kubernetes.io/docs/tasks/tools/).\n\
         `cargo xtask e2e --backend sim` runs the same scenarios on embedded API servers and needs neither Docker nor k3d",
        missing.join("; ")
    )
}

fn describe_check_failure(cmd: &Cmd, result: &Result<Output, SpawnError>) -> String {
    match (cmd.program.as_str(), result) {
        (program, Err(SpawnError::NotFound)) => format!("`{program}` is not installed (not on PATH)"),
        ("docker", Ok(_)) => "`docker` is installed but no Docker engine answers (`docker info` failed; is the daemon running?)".to_string(),
        (program, Ok(output)) => format!(
            "`{}` failed: {}",
            cmd.display(),
            first_line(&output.stderr).unwrap_or(program)
        ),
        (program, Err(SpawnError::Other(err))) => format!("`{program}` could not start: {err}"),
    }
}

fn first_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).find(|l| !l.is_empty())
}

/// Values captured by a plan (`AGENT_CA`).
pub type Vars = BTreeMap<String, String>;

/// Fills `${VAR}` with the captured value as a JSON string (also a YAML double-quoted scalar).
fn substitute(text: &str, vars: &Vars) -> String {
    let mut out = text.to_string();
    for (name, value) in vars {
        let quoted = serde_json::to_string(value).expect("strings serialize");
        out = out.replace(&format!("${{{name}}}"), &quoted);
    }
    out
}

fn failed(step: &Step, cmd: &Cmd, result: Result<Output, SpawnError>) -> K3dError {
    let detail = match result {
        Ok(output) => format!(
            "exit code {}: {}",
            output.code,
            tail(&format!("{}{}", output.stderr, output.stdout), 20)
        ),
        Err(SpawnError::NotFound) => format!("`{}` is not installed", cmd.program),
        Err(SpawnError::Other(err)) => err.to_string(),
    };
    K3dError::StepFailed {
        step: step.about.clone(),
        command: cmd.display(),
        detail,
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn ok(step: &Step, cmd: &Cmd, result: Result<Output, SpawnError>) -> Result<Output, K3dError> {
    match result {
        Ok(output) if output.success() => Ok(output),
        other => Err(failed(step, cmd, other)),
    }
}

/// Runs one step's action once.
fn run_action(
    step: &Step,
    exec: &mut dyn Executor,
    vars: &mut Vars,
    show: &dyn Fn(String),
) -> Result<(), K3dError> {
    match &step.action {
        Action::Run { cmd, stdin } => {
            let input = stdin.as_ref().map(|text| substitute(text, vars));
            let output = ok(
                step,
                cmd,
                exec.run(cmd, input.as_deref().map(str::as_bytes)),
            )?;
            if step.show_output {
                show(output.stdout);
            }
        }
        Action::Pipe { from, to } => {
            let produced = ok(step, from, exec.run(from, None))?;
            ok(step, to, exec.run(to, Some(produced.stdout.as_bytes())))?;
        }
        Action::Capture { var, cmd, base64 } => {
            let output = ok(step, cmd, exec.run(cmd, None))?;
            let text = output.stdout.trim();
            if text.is_empty() {
                return Err(failed(
                    step,
                    cmd,
                    Ok(Output {
                        code: 0,
                        stdout: String::new(),
                        stderr: "the command printed nothing".into(),
                    }),
                ));
            }
            let value = if *base64 {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|err| K3dError::StepFailed {
                        step: step.about.clone(),
                        command: cmd.display(),
                        detail: format!("output is not base64: {err}"),
                    })?;
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                text.to_string()
            };
            vars.insert(var.clone(), value);
        }
        Action::GeneratePki { dir, dns_names } => {
            let names: Vec<&str> = dns_names.iter().map(String::as_str).collect();
            // An absolute `dir` stays as it is.
            let dir = exec
                .base_dir()
                .map_or_else(|| dir.clone(), |base| base.join(dir));
            K3dPki::load_or_generate(&dir, &names)?;
        }
    }
    Ok(())
}

/// Runs a plan in order. Check steps all run first-to-last and their failures become one
/// message naming every missing tool; any other failing step stops the plan.
pub fn execute(
    plan: &Plan,
    exec: &mut dyn Executor,
    progress: &dyn Fn(String),
) -> Result<Vars, K3dError> {
    let mut vars = Vars::new();
    let mut missing = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        if step.kind == StepKind::Check {
            if let Action::Run { cmd, .. } = &step.action {
                let result = exec.run(cmd, None);
                if !result.as_ref().is_ok_and(Output::success) {
                    missing.push(describe_check_failure(cmd, &result));
                }
            }
            continue;
        }
        if !missing.is_empty() {
            return Err(K3dError::MissingTools(missing_tools_message(&missing)));
        }
        if let Some(unless) = &step.unless
            && exec.run(unless, None).is_ok_and(|o| o.success())
        {
            progress(format!(
                "[{}/{}] {}: already done",
                i + 1,
                plan.steps.len(),
                step.about
            ));
            continue;
        }
        progress(format!("[{}/{}] {}", i + 1, plan.steps.len(), step.about));
        let attempts = step.retry.map_or(1, |r| r.attempts.max(1));
        let mut attempt = 1;
        loop {
            match run_action(step, exec, &mut vars, progress) {
                Ok(()) => break,
                Err(err) if attempt < attempts => {
                    progress(format!("  attempt {attempt}/{attempts} failed: {err}"));
                    attempt += 1;
                    if let Some(retry) = step.retry {
                        std::thread::sleep(retry.delay);
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }
    if !missing.is_empty() {
        return Err(K3dError::MissingTools(missing_tools_message(&missing)));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k3d::plan::Retry;

    /// Answers from a table keyed by the command line and records what ran.
    #[derive(Default)]
    struct Scripted {
        answers: BTreeMap<String, Vec<Result<Output, ()>>>,
        ran: Vec<(String, Option<String>)>,
    }

    impl Scripted {
        fn answer(mut self, line: &str, code: i32, stdout: &str) -> Scripted {
            self.answers
                .entry(line.to_string())
                .or_default()
                .push(Ok(Output {
                    code,
                    stdout: stdout.to_string(),
                    stderr: if code == 0 {
                        String::new()
                    } else {
                        "boom".into()
                    },
                }));
            self
        }
    }

    impl Executor for Scripted {
        fn run(&mut self, cmd: &Cmd, stdin: Option<&[u8]>) -> Result<Output, SpawnError> {
            let line = cmd.display();
            self.ran.push((
                line.clone(),
                stdin.map(|s| String::from_utf8_lossy(s).into_owned()),
            ));
            match self.answers.get_mut(&line) {
                Some(queue) if !queue.is_empty() => {
                    let answer = if queue.len() > 1 {
                        queue.remove(0)
                    } else {
                        queue[0].clone()
                    };
                    answer.map_err(|()| SpawnError::NotFound)
                }
                _ => Ok(Output::default()),
            }
        }
    }

    fn step(about: &str, kind: StepKind, action: Action) -> Step {
        Step {
            about: about.into(),
            kind,
            action,
            unless: None,
            retry: None,
            show_output: false,
        }
    }

    /// A step whose `unless` command succeeds does not run.
    #[test]
    fn skips_steps_whose_guard_succeeds() {
        let mut create = step(
            "create",
            StepKind::K3d,
            Action::Run {
                cmd: Cmd::new("k3d", ["cluster", "create", "a"]),
                stdin: None,
            },
        );
        create.unless = Some(Cmd::new("k3d", ["cluster", "get", "a"]));
        let plan = Plan {
            name: "t".into(),
            steps: vec![create],
        };
        let mut exec = Scripted::default().answer("k3d cluster get a", 0, "");
        execute(&plan, &mut exec, &|_| {}).unwrap();
        assert_eq!(exec.ran.len(), 1, "{:?}", exec.ran);
        let mut exec = Scripted::default().answer("k3d cluster get a", 1, "");
        execute(&plan, &mut exec, &|_| {}).unwrap();
        assert_eq!(exec.ran[1].0, "k3d cluster create a");
    }

    /// A captured base64 value reaches a later step's stdin as a quoted string; the capture is
    /// retried while the command fails.
    #[test]
    fn captures_decode_and_substitute() {
        let get = Cmd::new("kubectl", ["get", "secret"]);
        let mut capture = step(
            "read",
            StepKind::Kubectl,
            Action::Capture {
                var: "CA".into(),
                cmd: get.clone(),
                base64: true,
            },
        );
        capture.retry = Some(Retry {
            attempts: 3,
            delay: std::time::Duration::ZERO,
        });
        let apply = step(
            "apply",
            StepKind::Kubectl,
            Action::Run {
                cmd: Cmd::new("kubectl", ["apply"]),
                stdin: Some("value: ${CA}\n".into()),
            },
        );
        let plan = Plan {
            name: "t".into(),
            steps: vec![capture, apply],
        };
        let mut exec = Scripted::default()
            .answer("kubectl get secret", 1, "")
            .answer("kubectl get secret", 0, "YQpiCg==\n");
        let vars = execute(&plan, &mut exec, &|_| {}).unwrap();
        assert_eq!(vars["CA"], "a\nb\n");
        let (_, stdin) = exec.ran.last().unwrap();
        assert_eq!(stdin.as_deref(), Some("value: \"a\\nb\\n\"\n"));
    }

    /// Every missing tool is named in one message that points to `--backend sim`; nothing else
    /// runs.
    #[test]
    fn reports_all_missing_tools_at_once() {
        let plan = crate::k3d::plan::checks(true);
        let mut with_later = plan.clone();
        with_later.steps.push(step(
            "later",
            StepKind::K3d,
            Action::Run {
                cmd: Cmd::new("k3d", ["cluster", "list"]),
                stdin: None,
            },
        ));
        let mut exec = Scripted::default()
            .answer("docker info --format '{{.ServerVersion}}'", 1, "")
            .answer("k3d version", 0, "");
        exec.answers
            .insert("kubectl version --client".into(), vec![Err(())]);
        let err = execute(&with_later, &mut exec, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("no Docker engine answers"), "{err}");
        assert!(err.contains("`kubectl` is not installed"), "{err}");
        assert!(err.contains("--backend sim"), "{err}");
        assert!(!exec.ran.iter().any(|(line, _)| line == "k3d cluster list"));
    }

    /// With a `PATH` that holds neither docker nor k3d, real processes give the one message:
    /// what is missing, what to install, and that `--backend sim` needs neither.
    #[test]
    fn missing_docker_and_k3d_on_path_gives_one_install_message() {
        let empty = tempfile::tempdir().unwrap();
        let mut system = System::new(empty.path());
        system.path = Some(empty.path().as_os_str().to_owned());
        let plan = crate::k3d::plan::up(&crate::k3d::plan::Layout::new(
            crate::k3d::values::Values::committed(&crate::k3d::project_root()).unwrap(),
        ));
        let lines = std::cell::RefCell::new(Vec::new());
        let err = execute(&plan, &mut system, &|line| lines.borrow_mut().push(line)).unwrap_err();
        assert!(matches!(err, K3dError::MissingTools(_)), "{err:?}");
        let message = err.to_string();
        for expected in [
            "`docker` is not installed",
            "`k3d` is not installed",
            "`kubectl` is not installed",
            "https://k3d.io",
            "https://docs.docker.com/engine/install/",
            "`cargo xtask e2e --backend sim`",
            "needs neither Docker nor k3d",
        ] {
            assert!(message.contains(expected), "{expected:?} not in {message}");
        }
        assert!(
            lines.borrow().is_empty(),
            "no step ran: {:?}",
            lines.borrow()
        );
    }
}
