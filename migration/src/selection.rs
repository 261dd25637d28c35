//! Which tables a migration covers: `--tables` and `--exclude` patterns.
//!
//! A pattern matches `schema.table` as the catalog spells it (unquoted),
//! with `*` (any run of characters) and `?` (one character); a pattern
//! without a dot matches the table name in any schema.

use crate::ident::QualifiedName;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error("the table pattern {0:?} matches no table of the source database")]
    MatchesNothing(String),
    #[error("the table pattern {0:?} is empty")]
    Empty(String),
    #[error("the selection leaves no table to migrate")]
    NothingLeft,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    /// Empty: every table.
    pub tables: Vec<String>,
    pub exclude: Vec<String>,
}

impl Selection {
    /// The tables of `all` that the selection keeps, in `all`'s order.
    /// Every pattern must match something: a typo is an error, not an
    /// empty migration.
    pub fn resolve(&self, all: &[QualifiedName]) -> Result<Vec<QualifiedName>, SelectionError> {
        for pattern in self.tables.iter().chain(&self.exclude) {
            if pattern.trim().is_empty() {
                return Err(SelectionError::Empty(pattern.clone()));
            }
            if !all.iter().any(|t| matches(pattern, t)) {
                return Err(SelectionError::MatchesNothing(pattern.clone()));
            }
        }
        let kept: Vec<QualifiedName> = all
            .iter()
            .filter(|t| self.tables.is_empty() || self.tables.iter().any(|p| matches(p, t)))
            .filter(|t| !self.exclude.iter().any(|p| matches(p, t)))
            .cloned()
            .collect();
        if kept.is_empty() {
            return Err(SelectionError::NothingLeft);
        }
        Ok(kept)
    }
}

/// Whether `pattern` matches `table`.
pub fn matches(pattern: &str, table: &QualifiedName) -> bool {
    match pattern.split_once('.') {
        Some(_) => glob(pattern, &format!("{}.{}", table.schema, table.name)),
        None => glob(pattern, &table.name),
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((star_p, star_t)) = star {
            pi = star_p + 1;
            ti = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> QualifiedName {
        QualifiedName::new(schema, name)
    }

    #[test]
    fn patterns_match_schema_qualified_or_bare_names() {
        assert!(matches("public.orders", &t("public", "orders")));
        assert!(matches("orders", &t("sales", "orders")));
        assert!(matches("sales.*", &t("sales", "Order Lines")));
        assert!(matches("*.order_?", &t("x", "order_1")));
        assert!(!matches("*.order_?", &t("x", "order_12")));
        assert!(matches("größe*", &t("s", "größe_tabelle")));
        assert!(!matches("public.orders", &t("sales", "orders")));
    }

    #[test]
    fn a_pattern_matching_nothing_is_an_error() {
        let all = vec![t("public", "a"), t("public", "b"), t("s", "c")];
        let sel = Selection {
            tables: vec!["public.*".into()],
            exclude: vec!["b".into()],
        };
        assert_eq!(sel.resolve(&all).unwrap(), vec![t("public", "a")]);
        let typo = Selection {
            tables: vec!["pubic.*".into()],
            exclude: vec![],
        };
        assert_eq!(
            typo.resolve(&all),
            Err(SelectionError::MatchesNothing("pubic.*".into()))
        );
        let none_left = Selection {
            tables: vec![],
            exclude: vec!["*".into()],
        };
        assert_eq!(none_left.resolve(&all), Err(SelectionError::NothingLeft));
        assert_eq!(Selection::default().resolve(&all).unwrap().len(), 3);
    }
}
