//! The migration's publication on the source: created before the slot
//! (DML between the two would make the walsender fail later with
//! "publication does not exist"), and grown while the migration streams
//! when the application creates tables the selection covers.
//!
//! From PostgreSQL 13 it publishes partitioned tables through their root
//! (`publish_via_partition_root`): the changes of a partition created
//! later arrive as the root's, so the target routes them into its own
//! partitions instead of the subscriber skipping a relation it does not
//! know.

use tokio_postgres::Client;
use walbridge_migration::ident::{QualifiedName, quote_ident};

/// Creates the publication for `tables`, or makes an existing one of this
/// name publish exactly them.
pub async fn ensure(client: &Client, name: &str, tables: &[QualifiedName]) -> Result<(), tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    let table_list = tables.iter().map(QualifiedName::quoted).collect::<Vec<_>>().join(", ");
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some();
    let name = quote_ident(name);
    let via_root = version >= 130000;
    let statement = match (exists, via_root) {
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
    for table in tables {
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                 WHERE p.pubname = $1 AND r.prrelid = to_regclass($2)",
                &[&name, &table.quoted()],
            )
            .await?
            .is_some();
        if !published {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(name),
                    table.quoted()
                ))
                .await?;
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
