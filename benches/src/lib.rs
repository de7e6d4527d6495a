//! Benchmark fixtures shared by the criterion benches and `buildplane-bench`: the PKI, a
//! fixed-response HTTP backend, the tunnel (kube-sim, gateway and one v1 and one v2 agent
//! in-process), a raw TLS byte relay with the same hops, and the HTTP client that drives them.
//!
//! Every path ends at the same backend: `GET /size/{n}` answers `n` bytes.
//! - direct: client → backend (plain HTTP/1.1).
//! - relay: client → relay 1 (mTLS, internal CA) → TLS → relay 2 → backend; bytes are copied,
//!   nothing is parsed.
//! - tunnel: client → gateway internal API (mTLS) → WebSocket over TLS → agent → backend.
//! - replicas: client → balancer → one of N gateway replicas' internal API → balancer → agent
//!   (which holds one connection to every replica) → backend; N = 1 and 3.
//! - rathole, a peer: client → rathole server (TCP) → TLS → rathole client → backend, two
//!   processes of the binary `cargo xtask bench` builds (skipped, with the reason, without it).

pub mod balancer;
pub mod fixture;
pub mod load;
pub mod rathole;

pub use balancer::Balancer;
pub use fixture::{Backend, Pki, Relay, Replicas, Tunnel, Upstream, relay_hop};
pub use load::{fetch, round};
pub use rathole::{Peer, Rathole};

/// Response sizes of the end-to-end benches.
pub const KIB: usize = 1024;
/// One mebibyte.
pub const MIB: usize = 1024 * 1024;
/// Largest body the backend serves.
pub const MAX_BODY: usize = 16 * MIB;

/// Installs a `warn` tracing subscriber (overridden by `RUST_LOG`) and the crypto provider.
pub fn init() {
    buildplane_pki::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube=error".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    // c256 rounds and fleets of agents hold many sockets: raise the open-files soft limit.
    buildplane_runtime::raise_open_files_limit();
}

/// Whether the benches run in the short CI smoke mode (`BUILDPLANE_BENCH_QUICK=1`).
pub fn quick() -> bool {
    std::env::var("BUILDPLANE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}
