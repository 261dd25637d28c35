//! `walbridge agents`: the agents connected to the controller.

use serde::Serialize;
use walbridge_proto::v1 as wire;

use crate::client::{ApiAddress, connect};
use crate::output::Failure;

/// One agent, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct AgentView {
    pub name: String,
    pub peer_address: String,
    pub connected_at: String,
    pub agent_version: Option<String>,
    /// Set when the agent is connected but did not answer.
    pub hello_error: Option<String>,
    pub source: Option<SourceView>,
}

#[derive(Debug, Serialize)]
pub struct SourceView {
    pub reachable: bool,
    pub error: Option<String>,
    pub server_version: String,
    pub server_version_num: u32,
    /// A string: 64-bit identifiers do not survive JSON numbers in every reader.
    pub system_identifier: String,
    pub database: String,
}

#[derive(Debug, Serialize)]
pub struct AgentsView {
    pub agents: Vec<AgentView>,
}

pub async fn run(address: &ApiAddress, json: bool) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let response = client
        .list_agents(wire::ListAgentsRequest {})
        .await
        .map_err(|status| Failure::Operation(format!("the controller refused: {}", status.message())))?
        .into_inner();
    let view = AgentsView {
        agents: response.agents.into_iter().map(to_view).collect(),
    };
    if json {
        crate::output::print_json(&view);
    } else {
        print_table(&view);
    }
    Ok(())
}

fn to_view(agent: wire::ConnectedAgent) -> AgentView {
    let connected_at = crate::output::local_time(agent.connected_at_unix_ms);
    let source = agent.hello.as_ref().and_then(|h| h.source.clone()).map(|s| SourceView {
        reachable: s.reachable,
        error: (!s.error.is_empty()).then_some(s.error),
        server_version: s.server_version,
        server_version_num: s.server_version_num,
        system_identifier: s.system_identifier.to_string(),
        database: s.database,
    });
    AgentView {
        name: agent.name,
        peer_address: agent.peer_address,
        connected_at,
        agent_version: agent.hello.map(|h| h.agent_version),
        hello_error: (!agent.hello_error.is_empty()).then_some(agent.hello_error),
        source,
    }
}

fn print_table(view: &AgentsView) {
    if view.agents.is_empty() {
        println!("No agent is connected.");
        return;
    }
    let rows: Vec<[String; 5]> = view
        .agents
        .iter()
        .map(|a| {
            let (source, database) = match &a.source {
                Some(s) if s.reachable => (format!("PostgreSQL {}", s.server_version), s.database.clone()),
                Some(s) => (
                    format!("unreachable: {}", s.error.as_deref().unwrap_or("?")),
                    s.database.clone(),
                ),
                None => (
                    format!("no answer: {}", a.hello_error.as_deref().unwrap_or("?")),
                    String::new(),
                ),
            };
            [
                a.name.clone(),
                a.peer_address.clone(),
                a.agent_version.clone().unwrap_or_default(),
                database,
                source,
            ]
        })
        .collect();
    crate::output::print_table(&["AGENT", "FROM", "VERSION", "DATABASE", "SOURCE"], &rows);
}
