//! Child processes with their output captured into log files, and graceful or hard stops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A running child process whose stdout and stderr go to a log file.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The last `n` lines of a file (empty when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Proc {
    /// Spawns `program args` with extra `env`, appending output to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &BTreeMap<String, String>,
        log: &Path,
    ) -> std::io::Result<Proc> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        writeln!(
            file,
            "=== {} {} {} ===",
            chrono::Utc::now().to_rfc3339(),
            program.display(),
            args.join(" ")
        )?;
        let child = Command::new(program)
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                std::io::Error::new(err.kind(), format!("spawning {}: {err}", program.display()))
            })?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The process's name in the environment.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL and wait.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// `signal` (`TERM`, `INT`), wait up to `grace`, then SIGKILL.
    pub async fn stop(&mut self, signal: &str, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
        }
        self.kill().await;
    }
}

/// A free TCP port on 127.0.0.1, below the ephemeral range (bound then released; components
/// bind it right after).
pub fn free_port() -> std::io::Result<u16> {
    // Below the kernel's ephemeral range: a port handed out by `bind(0)` comes from that range,
    // where every outgoing connection (agents, kube clients) also takes its local port, so it
    // could be taken before the component binds it (seen as `Address already in use`).
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // A port is handed out once per harness process: scenarios running side by side never get
    // the same one while its component is between start and bind (seen as `Address already in
    // use` at a gateway's start).
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    if low > 20_000 {
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..256 {
            let port = rand::random_range(20_000..low);
            if !handed_out.contains(&port)
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
