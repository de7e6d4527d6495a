//! Real Kubernetes clusters for `cargo test`: a k3s container (testcontainers' K3s module)
//! with a kube `Client`, our images preloaded, and the BuildPlane CRDs installed on request.
//!
//! Tests that need one call [`K3sCluster::start_or_skip`]: where no Docker engine answers it
//! prints why the test is skipped and returns `None`, so `cargo test` stays green on machines
//! without Docker; with `BUILDPLANE_REQUIRE_DOCKER=1` (set in the GitHub workflow) a missing
//! engine fails the test instead, so a broken runner cannot turn the suite into skips.
//!
//! ```no_run
//! # async fn demo() -> Result<(), buildplane_testcluster::Error> {
//! use buildplane_testcluster::{K3sCluster, K3sOptions};
//! let Some(cluster) = K3sCluster::start_or_skip("my_test", K3sOptions::from_env()).await? else {
//!     return Ok(());
//! };
//! cluster.install_crds().await?;
//! let client = cluster.client().clone();
//! # drop(client); Ok(()) }
//! ```

pub mod docker;
pub mod kubeconfig;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use testcontainers_modules::k3s::{K3s, KUBE_SECURE_PORT};
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt, TestcontainersError};
use tracing::info;

/// The k3s image used when `BUILDPLANE_K3S_IMAGE` is not set; the same as `k3d/values.yaml`
/// (a test keeps the two equal).
pub const DEFAULT_K3S_IMAGE: &str = "rancher/k3s:v1.37.0-k3s1";

/// Environment variable choosing the k3s image (`rancher/k3s:v1.36.0-k3s1`); the workflow's
/// matrix sets it.
pub const K3S_IMAGE_ENV: &str = "BUILDPLANE_K3S_IMAGE";

/// Environment variable listing local images to load into the cluster, comma-separated.
pub const IMAGES_ENV: &str = "BUILDPLANE_TEST_IMAGES";

/// When set to `1`, a missing Docker engine fails tests instead of skipping them.
pub const REQUIRE_DOCKER_ENV: &str = "BUILDPLANE_REQUIRE_DOCKER";

/// Where k3s imports image tarballs from when it starts.
const K3S_IMAGES_DIR: &str = "/var/lib/rancher/k3s/agent/images";

/// The kubeconfig k3s writes inside the container.
const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";

/// The field manager of everything this crate applies.
const FIELD_MANAGER: &str = "buildplane-testcluster";

/// What can go wrong starting or using a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Docker engine answers; see [`K3sCluster::start_or_skip`].
    #[error("{0}")]
    NoEngine(docker::Unavailable),
    /// The image reference is not `name:tag`.
    #[error("k3s image {0:?} is not of the form name:tag (e.g. {DEFAULT_K3S_IMAGE})")]
    ImageReference(String),
    /// `docker save` of an image to load failed.
    #[error("saving image {image} with `docker save`: {message}")]
    SaveImage { image: String, message: String },
    /// testcontainers could not start or inspect the container.
    #[error("k3s container ({image}): {source}")]
    Container {
        image: String,
        #[source]
        source: TestcontainersError,
    },
    /// The kubeconfig k3s wrote is not usable.
    #[error("k3s kubeconfig: {0}")]
    Kubeconfig(#[from] kubeconfig::Error),
    /// A Kubernetes API call failed.
    #[error("{context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// Local file system trouble (temporary directories for image tarballs).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct K3sOptions {
    /// `rancher/k3s:vX.Y.Z-k3sN`.
    pub image: String,
    /// Local Docker images to preload (`docker save`, imported by k3s at start).
    pub images: Vec<String>,
    /// How long k3s may take to report its node ready.
    pub startup_timeout: Duration,
}

impl Default for K3sOptions {
    fn default() -> Self {
        Self {
            image: DEFAULT_K3S_IMAGE.to_owned(),
            images: Vec::new(),
            startup_timeout: Duration::from_secs(180),
        }
    }
}

impl K3sOptions {
    /// Defaults, with [`K3S_IMAGE_ENV`] and [`IMAGES_ENV`] applied.
    pub fn from_env() -> Self {
        Self::from_vars(
            std::env::var(K3S_IMAGE_ENV).ok().as_deref(),
            std::env::var(IMAGES_ENV).ok().as_deref(),
        )
    }

    fn from_vars(image: Option<&str>, images: Option<&str>) -> Self {
        let mut options = Self::default();
        if let Some(image) = image.map(str::trim).filter(|i| !i.is_empty()) {
            image.clone_into(&mut options.image);
        }
        if let Some(images) = images {
            options.images = images
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(str::to_owned)
                .collect();
        }
        options
    }

    /// Also preload `image` (a local Docker image, e.g. `openchoreo/cluster-agent:dev`).
    pub fn with_image(mut self, image: impl Into<String>) -> Self {
        self.images.push(image.into());
        self
    }
}

/// Splits `repo[:port]/name:tag` into name and tag (the tag is after the last `:` that follows
/// the last `/`).
pub fn split_image(reference: &str) -> Result<(&str, &str), Error> {
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[slash..].rfind(':') {
        Some(colon) if colon > 0 && slash + colon + 1 < reference.len() => {
            Ok((&reference[..slash + colon], &reference[slash + colon + 1..]))
        }
        _ => Err(Error::ImageReference(reference.to_owned())),
    }
}

/// A running k3s container; removed when dropped.
pub struct K3sCluster {
    container: ContainerAsync<K3s>,
    client: kube::Client,
    kubeconfig_yaml: String,
    image: String,
    // The image tarballs are copied into the container before it starts; the directory only
    // has to outlive `start`, but keeping it costs nothing and helps debugging.
    _images: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for K3sCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K3sCluster")
            .field("container", &self.container.id())
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

impl K3sCluster {
    /// Starts a cluster, or returns `Ok(None)` after printing why `test` is skipped when no
    /// Docker engine answers. With `BUILDPLANE_REQUIRE_DOCKER=1` a missing engine is an error.
    pub async fn start_or_skip(test: &str, options: K3sOptions) -> Result<Option<Self>, Error> {
        match docker::detect() {
            Ok(_) => Self::start(options).await.map(Some),
            Err(unavailable) if require_docker() => Err(Error::NoEngine(unavailable)),
            Err(unavailable) => {
                eprintln!(
                    "skipped {test}: it needs a real k3s cluster and {unavailable}. Start Docker \
                     (or set DOCKER_HOST) to run it; the GitHub workflow e2e.yml runs it with \
                     {REQUIRE_DOCKER_ENV}=1."
                );
                Ok(None)
            }
        }
    }

    /// Starts a cluster: preloads the images, starts k3s, waits for its node controller and
    /// for the API server to answer through the mapped port.
    pub async fn start(options: K3sOptions) -> Result<Self, Error> {
        let unavailable = docker::detect().err();
        if let Some(unavailable) = unavailable {
            return Err(Error::NoEngine(unavailable));
        }
        let (name, tag) = split_image(&options.image)?;
        let container_err = |source| Error::Container {
            image: options.image.clone(),
            source,
        };
        let mut request = K3s::default()
            .with_name(name)
            .with_tag(tag)
            .with_privileged(true)
            .with_userns_mode("host")
            .with_startup_timeout(options.startup_timeout);
        let images = if options.images.is_empty() {
            None
        } else {
            let dir = tempfile::Builder::new()
                .prefix("buildplane-images-")
                .tempdir()
                .map_err(|source| Error::Io {
                    context: "creating a directory for image tarballs".into(),
                    source,
                })?;
            for (index, image) in options.images.iter().enumerate() {
                let tarball = save_image(image, dir.path(), index)?;
                let file_name = tarball
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                request = request.with_copy_to(format!("{K3S_IMAGES_DIR}/{file_name}"), tarball);
            }
            Some(dir)
        };
        info!(image = %options.image, preload = ?options.images, "starting k3s");
        let container = request.start().await.map_err(container_err)?;
        let port = container
            .get_host_port_ipv4(KUBE_SECURE_PORT)
            .await
            .map_err(container_err)?;
        let host = container.get_host().await.map_err(container_err)?;
        let written = container
            .copy_file_from(K3S_KUBECONFIG, Vec::<u8>::new())
            .await
            .map_err(container_err)?;
        let kubeconfig_yaml =
            kubeconfig::point_at(&String::from_utf8_lossy(&written), &host.to_string(), port)?;
        let client = kubeconfig::client(&kubeconfig_yaml).await?;
        wait_for_api(&client, Duration::from_secs(60)).await?;
        info!(image = %options.image, %host, port, "k3s is serving");
        Ok(Self {
            container,
            client,
            kubeconfig_yaml,
            image: options.image,
            _images: images,
        })
    }

    /// A client for the cluster's API server (cluster-admin).
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// A kubeconfig for the cluster, pointing at the mapped port on the host.
    pub fn kubeconfig_yaml(&self) -> &str {
        &self.kubeconfig_yaml
    }

    /// Writes the kubeconfig to `path` (for `kubectl --kubeconfig`).
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> Result<(), Error> {
        std::fs::write(path, &self.kubeconfig_yaml).map_err(|source| Error::Io {
            context: format!("writing {}", path.display()),
            source,
        })
    }

    /// The k3s image the cluster runs.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// Installs the BuildPlane and ClusterBuildPlane CRDs (generated from `buildplane-api`)
    /// and waits until the API server serves them.
    pub async fn install_crds(&self) -> Result<(), Error> {
        install_crds(&self.client).await
    }
}

fn require_docker() -> bool {
    std::env::var(REQUIRE_DOCKER_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// `docker save` one image into `dir`; the tarball is what k3s imports.
fn save_image(image: &str, dir: &std::path::Path, index: usize) -> Result<PathBuf, Error> {
    let safe: String = image
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = dir.join(format!("{index:02}-{safe}.tar"));
    let output = std::process::Command::new("docker")
        .arg("save")
        .arg("-o")
        .arg(&path)
        .arg(image)
        .output()
        .map_err(|err| Error::SaveImage {
            image: image.to_owned(),
            message: format!("running docker: {err} (is the Docker CLI installed?)"),
        })?;
    if !output.status.success() {
        return Err(Error::SaveImage {
            image: image.to_owned(),
            message: format!(
                "{}; build it first (e.g. `docker build -t {image} .`)",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(path)
}

/// Polls `/version` until the API server answers.
async fn wait_for_api(client: &kube::Client, within: Duration) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match client.apiserver_version().await {
            Ok(_) => return Ok(()),
            Err(err) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::Kube {
                    context: format!("the API server did not answer within {within:?}"),
                    source: err,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Applies the API's CRDs with server-side apply and waits for `Established` on each.
/// Works against any API server: k3s here, kube-sim in this crate's own tests.
pub async fn install_crds(client: &kube::Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in buildplane_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(|source| Error::Kube {
                context: format!("applying CRD {name}"),
                source,
            })?;
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        let within = Duration::from_secs(60);
        match tokio::time::timeout(within, established).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                return Err(Error::Timeout {
                    what: format!("CRD {name} to be established ({err})"),
                    after: within,
                });
            }
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("CRD {name} to be established"),
                    after: within,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        assert_eq!(
            split_image("rancher/k3s:v1.37.0-k3s1").unwrap(),
            ("rancher/k3s", "v1.37.0-k3s1")
        );
        assert_eq!(
            split_image("registry.local:5000/rancher/k3s:v1.36.0-k3s1").unwrap(),
            ("registry.local:5000/rancher/k3s", "v1.36.0-k3s1")
        );
        for bad in [
            "rancher/k3s",
            "registry.local:5000/rancher/k3s",
            "k3s:",
            ":v1",
            "",
        ] {
            let err = split_image(bad).unwrap_err();
            assert!(
                err.to_string().contains("is not of the form name:tag"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn options_from_the_environment() {
        let defaults = K3sOptions::from_vars(None, None);
        assert_eq!(defaults.image, DEFAULT_K3S_IMAGE);
        assert!(defaults.images.is_empty());
        let set = K3sOptions::from_vars(
            Some(" rancher/k3s:v1.36.0-k3s1 "),
            Some("openchoreo/cluster-agent:dev, openchoreo/cluster-gateway:dev,,"),
        );
        assert_eq!(set.image, "rancher/k3s:v1.36.0-k3s1");
        assert_eq!(
            set.images,
            [
                "openchoreo/cluster-agent:dev",
                "openchoreo/cluster-gateway:dev"
            ]
        );
        assert_eq!(
            K3sOptions::from_vars(Some(""), None).image,
            DEFAULT_K3S_IMAGE
        );
    }

    /// The default k3s image is the one the k3d backend deploys, so `cargo test` and
    /// `cargo xtask e2e --backend k3d` exercise the same Kubernetes version.
    #[test]
    fn default_image_matches_the_k3d_values() {
        let values = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../k3d/values.yaml"),
        )
        .unwrap();
        let line = values
            .lines()
            .find_map(|l| l.trim().strip_prefix("k3sImage:"))
            .expect("k3d/values.yaml sets k3sImage");
        assert_eq!(line.trim(), DEFAULT_K3S_IMAGE);
    }

    #[test]
    fn saving_a_missing_image_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        // With no Docker CLI or no engine, `docker save` fails either way; the message must say
        // which image and how to get it.
        let err = save_image("buildplane-test/does-not-exist:never", dir.path(), 0).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "saving image buildplane-test/does-not-exist:never with `docker save`"
            ),
            "{text}"
        );
    }
}
