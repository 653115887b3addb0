//! The access log: one line per request, formatted by the thread that
//! served it into that thread's buffer and written in batches, like
//! nginx's `access_log ... buffer= flush=`.
//!
//! An access line has twelve fields and is written for every request, so
//! neither `tracing-subscriber`'s formatter (a visitor per field, escaping,
//! a date per line: 7 to 12% of a small guest's requests/s) nor a `write`
//! per line (another 13% on p3 hello) is affordable. Lines are formatted
//! here byte for byte in the shape the process log uses (human, journal or
//! JSON; see [`crate::telemetry::logging::init`]), appended to a buffer of
//! the calling thread, and written with one `write` when the buffer holds
//! `access-log-buffer` bytes, every `access-log-flush`, and at [`flush`]
//! (the end of a drain). Every batch is whole lines, under one lock, so
//! lines never mix.
//!
//! Lines go to stderr (the journal under systemd) or to a file opened for
//! appending, reopened by [`reopen`] (SIGUSR1) after logrotate moved it.
//! When stderr is a coloured terminal, or when the library runs inside a
//! host's own subscriber, stderr lines go through `tracing` instead, one at
//! a time.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::trace::SpanContext;
use super::trace::context::hex;

/// The shape of the lines `logging::init` set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `2026-12-01T07:28:21.885528Z  INFO access: client=... method=...`
    Human,
    /// `<6>access: client=... method=...` (journald adds the time).
    Journal,
    /// One JSON object per line, as `tracing-subscriber`'s JSON format.
    Json,
}

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard error (the journal under systemd).
    Stderr,
    /// A file, appended to; its directory must exist.
    File(PathBuf),
}

/// Where and how lines are written: the `access-log`, `access-log-buffer`
/// and `access-log-flush` knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub destination: Destination,
    /// Bytes a thread gathers before it writes them; 0 writes every line
    /// at once.
    pub buffer: usize,
    /// The longest a line waits in a buffer.
    pub flush: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            destination: Destination::Stderr,
            buffer: DEFAULT_BUFFER,
            flush: DEFAULT_FLUSH,
        }
    }
}

/// 64 KiB: a few hundred lines, one `write` each few milliseconds at tens
/// of thousands of requests per second.
pub const DEFAULT_BUFFER: usize = 64 << 10;
/// 1 s: `tail -f` and the journal stay close to live.
pub const DEFAULT_FLUSH: Duration = Duration::from_secs(1);

/// The output, opened but not yet in use (see [`open`], [`install`]): a
/// reload opens the new file first and changes nothing when that fails.
#[derive(Debug)]
pub struct Opened {
    settings: Settings,
    output: Output,
}

#[derive(Debug)]
enum Output {
    Stderr,
    File { path: PathBuf, file: File },
}

impl Output {
    fn write(&mut self, bytes: &[u8]) {
        let r = match self {
            Output::Stderr => std::io::stderr().lock().write_all(bytes),
            Output::File { file, .. } => file.write_all(bytes),
        };
        match r {
            Ok(()) => {}
            Err(e) => {
                LOST.fetch_add(
                    bytes.iter().filter(|&&b| b == b'\n').count() as u64,
                    Relaxed,
                );
                if !WARNED.swap(true, Relaxed) {
                    let to = match self {
                        Output::Stderr => "stderr".to_string(),
                        Output::File { path, .. } => path.display().to_string(),
                    };
                    tracing::warn!(
                        "access log: cannot write to {to}: {e}; lines are lost until it can"
                    );
                }
            }
        }
    }
}

/// Opens `settings.destination` for appending (creating the file).
pub fn open(settings: &Settings) -> Result<Opened, AccessLogError> {
    let output = match &settings.destination {
        Destination::Stderr => Output::Stderr,
        Destination::File(path) => Output::File {
            path: path.clone(),
            file: open_file(path)?,
        },
    };
    Ok(Opened {
        settings: settings.clone(),
        output,
    })
}

/// The access log file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("access-log: cannot open {}: {io}", path.display())]
pub struct AccessLogError {
    pub path: PathBuf,
    pub io: std::io::Error,
}

fn open_file(path: &Path) -> Result<File, AccessLogError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(|io| AccessLogError {
            path: path.to_path_buf(),
            io,
        })
}

/// Lines are written to `opened` from now on; what threads hold goes to
/// the previous output first.
pub fn install(opened: Opened) {
    flush();
    let Opened { settings, output } = opened;
    TO_FILE.store(matches!(output, Output::File { .. }), Relaxed);
    BUFFER.store(settings.buffer, Relaxed);
    FLUSH_MS.store(settings.flush.as_millis().max(1) as u64, Relaxed);
    *OUT.lock().unwrap_or_else(PoisonError::into_inner) = output;
    WARNED.store(false, Relaxed);
    if settings.buffer > 0 {
        let flusher = FLUSHER.get_or_init(|| {
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(|| {
                    loop {
                        std::thread::park_timeout(Duration::from_millis(FLUSH_MS.load(Relaxed)));
                        flush();
                    }
                })
                .ok()
                .map(|t| t.thread().clone())
        });
        // A new interval counts from now.
        if let Some(t) = flusher {
            t.unpark();
        }
    }
}

/// Reopens the access log file under its name (after logrotate moved it);
/// on an error the old file stays in use. Nothing to do for stderr.
pub fn reopen() -> Result<(), AccessLogError> {
    flush();
    let mut out = OUT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Output::File { path, file } = &mut *out {
        *file = open_file(path)?;
        WARNED.store(false, Relaxed);
    }
    Ok(())
}

/// Writes what every thread's buffer holds.
pub fn flush() {
    let buffers: Vec<Arc<Mutex<Vec<u8>>>> = BUFFERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for b in &buffers {
        write_out(&mut b.lock().unwrap_or_else(PoisonError::into_inner));
    }
    drop(buffers);
    // Buffers of threads that ended, once written.
    BUFFERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|b| Arc::strong_count(b) > 1 || !b.lock().map(|b| b.is_empty()).unwrap_or(true));
}

/// Writes a thread's batch (whole lines) to the output and empties it. The
/// caller holds the batch's lock, taken before the output's: a thread's
/// batches reach the output in order.
fn write_out(batch: &mut Vec<u8>) {
    if !batch.is_empty() {
        OUT.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(batch);
        batch.clear();
    }
}

/// Lines that could not be written (the output failed).
pub fn lost_lines() -> u64 {
    LOST.load(Relaxed)
}

/// Whether lines go to a file (then they do not depend on the log filter).
pub fn to_file() -> bool {
    TO_FILE.load(Relaxed)
}

static SHAPE: OnceLock<Shape> = OnceLock::new();
static TO_FILE: AtomicBool = AtomicBool::new(false);
static BUFFER: AtomicUsize = AtomicUsize::new(0);
static FLUSH_MS: AtomicU64 = AtomicU64::new(1000);
static OUT: Mutex<Output> = Mutex::new(Output::Stderr);
static BUFFERS: Mutex<Vec<Arc<Mutex<Vec<u8>>>>> = Mutex::new(Vec::new());
static FLUSHER: OnceLock<Option<std::thread::Thread>> = OnceLock::new();
static WARNED: AtomicBool = AtomicBool::new(false);
static LOST: AtomicU64 = AtomicU64::new(0);

/// Stderr lines are written here from now on, in `shape` (files get
/// `Human` or `Json` as `shape` says). Called once, by the code that
/// installed the matching subscriber.
pub fn install_shape(shape: Shape) {
    let _ = SHAPE.set(shape);
}

/// One request's line.
pub struct Line<'a> {
    /// The client's address; `None` for a peer on a unix socket.
    pub client: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub target: &'a str,
    pub version: http::Version,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// From the request's head to the end of its response.
    pub duration_us: u64,
    /// -1 when no instance answered.
    pub instance: i64,
    pub reused: bool,
    pub complete: bool,
    /// The request's trace context, when it has one.
    pub trace: Option<&'a SpanContext>,
}

/// A thread's text buffers and its batch.
struct Local {
    line: String,
    client: String,
    batch: Option<Arc<Mutex<Vec<u8>>>>,
}

thread_local! {
    static LOCAL: RefCell<Local> = const {
        RefCell::new(Local { line: String::new(), client: String::new(), batch: None })
    };
}

/// Writes `line` if this module owns the output; `false` means the caller
/// logs it through `tracing`.
pub fn write(line: &Line<'_>) -> bool {
    let shape = if TO_FILE.load(Relaxed) {
        match SHAPE.get() {
            Some(Shape::Json) => Shape::Json,
            _ => Shape::Human,
        }
    } else {
        match SHAPE.get() {
            Some(&s) => s,
            None => return false,
        }
    };
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        let Local {
            line: out,
            client,
            batch,
        } = &mut *l;
        out.clear();
        client.clear();
        ip(client, line.client);
        // What tracing-subscriber would escape: none of it comes from a
        // parsed request, but a line must never carry a terminal escape.
        if [client.as_str(), line.method, line.target]
            .iter()
            .any(|s| s.bytes().any(|c| c < 0x20 || c == 0x7f))
        {
            return TO_FILE.load(Relaxed);
        }
        match shape {
            Shape::Human => {
                now(out);
                out.push_str("  INFO access: ");
                fields(out, client, line);
            }
            Shape::Journal => {
                out.push_str("<6>access: ");
                fields(out, client, line);
            }
            Shape::Json => json(out, client, line),
        }
        out.push('\n');
        let cap = BUFFER.load(Relaxed);
        if cap == 0 {
            OUT.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(out.as_bytes());
            return true;
        }
        let batch = batch.get_or_insert_with(|| {
            let b = Arc::new(Mutex::new(Vec::with_capacity(cap)));
            BUFFERS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(b.clone());
            b
        });
        let mut b = batch.lock().unwrap_or_else(PoisonError::into_inner);
        b.extend_from_slice(out.as_bytes());
        if b.len() >= cap {
            write_out(&mut b);
        }
        true
    })
}

fn version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

// A line is formatted for every request: pieces are pushed as they are,
// integers through `itoa`; no `fmt` machinery (a `write!` of the twelve
// fields cost as much as the rest of the line's work together).

fn int(out: &mut String, v: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(v));
}

fn boolean(out: &mut String, v: bool) {
    out.push_str(if v { "true" } else { "false" });
}

/// Microseconds as milliseconds, the way `{:?}` prints the `f64`
/// `us / 1000` (`0.852`, `12.5`, `3.0`).
fn millis(out: &mut String, us: u64) {
    int(out, us / 1000);
    out.push('.');
    let frac = us % 1000;
    if frac == 0 {
        out.push('0');
        return;
    }
    let digits = [frac / 100, frac / 10 % 10, frac % 10];
    // Trailing zeros are not written.
    let n = if !frac.is_multiple_of(10) {
        3
    } else if !frac.is_multiple_of(100) {
        2
    } else {
        1
    };
    for d in &digits[..n] {
        out.push(char::from(b'0' + *d as u8));
    }
}

/// The client's address as `IpAddr` displays it (`unix` for none).
fn ip(out: &mut String, ip: Option<std::net::IpAddr>) {
    match ip {
        Some(std::net::IpAddr::V4(a)) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                int(out, o);
            }
        }
        Some(a) => {
            let _ = write!(out, "{a}");
        }
        None => out.push_str("unix"),
    }
}

/// `name=value` pairs, as `DefaultFields` writes them.
fn fields(out: &mut String, client: &str, l: &Line<'_>) {
    for (name, value) in [
        ("client=", client),
        (" method=", l.method),
        (" target=", l.target),
        (" version=", version(l.version)),
    ] {
        out.push_str(name);
        out.push_str(value);
    }
    numbers(out, l, false);
}

fn json(out: &mut String, client: &str, l: &Line<'_>) {
    out.push_str("{\"timestamp\":\"");
    now(out);
    out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":\"");
    out.push_str(client);
    out.push(' ');
    json_str(out, l.method);
    out.push(' ');
    json_str(out, l.target);
    out.push(' ');
    int(out, l.status);
    out.push_str("\",\"client\":\"");
    out.push_str(client);
    out.push_str("\",\"method\":\"");
    json_str(out, l.method);
    out.push_str("\",\"target\":\"");
    json_str(out, l.target);
    out.push_str("\",\"version\":\"");
    out.push_str(version(l.version));
    out.push('"');
    numbers(out, l, true);
    out.push_str("},\"target\":\"access\"}");
}

/// The fields after the request's strings, in both shapes: ` name=value`,
/// or `,"name":value` (the ids as JSON strings).
fn numbers(out: &mut String, l: &Line<'_>, json: bool) {
    let key = |out: &mut String, name: &str| {
        out.push_str(if json { ",\"" } else { " " });
        out.push_str(name);
        out.push_str(if json { "\":" } else { "=" });
    };
    key(out, "status");
    int(out, l.status);
    key(out, "bytes_in");
    int(out, l.bytes_in);
    key(out, "bytes_out");
    int(out, l.bytes_out);
    key(out, "duration_ms");
    millis(out, l.duration_us);
    key(out, "instance");
    int(out, l.instance);
    key(out, "reused");
    boolean(out, l.reused);
    key(out, "complete");
    boolean(out, l.complete);
    if let Some(t) = l.trace {
        let quote = if json { "\"" } else { "" };
        for (name, id) in [("trace_id", &t.trace_id[..]), ("span_id", &t.span_id[..])] {
            key(out, name);
            out.push_str(quote);
            hex(out, id);
            out.push_str(quote);
        }
    }
}

/// The inside of a JSON string (control characters were refused before).
fn json_str(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
}

/// `2026-12-01T07:28:21.885528Z`, as `tracing-subscriber`'s default timer.
fn now(out: &mut String) {
    stamp(SystemTime::now(), out);
}

thread_local! {
    /// The second last formatted on this thread, and its text up to the
    /// fraction: a line then costs only its microseconds.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn stamp(t: SystemTime, out: &mut String) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with(|s| {
        let mut s = s.borrow_mut();
        if s.0 != d.as_secs() {
            let (secs, text) = &mut *s;
            text.clear();
            let whole = UNIX_EPOCH + Duration::from_secs(d.as_secs());
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            text.pop(); // the `Z`
            text.push('.');
            *secs = d.as_secs();
        }
        out.push_str(&s.1);
    });
    let mut us = d.subsec_micros();
    let mut digits = [b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = b'0' + (us % 10) as u8;
        us /= 10;
    }
    out.push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
    out.push('Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(client: &str, target: &'a str) -> Line<'a> {
        Line {
            client: Some(client.parse().unwrap()),
            method: "POST",
            target,
            version: http::Version::HTTP_11,
            status: 200,
            bytes_in: 5,
            bytes_out: 123,
            duration_us: 852,
            instance: 1,
            reused: false,
            complete: true,
            trace: None,
        }
    }

    #[test]
    fn fields_as_tracing_writes_them() {
        let mut out = String::new();
        fields(&mut out, "127.0.0.1", &line("127.0.0.1", "/echo?q=1"));
        assert_eq!(
            out,
            "client=127.0.0.1 method=POST target=/echo?q=1 \
             version=HTTP/1.1 status=200 bytes_in=5 bytes_out=123 duration_ms=0.852 instance=1 \
             reused=false complete=true"
        );
    }

    #[test]
    fn durations_as_the_f64_debug_format_writes_them() {
        for us in (0..3000).chain([10_000, 10_010, 123_456_789, 999_999_999_999]) {
            let mut out = String::new();
            millis(&mut out, us);
            assert_eq!(out, format!("{:?}", us as f64 / 1e3), "{us}");
        }
    }

    #[test]
    fn addresses_as_ipaddr_displays_them() {
        for a in ["127.0.0.1", "0.0.0.0", "255.10.0.9", "::1", "2001:db8::7"] {
            let mut out = String::new();
            ip(&mut out, Some(a.parse().unwrap()));
            assert_eq!(out, a);
        }
        let mut out = String::new();
        ip(&mut out, None);
        assert_eq!(out, "unix");
    }

    #[test]
    fn json_is_json() {
        let mut out = String::new();
        json(&mut out, "::1", &line("::1", "/a\"b\\c?x=\u{e9}"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        let f = &v["fields"];
        assert_eq!(f["target"], "/a\"b\\c?x=\u{e9}");
        assert_eq!(f["message"], "::1 POST /a\"b\\c?x=\u{e9} 200");
        assert_eq!(f["status"], 200);
        assert_eq!(f["duration_ms"], 0.852);
        assert_eq!(f["instance"], 1);
        assert_eq!(f["complete"], true);
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert!(f.get("trace_id").is_none());
    }

    #[test]
    fn the_time_is_as_the_default_timer_writes_it() {
        for t in [
            UNIX_EPOCH + Duration::from_micros(1_796_000_000_123_456),
            UNIX_EPOCH + Duration::from_micros(1_796_000_000_999_999),
            UNIX_EPOCH + Duration::from_micros(1_796_000_001_000_001),
            UNIX_EPOCH + Duration::from_micros(1_796_000_001_000_002),
        ] {
            let mut out = String::new();
            stamp(t, &mut out);
            assert_eq!(out, humantime::format_rfc3339_micros(t).to_string());
        }
    }

    #[test]
    fn a_trace_adds_its_ids_in_both_shapes() {
        let ctx = SpanContext {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            flags: 1,
        };
        let mut l = line("::1", "/");
        l.trace = Some(&ctx);
        let mut out = String::new();
        json(&mut out, "::1", &l);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["fields"]["trace_id"], "ab".repeat(16));
        assert_eq!(v["fields"]["span_id"], "01".repeat(8));
        let mut out = String::new();
        fields(&mut out, "::1", &l);
        assert!(
            out.ends_with(&format!(
                " trace_id={} span_id={}",
                "ab".repeat(16),
                "01".repeat(8)
            )),
            "{out}"
        );
    }
}
