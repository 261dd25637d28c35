//! The exported snapshots the agent holds. A snapshot lives exactly as long
//! as the replication connection that created its slot stays open and
//! idle, so each is held by a task that owns that connection and does
//! nothing but watch it. Snapshots outlive links to the controller (a
//! dropped link must not cost the copy its snapshot) and die with the
//! agent process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
}

impl SnapshotError {
    pub fn kind(&self) -> FaultKind {
        match self {
            SnapshotError::Source { kind, .. } | SnapshotError::Publication { kind, .. } => *kind,
            SnapshotError::Slot { source, .. } => source.kind(),
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
    ) -> Result<HeldSnapshot, SnapshotError> {
        let client = source
            .connect_with(APPLICATION_NAME, &QUESTIONS)
            .await
            .map_err(|e| SnapshotError::Source {
                kind: crate::fault::connect_kind(&e),
                message: e.to_string(),
            })?;
        crate::publication::ensure(&client, publication, tables)
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
        let created = connection
            .create_logical_slot_exporting_snapshot(slot)
            .await
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

/// How long a drop waits for a just-released slot's walsender to exit.
const SLOT_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Drops the slot and the publication if they exist; says which it dropped.
pub async fn drop_replication(
    source: &Database,
    slot: &str,
    publication: &str,
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
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
    Ok((dropped_slot, dropped_publication))
}
