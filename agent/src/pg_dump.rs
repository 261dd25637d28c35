//! Which `pg_dump` dumps the source's schema. A `pg_dump` refuses a server
//! of a newer major than its own, and the newest one dumps every older
//! server (back to 9.2), so without `source.pg_dump` the agent takes the
//! newest it can find: on `PATH`, beside the PostgreSQL installed on its
//! host (`pg_config --bindir`) and in the packagers' layouts, which keep
//! one folder per major side by side (Debian's `/usr/lib/postgresql/N`,
//! the PGDG RPMs' `/usr/pgsql-N`). A configured one is used as given.
//!
//! Found afresh at each use (preflight, each dump), so a client installed
//! after the agent started is seen without a restart.

use std::path::{Path, PathBuf};

/// Packagers' folders of one major each: `(parent, prefix)` names
/// `parent/<prefix><major>/bin`.
const PACKAGED_MAJORS: &[(&str, &str)] = &[("/usr/lib/postgresql", ""), ("/usr", "pgsql-")];

/// The setting: one program, or the newest found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgDumpChoice {
    /// `source.pg_dump`, used as given.
    Configured(String),
    /// The newest `pg_dump` found (see the module doc).
    Newest,
}

/// A `pg_dump` that ran and said its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgDump {
    pub program: PathBuf,
    pub major: u32,
    /// Its `--version` line.
    pub version: String,
}

/// Why no `pg_dump` could be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotFound {
    /// What was tried and what each said.
    pub tried: Vec<String>,
}

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tried.is_empty() {
            write!(
                f,
                "no pg_dump on PATH, beside pg_config's bindir or under /usr/lib/postgresql or /usr/pgsql-*"
            )
        } else {
            write!(f, "no pg_dump that runs: {}", self.tried.join("; "))
        }
    }
}

impl PgDumpChoice {
    /// The `pg_dump` to use now.
    pub async fn resolve(&self) -> Result<PgDump, NotFound> {
        match self {
            PgDumpChoice::Configured(program) => probe(Path::new(program)).await.map_err(|problem| NotFound {
                tried: vec![format!("{program}: {problem}")],
            }),
            PgDumpChoice::Newest => {
                let mut tried = Vec::new();
                let mut best: Option<PgDump> = None;
                for candidate in candidates().await {
                    match probe(&candidate).await {
                        Ok(found) if best.as_ref().is_none_or(|b| found.major > b.major) => best = Some(found),
                        Ok(_) => {}
                        Err(problem) => tried.push(format!("{}: {problem}", candidate.display())),
                    }
                }
                best.ok_or(NotFound { tried })
            }
        }
    }

    /// How preflight names this choice in a finding.
    pub fn describe(&self) -> String {
        match self {
            PgDumpChoice::Configured(program) => format!("source.pg_dump ({program})"),
            PgDumpChoice::Newest => "the newest pg_dump found (source.pg_dump is not set)".to_owned(),
        }
    }
}

/// Every `pg_dump` on this host worth trying, without duplicates.
async fn candidates() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        found.extend(std::env::split_paths(&path).map(|dir| dir.join("pg_dump")));
    }
    if let Ok(out) = tokio::process::Command::new("pg_config").arg("--bindir").output().await
        && out.status.success()
    {
        found.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("pg_dump"));
    }
    for (parent, prefix) in PACKAGED_MAJORS {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(major) = name.strip_prefix(prefix) else {
                continue;
            };
            if !major.is_empty() && major.chars().all(|c| c.is_ascii_digit()) {
                found.push(entry.path().join("bin").join("pg_dump"));
            }
        }
    }
    let mut unique = Vec::new();
    for path in found {
        if path.is_file() && !unique.contains(&path) {
            unique.push(path);
        }
    }
    unique
}

/// Runs `program --version`.
async fn probe(program: &Path) -> Result<PgDump, String> {
    let out = tokio::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot be run: {e}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(format!("--version failed ({}): {}", out.status, said.trim()));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major = major_of(&version).ok_or_else(|| format!("cannot tell its version from {version:?}"))?;
    Ok(PgDump {
        program: program.to_owned(),
        major,
        version,
    })
}

/// The major in a `--version` line: "pg_dump (PostgreSQL) 15.18 (Debian
/// 15.18-0+deb12u1)" is 15.
pub fn major_of(version_line: &str) -> Option<u32> {
    version_line
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors_are_read_from_version_lines() {
        assert_eq!(
            major_of("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_of("pg_dump (PostgreSQL) 18.1"), Some(18));
        assert_eq!(major_of("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(major_of("something else"), None);
    }

    #[tokio::test]
    async fn a_configured_pg_dump_that_cannot_run_says_so() {
        let choice = PgDumpChoice::Configured("/nonexistent/pg_dump".to_owned());
        let error = choice.resolve().await.unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/pg_dump: cannot be run"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn the_newest_found_is_at_least_the_one_on_path() {
        // This machine has Debian's pg_dump on PATH (the tests need psql's
        // package anyway): discovery finds it or a newer one.
        let on_path = probe(Path::new("pg_dump")).await.expect("pg_dump on PATH");
        let newest = PgDumpChoice::Newest.resolve().await.unwrap();
        assert!(newest.major >= on_path.major, "{newest:?} vs {on_path:?}");
    }
}
