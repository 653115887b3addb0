//! What each instance's store holds: the WASI context (granting nothing by
//! default), the wasi:http context with the outbound-request policy, memory
//! limits, and guest stdout/stderr routed to the log tagged with the
//! instance id.

use crate::config::{Knobs, OutboundRule};
use crate::engine::budget::{Held, MemoryBudget};
use crate::engine::retained::Retained;
use crate::telemetry::trace::RequestTrace;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use wasmtime::ResourceLimiterAsync;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// Store data of one instance.
pub struct Host {
    table: ResourceTable,
    /// wasi:config/store variables (shared by every instance of a pool).
    pub(crate) config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundPolicy,
    pub(crate) limits: GuestLimits,
}

impl Host {
    pub fn new(
        knobs: &Knobs,
        policy: Arc<[OutboundRule]>,
        instance_id: u64,
        budget: Arc<MemoryBudget>,
        retained: Arc<Retained>,
        config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
    ) -> Host {
        let mut b = WasiCtxBuilder::new();
        // Nothing is granted: no preopened directories, no sockets, no name
        // lookups, no inherited environment or stdin.
        b.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        b.socket_addr_check(|_, _| Box::pin(async { false }));
        b.envs(&knobs.env);
        // Only the directories the knobs name; read-only unless asked.
        for d in &knobs.dirs {
            let perms = if d.writable {
                wasmtime_wasi::FsPerms::ReadWrite
            } else {
                wasmtime_wasi::FsPerms::ReadOnly
            };
            if let Err(e) = b.preopened_dir(&d.host, &d.guest, perms) {
                // Checked at start-up; it may have gone since.
                tracing::warn!(
                    instance = instance_id,
                    "cannot open {}: {e:#}",
                    d.host.display()
                );
            }
        }
        b.stdout(GuestLog::new(instance_id, Stream::Stdout));
        b.stderr(GuestLog::new(instance_id, Stream::Stderr));
        budget.holder(true);
        let limits = GuestLimits {
            max_memory_size: knobs.max_memory_size as usize,
            id: instance_id,
            grow_wait: knobs.max_queue_wait,
            held: Held::new(budget),
            retained,
        };
        Host {
            table: ResourceTable::new(),
            config,
            wasi: b.build(),
            http: WasiHttpCtx::new(),
            hooks: OutboundPolicy {
                rules: policy,
                traces: Vec::new(),
            },
            limits,
        }
    }
}

/// The store's resource limiter: no linear memory larger than
/// `max-memory-size`, and every byte of linear memory (and the fiber
/// stack) taken from the process's [`MemoryBudget`] (given back when the
/// store is dropped).
pub(crate) struct GuestLimits {
    max_memory_size: usize,
    /// The instance's id (older instances have smaller ones).
    id: u64,
    /// How long a growth waits for memory when the budget is spent.
    grow_wait: Duration,
    /// A growth approved here that then fails (the OS refused the pages)
    /// stays counted until the store is dropped: rare, and on the safe side.
    held: Held,
    /// What the idle slots of the pool's engine keep (see `retained`).
    retained: Arc<Retained>,
}

impl GuestLimits {
    /// Bytes of the budget this store holds (its linear memories and its
    /// stack).
    pub fn memory(&self) -> u64 {
        self.held.bytes()
    }

    /// Counts the instance's fiber stack (`create` checked there is room).
    pub fn count_stack(&mut self, bytes: u64) {
        self.held.force_grow(bytes);
    }
}

impl Drop for GuestLimits {
    fn drop(&mut self) {
        let budget = self.held.budget();
        budget.saw_peak(self.held.peak());
        budget.holder(false);
    }
}

#[async_trait::async_trait]
impl ResourceLimiterAsync for GuestLimits {
    async fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_size || maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        if current == 0 {
            // A memory being created: the slot it is in has left the idle
            // ones, and what it kept is this memory's now.
            self.retained.sync();
        }
        let more = desired.saturating_sub(current) as u64;
        if self.held.grow(more) {
            return Ok(true);
        }
        let budget = self.held.budget();
        let why = format!(
            "memory budget spent: {} of {} in use, {} more asked",
            crate::units::format_size(budget.used()),
            crate::units::format_size(budget.limit()),
            crate::units::format_size(more)
        );
        if current == 0 {
            // A memory being created: the instance cannot start.
            return Err(wasmtime::format_err!("{why}"));
        }
        // Others may give memory back (see `budget`).
        let budget = std::sync::Arc::clone(self.held.budget_arc());
        let held = &mut self.held;
        if budget
            .wait_to_grow(self.id, self.grow_wait, || held.grow(more))
            .await
        {
            return Ok(true);
        }
        tracing::debug!(instance = self.id, "memory.grow refused: {why}");
        Ok(false)
    }

    async fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|m| desired <= m))
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

impl Host {
    /// A traced request runs on this instance now.
    pub(crate) fn trace_begin(&mut self, trace: Arc<RequestTrace>) {
        self.hooks.traces.push(trace);
    }

    /// The traced request is done here.
    pub(crate) fn trace_end(&mut self, trace: &Arc<RequestTrace>) {
        self.hooks.traces.retain(|t| !Arc::ptr_eq(t, trace));
    }

    /// No request runs here any more.
    pub(crate) fn trace_clear(&mut self) {
        self.hooks.traces.clear();
    }
}

/// Refuses outgoing HTTP requests unless `allow-outbound` lists the host,
/// and carries the trace context to the ones it lets through.
struct OutboundPolicy {
    rules: Arc<[OutboundRule]>,
    /// The traced requests running on this instance. With exactly one, an
    /// outbound request is its own (with several, concurrently on one
    /// instance, the host cannot tell whose it is: the guest carries the
    /// `traceparent` it was given itself).
    traces: Vec<Arc<RequestTrace>>,
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
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
        let span = match self.traces.as_slice() {
            [one] => one.outbound(&mut request),
            _ => None,
        };
        Box::new(async move {
            use http_body_util::BodyExt;
            let sent = wasmtime_wasi_http::default_send_request(request, options).await;
            if let Some(span) = span {
                span.end(match &sent {
                    Ok((res, _)) => Ok(res.status().as_u16()),
                    Err(e) => Err(format!("{e:?}")),
                });
            }
            let (res, io) = sent?;
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
