//! The agent's side of fault classification: a source error becomes a
//! gRPC status whose code and `walbridge-fault` metadata say what kind of
//! fault it is, so the controller applies the one policy without reading
//! message text.

use tonic::Status;
use tonic::metadata::MetadataValue;
use walbridge_daemon::pg::{ConnectError, FailureKind, SessionError, describe};
use walbridge_migration::fault::{FAULT_METADATA, Fault, FaultKind, Side};

/// The kind of a source error: by SQLSTATE when the server answered;
/// anything else (a refused or broken connection) means the source is
/// unavailable.
pub fn kind_of(error: &tokio_postgres::Error) -> FaultKind {
    match error.code() {
        Some(code) => FaultKind::of_sqlstate(code.code(), Side::Source),
        None => FaultKind::SourceUnavailable,
    }
}

/// A source error, with what was being done, as a status.
pub fn source_status(context: impl std::fmt::Display, error: &tokio_postgres::Error) -> Status {
    status(Fault::new(kind_of(error), format!("{context}: {}", describe(error))))
}

/// A failed connection to the source, as a status.
pub fn connect_status(error: &ConnectError) -> Status {
    status(Fault::new(connect_kind(error), error.to_string()))
}

pub fn connect_kind(error: &ConnectError) -> FaultKind {
    let kind = error.kind();
    FaultKind::of_connection(
        !matches!(kind, FailureKind::Unreachable | FailureKind::Timeout),
        matches!(kind, FailureKind::Tls | FailureKind::Protocol),
        error.sqlstate(),
        Side::Source,
    )
}

/// A session that could not be opened or whose query failed, as a status.
pub fn session_status(context: impl std::fmt::Display, error: &SessionError) -> Status {
    match error {
        SessionError::Connect(e) => status(Fault::new(connect_kind(e), format!("{context}: {e}"))),
        SessionError::Query(e) => source_status(context, e),
    }
}

/// A fault as a status the controller can classify.
pub fn status(fault: Fault) -> Status {
    let code = match fault.kind {
        FaultKind::SourceUnavailable | FaultKind::TargetUnavailable | FaultKind::AgentAway => tonic::Code::Unavailable,
        FaultKind::Timeout | FaultKind::Contention => tonic::Code::Aborted,
        FaultKind::SnapshotLost | FaultKind::SlotLost | FaultKind::SourceChanged | FaultKind::Blocked => {
            tonic::Code::FailedPrecondition
        }
        FaultKind::Privilege => tonic::Code::PermissionDenied,
        FaultKind::Exhausted => tonic::Code::ResourceExhausted,
        FaultKind::Rejected | FaultKind::Mismatch | FaultKind::Internal => tonic::Code::Internal,
    };
    let mut status = Status::new(code, fault.message);
    status
        .metadata_mut()
        .insert(FAULT_METADATA, MetadataValue::from_static(fault.kind.name()));
    status
}
