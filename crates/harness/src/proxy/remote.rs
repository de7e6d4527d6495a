//! A fault proxy in a process of its own (the `e2e-fault-proxy` binary), controlled by the
//! harness over a line protocol on loopback.
//!
//! A proxied connection costs two sockets, so the links of a 10,000-agent swarm need about
//! 20,000 open files: more than one process may hold where the hard limit is 20,000 and cannot
//! be raised without privileges. The sim backend therefore runs one proxy process beside each
//! swarm process (see `backend::sim`), each holding that process's agents' links.
//!
//! The control protocol: the harness connects to `--control`, writes one JSON [`Command`] on a
//! line and reads one JSON [`Reply`] on a line; new toxics are in force when the reply arrives.
//! A connection that sends nothing (a readiness probe) is closed without an answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{FaultProxy, Toxics};

/// How long a control call may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// A request to a proxy process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "command")]
pub enum Command {
    /// Replace the toxics in force.
    SetToxics {
        /// The new toxics (the default heals the link).
        toxics: Toxics,
    },
    /// Report the connection counts.
    Stats,
}

/// A proxy process's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Why the command failed, if it did.
    pub error: Option<String>,
    /// Connections open through the proxy.
    pub active: usize,
    /// Connections accepted since start.
    pub accepted: u64,
    /// The toxics in force after the command.
    pub toxics: Toxics,
}

/// The command line of `e2e-fault-proxy`.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "e2e-fault-proxy",
    about = "The e2e harness's fault proxy in a process of its own"
)]
pub struct Flags {
    /// Where agents connect.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where connections are forwarded (the gateway's agent listener, or its balancer).
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Where the harness sends commands.
    #[arg(long)]
    pub control: SocketAddr,
}

/// Runs a proxy process until SIGTERM or SIGINT.
pub async fn serve(flags: Flags) -> anyhow::Result<()> {
    // The data listener first: once the control port answers, agents can connect.
    let proxy = Arc::new(FaultProxy::bind(flags.listen, flags.upstream).await?);
    let control = TcpListener::bind(flags.control).await?;
    tracing::info!(
        listen = %proxy.addr(),
        upstream = %flags.upstream,
        control = %flags.control,
        "fault proxy ready"
    );
    tokio::select! {
        () = control_loop(control, proxy) => {}
        () = buildplane_runtime::shutdown_signal() => {}
    }
    Ok(())
}

async fn control_loop(listener: TcpListener, proxy: Arc<FaultProxy>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            if let Err(err) = control_connection(stream, &proxy).await {
                tracing::warn!(%err, "control connection failed");
            }
        });
    }
}

async fn control_connection(stream: TcpStream, proxy: &FaultProxy) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Command>(&line) {
            Ok(command) => execute(proxy, command),
            Err(err) => Reply {
                error: Some(format!("not a command: {err}")),
                ..Reply::default()
            },
        };
        let mut text = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
    }
    Ok(())
}

fn execute(proxy: &FaultProxy, command: Command) -> Reply {
    if let Command::SetToxics { toxics } = command {
        tracing::info!(?toxics, "toxics set");
        proxy.set_toxics(toxics);
    }
    Reply {
        error: None,
        active: proxy.active_connections(),
        accepted: proxy.accepted_connections(),
        toxics: proxy.toxics(),
    }
}

/// The harness's handle on a proxy process.
#[derive(Clone, Debug)]
pub struct RemoteProxy {
    addr: SocketAddr,
    control: SocketAddr,
}

impl RemoteProxy {
    /// A proxy process listening on `addr` and controlled on `control`.
    pub fn new(addr: SocketAddr, control: SocketAddr) -> RemoteProxy {
        RemoteProxy { addr, control }
    }

    /// The address agents dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the toxics in force; they hold when this returns.
    pub async fn set_toxics(&self, toxics: Toxics) -> std::io::Result<Reply> {
        self.call(&Command::SetToxics { toxics }).await
    }

    /// The connection counts and toxics.
    pub async fn stats(&self) -> std::io::Result<Reply> {
        self.call(&Command::Stats).await
    }

    async fn call(&self, command: &Command) -> std::io::Result<Reply> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.control).await?;
            let mut text = serde_json::to_string(command).map_err(std::io::Error::other)?;
            text.push('\n');
            stream.write_all(text.as_bytes()).await?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).await?;
            let reply: Reply = serde_json::from_str(&line)
                .map_err(|err| std::io::Error::other(format!("answer `{}`: {err}", line.trim())))?;
            match &reply.error {
                Some(error) => Err(std::io::Error::other(error.clone())),
                None => Ok(reply),
            }
        };
        tokio::time::timeout(CONTROL_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {CONTROL_TIMEOUT:?}"),
                )
            })?
            .map_err(|err| {
                std::io::Error::new(
                    err.kind(),
                    format!("fault proxy control {}: {err}", self.control),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A proxy process (here a task) forwards, takes toxics over its control port and
    /// answers only once they hold: a reset set remotely cuts the open connection.
    #[tokio::test]
    async fn toxics_set_over_the_control_port_hold_when_answered() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let listen = crate::process::free_port().unwrap();
        let control = crate::process::free_port().unwrap();
        tokio::spawn(serve(Flags {
            listen: local(listen),
            upstream: upstream_addr,
            control: local(control),
        }));
        let remote = RemoteProxy::new(local(listen), local(control));
        let mut tries = 0;
        while remote.stats().await.is_err() {
            tries += 1;
            assert!(tries < 100, "the proxy never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut stream = TcpStream::connect(remote.addr()).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(remote.stats().await.unwrap().active, 1);
        let reply = remote
            .set_toxics(Toxics {
                reset: true,
                ..Toxics::default()
            })
            .await
            .unwrap();
        assert!(reply.toxics.reset);
        let res = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the reset is prompt");
        assert!(
            matches!(res, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{res:?}"
        );
        let healed = remote.set_toxics(Toxics::default()).await.unwrap();
        assert_eq!(healed.toxics, Toxics::default());
    }

    /// Commands and replies keep their wire form (the harness and the binary may differ in
    /// age after a partial build).
    #[test]
    fn commands_have_a_stable_wire_form() {
        let text = serde_json::to_string(&Command::Stats).unwrap();
        assert_eq!(text, r#"{"command":"stats"}"#);
        let command: Command =
            serde_json::from_str(r#"{"command":"setToxics","toxics":{"latency":{"secs":1,"nanos":0},"jitter":{"secs":0,"nanos":0},"bandwidth_kbps":0,"blackhole":false,"reset":false,"slicer_size":0,"slicer_delay":{"secs":0,"nanos":0},"partition":true,"direction":"upstream"}}"#)
                .unwrap();
        let Command::SetToxics { toxics } = command else {
            panic!("{command:?}");
        };
        assert!(toxics.partition);
        assert_eq!(toxics.latency, Duration::from_secs(1));
        assert_eq!(toxics.direction, crate::scenario::Direction::Upstream);
    }
}
