//! Loading a component: the engine configuration derived from the knobs,
//! the linker with the full WASIp2 and WASIp3 interfaces, world detection,
//! and compilation through the compile cache.

use crate::config::Knobs;
use crate::engine::cache::{
    CacheOutcome, CompileCache, Lookup, Remembered, SourceStamp, read_source,
};
use crate::engine::host::Host;
use crate::error::LoadError;
use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::handler::ProxyPre;

/// The `wasi:http` world a component implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum World {
    /// Exports `wasi:http/incoming-handler@0.2.x`; `export` is the exact name.
    P2 { export: String },
    /// Exports `wasi:http/handler@0.3.0`.
    P3,
}

impl World {
    pub fn is_p3(&self) -> bool {
        matches!(self, World::P3)
    }
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            World::P2 { export } => write!(f, "WASIp2 ({export})"),
            World::P3 => write!(f, "WASIp3 (wasi:http/handler@0.3.0)"),
        }
    }
}

/// Where a component comes from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Bytes { name: String, bytes: Vec<u8> },
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Bytes { name, .. } => name.clone(),
        }
    }
}

/// How often the epoch advances. A busy guest yields to the scheduler at
/// each tick, which is what lets request timeouts fire while it spins.
pub const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Most bytes of each table kept resident (tables are small; the memory
/// knob sets this up to here).
const TABLE_KEEP_RESIDENT: usize = 256 << 10;

/// Idle instance slots the pooling allocator keeps warm.
const WARM_SLOTS: u32 = 64;

/// The fewest warm slots the automatic setting keeps.
const MIN_AUTO_WARM_SLOTS: u32 = 4;

/// Automatic `memory-keep-resident`: what each slot keeps of its memory.
/// Interpreter guests (componentize-py, -js) start from a 10-40 MiB image
/// and touch pages all over it; a fresh instance in a slot that keeps them
/// takes no page fault for them.
const AUTO_KEEP_RESIDENT: u64 = 16 << 20;

/// Most bytes all idle slots together keep resident under the automatic
/// setting (and at most an eighth of the memory limit or budget).
const AUTO_WARM_TOTAL: u64 = 256 << 20;

/// Bytes of fiber stack kept resident (zeroed in place) when a stack goes
/// back to the pool; the rest is released, so stacks that a deep guest
/// touched do not stay resident for good.
const STACK_KEEP_RESIDENT: usize = 64 << 10;

/// The fiber stack of each instance (wasmtime's default).
pub const STACK_SIZE: u64 = 2 << 20;

/// How idle instance slots stay warm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmSlots {
    /// Bytes of each slot's linear memory kept resident.
    pub keep: u64,
    /// Idle slots kept for their component.
    pub count: u32,
}

impl WarmSlots {
    /// The most memory idle slots keep resident.
    pub fn bytes(&self) -> u64 {
        self.count as u64 * self.keep
    }
}

/// How idle slots stay warm under the knobs. With `memory-keep-resident`
/// set, each keeps that much. Without it, each keeps up to
/// [`AUTO_KEEP_RESIDENT`] of each memory, and fewer slots are kept warm
/// when that would pass the memory total; [`resets_written_pages_only`]
/// says which pages of that a slot keeps.
pub fn warm_slots(knobs: &Knobs) -> WarmSlots {
    match knobs.memory_keep_resident {
        Some(keep) => WarmSlots {
            keep: keep.min(knobs.max_memory_size),
            count: WARM_SLOTS,
        },
        None => {
            let limit = match knobs.memory_budget {
                crate::config::MemoryBudgetArg::Bytes(b) => b,
                crate::config::MemoryBudgetArg::Auto => crate::engine::budget::detect_limit().bytes,
            };
            auto_warm_slots(knobs.max_memory_size, limit)
        }
    }
}

/// Whether a slot resets only the pages its instance wrote (found with the
/// kernel's `PAGEMAP_SCAN`; pages only read stay mapped as they are), or
/// the first `keep` bytes of each memory whole, by copying the image back
/// and zeroing the rest. Either way the next instance in the slot takes no
/// page fault in what was kept.
///
/// The scan is the cheaper reset while it sees everything: a compiled
/// guest writes to a few places (its stack, heap and data), and copying
/// all of its 1 MiB memory back would cost more (p2 hello with a 1.1 MiB
/// memory, fresh instance per request: 136 µs of server CPU per request
/// with the scan, 168 µs copying). But wasmtime's scan reports at most 32
/// separate regions and releases everything after the 32nd; an interpreter
/// (componentize-py, -js) writes all over a heap it starts with, so most
/// of it was released and faulted in again by every fresh instance
/// (componentize-py p2: 182 requests/s with the scan, 325 copying 16 MiB,
/// in one interleaved run). An initial memory of [`COPY_FROM`] or more is
/// such a heap. A memory size not known (`None`) gets the scan.
///
/// Every slot an instance ever used keeps what it copied (wasmtime's
/// warm-slot count only orders the slots it picks), so after a burst that
/// is up to `keep` per instance the burst had: [`super::retained`] counts
/// it in the memory budget.
pub fn resets_written_pages_only(knobs: &Knobs, largest_memory: Option<u64>) -> bool {
    knobs.memory_keep_resident.is_none() && largest_memory.is_none_or(|m| m < COPY_FROM)
}

/// Initial memories this large are an interpreter's heap, reset by copying
/// (see [`resets_written_pages_only`]). Compiled guests start with 1-2 MiB
/// (a Rust guest has 1 MiB of stack); componentize-py and -js start with
/// 10-40 MiB.
pub const COPY_FROM: u64 = 4 << 20;

/// The largest initial linear memory, in bytes, that a core module of
/// `bytes` (a component or a module) defines; `None` if they do not parse.
pub fn largest_initial_memory(bytes: &[u8]) -> Option<u64> {
    let mut largest = 0u64;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let wasmparser::Payload::MemorySection(memories) = payload.ok()? {
            for memory in memories {
                let memory = memory.ok()?;
                let page = 1u64.checked_shl(memory.page_size_log2.unwrap_or(16))?;
                largest = largest.max(memory.initial.saturating_mul(page));
            }
        }
    }
    Some(largest)
}

/// The automatic setting for guests of at most `max_memory` bytes, in a
/// process that may use `limit` bytes.
fn auto_warm_slots(max_memory: u64, limit: u64) -> WarmSlots {
    const PAGE: u64 = 4096;
    let total = AUTO_WARM_TOTAL.min(limit / 8);
    let keep = AUTO_KEEP_RESIDENT.min(max_memory);
    let count = (total / keep.max(1)).clamp(MIN_AUTO_WARM_SLOTS as u64, WARM_SLOTS as u64) as u32;
    let keep = keep.min(total / count as u64) / PAGE * PAGE;
    WarmSlots { keep, count }
}

/// Instances the pooling allocator has room for, given the knobs: every
/// admitted request may need one, and instances that are idle (kept for
/// reuse), finishing a response body or being torn down after a timeout
/// need room too.
pub fn pool_slots(knobs: &Knobs) -> u32 {
    knobs
        .max_concurrent_requests
        .saturating_mul(2)
        .clamp(16, 100_000)
}

/// What each linear memory reserves of the address space when code is to
/// need no bounds checks: 4 GiB, the whole range a 32-bit address can
/// reach, so an access past the end lands in unmapped space and faults.
/// Code compiled for less checks every load and store against the
/// memory's length: the Hono guest served 1,431 requests/s so and 1,655
/// without the checks (one interleaved run, reuse 64).
pub(crate) const WIDE_RESERVATION: u64 = 4 << 30;

/// The guard wasmtime places after each memory (its default on 64-bit
/// hosts): loads and stores whose constant offset fits in it need no
/// check either.
const GUARD: u64 = 32 << 20;

/// Address space (not memory: nothing is mapped until an instance uses
/// it) that the engines of one process may reserve for memories of
/// [`WIDE_RESERVATION`]. The default 2,000 instance slots take 16 TiB of
/// the 128 TiB an x86-64 process has; pools past this share (a service
/// with many components, a reload's second pool, many C handlers) reserve
/// only `max-memory-size` per memory and compile bounds checks, so the
/// rest of the process keeps its room.
const WIDE_RESERVATION_BUDGET: u64 = 96 << 40;

/// Address space reserved for wide memories, by all engines of the process.
static WIDE_RESERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A share of [`WIDE_RESERVATION_BUDGET`], given back when dropped.
#[derive(Debug)]
pub struct WideClaim(u64);

impl WideClaim {
    /// Takes `bytes` of the budget, if that much is left.
    fn take(bytes: u64) -> Option<WideClaim> {
        use std::sync::atomic::Ordering::Relaxed;
        WIDE_RESERVED
            .fetch_update(Relaxed, Relaxed, |held| {
                held.checked_add(bytes)
                    .filter(|total| *total <= WIDE_RESERVATION_BUDGET)
            })
            .ok()
            .map(|_| WideClaim(bytes))
    }
}

impl Drop for WideClaim {
    fn drop(&mut self) {
        WIDE_RESERVED.fetch_sub(self.0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An engine, and its share of the wide-reservation budget (kept as long
/// as the engine's pool is).
pub struct PoolEngine {
    pub engine: Engine,
    /// `None` when memories reserve only `max-memory-size`.
    pub wide: Option<WideClaim>,
}

impl std::ops::Deref for PoolEngine {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// The engine for a set of knobs. Its configuration is part of the compile
/// cache key, so everything here that affects code generation changes the
/// key (including whether memories were reserved wide).
///
/// Memories are reserved at [`WIDE_RESERVATION`] when the process's budget
/// has room and the reservation succeeds (it fails under `ulimit -v`, or on
/// a host with a smaller address space); otherwise at `max-memory-size`.
/// Either way no memory grows past `max-memory-size`.
///
/// `largest_memory` is the component's largest initial memory (see
/// [`resets_written_pages_only`]).
pub fn engine(knobs: &Knobs, largest_memory: Option<u64>) -> Result<PoolEngine, LoadError> {
    let scan = resets_written_pages_only(knobs, largest_memory);
    let memories = pool_slots(knobs) as u64 * MEMORIES_PER_SLOT as u64;
    if knobs.max_memory_size < WIDE_RESERVATION
        && let Some(claim) = WideClaim::take(memories * (WIDE_RESERVATION + GUARD))
    {
        match engine_with(knobs, WIDE_RESERVATION, scan) {
            Ok(engine) => {
                return Ok(PoolEngine {
                    engine,
                    wide: Some(claim),
                });
            }
            Err(e) => tracing::info!(
                "memories reserve max-memory-size only, and compiled code checks bounds: {e}"
            ),
        }
    }
    engine_with(knobs, knobs.max_memory_size, scan).map(|engine| PoolEngine { engine, wide: None })
}

/// Linear memories the pool has room for per instance slot.
const MEMORIES_PER_SLOT: u32 = 2;

fn engine_with(knobs: &Knobs, reservation: u64, scan: bool) -> Result<Engine, LoadError> {
    let slots = pool_slots(knobs);
    let warm = warm_slots(knobs);
    let keep = warm.keep as usize;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(16))
        .total_memories(slots.saturating_mul(MEMORIES_PER_SLOT))
        .total_tables(slots.saturating_mul(4))
        // A stack is held while guest code is suspended mid-call: at most
        // one per admitted request, plus one per instantiation or call
        // still finishing after its response. Each costs a guard-page
        // mprotect at start-up (4,000 of them were 9 ms of a 15 ms cold
        // start), so no more than the slots.
        .total_stacks(slots)
        .max_memories_per_component(16)
        .max_memory_size(knobs.max_memory_size as usize)
        .max_unused_warm_slots(warm.count)
        .async_stack_keep_resident(STACK_KEEP_RESIDENT)
        // Resetting a small memory in place when its instance ends is much
        // cheaper than madvise and the page faults the next instance in
        // the slot then takes (p2 hello with a fresh instance per request:
        // twice the requests/s with the first 64KiB kept).
        .linear_memory_keep_resident(keep)
        .table_keep_resident(keep.min(TABLE_KEEP_RESIDENT));
    if scan {
        pool.pagemap_scan(wasmtime::Enabled::Auto);
    }

    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true)
        .wasm_component_model_async(true)
        .wasm_component_model_more_async_builtins(true)
        .wasm_component_model_async_stackful(true)
        .wasm_component_model_error_context(true)
        .epoch_interruption(true)
        .async_stack_size(STACK_SIZE as usize)
        .async_stack_zeroing(true)
        // Linear memories never grow past `max-memory-size` (the pool's
        // limit above); what they reserve decides whether code checks
        // bounds (see `engine`).
        .memory_reservation(reservation)
        .memory_guard_size(GUARD)
        .memory_reservation_for_growth(0)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&c).map_err(|e| LoadError::Engine(format!("{e:#}")))
}

/// A linker with every WASIp2 and WASIp3 interface (so that components from
/// componentize-py or componentize-js link without flags) and
/// `wasi:config/store`; the host state decides what those interfaces may
/// actually do.
pub fn linker(engine: &Engine) -> Result<Linker<Host>, LoadError> {
    let mut l = Linker::new(engine);
    let r: wasmtime::Result<()> = (|| {
        wasmtime_wasi::p2::add_to_linker_async(&mut l)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut l)?;
        wasmtime_wasi::p3::add_to_linker(&mut l)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut l)?;
        wasmtime_wasi_config::add_to_linker(&mut l, |h: &mut Host| {
            wasmtime_wasi_config::WasiConfig::from(&*h.config)
        })?;
        Ok(())
    })();
    r.map_err(|e| LoadError::Engine(format!("linker: {e:#}")))?;
    Ok(l)
}

/// Returns freed heap memory to the operating system.
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Refuses what is plainly not a component before handing it to the
/// compiler, so the message names the actual problem.
fn sniff(what: &str, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.starts_with(b"\0asm") {
        // Layer 0 with version 1 is a core module; components use layer 1.
        if bytes.len() >= 8 && bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule(what.to_string()));
        }
        return Ok(());
    }
    // Allow the text format (handy in tests and examples).
    let text = std::str::from_utf8(&bytes[..bytes.len().min(4096)]).unwrap_or("");
    if text.trim_start().starts_with('(') || text.trim_start().starts_with(";;") {
        let trimmed = text.trim_start().trim_start_matches('(').trim_start();
        if trimmed.starts_with("module") {
            return Err(LoadError::CoreModule(what.to_string()));
        }
        return Ok(());
    }
    Err(LoadError::NotWasm(what.to_string()))
}

/// Which `wasi:http` world `component` implements.
pub fn detect_world(
    engine: &Engine,
    what: &str,
    component: &Component,
) -> Result<World, LoadError> {
    let ty = component.component_type();
    let mut names = Vec::new();
    for (name, _) in ty.exports(engine) {
        if let Some(v) = name.strip_prefix("wasi:http/handler@") {
            if v == "0.3.0" {
                return Ok(World::P3);
            }
        } else if name.starts_with("wasi:http/incoming-handler@0.2.") {
            return Ok(World::P2 {
                export: name.to_string(),
            });
        }
        names.push(name.to_string());
    }
    Err(LoadError::WrongWorld {
        what: what.to_string(),
        exports: if names.is_empty() {
            "nothing".into()
        } else {
            names.join(", ")
        },
    })
}

/// A compiled, linked component ready to be instantiated.
pub struct Loaded {
    pub component: Component,
    pub world: World,
    pub pre: ProxyPre<Host>,
    pub cache: CacheOutcome,
    pub name: String,
}

/// What is known of a component before its engine exists (the engine's
/// memory set-up depends on it): the file's remembered hash, or its bytes.
pub struct Prepared<'a> {
    source: &'a Source,
    cache: Option<CompileCache>,
    /// The file's bytes and stamp, if they were read.
    read: Option<(Vec<u8>, Option<SourceStamp>)>,
    /// What the cache remembered of the file, if it was not read.
    remembered: Option<Remembered>,
    /// See [`largest_initial_memory`].
    pub largest_memory: Option<u64>,
}

/// Reads the component file at `path` (see [`read_source`]).
fn read_file(path: &std::path::Path) -> Result<(Vec<u8>, Option<SourceStamp>), LoadError> {
    read_source(path).map_err(|io| LoadError::Read {
        path: path.to_path_buf(),
        io,
    })
}

/// Finds the component's largest initial memory: from the compile cache's
/// record for a file it has seen unchanged (which is then not read), or
/// from its bytes.
pub fn prepare<'a>(knobs: &Knobs, source: &'a Source) -> Result<Prepared<'a>, LoadError> {
    let cache_dir = if knobs.no_cache {
        None
    } else {
        knobs
            .cache_dir
            .clone()
            .or_else(crate::engine::cache::default_dir)
    };
    let cache = cache_dir.map(|d| {
        CompileCache::new(d)
            .with_max_size(knobs.cache_max_size)
            .with_seed(knobs.cache_seed_dir.clone())
    });
    let mut prepared = Prepared {
        source,
        cache,
        read: None,
        remembered: None,
        largest_memory: None,
    };
    match source {
        Source::File(path) => {
            if let Some(r) = prepared.cache.as_ref().and_then(|c| c.remembered(path)) {
                prepared.remembered = Some(r);
                prepared.largest_memory = Some(r.largest_memory);
            } else {
                let read = read_file(path)?;
                prepared.largest_memory = largest_initial_memory(&read.0);
                prepared.read = Some(read);
            }
        }
        Source::Bytes { bytes, .. } => prepared.largest_memory = largest_initial_memory(bytes),
    }
    Ok(prepared)
}

/// Compiles (or loads from the cache), detects the world and links.
pub fn load(
    engine: &Engine,
    linker: &Linker<Host>,
    prepared: Prepared<'_>,
) -> Result<Loaded, LoadError> {
    let Prepared {
        source,
        cache,
        read,
        remembered,
        largest_memory,
    } = prepared;
    let name = source.describe();
    let compile_err = |e: wasmtime::Error| LoadError::Compile {
        what: name.clone(),
        reason: format!("{e:#}"),
    };
    // A file the cache has seen, unchanged since, is neither read nor hashed.
    let mut looked_up = None;
    if let (Some(r), Some(cache)) = (remembered, &cache) {
        match cache.lookup(engine, &r.digest) {
            Lookup::Hit(c) => return finish(engine, linker, name, c, CacheOutcome::Hit),
            other => looked_up = Some((r.digest, other)),
        }
    }
    // (A file is read here only when its remembered hash missed.)
    let (bytes, stamp) = match (source, read) {
        (_, Some((b, s))) => (Cow::Owned(b), s),
        (Source::File(p), None) => {
            let (b, s) = read_file(p)?;
            (Cow::Owned(b), s)
        }
        (Source::Bytes { bytes, .. }, None) => (Cow::Borrowed(&bytes[..]), None),
    };
    let bytes: &[u8] = &bytes;
    sniff(&name, bytes)?;
    let compile = || Component::new(engine, bytes);
    let (component, outcome) = match &cache {
        Some(cache) => {
            let digest = blake3::hash(bytes);
            // (A file remembered with these very bytes needs no new record.)
            let looked_up = looked_up.and_then(|(d, l)| (d == digest).then_some(l));
            if let (Source::File(path), Some(stamp), None, Some(largest_memory)) =
                (source, &stamp, &looked_up, largest_memory)
            {
                let what = Remembered {
                    digest,
                    largest_memory,
                };
                cache.remember(path, stamp, &what);
            }
            cache.load_or_compile(engine, &digest, looked_up, compile)
        }
        None => compile().map(|c| (c, CacheOutcome::Compiled)),
    }
    .map_err(compile_err)?;
    if outcome != CacheOutcome::Hit {
        // Compiling leaves hundreds of MB of freed heap behind; give it
        // back, or it counts against the service's memory limit for good.
        release_free_heap();
    }
    finish(engine, linker, name, component, outcome)
}

/// Links a loaded component.
fn finish(
    engine: &Engine,
    linker: &Linker<Host>,
    name: String,
    component: Component,
    cache: CacheOutcome,
) -> Result<Loaded, LoadError> {
    let world = detect_world(engine, &name, &component)?;
    let link_err = |e: wasmtime::Error| LoadError::Link {
        what: name.clone(),
        reason: format!("{e:#}"),
    };
    let pre = linker.instantiate_pre(&component).map_err(link_err)?;
    let pre = match world {
        World::P3 => {
            ProxyPre::P3(wasmtime_wasi_http::p3::bindings::ServicePre::new(pre).map_err(link_err)?)
        }
        World::P2 { .. } => {
            ProxyPre::P2(wasmtime_wasi_http::p2::bindings::ProxyPre::new(pre).map_err(link_err)?)
        }
    };
    Ok(Loaded {
        component,
        world,
        pre,
        cache,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_initial_memory_decides_how_slots_reset() {
        let module = |wat: &str| wat::parse_str(wat).unwrap();
        let largest = |wat: &str| largest_initial_memory(&module(wat));
        assert_eq!(largest("(module)"), Some(0));
        assert_eq!(largest("(module (memory 17))"), Some(17 << 16));
        // Several modules in a component: the largest memory counts, not
        // an imported one.
        let component = r#"(component
            (core module (memory 2))
            (core module (import "a" "m" (memory 900)) (memory 64 100))
            (core module (memory 1)))"#;
        assert_eq!(largest(component), Some(64 << 16));
        assert_eq!(largest_initial_memory(b"\0asm not really"), None);

        let auto = crate::config::KnobArgs::default().resolve().unwrap();
        assert!(resets_written_pages_only(&auto, Some(17 << 16)));
        assert!(resets_written_pages_only(&auto, None));
        assert!(!resets_written_pages_only(&auto, Some(COPY_FROM)));
        let set = crate::config::KnobArgs {
            memory_keep_resident: Some(1 << 20),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(!resets_written_pages_only(&set, Some(64 << 10)));
    }

    #[test]
    fn automatic_warm_slots_stay_within_the_memory_total() {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        // Plenty of memory: 16 MiB per slot, 256 MiB in all.
        let w = auto_warm_slots(128 * MIB, 24 * GIB);
        assert_eq!(
            w,
            WarmSlots {
                keep: 16 * MIB,
                count: 16
            }
        );
        // Small guests keep at most their maximum size, in more slots.
        let w = auto_warm_slots(2 * MIB, 24 * GIB);
        assert_eq!(
            w,
            WarmSlots {
                keep: 2 * MIB,
                count: WARM_SLOTS
            }
        );
        // A 256 MiB limit: an eighth of it, over at least 4 slots.
        let w = auto_warm_slots(128 * MIB, 256 * MIB);
        assert_eq!(
            w,
            WarmSlots {
                keep: 8 * MIB,
                count: 4
            }
        );
        assert!(w.bytes() <= 32 * MIB);
        // A tiny limit keeps little, never more than an eighth.
        let w = auto_warm_slots(128 * MIB, 64 * MIB);
        assert!(w.bytes() <= 8 * MIB && w.keep.is_multiple_of(4096), "{w:?}");
    }
}
