//! What went wrong, classified once for both daemons, and what the
//! migration does about it. A fault has a kind; one policy maps each kind
//! to "retry with backoff", "copy again from a new snapshot" or "a person
//! must act", and each kind carries the hint an operator reads. A
//! transient fault never ends a migration: it is retried at the smallest
//! unit that failed (a table, a range, a statement) and shown in `status`.
//!
//! The agent classifies the source's errors and sends the kind along with
//! its gRPC status (metadata key [`FAULT_METADATA`]), so the controller
//! never guesses from message text.

use serde::{Deserialize, Serialize};

pub use crate::finding::Side;

/// The gRPC metadata key that carries a fault's kind from agent to controller.
pub const FAULT_METADATA: &str = "walbridge-fault";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The source server could not be reached, or dropped the session
    /// (restart, failover, network).
    SourceUnavailable,
    /// The same for the target server.
    TargetUnavailable,
    /// The migration's agent is not connected (or its link broke mid-call).
    AgentAway,
    /// A statement was cancelled by a timeout or could not get its lock in time.
    Timeout,
    /// A deadlock or serialization failure: the other side won this time.
    Contention,
    /// The exported snapshot the copy reads is gone (the agent restarted,
    /// or its replication connection ended).
    SnapshotLost,
    /// The replication slot is gone or invalidated: its changes are lost.
    SlotLost,
    /// The agent now reaches a different source server than the one the
    /// migration started on.
    SourceChanged,
    /// Another session keeps the step from going on past its deadline (a
    /// long or prepared transaction the slot's creation waits for).
    Blocked,
    /// A role lacks a privilege, or could not authenticate.
    Privilege,
    /// A server refused a statement for what it is (the schema, the data).
    Rejected,
    /// A server ran out of something (disk, memory, a limit).
    Exhausted,
    /// A copied table does not match its source.
    Mismatch,
    /// walbridge's own settings or state are wrong; or a bug.
    Internal,
}

/// What the migration does about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Try the unit again after a backoff; never the end of the migration.
    Retry,
    /// The snapshot is gone: empty the copied tables and copy again from a
    /// new slot and snapshot (bounded).
    RestartCopy,
    /// Nothing walbridge can do alone: the migration fails and says why.
    Operator,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::SourceUnavailable => "source_unavailable",
            FaultKind::TargetUnavailable => "target_unavailable",
            FaultKind::AgentAway => "agent_away",
            FaultKind::Timeout => "timeout",
            FaultKind::Contention => "contention",
            FaultKind::SnapshotLost => "snapshot_lost",
            FaultKind::SlotLost => "slot_lost",
            FaultKind::SourceChanged => "source_changed",
            FaultKind::Blocked => "blocked",
            FaultKind::Privilege => "privilege",
            FaultKind::Rejected => "rejected",
            FaultKind::Exhausted => "exhausted",
            FaultKind::Mismatch => "mismatch",
            FaultKind::Internal => "internal",
        }
    }

    pub fn from_name(name: &str) -> Option<FaultKind> {
        ALL.iter().copied().find(|kind| kind.name() == name)
    }

    /// The one policy.
    pub fn policy(self) -> Policy {
        match self {
            FaultKind::SourceUnavailable
            | FaultKind::TargetUnavailable
            | FaultKind::AgentAway
            | FaultKind::Timeout
            | FaultKind::Contention => Policy::Retry,
            FaultKind::SnapshotLost => Policy::RestartCopy,
            FaultKind::SlotLost
            | FaultKind::SourceChanged
            | FaultKind::Blocked
            | FaultKind::Privilege
            | FaultKind::Rejected
            | FaultKind::Exhausted
            | FaultKind::Mismatch
            | FaultKind::Internal => Policy::Operator,
        }
    }

    /// What an operator should know or do.
    pub fn hint(self) -> &'static str {
        match self {
            FaultKind::SourceUnavailable => {
                "the source is unreachable or restarting: walbridge retries with backoff; check the source server"
            }
            FaultKind::TargetUnavailable => {
                "the target is unreachable or restarting: walbridge retries with backoff; check the target server"
            }
            FaultKind::AgentAway => {
                "the agent is not connected: walbridge waits for it; check the agent's process and its route to the \
                 controller"
            }
            FaultKind::Timeout => "a timeout or lock wait cut a statement short: walbridge retries it",
            FaultKind::Contention => "a deadlock or serialization failure with another session: walbridge retries",
            FaultKind::SnapshotLost => {
                "the exported snapshot is gone: the copied tables are emptied and the copy starts again from a new slot"
            }
            FaultKind::SlotLost => {
                "the replication slot is gone or invalidated (max_slot_wal_keep_size, a failover): changes since the \
                 copy are lost; abort and start again, and raise max_slot_wal_keep_size or keep the subscriber up"
            }
            FaultKind::SourceChanged => {
                "the agent reaches another server than the migration started on: point it back at that server, or \
                 abort and start again"
            }
            FaultKind::Blocked => {
                "a transaction on the source (named in the message: its pid, or a prepared transaction's gid) \
                 blocks the step: let it finish, or end it (pg_terminate_backend, ROLLBACK PREPARED), then start again"
            }
            FaultKind::Privilege => "grant the privilege named, then start again (preflight lists them all)",
            FaultKind::Rejected => "the statement and the server's error say what to change (or what to --skip)",
            FaultKind::Exhausted => "free the resource named (disk, memory, connections), then start again",
            FaultKind::Mismatch => "a copied table differs from its source: report it; start again to copy anew",
            FaultKind::Internal => "walbridge could not go on: the message says why",
        }
    }

    /// The kind of a failed connection attempt on `side`: the server's
    /// SQLSTATE when it refused; unavailable when nothing answered (in
    /// time); a TLS or protocol failure is the settings' fault, which
    /// retrying would not mend.
    pub fn of_connection(answered: bool, tls_or_protocol: bool, sqlstate: Option<&str>, side: Side) -> FaultKind {
        match sqlstate {
            Some(code) => FaultKind::of_sqlstate(code, side),
            None if tls_or_protocol => FaultKind::Internal,
            None if !answered => FaultKind::of_sqlstate("08006", side),
            None => FaultKind::of_sqlstate("08000", side),
        }
    }

    /// The kind of a PostgreSQL error, by its SQLSTATE, on `side`.
    pub fn of_sqlstate(sqlstate: &str, side: Side) -> FaultKind {
        let unavailable = match side {
            Side::Source => FaultKind::SourceUnavailable,
            Side::Target => FaultKind::TargetUnavailable,
        };
        match sqlstate {
            // admin_shutdown, crash_shutdown, cannot_connect_now,
            // too_many_connections, idle_session_timeout: the server or a
            // limit ended the session; a new one may fare better.
            "57P01" | "57P02" | "57P03" | "53300" | "57P05" => unavailable,
            // query_canceled (statement_timeout, a cancel),
            // lock_not_available (lock_timeout),
            // idle_in_transaction_session_timeout.
            "57014" | "55P03" | "25P03" => FaultKind::Timeout,
            "40001" | "40P01" => FaultKind::Contention,
            "42501" | "28000" | "28P01" => FaultKind::Privilege,
            _ => match &sqlstate[..sqlstate.len().min(2)] {
                // connection_exception; operator_intervention (the rest).
                "08" | "57" => unavailable,
                // insufficient_resources, program_limit_exceeded.
                "53" | "54" => FaultKind::Exhausted,
                "XX" | "58" => FaultKind::Internal,
                _ => FaultKind::Rejected,
            },
        }
    }
}

const ALL: [FaultKind; 14] = [
    FaultKind::SourceUnavailable,
    FaultKind::TargetUnavailable,
    FaultKind::AgentAway,
    FaultKind::Timeout,
    FaultKind::Contention,
    FaultKind::SnapshotLost,
    FaultKind::SlotLost,
    FaultKind::SourceChanged,
    FaultKind::Blocked,
    FaultKind::Privilege,
    FaultKind::Rejected,
    FaultKind::Exhausted,
    FaultKind::Mismatch,
    FaultKind::Internal,
];

/// A classified failure: its kind and what happened, in one line that
/// names the object and says what the server said (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Fault {
    pub kind: FaultKind,
    pub message: String,
}

impl Fault {
    pub fn new(kind: FaultKind, message: impl Into<String>) -> Fault {
        Fault {
            kind,
            message: message.into(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.kind.policy()
    }

    /// The message with the operator's hint.
    pub fn explained(&self) -> String {
        format!("{} ({}: {})", self.message, self.kind.name(), self.kind.hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_name_that_round_trips_and_a_hint() {
        for kind in ALL {
            assert_eq!(FaultKind::from_name(kind.name()), Some(kind));
            assert!(!kind.hint().is_empty());
        }
        assert_eq!(FaultKind::from_name("nonsense"), None);
    }

    #[test]
    fn server_restarts_and_timeouts_are_retried_privileges_are_not() {
        for (sqlstate, kind) in [
            ("57P01", FaultKind::TargetUnavailable),
            ("08006", FaultKind::TargetUnavailable),
            ("57014", FaultKind::Timeout),
            ("55P03", FaultKind::Timeout),
            ("25P03", FaultKind::Timeout),
            ("40P01", FaultKind::Contention),
        ] {
            assert_eq!(FaultKind::of_sqlstate(sqlstate, Side::Target), kind, "{sqlstate}");
            assert_eq!(kind.policy(), Policy::Retry, "{sqlstate}");
        }
        assert_eq!(
            FaultKind::of_sqlstate("57P01", Side::Source),
            FaultKind::SourceUnavailable
        );
        for sqlstate in ["42501", "42P07", "23505", "53100", "XX000"] {
            assert_eq!(
                FaultKind::of_sqlstate(sqlstate, Side::Target).policy(),
                Policy::Operator,
                "{sqlstate}"
            );
        }
        assert_eq!(FaultKind::SnapshotLost.policy(), Policy::RestartCopy);
    }
}
