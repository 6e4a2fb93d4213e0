//! Process signals: the first SIGTERM/SIGINT starts a graceful shutdown, a
//! second one exits at once. Ordering of the shutdown steps is `plinthd`'s.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT and exits the process on the second.
pub fn cancel_on_signal(token: CancellationToken) {
    // Deliberately untracked: it must outlive the graceful shutdown it starts,
    // to catch the second signal while tracked tasks drain.
    #[expect(
        clippy::disallowed_methods,
        reason = "the signal watcher must not be awaited by shutdown"
    )]
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, draining (send it again to exit at once)");
        token.cancel();
        wait_for_signal().await;
        tracing::warn!("second shutdown signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
