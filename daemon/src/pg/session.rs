//! What a walbridge session sets for itself, whatever the server's, the
//! database's or the role's defaults say (`ALTER ROLE ... SET
//! statement_timeout` and the like): the timeouts that would cut a long
//! copy, checksum or index build off, or let a short question hang.
//!
//! A [`SessionPolicy`] is applied the same way by every client walbridge
//! runs — ordinary sessions, the replication connection and `pg_dump`:
//! the settings every supported server (10 and later) knows travel in the
//! startup packet's `options`, which outrank role and database settings;
//! the ones only newer servers know (`idle_session_timeout`, 14;
//! `transaction_timeout`, 17) are `SET` once the server has said its
//! version, because a startup `options` naming a setting the server does
//! not know is FATAL.

use std::time::Duration;

/// The oldest server walbridge supports (`server_version_num`): settings
/// it knows may go in any startup packet.
pub const OLDEST_SERVER: u32 = 100000;

/// The timeouts one session runs under. Zero means "never".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// `statement_timeout`.
    pub statement_timeout: Duration,
    /// `lock_timeout`: how long a statement may wait for a lock, so that a
    /// walbridge statement queued behind another's lock does not make
    /// everyone queued behind it wait too.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: sessions reading an exported
    /// snapshot sit idle in their transaction between statements.
    pub idle_in_transaction_session_timeout: Duration,
    /// SQL run once connected, after the timeouts (session settings of the
    /// caller's own, e.g. how rows render as text).
    pub setup: &'static str,
}

impl SessionPolicy {
    /// Bulk work (copy, checksums, schema, the snapshot and the sessions
    /// that read it, pg_dump): never cut off, by any timeout. Its tables
    /// are its own, so it does not bound its lock waits either.
    pub const UNBOUNDED: SessionPolicy = SessionPolicy {
        statement_timeout: Duration::ZERO,
        lock_timeout: Duration::ZERO,
        idle_in_transaction_session_timeout: Duration::ZERO,
        setup: "",
    };

    /// Short questions and small changes (status, catalog probes, the
    /// publication, roles): a statement running for 30 s is stuck, and
    /// one that waits 10 s for a lock gives up (and is retried) rather
    /// than hold up the sessions queued behind it.
    pub const BOUNDED: SessionPolicy = SessionPolicy {
        statement_timeout: Duration::from_secs(30),
        lock_timeout: Duration::from_secs(10),
        idle_in_transaction_session_timeout: Duration::ZERO,
        setup: "",
    };

    /// This policy, with `setup` run once connected.
    pub const fn with_setup(self, setup: &'static str) -> SessionPolicy {
        SessionPolicy { setup, ..self }
    }

    /// Every setting the policy makes, with the first server version that
    /// has it. walbridge closes its own sessions, so none is ended for
    /// idling; nor is a transaction bounded as a whole (a copy's is long).
    fn settings(&self) -> [(&'static str, Duration, u32); 5] {
        [
            ("statement_timeout", self.statement_timeout, 0),
            ("lock_timeout", self.lock_timeout, 90300),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_session_timeout,
                90600,
            ),
            ("idle_session_timeout", Duration::ZERO, 140000),
            ("transaction_timeout", Duration::ZERO, 170000),
        ]
    }

    /// The settings every supported server knows, as a startup packet's
    /// `options` (`-c name=value ...`; values in milliseconds, so nothing
    /// needs escaping).
    pub fn startup_options(&self) -> String {
        self.settings()
            .into_iter()
            .filter(|(_, _, since)| *since <= OLDEST_SERVER)
            .map(|(name, value, _)| format!("-c {name}={}", value.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `SET` statements for the settings a server of `server_version_num`
    /// has that older supported servers lack (empty when there are none),
    /// each ending in `;`.
    pub fn versioned_statements(&self, server_version_num: u32) -> String {
        self.settings()
            .into_iter()
            .filter(|(_, _, since)| *since > OLDEST_SERVER && *since <= server_version_num)
            .map(|(name, value, _)| format!("SET {name} = {};", value.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `options` for a startup packet: the connection string's own (the
/// operator's), then the policy's, which win where both set a value.
pub fn combined_options(given: Option<&str>, policy: &SessionPolicy) -> String {
    match given.map(str::trim).filter(|g| !g.is_empty()) {
        Some(given) => format!("{given} {}", policy.startup_options()),
        None => policy.startup_options(),
    }
}

/// `server_version` as the server reports it, as `server_version_num`:
/// "15.18 (Debian ...)" is 150018, "9.6.24" is 90624, "16beta1" is 160000.
pub fn server_version_num(version: &str) -> u32 {
    let numeric: String = version
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let second = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10000 + second
    } else {
        major * 10000 + second * 100 + parts.next().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_become_numbers() {
        assert_eq!(server_version_num("15.18 (Debian 15.18-0+deb12u1)"), 150018);
        assert_eq!(server_version_num("10.23"), 100023);
        assert_eq!(server_version_num("16beta1"), 160000);
        assert_eq!(server_version_num("9.6.24"), 90624);
        assert_eq!(server_version_num("18.1"), 180001);
    }

    #[test]
    fn startup_options_name_only_what_every_supported_server_knows() {
        assert_eq!(
            SessionPolicy::UNBOUNDED.startup_options(),
            "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0"
        );
        assert_eq!(
            SessionPolicy::BOUNDED.startup_options(),
            "-c statement_timeout=30000 -c lock_timeout=10000 -c idle_in_transaction_session_timeout=0"
        );
        assert_eq!(
            combined_options(Some(" -c search_path=app "), &SessionPolicy::UNBOUNDED),
            "-c search_path=app -c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0"
        );
    }

    #[test]
    fn newer_settings_are_set_only_on_servers_that_have_them() {
        let policy = SessionPolicy::UNBOUNDED;
        assert_eq!(policy.versioned_statements(100023), "");
        assert_eq!(policy.versioned_statements(130000), "");
        assert_eq!(policy.versioned_statements(150018), "SET idle_session_timeout = 0;");
        assert_eq!(
            policy.versioned_statements(170002),
            "SET idle_session_timeout = 0; SET transaction_timeout = 0;"
        );
    }
}
