//! Servers of other majors from `PgInstall::fetch`: they start as clusters,
//! replicate logically (pgoutput on the publisher, libpqwalreceiver on the
//! subscriber), serve TLS, and the fetched `pg_dump` 18 dumps an old source.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walbridge_pgcluster::{Cluster, PgInstall};

fn server_major(cluster: &Cluster) -> u32 {
    let number: u32 = cluster.psql("postgres", "SHOW server_version_num").parse().unwrap();
    number / 10000
}

/// The slot is made with pgoutput, which the server loads to make it.
fn assert_pgoutput_slot(cluster: &Cluster) {
    assert_eq!(cluster.psql("postgres", "SHOW wal_level"), "logical");
    let slot = cluster.psql(
        "postgres",
        "SELECT slot_name FROM pg_create_logical_replication_slot('fetched_slot', 'pgoutput')",
    );
    assert_eq!(slot, "fetched_slot");
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = 'fetched_slot'"
        ),
        "pgoutput"
    );
}

fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fetched_17_and_18_start_and_replicate_logically_between_them() {
    let source = Cluster::builder("fetched17")
        .install(&PgInstall::fetch(17))
        .logical()
        .start();
    let target = Cluster::builder("fetched18")
        .install(&PgInstall::fetch(18))
        .logical()
        .start();
    assert_eq!(server_major(&source), 17);
    assert_eq!(server_major(&target), 18);
    assert!(source.psql("postgres", "SHOW server_version").starts_with("17."));
    assert!(target.psql("postgres", "SHOW server_version").starts_with("18."));
    assert_pgoutput_slot(&source);
    assert_pgoutput_slot(&target);

    source.psql(
        "postgres",
        "CREATE TABLE moved (id int PRIMARY KEY, note text); CREATE PUBLICATION fetched_pub FOR TABLE moved",
    );
    target.psql("postgres", "CREATE TABLE moved (id int PRIMARY KEY, note text)");
    target.psql(
        "postgres",
        &format!(
            "CREATE SUBSCRIPTION fetched_sub CONNECTION 'host={} port={} user={} password={} dbname=postgres' \
             PUBLICATION fetched_pub WITH (copy_data = false)",
            source.host(),
            source.port(),
            source.superuser(),
            source.password()
        ),
    );
    // The subscription made its slot on the source through libpqwalreceiver.
    poll("the subscription's slot to be active", || {
        source.psql(
            "postgres",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'fetched_sub' AND active",
        ) == "1"
    });
    source.psql("postgres", "INSERT INTO moved VALUES (1, 'from 17')");
    poll("the row to reach 18", || {
        target.psql("postgres", "SELECT coalesce(string_agg(note, ','), '') FROM moved") == "from 17"
    });
}

#[test]
fn an_old_major_starts_and_makes_a_pgoutput_slot() {
    let old = Cluster::builder("fetched10")
        .install(&PgInstall::fetch(10))
        .logical()
        .start();
    assert_eq!(server_major(&old), 10);
    assert!(old.psql("postgres", "SELECT version()").starts_with("PostgreSQL 10."));
    assert_pgoutput_slot(&old);
}

/// A self-signed certificate for `localhost`, in a folder the server's
/// user owns (the server refuses a key others may read).
struct ServerCertificate {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn server_certificate() -> ServerCertificate {
    let dir = tempfile::Builder::new()
        .prefix("walbridge-fetched-tls-")
        .tempdir()
        .unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user");
        for path in [dir.path(), &cert, &key] {
            nix::unistd::chown(path, Some(user.uid), Some(user.gid)).unwrap();
        }
    }
    ServerCertificate { _dir: dir, cert, key }
}

fn tls_cluster(name: &str, major: u32, certificate: &ServerCertificate) -> Cluster {
    Cluster::builder(name)
        .install(&PgInstall::fetch(major))
        .setting("ssl", "on")
        .setting("ssl_cert_file", certificate.cert.to_str().unwrap())
        .setting("ssl_key_file", certificate.key.to_str().unwrap())
        .start()
}

/// pg_dump with the certificate checked against the name `localhost`.
fn dump_verified(pg_dump: &Path, cluster: &Cluster, certificate: &ServerCertificate) -> std::process::Output {
    Command::new(pg_dump)
        .args(["--schema-only", "--dbname"])
        .arg(format!(
            "host=localhost hostaddr={} port={} user={} dbname=postgres sslmode=verify-full sslrootcert={}",
            cluster.host(),
            cluster.port(),
            cluster.superuser(),
            certificate.cert.display()
        ))
        .env("PGPASSWORD", cluster.password())
        .output()
        .expect("pg_dump runs")
}

#[test]
fn fetched_18_serves_tls_and_pg_dump_18_dumps_an_old_source_over_it() {
    let certificate = server_certificate();
    let server_18 = tls_cluster("tls18", 18, &certificate);
    assert_eq!(server_18.psql("postgres", "SHOW ssl"), "on");
    assert_eq!(server_18.psql("postgres", "SHOW ssl_library"), "OpenSSL");
    let old = tls_cluster("tls10", 10, &certificate);
    old.psql("postgres", "CREATE TABLE old_source (id int PRIMARY KEY)");

    let pg_dump = PgInstall::fetch_pg_dump_18();
    let version = Command::new(&pg_dump).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("pg_dump (PostgreSQL) 18."));
    for (cluster, table) in [(&old, Some("CREATE TABLE public.old_source")), (&server_18, None)] {
        let out = dump_verified(&pg_dump, cluster, &certificate);
        let dump = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pg_dump 18 over verified TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dump.contains("-- Dumped by pg_dump version 18."), "{dump}");
        if let Some(table) = table {
            assert!(dump.contains(table), "{dump}");
        }
    }
    // The check is real: another name than the certificate's is refused.
    let mut wrong_name = Command::new(&pg_dump);
    let out = wrong_name
        .args(["--schema-only", "--dbname"])
        .arg(format!(
            "host={} port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            old.host(),
            old.port(),
            certificate.cert.display()
        ))
        .env("PGPASSWORD", old.password())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match host name"));
}

#[test]
fn a_second_fetch_is_a_cache_hit() {
    let first = PgInstall::fetch(17);
    let folder = first.bin_dir().join("../../..").canonicalize().unwrap();
    let before = std::fs::metadata(&folder).unwrap();
    let second = PgInstall::fetch(17);
    assert_eq!(first.bin_dir(), second.bin_dir());
    let after = std::fs::metadata(&folder).unwrap();
    assert_eq!((before.ino(), before.mtime_nsec()), (after.ino(), after.mtime_nsec()));
    assert_eq!(second.major_version(), 17);
}
