//! The source's tables as the copy needs them: kind, partition parent,
//! the columns a copy reads (generated ones are marked: the target
//! computes them), and size.

use tokio_postgres::Client;
use walbridge_migration::ident::QualifiedName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub generated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    pub name: QualifiedName,
    /// `r` table or partition, `p` partitioned table, `m` materialized view.
    pub kind: char,
    pub parent: Option<QualifiedName>,
    pub columns: Vec<Column>,
    pub size_bytes: u64,
    pub pages: u64,
    /// The TOAST table's size (with its index).
    pub toast_bytes: u64,
}

/// User tables, partitioned tables and materialized views, with their
/// columns, in schema and name order. Extension-owned and system objects
/// are left out.
pub async fn list_tables(client: &Client) -> Result<Vec<SourceTable>, tokio_postgres::Error> {
    // attgenerated exists from PG12; before that no column is generated.
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    let generated = if version >= 120000 {
        "a.attgenerated <> ''"
    } else {
        "false"
    };
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text, \
                pn.nspname::text, p.relname::text, \
                coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'), \
                coalesce(array_agg({generated} ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{{}}'), \
                pg_relation_size(c.oid)::int8, c.relpages::int8, \
                coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0)::int8 \
         FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND c.relispartition \
         LEFT JOIN pg_class p ON p.oid = i.inhparent \
         LEFT JOIN pg_namespace pn ON pn.oid = p.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'm') \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', '{own_state}', '{own_fence}') \
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                           AND d.objid = c.oid AND d.deptype = 'e') \
         GROUP BY n.nspname, c.relname, c.relkind, pn.nspname, p.relname, c.oid, c.relpages, c.reltoastrelid \
         ORDER BY 1, 2",
        // walbridge's own schemas on the source (the cutover's mark, the
        // fence) are never the application's tables.
        own_state = walbridge_migration::mark::STATE_SCHEMA,
        own_fence = walbridge_migration::fence::SCHEMA,
    );
    let rows = client.query(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let names: Vec<String> = row.get(5);
            let generated: Vec<bool> = row.get(6);
            let parent = match (row.get::<_, Option<String>>(3), row.get::<_, Option<String>>(4)) {
                (Some(schema), Some(name)) => Some(QualifiedName::new(schema, name)),
                _ => None,
            };
            SourceTable {
                name: QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
                kind: row.get::<_, String>(2).chars().next().unwrap_or('r'),
                parent,
                columns: names
                    .into_iter()
                    .zip(generated)
                    .map(|(name, generated)| Column { name, generated })
                    .collect(),
                size_bytes: row.get::<_, i64>(7).max(0) as u64,
                pages: row.get::<_, i64>(8).max(0) as u64,
                toast_bytes: row.get::<_, i64>(9).max(0) as u64,
            }
        })
        .collect())
}
