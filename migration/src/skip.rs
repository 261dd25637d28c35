//! Which of pg_dump's entries are not applied to the target: those
//! walbridge leaves out itself because they are not the application's
//! schema and a role that is not a superuser may not run them (comments
//! on extensions and on the `public` schema), and those the operator
//! names with `start --skip`.
//!
//! A skip names an entry as its header does: its type, then its name,
//! schema-qualified or not (`EVENT TRIGGER audit_ddl`, `EXTENSION
//! pg_stat_statements`, `TABLE public.orders`); the type is compared
//! case-insensitively, the name exactly.

use crate::script::{Entry, Statement};

/// One `--skip` value, as the operator gave it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skip(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--skip {0:?} is not a schema entry: give its type and name as pg_dump's header names them, \
     e.g. --skip 'EVENT TRIGGER audit_ddl' or --skip 'EXTENSION pg_stat_statements'"
)]
pub struct SkipError(pub String);

impl Skip {
    pub fn parse(text: &str) -> Result<Skip, SkipError> {
        let text = text.trim();
        match text.split_once(' ') {
            Some((kind, name)) if !kind.is_empty() && !name.trim().is_empty() => Ok(Skip(text.to_owned())),
            _ => Err(SkipError(text.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, entry: &Entry) -> bool {
        let kind = entry.kind.as_str();
        let Some(head) = self.0.get(..kind.len()) else {
            return false;
        };
        let Some(name) = self.0[kind.len()..].strip_prefix(' ') else {
            return false;
        };
        if !head.eq_ignore_ascii_case(kind) {
            return false;
        }
        let name = name.trim_start();
        name == entry.name
            || entry.schema.as_ref().is_some_and(|schema| {
                name.strip_prefix(schema.as_str()).and_then(|n| n.strip_prefix('.')) == Some(&entry.name)
            })
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Entries walbridge never applies: comments on extensions (they fail
/// when the extension was installed on the target by another role, and
/// describe the extension, not the application) and on the `public`
/// schema (it belongs to the database's owner).
pub fn left_out_by_walbridge(entry: &Entry) -> bool {
    entry.kind == "COMMENT" && (entry.name.starts_with("EXTENSION ") || entry.name == "SCHEMA public")
}

/// What [`filter`] kept, and which skips matched something.
#[derive(Debug, Default)]
pub struct Filtered {
    pub statements: Vec<Statement>,
    /// Labels of the entries left out, in order, each once.
    pub left_out: Vec<String>,
    /// For each skip given, whether it matched an entry.
    pub matched: Vec<bool>,
}

/// Leaves out the statements of entries walbridge does not apply and of
/// entries the skips name.
pub fn filter(statements: Vec<Statement>, skips: &[Skip]) -> Filtered {
    let mut filtered = Filtered {
        matched: vec![false; skips.len()],
        ..Filtered::default()
    };
    for statement in statements {
        let Some(entry) = &statement.entry else {
            filtered.statements.push(statement);
            continue;
        };
        let mut leave_out = left_out_by_walbridge(entry);
        for (skip, matched) in skips.iter().zip(filtered.matched.iter_mut()) {
            if skip.matches(entry) {
                *matched = true;
                leave_out = true;
            }
        }
        if leave_out {
            let label = entry.label();
            if filtered.left_out.last() != Some(&label) {
                filtered.left_out.push(label);
            }
        } else {
            filtered.statements.push(statement);
        }
    }
    filtered
}

/// The skips that matched nothing in any of the filtered scripts.
pub fn unmatched<'a>(skips: &'a [Skip], matched: &[&[bool]]) -> Vec<&'a Skip> {
    skips
        .iter()
        .enumerate()
        .filter(|(i, _)| !matched.iter().any(|m| m.get(*i).copied().unwrap_or(false)))
        .map(|(_, skip)| skip)
        .collect()
}

/// `walbridge start --skip '...'` for an entry, quoted for a POSIX shell.
pub fn skip_argument(entry: &Entry) -> String {
    format!("--skip '{}'", entry.label().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::split;

    fn entry(kind: &str, schema: Option<&str>, name: &str) -> Entry {
        Entry {
            kind: kind.to_owned(),
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        }
    }

    #[test]
    fn a_skip_matches_type_case_insensitively_and_name_exactly() {
        let trigger = entry("EVENT TRIGGER", None, "audit_ddl");
        assert!(Skip::parse("EVENT TRIGGER audit_ddl").unwrap().matches(&trigger));
        assert!(Skip::parse("  event trigger audit_ddl ").unwrap().matches(&trigger));
        assert!(!Skip::parse("EVENT TRIGGER Audit_ddl").unwrap().matches(&trigger));
        assert!(!Skip::parse("EVENT TRIGGER audit").unwrap().matches(&trigger));
        assert!(!Skip::parse("TRIGGER audit_ddl").unwrap().matches(&trigger));

        let table = entry("TABLE", Some("public"), "orders");
        assert!(Skip::parse("TABLE public.orders").unwrap().matches(&table));
        assert!(Skip::parse("table orders").unwrap().matches(&table));
        assert!(!Skip::parse("TABLE shop.orders").unwrap().matches(&table));
        // A multi-word name: a constraint is "table constraint".
        let constraint = entry("FK CONSTRAINT", Some("shop"), "items items_owner_fkey");
        assert!(
            Skip::parse("FK CONSTRAINT shop.items items_owner_fkey")
                .unwrap()
                .matches(&constraint)
        );
        assert_eq!(constraint.label(), "FK CONSTRAINT shop.items items_owner_fkey");

        assert!(Skip::parse("audit_ddl").is_err());
        assert!(Skip::parse("  ").is_err());
        assert_eq!(
            skip_argument(&entry("TABLE", Some("public"), "it's")),
            "--skip 'TABLE public.it'\\''s'"
        );
    }

    #[test]
    fn filter_leaves_out_extension_comments_and_skipped_entries_only() {
        let script = "SET x = 1;\n\
                      --\n-- Name: hstore; Type: EXTENSION; Schema: -; Owner: -\n--\n\
                      CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA public;\n\
                      --\n-- Name: EXTENSION hstore; Type: COMMENT; Schema: -; Owner: -\n--\n\
                      COMMENT ON EXTENSION hstore IS 'kv';\n\
                      --\n-- Name: audit_ddl; Type: EVENT TRIGGER; Schema: -; Owner: -\n--\n\
                      CREATE EVENT TRIGGER audit_ddl ON ddl_command_end EXECUTE FUNCTION public.f();\n\
                      SET default_tablespace = '';\n\
                      --\n-- Name: t; Type: TABLE; Schema: public; Owner: -\n--\n\
                      CREATE TABLE public.t (id int);\n";
        let skips = [
            Skip::parse("EVENT TRIGGER audit_ddl").unwrap(),
            Skip::parse("TABLE public.nothing").unwrap(),
        ];
        let filtered = filter(split(script).unwrap(), &skips);
        let kept: Vec<&str> = filtered.statements.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            kept,
            [
                "SET x = 1",
                "CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA public",
                "SET default_tablespace = ''",
                "CREATE TABLE public.t (id int)"
            ]
        );
        assert_eq!(
            filtered.left_out,
            ["COMMENT EXTENSION hstore", "EVENT TRIGGER audit_ddl"]
        );
        assert_eq!(filtered.matched, [true, false]);
        let unmatched = unmatched(&skips, &[&filtered.matched, &[false, false]]);
        assert_eq!(unmatched, [&skips[1]]);
    }
}
