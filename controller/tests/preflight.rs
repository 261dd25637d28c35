//! Target-side preflight against a real server: one target per problem,
//! and a clean target that reports no error.

use harness::Cluster;
use tokio_postgres::NoTls;
use walbridge_controller::preflight::check_target;
use walbridge_migration::finding::{Extension, Finding, Severity, SourceFacts};
use walbridge_migration::ident::QualifiedName;

async fn findings(url: &str, facts: &SourceFacts) -> Vec<Finding> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    check_target(&client, facts).await.unwrap()
}

fn facts() -> SourceFacts {
    SourceFacts {
        server_version_num: 150000,
        database_size_bytes: 1000,
        extensions: vec![],
        tables: vec![QualifiedName::new("public", "orders")],
        schemas: vec![],
        roles: vec![],
    }
}

fn find<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} finding in {findings:#?}"))
}

#[tokio::test]
async fn each_problem_on_the_target_is_found_and_a_clean_target_passes() {
    let cluster = Cluster::builder("target").start();
    for db in ["clean", "clash", "roles"] {
        cluster.create_database(db);
    }

    let clean = findings(&cluster.url("clean"), &facts()).await;
    assert!(clean.iter().all(|f| !f.is_error()), "{clean:#?}");
    assert_eq!(find(&clean, "target_room").severity, Severity::Warning);

    let missing = SourceFacts {
        extensions: vec![Extension {
            name: "walbridge_no_such_ext".into(),
            version: "1.0".into(),
        }],
        ..facts()
    };
    let f = findings(&cluster.url("clean"), &missing).await;
    let ext = find(&f, "missing_extension");
    assert_eq!(
        (ext.severity, ext.object.as_str()),
        (Severity::Error, "walbridge_no_such_ext")
    );

    cluster.psql("clash", "CREATE TABLE orders (id int)");
    let f = findings(&cluster.url("clash"), &facts()).await;
    let clash = find(&f, "conflicting_table");
    assert_eq!(
        (clash.severity, clash.object.as_str()),
        (Severity::Error, "public.orders")
    );

    let newer_source = SourceFacts {
        server_version_num: 990000,
        ..facts()
    };
    let f = findings(&cluster.url("clean"), &newer_source).await;
    assert_eq!(find(&f, "target_version").severity, Severity::Error);

    cluster.psql("roles", "CREATE ROLE app LOGIN PASSWORD 'app-pw'");
    let url = format!("postgres://app:app-pw@127.0.0.1:{}/roles", cluster.port());
    let f = findings(&url, &facts()).await;
    let privilege = find(&f, "subscription_privilege");
    assert_eq!(
        (privilege.severity, privilege.object.as_str()),
        (Severity::Error, "app")
    );
}

#[tokio::test]
async fn a_lock_timeout_the_subscriptions_apply_worker_would_run_with_is_a_warning() {
    let cluster = Cluster::builder("target").start();
    cluster.create_database("app");
    let owner_settings = |f: &[Finding]| f.iter().find(|f| f.check == "subscription_owner_settings").cloned();
    assert_eq!(owner_settings(&findings(&cluster.url("app"), &facts()).await), None);

    // The database's default reaches every role, the apply worker's too.
    cluster.psql("app", "ALTER DATABASE app SET lock_timeout = '2s'");
    let f = findings(&cluster.url("app"), &facts()).await;
    let found = owner_settings(&f).expect("a finding");
    assert_eq!(found.severity, Severity::Warning);
    assert!(
        found.message.contains("lock_timeout = 2s") && found.message.contains("ALTER DATABASE app"),
        "{found:?}"
    );
    assert_eq!(found.fix, "ALTER ROLE postgres IN DATABASE app SET lock_timeout = '0';");
    // The fix is the role's own setting, which outranks the database's.
    cluster.psql("app", &found.fix);
    assert_eq!(owner_settings(&findings(&cluster.url("app"), &facts()).await), None);
}
