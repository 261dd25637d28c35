//! `verify`: every table of the migration counted and checksummed on both
//! sides, each side reading a consistent snapshot of its own (exact when
//! the source is quiet or fenced).

use futures_util::StreamExt;
use tonic::Status;
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::v1 as wire;

use crate::migration::Context;
use crate::start::selection_from_wire;
use crate::transfer;

/// Tables verified at once.
const VERIFY_PARALLEL: usize = 4;

/// Counts and checksums every table of the current migration on both
/// sides, each side reading a consistent snapshot of its own.
pub async fn verify(ctx: &Context, request: wire::VerifyRequest) -> Result<wire::VerifyResponse, Status> {
    let record = ctx
        .state
        .current()
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::failed_precondition("there is no migration to verify: run `walbridge start` first"))?;
    let agent = crate::steps::verified_agent(ctx, &record)
        .await
        .map_err(|refusal| Status::failed_precondition(refusal.to_string()))?;
    let target = ctx
        .target
        .clone()
        .ok_or_else(|| Status::failed_precondition("target.url is not set on the controller"))?;
    let selection = selection_from_wire(request.selection);
    let all = ctx.state.tables().map_err(|e| Status::internal(e.to_string()))?;
    let names: Vec<QualifiedName> = all.iter().map(|t| t.name.clone()).collect();
    let chosen = if selection.tables.is_empty() && selection.exclude.is_empty() {
        names
    } else {
        selection
            .resolve(&names)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
    };
    let tables: Vec<_> = all.into_iter().filter(|t| chosen.contains(&t.name)).collect();
    let source_version = record.source_version_num();
    let results = futures_util::stream::iter(tables)
        .map(|table| {
            let (agent, target) = (agent.clone(), target.clone());
            async move {
                let compared =
                    transfer::compare(&agent, &target, source_version, "", &table.name, &table.columns).await;
                match compared {
                    Ok(c) => wire::TableVerification {
                        name: table.name.to_string(),
                        matches: c.matches(),
                        source_rows: c.source.0,
                        source_checksum: c.source.1,
                        target_rows: c.target.0,
                        target_checksum: c.target.1,
                        error: String::new(),
                    },
                    Err(e) => wire::TableVerification {
                        name: table.name.to_string(),
                        error: e.to_string(),
                        ..Default::default()
                    },
                }
            }
        })
        .buffered(VERIFY_PARALLEL)
        .collect::<Vec<_>>()
        .await;
    let mut results = results;
    if !record.skip_large_objects && selection.tables.is_empty() && selection.exclude.is_empty() {
        results.extend(large_objects(&agent, &target).await);
    }
    Ok(wire::VerifyResponse { tables: results })
}

/// The large objects, as one line of the report: their count and a hash
/// of every object's size and content hash. No line when neither side has
/// any, so a database without them reports only its tables.
async fn large_objects(
    agent: &crate::registry::AgentClient,
    target: &walbridge_daemon::pg::Database,
) -> Option<wire::TableVerification> {
    let name = "large objects".to_owned();
    let compared = async {
        let source = crate::large_objects::source_digests(agent, "").await?;
        let client = crate::target::connect(target, crate::target::Purpose::Copy).await?;
        let target = crate::large_objects::target_digests(&client).await?;
        Ok::<_, walbridge_migration::fault::Fault>((
            crate::large_objects::summary(&source),
            crate::large_objects::summary(&target),
        ))
    };
    match compared.await {
        Ok((source, target)) if source.0 == 0 && target.0 == 0 => None,
        Ok((source, target)) => Some(wire::TableVerification {
            name,
            matches: source == target,
            source_rows: source.0,
            source_checksum: source.1,
            target_rows: target.0,
            target_checksum: target.1,
            error: String::new(),
        }),
        Err(e) => Some(wire::TableVerification {
            name,
            error: e.to_string(),
            ..Default::default()
        }),
    }
}
