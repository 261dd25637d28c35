//! One trace per migration: the controller's step spans and the agent's
//! spans for the same work share a trace id and nest, because the trace
//! context travels as W3C traceparent metadata over the link. A real
//! OTLP/gRPC receiver runs in the test process and collects both.

use std::sync::{Arc, Mutex};

use harness::Cluster;
use harness::daemons::{AGENT, CONTROLLER, Daemon, eventually, walbridge};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::support::{DATABASE, Install, LINK_TIMEOUT};

/// (service, span name, trace id, span id, parent span id)
type Collected = Arc<Mutex<Vec<(String, String, Vec<u8>, Vec<u8>, Vec<u8>)>>>;

#[derive(Clone, Default)]
struct Receiver {
    spans: Collected,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((
                        service.clone(),
                        span.name,
                        span.trace_id,
                        span.span_id,
                        span.parent_span_id,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves OTLP/gRPC on a free port from its own runtime thread.
fn start_receiver() -> (Collected, u16) {
    let receiver = Receiver::default();
    let spans = receiver.spans.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    });
    (spans, port)
}

#[test]
fn the_controllers_steps_and_the_agents_work_are_one_trace() {
    let (spans, port) = start_receiver();
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let source = Cluster::builder("source").logical().start();
    let target = Cluster::builder("target").start();
    source.create_database(DATABASE);
    target.create_database(DATABASE);
    source.psql(
        DATABASE,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)",
    );
    let install = Install::new("localhost", &["east"]);
    let mut controller = Daemon::start_with_env(
        "controller",
        CONTROLLER,
        &[
            install.controller_args(),
            vec!["--target-url".into(), target.url(DATABASE)],
        ]
        .concat(),
        &env,
        install.path(),
    );
    let mut agent = Daemon::start_with_env(
        "agent-east",
        AGENT,
        &install.agent_args("east", &source.url(DATABASE), "localhost"),
        &env,
        install.path(),
    );
    eventually(LINK_TIMEOUT, "agent east to connect", || {
        install.connected_agent("east")
    });
    let start = walbridge(&["--api", &install.api(), "start", "--agent", "east", "--copy-only"]);
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    // SIGTERM flushes each daemon's buffered spans.
    assert_eq!(agent.terminate(), Some(0));
    assert_eq!(controller.terminate(), Some(0));

    let spans = spans.lock().unwrap().clone();
    let controller_spans: Vec<_> = spans.iter().filter(|s| s.0 == "walbridge-controller").collect();
    let agent_spans: Vec<_> = spans.iter().filter(|s| s.0 == "walbridge-agent").collect();
    assert!(
        controller_spans.iter().any(|s| s.1 == "step"),
        "the controller exported its steps: {controller_spans:?}"
    );
    // The migration's steps are one trace, and the agent's calls for them
    // are in it, each the child of a controller span.
    let step_traces: std::collections::BTreeSet<&Vec<u8>> = controller_spans
        .iter()
        .filter(|s| s.1 == "step")
        .map(|s| &s.2)
        .collect();
    assert_eq!(step_traces.len(), 1, "one trace for the migration's steps");
    let trace = *step_traces.iter().next().unwrap();
    assert!(
        controller_spans
            .iter()
            .any(|s| s.1 == "migration" && &s.2 == trace && s.4.is_empty()),
        "the migration span is the trace's root"
    );
    let joined: Vec<_> = agent_spans.iter().filter(|a| a.1 == "rpc" && &a.2 == trace).collect();
    assert!(
        joined.len() >= 3,
        "the agent's calls (snapshot, copy, checksum...) are in the migration's trace: {agent_spans:?}"
    );
    for span in &joined {
        assert!(
            controller_spans.iter().any(|c| c.2 == span.2 && c.3 == span.4),
            "agent span {span:?} nests under a controller span"
        );
    }
}
