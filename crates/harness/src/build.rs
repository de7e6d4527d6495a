//! Building the component binaries with cargo and finding them (for the sim backend).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use crate::backend::sim::Binaries;

/// The component packages and their binaries (and the harness's own processes: the fault
/// proxy beside each swarm process, and the load generator of each `load`).
pub const COMPONENTS: [(&str, &str); 6] = [
    ("kube-sim", "kube-sim"),
    ("cluster-gateway", "cluster-gateway"),
    ("cluster-agent", "cluster-agent"),
    ("buildplane-controller", "buildplane-controller"),
    ("buildplane-harness", "e2e-fault-proxy"),
    ("buildplane-harness", "e2e-load"),
];

/// The variables cargo sets for the package it runs (`cargo xtask` runs the xtask package).
/// Build scripts track some of them (ring's tracks `CARGO_MANIFEST_DIR`), so a cargo started
/// from xtask with them inherited sees those scripts as changed and rebuilds ring, rustls and
/// everything above them, and the next plain `cargo build` or `cargo test` rebuilds them back.
const PACKAGE_VARIABLES: [&str; 6] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// A `cargo` command with the environment of the invoking cargo's package removed, so the
/// builds it runs share their artifacts with the user's own `cargo build` and `cargo test`.
/// `cargo` is the `CARGO` variable under cargo, else `cargo`.
pub fn cargo_command(cargo: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if PACKAGE_VARIABLES.contains(&name) || name.starts_with("CARGO_PKG_") {
            command.env_remove(name);
        }
    }
    command
}

/// Builds the component binaries and returns where they are, with the build errors of those
/// that failed.
///
/// All of them are built in one cargo invocation (features unified once, so shared dependencies
/// compile once); only if that fails is each package built on its own, so one broken crate
/// does not hide the others. `cargo` is the cargo to run (the `CARGO` environment variable
/// under cargo), `root` the workspace root. Cargo's own progress goes to stderr as usual.
pub fn build_components(
    cargo: &Path,
    root: &Path,
    profile: BuildProfile,
    progress: &dyn Fn(String),
) -> Binaries {
    let mut dir: Option<PathBuf> = None;
    let mut build_errors = BTreeMap::new();
    let all: Vec<(&str, &str)> = COMPONENTS.to_vec();
    progress(format!(
        "building {}",
        all.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
    ));
    match cargo_build(cargo, root, profile, &all, &mut dir) {
        Ok(()) => {}
        Err(_) => {
            progress("the joint build failed; building each component on its own".into());
            for component in COMPONENTS {
                let (package, binary) = component;
                if let Err(err) = cargo_build(cargo, root, profile, &[component], &mut dir) {
                    progress(format!(
                        "build of {package} failed; scenarios needing it will fail"
                    ));
                    build_errors.insert(binary.to_string(), err);
                }
            }
        }
    }
    let dir = dir.unwrap_or_else(|| default_bin_dir(root, profile));
    Binaries { dir, build_errors }
}

/// One `cargo build` of the given (package, binary) pairs; records the binaries' directory.
fn cargo_build(
    cargo: &Path,
    root: &Path,
    profile: BuildProfile,
    components: &[(&str, &str)],
    dir: &mut Option<PathBuf>,
) -> Result<(), String> {
    let mut args = vec![
        "build".to_string(),
        "--message-format=json-render-diagnostics".to_string(),
    ];
    if profile == BuildProfile::Release {
        args.push("--release".to_string());
    }
    for (package, binary) in components {
        args.extend([
            "-p".to_string(),
            package.to_string(),
            "--bin".to_string(),
            binary.to_string(),
        ]);
    }
    let output = cargo_command(cargo)
        .current_dir(root)
        .args(&args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| format!("could not run {}: {err}", cargo.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(executable) = message.get("executable").and_then(|e| e.as_str()) {
            *dir = Path::new(executable).parent().map(Path::to_path_buf);
        }
    }
    if output.status.success() {
        return Ok(());
    }
    let names: Vec<String> = components
        .iter()
        .map(|(p, b)| format!("-p {p} --bin {b}"))
        .collect();
    Err(format!(
        "`cargo build {}` failed (see the compiler output above); the crate may not have that binary yet",
        names.join(" ")
    ))
}

/// The cargo profile the component binaries are built with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BuildProfile {
    /// `dev` (`target/debug`): quick to build; every request costs several times the CPU.
    #[default]
    Debug,
    /// `release` (`target/release`): as the product ships; for scenarios that measure time
    /// under CPU contention (noisy-neighbour).
    Release,
}

/// `$CARGO_TARGET_DIR/<profile>`, or `<root>/target/<profile>`.
pub fn default_bin_dir(root: &Path, profile: BuildProfile) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
        .join(match profile {
            BuildProfile::Debug => "debug",
            BuildProfile::Release => "release",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--release` looks for the binaries where `cargo build --release` puts them.
    #[test]
    fn each_profile_has_its_own_directory() {
        let root = Path::new("/workspace");
        let debug = default_bin_dir(root, BuildProfile::Debug);
        let release = default_bin_dir(root, BuildProfile::Release);
        assert!(debug.ends_with("debug"), "{}", debug.display());
        assert!(release.ends_with("release"), "{}", release.display());
        assert_eq!(debug.parent(), release.parent());
    }
}
