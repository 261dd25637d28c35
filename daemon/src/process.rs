//! The life of a daemon process: settings problems exit with status 2 in
//! one line; otherwise a runtime, telemetry, and a shutdown token cancelled
//! by SIGINT or SIGTERM.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::settings::SettingError;
use crate::telemetry::{self, LogFormat};

/// Exit status for bad usage or configuration.
pub const EXIT_BAD_SETTING: u8 = 2;

/// Reports a bad setting on one line and gives the exit status for it.
pub fn bad_setting(program: &str, error: &SettingError) -> ExitCode {
    eprintln!("{program}: {error}");
    ExitCode::from(EXIT_BAD_SETTING)
}

/// Runs `daemon` on a tokio runtime with telemetry installed, handing it a
/// token that SIGINT or SIGTERM cancels.
pub fn run<F, Fut>(program: &'static str, log_format: LogFormat, daemon: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = telemetry::init(program, log_format);
        #[cfg(feature = "failpoints")]
        match crate::failpoint::arm() {
            Ok(armed) if !armed.is_empty() => tracing::warn!(?armed, "crash points armed"),
            Ok(_) => {}
            Err(e) => {
                eprintln!("{program}: {e}");
                return ExitCode::from(EXIT_BAD_SETTING);
            }
        }
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
        let status = daemon(shutdown).await;
        signals.abort();
        telemetry.shutdown().await;
        status
    })
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}
