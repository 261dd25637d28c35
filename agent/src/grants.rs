//! The roles the schema's privileges name (`start --privileges` carries
//! GRANTs and default privileges, which fail on a target that lacks the
//! roles): every grantee of the objects the dump covers and every role
//! whose default privileges it sets, with the attributes the target's
//! operator may want to give them (never a password or a superuser's
//! attribute: those are the operator's to set).

use tokio_postgres::Client;
use walbridge_migration::finding::NamedRole;

/// Roles named by the privileges of the in-scope tables (`table_oids`,
/// partitions included) and of every other object in the user's schemas.
pub async fn roles_named(client: &Client, table_oids: &[u32]) -> Result<Vec<NamedRole>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH user_namespace AS ( \
               SELECT oid FROM pg_namespace \
               WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%'), \
             acl AS ( \
               SELECT c.relacl AS acl FROM pg_class c \
               WHERE c.relnamespace IN (SELECT oid FROM user_namespace) \
                 AND (c.relkind IN ('S', 'v', 'm', 'f') OR c.oid = ANY($1::oid[])) \
               UNION ALL SELECT nspacl FROM pg_namespace WHERE oid IN (SELECT oid FROM user_namespace) \
               UNION ALL SELECT proacl FROM pg_proc WHERE pronamespace IN (SELECT oid FROM user_namespace) \
               UNION ALL SELECT typacl FROM pg_type WHERE typnamespace IN (SELECT oid FROM user_namespace) \
               UNION ALL SELECT defaclacl FROM pg_default_acl), \
             named AS ( \
               SELECT (aclexplode(acl)).grantee AS role FROM acl WHERE acl IS NOT NULL \
               UNION SELECT defaclrole FROM pg_default_acl) \
             SELECT r.rolname::text, r.rolcanlogin, r.rolinherit, r.rolcreatedb, r.rolcreaterole, r.rolconnlimit, \
                    ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
                          WHERE m.member = r.oid ORDER BY 1) \
             FROM pg_roles r WHERE r.oid IN (SELECT role FROM named) \
               AND r.rolname NOT LIKE 'pg\\_%' AND NOT r.rolsuper \
             ORDER BY 1",
            &[&table_oids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| NamedRole {
            name: row.get(0),
            login: row.get(1),
            inherit: row.get(2),
            create_db: row.get(3),
            create_role: row.get(4),
            connection_limit: row.get(5),
            member_of: row.get(6),
        })
        .collect())
}
