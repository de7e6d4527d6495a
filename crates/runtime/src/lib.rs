//! What every buildplane binary needs around its logic: duration flags, the open-files limit,
//! the Kubernetes client from a kubeconfig, the shutdown signals, supervision of long-lived
//! tasks, NDJSON line splitting, the mTLS client of the gateway's internal API, and the memory
//! allocator of the binaries on the data path.
//!
//! Each lived as a copy in the gateway, agent, controller and kube-sim mains; the copies had
//! drifted (the gateway's duration parser lacked `d`, one shutdown signal ignored SIGTERM).

pub mod duration;
pub mod internal_api;
pub mod kubeconfig;
pub mod limits;
pub mod ndjson;
pub mod signal;
pub mod tasks;

/// The global allocator of the binaries that carry proxied requests (gateway, agent, and the
/// bench processes that host them): mimalloc. Each request allocates and frees dozens of small
/// buffers across two runtime threads; glibc's malloc took a tenth of the CPU at 1 KiB c64
/// (`perf`, 2026-12-06). A binary declares it with
/// `#[global_allocator] static GLOBAL: buildplane_runtime::Allocator = buildplane_runtime::Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

pub use crate::{
    duration::{DurationError, MAX_DURATION, parse_duration, parse_positive_duration},
    internal_api::{InternalClientError, internal_api_client},
    kubeconfig::{KubeconfigError, kube_client, kube_config},
    limits::raise_open_files_limit,
    ndjson::LineBuffer,
    signal::shutdown_signal,
    tasks::{TaskEnded, Tasks},
};
