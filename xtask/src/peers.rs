//! `cargo xtask peers`: builds the real programs our code must work with — kube-apiserver and
//! kube-controller-manager (`k8s.io/kubernetes`), OpenChoreo's cluster-gateway and cluster-agent
//! (`github.com/openchoreo/openchoreo`, at two versions: `peers/openchoreo-v1.0` and
//! `peers/openchoreo`) — from the Go modules pinned in `peers/`, into a cache outside the
//! checkout, and checks that etcd is installed. See PEERS.md.
//!
//! The pins are the `require` lines of `peers/*/go.mod` (with their go.sum); nothing here
//! repeats a version. Go's module cache (GOMODCACHE) holds the sources; only the binaries go to
//! the peers cache, one directory per module and version (`kubernetes-v1.37.2/kube-apiserver`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, format_err};
use buildplane_peers::cache::{ETCD_HINT, find_etcd, pinned_version, version_dir};
use clap::{Args, Subcommand, ValueEnum};
use tokio::time::Instant;

use crate::project_root;

/// Lines of `go` output shown when a step fails.
const FAILURE_TAIL_LINES: usize = 40;

/// The one-line hint printed when etcd is missing.
/// Flags of `cargo xtask peers`.
#[derive(Args)]
pub(crate) struct PeersFlags {
    #[command(subcommand)]
    command: PeersCommand,
}

#[derive(Subcommand)]
enum PeersCommand {
    /// Build the pinned peers missing from the cache (a binary already there is skipped), then check for etcd.
    Build {
        /// Build only this program (and skip the etcd check).
        #[arg(long, value_enum)]
        only: Option<Program>,
    },
    /// Show every peer: program, version, path, present or missing.
    Status,
    /// Ask the module proxy which versions it serves, beside the pins (needs the network).
    Versions,
}

/// A program built from a pinned Go module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Program {
    KubeApiserver,
    KubeControllerManager,
    OpenchoreoGateway,
    OpenchoreoAgent,
}

const PROGRAMS: [Program; 4] = [
    Program::KubeApiserver,
    Program::KubeControllerManager,
    Program::OpenchoreoGateway,
    Program::OpenchoreoAgent,
];

/// A Go module version we build programs from, with its pinning module in `peers/<dir>/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Source {
    /// Directory under `peers/` holding the go.mod that requires the module.
    dir: &'static str,
    module: &'static str,
    /// First part of the cache subdirectory (`<prefix>-<version>`).
    cache_prefix: &'static str,
    /// Versions `cargo xtask peers versions` tracks: the newest release starting with this.
    track: &'static str,
    /// The programs built from it.
    programs: &'static [Program],
}

const KUBERNETES: Source = Source {
    dir: "kubernetes",
    module: "k8s.io/kubernetes",
    cache_prefix: "kubernetes",
    track: "v1.37.",
    programs: &[Program::KubeApiserver, Program::KubeControllerManager],
};

/// OpenChoreo, newest v1.x.
const OPENCHOREO: Source = Source {
    dir: "openchoreo",
    module: "github.com/openchoreo/openchoreo",
    cache_prefix: "openchoreo",
    track: "v",
    programs: &[Program::OpenchoreoGateway, Program::OpenchoreoAgent],
};

/// OpenChoreo v1.0.0: the module proxy refuses v0.17.0, and this is the served version nearest
/// to it (PEERS.md). Same cache prefix, so the two versions sit side by side.
const OPENCHOREO_V1_0: Source = Source {
    dir: "openchoreo-v1.0",
    track: "v1.0.",
    ..OPENCHOREO
};

/// Every pinned module version, in build order.
const SOURCES: [Source; 3] = [KUBERNETES, OPENCHOREO_V1_0, OPENCHOREO];

impl Program {
    fn module(self) -> &'static str {
        match self {
            Program::KubeApiserver | Program::KubeControllerManager => KUBERNETES.module,
            Program::OpenchoreoGateway | Program::OpenchoreoAgent => OPENCHOREO.module,
        }
    }

    /// The binary's file name (the last element of its package path).
    fn binary(self) -> &'static str {
        match self {
            Program::KubeApiserver => "kube-apiserver",
            Program::KubeControllerManager => "kube-controller-manager",
            Program::OpenchoreoGateway => "cluster-gateway",
            Program::OpenchoreoAgent => "cluster-agent",
        }
    }

    fn package(self) -> String {
        format!("{}/cmd/{}", self.module(), self.binary())
    }

    /// The linker flags the upstream release build sets: `-s -w` and the version variables
    /// (k8s: hack/lib/version.sh; OpenChoreo: make/golang.mk).
    fn ldflags(self, version: &str, revision: Option<&str>) -> String {
        let mut flags = vec!["-s".to_string(), "-w".to_string()];
        match self {
            Program::KubeApiserver | Program::KubeControllerManager => {
                let mut parts = version.trim_start_matches('v').split('.');
                let major = parts.next().unwrap_or("");
                let minor = parts.next().unwrap_or("");
                for package in [
                    "k8s.io/component-base/version",
                    "k8s.io/client-go/pkg/version",
                ] {
                    let mut set = |key: &str, value: &str| {
                        flags.push(format!("-X {package}.{key}={value}"));
                    };
                    set("gitVersion", version);
                    set("gitMajor", major);
                    set("gitMinor", minor);
                    set("gitTreeState", "clean");
                    if let Some(revision) = revision {
                        set("gitCommit", revision);
                    }
                }
            }
            Program::OpenchoreoGateway | Program::OpenchoreoAgent => {
                let package = "github.com/openchoreo/openchoreo/internal/version";
                flags.push(format!("-X {package}.version={version}"));
                flags.push(format!("-X {package}.componentName={}", self.binary()));
                if let Some(revision) = revision {
                    flags.push(format!("-X {package}.gitRevision={revision}"));
                }
            }
        }
        flags.join(" ")
    }
}

/// Runs `cargo xtask peers`.
pub(crate) fn run(flags: PeersFlags) -> anyhow::Result<()> {
    match flags.command {
        PeersCommand::Build { only } => build(only),
        PeersCommand::Status => status(),
        PeersCommand::Versions => versions(),
    }
}

/// Where a program of a module version lives in the cache.
fn binary_path(root: &Path, source: Source, program: Program, version: &str) -> PathBuf {
    version_dir(root, source.cache_prefix, version).join(program.binary())
}

/// The go.mod's `go` directive (the minimum Go version).
fn go_directive(go_mod: &str) -> Option<&str> {
    go_mod
        .lines()
        .find_map(|line| line.strip_prefix("go "))
        .map(str::trim)
}

/// A source's go.mod text and pinned version.
struct Pin {
    source: Source,
    dir: PathBuf,
    go_mod: String,
    version: String,
}

impl Pin {
    fn read(source: Source) -> anyhow::Result<Pin> {
        let dir = project_root().join("peers").join(source.dir);
        let path = dir.join("go.mod");
        let go_mod = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let version = pinned_version(&go_mod, source.module).ok_or_else(|| {
            format_err!(
                "{} requires no version of {}",
                path.display(),
                source.module
            )
        })?;
        Ok(Pin {
            source,
            dir,
            go_mod,
            version,
        })
    }
}

/// The newest Go version any pinning module needs (for the "go not found" hint).
fn minimum_go() -> String {
    SOURCES
        .into_iter()
        .filter_map(|source| Pin::read(source).ok())
        .filter_map(|pin| go_directive(&pin.go_mod).map(str::to_string))
        .max_by_key(|version| semver(&format!("v{version}")).map(|v| v.core))
        .map(|version| {
            let mut parts = version.split('.');
            format!(
                "{}.{}",
                parts.next().unwrap_or("1"),
                parts.next().unwrap_or("0")
            )
        })
        .unwrap_or_else(|| "1.26".into())
}

/// Checks that `go` runs; the error is one line saying what to install.
fn check_go() -> anyhow::Result<String> {
    let output = Command::new("go")
        .args(["env", "GOVERSION", "GOPROXY"])
        .output();
    match output {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8_lossy(&output.stdout);
            let mut lines = text.lines();
            let version = lines.next().unwrap_or("go").to_string();
            let proxy = lines.next().unwrap_or("").to_string();
            eprintln!("peers: {version}, GOPROXY={proxy}");
            Ok(proxy)
        }
        Ok(output) => bail!(
            "go does not run (`go env` failed: {}): install Go {}+ (https://go.dev/dl)",
            first_line(&String::from_utf8_lossy(&output.stderr)),
            minimum_go()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "go not found: install Go {}+ (https://go.dev/dl) or put it on PATH",
            minimum_go()
        ),
        Err(err) => bail!("could not run go: {err}"),
    }
}

fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// The last `n` lines of `text`.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let mut tail = VecDeque::with_capacity(n);
    for line in text.lines() {
        if tail.len() == n {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail.into_iter().collect::<Vec<_>>().join("\n")
}

/// The one-line cause of a download failure that means "no network / no proxy", if it is one
/// (unwrapped from the `"Error": "..."` field `go mod download -json` prints).
pub(crate) fn network_failure(output: &str) -> Option<String> {
    const SIGNS: &[&str] = &[
        "dial tcp",
        "no such host",
        "connection refused",
        "i/o timeout",
        "TLS handshake timeout",
        "network is unreachable",
        "proxyconnect",
        "Could not resolve host",
        "403 Forbidden",
        "404 Not Found",
        "410 Gone",
        "GOPROXY=off",
    ];
    let line = output
        .lines()
        .map(str::trim)
        .find(|line| SIGNS.iter().any(|sign| line.contains(sign)))?;
    let line = line.strip_prefix("\"Error\":").map_or(line, |rest| {
        rest.trim()
            .trim_end_matches(',')
            .trim_start_matches('"')
            .trim_end_matches('"')
    });
    Some(line.replace("\\\"", "\""))
}

/// Runs `go` in `dir`; on failure, returns an error with the last lines of its output.
fn go(dir: &Path, args: &[&str], what: &str) -> anyhow::Result<String> {
    let output = Command::new("go")
        .args(args)
        .current_dir(dir)
        .env("CGO_ENABLED", "0")
        .output()
        .with_context(|| format!("running go {}", args.join(" ")))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Err(GoFailure {
        what: what.to_string(),
        command: format!("go {}", args.join(" ")),
        status: output.status.to_string(),
        output: text,
    }
    .into())
}

/// A failed `go` command, with its whole output.
#[derive(Debug)]
struct GoFailure {
    what: String,
    command: String,
    status: String,
    output: String,
}

impl GoFailure {
    /// Prints the last lines of the output to stderr.
    fn show_tail(&self) {
        eprintln!(
            "---- last {FAILURE_TAIL_LINES} lines of `{}` ----\n{}\n----",
            self.command,
            tail_lines(&self.output, FAILURE_TAIL_LINES)
        );
    }
}

/// Shows the output tail of a failed `go` command, and passes the error on.
fn show_go_failure(err: anyhow::Error) -> anyhow::Error {
    if let Some(failure) = err.downcast_ref::<GoFailure>() {
        failure.show_tail();
    }
    err
}

impl std::fmt::Display for GoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed ({})", self.what, self.status)
    }
}

impl std::error::Error for GoFailure {}

/// `cargo xtask peers build`.
fn build(only: Option<Program>) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = buildplane_peers::cache::process_cache_root()?;
    let programs: Vec<Program> = only.map_or_else(|| PROGRAMS.to_vec(), |p| vec![p]);
    let mut go_checked = None;
    eprintln!("peers: cache {}", root.display());
    for source in SOURCES {
        let wanted: Vec<Program> = programs
            .iter()
            .copied()
            .filter(|p| source.programs.contains(p))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let pin = Pin::read(source)?;
        let mut todo = Vec::new();
        for program in wanted {
            let path = binary_path(&root, source, program, &pin.version);
            if path.is_file() {
                eprintln!(
                    "peers: {} {}: already built, skipped ({})",
                    program.binary(),
                    pin.version,
                    path.display()
                );
            } else {
                todo.push(program);
            }
        }
        if todo.is_empty() {
            continue;
        }
        if go_checked.is_none() {
            go_checked = Some(check_go()?);
        }
        let proxy = go_checked.as_deref().unwrap_or("");
        let revision = download(&pin, &todo, proxy)?;
        for program in todo {
            build_one(&pin, program, revision.as_deref(), &root)?;
        }
    }
    if only.is_none() {
        match find_etcd(std::env::var_os("PATH").as_deref()) {
            Some(etcd) => eprintln!(
                "peers: etcd {}: {} (installed by the system, not built)",
                etcd_version(&etcd).unwrap_or_else(|| "?".into()),
                etcd.display()
            ),
            None => bail!("{ETCD_HINT}"),
        }
    }
    eprintln!("peers: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Step "download": the pinned module (for its revision) and every module the programs need.
/// Returns the VCS revision the proxy reports for the pinned version, if any.
fn download(pin: &Pin, programs: &[Program], proxy: &str) -> anyhow::Result<Option<String>> {
    let started = Instant::now();
    let target = format!("{}@{}", pin.source.module, pin.version);
    eprintln!("peers: {target}: downloading modules (into GOMODCACHE) ...");
    let packages: Vec<String> = programs.iter().map(|p| p.package()).collect();
    let mut list = vec!["list", "-deps", "-f", "{{.ImportPath}}"];
    list.extend(packages.iter().map(String::as_str));
    let result = go(
        &pin.dir,
        &["mod", "download", "-json", &target],
        "go mod download",
    )
    .and_then(|info| Ok((info, go(&pin.dir, &list, "go list -deps")?)));
    let (info, _) = result.map_err(|err| match err.downcast_ref::<GoFailure>() {
        Some(failure) => match network_failure(&failure.output) {
            Some(cause) => format_err!(
                "cannot download {target} (GOPROXY={proxy}): {cause} — check the network, or set GOPROXY to a module proxy you can reach"
            ),
            None => show_go_failure(err),
        },
        None => err,
    })?;
    let revision = serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|info| info["Origin"]["Hash"].as_str().map(str::to_string));
    eprintln!(
        "peers: {target}: downloaded in {:.1}s{}",
        started.elapsed().as_secs_f64(),
        revision
            .as_deref()
            .map(|r| format!(" (revision {r})"))
            .unwrap_or_default()
    );
    Ok(revision)
}

/// Step "build": one program into `<cache>/<prefix>-<version>/<binary>` (via a temporary name,
/// so an interrupted build never leaves a binary that would be skipped next time).
fn build_one(
    pin: &Pin,
    program: Program,
    revision: Option<&str>,
    root: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let path = binary_path(root, pin.source, program, &pin.version);
    let dir = path.parent().expect("binary_path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = dir.join(format!("{}.partial", program.binary()));
    eprintln!(
        "peers: {} {}: building {} ...",
        program.binary(),
        pin.version,
        program.package()
    );
    let ldflags = program.ldflags(&pin.version, revision);
    let partial_arg = partial.to_string_lossy().into_owned();
    let package = program.package();
    go(
        &pin.dir,
        &[
            "build",
            "-trimpath",
            "-ldflags",
            &ldflags,
            "-o",
            &partial_arg,
            &package,
        ],
        &format!("building {}", program.binary()),
    )
    .map_err(show_go_failure)?;
    std::fs::rename(&partial, &path)
        .with_context(|| format!("moving {} to {}", partial.display(), path.display()))?;
    eprintln!(
        "peers: {} {}: built in {:.1}s -> {}",
        program.binary(),
        pin.version,
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

fn etcd_version(etcd: &Path) -> Option<String> {
    let output = Command::new(etcd).arg("--version").output().ok()?;
    parse_etcd_version(&String::from_utf8_lossy(&output.stdout))
}

/// The version in `etcd --version` output ("etcd Version: 3.4.23").
pub(crate) fn parse_etcd_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
}

/// One row of `cargo xtask peers status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatusRow {
    pub(crate) program: String,
    pub(crate) version: String,
    pub(crate) path: String,
    pub(crate) present: bool,
}

/// The status table, columns aligned.
pub(crate) fn render_table(rows: &[StatusRow]) -> String {
    let header = ["PROGRAM", "VERSION", "PATH", "STATE"];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|row| {
            [
                row.program.clone(),
                row.version.clone(),
                row.path.clone(),
                if row.present { "present" } else { "missing" }.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |row: [&str; 4]| {
        let mut text = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.push('\n');
        text
    };
    let mut table = line(header);
    for row in &cells {
        table.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
    }
    table
}

/// `cargo xtask peers status`.
fn status() -> anyhow::Result<()> {
    let root = buildplane_peers::cache::process_cache_root()?;
    let mut rows = Vec::new();
    for source in SOURCES {
        let pin = Pin::read(source);
        for &program in source.programs {
            let (version, path) = match &pin {
                Ok(pin) => {
                    let path = binary_path(&root, source, program, &pin.version);
                    (pin.version.clone(), path)
                }
                Err(_) => ("?".to_string(), root.join("?").join(program.binary())),
            };
            rows.push(StatusRow {
                program: program.binary().into(),
                version,
                present: path.is_file(),
                path: path.display().to_string(),
            });
        }
    }
    let etcd = find_etcd(std::env::var_os("PATH").as_deref());
    rows.push(StatusRow {
        program: "etcd".into(),
        version: etcd
            .as_deref()
            .and_then(etcd_version)
            .unwrap_or_else(|| "(system)".into()),
        path: etcd
            .as_deref()
            .unwrap_or(Path::new("/usr/bin/etcd"))
            .display()
            .to_string(),
        present: etcd.is_some(),
    });
    println!("cache: {}", root.display());
    print!("{}", render_table(&rows));
    if etcd.is_none() {
        println!("{ETCD_HINT}");
    }
    Ok(())
}

/// A parsed semantic version: the numeric core and whether it is a pre-release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Semver {
    pub(crate) core: (u64, u64, u64),
    pub(crate) prerelease: bool,
}

/// Parses `vMAJOR.MINOR.PATCH[-pre][+build]`.
pub(crate) fn semver(version: &str) -> Option<Semver> {
    let rest = version.strip_prefix('v')?;
    let rest = rest.split('+').next().unwrap_or(rest);
    let (core, prerelease) = match rest.split_once('-') {
        Some((core, _)) => (core, true),
        None => (rest, false),
    };
    let mut numbers = core.split('.').map(|n| n.parse::<u64>().ok());
    let parsed = (numbers.next()??, numbers.next()??, numbers.next()??);
    numbers.next().is_none().then_some(Semver {
        core: parsed,
        prerelease,
    })
}

/// The versions in a proxy `@v/list` body (one a line) or `go list -m -versions` output (the
/// module path, then the versions on one line).
pub(crate) fn parse_versions(text: &str) -> Vec<String> {
    text.split_whitespace()
        .filter(|word| semver(word).is_some())
        .map(str::to_string)
        .collect()
}

/// The newest release (no pre-release) starting with `prefix` (`"v1.37."`, or `"v"` for any).
pub(crate) fn newest_matching<'a>(versions: &'a [String], prefix: &str) -> Option<&'a str> {
    versions
        .iter()
        .filter(|v| v.starts_with(prefix))
        .filter_map(|v| semver(v).filter(|s| !s.prerelease).map(|s| (s.core, v)))
        .max_by_key(|(core, _)| *core)
        .map(|(_, v)| v.as_str())
}

/// `cargo xtask peers versions`.
fn versions() -> anyhow::Result<()> {
    check_go()?;
    for source in SOURCES {
        let pin = Pin::read(source)?;
        let output = Command::new("go")
            .args(["list", "-m", "-versions", source.module])
            .current_dir(&pin.dir)
            .output()
            .context("running go list -m -versions")?;
        if !output.status.success() {
            println!(
                "{}: pinned {}; the proxy lists no versions: {}",
                source.module,
                pin.version,
                first_line(&String::from_utf8_lossy(&output.stderr))
            );
            continue;
        }
        let served = parse_versions(&String::from_utf8_lossy(&output.stdout));
        let tracked = newest_matching(&served, source.track).unwrap_or("none");
        let newest = newest_matching(&served, "v").unwrap_or("none");
        println!(
            "{}: pinned {}; newest {}x served: {tracked}; newest release served: {newest}; {} versions listed",
            source.module,
            pin.version,
            source.track,
            served.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn binaries_live_in_one_directory_per_module_version() {
        let root = Path::new("/c");
        assert_eq!(
            binary_path(root, KUBERNETES, Program::KubeApiserver, "v1.37.2"),
            PathBuf::from("/c/kubernetes-v1.37.2/kube-apiserver")
        );
        assert_eq!(
            binary_path(root, OPENCHOREO, Program::OpenchoreoAgent, "v1.2.3"),
            PathBuf::from("/c/openchoreo-v1.2.3/cluster-agent")
        );
        assert_eq!(
            binary_path(root, OPENCHOREO_V1_0, Program::OpenchoreoAgent, "v1.0.0"),
            PathBuf::from("/c/openchoreo-v1.0.0/cluster-agent")
        );
        assert_eq!(
            Program::OpenchoreoGateway.package(),
            "github.com/openchoreo/openchoreo/cmd/cluster-gateway"
        );
    }

    #[test]
    fn pinned_version_reads_require_lines_not_replaces() {
        let go_mod = "module x\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes v1.37.2\n\nrequire (\n\tk8s.io/api v0.37.2 // indirect\n)\n\nreplace k8s.io/client-go => k8s.io/client-go v0.37.1\n";
        assert_eq!(
            pinned_version(go_mod, "k8s.io/kubernetes").as_deref(),
            Some("v1.37.2")
        );
        assert_eq!(
            pinned_version(go_mod, "k8s.io/api").as_deref(),
            Some("v0.37.2")
        );
        assert_eq!(pinned_version(go_mod, "k8s.io/client-go"), None);
        assert_eq!(pinned_version(go_mod, "k8s.io/kube"), None);
        assert_eq!(go_directive(go_mod), Some("1.26.0"));
    }

    /// The committed pins: k8s.io/kubernetes v1.37.x, and every staging module replaced by the
    /// matching v0.37.x (a bump must move them together).
    #[test]
    fn committed_kubernetes_pin_replaces_staging_modules_with_the_matching_release() {
        let pin = Pin::read(KUBERNETES).unwrap();
        assert!(pin.version.starts_with("v1.37."), "{}", pin.version);
        let staging = format!("v0{}", &pin.version[2..]);
        let replaces: Vec<&str> = pin
            .go_mod
            .lines()
            .filter(|line| line.contains("=>"))
            .collect();
        assert!(replaces.len() > 25, "{replaces:?}");
        for line in replaces {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words.len(), 4, "{line}");
            assert_eq!(words[0], words[2], "{line}");
            assert!(words[0].starts_with("k8s.io/"), "{line}");
            assert_eq!(words[3], staging, "{line}");
        }
        let openchoreo = Pin::read(OPENCHOREO).unwrap();
        assert!(semver(&openchoreo.version).is_some());
        // The second OpenChoreo pin: v1.0.x, in its own cache directory beside the newest.
        let oldest = Pin::read(OPENCHOREO_V1_0).unwrap();
        assert!(oldest.version.starts_with("v1.0."), "{}", oldest.version);
        assert_ne!(oldest.version, openchoreo.version);
        assert_eq!(
            buildplane_peers::cache::openchoreo_versions().unwrap(),
            [oldest.version, openchoreo.version],
            "crates/peers knows the same pins"
        );
    }

    #[test]
    fn kubernetes_ldflags_set_the_version_the_binaries_print() {
        let flags = Program::KubeApiserver.ldflags("v1.37.2", None);
        assert!(flags.starts_with("-s -w "));
        for package in [
            "k8s.io/component-base/version",
            "k8s.io/client-go/pkg/version",
        ] {
            assert!(flags.contains(&format!("-X {package}.gitVersion=v1.37.2")));
            assert!(flags.contains(&format!("-X {package}.gitMajor=1")));
            assert!(flags.contains(&format!("-X {package}.gitMinor=37")));
        }
        assert!(!flags.contains("gitCommit"));
        let flags = Program::OpenchoreoGateway.ldflags("v1.2.3", Some("446ff68"));
        assert!(flags.contains("internal/version.version=v1.2.3"));
        assert!(flags.contains("internal/version.componentName=cluster-gateway"));
        assert!(flags.contains("internal/version.gitRevision=446ff68"));
    }

    #[test]
    fn versions_parse_from_the_proxy_list_and_from_go_list() {
        let proxy = "v1.37.2\nv1.36.3\nv1.38.0-beta.0\n\n";
        assert_eq!(
            parse_versions(proxy),
            ["v1.37.2", "v1.36.3", "v1.38.0-beta.0"]
        );
        let go_list = "k8s.io/kubernetes v1.0.0 v1.37.0 v1.37.10 v1.37.9 v2.0.0+incompatible\n";
        assert_eq!(
            parse_versions(go_list),
            [
                "v1.0.0",
                "v1.37.0",
                "v1.37.10",
                "v1.37.9",
                "v2.0.0+incompatible"
            ]
        );
        assert_eq!(
            parse_versions("not a version v1.2 v1.2.x"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn newest_matching_compares_numerically_and_skips_prereleases() {
        let served = parse_versions("v1.37.9 v1.37.10 v1.37.11-rc.0 v1.38.0-beta.0 v1.36.12");
        assert_eq!(newest_matching(&served, "v1.37."), Some("v1.37.10"));
        assert_eq!(newest_matching(&served, "v"), Some("v1.37.10"));
        assert_eq!(newest_matching(&served, "v1.39."), None);
        let openchoreo = parse_versions("v0.17.0 v1.2.3 v1.10.0 v0.9.1");
        assert_eq!(newest_matching(&openchoreo, "v"), Some("v1.10.0"));
        assert_eq!(
            semver("v1.38.0-beta.0"),
            Some(Semver {
                core: (1, 38, 0),
                prerelease: true
            })
        );
    }

    #[test]
    fn status_table_aligns_columns() {
        let rows = [
            StatusRow {
                program: "kube-apiserver".into(),
                version: "v1.37.2".into(),
                path: "/c/kubernetes-v1.37.2/kube-apiserver".into(),
                present: true,
            },
            StatusRow {
                program: "etcd".into(),
                version: "3.4.23".into(),
                path: "/usr/bin/etcd".into(),
                present: false,
            },
        ];
        assert_eq!(
            render_table(&rows),
            "PROGRAM         VERSION  PATH                                  STATE\n\
             kube-apiserver  v1.37.2  /c/kubernetes-v1.37.2/kube-apiserver  present\n\
             etcd            3.4.23   /usr/bin/etcd                         missing\n"
        );
    }

    #[test]
    fn failures_keep_the_tail_and_name_network_causes() {
        let text: String = (1..=50).map(|i| format!("line {i}\n")).collect();
        let tail = tail_lines(&text, 40);
        assert!(tail.starts_with("line 11\n"));
        assert!(tail.ends_with("line 50"));
        assert_eq!(tail_lines("a\nb", 40), "a\nb");
        let offline = "go: k8s.io/kubernetes@v1.37.2: Get \"https://proxy.golang.org/k8s.io/kubernetes/@v/v1.37.2.info\": dial tcp: lookup proxy.golang.org: no such host\n";
        assert!(network_failure(offline).unwrap().contains("no such host"));
        let json = "{\n\t\"Path\": \"m\",\n\t\"Error\": \"m@v1: Get \\\"http://127.0.0.1:9/m/@v/v1.info\\\": dial tcp 127.0.0.1:9: connect: connection refused\"\n}\n";
        assert_eq!(
            network_failure(json).unwrap(),
            "m@v1: Get \"http://127.0.0.1:9/m/@v/v1.info\": dial tcp 127.0.0.1:9: connect: connection refused"
        );
        assert_eq!(network_failure("pkg/foo.go:1:1: syntax error"), None);
        assert_eq!(
            parse_etcd_version("etcd Version: 3.4.23\nGit SHA: Not provided\n").as_deref(),
            Some("3.4.23")
        );
    }
}
