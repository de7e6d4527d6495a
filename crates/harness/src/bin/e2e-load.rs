//! `e2e-load`: one `load` operation's open-loop load generator in a process of its own (see
//! `buildplane_harness::load`): a job as one JSON line on stdin, the outcomes as one JSON line
//! on stdout; closing stdin stops it early.

#[global_allocator]
static GLOBAL: buildplane_runtime::Allocator = buildplane_runtime::Allocator;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(buildplane_harness::load::serve_stdio());
    // The stdin watcher blocks in a read on a thread of its own while the harness keeps stdin
    // open: do not wait for it.
    runtime.shutdown_background();
    result
}
