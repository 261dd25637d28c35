//! Settings made with `ALTER ROLE ... SET` or `ALTER DATABASE ... SET`
//! (`pg_db_role_setting`) for roles whose sessions walbridge does not
//! open itself, and so cannot neutralise with its session policy: the
//! subscription's role on the source (its walsender) and the
//! subscription's owner on the target (its apply worker, which runs with
//! the owner's and the database's settings).
//!
//! Checked on PostgreSQL 15: an apply worker gives up a lock wait after
//! the owner's `lock_timeout` and restarts (or, with `disable_on_error`,
//! disables the subscription); its `statement_timeout` is not armed. A
//! streaming walsender is not cut off by `statement_timeout` or the idle
//! timeouts, but ends a subscriber that is silent for `wal_sender_timeout`,
//! which a role may set.

use crate::ident::{quote_ident, quote_literal};

/// The settings in force for role `$1` (by name) in the current database,
/// one row per setting and scope: `(name, value, precedence)`, precedence
/// 1 = that role in this database, 2 = that role anywhere, 3 = this
/// database for every role. A role that does not exist yet (walbridge's
/// own, made later) gets the database's.
pub const SQL: &str = "\
    SELECT split_part(c, '=', 1), substr(c, strpos(c, '=') + 1), \
           CASE WHEN s.setrole <> 0 AND s.setdatabase <> 0 THEN 1 WHEN s.setrole <> 0 THEN 2 ELSE 3 END::int4 \
    FROM pg_db_role_setting s, unnest(s.setconfig) c \
    WHERE (s.setrole = 0 OR s.setrole = (SELECT oid FROM pg_roles WHERE rolname = $1)) \
      AND (s.setdatabase = 0 OR s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database()))";

/// One setting as it applies to the role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSetting {
    pub name: String,
    pub value: String,
    /// Where it was set: `ALTER ROLE ... IN DATABASE`, `ALTER ROLE`, or
    /// `ALTER DATABASE` (see [`SQL`]).
    pub precedence: i32,
}

impl RoleSetting {
    /// Where the setting was made, in words.
    pub fn origin(&self, role: &str, database: &str) -> String {
        match self.precedence {
            1 => format!("ALTER ROLE {} IN DATABASE {}", quote_ident(role), quote_ident(database)),
            2 => format!("ALTER ROLE {}", quote_ident(role)),
            _ => format!("ALTER DATABASE {}", quote_ident(database)),
        }
    }
}

/// The value in force of `name` among `rows` (from [`SQL`]): the one of
/// highest precedence.
pub fn in_force(rows: &[RoleSetting], name: &str) -> Option<RoleSetting> {
    rows.iter()
        .filter(|s| s.name.eq_ignore_ascii_case(name))
        .min_by_key(|s| s.precedence)
        .cloned()
}

/// A time setting's value in milliseconds (bare numbers are milliseconds,
/// as for every timeout walbridge looks at); `None` when it is not a time.
pub fn milliseconds(value: &str) -> Option<f64> {
    let value = value.trim().trim_matches('\'').trim();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "us" => 0.001,
        "s" => 1000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    Some(number * factor)
}

/// The statement that gives `role` the value `good` in `database` only,
/// whatever the role's or the database's defaults (a role-in-database
/// setting outranks both), leaving every other role as it is.
pub fn fix(role: &str, database: &str, name: &str, good: &str) -> String {
    format!(
        "ALTER ROLE {} IN DATABASE {} SET {name} = {};",
        quote_ident(role),
        quote_ident(database),
        quote_literal(good)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(name: &str, value: &str, precedence: i32) -> RoleSetting {
        RoleSetting {
            name: name.into(),
            value: value.into(),
            precedence,
        }
    }

    #[test]
    fn the_most_specific_setting_is_in_force() {
        let rows = [
            setting("lock_timeout", "5s", 3),
            setting("lock_timeout", "0", 1),
            setting("statement_timeout", "1s", 2),
        ];
        assert_eq!(in_force(&rows, "lock_timeout").unwrap().value, "0");
        assert_eq!(in_force(&rows, "statement_timeout").unwrap().precedence, 2);
        assert_eq!(in_force(&rows, "wal_sender_timeout"), None);
    }

    #[test]
    fn times_read_with_their_units() {
        assert_eq!(milliseconds("1s"), Some(1000.0));
        assert_eq!(milliseconds("250"), Some(250.0));
        assert_eq!(milliseconds("2min"), Some(120_000.0));
        assert_eq!(milliseconds("0"), Some(0.0));
        assert_eq!(milliseconds("on"), None);
        assert_eq!(
            fix("sub", "app", "lock_timeout", "0"),
            "ALTER ROLE sub IN DATABASE app SET lock_timeout = '0';"
        );
    }
}
