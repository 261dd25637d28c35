//! The migration's publication on the source: created before the slot
//! (DML between the two would make the walsender fail later with
//! "publication does not exist"), and grown while the migration streams
//! when the application creates tables the selection covers.
//!
//! From PostgreSQL 13 it publishes partitioned tables through their root
//! (`publish_via_partition_root`): the changes of a partition created
//! later arrive as the root's, so the target routes them into its own
//! partitions instead of the subscriber skipping a relation it does not
//! know. Before 13 a publication cannot hold a partitioned table at all:
//! it holds the partitioned table's leaf partitions instead, whose changes
//! arrive under their own names, so the target needs the same partitions
//! (pg_dump's schema has them).

use tokio_postgres::Client;
use walbridge_migration::ident::{QualifiedName, quote_ident};

/// Creates the publication for `tables` (and walbridge's `mark` table,
/// created here if missing), or makes an existing one of this name
/// publish exactly them.
pub async fn ensure(
    client: &Client,
    name: &str,
    tables: &[QualifiedName],
    mark: Option<&QualifiedName>,
) -> Result<(), tokio_postgres::Error> {
    let version = server_version(client).await?;
    let via_root = version >= PARTITION_ROOTS_PUBLISHED;
    let mut published: Vec<String> = Vec::new();
    if let Some(mark) = mark {
        client
            .batch_execute(&walbridge_migration::mark::create_sql(mark))
            .await?;
        published.push(mark.quoted());
    }
    for table in tables {
        for relation in publishable(client, version, table).await? {
            if !published.contains(&relation) {
                published.push(relation);
            }
        }
    }
    let table_list = published.join(", ");
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some();
    let name = quote_ident(name);
    let statement = match (exists, via_root) {
        // Partitioned tables without partitions yet, before 13: nothing to list.
        (false, false) if published.is_empty() => format!("CREATE PUBLICATION {name}"),
        // Again, after a retry: SET TABLE needs a list.
        (true, false) if published.is_empty() => format!("DROP PUBLICATION {name}; CREATE PUBLICATION {name}"),
        (true, true) => format!(
            "ALTER PUBLICATION {name} SET TABLE {table_list}; \
             ALTER PUBLICATION {name} SET (publish_via_partition_root = true)"
        ),
        (true, false) => format!("ALTER PUBLICATION {name} SET TABLE {table_list}"),
        (false, true) => {
            format!("CREATE PUBLICATION {name} FOR TABLE {table_list} WITH (publish_via_partition_root = true)")
        }
        (false, false) => format!("CREATE PUBLICATION {name} FOR TABLE {table_list}"),
    };
    client.batch_execute(&statement).await
}

/// Adds tables created on the source since the migration started; the
/// subscription's role may read them (its table synchronisation copies
/// them). Tables already published are left as they are.
pub async fn add(
    client: &Client,
    name: &str,
    tables: &[QualifiedName],
    reader: &str,
) -> Result<(), tokio_postgres::Error> {
    let version = server_version(client).await?;
    for table in tables {
        for relation in publishable(client, version, table).await? {
            let published = client
                .query_opt(
                    "SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                     WHERE p.pubname = $1 AND r.prrelid = to_regclass($2)",
                    &[&name, &relation],
                )
                .await?
                .is_some();
            if !published {
                client
                    .batch_execute(&format!("ALTER PUBLICATION {} ADD TABLE {relation}", quote_ident(name)))
                    .await?;
            }
        }
        if !reader.is_empty() {
            client
                .batch_execute(&format!(
                    "GRANT SELECT ON {} TO {}",
                    table.quoted(),
                    quote_ident(reader)
                ))
                .await?;
        }
    }
    Ok(())
}

/// The first version whose publications hold partitioned tables
/// (`publish_via_partition_root`).
const PARTITION_ROOTS_PUBLISHED: i32 = 130000;

async fn server_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0))
}

/// What the publication lists for `table`, quoted: the table itself, or
/// before 13, for a partitioned table, its leaf partitions (at any depth).
async fn publishable(
    client: &Client,
    version: i32,
    table: &QualifiedName,
) -> Result<Vec<String>, tokio_postgres::Error> {
    if version >= PARTITION_ROOTS_PUBLISHED {
        return Ok(vec![table.quoted()]);
    }
    let rows = client
        .query(
            "WITH RECURSIVE tree(relid) AS ( \
                 SELECT $1::text::regclass::oid \
                 UNION ALL SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.relid \
                 JOIN pg_class p ON p.oid = i.inhrelid WHERE p.relispartition) \
             SELECT n.nspname::text, c.relname::text FROM tree \
             JOIN pg_class c ON c.oid = tree.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind <> 'p' ORDER BY 1, 2",
            &[&table.quoted()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)).quoted())
        .collect())
}
