//! The agents connected now, by the name in their certificates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use walbridge_daemon::telemetry::PropagateTrace;
use walbridge_proto::v1::agent_service_client::AgentServiceClient;

/// A gRPC client of one agent, over that agent's own connection.
pub type AgentClient = AgentServiceClient<InterceptedService<Channel, PropagateTrace>>;

/// One agent's live link.
#[derive(Debug, Clone)]
pub struct ConnectedAgent {
    /// Tells this link from a later one of the same agent.
    pub link_id: u64,
    pub name: String,
    pub peer: SocketAddr,
    pub connected_at: SystemTime,
    pub client: AgentClient,
}

/// Connected agents. A std mutex: it is never held across an await, only
/// to insert, remove or copy out an entry.
#[derive(Debug)]
pub struct Registry {
    agents: Mutex<HashMap<String, ConnectedAgent>>,
    /// When each agent's last link ended (while it is away).
    departed: Mutex<HashMap<String, SystemTime>>,
    /// When this controller began to listen: an agent never seen since has
    /// been away at least that long.
    created: SystemTime,
    next_link_id: AtomicU64,
    /// Woken whenever an agent connects, for steps waiting for theirs.
    connected: tokio::sync::Notify,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            agents: Mutex::default(),
            departed: Mutex::default(),
            created: SystemTime::now(),
            next_link_id: AtomicU64::default(),
            connected: tokio::sync::Notify::new(),
        }
    }
}

impl Registry {
    pub fn next_link_id(&self) -> u64 {
        self.next_link_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a link, replacing (and so closing) an older link of the
    /// same agent, which is returned.
    pub fn insert(&self, agent: ConnectedAgent) -> Option<ConnectedAgent> {
        let previous = self.lock().insert(agent.name.clone(), agent);
        self.connected.notify_waiters();
        previous
    }

    /// Resolves after the next agent connects.
    pub async fn changed(&self) {
        self.connected.notified().await;
    }

    /// Removes the agent's entry if it is still this link's.
    pub fn remove(&self, name: &str, link_id: u64) -> bool {
        let mut agents = self.lock();
        if agents.get(name).is_some_and(|a| a.link_id == link_id) {
            agents.remove(name);
            drop(agents);
            self.departed
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(name.to_owned(), SystemTime::now());
            return true;
        }
        false
    }

    /// Since when the named agent is away (its last link ended, or it has
    /// not connected since this controller started); `None` while it is
    /// connected.
    pub fn away_since(&self, name: &str) -> Option<SystemTime> {
        if self.lock().contains_key(name) {
            return None;
        }
        let departed = self.departed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(departed.get(name).copied().unwrap_or(self.created))
    }

    pub fn get(&self, name: &str) -> Option<ConnectedAgent> {
        self.lock().get(name).cloned()
    }

    /// Every connected agent, by name.
    pub fn list(&self) -> Vec<ConnectedAgent> {
        let mut agents: Vec<_> = self.lock().values().cloned().collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        agents
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectedAgent>> {
        // A panic while holding the lock cannot leave the map half-changed
        // (each operation is one HashMap call), so poisoning is ignored.
        self.agents.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
