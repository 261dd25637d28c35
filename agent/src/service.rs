//! The gRPC service the agent serves to the controller over the link:
//! conversions between wire types and the agent's own types happen here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use walbridge_daemon::pg::{Database, SessionPolicy};
use walbridge_daemon::telemetry::continue_trace;
use walbridge_daemon::{VERSION, crash_point};
use walbridge_migration::copy::PageRange;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::convert::{name_from_wire, name_to_wire};
use walbridge_proto::v1 as wire;
use walbridge_proto::v1::agent_service_server::AgentService;

use crate::snapshot::Snapshots;
use crate::source::{self, APPLICATION_NAME, SourceStatus};
use crate::{catalog, copy, preflight};

/// A transaction open longer than this is reported by preflight.
const LONG_TRANSACTION: Duration = Duration::from_secs(300);

/// What outlives any one link: the source, the snapshots held on it.
#[derive(Debug)]
pub struct AgentState {
    pub name: String,
    pub source: Database,
    pub pg_dump: crate::pg_dump::PgDumpChoice,
    /// Who the target's subscription logs in as.
    pub subscription_role: crate::subscription_role::SubscriptionRole,
    pub snapshots: Arc<Snapshots>,
    /// The session the slot's status is read on while it is watched.
    pub monitor: crate::streaming::Monitor,
    /// Streams and snapshot holders run here, so shutdown can wait for them.
    pub tasks: tokio_util::task::TaskTracker,
    /// Whether the link to the controller is up now.
    pub link_up: std::sync::atomic::AtomicBool,
}

/// The agent's health for Prometheus: the link, the source, what it holds.
pub async fn render_metrics(state: &AgentState) -> Result<String, String> {
    use walbridge_daemon::metrics::{encode, set_gauge};
    let mut registry = prometheus_client::registry::Registry::default();
    let link_up = i64::from(state.link_up.load(Ordering::Relaxed));
    set_gauge(
        &mut registry,
        "walbridge_agent_link_up",
        "Whether the link to the controller is up",
        link_up,
    );
    let reachable = i64::from(source::probe(&state.source).await.unreachable.is_none());
    set_gauge(
        &mut registry,
        "walbridge_agent_source_reachable",
        "Whether the agent can query the source now",
        reachable,
    );
    let held = state.snapshots.count() as i64;
    set_gauge(
        &mut registry,
        "walbridge_agent_snapshots_held",
        "Exported snapshots the agent holds open",
        held,
    );
    encode(&registry)
}

/// One link's service; it counts the calls it answered, so the link can
/// tell a controller that hung up at once (it refused us) from one that
/// talked and then went away.
#[derive(Debug, Clone)]
pub struct Agent {
    state: Arc<AgentState>,
    calls: Arc<AtomicU64>,
}

impl Agent {
    pub fn new(state: Arc<AgentState>) -> Agent {
        Agent {
            state,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn calls_answered(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn span<T>(&self, name: &'static str, request: &Request<T>) -> tracing::Span {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("rpc", method = name);
        continue_trace(&span, request.metadata());
        span
    }

    /// A session on the source under `policy` (see `source`'s policies).
    async fn source_client(&self, policy: &SessionPolicy) -> Result<tokio_postgres::Client, Status> {
        self.state
            .source
            .connect_with(APPLICATION_NAME, policy)
            .await
            .map_err(|e| crate::fault::connect_status(&e))
    }
}

type ChunkStream = ReceiverStream<Result<wire::DataChunk, Status>>;

#[tonic::async_trait]
impl AgentService for Agent {
    async fn hello(&self, request: Request<wire::HelloRequest>) -> Result<Response<wire::HelloResponse>, Status> {
        let span = self.span("hello", &request);
        let status = source::probe(&self.state.source).instrument(span).await;
        if let Some(problem) = &status.unreachable {
            tracing::warn!(source = %self.state.source.redacted(), %problem, "source database unreachable");
        }
        Ok(Response::new(wire::HelloResponse {
            agent_name: self.state.name.clone(),
            agent_version: VERSION.to_owned(),
            source: Some(status_to_wire(status)),
            host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        }))
    }

    async fn preflight(
        &self,
        request: Request<wire::SourcePreflightRequest>,
    ) -> Result<Response<wire::SourcePreflightResponse>, Status> {
        let span = self.span("preflight", &request);
        async {
            let request = request.into_inner();
            let client = self.source_client(&source::CATALOG).await?;
            let tables: Vec<QualifiedName> = request.tables.into_iter().map(name_from_wire).collect();
            let scope = preflight::SourceScope {
                tables: (!tables.is_empty()).then_some(tables),
                connected_port: Some(self.state.source.port()),
                long_transaction_after: LONG_TRANSACTION,
                privileges: request.privileges,
                skip_large_objects: request.skip_large_objects,
            };
            let (mut findings, facts) = preflight::check_source(&client, &scope)
                .await
                .map_err(|e| crate::fault::source_status("preflight query failed", &e))?;
            findings.extend(
                crate::subscription_role::check(&client, &self.state.subscription_role)
                    .await
                    .map_err(|e| crate::fault::source_status("preflight query failed", &e))?,
            );
            let pg_dump = self.state.pg_dump.resolve().await;
            findings.extend(preflight::check_pg_dump(
                &self.state.pg_dump,
                &pg_dump,
                facts.server_version_num,
            ));
            Ok(Response::new(wire::SourcePreflightResponse {
                findings: findings.into_iter().map(wire::Finding::from).collect(),
                server_version_num: facts.server_version_num,
                database_size_bytes: facts.database_size_bytes,
                extensions: facts
                    .extensions
                    .into_iter()
                    .map(|e| wire::Extension {
                        name: e.name,
                        version: e.version,
                    })
                    .collect(),
                tables: facts.tables.into_iter().map(name_to_wire).collect(),
                roles: facts.roles.into_iter().map(wire::NamedRole::from).collect(),
                schemas: facts.schemas.into_iter().map(wire::SourceSchema::from).collect(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn list_tables(
        &self,
        request: Request<wire::ListTablesRequest>,
    ) -> Result<Response<wire::ListTablesResponse>, Status> {
        let span = self.span("list_tables", &request);
        async {
            let client = self.source_client(&source::CATALOG).await?;
            let tables = catalog::list_tables(&client)
                .await
                .map_err(|e| crate::fault::source_status("listing tables failed", &e))?;
            Ok(Response::new(wire::ListTablesResponse {
                tables: tables
                    .into_iter()
                    .map(|t| wire::SourceTable {
                        name: Some(name_to_wire(t.name)),
                        kind: if t.kind == 'm' {
                            "r".to_owned()
                        } else {
                            t.kind.to_string()
                        },
                        parent: t.parent.map(name_to_wire),
                        columns: t
                            .columns
                            .into_iter()
                            .map(|c| wire::Column {
                                name: c.name,
                                generated: c.generated,
                            })
                            .collect(),
                        size_bytes: t.size_bytes,
                        pages: t.pages,
                        materialized_view: t.kind == 'm',
                        toast_bytes: t.toast_bytes,
                    })
                    .collect(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<wire::CreateSnapshotRequest>,
    ) -> Result<Response<wire::SnapshotCreated>, Status> {
        let span = self.span("create_snapshot", &request);
        async {
            let request = request.into_inner();
            let tables: Vec<QualifiedName> = request.tables.into_iter().map(name_from_wire).collect();
            let held = self
                .state
                .snapshots
                .create(
                    &self.state.source,
                    &request.slot,
                    &request.publication,
                    &tables,
                    request.mark.map(name_from_wire).as_ref(),
                    (request.deadline_ms > 0).then(|| Duration::from_millis(request.deadline_ms)),
                )
                .await
                .map_err(|e| crate::fault::status(Fault::new(e.kind(), e.to_string())))?;
            crash_point!(fp::AGENT_SLOT_CREATED);
            Ok(Response::new(wire::SnapshotCreated {
                slot: held.slot,
                snapshot: held.snapshot,
                consistent_lsn: held.consistent_lsn,
            }))
        }
        .instrument(span)
        .await
    }

    async fn snapshot_status(
        &self,
        request: Request<wire::SnapshotStatusRequest>,
    ) -> Result<Response<wire::SnapshotStatusResponse>, Status> {
        let _span = self.span("snapshot_status", &request);
        Ok(Response::new(wire::SnapshotStatusResponse {
            held: self.state.snapshots.is_held(&request.get_ref().snapshot),
        }))
    }

    type DumpSchemaStream = ChunkStream;

    async fn dump_schema(
        &self,
        request: Request<wire::DumpSchemaRequest>,
    ) -> Result<Response<Self::DumpSchemaStream>, Status> {
        let span = self.span("dump_schema", &request);
        let request = request.into_inner();
        if request.section != "pre-data" && request.section != "post-data" {
            return Err(Status::invalid_argument(format!(
                "no schema section {:?}",
                request.section
            )));
        }
        let (out, chunks) = copy::channel();
        self.state.tasks.spawn(
            copy::dump_schema(
                self.state.source.clone(),
                self.state.pg_dump.clone(),
                copy::SchemaDump {
                    snapshot: request.snapshot,
                    section: request.section,
                    exclude: request.exclude.into_iter().map(name_from_wire).collect(),
                    privileges: request.privileges,
                    only: request.only.into_iter().map(name_from_wire).collect(),
                },
                out,
            )
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(chunks)))
    }

    type CopyTableStream = ChunkStream;

    async fn copy_table(
        &self,
        request: Request<wire::CopyTableRequest>,
    ) -> Result<Response<Self::CopyTableStream>, Status> {
        let span = self.span("copy_table", &request);
        let request = request.into_inner();
        let compression = request.compression();
        let table = request
            .table
            .map(name_from_wire)
            .ok_or_else(|| Status::invalid_argument("no table"))?;
        let range = (request.end_page > 0).then_some(PageRange {
            first_page: request.first_page,
            end_page: request.end_page,
        });
        match range {
            Some(range) => {
                tracing::info!(parent: &span, %table, first_page = range.first_page, end_page = range.end_page, "copying a page range")
            }
            None => tracing::info!(parent: &span, %table, "copying a table"),
        }
        let (out, chunks) = copy::channel();
        // Keeps the stream open past the copy's end, so that a crash
        // point there comes before the controller hears the stream end.
        #[cfg(feature = "failpoints")]
        let open = out.clone();
        let copy = copy::copy_table(
            self.state.source.clone(),
            request.snapshot,
            table,
            request.columns,
            range,
            compression,
            out,
        );
        self.state.tasks.spawn(
            async move {
                copy.await;
                crash_point!(fp::AGENT_UNIT_STREAMED);
                #[cfg(feature = "failpoints")]
                drop(open);
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(chunks)))
    }

    async fn checksum(
        &self,
        request: Request<wire::ChecksumRequest>,
    ) -> Result<Response<wire::ChecksumResponse>, Status> {
        let span = self.span("checksum", &request);
        let request = request.into_inner();
        let table = request
            .table
            .map(name_from_wire)
            .ok_or_else(|| Status::invalid_argument("no table"))?;
        let (rows, checksum) = copy::checksum(
            &self.state.source,
            &request.snapshot,
            &table,
            &request.columns,
            request.round_floats,
        )
        .instrument(span)
        .await?;
        Ok(Response::new(wire::ChecksumResponse { rows, checksum }))
    }

    async fn release_snapshot(
        &self,
        request: Request<wire::ReleaseSnapshotRequest>,
    ) -> Result<Response<wire::ReleaseSnapshotResponse>, Status> {
        let _span = self.span("release_snapshot", &request);
        self.state.snapshots.release(&request.get_ref().snapshot);
        Ok(Response::new(wire::ReleaseSnapshotResponse {}))
    }

    async fn drop_replication(
        &self,
        request: Request<wire::DropReplicationRequest>,
    ) -> Result<Response<wire::DropReplicationResponse>, Status> {
        let span = self.span("drop_replication", &request);
        let request = request.into_inner();
        self.state.snapshots.release_slot(&request.slot);
        let mark = request.mark.clone().map(name_from_wire);
        let (dropped_slot, dropped_publication) =
            crate::snapshot::drop_replication(&self.state.source, &request.slot, &request.publication, mark.as_ref())
                .instrument(span)
                .await
                .map_err(|e| crate::fault::session_status(format!("cannot drop {}", request.slot), &e))?;
        if dropped_slot || dropped_publication {
            tracing::info!(slot = %request.slot, dropped_slot, dropped_publication, "dropped replication objects");
        }
        Ok(Response::new(wire::DropReplicationResponse {
            dropped_slot,
            dropped_publication,
        }))
    }

    type TunnelStream = crate::tunnel::TunnelStream;

    async fn tunnel(
        &self,
        request: Request<tonic::Streaming<wire::TunnelData>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let span = self.span("tunnel", &request);
        let address = crate::tunnel::SourceAddress::of(&self.state.source).map_err(Status::failed_precondition)?;
        let stream = crate::tunnel::open(&address, request.into_inner(), &self.state.tasks)
            .instrument(span)
            .await?;
        Ok(Response::new(stream))
    }

    async fn subscription_connection(
        &self,
        request: Request<wire::SubscriptionConnectionRequest>,
    ) -> Result<Response<wire::SubscriptionConnectionResponse>, Status> {
        let span = self.span("subscription_connection", &request);
        async {
            let client = self.source_client(&source::QUESTIONS).await?;
            let version: i32 = client
                .query_one("SELECT current_setting('server_version_num')::int4", &[])
                .await
                .map_err(|e| crate::fault::source_status("cannot read the source's version", &e))?
                .get(0);
            let credentials =
                crate::subscription_role::ensure(&client, &self.state.subscription_role, &request.get_ref().role)
                    .await
                    .map_err(|e| match e {
                        crate::subscription_role::RoleError::NotAllowed(text) => {
                            crate::fault::status(Fault::new(FaultKind::Privilege, text))
                        }
                        crate::subscription_role::RoleError::Database(kind, text) => {
                            crate::fault::status(Fault::new(kind, text))
                        }
                    })?;
            if credentials.created {
                tracing::info!(role = %credentials.user, "the subscription's role is ready on the source");
            }
            Ok(Response::new(crate::streaming::subscription_connection(
                &self.state.source,
                version.max(0) as u32,
                credentials,
            )))
        }
        .instrument(span)
        .await
    }

    async fn drop_subscription_role(
        &self,
        request: Request<wire::DropSubscriptionRoleRequest>,
    ) -> Result<Response<wire::DropSubscriptionRoleResponse>, Status> {
        let span = self.span("drop_subscription_role", &request);
        async {
            let role = &request.get_ref().role;
            if let crate::subscription_role::SubscriptionRole::Configured { user, .. } = &self.state.subscription_role
                && user == role
            {
                // The operator's role is theirs to drop.
                return Ok(Response::new(wire::DropSubscriptionRoleResponse { dropped: false }));
            }
            let client = self.source_client(&source::QUESTIONS).await?;
            let dropped = crate::subscription_role::remove(&client, role)
                .await
                .map_err(|text| crate::fault::status(Fault::new(FaultKind::SourceUnavailable, text)))?;
            if dropped {
                tracing::info!(role = %request.get_ref().role, "dropped the subscription's role");
            }
            Ok(Response::new(wire::DropSubscriptionRoleResponse { dropped }))
        }
        .instrument(span)
        .await
    }

    async fn slot_status(
        &self,
        request: Request<wire::SlotStatusRequest>,
    ) -> Result<Response<wire::SlotStatusResponse>, Status> {
        let span = self.span("slot_status", &request);
        async {
            let status = self
                .state
                .monitor
                .slot_status(&self.state.source, &request.get_ref().slot)
                .await
                .map_err(|e| crate::fault::session_status("reading the slot failed", &e))?;
            Ok(Response::new(status))
        }
        .instrument(span)
        .await
    }

    type FenceStream = ReceiverStream<Result<wire::FenceEvent, Status>>;

    async fn fence(
        &self,
        request: Request<tonic::Streaming<wire::FenceCommand>>,
    ) -> Result<Response<Self::FenceStream>, Status> {
        let span = self.span("fence", &request);
        let (events, stream) = tokio::sync::mpsc::channel(4);
        self.state
            .tasks
            .spawn(crate::fence::run(self.state.source.clone(), request.into_inner(), events).instrument(span));
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    type LargeObjectDigestsStream = ReceiverStream<Result<wire::LargeObjectDigest, Status>>;

    async fn large_object_digests(
        &self,
        request: Request<wire::LargeObjectsRequest>,
    ) -> Result<Response<Self::LargeObjectDigestsStream>, Status> {
        let span = self.span("large_object_digests", &request);
        let (out, digests) = tokio::sync::mpsc::channel(64);
        self.state.tasks.spawn(
            crate::large_objects::digests(self.state.source.clone(), request.into_inner().snapshot, out)
                .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(digests)))
    }

    type ReadLargeObjectsStream = ReceiverStream<Result<wire::LargeObjectChunk, Status>>;

    async fn read_large_objects(
        &self,
        request: Request<wire::ReadLargeObjectsRequest>,
    ) -> Result<Response<Self::ReadLargeObjectsStream>, Status> {
        let span = self.span("read_large_objects", &request);
        let request = request.into_inner();
        let (out, chunks) = tokio::sync::mpsc::channel(4);
        self.state.tasks.spawn(
            crate::large_objects::read(self.state.source.clone(), request.snapshot, request.oids, out).instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(chunks)))
    }

    async fn publish_tables(
        &self,
        request: Request<wire::PublishTablesRequest>,
    ) -> Result<Response<wire::PublishTablesResponse>, Status> {
        let span = self.span("publish_tables", &request);
        async {
            let request = request.into_inner();
            let tables: Vec<QualifiedName> = request.tables.into_iter().map(name_from_wire).collect();
            let reader = match &self.state.subscription_role {
                crate::subscription_role::SubscriptionRole::Configured { user, .. } => user.clone(),
                crate::subscription_role::SubscriptionRole::PerMigration => request.reader,
            };
            let client = self.source_client(&source::QUESTIONS).await?;
            crate::publication::add(&client, &request.publication, &tables, &reader)
                .await
                .map_err(|e| crate::fault::source_status("cannot add the new tables to the publication", &e))?;
            tracing::info!(publication = %request.publication, tables = ?tables, "tables added to the publication");
            Ok(Response::new(wire::PublishTablesResponse {}))
        }
        .instrument(span)
        .await
    }

    async fn table_definitions(
        &self,
        request: Request<wire::TableDefinitionsRequest>,
    ) -> Result<Response<wire::TableDefinitionsResponse>, Status> {
        let span = self.span("table_definitions", &request);
        async {
            let tables: Vec<QualifiedName> = request.into_inner().tables.into_iter().map(name_from_wire).collect();
            let client = self.source_client(&source::CATALOG).await?;
            let rows = client
                .query(
                    walbridge_migration::definition::DEFINITIONS_SQL,
                    &[&walbridge_migration::definition::table_list(&tables)],
                )
                .await
                .map_err(|e| crate::fault::source_status("reading the tables' definitions failed", &e))?;
            Ok(Response::new(wire::TableDefinitionsResponse {
                definitions: rows
                    .iter()
                    .map(|row| wire::TableDefinitionText {
                        table: row.get(0),
                        schema: row.get(1),
                        json: row.get(2),
                    })
                    .collect(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn sequences(
        &self,
        request: Request<wire::SequencesRequest>,
    ) -> Result<Response<wire::SequencesResponse>, Status> {
        let span = self.span("sequences", &request);
        async {
            let client = self.source_client(&source::QUESTIONS).await?;
            let sequences = crate::streaming::sequences(&client)
                .await
                .map_err(|e| crate::fault::source_status("reading sequences failed", &e))?;
            Ok(Response::new(wire::SequencesResponse { sequences }))
        }
        .instrument(span)
        .await
    }

    async fn release_fence(
        &self,
        request: Request<wire::ReleaseFenceRequest>,
    ) -> Result<Response<wire::ReleaseFenceResponse>, Status> {
        let span = self.span("release_fence", &request);
        let released = crate::fence::release(&self.state.source).instrument(span).await?;
        if released.tables > 0 {
            tracing::warn!(
                migration = %request.get_ref().migration,
                tables = released.tables,
                sequences = released.sequences,
                roles = released.roles,
                "the write fence is released: the source accepts writes"
            );
        }
        Ok(Response::new(wire::ReleaseFenceResponse {
            tables: released.tables,
            sequences: released.sequences,
            roles: released.roles,
        }))
    }
}

fn status_to_wire(status: SourceStatus) -> wire::SourceStatus {
    wire::SourceStatus {
        reachable: status.unreachable.is_none(),
        error: status.unreachable.unwrap_or_default(),
        server_version: status.server_version,
        server_version_num: status.server_version_num,
        system_identifier: status.system_identifier,
        database: status.database,
    }
}
