//! The tunnel's door: whether a connection accepted on the tunnel may be
//! carried to a source now, and through which agent. It is open for the
//! current migration in the phases whose subscription connects through the
//! tunnel (`Subscribe`, `Streaming`, `Cutover`), and for a preflight probe
//! while the probe holds its [`ProbeGuard`]; closed otherwise. A connection
//! let in is closed when the reason it was let in ends ([`Passage::closed`]).

use std::sync::Arc;

use tokio::sync::watch;

use crate::migration::Phase;

/// What the door knows of the current migration (published by
/// `Migrations` whenever its record is saved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentMigration {
    pub id: String,
    pub agent: String,
    pub phase: Phase,
}

impl CurrentMigration {
    pub fn of(record: &crate::migration::MigrationRecord) -> CurrentMigration {
        CurrentMigration {
            id: record.id.clone(),
            agent: record.agent.clone(),
            phase: record.phase,
        }
    }
}

/// Whether the subscription of a migration in this phase connects through
/// the tunnel. Before `Subscribe` there is no subscription; after
/// `Cutover` it is detached or gone.
pub fn phase_needs_tunnel(phase: Phase) -> bool {
    matches!(phase, Phase::Subscribe | Phase::Streaming | Phase::Cutover)
}

/// The rule, shared by every accepted connection and every probe.
#[derive(Debug, Clone)]
pub struct TunnelDoor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    migration: watch::Receiver<Option<CurrentMigration>>,
    probes: watch::Sender<Probes>,
}

/// The probes under way: (guard id, agent).
#[derive(Debug, Default)]
struct Probes {
    next_id: u64,
    open: Vec<(u64, String)>,
}

/// Why the door let a connection in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Migration { id: String, phase: Phase },
    Probe,
}

/// A connection let in: the agent that carries it, and a way to learn
/// when it must be closed.
#[derive(Debug)]
pub struct Passage {
    pub agent: String,
    pub reason: Reason,
    migration: watch::Receiver<Option<CurrentMigration>>,
    probes: watch::Receiver<Probes>,
}

/// Why a probe cannot have the door: it is held for another agent, and a
/// tunnel connection cannot tell which agent's source it was meant for.
#[derive(Debug, thiserror::Error)]
#[error(
    "the tunnel is in use through agent {holder} ({why}): a probe through agent {agent} must wait until it is free"
)]
pub struct DoorBusy {
    pub agent: String,
    pub holder: String,
    pub why: String,
}

/// Keeps the door open for a probe's agent while it lives.
#[derive(Debug)]
#[must_use = "the door closes when the guard is dropped"]
pub struct ProbeGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.inner
            .probes
            .send_modify(|probes| probes.open.retain(|(id, _)| *id != self.id));
    }
}

impl TunnelDoor {
    /// A door that follows the migration published on `migration`.
    pub fn new(migration: watch::Receiver<Option<CurrentMigration>>) -> TunnelDoor {
        TunnelDoor {
            inner: Arc::new(Inner {
                migration,
                probes: watch::Sender::new(Probes::default()),
            }),
        }
    }

    /// Whether a connection accepted now may be carried, and through which
    /// agent; else why not.
    pub fn admit(&self) -> Result<Passage, String> {
        let (agent, reason) = decide(self.inner.migration.borrow().as_ref(), &self.inner.probes.borrow())?;
        Ok(Passage {
            agent,
            reason,
            migration: self.inner.migration.clone(),
            probes: self.inner.probes.subscribe(),
        })
    }

    /// Opens the door for `agent` until the guard is dropped: for a
    /// preflight probe whose throwaway subscription connects through the
    /// tunnel. Refused while the door is held for another agent (by a
    /// migration that needs the tunnel, or another agent's probe).
    pub fn open_for_probe(&self, agent: &str) -> Result<ProbeGuard, DoorBusy> {
        let busy = |holder: &str, why: String| DoorBusy {
            agent: agent.to_owned(),
            holder: holder.to_owned(),
            why,
        };
        if let Some(migration) = self.inner.migration.borrow().as_ref()
            && phase_needs_tunnel(migration.phase)
            && migration.agent != agent
        {
            return Err(busy(
                &migration.agent,
                format!("migration {} is in phase {}", migration.id, migration.phase.name()),
            ));
        }
        let mut refusal = None;
        let mut id = 0;
        self.inner.probes.send_if_modified(|probes| {
            if let Some((_, other)) = probes.open.iter().find(|(_, open)| open != agent) {
                refusal = Some(busy(other, "a preflight probe is running".to_owned()));
                return false;
            }
            id = probes.next_id;
            probes.next_id += 1;
            probes.open.push((id, agent.to_owned()));
            true
        });
        match refusal {
            Some(busy) => Err(busy),
            None => Ok(ProbeGuard {
                inner: self.inner.clone(),
                id,
            }),
        }
    }
}

impl Passage {
    /// Resolves, with the reason, once the door no longer lets this
    /// connection's agent through (the migration left the phases that
    /// need the tunnel, the probe ended, the controller is stopping).
    pub async fn closed(&mut self) -> String {
        loop {
            let changed = tokio::select! {
                changed = self.migration.changed() => changed,
                changed = self.probes.changed() => changed,
            };
            if changed.is_err() {
                return "the controller is stopping".to_owned();
            }
            let decision = decide(
                self.migration.borrow_and_update().as_ref(),
                &self.probes.borrow_and_update(),
            );
            match decision {
                Ok((agent, _)) if agent == self.agent => continue,
                Ok((agent, _)) => return format!("the tunnel now leads through agent {agent}"),
                Err(why) => return why,
            }
        }
    }
}

/// The rule: a migration that needs the tunnel first, else the latest
/// probe; else closed, with the reason.
fn decide(migration: Option<&CurrentMigration>, probes: &Probes) -> Result<(String, Reason), String> {
    if let Some(migration) = migration
        && phase_needs_tunnel(migration.phase)
    {
        return Ok((
            migration.agent.clone(),
            Reason::Migration {
                id: migration.id.clone(),
                phase: migration.phase,
            },
        ));
    }
    if let Some((_, agent)) = probes.open.last() {
        return Ok((agent.clone(), Reason::Probe));
    }
    Err(match migration {
        None => "no migration needs the tunnel and no preflight probe is running".to_owned(),
        Some(migration) => format!(
            "migration {} is in phase {}, which does not use the tunnel, and no preflight probe is running",
            migration.id,
            migration.phase.name()
        ),
    })
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    const ALL_PHASES: [Phase; 13] = [
        Phase::Snapshot,
        Phase::SchemaPreData,
        Phase::Copy,
        Phase::SchemaPostData,
        Phase::ReleaseSnapshot,
        Phase::Copied,
        Phase::Subscribe,
        Phase::Streaming,
        Phase::Cutover,
        Phase::CutOver,
        Phase::Failed,
        Phase::Aborted,
        Phase::CleanedUp,
    ];

    fn migration(agent: &str, phase: Phase) -> Option<CurrentMigration> {
        Some(CurrentMigration {
            id: "m1".to_owned(),
            agent: agent.to_owned(),
            phase,
        })
    }

    fn door_with(current: Option<CurrentMigration>) -> (watch::Sender<Option<CurrentMigration>>, TunnelDoor) {
        let published = watch::Sender::new(current);
        let door = TunnelDoor::new(published.subscribe());
        (published, door)
    }

    /// Whether `closed()` has resolved by now (every change it reacts to
    /// is ready at once: no waiting involved).
    fn closed_now(passage: &mut Passage) -> Option<String> {
        passage.closed().now_or_never()
    }

    #[test]
    fn without_a_migration_or_a_probe_the_door_is_closed() {
        let (_published, door) = door_with(None);
        let why = door.admit().unwrap_err();
        assert!(why.contains("no migration"), "{why}");
    }

    #[test]
    fn a_migration_opens_the_door_only_in_subscribe_streaming_and_cutover() {
        for phase in ALL_PHASES {
            let (_published, door) = door_with(migration("east", phase));
            let admitted = door.admit();
            let open = matches!(phase, Phase::Subscribe | Phase::Streaming | Phase::Cutover);
            assert_eq!(admitted.is_ok(), open, "{phase:?}: {admitted:?}");
            match admitted {
                Ok(passage) => {
                    assert_eq!(passage.agent, "east");
                    assert_eq!(passage.reason, Reason::Migration { id: "m1".into(), phase });
                }
                Err(why) => assert!(why.contains(phase.name()), "{phase:?}: {why}"),
            }
        }
    }

    #[tokio::test]
    async fn open_connections_close_when_the_migration_leaves_the_tunnels_phases() {
        for (leaving_to, stays_open_through) in [
            (Phase::CutOver, Some(Phase::Cutover)),
            (Phase::Aborted, None),
            (Phase::Failed, None),
            (Phase::CleanedUp, None),
        ] {
            let (published, door) = door_with(migration("east", Phase::Streaming));
            let mut passage = door.admit().unwrap();
            assert_eq!(closed_now(&mut passage), None, "nothing changed yet");
            if let Some(phase) = stays_open_through {
                published.send_replace(migration("east", phase));
                assert_eq!(closed_now(&mut passage), None, "{phase:?} still needs the tunnel");
            }
            published.send_replace(migration("east", leaving_to));
            let why = closed_now(&mut passage).expect("closed at once");
            assert!(why.contains(leaving_to.name()), "{leaving_to:?}: {why}");
            assert!(door.admit().is_err(), "and new connections are refused");
        }
    }

    #[tokio::test]
    async fn a_probe_guard_opens_the_door_for_its_agent_while_it_lives() {
        let (_published, door) = door_with(migration("west", Phase::CutOver));
        assert!(door.admit().is_err());
        let guard = door.open_for_probe("east").unwrap();
        let mut passage = door.admit().unwrap();
        assert_eq!((passage.agent.as_str(), &passage.reason), ("east", &Reason::Probe));
        // A second probe of the same agent shares the door; the door
        // closes only when the last guard goes.
        let second = door.open_for_probe("east").unwrap();
        drop(guard);
        assert_eq!(closed_now(&mut passage), None);
        assert!(door.admit().is_ok());
        drop(second);
        let why = closed_now(&mut passage).expect("the probe's connections close with it");
        assert!(why.contains("no preflight probe"), "{why}");
        assert!(door.admit().is_err());
    }

    #[tokio::test]
    async fn a_probe_cannot_take_a_door_held_for_another_agent() {
        let (published, door) = door_with(migration("west", Phase::Streaming));
        let busy = door.open_for_probe("east").unwrap_err();
        assert_eq!(busy.holder, "west");
        assert!(busy.to_string().contains("streaming"), "{busy}");
        // The migration's own agent may probe: its connections go to the
        // same source.
        let own = door.open_for_probe("west").unwrap();
        drop(own);

        published.send_replace(migration("west", Phase::CutOver));
        let _east = door.open_for_probe("east").unwrap();
        let busy = door.open_for_probe("north").unwrap_err();
        assert_eq!(busy.holder, "east");
        assert!(busy.to_string().contains("preflight probe"), "{busy}");
    }

    #[tokio::test]
    async fn a_probe_connection_carries_on_into_a_migration_of_the_same_agent_but_not_of_another() {
        let (published, door) = door_with(None);
        let guard = door.open_for_probe("east").unwrap();
        let mut passage = door.admit().unwrap();
        published.send_replace(migration("east", Phase::Subscribe));
        drop(guard);
        assert_eq!(
            closed_now(&mut passage),
            None,
            "the migration keeps the door open for east"
        );

        let (published, door) = door_with(None);
        let _guard = door.open_for_probe("east").unwrap();
        let mut passage = door.admit().unwrap();
        published.send_replace(migration("west", Phase::Subscribe));
        let why = closed_now(&mut passage).expect("east's connection is closed");
        assert!(why.contains("agent west"), "{why}");
    }

    #[tokio::test]
    async fn connections_close_when_the_controller_stops() {
        let (published, door) = door_with(migration("east", Phase::Streaming));
        let mut passage = door.admit().unwrap();
        drop(published);
        let why = closed_now(&mut passage).expect("closed at once");
        assert!(why.contains("stopping"), "{why}");
    }
}
