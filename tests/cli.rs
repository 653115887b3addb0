//! The `wasmpool` binary: check, compile, serve, and what bad input gets.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn wasmpool(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmpool"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_string_lossy().into_owned()
}

/// A failure: non-zero exit, the reason on the first stderr line, no panic.
fn assert_clean_error(code: i32, stderr: &str, needle: &str) {
    assert_ne!(code, 0, "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(first.starts_with("error: "), "{stderr}");
    assert!(first.contains(needle), "expected `{needle}` in: {stderr}");
}

#[test]
fn check_names_the_world() {
    let dir = tempfile::tempdir().unwrap();
    let p2 = write(dir.path(), "p2.wasm", &p2_suite());
    let p3 = write(dir.path(), "p3.wasm", &p3_suite());
    let envs = [("XDG_CACHE_HOME", dir.path().to_str().unwrap())];
    let (code, out, err) = wasmpool(&["check", &p2], &envs);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("WASIp2 (wasi:http/incoming-handler@0.2.12)") && out.contains("ok"),
        "{out}"
    );
    assert!(
        out.contains("up to 1 request per instance, 1 at a time"),
        "{out}"
    );
    let (code, out, err) = wasmpool(&["check", &p3], &envs);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("WASIp3") && out.contains("up to 128 requests per instance, 16 at a time"),
        "{out}"
    );
    let hello = root().join("examples/hello.wasm");
    let (code, out, _) = wasmpool(&["check", hello.to_str().unwrap()], &envs);
    assert_eq!(code, 0);
    assert!(out.contains("WASIp2"));
}

#[test]
fn bad_components_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let envs = [("XDG_CACHE_HOME", dir.path().to_str().unwrap())];
    let missing = dir.path().join("nope.wasm");
    let junk = write(dir.path(), "junk.wasm", b"this is not wasm at all");
    let core = write(
        dir.path(),
        "core.wasm",
        &wat::parse_str("(module (func (export \"f\")))").unwrap(),
    );
    let other = write(dir.path(), "other.wasm", &other_world());
    let unlinkable = write(dir.path(), "unlinkable.wasm", &needs_missing());
    let mut truncated = p2_suite();
    truncated.truncate(truncated.len() / 2);
    let truncated = write(dir.path(), "truncated.wasm", &truncated);
    for cmd in ["check", "serve", "compile"] {
        let cases: [(&str, &str); 6] = [
            (missing.to_str().unwrap(), "cannot read component"),
            (&junk, "not a WebAssembly component"),
            (&core, "core WebAssembly module, not a component"),
            (
                &other,
                "implements neither `wasi:http/incoming-handler@0.2.x`",
            ),
            (&truncated, "does not compile"),
            (&unlinkable, "does not link"),
        ];
        for (path, needle) in cases {
            if cmd == "compile" && needle == "does not link" {
                continue; // compile does not link
            }
            let (code, _, err) = wasmpool(
                &[cmd, path, "--listen", "127.0.0.1:0"].map(|s| s)
                    [..if cmd == "serve" { 4 } else { 2 }],
                &envs,
            );
            assert_clean_error(code, &err, needle);
        }
    }
    let (code, _, err) = wasmpool(&["check", &other], &envs);
    assert_clean_error(code, &err, "it exports: run");
}

#[test]
fn bad_flags_and_config_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hello = root().join("examples/hello.wasm");
    let hello = hello.to_str().unwrap();
    for (flag, value, needle) in [
        ("--max-instance-reuse-count", "0", "at least 1"),
        ("--max-instance-reuse-count", "-1", "negative"),
        ("--max-concurrent-requests", "lots", "invalid number"),
        ("--request-timeout", "5", "needs a unit"),
        ("--request-timeout", "0s", "greater than zero"),
        ("--idle-instance-timeout", "soon", "invalid duration"),
        ("--max-memory-size", "12XB", "unknown unit"),
        ("--max-memory-size", "0", "greater than zero"),
        ("--env", "NOEQUALS", "KEY=VALUE"),
        ("--allow-outbound", "host:http", "HOST or HOST:PORT"),
        ("--listen", "localhost", "invalid listen address"),
        ("--client-body-timeout", "0s", "greater than zero"),
        ("--send-timeout", "10", "needs a unit"),
        ("--keepalive-timeout", "-1s", "negative"),
        ("--client-body-min-rate", "fast", "invalid rate"),
        ("--send-min-rate", "1XB/s", "unknown unit"),
        ("--max-connections-per-client", "0", "at least 1"),
        ("--max-requests-per-client", "many", "invalid number"),
        ("--memory-budget", "0", "greater than zero"),
        ("--memory-budget", "plenty", "or `auto`"),
    ] {
        let (code, _, err) = wasmpool(&["serve", hello, &format!("{flag}={value}")], &[]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{flag} {value}: {err}"
        );
    }
    let (code, _, err) = wasmpool(&["serve", hello, "--no-such-flag"], &[]);
    assert_eq!(code, 2, "{err}");
    // Values that pass the parser but not validation.
    let (code, _, err) = wasmpool(&["serve", hello, "--max-memory-size", "8GiB"], &[]);
    assert_clean_error(code, &err, "max-memory-size");
    let (code, _, err) = wasmpool(&["serve", hello, "--max-request-header-size", "1KiB"], &[]);
    assert_clean_error(code, &err, "8KiB");
    // Extreme values of the defences' knobs.
    for (args, needle) in [
        (
            &["--send-min-rate", "1GiB"][..],
            "would cut off every client",
        ),
        (
            &["--client-body-buffer-size", "1GiB"],
            "every connection may hold",
        ),
        (
            &["--response-buffer-size", "64MiB"],
            "every connection may hold",
        ),
        (
            &[
                "--max-concurrent-connections",
                "10",
                "--max-connections-per-client",
                "20",
            ],
            "more than max-concurrent-connections",
        ),
        (
            &[
                "--max-concurrent-requests",
                "10",
                "--max-requests-per-client",
                "20",
            ],
            "more than max-concurrent-requests",
        ),
        (
            &["--memory-budget", "100TiB"],
            "more than this process may use",
        ),
        (
            &["--memory-budget", "1KiB"],
            "cannot hold a single 64KiB memory",
        ),
    ] {
        let mut all = vec!["serve", hello];
        all.extend_from_slice(args);
        let (code, _, err) = wasmpool(&all, &[]);
        assert_clean_error(code, &err, needle);
    }
    // A missing component: the OS error once.
    let (code, _, err) = wasmpool(&["serve", "/missing.wasm"], &[]);
    assert_clean_error(code, &err, "No such file or directory");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    for (text, needle) in [
        ("no-such-knob = 1", "unknown field `no-such-knob`"),
        (
            "max-concurrent-requests = 0",
            "line 1, `max-concurrent-requests`: must be at least 1",
        ),
        (
            "\nsend-timeout = \"5\"",
            "line 2, `send-timeout`: duration `5` needs a unit",
        ),
        ("request-timeout = \"30\"", "needs a unit"),
        ("request-timeout = 5", "needs a unit"),
        ("max-queue-wait = \"-1s\"", "negative"),
        ("component = [", "invalid config file"),
    ] {
        let cfg = write(dir.path(), "bad.toml", text.as_bytes());
        let (code, _, err) = wasmpool(&["serve", hello, "--config", &cfg], &[]);
        assert_clean_error(code, &err, needle);
    }
    let (code, _, err) = wasmpool(
        &["serve", hello, "--config", "/nonexistent/wasmpool.toml"],
        &[],
    );
    assert_clean_error(code, &err, "cannot read config file");
    let (code, _, err) = wasmpool(&["serve"], &[]);
    assert_clean_error(code, &err, "no component given");
}

#[test]
fn compile_fills_the_cache_where_the_environment_says() {
    let dir = tempfile::tempdir().unwrap();
    let hello = root().join("examples/hello.wasm");
    let hello = hello.to_str().unwrap();
    let count = |p: &Path| {
        std::fs::read_dir(p)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "cwasm")
                })
                .count()
            })
            .unwrap_or(0)
    };
    let d = dir.path();
    let sysd = d.join("systemd-cache");
    let xdg = d.join("xdg");
    let home = d.join("home");
    // $CACHE_DIRECTORY (systemd) wins, then $XDG_CACHE_HOME/wasmpool, then ~/.cache/wasmpool.
    let (code, out, err) = wasmpool(
        &["compile", hello],
        &[
            ("CACHE_DIRECTORY", sysd.to_str().unwrap()),
            ("XDG_CACHE_HOME", xdg.to_str().unwrap()),
            ("HOME", home.to_str().unwrap()),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Stored"), "{out}");
    assert_eq!(count(&sysd), 1);
    let (code, out, _) = wasmpool(
        &["compile", hello],
        &[("CACHE_DIRECTORY", sysd.to_str().unwrap())],
    );
    assert_eq!(code, 0);
    assert!(out.contains("Hit"), "{out}");
    let (code, _, _) = wasmpool(
        &["compile", hello],
        &[
            ("CACHE_DIRECTORY", ""),
            ("XDG_CACHE_HOME", xdg.to_str().unwrap()),
            ("HOME", home.to_str().unwrap()),
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(count(&xdg.join("wasmpool")), 1);
    let (code, _, _) = wasmpool(
        &["compile", hello],
        &[
            ("CACHE_DIRECTORY", ""),
            ("XDG_CACHE_HOME", ""),
            ("HOME", home.to_str().unwrap()),
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(count(&home.join(".cache/wasmpool")), 1);
    let explicit = d.join("explicit");
    let (code, _, _) = wasmpool(
        &["compile", hello, "--cache-dir", explicit.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0);
    assert_eq!(count(&explicit), 1);
    // A cache that cannot be written is not fatal for serving, but it is
    // for `compile`, whose only job is to fill it (an image build that
    // could not write its seed cache must fail).
    let (code, _, err) = wasmpool(
        &["compile", hello, "--cache-dir", "/proc/nonexistent/cache"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("error: could not write the compile cache in /proc/nonexistent/cache"),
        "{err}"
    );
}

#[test]
fn serve_defaults_to_localhost_8080_and_stops_on_sigterm() {
    let hello = root().join("examples/hello.wasm");
    let dir = tempfile::tempdir().unwrap();
    let (proc, addrs) = Proc::serve(
        &["serve", hello.to_str().unwrap()],
        &[("XDG_CACHE_HOME", dir.path().to_str().unwrap())],
    );
    assert_eq!(addrs, ["http://127.0.0.1:8080"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(send(
        sockaddr(&addrs[0]),
        "GET",
        "/",
        &[],
        bytes::Bytes::new(),
    ));
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "Hello from wasmpool!\n")
    );
    let status = proc.stop(SIGTERM);
    assert!(status.success(), "{status:?}");
}

#[test]
fn serve_logs_guest_output_with_the_instance_id() {
    let dir = tempfile::tempdir().unwrap();
    let p2 = write(dir.path(), "p2.wasm", &p2_suite());
    let (proc, addrs) = Proc::serve(
        &["serve", &p2, "--listen", "127.0.0.1:0", "--no-cache"],
        &[],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(send(
        sockaddr(&addrs[0]),
        "GET",
        "/log",
        &[],
        bytes::Bytes::new(),
    ));
    assert_eq!(r.status, 200);
    let ok = rt.block_on(eventually(Duration::from_secs(5), || {
        proc.log().contains("guest log line from p2")
    }));
    let log = proc.log();
    assert!(ok, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("guest log line from p2"))
        .unwrap();
    assert!(
        line.contains("instance=") && line.contains("stdout"),
        "{line}"
    );
    assert!(proc.stop(SIGINT).success());
}

#[test]
fn serve_from_a_config_file_on_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "app.wasm", &p3_suite());
    let sock = dir.path().join("app.sock");
    let cfg = format!(
        "component = \"app.wasm\"\nlisten = [\"127.0.0.1:0\", \"unix:{}\"]\nmax-instance-reuse-count = 1\nno-cache = true\n",
        sock.display()
    );
    let cfg = write(dir.path(), "app.toml", cfg.as_bytes());
    let (proc, addrs) = Proc::serve_n(&["serve", "--config", &cfg], &[], 2);
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // reuse 1 from the file: the counter stays at 1.
    for _ in 0..2 {
        let r = rt.block_on(send(
            sockaddr(&addrs[0]),
            "GET",
            "/counter",
            &[],
            bytes::Bytes::new(),
        ));
        assert_eq!(r.text(), "1");
    }
    let text = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    });
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("hello from p3\n"),
        "{text}"
    );
    // Flags override the file.
    drop(proc);
    let (proc, addrs) = Proc::serve(
        &[
            "serve",
            "--config",
            &cfg,
            "--listen",
            "127.0.0.1:0",
            "--max-instance-reuse-count",
            "5",
        ],
        &[],
    );
    assert_eq!(addrs.len(), 1);
    let texts: Vec<String> = (0..3)
        .map(|_| {
            // Let the instance become available again (see knobs.rs `settle`).
            std::thread::sleep(Duration::from_millis(100));
            rt.block_on(send(
                sockaddr(&addrs[0]),
                "GET",
                "/counter",
                &[],
                bytes::Bytes::new(),
            ))
            .text()
        })
        .collect();
    assert_eq!(texts, ["1", "2", "3"]);
    assert!(proc.stop(SIGTERM).success());
}

fn vm_size_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn pool_reservation_follows_the_knobs() {
    let hello = root().join("examples/hello.wasm");
    let hello = hello.to_str().unwrap();
    let (big, _) = Proc::serve(
        &["serve", hello, "--listen", "127.0.0.1:0", "--no-cache"],
        &[],
    );
    let big_kib = vm_size_kib(big.child.id());
    let (small, _) = Proc::serve(
        &[
            "serve",
            hello,
            "--listen",
            "127.0.0.1:0",
            "--no-cache",
            "--max-concurrent-requests",
            "8",
            "--max-memory-size",
            "16MiB",
        ],
        &[],
    );
    let small_kib = vm_size_kib(small.child.id());
    // Defaults (1000 requests: 4,000 memories of 4 GiB reserved each, so
    // that code needs no bounds checks) stay under 20 TiB of address
    // space; small knobs (32 memories) need well under 256 GiB.
    assert!(big_kib < 20 << 30, "default reservation {big_kib} KiB");
    assert!(small_kib < 256 << 20, "small reservation {small_kib} KiB");
    assert!(small_kib * 20 < big_kib, "{small_kib} vs {big_kib}");
}

#[test]
fn without_address_space_for_wide_memories_components_still_run() {
    // 4 TiB of address space: too little for 4 GiB per memory slot (16 TiB
    // at the default knobs), enough for max-memory-size per slot.
    let dir = tempfile::tempdir().unwrap();
    let p2 = write(dir.path(), "p2.wasm", &p2_suite());
    let cache = dir.path().to_str().unwrap();
    let run = |limit: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{limit} exec \"$0\" check \"$1\""))
            .arg(env!("CARGO_BIN_EXE_wasmpool"))
            .arg(&p2)
            .env("XDG_CACHE_HOME", cache)
            .output()
            .unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.contains("links and instantiates: ok"), "{out}{err}");
        out
    };
    let wide = run("");
    assert!(wide.contains("4 GiB of address space reserved"), "{wide}");
    let narrow = run("ulimit -v 4294967296 &&");
    assert!(
        narrow.contains("only max-memory-size reserved") && narrow.contains("reuse probe"),
        "{narrow}"
    );
}
