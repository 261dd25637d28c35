//! The gRPC service the agent serves to the controller over the link.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};
use tracing::Instrument;
use walbridge_daemon::VERSION;
use walbridge_daemon::pg::Database;
use walbridge_daemon::telemetry::continue_trace;
use walbridge_proto::v1 as wire;
use walbridge_proto::v1::agent_service_server::AgentService;

use crate::source::{self, SourceStatus};

/// One link's service; it counts the calls it answered, so the link can
/// tell a controller that hung up at once (it refused us) from one that
/// talked and then went away.
#[derive(Debug, Clone)]
pub struct Agent {
    name: String,
    source: Database,
    calls: Arc<AtomicU64>,
}

impl Agent {
    pub fn new(name: String, source: Database) -> Agent {
        Agent {
            name,
            source,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn calls_answered(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[tonic::async_trait]
impl AgentService for Agent {
    async fn hello(&self, request: Request<wire::HelloRequest>) -> Result<Response<wire::HelloResponse>, Status> {
        let span = tracing::info_span!("hello", controller_version = %request.get_ref().controller_version);
        continue_trace(&span, request.metadata());
        self.calls.fetch_add(1, Ordering::Relaxed);
        let status = source::probe(&self.source).instrument(span).await;
        if let Some(problem) = &status.unreachable {
            tracing::warn!(source = %self.source.redacted(), %problem, "source database unreachable");
        }
        Ok(Response::new(wire::HelloResponse {
            agent_name: self.name.clone(),
            agent_version: VERSION.to_owned(),
            source: Some(to_wire(status)),
        }))
    }
}

fn to_wire(status: SourceStatus) -> wire::SourceStatus {
    wire::SourceStatus {
        reachable: status.unreachable.is_none(),
        error: status.unreachable.unwrap_or_default(),
        server_version: status.server_version,
        server_version_num: status.server_version_num,
        system_identifier: status.system_identifier,
        database: status.database,
    }
}
