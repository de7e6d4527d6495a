//! The k3d backend: real k3s clusters made with k3d; the implementation lives in
//! [`crate::k3d`] (values, rendered manifests, command plans, the backend itself).

pub use crate::k3d::backend::{K3dBackend, K3dBackendOptions, Setup};
