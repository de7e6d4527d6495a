//! The BuildPlane API (`openchoreo.dev/v1alpha1`): types, names, validation and CRD generation.
//!
//! Two kinds describe how the control plane reaches a build cluster through its cluster agent:
//! [`BuildPlane`] (namespaced, one per organisation namespace) and [`ClusterBuildPlane`]
//! (cluster-scoped, `planeID` required). Several CRs may share one planeID: one physical build
//! cluster then serves several tenants, each CR with its own `clientCA`.
//!
//! # The effective planeID
//! The seed documentation says both "default `default-buildplane`" (in the field table) and
//! "If not specified, it defaults to the CR name for backwards compatibility" (in the prose).
//! OpenChoreo's controller, gateway and clients all implement the second, and no API-server
//! default exists, so [`PlaneCr::effective_plane_id`] returns `spec.planeID` or else the CR name.
//! A CRD default of `default-buildplane` would silently merge every unnamed BuildPlane into one
//! plane, which is the opposite of what users expect.

mod crd;
pub mod events;
pub mod names;
pub mod served;
mod types;
mod validation;

pub use crd::{CRD_FILES, CrdGenerator, crd_yaml, crd_yaml_all, crds};
pub use types::*;
pub use validation::{PLANE_ID_MAX_LEN, PLANE_ID_PATTERN, ValidationError, validate_plane_id};
