//! The open-loop load generator of the `load` operation, and the `e2e-load` process that runs
//! it apart from the harness.
//!
//! Requests leave on a fixed schedule (`rate` a second, at most `concurrency` in flight), and
//! each one's latency counts from the moment the schedule meant it to leave, not from when it
//! actually left: a generator that falls behind (its process starved of CPU, every slot busy)
//! shows the delay in the figures instead of hiding it (no coordinated omission).
//!
//! The engine runs a load in an `e2e-load` process of its own when the environment has one
//! (built with the components, in their profile, so `--release` loads come from an optimised
//! binary, not from the debug `cargo xtask` process): each tenant's callers are then a
//! process of their own, as they would be, with their own allocator, runtime and connection
//! pool. The job goes in on stdin as one JSON line; closing stdin stops the load early; the
//! outcomes come back on stdout as one JSON line ([`LoadRun`]: with the load's start on the
//! wall clock, which the harness shares with the process, to place each request on its axis).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What to send.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadPlan {
    /// For example `https://127.0.0.1:40123`.
    pub base_url: String,
    /// Paths requested in turn (GET).
    pub paths: Vec<String>,
    /// Requests per second.
    pub rate: f64,
    /// Requests in flight at most.
    pub concurrency: u32,
    /// How long to send for; until stopped when unset.
    pub duration: Option<Duration>,
    /// Statuses counted as success.
    pub ok_statuses: Vec<u16>,
    /// Each request on a new connection (`Connection: close`).
    pub new_connections: bool,
}

/// The harness's client identity for the gateway's internal API, as PEM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadCredentials {
    /// The CA the gateway's server certificate chains to.
    pub server_ca: String,
    /// The client certificate chain.
    pub cert: String,
    /// The client key.
    pub key: String,
}

impl LoadCredentials {
    /// A client for the gateway with these credentials and a connection pool of its own.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        let tls = crate::pki::client_tls(
            &self.server_ca,
            &crate::pki::Pem {
                cert: self.cert.clone(),
                key: self.key.clone(),
            },
        )?;
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| format!("the load's HTTP client: {e}"))
    }
}

/// What the `e2e-load` process reads from stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadJob {
    /// What to send.
    pub plan: LoadPlan,
    /// Who to send it as.
    pub credentials: LoadCredentials,
}

/// One request's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// When the schedule meant it to leave, in seconds since the load started.
    pub scheduled: f64,
    /// From then until its body was read or it failed, in milliseconds.
    pub latency_ms: f64,
    /// What went wrong, when it failed.
    pub error: Option<String>,
}

/// A load's outcomes and when it started, on the one clock the harness and an `e2e-load`
/// process share (the machine's wall clock): a process's own `Instant`s mean nothing to the
/// harness, and the time it takes to start (exec, its TLS client) would otherwise shift every
/// request on the scenario's axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadRun {
    /// When the first request was scheduled, in seconds since the Unix epoch.
    pub started_unix: f64,
    /// Every request's outcome; `scheduled` counts from `started_unix`.
    pub outcomes: Vec<Outcome>,
}

impl LoadRun {
    /// Seconds from `zero` (a time on the wall clock) to the load's start: add it to an
    /// outcome's `scheduled` to place the request on an axis that starts at `zero`.
    pub fn started_after(&self, zero: std::time::SystemTime) -> f64 {
        self.started_unix - unix_seconds(zero)
    }
}

fn unix_seconds(time: std::time::SystemTime) -> f64 {
    match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => since.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

/// Sends `plan` with `client` until its duration passes or `stop` turns true; gives every
/// request's outcome (requests in flight when it stops are waited for).
pub async fn generate(
    client: &reqwest::Client,
    plan: &LoadPlan,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> LoadRun {
    let ok_statuses: Arc<[u16]> = if plan.ok_statuses.is_empty() {
        Arc::from([200u16])
    } else {
        Arc::from(plan.ok_statuses.as_slice())
    };
    let started_unix = unix_seconds(std::time::SystemTime::now());
    if plan.paths.is_empty() {
        return LoadRun {
            started_unix,
            outcomes: Vec::new(),
        };
    }
    let period = Duration::from_secs_f64(1.0 / plan.rate.max(0.001));
    let slots = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1) as usize));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0usize.. {
        // The schedule, not the clock of the previous send: a late request does not move
        // the ones after it.
        let scheduled = started + period.mul_f64(i as f64);
        if plan.duration.is_some_and(|d| scheduled >= started + d) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(scheduled) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let url = format!("{}{}", plan.base_url, plan.paths[i % plan.paths.len()]);
        let client = client.clone();
        let outcomes = outcomes.clone();
        let ok_statuses = ok_statuses.clone();
        let new_connection = plan.new_connections;
        tasks.spawn(async move {
            let error = request(&client, &url, new_connection, &ok_statuses).await;
            let outcome = Outcome {
                scheduled: scheduled.duration_since(started).as_secs_f64(),
                latency_ms: scheduled.elapsed().as_secs_f64() * 1000.0,
                error,
            };
            outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(outcome);
            drop(slot);
        });
        // Reap finished requests as the load goes, so a long one holds no memory for them.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    LoadRun {
        started_unix,
        outcomes: std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner())),
    }
}

/// One request: `None` when it succeeded, else what went wrong.
async fn request(
    client: &reqwest::Client,
    url: &str,
    new_connection: bool,
    ok_statuses: &[u16],
) -> Option<String> {
    let mut request = client.get(url).timeout(Duration::from_secs(10));
    if new_connection {
        request = request.header(reqwest::header::CONNECTION, "close");
    }
    match request.send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            match res.bytes().await {
                Ok(_) if ok_statuses.contains(&status) => None,
                Ok(body) => Some(match error_code(&body) {
                    Some(code) => format!("status {status} {code}"),
                    None => format!("status {status}"),
                }),
                Err(err) => Some(format!("body: {err}")),
            }
        }
        Err(err) if err.is_timeout() => Some("error: timeout".to_string()),
        Err(err) => Some(format!("error: {}", with_causes(&err.without_url()))),
    }
}

/// The gateway's error code in a refusal's body (`{"error":"NoAgentConnected",...}`), or the
/// reason of a Kubernetes `Status`: what tells one 503 from another in a tally.
fn error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value
        .get("error")
        .or_else(|| value.get("reason"))?
        .as_str()?;
    let printable = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    printable.then(|| code.to_owned())
}

/// An error and its causes, `: `-separated (reqwest's own message names only the URL; the
/// cause tells a refused connect from a connection closed under the request).
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cause = err.source();
    }
    text
}

/// The `e2e-load` process's body: reads a [`LoadJob`] line from stdin, runs it until its
/// duration passes or stdin closes, and writes the [`LoadRun`] as one JSON line to stdout.
pub async fn serve_stdio() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .await
        .context("reading the load job")?;
    let job: LoadJob = serde_json::from_str(&line).context("the load job is not valid JSON")?;
    let client = job
        .credentials
        .client()
        .map_err(anyhow::Error::msg)
        .context("the load's client")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Stdin closing (the harness stopping the load, or gone) stops it.
    tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stdin, &mut rest).await;
        let _ = stop_tx.send(true);
    });
    let run = generate(&client, &job.plan, stop_rx).await;
    let mut out = serde_json::to_vec(&run)?;
    out.push(b'\n');
    let mut stdout = tokio::io::stdout();
    stdout.write_all(&out).await?;
    stdout.flush().await?;
    Ok(())
}

/// The CPU priority of a load's callers on the harness's machine.
///
/// On a machine of two cores a flood's own callers (their TLS, their HTTP parsing) compete
/// for the cores with the gateway and with the other tenant, which they would not do in a
/// deployment, where a tenant's callers run on machines of their own. `lowest` runs the
/// load's `e2e-load` process at nice 19, so that everything else on the machine gets a core
/// first when it needs one: what the load then costs the others is what the gateway spends on
/// it (and its agent and API server), not its callers' CPU.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum CpuPriority {
    /// As every other process of the run.
    #[default]
    Normal,
    /// Nice 19: the callers stand in for callers on machines of their own.
    Lowest,
}

impl CpuPriority {
    /// The nice value a process of this priority runs at.
    pub fn niceness(self) -> u8 {
        match self {
            CpuPriority::Normal => 0,
            CpuPriority::Lowest => 19,
        }
    }
}

/// Where a load's requests came from, as its report says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    /// An `e2e-load` process of its own.
    #[default]
    Process,
    /// An `e2e-load` process of its own at the lowest CPU priority (nice 19).
    LowestPriorityProcess,
    /// A thread of the harness's process (no `e2e-load` binary, or no PEM credentials), at
    /// the harness's priority whatever the load asked.
    Thread,
}

impl Generator {
    /// As the reports name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Generator::Process => "an e2e-load process",
            Generator::LowestPriorityProcess => "an e2e-load process at nice 19",
            Generator::Thread => "a thread of the harness",
        }
    }
}

/// Runs `job` in an `e2e-load` process (`program`) at `priority` until its duration passes or
/// `stop` turns true (stdin is then closed); the process is killed if this future is dropped.
pub async fn in_process(
    program: &std::path::Path,
    job: &LoadJob,
    priority: CpuPriority,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<LoadRun, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // coreutils' `nice` lowers the priority before it becomes the program, so every thread
    // of the load runs at it from the start.
    let mut command = match priority {
        CpuPriority::Normal => tokio::process::Command::new(program),
        CpuPriority::Lowest => {
            let mut nice = tokio::process::Command::new("nice");
            nice.arg("-n")
                .arg(priority.niceness().to_string())
                .arg(program);
            nice
        }
    };
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match priority {
            CpuPriority::Normal => format!("starting {}: {e}", program.display()),
            CpuPriority::Lowest => format!("starting {} under `nice`: {e}", program.display()),
        })?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err("the load process has no pipes".into());
    };
    let mut line = serde_json::to_vec(job).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stdin
        .write_all(&line)
        .await
        .map_err(|e| format!("sending the load job: {e}"))?;
    let closer = async move {
        let _ = stop.wait_for(|s| *s).await;
        drop(stdin);
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let read = async {
        let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        o.and(e)
    };
    tokio::select! {
        read = read => {
            read.map_err(|e| format!("reading the load's outcomes: {e}"))?;
        }
        () = async { closer.await; std::future::pending::<()>().await } => unreachable!(),
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&err);
    if !status.success() {
        return Err(format!(
            "the load process ended with {status}: {}",
            stderr.trim()
        ));
    }
    serde_json::from_slice(&out).map_err(|e| {
        format!(
            "the load process's outcomes are not JSON ({e}): {}",
            stderr.trim()
        )
    })
}

// `generate`, the job and the `e2e-load` process are tested in `tests/load_process.rs`.

#[cfg(test)]
mod tests {
    use super::error_code;

    /// A refusal's tally names the gateway's error code or the Kubernetes reason; a body that
    /// says neither, or says something unprintable, adds nothing.
    #[test]
    fn a_failure_is_named_by_its_error_code() {
        let gateway = br#"{"error":"NoAgentConnected","message":"proxy request failed"}"#;
        assert_eq!(error_code(gateway).as_deref(), Some("NoAgentConnected"));
        let kubernetes = br#"{"kind":"Status","status":"Failure","reason":"NotFound"}"#;
        assert_eq!(error_code(kubernetes).as_deref(), Some("NotFound"));
        assert_eq!(error_code(b"upstream connect error"), None);
        assert_eq!(error_code(br#"{"error":"two words"}"#), None);
        assert_eq!(error_code(br#"{"error":7}"#), None);
    }
}
