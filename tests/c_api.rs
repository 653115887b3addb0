//! The C API, from C: ffi/ programs built against the shared and the
//! static library and run plain, under AddressSanitizer + UBSan and under
//! valgrind; the header as C++17; the pkg-config file; and the
//! libmicrohttpd example host, checked with curl.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// target/<profile>, where cargo put libwasmpool.so and libwasmpool.a.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

struct Env {
    _dir: tempfile::TempDir,
    lib: PathBuf,
    p2: PathBuf,
    p3: PathBuf,
    pkgconfig: PathBuf,
}

/// A lib directory laid out as installed (SONAME link, static library,
/// wasmpool.pc) and the test guests.
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // Integration tests do not rebuild the cdylib and staticlib: build
        // them now (cargo releases its lock while tests run).
        let profile = profile_dir();
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--lib", "--manifest-path"])
            .arg(root().join("Cargo.toml"));
        if profile.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        build.env("CARGO_TARGET_DIR", profile.parent().unwrap());
        run(&mut build);
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        let so = profile.join("libwasmpool.so");
        std::os::unix::fs::symlink(&so, lib.join("libwasmpool.so.0")).unwrap();
        std::os::unix::fs::symlink("libwasmpool.so.0", lib.join("libwasmpool.so")).unwrap();
        std::os::unix::fs::symlink(profile.join("libwasmpool.a"), lib.join("libwasmpool.a"))
            .unwrap();
        let pc = std::fs::read_to_string(root().join("ffi/wasmpool.pc.in"))
            .unwrap()
            .replace("@PREFIX@", dir.path().to_str().unwrap())
            .replace("@LIBDIR@", lib.to_str().unwrap())
            .replace("@INCLUDEDIR@", root().join("include").to_str().unwrap())
            .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
        let pkgconfig = dir.path().join("pkgconfig");
        std::fs::create_dir_all(&pkgconfig).unwrap();
        std::fs::write(pkgconfig.join("wasmpool.pc"), pc).unwrap();
        let p2 = dir.path().join("p2.wasm");
        let p3 = dir.path().join("p3.wasm");
        std::fs::write(&p2, p2_suite()).unwrap();
        std::fs::write(&p3, p3_suite()).unwrap();
        Env {
            _dir: dir,
            lib,
            p2,
            p3,
            pkgconfig,
        }
    })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}):\n{text}",
        out.status
    );
    text
}

/// Compiles ffi/tests/test_capi.c with `extra` flags against the shared library.
fn build_test(name: &str, extra: &[&str]) -> PathBuf {
    build_c("test_capi", name, extra)
}

/// Compiles ffi/tests/`source`.c with `extra` flags against the shared
/// library.
fn build_c(source: &str, name: &str, extra: &[&str]) -> PathBuf {
    let e = env();
    let out = e.lib.parent().unwrap().join(name);
    run(Command::new("cc")
        .args(["-std=c11", "-g", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .args(extra)
        .arg(root().join(format!("ffi/tests/{source}.c")))
        .arg("-o")
        .arg(&out)
        .arg(format!("-L{}", e.lib.display()))
        .arg(format!("-Wl,-rpath,{}", e.lib.display()))
        .args(["-lwasmpool", "-lpthread"]));
    out
}

fn run_test(bin: &Path, envs: &[(&str, &str)], wrapper: &[&str], quick: bool) -> String {
    run_test_mode(bin, envs, wrapper, if quick { Some("quick") } else { None })
}

fn run_test_mode(
    bin: &Path,
    envs: &[(&str, &str)],
    wrapper: &[&str],
    mode: Option<&str>,
) -> String {
    let e = env();
    let mut cmd = if wrapper.is_empty() {
        Command::new(bin)
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(bin);
        c
    };
    cmd.arg(&e.p2).arg(&e.p3).arg(shared_cache());
    if let Some(m) = mode {
        cmd.arg(m);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let text = run(&mut cmd);
    assert!(text.contains(", 0 failed"), "{text}");
    text
}

#[test]
fn c_handler_exports_spans_and_continues_the_trace() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = rt.block_on(otlp::Receiver::start(Duration::ZERO));
    let bin = build_test("test_capi_trace", &[]);
    let out = run_test_mode(
        &bin,
        &[("OTLP_ENDPOINT", &receiver.endpoint())],
        &[],
        Some("trace"),
    );
    let span_id = out
        .lines()
        .find_map(|l| l.strip_prefix("server span "))
        .expect("the guest saw the server span")
        .to_string();
    // Sent before `wasmpool_handler_free` returned: no waiting here.
    let spans = rt.block_on(receiver.trace("4bf92f3577b34da6a3ce929d0e0e4736"));
    let server = spans
        .iter()
        .find(|g| g.kind() == otlp::SpanKind::Server)
        .unwrap();
    assert_eq!(server.id(), span_id);
    assert_eq!(server.parent(), "00f067aa0ba902b7");
    assert_eq!(server.service, "c-host");
    assert_eq!(server.int("http.response.status_code"), Some(200));
    assert_eq!(server.str("url.path").as_deref(), Some("/echo"));
    let trap = rt.block_on(receiver.trace("22222222222222222222222222222222"));
    let trap = trap
        .iter()
        .find(|g| g.kind() == otlp::SpanKind::Server)
        .unwrap();
    assert!(
        trap.error().unwrap().contains("trapped"),
        "{:?}",
        trap.error()
    );
    assert_eq!(trap.int("http.response.status_code"), Some(500));
}

#[test]
fn c_tests_plain() {
    let bin = build_test("test_capi", &[]);
    run_test(&bin, &[], &[], false);
}

const ASAN_OPTIONS: &str = "detect_leaks=1:handle_segv=0:handle_sigill=0:handle_sigfpe=0:allow_user_segv_handler=1:abort_on_error=0";

fn sanitizer_flags() -> [&'static str; 3] {
    [
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=all",
    ]
}

fn valgrind_wrapper() -> Vec<String> {
    vec![
        "valgrind".into(),
        "--error-exitcode=99".into(),
        "--leak-check=full".into(),
        "--errors-for-leak-kinds=definite".into(),
        "--show-leak-kinds=definite".into(),
        format!(
            "--suppressions={}",
            root().join("ffi/tests/valgrind.supp").display()
        ),
    ]
}

#[test]
fn streaming_c_tests_plain_and_one_gib_each_way() {
    let bin = build_c("test_stream", "test_stream", &[]);
    run_test_mode(&bin, &[], &[], None);
    let text = run_test_mode(&bin, &[], &[], Some("big"));
    eprintln!(
        "{}",
        text.lines().find(|l| l.contains("peak RSS")).unwrap_or("")
    );
}

#[test]
fn streaming_c_tests_under_asan_and_ubsan() {
    let bin = build_c("test_stream", "test_stream_asan", &sanitizer_flags());
    run_test_mode(
        &bin,
        &[
            ("ASAN_OPTIONS", ASAN_OPTIONS),
            ("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"),
        ],
        &[],
        Some("quick"),
    );
}

#[test]
fn streaming_c_tests_under_valgrind() {
    let bin = build_c("test_stream", "test_stream_vg", &[]);
    let wrapper = valgrind_wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let text = run_test_mode(&bin, &[], &wrapper, Some("quick"));
    assert!(
        text.contains("definitely lost: 0 bytes") || text.contains("All heap blocks were freed"),
        "{text}"
    );
}

#[test]
fn streaming_c_tests_with_the_static_library() {
    let e = env();
    let out = e.lib.parent().unwrap().join("test_stream_static");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(root().join("ffi/tests/test_stream.c"))
        .arg("-o")
        .arg(&out)
        .arg(e.lib.join("libwasmpool.a"))
        .args(["-lpthread", "-ldl", "-lm"]));
    run_test_mode(&out, &[], &[], Some("quick"));
}

#[test]
fn c_tests_under_asan_and_ubsan() {
    let bin = build_test(
        "test_capi_asan",
        &[
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all",
        ],
    );
    // wasmtime handles SIGSEGV/SIGILL/SIGFPE itself (guest traps).
    let asan = "detect_leaks=1:handle_segv=0:handle_sigill=0:handle_sigfpe=0:allow_user_segv_handler=1:abort_on_error=0";
    run_test(
        &bin,
        &[
            ("ASAN_OPTIONS", asan),
            ("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"),
        ],
        &[],
        false,
    );
}

#[test]
fn c_tests_under_valgrind() {
    let bin = build_test("test_capi_vg", &[]);
    let text = run_test(
        &bin,
        &[],
        &[
            "valgrind",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
            &format!(
                "--suppressions={}",
                root().join("ffi/tests/valgrind.supp").display()
            ),
        ],
        true,
    );
    assert!(
        text.contains("definitely lost: 0 bytes") || text.contains("All heap blocks were freed"),
        "{text}"
    );
}

#[test]
fn c_tests_with_the_static_library() {
    let e = env();
    let out = e.lib.parent().unwrap().join("test_capi_static");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(root().join("ffi/tests/test_capi.c"))
        .arg("-o")
        .arg(&out)
        .arg(e.lib.join("libwasmpool.a"))
        .args(["-lpthread", "-ldl", "-lm"]));
    run_test(&out, &[], &[], true);
}

#[test]
fn header_compiles_as_cpp17() {
    let e = env();
    let out = e.lib.parent().unwrap().join("test_cpp");
    run(Command::new("c++")
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(root().join("ffi/tests/test_cpp.cpp"))
        .arg("-o")
        .arg(&out)
        .arg(format!("-L{}", e.lib.display()))
        .arg(format!("-Wl,-rpath,{}", e.lib.display()))
        .arg("-lwasmpool"));
    assert!(run(&mut Command::new(&out)).contains("C++: "));
}

#[test]
fn shared_library_has_its_soname() {
    let text = run(Command::new("objdump")
        .arg("-p")
        .arg(profile_dir().join("libwasmpool.so")));
    assert!(
        text.contains("SONAME               libwasmpool.so.0"),
        "{text}"
    );
}

#[test]
fn mhd_example_host_serves_through_push() {
    let e = env();
    let pkg = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "wasmpool", "libmicrohttpd"])
        .env("PKG_CONFIG_PATH", &e.pkgconfig));
    let out = e.lib.parent().unwrap().join("mhd_host");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg(root().join("ffi/examples/mhd_host.c"))
        .arg("-o")
        .arg(&out)
        .args(pkg.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", e.lib.display())));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    /// Kills the host however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(
        Command::new(&out)
            .arg(&e.p2)
            .arg(port.to_string())
            .env("XDG_CACHE_HOME", shared_cache())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let curl = |args: &[&str]| {
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    // The first request waits for the host to listen (curl retries refused
    // connections; it would also retry a 500, so only here).
    let (ok, body) = curl(&[
        "--retry",
        "30",
        "--retry-connrefused",
        "--retry-delay",
        "1",
        &format!("{url}/"),
    ]);
    assert!(ok && body == "hello from p2\n", "{body}");
    let (ok, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "x-from: curl",
        "--data-binary",
        "payload",
        &format!("{url}/echo"),
    ]);
    assert!(
        ok && body.starts_with("POST /echo\n")
            && body.contains("x-from: curl\n")
            && body.ends_with("payload"),
        "{body}"
    );
    let (ok, code) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{url}/trap"),
    ]);
    assert!(ok && code == "500", "{code}");
    // Many at once.
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                Command::new("curl")
                    .args(["-sS", "--max-time", "10", &format!("{url}/counter")])
                    .output()
                    .unwrap()
                    .status
                    .success()
            })
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap()));
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < end, "mhd_host did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// Builds ffi/examples/`name`.c the way the README says: with the flags
/// `pkg-config --cflags --libs` gives for `packages` (wasmpool first).
fn build_example(name: &str, packages: &[&str], extra: &[&str]) -> PathBuf {
    let e = env();
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs"])
        .args(packages)
        .env("PKG_CONFIG_PATH", &e.pkgconfig));
    let out = e.lib.parent().unwrap().join(name);
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg(root().join(format!("ffi/examples/{name}.c")))
        .arg("-o")
        .arg(&out)
        .args(flags.split_whitespace())
        .args(extra)
        .arg(format!("-Wl,-rpath,{}", e.lib.display())));
    out
}

#[test]
fn readme_quickstart_builds_with_pkg_config_and_runs() {
    let out = build_example("quickstart", &["wasmpool"], &[]);
    let text = run(Command::new(&out)
        .arg(root().join("examples/hello.wasm"))
        .env("XDG_CACHE_HOME", shared_cache()));
    assert_eq!(text, "200 Hello from wasmpool!\n");
}

/// The README's streaming example: 24 MiB through the echo route, in
/// chunks both ways, with the body echoed byte for byte.
#[test]
fn readme_streaming_example_pipes_a_body_through_a_guest() {
    let e = env();
    let bin = build_example("stream_pipe", &["wasmpool"], &["-lpthread"]);
    let input: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut child = Command::new(&bin)
        .arg(&e.p2)
        .arg("/echo")
        .env("XDG_CACHE_HOME", shared_cache())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let written = stdin.write_all(&input);
        (input, written)
    });
    let out = child.wait_with_output().unwrap();
    let (input, written) = writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    written.unwrap();
    assert_eq!(err.trim(), "status 200");
    // The suite's /echo answers with the request line, then the body.
    let head = b"POST /echo\n\n";
    assert_eq!(out.stdout.len(), head.len() + input.len());
    assert!(
        out.stdout.starts_with(head) && out.stdout[head.len()..] == input[..],
        "the echoed body differs"
    );
}

#[test]
fn uv_example_host_streams_both_ways_and_survives_clients_that_leave() {
    let e = env();
    let out = build_example("uv_host", &["wasmpool", "libuv"], &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut host = Kill(
        Command::new(&out)
            .arg(&e.p2)
            .arg(port.to_string())
            .env("XDG_CACHE_HOME", shared_cache())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let curl = |args: &[&str]| {
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "120"])
            .args(args)
            .output()
            .unwrap();
        (o.status.success(), o.stdout)
    };
    let (ok, body) = curl(&[
        "--retry",
        "30",
        "--retry-connrefused",
        "--retry-delay",
        "1",
        &format!("{url}/"),
    ]);
    assert!(
        ok && body == b"hello from p2\n",
        "{}",
        String::from_utf8_lossy(&body)
    );
    // A large upload streamed to the echo guest and back.
    let dir = tempfile::tempdir().unwrap();
    let size = 128usize << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, &data).unwrap();
    let upload = format!("@{}", file.display());
    let (ok, body) = curl(&["--data-binary", &upload, &format!("{url}/echo")]);
    assert!(ok, "upload failed");
    assert!(
        body.len() > size && body[body.len() - size..] == data[..],
        "echo differs ({} bytes back)",
        body.len()
    );
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
            .unwrap()
    };
    let peak = rss(host.0.id());
    assert!(
        peak < 100 << 10,
        "peak RSS {peak} KiB streaming 128 MiB each way"
    );
    // Clients that leave mid-upload and mid-download.
    for rate in ["20M", "2M"] {
        let mut c = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "--limit-rate",
                rate,
                "--data-binary",
                &upload,
            ])
            .arg(format!("{url}/echo"))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let _ = c.kill();
        let _ = c.wait();
    }
    // Still serving, and nothing piled up.
    for _ in 0..5 {
        let (ok, body) = curl(&[&format!("{url}/")]);
        assert!(ok && body == b"hello from p2\n");
    }
    let (ok, body) = curl(&["--data-binary", "after", &format!("{url}/echo")]);
    assert!(ok && body.ends_with(b"after"));
    assert!(rss(host.0.id()) < 100 << 10);
    unsafe { libc::kill(host.0.id() as i32, libc::SIGTERM) };
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = host.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < end, "uv_host did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
