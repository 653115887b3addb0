//! OTLP protobuf, written straight from wasmpool's spans.
//!
//! A span is encoded once, when it ends, into a buffer of the thread that
//! ended it, as the `Span` message of `opentelemetry/proto/trace/v1/trace.proto`;
//! the exporter only frames a run of them (`ExportTraceServiceRequest` >
//! `ResourceSpans` > `ScopeSpans`) and sends it. Building the SDK's
//! `SpanData` (a `KeyValue` and an allocation or two per attribute) and
//! converting it to the generated protobuf types on export cost more than
//! the rest of a small request; here a span costs no allocation at all.
//! The wire format comes from `prost::encoding`; the field numbers are
//! OTLP's (stable since OTLP 1.0), and the tests decode what is written
//! with `opentelemetry-proto`'s generated types.

use super::context::SpanContext;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use std::time::{SystemTime, UNIX_EPOCH};

/// `Span.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

// Field numbers (trace.proto, common.proto, resource.proto,
// trace_service.proto).
const REQUEST_RESOURCE_SPANS: u32 = 1;
const RESOURCE_SPANS_RESOURCE: u32 = 1;
const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
const RESOURCE_ATTRIBUTES: u32 = 1;
const SCOPE_SPANS_SCOPE: u32 = 1;
/// `ScopeSpans.spans`: each queued span is one of these.
pub const SCOPE_SPANS_SPANS: u32 = 2;
const SCOPE_NAME: u32 = 1;
const SCOPE_VERSION: u32 = 2;
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START: u32 = 7;
const SPAN_END: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_STATUS: u32 = 15;
const SPAN_FLAGS: u32 = 16;
const STATUS_MESSAGE: u32 = 2;
const STATUS_CODE: u32 = 3;
const STATUS_CODE_ERROR: u64 = 2;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;
/// `SpanFlags`: the low byte is the W3C trace flags; these say whether
/// the parent is remote.
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;

fn len_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

/// Attributes (`KeyValue` messages under their parent's field number), or
/// a span's body with its attributes: both are written in place.
pub struct Attrs {
    buf: Vec<u8>,
    field: u32,
}

impl Attrs {
    /// Attributes of a span, to be copied into its body later.
    pub fn for_span(capacity: usize) -> Attrs {
        Attrs {
            buf: Vec::with_capacity(capacity),
            field: SPAN_ATTRIBUTES,
        }
    }

    /// A `KeyValue` whose `AnyValue` holds `value_len` bytes written by `value`.
    fn kv(&mut self, key: &str, value_len: usize, value: impl FnOnce(&mut Vec<u8>)) {
        let key_len = 1 + encoded_len_varint(key.len() as u64) + key.len();
        let any_len = 1 + encoded_len_varint(value_len as u64) + value_len;
        encode_key(self.field, WireType::LengthDelimited, &mut self.buf);
        encode_varint((key_len + any_len) as u64, &mut self.buf);
        len_field(&mut self.buf, KEY_VALUE_KEY, key.as_bytes());
        encode_key(KEY_VALUE_VALUE, WireType::LengthDelimited, &mut self.buf);
        encode_varint(value_len as u64, &mut self.buf);
        value(&mut self.buf);
    }

    pub fn str(&mut self, key: &str, value: &str) {
        let n = 1 + encoded_len_varint(value.len() as u64) + value.len();
        self.kv(key, n, |b| len_field(b, ANY_STRING, value.as_bytes()));
    }

    pub fn int(&mut self, key: &str, value: i64) {
        let n = 1 + encoded_len_varint(value as u64);
        self.kv(key, n, |b| {
            encode_key(ANY_INT, WireType::Varint, b);
            encode_varint(value as u64, b);
        });
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        self.kv(key, 2, |b| {
            encode_key(ANY_BOOL, WireType::Varint, b);
            b.push(u8::from(value));
        });
    }

    pub fn f64(&mut self, key: &str, value: f64) {
        self.kv(key, 9, |b| {
            encode_key(ANY_DOUBLE, WireType::SixtyFourBit, b);
            b.extend_from_slice(&value.to_le_bytes());
        });
    }

    /// Attributes written before (`Attrs::for_span`).
    pub fn extend(&mut self, attrs: &Attrs) {
        debug_assert_eq!(attrs.field, self.field);
        self.buf.extend_from_slice(&attrs.buf);
    }
}

/// What a span is, besides its attributes.
pub struct Head<'a> {
    pub ctx: &'a SpanContext,
    pub parent: Option<[u8; 8]>,
    pub parent_remote: bool,
    pub name: &'a str,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// One span's body, written into a buffer of this thread's (no allocation
/// once the thread has ended a span): its head first, then the caller's
/// attributes, then [`Span::error`] if it failed. [`Span::bytes`] is the
/// encoded `Span` message.
pub struct Span {
    attrs: Attrs,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Span {
    pub fn new(head: &Head<'_>) -> Span {
        let mut buf = SCRATCH.with(std::cell::Cell::take);
        buf.clear();
        len_field(&mut buf, SPAN_TRACE_ID, &head.ctx.trace_id);
        len_field(&mut buf, SPAN_SPAN_ID, &head.ctx.span_id);
        if let Some(p) = &head.parent {
            len_field(&mut buf, SPAN_PARENT_SPAN_ID, p);
        }
        len_field(&mut buf, SPAN_NAME, head.name.as_bytes());
        encode_key(SPAN_KIND, WireType::Varint, &mut buf);
        encode_varint(head.kind as u64, &mut buf);
        encode_key(SPAN_START, WireType::SixtyFourBit, &mut buf);
        buf.extend_from_slice(&nanos(head.start).to_le_bytes());
        encode_key(SPAN_END, WireType::SixtyFourBit, &mut buf);
        buf.extend_from_slice(&nanos(head.end).to_le_bytes());
        let mut flags = u32::from(head.ctx.flags) | FLAGS_HAS_IS_REMOTE;
        if head.parent_remote {
            flags |= FLAGS_IS_REMOTE;
        }
        encode_key(SPAN_FLAGS, WireType::ThirtyTwoBit, &mut buf);
        buf.extend_from_slice(&flags.to_le_bytes());
        Span {
            attrs: Attrs {
                buf,
                field: SPAN_ATTRIBUTES,
            },
        }
    }

    pub fn attrs(&mut self) -> &mut Attrs {
        &mut self.attrs
    }

    /// The span's status: an error, and why.
    pub fn error(&mut self, message: &str) {
        let inner = 1 + encoded_len_varint(message.len() as u64) + message.len() + 2;
        let b = &mut self.attrs.buf;
        encode_key(SPAN_STATUS, WireType::LengthDelimited, b);
        encode_varint(inner as u64, b);
        len_field(b, STATUS_MESSAGE, message.as_bytes());
        encode_key(STATUS_CODE, WireType::Varint, b);
        encode_varint(STATUS_CODE_ERROR, b);
    }

    /// The encoded `Span` message.
    pub fn bytes(&self) -> &[u8] {
        &self.attrs.buf
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.attrs.buf);
        SCRATCH.with(|s| s.set(buf));
    }
}

/// Appends `span` to `queue` as one entry of `ScopeSpans.spans`.
pub fn queue_span(queue: &mut Vec<u8>, span: &[u8]) {
    len_field(queue, SCOPE_SPANS_SPANS, span);
}

/// The `Resource` and `InstrumentationScope` every export carries,
/// encoded once.
pub struct Framing {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Framing {
    pub fn new(resource: &[(String, String)], scope_name: &str, scope_version: &str) -> Framing {
        let mut attrs = Attrs {
            buf: Vec::new(),
            field: RESOURCE_ATTRIBUTES,
        };
        for (k, v) in resource {
            attrs.str(k, v);
        }
        let mut scope = Vec::new();
        len_field(&mut scope, SCOPE_NAME, scope_name.as_bytes());
        len_field(&mut scope, SCOPE_VERSION, scope_version.as_bytes());
        Framing {
            resource: attrs.buf,
            scope,
        }
    }

    /// An `ExportTraceServiceRequest` of the queued spans `spans` (entries
    /// written by [`queue_span`]).
    pub fn request(&self, spans: &[u8]) -> Vec<u8> {
        let scope_field = 1 + encoded_len_varint(self.scope.len() as u64) + self.scope.len();
        let scope_spans = scope_field + spans.len();
        let resource_field =
            1 + encoded_len_varint(self.resource.len() as u64) + self.resource.len();
        let resource_spans =
            resource_field + 1 + encoded_len_varint(scope_spans as u64) + scope_spans;
        let mut out = Vec::with_capacity(resource_spans + 16);
        encode_key(REQUEST_RESOURCE_SPANS, WireType::LengthDelimited, &mut out);
        encode_varint(resource_spans as u64, &mut out);
        len_field(&mut out, RESOURCE_SPANS_RESOURCE, &self.resource);
        encode_key(
            RESOURCE_SPANS_SCOPE_SPANS,
            WireType::LengthDelimited,
            &mut out,
        );
        encode_varint(scope_spans as u64, &mut out);
        len_field(&mut out, SCOPE_SPANS_SCOPE, &self.scope);
        out.extend_from_slice(spans);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use prost::Message as _;
    use std::time::Duration;

    fn value(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    #[test]
    fn what_is_written_decodes_as_otlp() {
        let ctx = SpanContext {
            trace_id: [0x4b; 16],
            span_id: [0x01; 8],
            flags: 1,
        };
        let start = UNIX_EPOCH + Duration::from_nanos(1_796_000_000_123_456_789);
        let mut early = Attrs::for_span(64);
        early.str("url.path", "/a/b");
        early.str("user_agent.original", &"x".repeat(300)); // a two-byte length
        let mut queue = Vec::new();
        for (i, failed) in [(0u8, false), (1, true)] {
            let mut span = Span::new(&Head {
                ctx: &ctx,
                parent: (i == 1).then_some([0x22; 8]),
                parent_remote: i == 1,
                name: "GET",
                kind: if i == 0 { Kind::Server } else { Kind::Internal },
                start,
                end: start + Duration::from_micros(852),
            });
            span.attrs().extend(&early);
            span.attrs().int("http.response.status_code", 200);
            span.attrs().int("negative", -5);
            span.attrs().bool("wasmpool.instance.reused", true);
            span.attrs().f64("wasmpool.guest.duration_ms", 0.25);
            if failed {
                span.error("the guest trapped");
            }
            queue_span(&mut queue, span.bytes());
        }
        let framing = Framing::new(
            &[
                ("service.name".into(), "svc".into()),
                ("k8s.pod.name".into(), "p-1".into()),
            ],
            "wasmpool",
            "0.1.0",
        );
        let req = ExportTraceServiceRequest::decode(framing.request(&queue).as_slice()).unwrap();
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let res = rs.resource.as_ref().unwrap();
        assert_eq!(res.attributes.len(), 2);
        assert_eq!(res.attributes[0].key, "service.name");
        let ss = &rs.scope_spans[0];
        let scope = ss.scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("wasmpool", "0.1.0")
        );
        assert_eq!(ss.spans.len(), 2);
        let s = &ss.spans[0];
        assert_eq!(s.trace_id, vec![0x4b; 16]);
        assert_eq!(s.span_id, vec![0x01; 8]);
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.name, "GET");
        assert_eq!(s.kind, 2);
        assert_eq!(s.start_time_unix_nano, 1_796_000_000_123_456_789);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 852_000);
        assert_eq!(s.flags, 0x101);
        assert!(s.status.is_none());
        assert_eq!(
            value(s, "url.path"),
            Some(Value::StringValue("/a/b".into()))
        );
        assert_eq!(
            value(s, "user_agent.original"),
            Some(Value::StringValue("x".repeat(300)))
        );
        assert_eq!(
            value(s, "http.response.status_code"),
            Some(Value::IntValue(200))
        );
        assert_eq!(value(s, "negative"), Some(Value::IntValue(-5)));
        assert_eq!(
            value(s, "wasmpool.instance.reused"),
            Some(Value::BoolValue(true))
        );
        assert_eq!(
            value(s, "wasmpool.guest.duration_ms"),
            Some(Value::DoubleValue(0.25))
        );
        let s = &ss.spans[1];
        assert_eq!(s.parent_span_id, vec![0x22; 8]);
        assert_eq!(s.kind, 1);
        assert_eq!(s.flags, 0x301);
        let st = s.status.as_ref().unwrap();
        assert_eq!(st.code, StatusCode::Error as i32);
        assert_eq!(st.message, "the guest trapped");
    }

    #[test]
    fn an_empty_request_decodes_too() {
        let framing = Framing::new(&[], "wasmpool", "1");
        let req = ExportTraceServiceRequest::decode(framing.request(&[]).as_slice()).unwrap();
        assert!(req.resource_spans[0].scope_spans[0].spans.is_empty());
    }
}
