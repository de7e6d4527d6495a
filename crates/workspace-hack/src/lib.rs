//! Feature unification for the workspace, managed by `cargo hakari`: every crate depends on this
//! one, so building any subset (the harness's component binaries, the benches, `cargo test`)
//! resolves the same features and reuses the same compiled dependencies. Regenerate it with
//! `cargo hakari generate` after changing a dependency; see `.config/hakari.toml`.
