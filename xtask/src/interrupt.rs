//! Ending a run early on SIGINT or SIGTERM without leaving its processes behind.
//!
//! Every process a run starts (API servers, gateways, agents, swarms, fault proxies, load
//! generators) is spawned to be killed when its handle drops. A run stopped by a signal
//! therefore drops its work before it exits: SIGTERM sent to `cargo xtask` alone (a CI
//! timeout, `kill`) used to leave the environments' processes running, holding their ports.

use std::fmt;
use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// The signal that ended a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    Interrupt,
    Terminate,
}

/// How a stopped run ends: an error naming the signal.
impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let signal = match self {
            Stop::Interrupt => "SIGINT",
            Stop::Terminate => "SIGTERM",
        };
        write!(
            f,
            "stopped by {signal}: the run's processes were killed, no report written"
        )
    }
}

impl std::error::Error for Stop {}

/// Waits for SIGINT or SIGTERM (forever when neither can be watched).
async fn requested() -> Stop {
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => Stop::Interrupt,
        _ = terminate.recv() => Stop::Terminate,
    }
}

/// Runs `work` to its end, unless SIGINT or SIGTERM comes first: then `work` is dropped, and
/// with it every process it started, and the signal is returned.
pub(crate) async fn unless_stopped<T>(work: impl Future<Output = T>) -> Result<T, Stop> {
    tokio::select! {
        done = work => Ok(done),
        stop = requested() => Err(stop),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// SIGTERM to this process while a run holds a child: the run is dropped, the child
    /// killed, the signal returned.
    #[tokio::test]
    async fn sigterm_drops_the_run_and_kills_its_processes() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let run = async move {
            let _ = child.wait().await;
        };
        let me = std::process::id().to_string();
        let stopped = tokio::spawn(unless_stopped(run));
        // The handlers are installed once the task first runs; then the signal.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &me])
            .status()
            .unwrap();
        assert!(sent.success());
        let stop = tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the run stops on SIGTERM")
            .unwrap();
        assert_eq!(stop, Err(Stop::Terminate));
        // The child was killed (SIGKILL on drop) and is reaped by tokio in the background.
        let proc_dir = format!("/proc/{pid}");
        for _ in 0..100 {
            if !std::path::Path::new(&proc_dir).exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the run's process {pid} outlived the run");
    }
}
