//! The exported snapshots the agent holds. A snapshot lives exactly as long
//! as the replication connection that created its slot stays open and
//! idle, so each is held by a task that owns that connection and does
//! nothing but watch it. Snapshots outlive links to the controller (a
//! dropped link must not cost the copy its snapshot) and die with the
//! agent process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use walbridge_daemon::pg::{Database, describe};
use walbridge_migration::fault::FaultKind;
use walbridge_migration::ident::{QualifiedName, quote_ident, quote_literal};

use crate::replication::{ReplicationConnection, ReplicationError};
use crate::source::{APPLICATION_NAME, QUESTIONS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSnapshot {
    pub slot: String,
    pub snapshot: String,
    pub consistent_lsn: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot reach the source: {message}")]
    Source { kind: FaultKind, message: String },
    #[error("cannot create the publication {publication}: {message}")]
    Publication {
        publication: String,
        kind: FaultKind,
        message: String,
    },
    #[error("cannot create the replication slot {slot}: {source}")]
    Slot { slot: String, source: ReplicationError },
    /// The slot's creation waited past its deadline for transactions on
    /// the source to end, and was cancelled.
    #[error(
        "cannot create the replication slot {slot}: it waited {:.1} s (its deadline) for transactions on the \
         source to end, and was cancelled; {}",
        waited.as_secs_f64(),
        blockers.join("; ")
    )]
    Blocked {
        slot: String,
        waited: Duration,
        /// What it waited for, each with the statement that ends it.
        blockers: Vec<String>,
    },
}

impl SnapshotError {
    pub fn kind(&self) -> FaultKind {
        match self {
            SnapshotError::Source { kind, .. } | SnapshotError::Publication { kind, .. } => *kind,
            SnapshotError::Slot { source, .. } => source.kind(),
            SnapshotError::Blocked { .. } => FaultKind::Blocked,
        }
    }
}

struct Holder {
    held: HeldSnapshot,
    release: oneshot::Sender<()>,
}

/// Every snapshot this agent process holds, by snapshot name.
#[derive(Default)]
pub struct Snapshots {
    held: Mutex<HashMap<String, Holder>>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots").finish_non_exhaustive()
    }
}

impl Snapshots {
    /// Creates (or reuses) the publication, then the slot with an exported
    /// snapshot, which is held until [`Snapshots::release`]. The
    /// publication comes first: DML between slot and publication would
    /// make the walsender fail later with "publication does not exist".
    pub async fn create(
        self: &Arc<Self>,
        source: &Database,
        slot: &str,
        publication: &str,
        tables: &[QualifiedName],
        mark: Option<&QualifiedName>,
        deadline: Option<Duration>,
    ) -> Result<HeldSnapshot, SnapshotError> {
        let client = source
            .connect_with(APPLICATION_NAME, &QUESTIONS)
            .await
            .map_err(|e| SnapshotError::Source {
                kind: crate::fault::connect_kind(&e),
                message: e.to_string(),
            })?;
        crate::publication::ensure(&client, publication, tables, mark)
            .await
            .map_err(|e| SnapshotError::Publication {
                publication: publication.to_owned(),
                kind: crate::fault::kind_of(&e),
                message: describe(&e),
            })?;
        drop(client);

        let mut connection = ReplicationConnection::connect(source, APPLICATION_NAME)
            .await
            .map_err(|source| SnapshotError::Slot {
                slot: slot.to_owned(),
                source,
            })?;
        let walsender = connection.backend_pid();
        let started = tokio::time::Instant::now();
        // Creating the slot waits for every transaction that holds an xid
        // to end: bounded by the deadline, after which the walsender is
        // ended (its half-made slot goes with it) and what it waited for
        // is named.
        let created = {
            let create = connection.create_logical_slot_exporting_snapshot(slot);
            match deadline {
                None => create.await,
                Some(deadline) => match tokio::time::timeout(deadline, create).await {
                    Ok(created) => created,
                    Err(_) => {
                        let blockers = blockers_and_cancel(source, walsender).await;
                        return Err(SnapshotError::Blocked {
                            slot: slot.to_owned(),
                            waited: started.elapsed(),
                            blockers,
                        });
                    }
                },
            }
        }
        .map_err(|source| SnapshotError::Slot {
            slot: slot.to_owned(),
            source,
        })?;
        let held = HeldSnapshot {
            slot: created.slot_name,
            snapshot: created.snapshot_name,
            consistent_lsn: created.consistent_point,
        };
        let (release, released) = oneshot::channel();
        self.lock().insert(
            held.snapshot.clone(),
            Holder {
                held: held.clone(),
                release,
            },
        );
        let snapshots = Arc::clone(self);
        let name = held.snapshot.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                error = connection.closed() => {
                    tracing::error!(snapshot = %name, %error, "the connection holding the snapshot was lost; the snapshot is gone");
                }
                _ = released => {
                    connection.close().await;
                    tracing::info!(snapshot = %name, "snapshot released");
                }
            }
            snapshots.lock().remove(&name);
        });
        tracing::info!(slot = %held.slot, snapshot = %held.snapshot, lsn = %held.consistent_lsn, "slot created; holding its snapshot");
        Ok(held)
    }

    /// How many snapshots are held now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    pub fn is_held(&self, snapshot: &str) -> bool {
        self.lock().contains_key(snapshot)
    }

    /// Releases a held snapshot; returns whether it was held.
    pub fn release(&self, snapshot: &str) -> bool {
        match self.lock().remove(snapshot) {
            Some(holder) => {
                let _ = holder.release.send(());
                true
            }
            None => false,
        }
    }

    /// Releases every snapshot taken on `slot` (before dropping the slot).
    pub fn release_slot(&self, slot: &str) {
        let names: Vec<String> = self
            .lock()
            .values()
            .filter(|h| h.held.slot == slot)
            .map(|h| h.held.snapshot.clone())
            .collect();
        for name in names {
            self.release(&name);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holder>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the slot's walsender `pid` waits for (the transaction whose lock
/// it waits on, and the other transactions holding an xid it may wait for
/// next), each with the statement that ends it; then the walsender is
/// ended and waited for, so no half-made slot stays behind. Read from
/// `pg_locks` and `pg_prepared_xacts`, which every role may read;
/// `pg_stat_activity` adds state and age where the role may see them.
async fn blockers_and_cancel(source: &Database, walsender: Option<i32>) -> Vec<String> {
    let client = match source.connect_with(APPLICATION_NAME, &QUESTIONS).await {
        Ok(client) => client,
        Err(e) => return vec![format!("what it waits for cannot be read: {e}")],
    };
    let pid = walsender.unwrap_or(0);
    let mut found = match blockers(&client, pid).await {
        Ok(found) if found.is_empty() => vec!["no transaction it waits for could be seen".to_owned()],
        Ok(found) => found,
        Err(e) => vec![format!("what it waits for cannot be read: {}", describe(&e))],
    };
    if pid != 0 {
        let ended = async {
            client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await?;
            let deadline = tokio::time::Instant::now() + WALSENDER_EXIT_WAIT;
            while tokio::time::Instant::now() < deadline {
                let alive = client
                    .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                    .await?
                    .is_some();
                if !alive {
                    return Ok(true);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, tokio_postgres::Error>(false)
        };
        match ended.await {
            Ok(true) => {}
            Ok(false) => found.push(format!(
                "its walsender (pid {pid}) has not exited yet; the slot may appear once the transaction ends: drop it \
                 then"
            )),
            Err(e) => found.push(format!(
                "its walsender (pid {pid}) could not be ended: {}",
                describe(&e)
            )),
        }
    }
    found
}

/// How long a cancelled slot creation's walsender is given to exit.
const WALSENDER_EXIT_WAIT: Duration = Duration::from_secs(5);

/// The transactions the walsender `pid` waits for: first the one whose
/// lock it is waiting on, then the others that hold an xid.
async fn blockers(client: &tokio_postgres::Client, pid: i32) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "WITH awaited AS ( \
               SELECT transactionid FROM pg_locks \
               WHERE locktype = 'transactionid' AND pid = $1 AND NOT granted), \
             holders AS ( \
               SELECT l.transactionid, l.pid FROM pg_locks l \
               WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted \
                 AND l.pid IS DISTINCT FROM $1 AND l.pid IS DISTINCT FROM pg_backend_pid()) \
             SELECT h.transactionid::text, h.pid, h.transactionid IN (SELECT transactionid FROM awaited), \
                    {activity}, \
                    p.gid, p.database::text, extract(epoch FROM now() - p.prepared)::float8 \
             FROM holders h \
             LEFT JOIN pg_stat_activity a ON a.pid = h.pid \
             LEFT JOIN pg_prepared_xacts p ON p.transaction = h.transactionid \
             ORDER BY 3 DESC, coalesce(a.xact_start, p.prepared) NULLS LAST \
             LIMIT 6",
                activity = crate::blocker::ACTIVITY_COLUMNS
            ),
            &[&pid],
        )
        .await?;
    let mut found = Vec::new();
    for row in rows {
        let xid: String = row.get(0);
        let awaited: bool = row.get(2);
        let lead = if awaited { "it waits for" } else { "also open" };
        let gid: Option<String> = row.get(7);
        let described = match (gid, row.get::<_, Option<i32>>(1)) {
            (Some(gid), _) => format!(
                "{lead} prepared transaction '{gid}' (xid {xid}, database {}, prepared {:.0} s ago): COMMIT PREPARED \
                 {} or ROLLBACK PREPARED {} there",
                row.get::<_, Option<String>>(8).unwrap_or_default(),
                row.get::<_, Option<f64>>(9).unwrap_or_default(),
                quote_literal(&gid),
                quote_literal(&gid),
            ),
            (None, Some(pid)) => format!(
                "{lead} the transaction of {}",
                crate::blocker::describe(pid, &row, 3, Some(format!("xid {xid}")))
            ),
            (None, None) => format!("{lead} transaction {xid}"),
        };
        found.push(described);
    }
    Ok(found)
}

/// How long a drop waits for a just-released slot's walsender to exit.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Drops the slot and the publication if they exist (with the
/// publication, walbridge's `mark` table); says which it dropped.
pub async fn drop_replication(
    source: &Database,
    slot: &str,
    publication: &str,
    mark: Option<&QualifiedName>,
) -> Result<(bool, bool), walbridge_daemon::pg::SessionError> {
    let client = source.connect_with(APPLICATION_NAME, &QUESTIONS).await?;
    // A slot whose holder has just closed may still show as active while
    // its walsender exits: give it a bounded moment.
    let deadline = tokio::time::Instant::now() + SLOT_RELEASE_WAIT;
    loop {
        let active: Option<bool> = client
            .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await?
            .map(|row| row.get(0));
        if active != Some(true) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dropped_slot = client
        .query_opt(
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ),
            &[],
        )
        .await?
        .is_some();
    let dropped_publication = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await?
        .is_some();
    if dropped_publication {
        client
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(publication)))
            .await?;
    }
    if let Some(mark) = mark.filter(|_| !publication.is_empty()) {
        client.batch_execute(&walbridge_migration::mark::drop_sql(mark)).await?;
    }
    Ok((dropped_slot, dropped_publication))
}
