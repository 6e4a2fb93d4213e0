//! Named, tracked background tasks. Every task a service starts goes through
//! [`Tasks`] so shutdown can wait for all of them and logs say which one failed.
//! This is not a scheduler: it only spawns, names and waits.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Waits `interval`, or less if `token` is cancelled first; false when it
/// was. The one way periodic tasks wait: `while pause(&token, every).await { … }`.
pub async fn pause(token: &CancellationToken, interval: Duration) -> bool {
    tokio::select! {
        () = token.cancelled() => false,
        () = tokio::time::sleep(interval) => true,
    }
}

/// Spawns named tasks, cancels them together and waits for them on shutdown.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Tasks {
    /// A new, empty set of tasks with its own cancellation token.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token every task should watch; cancelled by [`Tasks::shutdown`].
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Spawns `fut` under `name`. An error result is logged with the task's name.
    pub fn spawn<F, E>(&self, name: &'static str, fut: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        self.tracker.spawn(async move {
            tracing::debug!(task = name, "task started");
            match fut.await {
                Ok(()) => tracing::debug!(task = name, "task finished"),
                Err(e) => tracing::error!(task = name, error = %e, "task failed"),
            }
        });
    }

    /// Cancels every task and waits up to `grace` for them to finish.
    /// Returns false when some task was still running at the deadline.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        let finished = tokio::time::timeout(grace, self.tracker.wait()).await.is_ok();
        if !finished {
            tracing::warn!(
                remaining = self.tracker.len(),
                "tasks still running at the shutdown deadline"
            );
        }
        finished
    }
}
