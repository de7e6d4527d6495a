//! `cargo xtask tidy`: repository conventions that are cheaper to check than to review.

use std::path::Path;

use anyhow::{Context, bail};

use buildplane_harness::build::cargo_command;

use crate::project_root;

/// Crates the wire-protocol crate must never depend on (it does no I/O).
const IO_CRATES: &[&str] = &[
    "tokio",
    "rustls",
    "tungstenite",
    "tokio-tungstenite",
    "kube",
    "hyper",
];

/// Runs every check and reports all failures at once.
pub(crate) fn run() -> anyhow::Result<()> {
    let mut failures = Vec::new();
    check_module_docs(&project_root(), &mut failures)?;
    check_tunnel_has_no_io(&mut failures)?;
    check_workspace_hack(&project_root(), &mut failures)?;
    if !failures.is_empty() {
        bail!(
            "tidy found {} problem(s):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    println!("tidy: ok");
    Ok(())
}

/// Every `.rs` file under crates/, xtask/ and benches/ opens with a `//!` line.
fn check_module_docs(root: &Path, failures: &mut Vec<String>) -> anyhow::Result<()> {
    for top in ["crates", "xtask", "benches"] {
        walk(&root.join(top), &mut |path| {
            if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(path)?;
                if !text.trim_start().starts_with("//!") {
                    let shown = path.strip_prefix(root).unwrap_or(path);
                    failures.push(format!("{}: missing `//!` module doc", shown.display()));
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn walk(dir: &Path, visit: &mut dyn FnMut(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "snapshots" {
                walk(&path, visit)?;
            }
        } else {
            visit(&path)?;
        }
    }
    Ok(())
}

/// `buildplane-tunnel` has no tokio, rustls, tungstenite, kube or hyper in its normal dependencies.
fn check_tunnel_has_no_io(failures: &mut Vec<String>) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = cargo_command(cargo)
        .args([
            "tree",
            "-p",
            "buildplane-tunnel",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(project_root())
        .output()
        .context("running cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&output.stdout);
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if IO_CRATES.contains(&name) {
            failures.push(format!("buildplane-tunnel depends on I/O crate {name}"));
        }
    }
    Ok(())
}

/// Every member but the protocol crate depends on `workspace-hack`, so builds of any subset of the
/// workspace share compiled dependencies (`cargo hakari manage-deps` adds the line).
fn check_workspace_hack(root: &Path, failures: &mut Vec<String>) -> anyhow::Result<()> {
    let mut manifests = vec![
        root.join("xtask/Cargo.toml"),
        root.join("benches/Cargo.toml"),
    ];
    for entry in std::fs::read_dir(root.join("crates"))? {
        manifests.push(entry?.path().join("Cargo.toml"));
    }
    for manifest in manifests {
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let package = manifest
            .parent()
            .and_then(|p| p.file_name())
            .unwrap_or_default();
        if package == "tunnel" || package == "workspace-hack" {
            continue;
        }
        if !text.lines().any(|l| l.starts_with("workspace-hack")) {
            let shown = manifest.strip_prefix(root).unwrap_or(&manifest);
            failures.push(format!(
                "{}: no workspace-hack dependency (run `cargo hakari manage-deps`)",
                shown.display()
            ));
        }
    }
    Ok(())
}
