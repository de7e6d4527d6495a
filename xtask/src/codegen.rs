//! `cargo xtask codegen`: writes the CRD YAML generated from crates/api into k3d/manifests/crds.

use anyhow::{Context, bail};

use crate::project_root;

/// Writes (or with `check`, verifies) every generated file.
pub(crate) fn run(check: bool) -> anyhow::Result<()> {
    let mut stale = Vec::new();
    for (path, generate) in buildplane_api::CRD_FILES {
        let target = project_root().join(path);
        let fresh = buildplane_api::crd_yaml(&generate());
        let current = std::fs::read_to_string(&target).unwrap_or_default();
        if current == fresh {
            continue;
        }
        if check {
            stale.push(*path);
            continue;
        }
        let dir = target.parent().context("generated file has a directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&target, fresh).with_context(|| format!("writing {}", target.display()))?;
        println!("wrote {path}");
    }
    if !stale.is_empty() {
        bail!(
            "stale generated files (run `cargo xtask codegen`): {}",
            stale.join(", ")
        );
    }
    Ok(())
}
