//! The cutover's mark: a row the fence commits on the source, once every
//! write to the migrated tables is behind it, into a table of walbridge's
//! that the publication carries. The subscription applies transactions in
//! their commit order, so once the target shows the row it has applied
//! everything the source committed before the fence; the controller sees
//! that on the target itself instead of waiting for the subscriber's
//! periodic flush report to reach the source's slot.
//!
//! Both servers hold the table under the same name (the subscription
//! routes rows by name), in walbridge's own schema, which no migration
//! copies and no fence touches.

use crate::ident::QualifiedName;

/// walbridge's schema, on the target (its bookkeeping and the mark) and
/// on the source (the mark).
pub const STATE_SCHEMA: &str = "walbridge_state";

/// The mark table of migration `id`: one per migration, so that two
/// migrations from one source never drop each other's.
pub fn table(id: &str) -> QualifiedName {
    QualifiedName::new(STATE_SCHEMA, format!("cutover_mark_{id}"))
}

/// Creates the mark table where it is missing: one text column, the WAL
/// position the fence took (unique per fence, so each cutover attempt
/// looks for its own row).
pub fn create_sql(table: &QualifiedName) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} (fence_lsn text NOT NULL)",
        crate::ident::quote_ident(STATE_SCHEMA),
        table.quoted()
    )
}

/// Drops the mark table, and walbridge's schema on the source when
/// nothing else is left in it.
pub fn drop_sql(table: &QualifiedName) -> String {
    format!(
        "DROP TABLE IF EXISTS {}; \
         DO $$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                          WHERE n.nspname = '{STATE_SCHEMA}') THEN \
             DROP SCHEMA IF EXISTS {STATE_SCHEMA}; \
           END IF; \
         END $$",
        table.quoted()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_migration_has_its_own_mark_in_walbridges_schema() {
        assert_eq!(table("ab12").to_string(), "walbridge_state.cutover_mark_ab12");
        assert_ne!(table("ab12"), table("cd34"));
        assert!(create_sql(&table("ab12")).contains("CREATE TABLE IF NOT EXISTS walbridge_state.cutover_mark_ab12"));
        assert!(drop_sql(&table("ab12")).starts_with("DROP TABLE IF EXISTS walbridge_state.cutover_mark_ab12;"));
    }
}
