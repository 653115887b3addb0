//! What each instance's store holds: the WASI context (granting nothing by
//! default), the wasi:http context with the outbound-request policy, memory
//! limits, and guest stdout/stderr routed to the log tagged with the
//! instance id.

use crate::config::{Knobs, OutboundRule};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// Store data of one instance.
pub struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundPolicy,
    pub(crate) limits: StoreLimits,
}

impl Host {
    pub fn new(knobs: &Knobs, policy: Arc<[OutboundRule]>, instance_id: u64) -> Host {
        let mut b = WasiCtxBuilder::new();
        // Nothing is granted: no preopened directories, no sockets, no name
        // lookups, no inherited environment or stdin.
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        b.socket_addr_check(|_, _| Box::pin(async { false }));
        b.envs(&knobs.env);
        b.stdout(GuestLog::new(instance_id, Stream::Stdout));
        b.stderr(GuestLog::new(instance_id, Stream::Stderr));
        let limits = wasmtime::StoreLimitsBuilder::new()
            .memory_size(knobs.max_memory_size as usize)
            .build();
        Host {
            table: ResourceTable::new(),
            wasi: b.build(),
            http: WasiHttpCtx::new(),
            hooks: OutboundPolicy { rules: policy },
            limits,
        }
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Refuses outgoing HTTP requests unless `allow-outbound` lists the host.
struct OutboundPolicy {
    rules: Arc<[OutboundRule]>,
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        let uri = request.uri();
        let host = uri.host().unwrap_or_default().to_string();
        let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
            443
        } else {
            80
        };
        let port = uri.port_u16().unwrap_or(default_port);
        if !self.rules.iter().any(|r| r.allows(&host, port)) {
            tracing::warn!(%host, port, "outgoing request refused: host not in allow-outbound");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        _ = fut;
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// A guest's stdout or stderr: complete lines go to the log as
/// `guest` events with the instance id; a partial line waits for its end
/// (or is flushed when it grows past 16 KiB or the instance goes away).
#[derive(Clone)]
struct GuestLog {
    inner: Arc<GuestLogInner>,
}

struct GuestLogInner {
    instance: u64,
    stream: Stream,
    pending: Mutex<Vec<u8>>,
}

const MAX_PENDING_LINE: usize = 16 << 10;

impl GuestLog {
    fn new(instance: u64, stream: Stream) -> GuestLog {
        GuestLog {
            inner: Arc::new(GuestLogInner {
                instance,
                stream,
                pending: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl GuestLogInner {
    fn emit(&self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches(['\n', '\r']);
        match self.stream {
            Stream::Stdout => {
                tracing::info!(target: "guest", instance = self.instance, stream = "stdout", "{line}")
            }
            Stream::Stderr => {
                tracing::warn!(target: "guest", instance = self.instance, stream = "stderr", "{line}")
            }
        }
    }

    fn write(&self, mut buf: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            pending.extend_from_slice(&buf[..i]);
            self.emit(&pending);
            pending.clear();
            buf = &buf[i + 1..];
        }
        pending.extend_from_slice(buf);
        if pending.len() > MAX_PENDING_LINE {
            self.emit(&pending);
            pending.clear();
        }
    }
}

impl Drop for GuestLogInner {
    fn drop(&mut self) {
        let pending = std::mem::take(self.pending.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !pending.is_empty() {
            self.emit(&pending);
        }
    }
}

impl wasmtime_wasi::cli::IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestLog {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestLog {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.write(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
