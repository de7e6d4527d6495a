//! Command plans: every command the k3d backend runs, as data, so `--dry-run` can print them in
//! order (as a shell script) and tests can snapshot them.
//!
//! A [`Plan`] is a list of [`Step`]s; [`super::exec::execute`] runs one. Steps are commands
//! (`docker`, `k3d`, `kubectl`), pipes (`kubectl create --dry-run=client -o yaml | kubectl apply
//! -f -`), captures (`AGENT_CA=$(kubectl get secret ... | base64 -d)`) and one in-process action
//! (generating the PKI with rcgen).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::config::Role;
use super::render::{self, ManifestFile};
use super::values::{CONTROL_NAMESPACE, CONTROLLER_NAME, GATEWAY_NAME, Values};
use buildplane_api::names;

/// One program invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    /// Program (`kubectl`).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
}

impl Cmd {
    /// A command from a program and arguments.
    pub fn new<I, S>(program: &str, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cmd {
            program: program.to_string(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// The command as a shell would read it.
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Quotes an argument for a POSIX shell when it needs it.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Runs a command; `${VAR}` in `stdin` is replaced by a captured value (as a JSON string).
    Run {
        /// The command.
        cmd: Cmd,
        /// Standard input.
        stdin: Option<String>,
    },
    /// `from | to`.
    Pipe {
        /// Producer.
        from: Cmd,
        /// Consumer.
        to: Cmd,
    },
    /// `VAR=$(cmd)`, base64-decoded when `base64` is set.
    Capture {
        /// Variable name.
        var: String,
        /// The command.
        cmd: Cmd,
        /// Decode the output as base64.
        base64: bool,
    },
    /// Generates the deployment's certificates into a directory (in process; kept if present).
    GeneratePki {
        /// Directory.
        dir: PathBuf,
        /// DNS names of the gateway's serving certificate.
        dns_names: Vec<String>,
    },
}

/// What a step touches (for filtering and for the message when it fails).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Checks that a tool is installed; failures become one "install ..." message.
    Check,
    /// Talks to the Docker engine.
    Docker,
    /// Runs k3d.
    K3d,
    /// Changes or reads a cluster.
    Kubectl,
    /// Waits for a cluster to reach a state (needs real controllers and kubelets).
    Wait,
    /// Runs in process.
    Local,
}

/// Retries of a step that races something else (a Secret another process writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in total.
    pub attempts: u32,
    /// Pause between attempts.
    pub delay: std::time::Duration,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// What it is for (a comment in the script).
    pub about: String,
    /// What it touches.
    pub kind: StepKind,
    /// What it does.
    pub action: Action,
    /// Skipped when this command succeeds.
    pub unless: Option<Cmd>,
    /// Retries.
    pub retry: Option<Retry>,
    /// Print the command's output (status commands).
    pub show_output: bool,
}

impl Step {
    fn new(about: impl Into<String>, kind: StepKind, action: Action) -> Step {
        Step {
            about: about.into(),
            kind,
            action,
            unless: None,
            retry: None,
            show_output: false,
        }
    }

    fn run(about: impl Into<String>, kind: StepKind, cmd: Cmd) -> Step {
        Step::new(about, kind, Action::Run { cmd, stdin: None })
    }

    fn unless(mut self, cmd: Cmd) -> Step {
        self.unless = Some(cmd);
        self
    }

    fn retry(mut self, attempts: u32, delay_secs: u64) -> Step {
        self.retry = Some(Retry {
            attempts,
            delay: std::time::Duration::from_secs(delay_secs),
        });
        self
    }

    fn shown(mut self) -> Step {
        self.show_output = true;
        self
    }

    /// The step as shell text (without the comment).
    pub fn script(&self) -> String {
        match &self.action {
            Action::Run { cmd, stdin: None } => cmd.display(),
            Action::Run {
                cmd,
                stdin: Some(stdin),
            } if stdin.contains("${") => format!(
                "# (${{VAR}} below is filled in with the captured value as a YAML double-quoted string)\n{} <<'EOF'\n{}EOF",
                cmd.display(),
                stdin
            ),
            Action::Run {
                cmd,
                stdin: Some(stdin),
            } => format!("{} <<'EOF'\n{}EOF", cmd.display(), stdin),
            Action::Pipe { from, to } => format!("{} \\\n  | {}", from.display(), to.display()),
            Action::Capture { var, cmd, base64 } => {
                let decode = if *base64 { " | base64 -d" } else { "" };
                format!("{var}=$({}{decode})", cmd.display())
            }
            Action::GeneratePki { dir, dns_names } => format!(
                "# (in process) generate the gateway CA, its serving certificate for {} and the internal client CA with the controller's and the harness's certificates into {} (kept when present)",
                dns_names.join(", "),
                dir.display()
            ),
        }
    }
}

/// A named list of steps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `up`, `deploy`, ...
    pub name: String,
    /// Steps in order.
    pub steps: Vec<Step>,
}

impl Plan {
    /// The plan as a commented shell script (what `--dry-run` prints).
    pub fn script(&self) -> String {
        let mut out = format!("# plan `{}`: {} steps\n", self.name, self.steps.len());
        for (i, step) in self.steps.iter().enumerate() {
            let _ = write!(out, "\n# {}. {}", i + 1, step.about);
            if let Some(retry) = step.retry {
                let _ = write!(
                    out,
                    " (up to {} attempts, {}s apart)",
                    retry.attempts,
                    retry.delay.as_secs()
                );
            }
            out.push('\n');
            match &step.unless {
                Some(unless) => {
                    let _ = writeln!(
                        out,
                        "{} >/dev/null 2>&1 || {}",
                        unless.display(),
                        step.script()
                    );
                }
                None => {
                    let _ = writeln!(out, "{}", step.script());
                }
            }
        }
        out
    }

    /// Appends another plan's steps.
    pub fn extend(&mut self, other: Plan) {
        self.steps.extend(other.steps);
    }

    /// The plan without the steps of the given kinds.
    pub fn without(&self, kinds: &[StepKind]) -> Plan {
        Plan {
            name: self.name.clone(),
            steps: self
                .steps
                .iter()
                .filter(|s| !kinds.contains(&s.kind))
                .cloned()
                .collect(),
        }
    }
}

/// Where the clusters are reached and where files live.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The values.
    pub values: Values,
    /// k3s image override (`--k3s-image`, `K3S_IMAGE`).
    pub k3s_image: Option<String>,
    /// The kubeconfig holding both contexts (written by `k3d kubeconfig merge`).
    pub kubeconfig: PathBuf,
    /// Context of the control cluster.
    pub control_context: String,
    /// Context of the build cluster.
    pub build_context: String,
    /// Generated certificates.
    pub pki_dir: PathBuf,
    /// The repository-relative directory of the k3d files (`k3d`).
    pub k3d_dir: PathBuf,
    /// Dockerfile.
    pub dockerfile: PathBuf,
}

impl Layout {
    /// The default layout: paths relative to the repository root, state under `target/k3d`.
    pub fn new(values: Values) -> Layout {
        Layout {
            control_context: values.clusters.control.context(),
            build_context: values.clusters.build.context(),
            values,
            k3s_image: None,
            kubeconfig: PathBuf::from("target/k3d/kubeconfig"),
            pki_dir: PathBuf::from("target/k3d/pki"),
            k3d_dir: PathBuf::from("k3d"),
            dockerfile: PathBuf::from("Dockerfile"),
        }
    }

    /// The context of a cluster.
    pub fn context(&self, role: Role) -> &str {
        match role {
            Role::Control => &self.control_context,
            Role::Build => &self.build_context,
        }
    }

    /// `kubectl --kubeconfig K --context C ARGS...`.
    pub fn kubectl<I, S>(&self, role: Role, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut all = vec![
            "--kubeconfig".to_string(),
            self.kubeconfig.display().to_string(),
            "--context".to_string(),
            self.context(role).to_string(),
        ];
        all.extend(args.into_iter().map(Into::into));
        Cmd::new("kubectl", all)
    }

    fn pki(&self, file: &str) -> String {
        self.pki_dir.join(file).display().to_string()
    }

    fn manifests(&self, role: Role) -> String {
        format!(
            "{}/",
            self.k3d_dir.join("manifests").join(role.as_str()).display()
        )
    }

    /// The images and the cluster each goes to.
    pub fn images(&self) -> Vec<(&'static str, String, Role)> {
        let v = &self.values;
        vec![
            (
                "cluster-gateway",
                v.cluster_gateway.image.to_string(),
                Role::Control,
            ),
            (
                "buildplane-controller",
                v.controller_manager.image.to_string(),
                Role::Control,
            ),
            (
                "cluster-agent",
                v.cluster_agent.image.to_string(),
                Role::Build,
            ),
        ]
    }
}

/// Checks that the Docker engine answers and k3d (and kubectl when `kubectl`) is installed.
pub fn checks(kubectl: bool) -> Plan {
    let mut steps = vec![
        Step::run(
            "a Docker engine answers",
            StepKind::Check,
            Cmd::new("docker", ["info", "--format", "{{.ServerVersion}}"]),
        ),
        Step::run(
            "k3d is installed",
            StepKind::Check,
            Cmd::new("k3d", ["version"]),
        ),
    ];
    if kubectl {
        steps.push(Step::run(
            "kubectl is installed",
            StepKind::Check,
            Cmd::new("kubectl", ["version", "--client"]),
        ));
    }
    Plan {
        name: "checks".into(),
        steps,
    }
}

/// Creates both clusters (each skipped when it exists) and writes the kubeconfig.
pub fn clusters(layout: &Layout) -> Plan {
    let mut plan = Plan {
        name: "clusters".into(),
        steps: Vec::new(),
    };
    for role in [Role::Control, Role::Build] {
        let name = &role.cluster(&layout.values).name;
        let mut args = vec![
            "cluster".to_string(),
            "create".into(),
            "--config".into(),
            layout
                .k3d_dir
                .join("clusters")
                .join(format!("{}.yaml", role.as_str()))
                .display()
                .to_string(),
        ];
        if let Some(image) = &layout.k3s_image {
            args.extend(["--image".to_string(), image.clone()]);
        }
        plan.steps.push(
            Step::run(
                format!(
                    "create the {} cluster `{name}` unless it exists",
                    role.as_str()
                ),
                StepKind::K3d,
                Cmd::new("k3d", args),
            )
            .unless(Cmd::new("k3d", ["cluster", "get", name.as_str()])),
        );
    }
    let control = &layout.values.clusters.control.name;
    let build = &layout.values.clusters.build.name;
    plan.steps.push(Step::run(
        "write both contexts to the project's kubeconfig",
        StepKind::K3d,
        Cmd::new(
            "k3d",
            [
                "kubeconfig",
                "merge",
                control.as_str(),
                build.as_str(),
                "--output",
                &layout.kubeconfig.display().to_string(),
                "--kubeconfig-switch-context=false",
            ],
        ),
    ));
    for role in [Role::Control, Role::Build] {
        plan.steps.push(Step::run(
            format!("wait for the {} cluster's node", role.as_str()),
            StepKind::Wait,
            layout.kubectl(
                role,
                [
                    "wait",
                    "--for=condition=Ready",
                    "nodes",
                    "--all",
                    "--timeout=180s",
                ],
            ),
        ));
    }
    plan
}

/// Builds the three images and imports each into its cluster.
pub fn images(layout: &Layout) -> Plan {
    let mut plan = Plan {
        name: "images".into(),
        steps: Vec::new(),
    };
    for (target, image, _) in layout.images() {
        plan.steps.push(Step::run(
            format!("build the {target} image"),
            StepKind::Docker,
            Cmd::new(
                "docker",
                [
                    "build",
                    "--file",
                    &layout.dockerfile.display().to_string(),
                    "--target",
                    target,
                    "--tag",
                    &image,
                    ".",
                ],
            ),
        ));
    }
    for role in [Role::Control, Role::Build] {
        let images: Vec<String> = layout
            .images()
            .into_iter()
            .filter(|(_, _, r)| *r == role)
            .map(|(_, image, _)| image)
            .collect();
        let mut args = vec!["image".to_string(), "import".into()];
        args.extend(images);
        args.extend([
            "--cluster".to_string(),
            role.cluster(&layout.values).name.clone(),
        ]);
        plan.steps.push(Step::run(
            format!("import the {} cluster's images", role.as_str()),
            StepKind::K3d,
            Cmd::new("k3d", args),
        ));
    }
    plan
}

fn secret_pipe(
    layout: &Layout,
    role: Role,
    namespace: &str,
    name: &str,
    files: &[(&str, &str)],
    tls: bool,
) -> Action {
    let mut args = vec![
        "create".to_string(),
        "secret".into(),
        "generic".into(),
        name.to_string(),
    ];
    if tls {
        args.push("--type=kubernetes.io/tls".into());
    }
    args.extend(["--namespace".to_string(), namespace.to_string()]);
    for (key, file) in files {
        args.push(format!("--from-file={key}={}", layout.pki(file)));
    }
    args.extend(["--dry-run=client".to_string(), "--output=yaml".into()]);
    Action::Pipe {
        from: layout.kubectl(role, args),
        to: layout.kubectl(role, ["apply", "--filename=-"]),
    }
}

fn rollout_status(layout: &Layout, role: Role, namespace: &str, deployment: &str) -> Step {
    Step::run(
        format!("wait for deployment/{deployment} to roll out"),
        StepKind::Wait,
        layout.kubectl(
            role,
            [
                "rollout",
                "status",
                &format!("deployment/{deployment}"),
                "--namespace",
                namespace,
                "--timeout=180s",
            ],
        ),
    )
}

fn rollout_restart(
    layout: &Layout,
    role: Role,
    namespace: &str,
    deployment: &str,
    why: &str,
) -> Step {
    Step::run(
        format!("restart deployment/{deployment} ({why})"),
        StepKind::Kubectl,
        layout.kubectl(
            role,
            [
                "rollout",
                "restart",
                &format!("deployment/{deployment}"),
                "--namespace",
                namespace,
            ],
        ),
    )
}

/// Applies the manifests, Secrets and ConfigMap; restarts the components so they run the
/// freshly imported images; waits for them.
pub fn manifests(layout: &Layout) -> Plan {
    let values = &layout.values;
    let control = Role::Control;
    let build = Role::Build;
    let mut dns_names = values.cluster_gateway.tls.dns_names.clone();
    dns_names.dedup();
    let apply_dir =
        |role: Role, dir: String| layout.kubectl(role, ["apply", "--filename", dir.as_str()]);
    let namespace_file = |role: Role| -> String {
        let file: ManifestFile = render::manifests(values)
            .into_iter()
            .find(|f| f.role == role && f.name.starts_with("00-"))
            .expect("each cluster has a namespace manifest");
        layout
            .k3d_dir
            .join("manifests")
            .join(role.as_str())
            .join(file.name)
            .display()
            .to_string()
    };
    let steps = vec![
        Step::new(
            "generate the certificates",
            StepKind::Local,
            Action::GeneratePki {
                dir: layout.pki_dir.clone(),
                dns_names,
            },
        ),
        Step::run(
            "install the CRDs on the control cluster",
            StepKind::Kubectl,
            apply_dir(
                control,
                format!("{}/", layout.k3d_dir.join("manifests/crds").display()),
            ),
        ),
        Step::run(
            "create the control cluster's namespace",
            StepKind::Kubectl,
            apply_dir(control, namespace_file(control)),
        ),
        Step::new(
            format!(
                "the gateway's serving certificate (Secret {})",
                values.cluster_gateway.tls.secret_name
            ),
            StepKind::Kubectl,
            secret_pipe(
                layout,
                control,
                CONTROL_NAMESPACE,
                &values.cluster_gateway.tls.secret_name,
                &[
                    ("tls.crt", "server.crt"),
                    ("tls.key", "server.key"),
                    ("ca.crt", "server-ca.crt"),
                ],
                true,
            ),
        ),
        Step::new(
            format!(
                "the CA of the internal API's clients (Secret {})",
                values.cluster_gateway.internal_tls.client_ca_secret_name
            ),
            StepKind::Kubectl,
            secret_pipe(
                layout,
                control,
                CONTROL_NAMESPACE,
                &values.cluster_gateway.internal_tls.client_ca_secret_name,
                &[("ca.crt", "internal-ca.crt")],
                false,
            ),
        ),
        Step::new(
            format!(
                "the controller's client certificate for the internal API (Secret {})",
                values.controller_manager.cluster_gateway.client_secret_name
            ),
            StepKind::Kubectl,
            secret_pipe(
                layout,
                control,
                CONTROL_NAMESPACE,
                &values.controller_manager.cluster_gateway.client_secret_name,
                &[
                    ("tls.crt", "controller.crt"),
                    ("tls.key", "controller.key"),
                    ("ca.crt", "server-ca.crt"),
                ],
                true,
            ),
        ),
        Step::new(
            format!(
                "the gateway replicas' client certificate for each other's internal API (Secret {})",
                values.cluster_gateway.internal_tls.peer_client_secret_name
            ),
            StepKind::Kubectl,
            secret_pipe(
                layout,
                control,
                CONTROL_NAMESPACE,
                &values.cluster_gateway.internal_tls.peer_client_secret_name,
                &[
                    ("tls.crt", "gateway-peer.crt"),
                    ("tls.key", "gateway-peer.key"),
                    ("ca.crt", "server-ca.crt"),
                ],
                true,
            ),
        ),
        Step::run(
            "apply the control cluster's manifests (RBAC, gateway, controller)",
            StepKind::Kubectl,
            apply_dir(control, layout.manifests(control)),
        ),
        Step::run(
            "create the build cluster's namespace",
            StepKind::Kubectl,
            apply_dir(build, namespace_file(build)),
        ),
        Step::new(
            format!(
                "the gateway's CA for the agents (ConfigMap {})",
                values.cluster_agent.tls.server_ca_config_map
            ),
            StepKind::Kubectl,
            Action::Pipe {
                from: layout.kubectl(
                    build,
                    [
                        "create",
                        "configmap",
                        &values.cluster_agent.tls.server_ca_config_map,
                        "--namespace",
                        names::AGENT_NAMESPACE,
                        &format!("--from-file=ca.crt={}", layout.pki("server-ca.crt")),
                        "--dry-run=client",
                        "--output=yaml",
                    ],
                ),
                to: layout.kubectl(build, ["apply", "--filename=-"]),
            },
        ),
        Step::run(
            "apply the build cluster's manifests (CoreDNS rewrite, RBAC, agent)",
            StepKind::Kubectl,
            apply_dir(build, layout.manifests(build)),
        ),
        rollout_restart(
            layout,
            build,
            "kube-system",
            "coredns",
            "load the coredns-custom rewrite",
        ),
        rollout_restart(
            layout,
            control,
            CONTROL_NAMESPACE,
            GATEWAY_NAME,
            "run the imported image",
        ),
        rollout_restart(
            layout,
            control,
            CONTROL_NAMESPACE,
            CONTROLLER_NAME,
            "run the imported image",
        ),
        rollout_restart(
            layout,
            build,
            names::AGENT_NAMESPACE,
            &values.cluster_agent.name,
            "run the imported image",
        ),
        rollout_status(layout, control, CONTROL_NAMESPACE, GATEWAY_NAME),
        rollout_status(layout, control, CONTROL_NAMESPACE, CONTROLLER_NAME),
        rollout_status(layout, build, "kube-system", "coredns"),
    ];
    Plan {
        name: "manifests".into(),
        steps,
    }
}

/// The seed's registration workflow: read the agent's `ca.crt` from the build cluster, create
/// the BuildPlane with it on the control cluster, wait until the agent is connected.
pub fn register(layout: &Layout) -> Plan {
    let values = &layout.values;
    let secret = &values.cluster_agent.tls.secret_name;
    let registration = &values.registration;
    Plan {
        name: "register".into(),
        steps: vec![
            Step::run(
                format!("wait for the agent to write Secret {secret}"),
                StepKind::Wait,
                layout.kubectl(
                    Role::Build,
                    [
                        "wait",
                        "--for=create",
                        &format!("secret/{secret}"),
                        "--namespace",
                        names::AGENT_NAMESPACE,
                        "--timeout=120s",
                    ],
                ),
            ),
            Step::new(
                "read the agent's CA (ca.crt) from the build cluster",
                StepKind::Kubectl,
                Action::Capture {
                    var: "AGENT_CA".into(),
                    cmd: layout.kubectl(
                        Role::Build,
                        [
                            "get",
                            "secret",
                            secret.as_str(),
                            "--namespace",
                            names::AGENT_NAMESPACE,
                            "--output=jsonpath={.data.ca\\.crt}",
                        ],
                    ),
                    base64: true,
                },
            )
            .retry(10, 3),
            Step::new(
                format!(
                    "create BuildPlane {}/{} (planeID {}) with the agent's CA on the control cluster",
                    registration.namespace, registration.name, values.cluster_agent.plane_id
                ),
                StepKind::Kubectl,
                Action::Run {
                    cmd: layout.kubectl(Role::Control, ["apply", "--filename=-"]),
                    stdin: Some(render::buildplane_template(values)),
                },
            ),
            // Not earlier: the agent is ready only once connected, which needs the BuildPlane.
            rollout_status(
                layout,
                Role::Build,
                names::AGENT_NAMESPACE,
                &values.cluster_agent.name,
            ),
            Step::run(
                "wait until the controller reports the agent connected",
                StepKind::Wait,
                layout.kubectl(
                    Role::Control,
                    [
                        "wait",
                        "--for=jsonpath={.status.agentConnection.connected}=true",
                        &format!("buildplane/{}", registration.name),
                        "--namespace",
                        registration.namespace.as_str(),
                        "--timeout=300s",
                    ],
                ),
            ),
        ],
    }
}

/// `cargo xtask k3d deploy`: images, manifests, registration (clusters must exist).
pub fn deploy(layout: &Layout) -> Plan {
    let mut plan = checks(true);
    plan.name = "deploy".into();
    plan.extend(images(layout));
    plan.extend(manifests(layout));
    plan.extend(register(layout));
    plan
}

/// `cargo xtask k3d up`: clusters, then everything `deploy` does.
pub fn up(layout: &Layout) -> Plan {
    let mut plan = checks(true);
    plan.name = "up".into();
    plan.extend(clusters(layout));
    plan.extend(images(layout));
    plan.extend(manifests(layout));
    plan.extend(register(layout));
    plan
}

/// `cargo xtask k3d down`: deletes both clusters.
pub fn down(layout: &Layout) -> Plan {
    let mut plan = checks(false);
    plan.name = "down".into();
    plan.steps.push(Step::run(
        "delete both clusters",
        StepKind::K3d,
        Cmd::new(
            "k3d",
            [
                "cluster",
                "delete",
                layout.values.clusters.control.name.as_str(),
                layout.values.clusters.build.name.as_str(),
            ],
        ),
    ));
    plan
}

/// `cargo xtask k3d status`: clusters, components, BuildPlanes.
pub fn status(layout: &Layout) -> Plan {
    let steps = vec![
        Step::run("the k3d clusters", StepKind::K3d, Cmd::new("k3d", ["cluster", "list"])).shown(),
        Step::run(
            "the control cluster's components",
            StepKind::Kubectl,
            layout.kubectl(
                Role::Control,
                ["get", "deployments,pods,services", "--namespace", CONTROL_NAMESPACE, "--output=wide"],
            ),
        )
        .shown(),
        Step::run(
            "the build cluster's agents",
            StepKind::Kubectl,
            layout.kubectl(
                Role::Build,
                ["get", "deployments,pods", "--namespace", names::AGENT_NAMESPACE, "--output=wide"],
            ),
        )
        .shown(),
        Step::run(
            "BuildPlanes and their connection status",
            StepKind::Kubectl,
            layout.kubectl(
                Role::Control,
                [
                    "get",
                    "buildplanes",
                    "--all-namespaces",
                    "--output=custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,PLANE:.spec.planeID,CONNECTED:.status.agentConnection.connected,AGENTS:.status.agentConnection.connectedAgents",
                ],
            ),
        )
        .shown(),
    ];
    let mut plan = checks(true);
    plan.name = "status".into();
    plan.steps.extend(steps);
    plan
}

/// `kubectl logs` of every component (collected when something fails).
pub fn logs(layout: &Layout, tail: usize) -> Vec<(String, Cmd)> {
    let tail = format!("--tail={tail}");
    let deployment = |role: Role, namespace: &str, name: &str| {
        layout.kubectl(
            role,
            [
                "logs",
                &format!("deployment/{name}"),
                "--namespace",
                namespace,
                "--all-containers",
                tail.as_str(),
            ],
        )
    };
    vec![
        (
            GATEWAY_NAME.to_string(),
            deployment(Role::Control, CONTROL_NAMESPACE, GATEWAY_NAME),
        ),
        (
            CONTROLLER_NAME.to_string(),
            deployment(Role::Control, CONTROL_NAMESPACE, CONTROLLER_NAME),
        ),
        (
            layout.values.cluster_agent.name.clone(),
            deployment(
                Role::Build,
                names::AGENT_NAMESPACE,
                &layout.values.cluster_agent.name,
            ),
        ),
    ]
}

/// A path shown relative to `root` when it is below it.
pub fn relative_to(path: &Path, root: &Path) -> PathBuf {
    path.strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(Values::committed(&crate::k3d::project_root()).unwrap())
    }

    /// The dry-run scripts of every subcommand match their snapshots.
    #[test]
    fn dry_run_plans_match_snapshots() {
        let layout = layout();
        insta::assert_snapshot!("plan_up", up(&layout).script());
        insta::assert_snapshot!("plan_deploy", deploy(&layout).script());
        insta::assert_snapshot!("plan_down", down(&layout).script());
        insta::assert_snapshot!("plan_status", status(&layout).script());
        let mut with_image = layout.clone();
        with_image.k3s_image = Some("rancher/k3s:v1.34.1-k3s1".into());
        insta::assert_snapshot!("plan_clusters_with_image", clusters(&with_image).script());
    }

    /// `up` creates clusters before it imports images, imports before it deploys, creates the
    /// namespaces before the Secrets in them, and registers last.
    #[test]
    fn up_orders_its_steps() {
        let plan = up(&layout());
        let position = |needle: &str| {
            plan.steps
                .iter()
                .position(|s| s.script().contains(needle))
                .unwrap_or_else(|| panic!("no step contains {needle:?}"))
        };
        assert!(position("docker info") < position("cluster create"));
        assert!(position("cluster create") < position("image import"));
        assert!(position("docker build") < position("image import"));
        assert!(position("image import") < position("rollout restart"));
        assert!(
            position("control/00-namespace.yaml") < position("secret generic cluster-gateway-tls")
        );
        assert!(position("build/00-namespace.yaml") < position("configmap cluster-gateway-ca"));
        assert!(position("AGENT_CA=") < position("kind: BuildPlane"));
        assert_eq!(plan.steps.last().unwrap().kind, StepKind::Wait);
    }

    /// Every subcommand checks its tools before anything else, so a machine without Docker or
    /// k3d gets the one install message instead of a failed step.
    #[test]
    fn every_plan_checks_its_tools_first() {
        let layout = layout();
        for plan in [up(&layout), deploy(&layout), down(&layout), status(&layout)] {
            let n_checks = plan
                .steps
                .iter()
                .take_while(|s| s.kind == StepKind::Check)
                .count();
            assert!(n_checks >= 2, "{} starts with {n_checks} checks", plan.name);
            assert!(
                plan.steps[n_checks..]
                    .iter()
                    .all(|s| s.kind != StepKind::Check),
                "{}: checks after other steps",
                plan.name
            );
        }
    }

    /// Arguments with shell metacharacters are quoted so the script can be pasted.
    #[test]
    fn quotes_arguments_for_the_shell() {
        let cmd = Cmd::new(
            "kubectl",
            ["get", "--output=jsonpath={.data.ca\\.crt}", "it's"],
        );
        assert_eq!(
            cmd.display(),
            r"kubectl get '--output=jsonpath={.data.ca\.crt}' 'it'\''s'"
        );
    }
}
