//! A source session that holds walbridge up (a lock the fence waits for,
//! a transaction the slot's creation waits for), named to the operator the
//! one way: pid, what `pg_stat_activity` shows of it where the role may
//! see it (never the query text: it may carry the application's values),
//! and the statement that ends it.

use tokio_postgres::Row;

/// The columns [`describe`] reads, from `first` on, for a query that
/// `LEFT JOIN pg_stat_activity a`.
pub const ACTIVITY_COLUMNS: &str = "coalesce(a.usename::text, ''), coalesce(a.application_name, ''), \
     coalesce(a.state, ''), extract(epoch FROM now() - a.xact_start)::float8";

/// `pid P (user U, application A, state S, transaction open N s): let it
/// finish, or end it with SELECT pg_terminate_backend(P)`, with `known`
/// first among the details (an xid, say).
pub fn describe(pid: i32, row: &Row, first: usize, known: Option<String>) -> String {
    let mut about: Vec<String> = known.into_iter().collect();
    for (offset, name) in ["user", "application", "state"].into_iter().enumerate() {
        let value: String = row.get(first + offset);
        if !value.is_empty() {
            about.push(format!("{name} {value}"));
        }
    }
    if let Some(age) = row.get::<_, Option<f64>>(first + 3) {
        about.push(format!("transaction open {age:.0} s"));
    }
    format!(
        "pid {pid} ({}): let it finish, or end it with SELECT pg_terminate_backend({pid})",
        about.join(", ")
    )
}
