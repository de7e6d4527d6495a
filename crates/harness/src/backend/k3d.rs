//! The k3d backend placeholder: the scenario files and the trait are ready for it, the
//! implementation is its own issue.

use super::{Backend, BackendError, BoxFuture, EnvSpec, Environment, Result};

/// Placeholder for real k3s clusters created with k3d.
pub struct K3dBackend;

impl Backend for K3dBackend {
    fn name(&self) -> &'static str {
        "k3d"
    }

    fn isolated(&self) -> bool {
        false
    }

    fn environment(&self, _spec: EnvSpec) -> BoxFuture<'_, Result<Box<dyn Environment>>> {
        Box::pin(async {
            Err(BackendError::NotImplemented {
                backend: "k3d",
                issue: "the k3d backend issue (k3d/ and xtask k3d); use --backend sim",
            })
        })
    }
}
