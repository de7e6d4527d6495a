//! rathole, a reverse tunnel a user could pick instead of ours, started as two processes with its
//! TLS transport: the server in the control-plane role (the caller connects to it), the client in
//! the build-cluster role (next to the backend, dialing out to the server).
//!
//! Path: client → rathole server (plain TCP, as rathole serves its visitors) → TLS data channel,
//! one per visitor connection → rathole client → backend. The data channels are opened by the
//! rathole client towards the server, as the agent dials the gateway.
//!
//! The binary is rathole 0.5.0 as published, built by `cargo xtask bench` from
//! `benches/peers/rathole` (which says why it is not `cargo install --locked`). Its TLS is
//! native-tls, so OpenSSL on Linux: the server needs a PKCS#12 identity, which is packed here from
//! the benches' serving leaf with the `openssl` command.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::Pki;

/// The variable naming the rathole binary; `cargo xtask bench` sets it for the benches.
pub const RATHOLE_ENV: &str = "BUILDPLANE_RATHOLE";

/// Password of the PKCS#12 identity (the file lives in a temporary directory of the run).
const PKCS12_PASSWORD: &str = "buildplane-bench";

/// Token the rathole client presents for the service.
const TOKEN: &str = "buildplane-bench-token";

/// Name of the one rathole service, the backend.
const SERVICE: &str = "backend";

/// What starting a peer gave: running, or skipped with the reason (never a made-up figure).
pub enum Peer {
    /// Started and answering through its service port.
    Running(Box<Rathole>),
    /// Cannot run on this machine; the reason says why and what to do.
    Skipped(String),
}

/// A running rathole server and client in front of the backend. Both processes are killed
/// when this is dropped.
pub struct Rathole {
    /// The rathole server's service port, where callers connect.
    pub addr: SocketAddr,
    server: Child,
    client: Child,
    dir: tempfile::TempDir,
}

impl Rathole {
    /// Starts rathole from the binary named by `BUILDPLANE_RATHOLE`, or skips when it is unset.
    pub async fn from_env(pki: &Pki, backend: SocketAddr) -> anyhow::Result<Peer> {
        match std::env::var_os(RATHOLE_ENV) {
            Some(bin) if !bin.is_empty() => Rathole::start(Path::new(&bin), pki, backend).await,
            _ => Ok(Peer::Skipped(format!(
                "{RATHOLE_ENV} is not set (`cargo xtask bench` builds rathole and sets it)"
            ))),
        }
    }

    /// Starts a rathole server and client from `bin`, the server with an identity issued by the
    /// benches' server CA and the client trusting that CA, and waits until a request goes through.
    /// Skips when `bin` or the `openssl` command is missing; any other failure is an error.
    pub async fn start(bin: &Path, pki: &Pki, backend: SocketAddr) -> anyhow::Result<Peer> {
        if !bin.is_file() {
            return Ok(Peer::Skipped(format!(
                "no rathole binary at {}",
                bin.display()
            )));
        }
        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let cert = write("server.crt", &pki.server.cert_pem)?;
        let key = write("server.key", &pki.server.key_pem)?;
        let ca = write("server-ca.crt", pki.server_ca.cert_pem())?;
        let identity = dir.path().join("server.p12");
        if let Err(reason) = pack_pkcs12(&cert, &key, &ca, &identity).await? {
            return Ok(Peer::Skipped(reason));
        }
        let control = free_port()?;
        let service = free_port()?;
        let server_toml = write("server.toml", &server_config(control, service, &identity))?;
        let client_toml = write("client.toml", &client_config(control, backend, &ca))?;
        let server = spawn(
            bin,
            "--server",
            &server_toml,
            &dir.path().join("server.log"),
        )?;
        let client = spawn(
            bin,
            "--client",
            &client_toml,
            &dir.path().join("client.log"),
        )?;
        let mut rathole = Rathole {
            addr: service,
            server,
            client,
            dir,
        };
        rathole.wait_ready().await?;
        Ok(Peer::Running(Box::new(rathole)))
    }

    /// The URL of an `n`-byte response through rathole (plain HTTP: rathole's visitors speak TCP).
    pub fn url(&self, n: usize) -> String {
        format!("http://{}/size/{n}", self.addr)
    }

    /// Waits until a 16-byte response comes back through the tunnel, or fails with the logs.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().http1_only().build()?;
        let url = self.url(16);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let exited = match (self.server.try_wait()?, self.client.try_wait()?) {
                (Some(status), _) => Some(("server", status)),
                (None, Some(status)) => Some(("client", status)),
                (None, None) => None,
            };
            if let Some((name, status)) = exited {
                bail!(
                    "the rathole {name} exited ({status}) before answering:\n{}",
                    self.logs()
                );
            }
            let res = crate::fetch(&http, &url).await;
            match res {
                Ok(16) => return Ok(()),
                res if tokio::time::Instant::now() > deadline => bail!(
                    "rathole never answered through {url}: {res:?}\n{}",
                    self.logs()
                ),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The end of both processes' logs, for an error.
    fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        format!(
            "--- rathole server log\n{}\n--- rathole client log\n{}",
            tail("server.log"),
            tail("client.log")
        )
    }
}

impl Drop for Rathole {
    fn drop(&mut self) {
        let _ = self.server.start_kill();
        let _ = self.client.start_kill();
    }
}

/// The server: the control channel on `control`, the service (where callers connect) on
/// `service`, TLS with the PKCS#12 identity. Everything else is rathole's default.
fn server_config(control: SocketAddr, service: SocketAddr, identity: &Path) -> String {
    format!(
        r#"[server]
bind_addr = "{control}"
default_token = "{TOKEN}"

[server.transport]
type = "tls"

[server.transport.tls]
pkcs12 = "{identity}"
pkcs12_password = "{PKCS12_PASSWORD}"

[server.services.{SERVICE}]
bind_addr = "{service}"
"#,
        identity = identity.display()
    )
}

/// The client: dials the server over TLS (verifying it against `ca` for the name `localhost`)
/// and forwards the service to `backend`. Everything else is rathole's default.
fn client_config(control: SocketAddr, backend: SocketAddr, ca: &Path) -> String {
    format!(
        r#"[client]
remote_addr = "{control}"
default_token = "{TOKEN}"

[client.transport]
type = "tls"

[client.transport.tls]
trusted_root = "{ca}"
hostname = "localhost"

[client.services.{SERVICE}]
local_addr = "{backend}"
"#,
        ca = ca.display()
    )
}

/// Packs the serving leaf, its key and the CA into a PKCS#12 file (the `openssl` command's
/// defaults: AES-256-CBC, PBKDF2, HMAC-SHA256). `Ok(Err(reason))` when `openssl` is missing.
async fn pack_pkcs12(
    cert: &Path,
    key: &Path,
    ca: &Path,
    out: &Path,
) -> anyhow::Result<Result<(), String>> {
    let output = Command::new("openssl")
        .arg("pkcs12")
        .arg("-export")
        .arg("-in")
        .arg(cert)
        .arg("-inkey")
        .arg(key)
        .arg("-certfile")
        .arg(ca)
        .arg("-name")
        .arg("rathole")
        .arg("-passout")
        .arg(format!("pass:{PKCS12_PASSWORD}"))
        .arg("-out")
        .arg(out)
        .output()
        .await;
    match output {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Err(
            "the `openssl` command is missing (it packs rathole's PKCS#12 identity)".into(),
        )),
        Err(err) => Err(err).context("running openssl pkcs12"),
        Ok(output) if !output.status.success() => bail!(
            "openssl pkcs12 -export failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Ok(_) => Ok(Ok(())),
    }
}

/// A port on 127.0.0.1 that was free a moment ago (rathole binds the addresses of its config, so
/// the port cannot be 0).
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Starts `bin --{mode} config` with rathole's default log level, output to `log`.
fn spawn(bin: &Path, mode: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    Command::new(bin)
        .arg(mode)
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {mode}", bin.display()))
}
