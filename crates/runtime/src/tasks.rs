//! Supervision of a process's long-lived tasks: each is expected to run until shutdown, so one
//! that ends earlier (returns, fails or panics) ends the process with an error naming it,
//! instead of leaving a process whose health endpoint still says OK.
//!
//! ```no_run
//! # async fn example() -> Result<(), buildplane_runtime::TaskEnded> {
//! use buildplane_runtime::{Tasks, shutdown_signal};
//! let mut tasks = Tasks::new();
//! tasks.spawn("health server", async { /* serve */ });
//! tasks.spawn_graceful("connection", |shutdown| async move {
//!     shutdown.cancelled().await; // then drain
//! });
//! let res = tasks.run_until(shutdown_signal()).await;
//! let stopped = tasks.shutdown(std::time::Duration::from_secs(30)).await;
//! res.and(stopped)
//! # }
//! ```

use std::{collections::HashMap, fmt::Display, future::Future, time::Duration};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A supervised task ended before shutdown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskEnded {
    /// The task returned an error.
    #[error("task {name:?} failed: {error}")]
    Failed {
        /// The task's name.
        name: String,
        /// Its error, with causes.
        error: String,
    },
    /// The task panicked.
    #[error("task {name:?} panicked: {message}")]
    Panicked {
        /// The task's name.
        name: String,
        /// The panic message.
        message: String,
    },
    /// The task returned without an error, though it was meant to run until shutdown.
    #[error("task {name:?} stopped before shutdown")]
    Returned {
        /// The task's name.
        name: String,
    },
}

impl TaskEnded {
    /// The name of the task that ended.
    pub fn name(&self) -> &str {
        match self {
            Self::Failed { name, .. } | Self::Panicked { name, .. } | Self::Returned { name } => {
                name
            }
        }
    }
}

/// What a supervised task returns: `()`, or a `Result` whose error is reported.
pub trait TaskOutput: Send + 'static {
    /// The error to report, if any.
    fn into_error(self) -> Option<String>;
}

impl TaskOutput for () {
    fn into_error(self) -> Option<String> {
        None
    }
}

impl<E: Display + Send + 'static> TaskOutput for Result<(), E> {
    fn into_error(self) -> Option<String> {
        // `{:#}` shows an anyhow error's causes; other errors ignore the flag.
        self.err().map(|err| format!("{err:#}"))
    }
}

/// A process's long-lived tasks.
pub struct Tasks {
    set: JoinSet<Option<String>>,
    names: HashMap<Id, String>,
    shutdown: CancellationToken,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Spawns a task that runs until shutdown, when it is dropped.
    pub fn spawn<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        self.spawn_graceful(name, |shutdown| async move {
            tokio::select! {
                out = task => out.into_error().map_or(Ok(()), Err),
                () = shutdown.cancelled() => Ok(()),
            }
        });
    }

    /// Spawns a task that is told about shutdown by the token it is given, and is waited for
    /// (within [`Tasks::shutdown`]'s grace) to finish what it is doing.
    pub fn spawn_graceful<F, Fut>(&mut self, name: impl Into<String>, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        let task = task(self.shutdown.child_token());
        let handle = self.set.spawn(async move { task.await.into_error() });
        self.names.insert(handle.id(), name.into());
    }

    /// Waits for `signal`; if a task ends first, returns why (the others keep running until
    /// [`Tasks::shutdown`]).
    pub async fn run_until(&mut self, signal: impl Future<Output = ()>) -> Result<(), TaskEnded> {
        tokio::select! {
            () = signal => Ok(()),
            Some(joined) = self.set.join_next_with_id() => Err(self.ended(joined)),
        }
    }

    /// Tells every task to stop, waits up to `grace` for the graceful ones, then aborts the
    /// rest. Returns the first failure or panic seen while stopping.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), TaskEnded> {
        self.shutdown.cancel();
        let mut first = Ok(());
        let wait = async {
            while let Some(joined) = self.set.join_next_with_id().await {
                let ended = self.ended(joined);
                if !matches!(ended, TaskEnded::Returned { .. }) {
                    warn!(%ended, "task failed while shutting down");
                    if first.is_ok() {
                        first = Err(ended);
                    }
                }
            }
        };
        if tokio::time::timeout(grace, wait).await.is_err() {
            info!(
                ?grace,
                "tasks still running after the shutdown grace; aborting them"
            );
            self.set.shutdown().await;
        }
        first
    }

    fn ended(&mut self, joined: Result<(Id, Option<String>), JoinError>) -> TaskEnded {
        let (id, outcome) = match joined {
            Ok((id, error)) => (id, error.map(Ok)),
            Err(err) => (err.id(), Some(Err(err))),
        };
        let name = self
            .names
            .remove(&id)
            .unwrap_or_else(|| format!("task {id}"));
        match outcome {
            None => TaskEnded::Returned { name },
            Some(Ok(error)) => TaskEnded::Failed { name, error },
            Some(Err(err)) => {
                let message = match err.try_into_panic() {
                    Ok(payload) => panic_message(payload.as_ref()),
                    Err(err) => err.to_string(),
                };
                TaskEnded::Panicked { name, message }
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn forever() {
        std::future::pending::<()>().await
    }

    fn boom() {
        panic!("boom")
    }

    /// A task that panics ends the wait with its name and the panic message, while the
    /// shutdown signal has not come.
    #[tokio::test(start_paused = true)]
    async fn panicking_task_is_reported_by_name() {
        let mut tasks = Tasks::new();
        tasks.spawn("health server", forever());
        tasks.spawn("identity follower", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            boom();
        });
        let res = tasks.run_until(forever()).await;
        assert_eq!(
            res,
            Err(TaskEnded::Panicked {
                name: "identity follower".into(),
                message: "boom".into()
            })
        );
        assert!(
            res.unwrap_err().to_string().contains("identity follower"),
            "the error names the task"
        );
        assert_eq!(tasks.shutdown(Duration::from_secs(1)).await, Ok(()));
    }

    /// A task that returns, with or without an error, is reported too.
    #[tokio::test(start_paused = true)]
    async fn returning_or_failing_task_is_reported() {
        let mut tasks = Tasks::new();
        tasks.spawn("quits", async {});
        assert_eq!(
            tasks.run_until(forever()).await,
            Err(TaskEnded::Returned {
                name: "quits".into()
            })
        );
        let mut tasks = Tasks::new();
        tasks.spawn("fails", async { Err::<(), _>("no listener") });
        let err = tasks.run_until(forever()).await.unwrap_err();
        assert_eq!(err.name(), "fails");
        assert!(err.to_string().contains("no listener"), "{err}");
    }

    /// The signal wins while every task runs; shutdown waits for a graceful task to drain and
    /// drops the others at once.
    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_graceful_tasks_only() {
        let drained = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Tasks::new();
        tasks.spawn("health server", forever());
        let flag = drained.clone();
        tasks.spawn_graceful("connection", move |shutdown| async move {
            shutdown.cancelled().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let start = tokio::time::Instant::now();
        let res = tasks
            .run_until(tokio::time::sleep(Duration::from_secs(5)))
            .await;
        assert_eq!(res, Ok(()));
        assert_eq!(tasks.shutdown(Duration::from_secs(30)).await, Ok(()));
        assert!(drained.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(start.elapsed(), Duration::from_secs(8));
    }

    /// A graceful task that outlives the grace is aborted.
    #[tokio::test(start_paused = true)]
    async fn shutdown_aborts_tasks_past_the_grace() {
        let mut tasks = Tasks::new();
        tasks.spawn_graceful("stuck", |_shutdown| forever());
        let start = tokio::time::Instant::now();
        assert_eq!(tasks.shutdown(Duration::from_secs(2)).await, Ok(()));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    /// A failure while stopping is returned.
    #[tokio::test(start_paused = true)]
    async fn shutdown_returns_a_failure_while_stopping() {
        let mut tasks = Tasks::new();
        tasks.spawn_graceful("lease", |shutdown| async move {
            shutdown.cancelled().await;
            Err::<(), _>("could not release")
        });
        let err = tasks.shutdown(Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.name(), "lease");
    }
}
