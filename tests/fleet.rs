//! A fleet of three wasmpool hosts behind Debian's HAProxy (and nginx),
//! under constant load: hosts restarted in turn with the balancer's
//! retries off and on, a host killed with SIGKILL, a new component rolled
//! out host by host. The balancers run the example configurations in
//! deploy/ as they are, but for the retries and where their sockets live.
//!
//! Each host listens on its own loopback address (127.0.0.11-13, ports
//! 8080 and 9090), so these tests run one at a time:
//! `cargo test --test fleet -- --ignored --test-threads=1 --nocapture`
//! (tests/run-all.sh does). Every load loop is bounded in time.
mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

const HOSTS: [&str; 3] = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
/// Where the HAProxy and nginx examples listen.
const HAPROXY: &str = "127.0.0.1:8000";
const NGINX: &str = "127.0.0.1:8001";
/// Clients sending requests back to back, each on a keep-alive connection.
const CLIENTS: usize = 16;
const HELLO: &str = "Hello from wasmpool!\n";
const HELLO_V2: &str = "Hello from wasmpool2\n";

/// The hello example, or a second version of it that answers `HELLO_V2`
/// (the same length, so the WAT needs no other change).
fn hello(v2: bool) -> Vec<u8> {
    let wat = std::fs::read_to_string(root().join("examples/hello/hello.wat")).unwrap();
    assert!(wat.contains("Hello from wasmpool!\\n"));
    let wat = if v2 {
        wat.replace("Hello from wasmpool!\\n", "Hello from wasmpool2\\n")
    } else {
        wat
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hello.wat");
    std::fs::write(&path, wat).unwrap();
    build_component(&path, &root().join("examples/hello/wit"), "hello")
}

/// One wasmpool host: its own component file and process.
struct Host {
    ip: &'static str,
    app: PathBuf,
    cache: PathBuf,
    proc: Option<Proc>,
}

impl Host {
    fn start(&mut self) {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wasmpool"));
        cmd.args(["serve", "--listen", &format!("{}:8080", self.ip)])
            .args(["--metrics-listen", &format!("{}:9090", self.ip)])
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg(&self.app)
            // The shutdown delay at its default, as a user gets it.
            .env_remove("WASMPOOL_SHUTDOWN_DELAY");
        let (proc, _) = Proc::start(cmd, 1);
        self.proc = Some(proc);
    }

    fn admin(&self) -> SocketAddr {
        format!("{}:9090", self.ip).parse().unwrap()
    }

    /// SIGTERM, and the time the process took to exit.
    fn stop(&mut self) -> Duration {
        let mut p = self.proc.take().expect("running");
        let t = Instant::now();
        p.signal(SIGTERM);
        let status = p
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit after SIGTERM: {}", self.ip, p.log()));
        assert!(status.success(), "{}: {status:?}: {}", self.ip, p.log());
        t.elapsed()
    }

    fn kill(&mut self) {
        let mut p = self.proc.take().expect("running");
        p.signal(libc::SIGKILL);
        p.wait_exit(Duration::from_secs(10)).expect("killed");
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&admin_get(self.admin(), "/metrics").1, name)
    }
}

/// GET on an admin port: status and body.
fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = status_of(&text).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with(' '))
        .map(|rest| rest.trim().parse::<f64>().unwrap_or(0.0))
        .sum()
}

/// Three hosts, each serving `examples/hello.wasm` from a file of its own.
struct Fleet {
    dir: tempfile::TempDir,
    hosts: Vec<Host>,
}

impl Fleet {
    fn start() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let hello = hello(false);
        let hosts = HOSTS
            .iter()
            .map(|ip| {
                let app = dir.path().join(format!("{ip}.wasm"));
                std::fs::write(&app, &hello).unwrap();
                let mut h = Host {
                    ip,
                    app,
                    cache: cache.clone(),
                    proc: None,
                };
                h.start();
                h
            })
            .collect();
        Fleet { dir, hosts }
    }
}

/// A balancer process and where it listens.
struct Balancer {
    proc: Proc,
    addr: SocketAddr,
    /// HAProxy's stats socket.
    stats: Option<PathBuf>,
}

impl Balancer {
    /// HAProxy with deploy/haproxy/haproxy.cfg: as it is (`retries`), or
    /// with every retry turned off.
    fn haproxy(dir: &Path, retries: bool) -> Balancer {
        let mut cfg = std::fs::read_to_string(root().join("deploy/haproxy/haproxy.cfg")).unwrap();
        let sock = dir.join("haproxy.sock");
        cfg = cfg.replace("/run/haproxy/admin.sock", sock.to_str().unwrap());
        if !retries {
            assert!(cfg.contains("    retries 3\n"));
            cfg = cfg
                .replace("    retries 3\n", "    retries 0\n")
                .lines()
                .filter(|l| !l.trim_start().starts_with("option redispatch"))
                .filter(|l| !l.trim_start().starts_with("retry-on"))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n";
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut cmd = std::process::Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&path);
        let proc = Proc::spawn(&mut cmd);
        let b = Balancer {
            proc,
            addr: HAPROXY.parse().unwrap(),
            stats: Some(sock),
        };
        b.wait_up(3);
        b
    }

    /// nginx with deploy/nginx/wasmpool-upstream.conf included in a main
    /// configuration of the test's own.
    fn nginx(dir: &Path) -> Balancer {
        let main = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\npid {dir}/nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  \
             include {conf};\n}}\n",
            dir = dir.display(),
            conf = root().join("deploy/nginx/wasmpool-upstream.conf").display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, main).unwrap();
        let mut cmd = std::process::Command::new("nginx");
        cmd.arg("-c").arg(&path).arg("-e").arg("stderr");
        let proc = Proc::spawn(&mut cmd);
        let b = Balancer {
            proc,
            addr: NGINX.parse().unwrap(),
            stats: None,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while one_request(b.addr).is_err() {
            assert!(
                Instant::now() < end,
                "nginx does not answer: {}",
                b.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// HAProxy's view of each server: name -> status (UP, DOWN, ...) and
    /// current sessions.
    fn servers(&self) -> Vec<(String, String, u64)> {
        let Some(sock) = &self.stats else {
            return Vec::new();
        };
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
            return Vec::new();
        };
        let _ = s.write_all(b"show stat\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |n: &str| header.iter().position(|h| *h == n);
        let (Some(px), Some(sv), Some(st), Some(cur)) =
            (col("pxname"), col("svname"), col("status"), col("scur"))
        else {
            return Vec::new();
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > cur && f[px] == "wasmpool" && f[sv].starts_with("web"))
            .map(|f| {
                (
                    f[sv].to_string(),
                    f[st].to_string(),
                    f[cur].parse().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Waits (30 s at most) until `n` servers are UP in HAProxy.
    fn wait_up(&self, n: usize) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.servers().iter().filter(|s| s.1 == "UP").count();
            if up >= n {
                return;
            }
            assert!(
                Instant::now() < end,
                "HAProxy has {up} servers up, not {n}: {:?}\n{}",
                self.servers(),
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Balancer {
    /// Stops the balancer with its own graceful signal, so nginx's workers
    /// do not outlive a failed test holding the port.
    fn drop(&mut self) {
        self.proc.signal(SIGTERM);
        let _ = self.proc.wait_exit(Duration::from_secs(10));
    }
}

/// Sends one GET / and reads the whole response: its status and body.
fn one_request(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(s.try_clone()?);
    request(&mut s, &mut r)
}

/// One request on a keep-alive connection; the response's status and body
/// (by Content-Length or chunked, as the guest's streamed body arrives).
fn request(s: &mut TcpStream, r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String)> {
    request_on(s, r).map(|(status, body, _)| (status, body))
}

/// [`request`], and whether the connection stays open (the response did
/// not say `Connection: close`, as nginx does after keepalive_requests).
fn request_on(
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
) -> std::io::Result<(u16, String, bool)> {
    let fail = |what: &str| std::io::Error::other(what.to_string());
    s.write_all(b"GET / HTTP/1.1\r\nHost: fleet\r\n\r\n")?;
    let line = read_line(r)?.ok_or_else(|| fail("connection closed before a response"))?;
    let status = status_of(&line).ok_or_else(|| fail(&format!("bad status line {line:?}")))?;
    let (mut len, mut chunked, mut keep) = (None, false, true);
    loop {
        let h = read_line(r)?.ok_or_else(|| fail("connection closed in the head"))?;
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.trim().eq_ignore_ascii_case("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                keep = !v.trim().eq_ignore_ascii_case("close");
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let size = read_line(r)?.ok_or_else(|| fail("connection closed in a chunk"))?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| fail(&format!("bad chunk size {size:?}")))?;
            if size == 0 {
                // Trailers (none expected), then the blank line.
                while !read_line(r)?
                    .ok_or_else(|| fail("closed in trailers"))?
                    .is_empty()
                {}
                break;
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])?;
            read_line(r)?;
        }
    } else {
        let len = len.ok_or_else(|| fail("neither content-length nor chunked"))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
}

/// A line without its CRLF; `None` at the end of the stream.
fn read_line(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

/// What a load run counted.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests written and not yet answered.
    in_flight: AtomicU64,
    v2: AtomicU64,
    /// The first failures, for the report.
    reasons: std::sync::Mutex<Vec<String>>,
}

/// Constant load through a balancer: `CLIENTS` threads, each sending
/// `GET /` back to back on a keep-alive connection (a new one after any
/// failure) until stopped, or for at most `limit`.
struct Load {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, limit: Duration) -> Load {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let end = Instant::now() + limit;
        let threads = (0..CLIENTS)
            .map(|_| {
                let (counts, stop) = (counts.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
                    while !stop.load(Relaxed) && Instant::now() < end {
                        let (s, r) = match &mut conn {
                            Some(c) => c,
                            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                                .and_then(|s| {
                                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                                    let r = BufReader::new(s.try_clone()?);
                                    Ok((s, r))
                                }) {
                                Ok(c) => conn.insert(c),
                                Err(e) => {
                                    // The balancer itself refused: a failure too.
                                    counts.failed.fetch_add(1, Relaxed);
                                    note(&counts, format!("connect to the balancer: {e}"));
                                    std::thread::sleep(Duration::from_millis(10));
                                    continue;
                                }
                            },
                        };
                        counts.sent.fetch_add(1, Relaxed);
                        counts.in_flight.fetch_add(1, Relaxed);
                        let result = request_on(s, r);
                        counts.in_flight.fetch_sub(1, Relaxed);
                        match result {
                            Ok((200, body, keep)) if body == HELLO || body == HELLO_V2 => {
                                counts.ok.fetch_add(1, Relaxed);
                                if body == HELLO_V2 {
                                    counts.v2.fetch_add(1, Relaxed);
                                }
                                if !keep {
                                    conn = None;
                                }
                            }
                            Ok((status, body, _)) => {
                                counts.failed.fetch_add(1, Relaxed);
                                note(&counts, format!("{status}: {}", body.trim()));
                                conn = None;
                            }
                            Err(e) => {
                                counts.failed.fetch_add(1, Relaxed);
                                note(&counts, format!("{e}"));
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            counts,
            stop,
            threads,
        }
    }

    fn finish(self) -> Arc<Counts> {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.counts
    }
}

fn note(counts: &Counts, why: String) {
    let mut r = counts.reasons.lock().unwrap();
    if r.len() < 10 {
        r.push(why);
    }
}

fn report(scenario: &str, c: &Counts, extra: &str) {
    println!(
        "fleet: {scenario}: {} requests sent, {} ok, {} failed{extra}; first failures: {:?}",
        c.sent.load(Relaxed),
        c.ok.load(Relaxed),
        c.failed.load(Relaxed),
        c.reasons.lock().unwrap()
    );
}

/// Waits until `host` answers /readyz with 200.
fn wait_ready(host: &Host) {
    let end = Instant::now() + Duration::from_secs(30);
    while admin_get(host.admin(), "/readyz").0 != 200 {
        assert!(Instant::now() < end, "{} never became ready", host.ip);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Restarts every host in turn (SIGTERM, wait for the exit, start again,
/// wait until the balancer sends to it again) under constant load.
fn rolling_restart(fleet: &mut Fleet, lb: &Balancer) -> (Arc<Counts>, Vec<Duration>) {
    let load = Load::start(lb.addr, Duration::from_secs(300));
    std::thread::sleep(Duration::from_secs(2));
    let mut stops = Vec::new();
    for i in 0..fleet.hosts.len() {
        let before = fleet.hosts[i].metric("wasmpool_requests_total{class=\"2xx\"}");
        assert!(
            before > 0.0,
            "{} served nothing before its restart",
            fleet.hosts[i].ip
        );
        stops.push(fleet.hosts[i].stop());
        fleet.hosts[i].start();
        wait_ready(&fleet.hosts[i]);
        if lb.stats.is_some() {
            lb.wait_up(3);
        }
        // Traffic comes back to the new process.
        let end = Instant::now() + Duration::from_secs(20);
        while fleet.hosts[i].metric("wasmpool_requests_total{class=\"2xx\"}") < 10.0 {
            assert!(
                Instant::now() < end,
                "no traffic returned to {}",
                fleet.hosts[i].ip
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    (load.finish(), stops)
}

fn need(tool: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed (tests/run-all.sh installs it)"
    );
}

#[test]
#[ignore = "a fleet on fixed loopback addresses: tests/run-all.sh runs it alone"]
fn haproxy_rolling_restart_with_retries_off_fails_nothing() {
    need("haproxy");
    let mut fleet = Fleet::start();
    let lb = Balancer::haproxy(fleet.dir.path(), false);
    let (c, stops) = rolling_restart(&mut fleet, &lb);
    report(
        "HAProxy, retries off, each host restarted in turn",
        &c,
        &format!(", SIGTERM to exit {stops:.1?}"),
    );
    assert!(c.sent.load(Relaxed) > 1000, "too little load to tell");
    assert_eq!(c.failed.load(Relaxed), 0, "{:?}", c.reasons.lock().unwrap());
    // Each host kept serving through its shutdown delay (5 s by default).
    assert!(
        stops.iter().all(|d| *d >= Duration::from_secs(5)),
        "{stops:?}"
    );
}

#[test]
#[ignore = "a fleet on fixed loopback addresses: tests/run-all.sh runs it alone"]
fn haproxy_rolling_restart_with_retries_on_fails_nothing() {
    need("haproxy");
    let mut fleet = Fleet::start();
    let lb = Balancer::haproxy(fleet.dir.path(), true);
    let (c, _) = rolling_restart(&mut fleet, &lb);
    report("HAProxy, retries on, each host restarted in turn", &c, "");
    assert!(c.sent.load(Relaxed) > 1000, "too little load to tell");
    assert_eq!(c.failed.load(Relaxed), 0, "{:?}", c.reasons.lock().unwrap());
}

#[test]
#[ignore = "a fleet on fixed loopback addresses: tests/run-all.sh runs it alone"]
fn haproxy_sigkill_loses_at_most_the_requests_in_flight_and_traffic_returns() {
    need("haproxy");
    let mut fleet = Fleet::start();
    let lb = Balancer::haproxy(fleet.dir.path(), true);
    let load = Load::start(lb.addr, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    // Requests in flight just before the kill: on the victim (HAProxy's
    // current sessions to it) and in the whole fleet (the clients').
    let on_victim = lb
        .servers()
        .iter()
        .find(|s| s.0 == "web2")
        .map_or(0, |s| s.2);
    let in_flight = load.counts.in_flight.load(Relaxed);
    let failed_before = load.counts.failed.load(Relaxed);
    fleet.hosts[1].kill();
    std::thread::sleep(Duration::from_secs(4));
    let failed_by_kill = load.counts.failed.load(Relaxed) - failed_before;
    fleet.hosts[1].start();
    wait_ready(&fleet.hosts[1]);
    lb.wait_up(3);
    let end = Instant::now() + Duration::from_secs(20);
    while fleet.hosts[1].metric("wasmpool_requests_total{class=\"2xx\"}") < 10.0 {
        assert!(
            Instant::now() < end,
            "no traffic returned to the restarted host"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = load.finish();
    report(
        "HAProxy, retries on, one host killed (SIGKILL) and started again",
        &c,
        &format!(
            ", {failed_by_kill} failed by the kill; in flight at the kill: {on_victim} on the killed host, {in_flight} in the fleet; traffic returned to it"
        ),
    );
    assert_eq!(failed_before, 0, "{:?}", c.reasons.lock().unwrap());
    assert!(
        failed_by_kill <= in_flight,
        "{failed_by_kill} failed, more than the {in_flight} in flight: {:?}",
        c.reasons.lock().unwrap()
    );
    assert_eq!(
        c.failed.load(Relaxed),
        failed_by_kill,
        "failures after the restart"
    );
}

#[test]
#[ignore = "a fleet on fixed loopback addresses: tests/run-all.sh runs it alone"]
fn haproxy_rollout_of_a_new_component_by_sighup_fails_nothing() {
    need("haproxy");
    let fleet = Fleet::start();
    let lb = Balancer::haproxy(fleet.dir.path(), false);
    let v2 = hello(true);
    let load = Load::start(lb.addr, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    for h in &fleet.hosts {
        // The new version replaces the file atomically, as a package or a
        // deploy tool would, then SIGHUP.
        let tmp = h.app.with_extension("new");
        std::fs::write(&tmp, &v2).unwrap();
        std::fs::rename(&tmp, &h.app).unwrap();
        h.proc.as_ref().unwrap().signal(SIGHUP);
        let end = Instant::now() + Duration::from_secs(60);
        while h.metric("wasmpool_reloads_total") < 1.0 {
            assert!(Instant::now() < end, "{} did not reload", h.ip);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // Only the new version answers now.
    let v2_before = load.counts.v2.load(Relaxed);
    let ok_before = load.counts.ok.load(Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    let c = load.finish();
    report(
        "HAProxy, retries off, new component rolled out host by host (SIGHUP)",
        &c,
        &format!(", {} answered by the new version", c.v2.load(Relaxed)),
    );
    assert_eq!(c.failed.load(Relaxed), 0, "{:?}", c.reasons.lock().unwrap());
    assert_eq!(
        c.ok.load(Relaxed) - ok_before,
        c.v2.load(Relaxed) - v2_before,
        "the old version still answered after every host reloaded"
    );
}

#[test]
#[ignore = "a fleet on fixed loopback addresses: tests/run-all.sh runs it alone"]
fn nginx_rolling_restart_fails_nothing() {
    need("nginx");
    let mut fleet = Fleet::start();
    let lb = Balancer::nginx(fleet.dir.path());
    let (c, _) = rolling_restart(&mut fleet, &lb);
    report(
        "nginx upstream (passive checks, proxy_next_upstream), each host restarted in turn",
        &c,
        "",
    );
    assert!(c.sent.load(Relaxed) > 1000, "too little load to tell");
    assert_eq!(c.failed.load(Relaxed), 0, "{:?}", c.reasons.lock().unwrap());
}
