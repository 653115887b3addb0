//! Shared test support: guests built from WAT at test time, an in-process
//! server, and a small HTTP client.
#![allow(dead_code)]

pub mod otlp;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wasmpool::http::{Front, ListenAddr, Listener};
use wasmpool::{KnobArgs, Pool, Source};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds a component from a WAT core module and a world in one of the
/// WIT directories under tests/guests/wit (or any other directory).
pub fn build_component(wat: &Path, wit_dir: &Path, world: &str) -> Vec<u8> {
    let mut module = wat::parse_file(wat).unwrap_or_else(|e| panic!("{}: {e}", wat.display()));
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve
        .push_dir(wit_dir)
        .unwrap_or_else(|e| panic!("{}: {e:?}", wit_dir.display()));
    let world = resolve.select_world(&[pkg], Some(world)).expect("world");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("embed metadata");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("encoder accepts module")
        .validate(true)
        .encode()
        .unwrap_or_else(|e| panic!("{}: {e:?}", wat.display()))
}

/// The WASIp2 suite guest (see tests/guests/p2_suite.wat).
pub fn p2_suite() -> Vec<u8> {
    static CACHE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| {
            build_component(
                &root().join("tests/guests/p2_suite.wat"),
                &root().join("tests/guests/wit/p2"),
                "p2",
            )
        })
        .clone()
}

/// The WASIp2 suite guest with an initial memory of `pages` (64 KiB each)
/// instead of 2: 64 or more start like an interpreter's heap.
#[allow(dead_code)]
pub fn p2_suite_with_memory(pages: u32) -> Vec<u8> {
    let wat = std::fs::read_to_string(root().join("tests/guests/p2_suite.wat")).unwrap();
    let declared = "(memory (export \"memory\") 2)";
    assert!(wat.contains(declared));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p2_suite.wat");
    let resized = format!("(memory (export \"memory\") {pages})");
    std::fs::write(&path, wat.replace(declared, &resized)).unwrap();
    build_component(&path, &root().join("tests/guests/wit/p2"), "p2")
}

/// The WASIp3 suite guest (see tests/guests/p3_suite.wat).
pub fn p3_suite() -> Vec<u8> {
    static CACHE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CACHE
        .get_or_init(|| {
            build_component(
                &root().join("tests/guests/p3_suite.wat"),
                &root().join("tests/guests/wit/p3"),
                "p3",
            )
        })
        .clone()
}

/// Knobs for tests: a private cache directory unless the test sets one.
pub fn knobs(args: KnobArgs) -> wasmpool::Knobs {
    let mut k = args.resolve().expect("valid knobs");
    if k.cache_dir.is_none() {
        k.no_cache = true;
    }
    k
}

/// A server running in this process on an ephemeral port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub front: Arc<Front>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(bytes: Vec<u8>, args: KnobArgs) -> TestServer {
        let k = knobs(args);
        let pool = tokio::task::spawn_blocking(move || {
            Pool::load(
                k,
                &Source::Bytes {
                    name: "guest".into(),
                    bytes,
                },
            )
        })
        .await
        .unwrap()
        .expect("component loads");
        pool.probe().await.expect("component instantiates");
        let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let ListenAddr::Tcp(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let front = Front::new(Arc::new(pool));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(wasmpool::http::serve(
            front.clone(),
            vec![listener],
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(10),
        ));
        TestServer {
            addr,
            front,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn stats(&self) -> wasmpool::engine::stats::Snapshot {
        self.front.pool().stats()
    }

    pub async fn get(&self, path: &str) -> Reply {
        send(self.addr, "GET", path, &[], Bytes::new()).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    try_send(addr, method, path, headers, body)
        .await
        .expect("request succeeds at the HTTP level")
}

pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// Lets the instance that just answered become available again: a WASIp3
/// instance is idle once its event loop has nothing left (the guest may
/// work on after the response ends); a request arriving before that joins
/// it only if its loop has room, else it takes another instance.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Sends a GET for each of `paths`, `gap` apart, each on its own
/// connection without waiting for the ones before (so they overlap), and
/// returns the replies in order.
pub async fn staggered(addr: SocketAddr, paths: Vec<String>, gap: Duration) -> Vec<Reply> {
    let mut tasks = Vec::new();
    for path in paths {
        tasks.push(tokio::spawn(async move {
            send(addr, "GET", &path, &[], Bytes::new()).await
        }));
        tokio::time::sleep(gap).await;
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.expect("request task"));
    }
    replies
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Sends raw bytes on a new connection and reads until the server closes
/// it or `timeout` passes. Returns what was read and whether it closed.
pub async fn raw(addr: SocketAddr, data: &[u8], timeout: Duration) -> (String, bool) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(data).await;
    raw_read(&mut s, timeout).await
}

/// Reads from `s` until the server closes it or `timeout` passes. Returns
/// what was read and whether it closed.
pub async fn raw_read(s: &mut tokio::net::TcpStream, timeout: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + timeout;
    let closed = loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Status code of the first response in `text`.
pub fn status_of(text: &str) -> Option<u16> {
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A component exporting a plain function instead of wasi:http.
pub fn other_world() -> Vec<u8> {
    build_component(
        &root().join("tests/guests/other.wat"),
        &root().join("tests/guests/wit/other"),
        "other",
    )
}

/// A wasi:http component with an import no host provides.
pub fn needs_missing() -> Vec<u8> {
    build_component(
        &root().join("tests/guests/needs_missing.wat"),
        &root().join("tests/guests/wit/other"),
        "needs-missing",
    )
}

/// A running `wasmpool` process.
pub struct Proc {
    pub child: std::process::Child,
    pub stderr: Arc<std::sync::Mutex<String>>,
}

impl Proc {
    /// Starts `wasmpool ARGS` and waits (at most 60 s) for its
    /// "Serving HTTP on" lines; returns the process and the addresses.
    pub fn serve(args: &[&str], envs: &[(&str, &str)]) -> (Proc, Vec<String>) {
        let n = args.iter().filter(|a| **a == "--listen").count().max(1);
        Proc::serve_n(args, envs, n)
    }

    /// Like [`Proc::serve`], waiting for `n` listeners.
    pub fn serve_n(args: &[&str], envs: &[(&str, &str)], n: usize) -> (Proc, Vec<String>) {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wasmpool"));
        cmd.args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc::start(cmd, n)
    }

    /// Spawns `cmd` (stderr captured) and waits for `n` "Serving HTTP on"
    /// lines; returns the addresses they name.
    pub fn start(mut cmd: std::process::Command, n: usize) -> (Proc, Vec<String>) {
        let proc = Proc::spawn(&mut cmd);
        let addrs = proc.wait_serving(n);
        (proc, addrs)
    }

    /// Spawns `cmd` with stderr captured, without waiting.
    pub fn spawn(cmd: &mut std::process::Command) -> Proc {
        use std::io::BufRead;
        // Tests stop servers with SIGTERM to test the drain; the shutdown
        // delay before it (5 s by default without socket activation) is
        // tested on its own, by tests that set this variable or the flag.
        if !cmd.get_envs().any(|(k, _)| k == "WASMPOOL_SHUTDOWN_DELAY") {
            cmd.env("WASMPOOL_SHUTDOWN_DELAY", "0s");
        }
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc { child, stderr: log }
    }

    /// Waits (60 s at most) until `n` "Serving HTTP on" lines were logged.
    pub fn wait_serving(&self, n: usize) -> Vec<String> {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            let addrs: Vec<String> = log
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("Serving HTTP on ")
                        .or_else(|| l.strip_prefix("Serving HTTPS on "))
                })
                .map(|rest| {
                    rest.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .trim_end_matches('/')
                        .to_string()
                })
                .collect();
            if addrs.len() >= n {
                return addrs;
            }
            if std::time::Instant::now() > end || self.exited() {
                panic!("wasmpool did not start: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn exited(&self) -> bool {
        // Peek without reaping: /proc shows a zombie until we wait.
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map(|s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
            .unwrap_or(true)
    }

    /// Waits (10 s at most) for a log line starting with `prefix`; returns
    /// the rest of it.
    pub fn wait_line(&self, prefix: &str) -> String {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(rest) = self.log().lines().find_map(|l| l.strip_prefix(prefix)) {
                return rest.to_string();
            }
            if std::time::Instant::now() > end {
                panic!("no line starting with {prefix:?}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (`timeout` at most) until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let end = std::time::Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                std::time::Instant::now() < end,
                "no {needle:?} in the log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address of the metrics listener (`--metrics-listen`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.wait_line("Metrics on http://")
            .trim_end_matches("/metrics")
            .parse()
            .expect("metrics address")
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a signal and waits for the exit status.
    pub fn stop(mut self, sig: i32) -> std::process::ExitStatus {
        self.signal(sig);
        self.child.wait().unwrap()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const SIGTERM: i32 = libc::SIGTERM;
pub const SIGINT: i32 = libc::SIGINT;
pub const SIGHUP: i32 = libc::SIGHUP;

/// `http://127.0.0.1:PORT` (or `https://`) -> socket address.
pub fn sockaddr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()
        .expect("tcp address")
}

/// Builds tests/guests/python/{p2,p3}/app.py with componentize-py (which
/// the README's test command installs). Panics with a clear message when
/// the tool is missing: these tests are not optional.
pub fn python_guest(world: &str) -> Vec<u8> {
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("python-{world}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(out_dir.join("wit")).unwrap();
    let src = root().join("tests/guests/python").join(world);
    std::fs::copy(src.join("world.wit"), out_dir.join("wit/world.wit")).unwrap();
    let deps = out_dir.join("wit/deps");
    std::fs::create_dir_all(&deps).unwrap();
    // The grants guest is a WASIp2 guest that also imports wasi:config.
    let base = if world == "grants" { "p2" } else { world };
    for e in std::fs::read_dir(root().join("tests/guests/wit").join(base).join("deps")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), deps.join(e.file_name())).unwrap();
    }
    if world == "grants" {
        let config = deps.join("config");
        std::fs::create_dir_all(&config).unwrap();
        for e in std::fs::read_dir(root().join("tests/guests/wit/config")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), config.join(e.file_name())).unwrap();
        }
    }
    let wasm = out_dir.join("app.wasm");
    let tool = std::env::var("COMPONENTIZE_PY").unwrap_or_else(|_| "componentize-py".into());
    let status = std::process::Command::new(tool)
        .args(["-d", out_dir.join("wit").to_str().unwrap(), "-w", "app", "componentize", "app", "-o", wasm.to_str().unwrap()])
        .current_dir(&src)
        .status()
        .expect("componentize-py is not installed: run the README's test command (it pip-installs componentize-py==0.25.1)");
    assert!(status.success(), "componentize-py failed for {world}");
    std::fs::read(wasm).unwrap()
}

/// Builds tests/guests/js/app.js with componentize-js (which the README's
/// test command installs with npm into tests/guests/js/node_modules; or set
/// COMPONENTIZE_JS). StarlingMonkey speaks wasi:http 0.2.10, so the WIT is
/// the vendored 0.2.12 one relabelled.
pub fn js_guest() -> Vec<u8> {
    static BUILT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("js-{}", std::process::id()));
            let deps = out_dir.join("wit/deps");
            std::fs::create_dir_all(&deps).unwrap();
            let src = root().join("tests/guests/js");
            std::fs::copy(src.join("world.wit"), out_dir.join("wit/world.wit")).unwrap();
            for e in std::fs::read_dir(root().join("tests/guests/wit/p2/deps")).unwrap() {
                let e = e.unwrap();
                let text = std::fs::read_to_string(e.path()).unwrap();
                let text = text
                    .replace("@0.2.12", "@0.2.10")
                    .replace("@since(version = 0.2.11)", "")
                    .replace("@since(version = 0.2.12)", "");
                std::fs::write(deps.join(e.file_name()), text).unwrap();
            }
            let wasm = out_dir.join("app.wasm");
            let tool = std::env::var("COMPONENTIZE_JS").unwrap_or_else(|_| {
                src.join("node_modules/.bin/componentize-js")
                    .to_string_lossy()
                    .into_owned()
            });
            let status = std::process::Command::new(&tool)
                .arg(src.join("app.js"))
                .args(["-w", out_dir.join("wit").to_str().unwrap(), "-n", "app", "-o"])
                .arg(&wasm)
                .status()
                .unwrap_or_else(|e| {
                    panic!("{tool}: {e}: run the README's test command (it runs npm ci in tests/guests/js)")
                });
            assert!(status.success(), "componentize-js failed");
            let bytes = std::fs::read(&wasm).unwrap();
            let _ = std::fs::remove_dir_all(&out_dir);
            bytes
        })
        .clone()
}

/// A compile cache shared by the tests of one target directory, so big
/// guests are compiled once.
pub fn shared_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("compile-cache")
}
