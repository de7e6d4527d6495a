//! Building the component binaries with cargo and finding them (for the sim backend).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use crate::backend::sim::Binaries;

/// The component packages and their binaries.
pub const COMPONENTS: [(&str, &str); 4] = [
    ("kube-sim", "kube-sim"),
    ("cluster-gateway", "cluster-gateway"),
    ("cluster-agent", "cluster-agent"),
    ("buildplane-controller", "buildplane-controller"),
];

/// Builds each component package on its own (so one broken crate does not hide the others)
/// and returns where the binaries are, with the build errors of those that failed.
///
/// `cargo` is the cargo to run (the `CARGO` environment variable under cargo), `root` the
/// workspace root. Cargo's own progress goes to stderr as usual.
pub fn build_components(cargo: &Path, root: &Path, progress: &dyn Fn(String)) -> Binaries {
    let mut dir: Option<PathBuf> = None;
    let mut build_errors = BTreeMap::new();
    for (package, binary) in COMPONENTS {
        progress(format!("building {package}"));
        let output = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--message-format=json-render-diagnostics",
                "-p",
                package,
                "--bin",
                binary,
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output();
        let output = match output {
            Ok(output) => output,
            Err(err) => {
                build_errors.insert(
                    binary.to_string(),
                    format!("could not run {}: {err}", cargo.display()),
                );
                continue;
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        for line in stdout.lines() {
            let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(executable) = message.get("executable").and_then(|e| e.as_str())
                && Path::new(executable)
                    .file_name()
                    .is_some_and(|n| n == binary)
            {
                dir = Path::new(executable).parent().map(Path::to_path_buf);
            }
        }
        if !output.status.success() {
            let reason = format!(
                "`cargo build -p {package} --bin {binary}` failed (see the compiler output above); \
                 the crate may not have a `{binary}` binary yet"
            );
            progress(format!(
                "build of {package} failed; scenarios needing it will fail"
            ));
            build_errors.insert(binary.to_string(), reason);
        }
    }
    let dir = dir.unwrap_or_else(|| default_bin_dir(root));
    Binaries { dir, build_errors }
}

/// `$CARGO_TARGET_DIR/debug`, or `<root>/target/debug`.
pub fn default_bin_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
        .join("debug")
}
