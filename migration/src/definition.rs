//! What a table is, as both sides see it (its columns with their types,
//! nullability and defaults; its constraints; its other indexes), read by
//! one query that both the agent and the controller run, and the
//! differences between source and target — each with the DDL that brings
//! the target in line, and whether that DDL only adds (so `sync-schema`
//! may run it while the subscription streams) or would change or remove
//! something (then a person decides).

use serde::{Deserialize, Serialize};

use crate::ident::{QualifiedName, quote_ident};

/// One row per table named in `$1` (a `text[]` of quoted names) that
/// exists: that name, its schema, and its definition as JSON. NOT NULL
/// constraints (`contype = 'n'`, PostgreSQL 18 catalogues them) are left
/// out: the columns' `not_null` says the same on every version, so a
/// source before 18 and a target on 18 agree.
pub const DEFINITIONS_SQL: &str = "\
    SELECT t.name, n.nspname::text, json_build_object( \
      'columns', (SELECT coalesce(json_agg(json_build_object( \
                     'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod), \
                     'not_null', a.attnotnull, 'default', pg_get_expr(d.adbin, d.adrelid)) ORDER BY a.attnum), '[]') \
                  FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), \
      'constraints', (SELECT coalesce(json_agg(json_build_object( \
                     'name', k.conname, 'def', pg_get_constraintdef(k.oid)) ORDER BY k.conname), '[]') \
                  FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype <> 'n'), \
      'indexes', (SELECT coalesce(json_agg(json_build_object( \
                     'name', i.relname, 'def', pg_get_indexdef(x.indexrelid)) ORDER BY i.relname), '[]') \
                  FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
                  WHERE x.indrelid = c.oid \
                    AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid \
                                    AND k.conrelid = c.oid)) \
    )::text \
    FROM unnest($1::text[]) AS t(name) JOIN pg_class c ON c.oid = to_regclass(t.name) \
    JOIN pg_namespace n ON n.oid = c.relnamespace";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub not_null: bool,
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
    pub def: String,
}

/// A table's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDefinition {
    /// The table, quoted as `$1` named it.
    #[serde(skip)]
    pub table: String,
    #[serde(skip)]
    pub schema: String,
    pub columns: Vec<Column>,
    pub constraints: Vec<Named>,
    pub indexes: Vec<Named>,
}

impl TableDefinition {
    /// One row of [`DEFINITIONS_SQL`]: the table's quoted name and the JSON.
    pub fn from_row(table: &str, schema: &str, json: &str) -> Result<TableDefinition, String> {
        let mut definition: TableDefinition =
            serde_json::from_str(json).map_err(|e| format!("the definition of {table} does not parse: {e}"))?;
        definition.table = table.to_owned();
        definition.schema = schema.to_owned();
        Ok(definition)
    }
}

/// One way the target's table differs from the source's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// The table, quoted.
    pub table: String,
    /// What differs, in words.
    pub what: String,
    /// The DDL that brings the target in line (run on the target).
    pub ddl: String,
    /// The DDL only adds or widens: safe while the subscription streams.
    pub additive: bool,
}

/// Whether changing a column from `from` to `to` only widens it: every
/// value of the old type is a value of the new one, unchanged.
pub fn widens(from: &str, to: &str) -> bool {
    let rank = |t: &str| match t {
        "smallint" => Some(1),
        "integer" => Some(2),
        "bigint" => Some(3),
        _ => None,
    };
    if let (Some(a), Some(b)) = (rank(from), rank(to)) {
        return a < b;
    }
    if from == "real" && to == "double precision" {
        return true;
    }
    let length = |t: &str, prefix: &str| {
        t.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('('))
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|n| n.parse::<u32>().ok())
    };
    for varying in ["character varying", "bit varying"] {
        if let Some(old) = length(from, varying) {
            return to == varying
                || (to == "text" && varying == "character varying")
                || length(to, varying).is_some_and(|new| new >= old);
        }
    }
    from == "character varying" && to == "text"
}

/// Every difference between the source's tables and the target's.
pub fn compare(source: &[TableDefinition], target: &[TableDefinition]) -> Vec<Drift> {
    let mut drifts = Vec::new();
    for wanted in source {
        let table = &wanted.table;
        let Some(have) = target.iter().find(|t| &t.table == table) else {
            drifts.push(Drift {
                table: table.clone(),
                what: "the table does not exist on the target".to_owned(),
                ddl: String::new(),
                additive: false,
            });
            continue;
        };
        let mut push = |what: String, ddl: String, additive: bool| {
            drifts.push(Drift {
                table: table.clone(),
                what,
                ddl,
                additive,
            })
        };
        for column in &wanted.columns {
            let name = quote_ident(&column.name);
            match have.columns.iter().find(|c| c.name == column.name) {
                None => {
                    let mut ddl = format!("ALTER TABLE {table} ADD COLUMN {name} {}", column.type_name);
                    if let Some(default) = &column.default {
                        ddl.push_str(&format!(" DEFAULT {default}"));
                        if column.not_null {
                            ddl.push_str(" NOT NULL");
                        }
                    }
                    push(
                        format!("column {name} ({}) is missing on the target", column.type_name),
                        ddl,
                        true,
                    );
                }
                Some(existing) => {
                    if existing.type_name != column.type_name {
                        push(
                            format!(
                                "column {name} is {} on the source, {} on the target",
                                column.type_name, existing.type_name
                            ),
                            format!("ALTER TABLE {table} ALTER COLUMN {name} TYPE {}", column.type_name),
                            widens(&existing.type_name, &column.type_name),
                        );
                    }
                    if existing.default != column.default {
                        let ddl = match &column.default {
                            Some(default) => format!("ALTER TABLE {table} ALTER COLUMN {name} SET DEFAULT {default}"),
                            None => format!("ALTER TABLE {table} ALTER COLUMN {name} DROP DEFAULT"),
                        };
                        push(
                            format!(
                                "column {name} defaults to {} on the source, {} on the target",
                                column.default.as_deref().unwrap_or("nothing"),
                                existing.default.as_deref().unwrap_or("nothing")
                            ),
                            ddl,
                            column.default.is_some(),
                        );
                    }
                    if existing.not_null != column.not_null {
                        let (what, ddl) = if column.not_null {
                            ("NOT NULL on the source only", "SET NOT NULL")
                        } else {
                            ("NOT NULL on the target only", "DROP NOT NULL")
                        };
                        // Dropping a constraint the source does not have
                        // only lets more rows in: it is safe to apply.
                        push(
                            format!("column {name} is {what}"),
                            format!("ALTER TABLE {table} ALTER COLUMN {name} {ddl}"),
                            !column.not_null,
                        );
                    }
                }
            }
        }
        for extra in have
            .columns
            .iter()
            .filter(|c| !wanted.columns.iter().any(|w| w.name == c.name))
        {
            let name = quote_ident(&extra.name);
            push(
                format!("column {name} exists on the target only (dropped or renamed on the source?)"),
                format!("ALTER TABLE {table} DROP COLUMN {name}"),
                false,
            );
        }
        compare_named(&wanted.constraints, &have.constraints, |what, named, additive| {
            let name = quote_ident(&named.name);
            let ddl = match what {
                Side::SourceOnly => format!("ALTER TABLE {table} ADD CONSTRAINT {name} {}", named.def),
                Side::TargetOnly => format!("ALTER TABLE {table} DROP CONSTRAINT {name}"),
                Side::Differs => format!(
                    "ALTER TABLE {table} DROP CONSTRAINT {name}, ADD CONSTRAINT {name} {}",
                    named.def
                ),
            };
            push(
                format!("constraint {name} {}: {}", what.words(), named.def),
                ddl,
                additive,
            );
        });
        let schema = quote_ident(&wanted.schema);
        compare_named(&wanted.indexes, &have.indexes, |what, named, additive| {
            let name = quote_ident(&named.name);
            let ddl = match what {
                Side::SourceOnly => named.def.clone(),
                Side::TargetOnly => format!("DROP INDEX {schema}.{name}"),
                Side::Differs => format!("DROP INDEX {schema}.{name}; {}", named.def),
            };
            push(format!("index {name} {}: {}", what.words(), named.def), ddl, additive);
        });
    }
    drifts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    SourceOnly,
    TargetOnly,
    Differs,
}

impl Side {
    fn words(self) -> &'static str {
        match self {
            Side::SourceOnly => "is missing on the target",
            Side::TargetOnly => "exists on the target only",
            Side::Differs => "differs on the target",
        }
    }
}

/// Constraints or indexes by name: only a missing one may be added while
/// streaming.
fn compare_named(wanted: &[Named], have: &[Named], mut found: impl FnMut(Side, &Named, bool)) {
    for named in wanted {
        match have.iter().find(|h| h.name == named.name) {
            None => found(Side::SourceOnly, named, true),
            Some(existing) if normalized(&existing.def) != normalized(&named.def) => found(Side::Differs, named, false),
            Some(_) => {}
        }
    }
    for extra in have.iter().filter(|h| !wanted.iter().any(|w| w.name == h.name)) {
        found(Side::TargetOnly, extra, false);
    }
}

fn normalized(def: &str) -> String {
    def.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The definitions of these tables, for [`DEFINITIONS_SQL`]'s `$1`.
pub fn table_list(tables: &[QualifiedName]) -> Vec<String> {
    tables.iter().map(QualifiedName::quoted).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(columns: &[(&str, &str, bool, Option<&str>)], indexes: &[(&str, &str)]) -> TableDefinition {
        TableDefinition {
            table: "public.orders".into(),
            schema: "public".into(),
            columns: columns
                .iter()
                .map(|(name, type_name, not_null, default)| Column {
                    name: (*name).into(),
                    type_name: (*type_name).into(),
                    not_null: *not_null,
                    default: default.map(str::to_owned),
                })
                .collect(),
            constraints: vec![Named {
                name: "orders_pkey".into(),
                def: "PRIMARY KEY (id)".into(),
            }],
            indexes: indexes
                .iter()
                .map(|(name, def)| Named {
                    name: (*name).into(),
                    def: (*def).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_same_table_has_no_drift() {
        let t = table(&[("id", "bigint", true, None)], &[]);
        assert!(compare(std::slice::from_ref(&t), std::slice::from_ref(&t)).is_empty());
    }

    #[test]
    fn a_new_column_and_a_new_index_are_additive_with_their_ddl() {
        let source = table(
            &[("id", "bigint", true, None), ("note", "text", true, Some("'x'::text"))],
            &[(
                "orders_note",
                "CREATE INDEX orders_note ON public.orders USING btree (note)",
            )],
        );
        let target = table(&[("id", "bigint", true, None)], &[]);
        let drifts = compare(&[source], &[target]);
        assert_eq!(drifts.len(), 2, "{drifts:#?}");
        assert_eq!(
            drifts[0].ddl,
            "ALTER TABLE public.orders ADD COLUMN note text DEFAULT 'x'::text NOT NULL"
        );
        assert!(drifts[0].additive);
        assert_eq!(
            drifts[1].ddl,
            "CREATE INDEX orders_note ON public.orders USING btree (note)"
        );
        assert!(drifts[1].additive);
    }

    #[test]
    fn widening_is_additive_narrowing_and_dropping_are_not() {
        let source = table(
            &[
                ("id", "bigint", true, None),
                ("code", "character varying(20)", false, None),
            ],
            &[],
        );
        let target = table(
            &[
                ("id", "integer", true, None),
                ("code", "character varying(40)", false, None),
                ("old", "text", false, None),
            ],
            &[],
        );
        let drifts = compare(&[source], &[target]);
        let by = |what: &str| drifts.iter().find(|d| d.what.contains(what)).unwrap();
        assert!(by("id is bigint").additive);
        assert!(!by("code is").additive, "varchar(40) to varchar(20) narrows");
        assert!(!by("old").additive);
        assert_eq!(by("old").ddl, "ALTER TABLE public.orders DROP COLUMN old");
        assert!(widens("integer", "bigint") && widens("character varying(10)", "text"));
        assert!(!widens("bigint", "integer") && !widens("text", "character varying(10)"));
    }
}
