//! The controller's side of fault classification: target errors by
//! SQLSTATE, the agent's statuses by the kind it sent along, and a link
//! that broke under a call as the agent being away.

use tonic::Status;
use walbridge_daemon::journal::JournalError;
use walbridge_daemon::pg::{ConnectError, FailureKind, describe};
use walbridge_migration::fault::{FAULT_METADATA, Fault, FaultKind, Side};

/// The kind of a target error: by SQLSTATE when the server answered; a
/// refused or broken connection means the target is unavailable.
pub fn target_kind(error: &tokio_postgres::Error) -> FaultKind {
    match error.code() {
        Some(code) => FaultKind::of_sqlstate(code.code(), Side::Target),
        None => FaultKind::TargetUnavailable,
    }
}

/// A target error, with what was being done.
pub fn target(context: impl std::fmt::Display, error: &tokio_postgres::Error) -> Fault {
    Fault::new(target_kind(error), format!("{context}: {}", describe(error)))
}

/// The target could not be connected to.
pub fn connect(error: &ConnectError) -> Fault {
    let kind = error.kind();
    let kind = FaultKind::of_connection(
        !matches!(kind, FailureKind::Unreachable | FailureKind::Timeout),
        matches!(kind, FailureKind::Tls | FailureKind::Protocol),
        error.sqlstate(),
        Side::Target,
    );
    Fault::new(kind, error.to_string())
}

/// An agent's answer, with what was being done. A status without the
/// agent's classification did not come from the agent's code: when it is
/// what a broken link looks like, the agent counts as away.
pub fn agent(context: impl std::fmt::Display, status: &Status) -> Fault {
    let kind = status
        .metadata()
        .get(FAULT_METADATA)
        .and_then(|value| value.to_str().ok())
        .and_then(FaultKind::from_name)
        .unwrap_or(match status.code() {
            // What tonic reports when the link under a call breaks.
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded => FaultKind::AgentAway,
            tonic::Code::PermissionDenied => FaultKind::Privilege,
            _ => FaultKind::Internal,
        });
    Fault::new(kind, format!("{context}: {}", status.message()))
}

/// The journal failed: nothing can be trusted to go on.
pub fn journal(error: JournalError) -> Fault {
    Fault::new(FaultKind::Internal, format!("journal: {error}"))
}

/// A fault of walbridge's own making (settings, state).
pub fn internal(message: impl Into<String>) -> Fault {
    Fault::new(FaultKind::Internal, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_classification_wins_and_a_bare_status_means_the_link_broke() {
        let mut status = Status::internal("COPY of t failed on the source: terminating connection");
        status.metadata_mut().insert(
            FAULT_METADATA,
            tonic::metadata::MetadataValue::from_static("source_unavailable"),
        );
        assert_eq!(agent("copy", &status).kind, FaultKind::SourceUnavailable);
        assert_eq!(
            agent("copy", &Status::unknown("h2 protocol error")).kind,
            FaultKind::AgentAway
        );
        assert_eq!(
            agent("copy", &Status::permission_denied("no")).kind,
            FaultKind::Privilege
        );
    }
}
