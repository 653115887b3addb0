//! Attacks as an attacker would run them, against the `wasmpool` binary on
//! its default knobs with a guest from a real toolchain (componentize-py):
//!
//! - slowhttptest (Debian package `slowhttptest`, installed by the README's
//!   test command) in its four modes, with more connections than
//!   `max-concurrent-connections`, from 127.0.0.1, while a probe from
//!   127.0.0.2 asks `GET /` once a second;
//! - a memory storm: many concurrent large uploads to the echo route with
//!   the server in a memory cgroup;
//! - h2load (Debian `nghttp2-client`) opening HTTP/2 streams whose window
//!   it keeps shut (`-w 0`).
mod common;
use common::*;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The attacks run one at a time: each measures what one attack does.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn python_p2() -> std::path::PathBuf {
    static G: OnceLock<std::path::PathBuf> = OnceLock::new();
    G.get_or_init(|| {
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("attacks-p2.wasm");
        std::fs::write(&path, python_guest("p2")).unwrap();
        path
    })
    .clone()
}

/// One `GET /` from 127.0.0.2: answered 200 within `within`?
fn probe(addr: SocketAddr, within: Duration) -> bool {
    use std::io::{Read, Write};
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    if s.connect_timeout(&addr.into(), within).is_err() {
        return false;
    }
    let mut s: std::net::TcpStream = s.into();
    let end = Instant::now() + within;
    s.set_read_timeout(Some(within)).unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return false,
        }
    }
    Instant::now() <= end && status_of(&String::from_utf8_lossy(&out)) == Some(200)
}

/// How long a probe may take during an attack. Each attack request costs
/// a fresh componentize-py instance (a few ms of CPU), and one client may
/// keep `max-requests-per-client` (64) of them running: on a 2-core host
/// where such a request takes 7 ms of CPU, the probe's request shares the
/// CPU with 64 others and took up to 2 s (nothing makes guest work fair
/// between clients yet; see docs/reliability.md).
const PROBE_WITHIN: Duration = Duration::from_secs(5);

/// Runs slowhttptest with `mode_args` for `secs` seconds while probing once
/// a second; returns (probes answered, probes sent).
fn attack(addr: SocketAddr, mode_args: &[&str], secs: u64) -> (usize, usize) {
    let mut cmd = Command::new("sh");
    // 1,200 connections need more descriptors than the usual soft limit.
    cmd.arg("-c")
        .arg("ulimit -n 8192 && exec slowhttptest \"$@\"")
        .arg("slowhttptest")
        .args(mode_args)
        .args(["-c", "1200", "-r", "200", "-p", "3", "-l"])
        .arg(secs.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut tool = cmd
        .spawn()
        .expect("slowhttptest is not installed: run the README's test command");
    let start = Instant::now();
    let (mut ok, mut sent) = (0, 0);
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        sent += 1;
        if probe(addr, PROBE_WITHIN) {
            ok += 1;
        } else {
            eprintln!("probe {sent} at {:?} failed", start.elapsed());
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    let _ = tool.kill();
    let _ = tool.wait();
    (ok, sent)
}

#[test]
fn slowhttptest_leaves_the_service_answering_others() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut p, addrs) = Proc::serve(
        &[
            "serve",
            python_p2().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--cache-dir",
            shared_cache().to_str().unwrap(),
        ],
        &[],
    );
    let addr = sockaddr(&addrs[0]);
    let url = |path: &str| format!("http://{addr}{path}");
    let root = url("/");
    let echo = url("/echo");
    let big = url("/big/65536");
    let modes: [(&str, Vec<&str>); 4] = [
        // Slowloris: heads that never end.
        ("slow headers", vec!["-H", "-u", &root, "-i", "5"]),
        // R-U-Dead-Yet: bodies a few bytes at a time.
        (
            "slow bodies",
            vec!["-B", "-u", &echo, "-s", "8192", "-i", "2", "-x", "10"],
        ),
        // Apache killer: many overlapping ranges.
        (
            "range requests",
            vec!["-R", "-u", &root, "-a", "10", "-b", "3000"],
        ),
        // Slow read: tiny windows, a few bytes every few seconds, answers
        // larger than the socket buffers.
        (
            "slow readers",
            vec![
                "-X", "-u", &big, "-k", "4", "-w", "512", "-y", "1024", "-n", "5", "-z", "32",
            ],
        ),
    ];
    let mut report = Vec::new();
    for (name, args) in &modes {
        let (ok, sent) = attack(addr, args, 20);
        report.push(format!(
            "{name}: {ok}/{sent} probes answered 200 within {PROBE_WITHIN:?}"
        ));
        assert!(
            ok * 10 >= sent * 9,
            "{name}: only {ok} of {sent} probes answered\n{}",
            p.log()
        );
        assert!(
            p.wait_exit(Duration::ZERO).is_none(),
            "the server died during {name}"
        );
        // The attack is over: the service answers at once.
        assert!(probe(addr, Duration::from_secs(3)), "after {name}");
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}

/// A memory cgroup with a limit, for a process started in it.
struct MemoryCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// A new cgroup limited to `bytes`: cgroup v1's memory controller
    /// where it is mounted (as on these machines), else cgroup v2.
    fn new(name: &str, bytes: u64) -> MemoryCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = |fstype: &str, opt: Option<&str>| {
            mountinfo.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let r: Vec<&str> = right.split(' ').collect();
                let ok = r[0] == fstype
                    && opt.is_none_or(|o| r.get(2).is_some_and(|s| s.split(',').any(|x| x == o)));
                ok.then(|| left.split(' ').nth(4).unwrap().to_string())
            })
        };
        let (dir, v2) = match (mount("cgroup", Some("memory")), mount("cgroup2", None)) {
            (Some(v1), _) => (std::path::PathBuf::from(v1).join(name), false),
            (None, Some(v2)) => (std::path::PathBuf::from(v2).join(name), true),
            (None, None) => panic!("no memory cgroup controller mounted"),
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make {} (run as root): {e}", dir.display()));
        let limit = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(dir.join(limit), bytes.to_string()).unwrap();
        MemoryCgroup { dir, v2 }
    }

    /// OOM kills inside the cgroup so far.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// `memory.stat` as key -> value.
    fn stat(&self) -> std::collections::HashMap<String, u64> {
        std::fs::read_to_string(self.dir.join("memory.stat"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .map(|t| t.trim().parse().unwrap_or(0))
            .unwrap_or(0)
    }

    /// A command that runs `program` inside the cgroup.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.dir.join("cgroup.procs"))
            .arg(program);
        c
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The body of `GET path`, over a plain connection.
/// h2load with a stream window of 0 (`-w 0`): every stream gets its head
/// and none can get a byte of its body, while the connections themselves
/// keep moving. 40 such streams against 16 admission slots held every slot
/// for as long as the connections lived (probes got 503); now the answers
/// are read ahead at once, so the slots are free, and each connection
/// closes at `send-timeout`.
#[test]
fn http2_streams_kept_shut_by_h2load_leave_the_service_answering_others() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let guest = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("attacks-suite.wasm");
    std::fs::write(&guest, p2_suite()).unwrap();
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            guest.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
            "--max-concurrent-requests",
            "16",
            "--max-queue-wait",
            "200ms",
            "--send-timeout",
            "3s",
        ],
        &[],
    );
    let addr = sockaddr(&addrs[0]);
    let started = Instant::now();
    let h2load = Command::new("h2load")
        .args(["-w", "0", "-c", "4", "-m", "10", "-n", "40"])
        .arg(format!("http://{addr}/echo"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("h2load is installed (Debian nghttp2-client)");
    std::thread::sleep(Duration::from_millis(500));
    let mut answered = 0;
    for _ in 0..5 {
        answered += probe(addr, Duration::from_secs(2)) as usize;
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = h2load.wait_with_output().unwrap();
    let took = started.elapsed();
    let out = String::from_utf8_lossy(&out.stdout);
    eprintln!("h2load -w 0 ({took:?}):\n{out}");
    assert_eq!(answered, 5, "probes answered during the attack");
    // Every attacking connection was closed at the send timeout; none of
    // its streams got its answer.
    assert!(took < Duration::from_secs(10), "h2load ran {took:?}");
    assert!(
        out.contains("0 succeeded, 40 failed, 40 errored"),
        "the shut streams were answered in full: {out}"
    );
    assert!(probe(addr, Duration::from_secs(2)));
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `POST /echo` with `body` on its own connection; the status, or `None`
/// when the connection ended without one.
fn upload(addr: SocketAddr, body: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    // A refusal may come before the whole body was sent.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    status_of(&String::from_utf8_lossy(&out[..out.len().min(64)]))
}

#[test]
fn a_memory_storm_in_a_cgroup_gets_answers_not_an_oom_kill() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Measured without a budget binding, 48 such uploads peak at about
    // 790 MB; the cgroup allows 640 MiB.
    let cg = MemoryCgroup::new(&format!("wasmpool-storm-{}", std::process::id()), 640 << 20);
    let mut cmd = cg.command(env!("CARGO_BIN_EXE_wasmpool"));
    cmd.args([
        "serve",
        python_p2().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        shared_cache().to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let (mut p, addrs) = Proc::start(cmd, 1);
    let addr = sockaddr(&addrs[0]);
    let body: Vec<u8> = (0..12 << 20).map(|i: u32| (i % 251) as u8).collect();
    let body = std::sync::Arc::new(body);
    let metrics: SocketAddr = p.metrics_addr();
    // What the process holds during the storm: anonymous memory (RSS),
    // and the budget's count of guest memory.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let stat_dir = cg.dir.clone();
        let v2 = cg.v2;
        std::thread::spawn(move || {
            let cg = MemoryCgroup { dir: stat_dir, v2 };
            let (mut rss, mut used) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let st = cg.stat();
                rss = rss.max(*st.get("rss").or(st.get("anon")).unwrap_or(&0));
                let m = http_get(metrics, "/metrics");
                if let Some(v) = m
                    .lines()
                    .find_map(|l| l.strip_prefix("wasmpool_memory_used_bytes "))
                {
                    used = used.max(v.trim().parse().unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            std::mem::forget(cg);
            (rss, used)
        })
    };
    let uploads: Vec<_> = (0..48)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || upload(addr, &body))
        })
        .collect();
    let statuses: Vec<Option<u16>> = uploads.into_iter().map(|t| t.join().unwrap()).collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rss, used) = sampler.join().unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for s in &statuses {
        *counts.entry(*s).or_insert(0) += 1;
    }
    eprintln!(
        "memory storm: {counts:?}; cgroup peak {} MiB of 640 MiB, anonymous memory at most {} MiB, guest memory (budget) at most {} MiB",
        cg.peak() >> 20,
        rss >> 20,
        used >> 20
    );
    assert!(
        p.wait_exit(Duration::ZERO).is_none(),
        "the server died: {}",
        p.log()
    );
    assert_eq!(cg.oom_kills(), 0, "OOM kill in the cgroup");
    for s in &statuses {
        assert!(
            matches!(s, Some(200 | 413 | 500 | 503)),
            "a connection got {s:?}: {counts:?}"
        );
    }
    assert!(
        counts.get(&Some(200)).copied().unwrap_or(0) > 0,
        "{counts:?}"
    );
    // It serves normally afterwards.
    let after = upload(addr, &body[..1 << 20]);
    assert_eq!(after, Some(200));
    // The budget followed the cgroup's limit, less what the process needs.
    let text = http_get(metrics, "/metrics");
    let budget: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("wasmpool_memory_budget_bytes "))
        .expect("budget in the metrics")
        .trim()
        .parse()
        .unwrap();
    assert!(budget > 256 << 20 && budget <= 480 << 20, "budget {budget}");
    assert!(
        p.log().contains("of 640MiB (cgroup memory.limit_in_bytes")
            || p.log().contains("of 640MiB (cgroup memory.max"),
        "{}",
        p.log()
    );
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}
