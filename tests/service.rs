//! The service without systemd: socket activation (systemd-socket-activate
//! and a small activator of our own), the sd_notify protocol, drain,
//! reload, idle exit, logs and metrics.
mod common;
use bytes::Bytes;
use common::*;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The service manager's end of NOTIFY_SOCKET.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every datagram received so far.
    all: Vec<String>,
}

impl NotifySocket {
    fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            all: Vec::new(),
        }
    }

    fn env(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Receives until a datagram satisfies `pred`; returns it.
    fn wait_for(&mut self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no notify message {what}; got {:#?}", self.all);
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.all.push(msg.clone());
                if pred(&msg) {
                    return msg;
                }
            }
        }
    }

    /// The state changes received so far, in order, without STATUS-only
    /// updates, watchdog pings and start-up extensions.
    fn events(&self) -> Vec<String> {
        self.all
            .iter()
            .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| {
                !l.starts_with("STATUS=")
                    && !l.starts_with("MONOTONIC_USEC=")
                    && l != "WATCHDOG=1"
                    && !l.starts_with("EXTEND_TIMEOUT_USEC=")
            })
            .collect()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn get(rt: &tokio::runtime::Runtime, addr: std::net::SocketAddr, path: &str) -> Reply {
    rt.block_on(send(addr, "GET", path, &[], Bytes::new()))
}

fn get_unix(rt: &tokio::runtime::Runtime, path: &Path, target: &str) -> String {
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        s.write_all(
            format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
}

fn write_config(path: &Path, extra: &str) {
    std::fs::write(
        path,
        format!("component = \"app.wasm\"\ncache-dir = \"cache\"\n{extra}"),
    )
    .unwrap();
}

#[test]
fn notify_protocol_under_systemd_socket_activate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("app.wasm"), p3_suite()).unwrap();
    let cfg = d.join("app.toml");
    write_config(&cfg, "max-instance-reuse-count = 100\n");
    let mut notify = NotifySocket::new(d);
    let port = free_port();
    let sock = d.join("app.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &format!("127.0.0.1:{port}"),
        "-l",
        sock.to_str().unwrap(),
        "--fdname=web:local",
    ])
    .args([
        "-E",
        &format!("NOTIFY_SOCKET={}", notify.env()),
        "-E",
        "WATCHDOG_USEC=300000",
    ])
    .arg(env!("CARGO_BIN_EXE_wasmpool"))
    .args(["serve", "--config", cfg.to_str().unwrap()])
    .current_dir(d);
    let mut proc = Proc::spawn(&mut cmd);
    let rt = rt();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The first connection starts the service (systemd-socket-activate
    // execs on activity); it waits in the backlog until wasmpool accepts.
    let first = std::thread::spawn(move || {
        // Retry until systemd-socket-activate listens (a refused attempt
        // does not activate anything).
        let client = tokio::runtime::Runtime::new().unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            match client.block_on(try_send(addr, "GET", "/counter", &[], Bytes::new())) {
                Ok(r) => break r.text(),
                Err(e) if Instant::now() > end => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    let ready = notify.wait_for(Duration::from_secs(60), "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(ready.contains("STATUS=Serving"), "{ready}");
    assert_eq!(first.join().unwrap(), "1");
    // Between requests, let the instance become available again (see
    // knobs.rs `settle`), so the counter shows reuse deterministically.
    std::thread::sleep(Duration::from_millis(100));
    let log = proc.log();
    assert!(
        log.contains("inherited: web") && log.contains("inherited: local"),
        "{log}"
    );
    // Both sockets serve; the reused instance counts up.
    assert_eq!(get(&rt, addr, "/counter").text(), "2");
    std::thread::sleep(Duration::from_millis(100));
    let t = get_unix(&rt, &sock, "/counter");
    assert!(
        t.starts_with("HTTP/1.1 200") && t.contains("\r\n3\r\n"),
        "{t}"
    );
    // Watchdog pings arrive every WATCHDOG_USEC/2.
    notify.wait_for(Duration::from_secs(5), "WATCHDOG=1", |m| {
        m == "WATCHDOG=1\n"
    });
    notify.wait_for(Duration::from_secs(5), "a second WATCHDOG=1", |m| {
        m == "WATCHDOG=1\n"
    });
    // STATUS carries live figures.
    let st = notify.wait_for(Duration::from_secs(10), "STATUS with 3 requests", |m| {
        m.contains("3 requests served")
    });
    assert!(
        st.contains("live instances") && st.contains("queued") && st.contains("last reload: none"),
        "{st}"
    );

    // A good reload: reuse 1 from now on.
    write_config(&cfg, "max-instance-reuse-count = 1\n");
    proc.signal(SIGHUP);
    let reloading = notify.wait_for(Duration::from_secs(10), "RELOADING=1", |m| {
        m.contains("RELOADING=1")
    });
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines.len(), 2, "{reloading}");
    assert_eq!(lines[0], "RELOADING=1");
    let usec: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .expect("MONOTONIC_USEC in the same datagram")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready = notify.wait_for(Duration::from_secs(60), "READY=1 after reload", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(ready.contains("last reload: ok"), "{ready}");
    assert_eq!(get(&rt, addr, "/counter").text(), "1");
    assert_eq!(get(&rt, addr, "/counter").text(), "1");

    // A bad reload (broken config) keeps the old component and says why.
    std::fs::write(&cfg, "component = \"app.wasm\"\nno-such-knob = 1\n").unwrap();
    proc.signal(SIGHUP);
    let ready = notify.wait_for(Duration::from_secs(60), "READY=1 after bad reload", |m| {
        m.lines().any(|l| l == "READY=1") && m.contains("FAILED")
    });
    assert!(ready.contains("unknown field `no-such-knob`"), "{ready}");
    assert_eq!(
        get(&rt, addr, "/counter").text(),
        "1",
        "the previous component stopped serving"
    );
    // A broken component too.
    write_config(&cfg, "max-instance-reuse-count = 1\n");
    std::fs::write(d.join("app.wasm"), b"broken").unwrap();
    proc.signal(SIGHUP);
    let ready = notify.wait_for(
        Duration::from_secs(60),
        "READY=1 after broken component",
        |m| m.lines().any(|l| l == "READY=1") && m.contains("FAILED"),
    );
    assert!(ready.contains("not a WebAssembly component"), "{ready}");
    assert_eq!(get(&rt, addr, "/").status, 200);

    // Stop.
    proc.signal(SIGTERM);
    notify.wait_for(Duration::from_secs(10), "STOPPING=1", |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    let status = proc
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}: {}", proc.log());
    assert_eq!(
        notify.events(),
        [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1"
        ]
    );
}

fn rt_get(addr: std::net::SocketAddr, path: &str) -> String {
    rt().block_on(send(addr, "GET", path, &[], Bytes::new()))
        .text()
}

/// Spawns wasmpool the way a service manager does: `fds` become 3, 4, ...
/// and LISTEN_PID is the child's pid (unless `listen_pid` overrides it).
fn activate(
    fds: &[RawFd],
    names: &str,
    args: &[&str],
    listen_pid: Option<&str>,
    envs: &[(&str, &str)],
) -> Proc {
    use std::os::unix::process::CommandExt;
    let mut cmd = match listen_pid {
        None => {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                "LISTEN_PID=$$ exec \"$0\" \"$@\"",
                env!("CARGO_BIN_EXE_wasmpool"),
            ]);
            c
        }
        Some(pid) => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
            c.env("LISTEN_PID", pid);
            c
        }
    };
    cmd.args(args)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let fds = fds.to_vec();
    unsafe {
        cmd.pre_exec(move || {
            // Move the sources out of the way first, then into place.
            let mut high = Vec::new();
            for fd in &fds {
                let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(h);
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Proc::spawn(&mut cmd)
}

#[test]
fn idle_exit_then_socket_activation_again() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.wasm"), p2_suite()).unwrap();
    let app = dir.path().join("app.wasm");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let args = [
        "serve",
        app.to_str().unwrap(),
        "--exit-idle-after",
        "500ms",
        "--no-cache",
    ];
    let mut proc = activate(&[listener.as_raw_fd()], "web", &args, None, &[]);
    proc.wait_serving(1);
    let rt = rt();
    assert_eq!(get(&rt, addr, "/").status, 200);
    let t = Instant::now();
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .expect("exits when idle");
    assert!(status.success(), "{status:?}: {}", proc.log());
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    // The manager still holds the socket: a client connecting now waits in
    // the backlog, and is served once the service is started again.
    let client = std::thread::spawn(move || rt_get(addr, "/"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!client.is_finished());
    let mut again = activate(&[listener.as_raw_fd()], "web", &args, None, &[]);
    assert_eq!(client.join().unwrap(), "hello from p2\n");
    assert!(
        again
            .wait_exit(Duration::from_secs(10))
            .expect("idle again")
            .success()
    );
}

#[test]
fn wrong_listen_pid_is_ignored() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hello = root().join("examples/hello.wasm");
    let proc = activate(
        &[listener.as_raw_fd()],
        "web",
        &[
            "serve",
            hello.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
        ],
        Some("1"),
        &[],
    );
    let addrs = proc.wait_serving(1);
    assert!(!proc.log().contains("inherited"), "{}", proc.log());
    assert_ne!(sockaddr(&addrs[0]), listener.local_addr().unwrap());
    assert_eq!(get(&rt(), sockaddr(&addrs[0]), "/").status, 200);
    assert!(proc.stop(SIGTERM).success());
}

#[test]
fn unusable_inherited_fds_are_refused() {
    let hello = root().join("examples/hello.wasm");
    let args = ["serve", hello.to_str().unwrap(), "--no-cache"];
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let file = std::fs::File::open(&hello).unwrap();
    let unlistened =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    for (fd, needle) in [
        (udp.as_raw_fd(), "is a datagram socket"),
        (file.as_raw_fd(), "is not a socket"),
        (unlistened.as_raw_fd(), "is not listening"),
    ] {
        let mut p = activate(&[fd], "bad", &args, None, &[]);
        let status = p.wait_exit(Duration::from_secs(10)).expect("exits");
        let log = p.log();
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(
            log.contains(needle) && log.contains("(bad)") && !log.contains("panicked"),
            "{log}"
        );
    }
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.wasm"), p3_suite()).unwrap();
    let app = dir.path().join("app.wasm");
    let (mut proc, addrs) = Proc::serve(
        &[
            "serve",
            app.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
        ],
        &[],
    );
    let addr = sockaddr(&addrs[0]);
    // An idle keep-alive connection must not hold up the exit.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    {
        use std::io::{Read, Write};
        idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = idle.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    let slow: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                rt().block_on(send(addr, "GET", "/sleep/1500", &[], Bytes::new()))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    proc.signal(SIGTERM);
    for t in slow {
        let r = t.join().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "slept\n"));
    }
    // Well before the 30 s drain timeout: the idle connection was closed.
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .expect("exits after draining");
    assert!(status.success(), "{status:?}");
    drop(idle);
}

#[test]
fn reload_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("app.wasm"), p3_suite()).unwrap();
    let cfg = d.join("app.toml");
    write_config(&cfg, "max-instance-reuse-count = 4\n");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
    cmd.args([
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .current_dir(d);
    let (proc, addrs) = Proc::start(cmd, 1);
    let addr = sockaddr(&addrs[0]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let rt = rt();
                let (mut ok, mut failed) = (0u32, Vec::new());
                // Bounded: at most 20 s, and stops when told.
                let end = Instant::now() + Duration::from_secs(20);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                    match rt.block_on(try_send(addr, "GET", "/sleep/20", &[], Bytes::new())) {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("status {}", r.status)),
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        write_config(&cfg, &format!("max-instance-reuse-count = {}\n", 2 + i));
        proc.signal(SIGHUP);
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        total += ok;
    }
    assert!(total > 50, "only {total} requests");
    let log = proc.log();
    assert_eq!(
        log.matches("reloaded; new requests go to the new component")
            .count(),
        3,
        "{log}"
    );
    assert!(proc.stop(SIGTERM).success());
}

#[test]
fn exit_idle_after_needs_socket_activation() {
    let hello = root().join("examples/hello.wasm");
    let out = Command::new(env!("CARGO_BIN_EXE_wasmpool"))
        .args(["serve", hello.to_str().unwrap(), "--exit-idle-after", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: --exit-idle-after needs socket activation"),
        "{err}"
    );
}

#[test]
fn journal_and_json_log_formats() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let hello = root().join("examples/hello.wasm");
    // stderr is the journal stream: <N> prefixes, no timestamps, no colour.
    let path = dir.path().join("stderr");
    let file = std::fs::File::create(&path).unwrap();
    let m = file.metadata().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasmpool"))
        .args([
            "serve",
            hello.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
        ])
        .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))
        .stderr(file)
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&path).unwrap().contains("ready") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&path).unwrap();
    let log_lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("Serving HTTP"))
        .collect();
    assert!(!log_lines.is_empty());
    for l in &log_lines {
        assert!(
            l.starts_with("<6>")
                || l.starts_with("<4>")
                || l.starts_with("<3>")
                || l.starts_with("<7>"),
            "{l}"
        );
        assert!(
            !l.contains('\x1b') && !l.contains("2026-") && !l.contains(" INFO "),
            "{l}"
        );
    }
    assert!(
        log_lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("ready")),
        "{text}"
    );
    // --log-format json: one object per line.
    let (proc, _) = Proc::serve(
        &[
            "serve",
            hello.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
            "--log-format",
            "json",
        ],
        &[],
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = proc.log();
    assert!(proc.stop(SIGTERM).success());
    let json: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("Serving HTTP"))
        .collect();
    assert!(!json.is_empty());
    for l in json {
        assert!(
            l.starts_with('{') && l.ends_with('}') && l.contains("\"level\""),
            "{l}"
        );
    }
}

#[test]
fn metrics_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.wasm"), p2_suite()).unwrap();
    let app = dir.path().join("app.wasm");
    let msock = dir.path().join("metrics.sock");
    let metrics_addr = format!("unix:{}", msock.display());
    let (proc, addrs) = Proc::serve(
        &[
            "serve",
            app.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
            "--metrics-listen",
            &metrics_addr,
            "--request-timeout",
            "300ms",
        ],
        &[],
    );
    let rt = rt();
    let addr = sockaddr(&addrs[0]);
    for _ in 0..3 {
        assert_eq!(get(&rt, addr, "/").status, 200);
    }
    assert_eq!(get(&rt, addr, "/trap").status, 500);
    assert_eq!(get(&rt, addr, "/sleep/2000").status, 504);
    let text = get_unix(&rt, &msock, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for needle in [
        "wasmpool_requests_total{class=\"2xx\"} 3",
        "wasmpool_requests_total{class=\"5xx\"} 2",
        "wasmpool_request_duration_seconds_bucket",
        "wasmpool_request_duration_seconds_count 5",
        "wasmpool_instances_created_total",
        "wasmpool_instances_reused_total 0",
        "wasmpool_instances_live",
        "wasmpool_queue_depth 0",
        "wasmpool_rejected_total 0",
        "wasmpool_timeouts_total 1",
        "wasmpool_traps_total 1",
        "wasmpool_reloads_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    let t404 = get_unix(&rt, &msock, "/other");
    assert!(t404.starts_with("HTTP/1.1 404"), "{t404}");
    assert!(proc.stop(SIGTERM).success());
}

#[test]
fn slow_first_compile_extends_the_start_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A ~20 MB componentize-py guest takes seconds to compile.
    std::fs::write(d.join("app.wasm"), python_guest("p2")).unwrap();
    // Starts the service with its own notify socket; returns every
    // datagram up to and including READY=1.
    let start = |sub: &str| {
        let sock_dir = d.join(sub);
        std::fs::create_dir_all(&sock_dir).unwrap();
        let mut notify = NotifySocket::new(&sock_dir);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
        cmd.args([
            "serve",
            "app.wasm",
            "--listen",
            "127.0.0.1:0",
            "--cache-dir",
            "cache",
        ])
        .env("NOTIFY_SOCKET", notify.env())
        .current_dir(d);
        let (proc, _) = Proc::start(cmd, 1);
        notify.wait_for(Duration::from_secs(5), "READY=1", |m| {
            m.lines().any(|l| l == "READY=1")
        });
        assert!(proc.stop(SIGTERM).success());
        notify.all
    };
    let first = start("first");
    assert!(first[0].starts_with("EXTEND_TIMEOUT_USEC="), "{first:#?}");
    // From the cache the start is quick: no extension needed.
    let second = start("second");
    assert!(second[0].starts_with("READY=1"), "{second:#?}");
}

/// One request on a new connection: the status line and the head.
fn raw_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn the_shutdown_delay_serves_with_readyz_503_then_stops_accepting() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.wasm"), p3_suite()).unwrap();
    let app = dir.path().join("app.wasm");
    let (mut proc, addrs) = Proc::serve(
        &[
            "serve",
            app.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--no-cache",
            "--shutdown-delay",
            "2s",
        ],
        &[],
    );
    let addr = sockaddr(&addrs[0]);
    let admin = proc.metrics_addr();
    assert!(
        raw_get(admin, "/readyz")
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    // A keep-alive connection opened before SIGTERM.
    let mut kept = std::net::TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    proc.signal(SIGTERM);
    let end = Instant::now() + Duration::from_secs(1);
    while !raw_get(admin, "/readyz")
        .unwrap()
        .starts_with("HTTP/1.1 503")
    {
        assert!(Instant::now() < end, "/readyz still 200 after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = rt()
        .block_on(send(admin, "GET", "/metrics", &[], Bytes::new()))
        .text();
    assert!(
        m.contains("wasmpool_draining 1") && m.contains("wasmpool_ready 0"),
        "{m}"
    );
    // New connections are still accepted and served, and told to close so
    // their clients go elsewhere next time.
    let r = raw_get(addr, "/").unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    // So is the connection that was open before.
    {
        use std::io::{Read, Write};
        kept.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = kept.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // After the delay the listener closes and the process exits.
    let status = proc.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}: {}", proc.log());
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        raw_get(addr, "/").is_err(),
        "still accepting after the exit"
    );
    let log = proc.log();
    assert!(
        log.contains("SIGTERM: draining; still serving for the shutdown delay (2s)"),
        "{log}"
    );
    assert!(
        log.contains("shutdown delay over: stopping accepting"),
        "{log}"
    );
}

#[test]
fn a_second_sigterm_or_a_sigint_ends_the_shutdown_delay() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.wasm"), p2_suite()).unwrap();
    let app = dir.path().join("app.wasm");
    for second in [SIGTERM, SIGINT] {
        let (mut proc, _) = Proc::serve(
            &[
                "serve",
                app.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--no-cache",
            ],
            &[("WASMPOOL_SHUTDOWN_DELAY", "60s")],
        );
        proc.signal(SIGTERM);
        proc.wait_log("SIGTERM: draining", Duration::from_secs(5));
        let t = Instant::now();
        proc.signal(second);
        let status = proc
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("the delay went on after signal {second}"));
        assert!(status.success());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn the_shutdown_delay_defaults_to_5s_and_to_0_under_socket_activation() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.wasm"), p2_suite()).unwrap();
    let app = dir.path().join("app.wasm");
    // Bound sockets: 5 s (ended here by a second SIGTERM).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
    cmd.args([
        "serve",
        app.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-cache",
    ])
    .env_remove("WASMPOOL_SHUTDOWN_DELAY");
    let (mut proc, _) = Proc::start(cmd, 1);
    proc.signal(SIGTERM);
    proc.wait_log("shutdown delay (5s)", Duration::from_secs(5));
    proc.signal(SIGTERM);
    assert!(
        proc.wait_exit(Duration::from_secs(5))
            .is_some_and(|s| s.success())
    );

    // Inherited sockets: none (the service manager holds the socket).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut proc = activate_without_delay_env(&listener, &app);
    proc.wait_serving(1);
    assert_eq!(rt_get(addr, "/"), rt_get(addr, "/"));
    let t = Instant::now();
    proc.signal(SIGTERM);
    assert!(
        proc.wait_exit(Duration::from_secs(5))
            .is_some_and(|s| s.success())
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!proc.log().contains("shutdown delay ("), "{}", proc.log());
}

/// Socket activation of `app` on `listener`, with the shutdown delay at
/// its default.
fn activate_without_delay_env(listener: &std::net::TcpListener, app: &Path) -> Proc {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "unset WASMPOOL_SHUTDOWN_DELAY; LISTEN_PID=$$ exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_wasmpool"),
        "serve",
        app.to_str().unwrap(),
        "--no-cache",
    ])
    .env("LISTEN_FDS", "1")
    .env("LISTEN_FDNAMES", "web");
    let fd = listener.as_raw_fd();
    unsafe {
        cmd.pre_exec(move || {
            // Through a high descriptor: dup2 onto itself would keep
            // close-on-exec.
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
            if high < 0 || libc::dup2(high, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Proc::spawn(&mut cmd)
}

#[test]
fn shutdown_delay_in_the_config_file_and_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("app.wasm"), p2_suite()).unwrap();
    let cfg = d.join("app.toml");
    write_config(
        &cfg,
        "shutdown-delay = \"1s\"\nlisten = [\"127.0.0.1:0\"]\n",
    );
    let mut notify = NotifySocket::new(d);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
    cmd.args(["serve", "--config", cfg.to_str().unwrap()])
        .current_dir(d)
        .env("NOTIFY_SOCKET", notify.env())
        .env_remove("WASMPOOL_SHUTDOWN_DELAY");
    let (mut proc, _) = Proc::start(cmd, 1);
    notify.wait_for(Duration::from_secs(10), "READY=1", |m| {
        m.contains("READY=1")
    });
    let t = Instant::now();
    proc.signal(SIGTERM);
    // STATUS= says so at once; STOPPING=1 follows when the delay is over.
    let st = notify.wait_for(Duration::from_secs(2), "STATUS=Draining", |m| {
        m.starts_with("STATUS=Draining")
    });
    assert!(
        st.contains("shutdown delay 1s, /readyz 503, still serving"),
        "{st}"
    );
    notify.wait_for(Duration::from_secs(5), "STOPPING=1", |m| {
        m.contains("STOPPING=1")
    });
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(
        proc.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(proc.log().contains("shutdown delay (1s)"), "{}", proc.log());

    write_config(&cfg, "shutdown-delay = \"soon\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_wasmpool"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("shutdown-delay") && err.lines().count() == 1,
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_wasmpool"))
        .args(["serve", "app.wasm", "--shutdown-delay", "-1s"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lines in `path` that are access lines.
fn access_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("access:"))
        .map(str::to_string)
        .collect()
}

/// Waits (at most `secs`) until `path` holds `n` access lines.
fn wait_access_lines(path: &Path, n: usize, secs: u64) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let lines = access_lines(path);
        if lines.len() >= n || Instant::now() > end {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn access_log_to_a_file_buffered_reopened_on_sigusr1_flushed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("app.wasm"), p2_suite()).unwrap();
    let log = d.join("logs/access.log");
    std::fs::create_dir(d.join("logs")).unwrap();
    let cfg = d.join("app.toml");
    // Relative to the config file; lines wait at most 300 ms.
    write_config(
        &cfg,
        "listen = [\"127.0.0.1:0\"]\naccess-log = \"logs/access.log\"\naccess-log-flush = \"300ms\"\n",
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
    cmd.args(["serve", "--config", cfg.to_str().unwrap()])
        .current_dir(d)
        // The file does not depend on the process log's filter.
        .env("WASMPOOL_LOG", "info,access=off");
    let (proc, addrs) = Proc::start(cmd, 1);
    let addr = sockaddr(&addrs[0]);
    let rt = rt();
    for _ in 0..3 {
        assert_eq!(get(&rt, addr, "/").status, 200);
    }
    let lines = wait_access_lines(&log, 3, 5);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].contains(
            "  INFO access: client=127.0.0.1 method=GET target=/ version=HTTP/1.1 status=200 "
        ),
        "{}",
        lines[0]
    );
    // One of the two: no repeated message before the fields.
    assert!(!lines[0].contains("GET / 200"), "{}", lines[0]);
    assert!(!proc.log().contains("access:"), "{}", proc.log());

    // logrotate: move the file, SIGUSR1, the next lines go to a new file.
    let rotated = d.join("logs/access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    assert_eq!(get(&rt, addr, "/before-reopen").status, 200);
    proc.signal(libc::SIGUSR1);
    proc.wait_log("access log reopened", Duration::from_secs(5));
    assert_eq!(get(&rt, addr, "/after-reopen").status, 200);
    let new = wait_access_lines(&log, 1, 5);
    let old = access_lines(&rotated);
    assert_eq!(old.len(), 4, "{old:?}");
    assert!(old[3].contains("target=/before-reopen"), "{old:?}");
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].contains("target=/after-reopen"), "{new:?}");

    // A reload to a file that cannot be opened fails and keeps the old.
    write_config(
        &cfg,
        "listen = [\"127.0.0.1:0\"]\naccess-log = \"no-such-dir/access.log\"\n",
    );
    proc.signal(libc::SIGHUP);
    proc.wait_log("reload failed", Duration::from_secs(10));
    assert!(
        proc.log().contains("access-log: cannot open") && proc.log().contains("no-such-dir"),
        "{}",
        proc.log()
    );
    assert_eq!(get(&rt, addr, "/kept").status, 200);
    assert!(
        wait_access_lines(&log, 2, 5)
            .iter()
            .any(|l| l.contains("target=/kept"))
    );

    // A reload to JSON lines in JSON files... and a longer flush: what
    // the buffers hold is written at exit.
    write_config(
        &cfg,
        "listen = [\"127.0.0.1:0\"]\naccess-log = \"logs/second.log\"\naccess-log-flush = \"1h\"\n",
    );
    proc.signal(libc::SIGHUP);
    proc.wait_log("reloaded;", Duration::from_secs(10));
    for _ in 0..50 {
        assert_eq!(get(&rt, addr, "/late").status, 200);
    }
    let second = d.join("logs/second.log");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(access_lines(&second).len(), 0, "buffered for an hour");
    assert_eq!(proc.stop(SIGTERM).code(), Some(0));
    assert_eq!(access_lines(&second).len(), 50);
}

#[test]
fn access_log_defaults_bad_values_and_unbuffered_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("app.wasm"), p2_suite()).unwrap();
    let rt = rt();

    // Under systemd's LogsDirectory=: $LOGS_DIRECTORY/access.log, and with
    // no buffer each line is written at once.
    let logs = d.join("var-log");
    std::fs::create_dir(&logs).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
    cmd.args([
        "serve",
        "app.wasm",
        "--no-cache",
        "--listen",
        "127.0.0.1:0",
        "--access-log-buffer",
        "0",
        "--access-log-flush",
        "1h",
        "--log-format",
        "json",
    ])
    .current_dir(d)
    .env("LOGS_DIRECTORY", &logs);
    let (proc, addrs) = Proc::start(cmd, 1);
    assert_eq!(get(&rt, sockaddr(&addrs[0]), "/x?y=1").status, 200);
    let text = std::fs::read_to_string(logs.join("access.log")).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(v["target"], "access");
    assert_eq!(v["fields"]["target"], "/x?y=1");
    assert_eq!(v["fields"]["status"], 200);
    assert_eq!(proc.stop(SIGTERM).code(), Some(0));
    // `stderr` overrides that default.
    let logs2 = d.join("var-log-2");
    std::fs::create_dir(&logs2).unwrap();
    let app = d.join("app.wasm");
    let app = app.to_str().unwrap();
    let (proc, addrs) = Proc::serve(
        &[
            "serve",
            app,
            "--no-cache",
            "--listen",
            "127.0.0.1:0",
            "--access-log",
            "stderr",
        ],
        &[("LOGS_DIRECTORY", logs2.to_str().unwrap())],
    );
    assert_eq!(get(&rt, sockaddr(&addrs[0]), "/on-stderr").status, 200);
    let stderr = proc.stderr.clone();
    assert_eq!(proc.stop(SIGTERM).code(), Some(0));
    let text = stderr.lock().unwrap().clone();
    assert!(
        text.contains("access: client=127.0.0.1 method=GET target=/on-stderr"),
        "{text}"
    );
    assert!(!logs2.join("access.log").exists());

    // Bad values: one line naming the knob, never a panic.
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_wasmpool"))
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "serve",
        "app.wasm",
        "--access-log",
        "/nonexistent/dir/a.log",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("error: access-log: cannot open /nonexistent/dir/a.log")
            && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = run(&["serve", "app.wasm", "--access-log", "maybe"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--access-log"), "{err}");
    let (code, err) = run(&["serve", "app.wasm", "--access-log-flush", "0s"]);
    assert_eq!(code, Some(2), "{err}");
    let cfg = d.join("bad.toml");
    for (text, key) in [
        ("access-log = 5\n", "access-log"),
        ("access-log = \"sometimes\"\n", "access-log"),
        ("access-log-buffer = \"lots\"\n", "access-log-buffer"),
        ("access-log-buffer = \"1GiB\"\n", "access-log-buffer"),
        ("access-log-flush = \"0s\"\n", "access-log-flush"),
    ] {
        write_config(&cfg, text);
        let (code, err) = run(&["serve", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{text}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(key) && err.lines().count() == 1,
            "{text}: {err}"
        );
    }
}
