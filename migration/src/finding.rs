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
/// What the agent learned of the source that the target-side checks need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceFacts {
    pub server_version_num: u32,
    pub database_size_bytes: u64,
    /// Installed in the source database (plpgsql left out: every server has it).
    pub extensions: Vec<Extension>,
    /// The tables in scope: ordinary and partitioned tables.
    pub tables: Vec<crate::ident::QualifiedName>,
    /// The schemas the schema dump covers.
    #[serde(default)]
    pub schemas: Vec<SourceSchema>,
    /// With `--privileges`: the roles the schema's GRANTs name.
    #[serde(default)]
    pub roles: Vec<NamedRole>,
}

/// A role a GRANT (or default privileges) of the source's schema names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NamedRole {
    pub name: String,
    pub login: bool,
    pub inherit: bool,
    pub create_db: bool,
    pub create_role: bool,
    /// -1: no limit.
    pub connection_limit: i32,
    /// The roles it is a member of.
    pub member_of: Vec<String>,
}

impl NamedRole {
    /// The statements that make it on another server: its attributes but
    /// no password and no superuser's attribute (the operator sets those).
    pub fn create_statements(&self) -> String {
        let name = crate::ident::quote_ident(&self.name);
        let mut attributes = vec![
            if self.login { "LOGIN" } else { "NOLOGIN" },
            if self.inherit { "INHERIT" } else { "NOINHERIT" },
        ];
        if self.create_db {
            attributes.push("CREATEDB");
        }
        if self.create_role {
            attributes.push("CREATEROLE");
        }
        let mut sql = format!("CREATE ROLE {name} {}", attributes.join(" "));
        if self.connection_limit >= 0 {
            sql.push_str(&format!(" CONNECTION LIMIT {}", self.connection_limit));
        }
        sql.push(';');
        for group in &self.member_of {
            sql.push_str(&format!(" GRANT {} TO {name};", crate::ident::quote_ident(group)));
        }
        if self.login {
            sql.push_str(&format!(
                " ALTER ROLE {name} PASSWORD '...'; -- set its password yourself"
            ));
        }
        sql
    }
}

/// A schema of the source, as the schema dump treats it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceSchema {
    pub name: String,
    /// The dump creates it (`CREATE SCHEMA`): every schema but `public`.
    pub created_by_dump: bool,
    /// The dump creates objects in it.
    pub has_objects: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Extension {
    pub name: String,
    pub version: String,
}

impl Finding {
    pub fn error(
        side: Side,
        check: &str,
        object: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(Severity::Error, side, check, object, message, fix)
    }

    pub fn warning(
        side: Side,
        check: &str,
        object: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(Severity::Warning, side, check, object, message, fix)
    }

    fn new(
        severity: Severity,
        side: Side,
        check: &str,
        object: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            severity,
            side,
            check: check.to_owned(),
            object: object.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }
}
