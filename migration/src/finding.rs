//! What preflight finds: each finding is an error (it blocks `start`) or a
//! warning, names the object concerned, says why it matters and gives the
//! command that fixes it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Error,
}

/// Which side a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Source,
    Target,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    pub side: Side,
    /// A stable name for the check, e.g. `wal_level`, `no_replica_identity`.
    pub check: String,
    /// The object concerned, quoted as PostgreSQL would (`"Sales".orders`),
    /// or the setting's name; empty when the finding is about the server.
    pub object: String,
    /// What is wrong and why it matters.
    pub message: String,
    /// The command (SQL or shell) that fixes it; empty when there is none.
    pub fix: String,
}

impl Finding {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}
