//! An OTLP/HTTP receiver for the tests: decodes the protobuf wasmpool
//! exports, as a collector does.
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use prost::Message as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A span as received, with the resource it came with.
#[derive(Clone, Debug)]
pub struct Got {
    pub span: Span,
    pub service: String,
}

impl Got {
    pub fn attr(&self, key: &str) -> Option<Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            Value::IntValue(i) => Some(i),
            _ => None,
        }
    }
    pub fn str(&self, key: &str) -> Option<String> {
        match self.attr(key)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap()
    }
    pub fn error(&self) -> Option<String> {
        let s = self.span.status.as_ref()?;
        (s.code == StatusCode::Error as i32).then(|| s.message.clone())
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver on loopback: decodes every export; answers after
/// `delay` (a slow collector).
pub struct Receiver {
    pub addr: SocketAddr,
    pub spans: Arc<Mutex<Vec<Got>>>,
    pub exports: Arc<Mutex<u64>>,
}

impl Receiver {
    pub async fn start(delay: Duration) -> Receiver {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let exports = Arc::new(Mutex::new(0));
        let (s2, e2) = (spans.clone(), exports.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { break };
                let (spans, exports) = (s2.clone(), e2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let (spans, exports) = (spans.clone(), exports.clone());
                        async move {
                            use http_body_util::BodyExt;
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let auth = req
                                .headers()
                                .get("x-team")
                                .map(|v| v.to_str().unwrap().to_string());
                            let body: hyper::body::Incoming = req.into_body();
                            let bytes = body.collect().await.unwrap().to_bytes();
                            let msg = ExportTraceServiceRequest::decode(bytes).unwrap();
                            tokio::time::sleep(delay).await;
                            for rs in msg.resource_spans {
                                let mut service = String::new();
                                for kv in rs.resource.iter().flat_map(|r| r.attributes.iter()) {
                                    if kv.key == "service.name"
                                        && let Some(Value::StringValue(s)) =
                                            kv.value.clone().and_then(|v| v.value)
                                    {
                                        service = s;
                                    }
                                }
                                if let Some(team) = &auth {
                                    service.push_str(&format!(" team={team}"));
                                }
                                for ss in rs.scope_spans {
                                    for span in ss.spans {
                                        spans.lock().unwrap().push(Got {
                                            span,
                                            service: service.clone(),
                                        });
                                    }
                                }
                            }
                            *exports.lock().unwrap() += 1;
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(200)
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            spans,
            exports,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (10 s at most) for a server span of trace `trace_id`, then a
    /// little more for its children; returns the trace's spans.
    pub async fn trace(&self, trace_id: &str) -> Vec<Got> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let spans: Vec<Got> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|g| g.trace_id() == trace_id)
                .cloned()
                .collect();
            if spans.iter().any(|g| g.kind() == SpanKind::Server) {
                return spans;
            }
            assert!(Instant::now() < end, "no server span of {trace_id}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn count(&self) -> usize {
        self.spans.lock().unwrap().len()
    }
}
