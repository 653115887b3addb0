//! The production HTTP front, through the `wasmpool` binary: TLS (curl,
//! a certificate swapped on SIGHUP, bad certificates, testssl), HTTP/2
//! over TLS and with prior knowledge (curl, h2load, the limits), the access
//! log in both formats, health endpoints through a drain, and what a guest
//! may be granted (read-only and read-write directories, wasi:config).
//! curl, testssl (Debian `testssl.sh`) and h2load (`nghttp2-client`) are
//! installed by the README's test command.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A test certificate authority and certificates it issues for
/// `localhost` and 127.0.0.1.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "wasmpool test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// (certificate PEM, key PEM, certificate DER).
    fn issue(&self, name: &str) -> (String, String, Vec<u8>) {
        let mut p =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn write_pem(&self, dir: &Path) -> PathBuf {
        let p = dir.join("ca.pem");
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.to_string_lossy().into_owned()
}

/// curl with `args`: (HTTP status, HTTP version, body).
fn curl(args: &[&str]) -> (String, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, version) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.to_string(), version.to_string(), body.to_string())
}

/// A TLS connection (HTTP/1.1, keep-alive) that trusts `ca`.
struct TlsConn {
    stream: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl TlsConn {
    fn open(addr: SocketAddr, ca: &Ca) -> TlsConn {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream.flush().unwrap();
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).unwrap();
        }
        TlsConn { stream }
    }

    /// The certificate the server presented (DER).
    fn server_cert(&self) -> Vec<u8> {
        self.stream.conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// `GET /` on this connection: the status line and body.
    fn get(&mut self) -> String {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .unwrap();
        // The whole response, so the next one starts clean: up to its
        // Content-Length, or to the last chunk.
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let head = head.to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let done = match length {
                    Some(n) => body.len() >= n,
                    None => body.ends_with("0\r\n\r\n"),
                };
                if done {
                    assert!(text.contains("hello from p2\n"), "{text}");
                    return text;
                }
            }
            let n = self.stream.read(&mut buf).unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
    }
}

fn p2_file(dir: &Path) -> String {
    write(dir, "p2.wasm", &p2_suite())
}

/// The address of the listener printed with `scheme`.
fn addr_of(addrs: &[String], scheme: &str) -> SocketAddr {
    sockaddr(
        addrs
            .iter()
            .find(|a| a.starts_with(scheme))
            .unwrap_or_else(|| panic!("no {scheme} listener in {addrs:?}")),
    )
}

#[test]
fn tls_and_plain_listeners_serve_http1_and_http2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key, _) = ca.issue("first");
    let cert = write(dir.path(), "cert.pem", cert.as_bytes());
    let key = write(dir.path(), "key.pem", key.as_bytes());
    let ca_pem = ca.write_pem(dir.path());
    let guest = p2_file(dir.path());
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--no-cache",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "http://127.0.0.1:0",
        ],
        &[],
    );
    let tls = addr_of(&addrs, "https://");
    let plain = addr_of(&addrs, "http://");
    let url = format!("https://localhost:{}/", tls.port());
    let resolve = format!("localhost:{}:127.0.0.1", tls.port());
    let ca = ca_pem.to_str().unwrap();
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (code, v, body) = curl(&["--cacert", ca, "--resolve", &resolve, flag, &url]);
        assert_eq!(
            (code.as_str(), v.as_str(), body.as_str()),
            ("200", version, "hello from p2\n"),
            "{flag}"
        );
    }
    let plain_url = format!("http://{plain}/");
    let (code, v, _) = curl(&["--http2-prior-knowledge", &plain_url]);
    assert_eq!((code.as_str(), v.as_str()), ("200", "2"));
    let (code, v, _) = curl(&[&plain_url]);
    assert_eq!((code.as_str(), v.as_str()), ("200", "1.1"));
    // Plain HTTP to the TLS port, TLS to the plain port: no answer.
    let (code, _, _) = curl(&[&format!("http://{tls}/")]);
    assert_eq!(code, "000");
    let (code, _, _) = curl(&["--cacert", ca, &format!("https://{plain}/")]);
    assert_eq!(code, "000");
    // TLS below 1.2 is not offered.
    let (code, _, _) = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &resolve,
        "--tlsv1.1",
        "--tls-max",
        "1.1",
        &url,
    ]);
    assert_eq!(code, "000");
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}

#[test]
fn a_certificate_swapped_on_sighup_serves_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (c1, k1, der1) = ca.issue("first");
    let cert = write(dir.path(), "cert.pem", c1.as_bytes());
    let key = write(dir.path(), "key.pem", k1.as_bytes());
    let guest = p2_file(dir.path());
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--no-cache",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--listen",
            "127.0.0.1:0",
            "--max-instance-reuse-count",
            "8",
        ],
        &[],
    );
    let addr = addr_of(&addrs, "https://");
    let mut before = TlsConn::open(addr, &ca);
    assert_eq!(before.server_cert(), der1);
    assert!(before.get().starts_with("HTTP/1.1 200"));

    let reloads = |p: &Proc, what: &str| p.log().matches(what).count();
    let (c2, k2, der2) = ca.issue("second");
    std::fs::write(&cert, &c2).unwrap();
    std::fs::write(&key, &k2).unwrap();
    p.signal(SIGHUP);
    let end = Instant::now() + Duration::from_secs(30);
    while reloads(&p, "reloaded; new requests go to the new component") < 1 {
        assert!(Instant::now() < end, "no reload: {}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut after = TlsConn::open(addr, &ca);
    assert_eq!(
        after.server_cert(),
        der2,
        "the new certificate for a new connection"
    );
    assert!(after.get().starts_with("HTTP/1.1 200"));
    // The connection opened before keeps working, with its certificate.
    assert!(before.get().starts_with("HTTP/1.1 200"));
    assert_eq!(before.server_cert(), der1);

    // A broken certificate, then a key that does not match: the reload
    // fails and the last good certificate stays.
    for (c, k, why) in [
        (
            "not a certificate\n".to_string(),
            k2.clone(),
            "no certificate in it",
        ),
        (
            c2.clone(),
            ca.issue("third").1,
            "does not match the certificate",
        ),
    ] {
        std::fs::write(&cert, &c).unwrap();
        std::fs::write(&key, &k).unwrap();
        let failed = reloads(&p, "reload failed");
        p.signal(SIGHUP);
        let end = Instant::now() + Duration::from_secs(30);
        while reloads(&p, "reload failed") == failed {
            assert!(Instant::now() < end, "no failed reload: {}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(p.log().contains(why), "{why}: {}", p.log());
        let mut c = TlsConn::open(addr, &ca);
        assert_eq!(c.server_cert(), der2);
        assert!(c.get().starts_with("HTTP/1.1 200"));
    }
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}

#[test]
fn bad_tls_settings_are_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (c1, k1, _) = ca.issue("first");
    let (_, k2, _) = ca.issue("other");
    let cert = write(dir.path(), "cert.pem", c1.as_bytes());
    let key = write(dir.path(), "key.pem", k1.as_bytes());
    let other_key = write(dir.path(), "other.pem", k2.as_bytes());
    let empty = write(dir.path(), "empty.pem", b"# nothing here\n");
    let guest = p2_file(dir.path());
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_wasmpool"))
            .args(["serve", &guest, "--no-cache", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, needle) in [
        (
            vec!["--tls-cert", "/nonexistent.pem", "--tls-key", &key],
            "cannot read certificate /nonexistent.pem",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", "/nonexistent.pem"],
            "cannot read private key",
        ),
        (
            vec!["--tls-cert", &empty, "--tls-key", &key],
            "no certificate in it",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &empty],
            "no private key in it",
        ),
        (
            vec!["--tls-cert", &key, "--tls-key", &key],
            "no certificate in it",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            "does not match the certificate",
        ),
        (
            vec!["--listen", "https://127.0.0.1:0"],
            "TLS needs tls-cert and tls-key",
        ),
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
        assert_eq!(
            err.trim()
                .lines()
                .filter(|l| l.starts_with("error:"))
                .count(),
            1,
            "{err}"
        );
    }
    let (code, err) = run(&["--tls-cert", &cert]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tls-key"), "{err}");
}

#[test]
fn testssl_finds_nothing_vulnerable_and_no_old_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (c, k, _) = ca.issue("testssl");
    let cert = write(dir.path(), "cert.pem", c.as_bytes());
    let key = write(dir.path(), "key.pem", k.as_bytes());
    let guest = p2_file(dir.path());
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--no-cache",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = addr_of(&addrs, "https://");
    let json = dir.path().join("testssl.json");
    // Protocols, cipher categories, forward secrecy, server preferences and
    // the known vulnerabilities (the certificate is the test CA's, so the
    // trust checks are left out).
    let out = Command::new("testssl")
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "-p",
            "-s",
            "-f",
            "-P",
            "-U",
            "--jsonfile",
        ])
        .arg(&json)
        .arg(addr.to_string())
        .output()
        .expect("testssl is installed (Debian testssl.sh)");
    let report: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json).unwrap())
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(report.len() > 20, "{report:?}");
    let bad: Vec<_> = report
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("MEDIUM" | "HIGH" | "CRITICAL")))
        .collect();
    assert!(bad.is_empty(), "testssl findings: {bad:#?}");
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        let f = report
            .iter()
            .find(|f| f["id"] == old)
            .unwrap_or_else(|| panic!("no {old} in the report"));
        assert!(
            f["finding"].as_str().unwrap().contains("not offered"),
            "{f}"
        );
    }
    for new in ["TLS1_2", "TLS1_3"] {
        let f = report.iter().find(|f| f["id"] == new).unwrap();
        assert!(f["finding"].as_str().unwrap().starts_with("offered"), "{f}");
    }
    eprintln!("testssl: {} findings, none MEDIUM or worse", report.len());
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}

/// h2load's counts: (succeeded, failed, errored).
fn h2load(url: &str, extra: &[&str]) -> (u64, u64, u64) {
    let out = Command::new("h2load")
        .args(["-n", "3000", "-c", "4", "-m", "16"])
        .args(extra)
        .arg(url)
        .output()
        .expect("h2load is installed (Debian nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("{text}"));
    let num = |what: &str| -> u64 {
        line.split(',')
            .find(|p| p.trim().ends_with(what))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{what} in {line}"))
    };
    (num("succeeded"), num("failed"), num("errored"))
}

#[test]
fn http2_under_h2load_and_with_the_limits_of_http1() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (c, k, _) = ca.issue("h2");
    let cert = write(dir.path(), "cert.pem", c.as_bytes());
    let key = write(dir.path(), "key.pem", k.as_bytes());
    let guest = p2_file(dir.path());
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--no-cache",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "http://127.0.0.1:0",
            "--access-log",
            "off",
            "--max-instance-reuse-count",
            "64",
        ],
        &[],
    );
    for url in [
        format!("https://{}/", addr_of(&addrs, "https://")),
        format!("http://{}/", addr_of(&addrs, "http://")),
    ] {
        let (ok, failed, errored) = h2load(&url, &[]);
        eprintln!("h2load {url}: {ok} succeeded, {failed} failed, {errored} errored");
        assert_eq!((ok, failed, errored), (3000, 0, 0), "{url}");
    }
    assert_eq!(p.stop(SIGTERM).code(), Some(0));

    // The limits hold per request on HTTP/2 as on HTTP/1.
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--no-cache",
            "--listen",
            "127.0.0.1:0",
            "--max-request-body-size",
            "1KiB",
            "--max-request-headers",
            "20",
            "--request-timeout",
            "500ms",
            "--max-concurrent-requests",
            "1",
            "--max-queued-requests",
            "0",
        ],
        &[],
    );
    let base = format!("http://{}", addr_of(&addrs, "http://"));
    let h2 = |args: &[&str]| {
        let mut all = vec!["--http2-prior-knowledge"];
        all.extend_from_slice(args);
        let (code, version, _) = curl(&all);
        assert_eq!(version, "2", "{args:?}");
        code
    };
    let big = "x".repeat(4096);
    // Many times: the answer must reach the client before its stream ends
    // (curl reports a reset that comes while it still sends as an error).
    for _ in 0..20 {
        assert_eq!(h2(&["--data-binary", &big, &format!("{base}/echo")]), "413");
    }
    let headers: Vec<String> = (0..30).map(|i| format!("x-h{i}: v")).collect();
    let mut args: Vec<&str> = headers.iter().flat_map(|h| ["-H", h.as_str()]).collect();
    let url = format!("{base}/");
    args.push(&url);
    assert_eq!(h2(&args), "431");
    let long = format!("x-long: {}", "y".repeat(20 << 10));
    assert_eq!(h2(&["-H", &long, &url]), "431");
    assert_eq!(h2(&[&format!("{base}/sleep/3000")]), "504");
    // One slot, no queue: a second request while one runs gets 503.
    let slow = {
        let url = format!("{base}/sleep/450");
        std::thread::spawn(move || curl(&["--http2-prior-knowledge", &url]).0)
    };
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(h2(&[&url]), "503");
    assert_eq!(slow.join().unwrap(), "200");
    assert_eq!(h2(&[&url]), "200");
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}

#[test]
fn the_access_log_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let guest = p2_file(dir.path());
    for format in ["human", "json"] {
        let (p, addrs) = Proc::serve(
            &[
                "serve",
                &guest,
                "--no-cache",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                format,
            ],
            &[],
        );
        let addr = sockaddr(&addrs[0]);
        let (code, _, _) = curl(&["--data-binary", "hello", &format!("http://{addr}/echo?q=1")]);
        assert_eq!(code, "200");
        let (code, _, _) = curl(&[&format!("http://{addr}/trap")]);
        assert_eq!(code, "500");
        let end = Instant::now() + Duration::from_secs(10);
        while p.log().matches("access").count() < 2 {
            assert!(Instant::now() < end, "{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = p.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("access")).collect();
        if format == "human" {
            let l = lines[0];
            for needle in [
                "access:",
                "method=POST target=/echo?q=1 version=HTTP/1.1 status=200",
                "client=127.0.0.1",
                "bytes_in=5",
                "instance=",
                "reused=false",
                "duration_ms=",
                "version=HTTP/1.1",
                "complete=true",
            ] {
                assert!(l.contains(needle), "{needle} in {l}");
            }
            assert!(
                lines[1].contains("target=/trap version=HTTP/1.1 status=500")
                    && lines[1].contains("instance=-1"),
                "{}",
                lines[1]
            );
        } else {
            let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
            assert_eq!(v["target"], "access");
            let f = &v["fields"];
            assert_eq!(f["status"], 200);
            assert_eq!(f["method"], "POST");
            assert_eq!(f["target"], "/echo?q=1");
            assert_eq!(f["bytes_in"], 5);
            assert!(f["bytes_out"].as_u64().unwrap() > 5, "{f}");
            assert!(f["instance"].as_i64().unwrap() >= 1, "{f}");
            assert_eq!(f["reused"], false);
            assert_eq!(f["client"], "127.0.0.1");
            assert_eq!(f["complete"], true, "{f}");
        }
        assert_eq!(p.stop(SIGTERM).code(), Some(0));
    }
    // Off: no line.
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--no-cache",
            "--listen",
            "127.0.0.1:0",
            "--access-log",
            "off",
        ],
        &[],
    );
    let (code, _, _) = curl(&[&format!("http://{}/", sockaddr(&addrs[0]))]);
    assert_eq!(code, "200");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!p.log().contains("access"), "{}", p.log());
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}

#[test]
fn readiness_turns_503_at_sigterm_while_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let guest = p2_file(dir.path());
    let (mut p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--no-cache",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = sockaddr(&addrs[0]);
    let admin = format!("http://{}", p.metrics_addr());
    assert_eq!(curl(&[&format!("{admin}/healthz")]).0, "200");
    assert_eq!(curl(&[&format!("{admin}/readyz")]).0, "200");
    assert_eq!(curl(&[&format!("{admin}/nope")]).0, "404");
    let slow = std::thread::spawn(move || curl(&[&format!("http://{addr}/sleep/2000")]));
    std::thread::sleep(Duration::from_millis(300));
    p.signal(SIGTERM);
    let t = Instant::now();
    loop {
        let (code, _, _) = curl(&[&format!("{admin}/readyz")]);
        if code == "503" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(1), "readyz still {code}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still alive (and answering) while the request drains.
    assert_eq!(curl(&[&format!("{admin}/healthz")]).0, "200");
    assert!(
        curl(&[&format!("{admin}/metrics")])
            .2
            .contains("wasmpool_in_flight_requests 1")
    );
    let (code, _, body) = slow.join().unwrap();
    assert_eq!((code.as_str(), body.as_str()), ("200", "slept\n"));
    assert_eq!(
        p.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn a_guest_gets_only_the_directories_and_variables_it_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["ro", "rw", "secret"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("ro/hello.txt"), "file contents").unwrap();
    std::fs::write(d.join("secret/s.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(d.join("secret/s.txt"), d.join("ro/link")).unwrap();
    let guest = write(d, "grants.wasm", &python_guest("grants"));
    let cfg = write(
        d,
        "app.toml",
        format!(
            "dir = [\"{ro}::/data\"]\ndir-rw = [\"{rw}::/scratch\"]\n\
             [config-vars]\ngreeting = \"hi\"\nshared = \"from the table\"\n",
            ro = d.join("ro").display(),
            rw = d.join("rw").display()
        )
        .as_bytes(),
    );
    let cache = shared_cache();
    let (p, addrs) = Proc::serve(
        &[
            "serve",
            &guest,
            "--config",
            &cfg,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--config-var",
            "shared=from the flag",
        ],
        &[],
    );
    let base = format!("http://{}", sockaddr(&addrs[0]));
    let get = |path: &str| {
        let (code, _, body) = curl(&[&format!("{base}{path}")]);
        (code, body)
    };
    assert_eq!(
        get("/read/data/hello.txt"),
        ("200".into(), "file contents".into())
    );
    assert_eq!(get("/list/data").0, "200");
    let (code, body) = get("/write/data/new.txt");
    assert_eq!(code, "403", "{body}");
    assert!(!d.join("ro/new.txt").exists());
    assert_eq!(get("/write/scratch/new.txt").0, "200");
    assert_eq!(
        std::fs::read_to_string(d.join("rw/new.txt")).unwrap(),
        "written"
    );
    // Nothing outside the grants: not the host path, not through a
    // symlink out of the directory.
    let outside = format!("/read{}", d.join("secret/s.txt").display());
    assert_eq!(get(&outside).0, "404");
    let (code, body) = get("/read/data/link");
    assert_ne!(code, "200", "{body}");
    assert!(!body.contains("secret"), "{body}");
    assert_eq!(get("/config/greeting"), ("200".into(), "hi".into()));
    assert_eq!(
        get("/config/shared"),
        ("200".into(), "from the flag".into())
    );
    assert_eq!(get("/config/HOME").0, "404");
    assert_eq!(p.stop(SIGTERM).code(), Some(0));

    // Bad grants: a directory that is not there, a malformed variable.
    for (args, code, needle) in [
        (
            vec!["--dir", "/nonexistent/dir"],
            1,
            "directory /nonexistent/dir",
        ),
        (vec!["--dir", "::/data"], 2, "HOST or HOST::GUEST"),
        (vec!["--config-var", "novalue"], 2, "KEY=VALUE"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wasmpool"))
            .args(["serve", &guest, "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn inherited_sockets_serve_tls_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (c, k, _) = ca.issue("inherited");
    let cert = write(dir.path(), "cert.pem", c.as_bytes());
    let key = write(dir.path(), "key.pem", k.as_bytes());
    let ca_pem = ca.write_pem(dir.path());
    let guest = p2_file(dir.path());
    let port = |_: ()| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (web, health) = (port(()), port(()));
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &format!("127.0.0.1:{web}"),
        "-l",
        &format!("127.0.0.1:{health}"),
    ])
    .arg("--fdname=web:health")
    .arg(env!("CARGO_BIN_EXE_wasmpool"))
    .args([
        "serve",
        &guest,
        "--no-cache",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ])
    .args(["--tls-socket", "web"]);
    let p = Proc::spawn(&mut cmd);
    // The first connection (to either socket) starts wasmpool.
    let plain = format!("http://127.0.0.1:{health}/");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, _, _) = curl(&[&plain]);
        if code == "200" {
            break;
        }
        assert!(Instant::now() < end, "not served: {}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("https://localhost:{web}/");
    let resolve = format!("localhost:{web}:127.0.0.1");
    let (code, version, _) = curl(&[
        "--cacert",
        ca_pem.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!((code.as_str(), version.as_str()), ("200", "2"));
    let log = p.log();
    assert!(
        log.contains(&format!(
            "Serving HTTPS on https://127.0.0.1:{web}/ (inherited: web)"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "Serving HTTP on http://127.0.0.1:{health}/ (inherited: health)"
        )),
        "{log}"
    );
    assert_eq!(p.stop(SIGTERM).code(), Some(0));
}
