//! The Debian package under a real systemd: a Debian 12 root (debootstrap,
//! cached in /var/cache/wasmpool-e2e) booted with systemd-nspawn, the .deb
//! installed from a local apt repository (the server pulls the library;
//! a C host is built against libwasmpool-dev in the container), then socket activation, notify status, reload and
//! restart under load, kill -9 under load, stop during slow requests, a
//! broken component on reload, the journal, `systemd-analyze security`, a
//! memory storm against an app with `MemoryMax=`, the nginx module's
//! package in Debian's nginx (enabled on installation, serving the packaged
//! component across reloads, gone on purge), and a clean purge.
//!
//! Needs root, debootstrap and systemd-nspawn; tests/run-all.sh builds the
//! packages and runs this with `WASMPOOL_DEBS="..." cargo test --test
//! systemd_e2e -- --ignored`, which also runs lintian on them.
mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The pristine Debian root, reused across runs (never booted itself).
const BASE: &str = "/var/cache/wasmpool-e2e/bookworm";
const HELLO_SOCK: &str = "/run/wasmpool/hello.sock";
const SUITE_SOCK: &str = "/run/wasmpool/suite.sock";

/// What the base root has beyond minbase: systemd, curl for the requests,
/// a C toolchain with pkg-config to build a host against libwasmpool-dev,
/// and Debian's nginx for libnginx-mod-http-wasmpool. A root made with
/// another list is made again.
const INCLUDE: &str = "systemd,systemd-sysv,curl,dbus,gcc,libc6-dev,pkg-config,logrotate,nginx";

fn base_root() -> PathBuf {
    let base = PathBuf::from(BASE);
    let stamp = base.join("root/.e2e-base-include");
    if base.join("usr/lib/systemd/systemd").exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == INCLUDE)
    {
        return base;
    }
    let _ = std::fs::remove_dir_all(&base);
    let tmp = base.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    let st = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            "bookworm",
        ])
        .arg(&tmp)
        .stdout(Stdio::null())
        .status()
        .expect("debootstrap runs");
    assert!(st.success(), "debootstrap failed");
    std::fs::write(tmp.join("root/.e2e-base-include"), INCLUDE).unwrap();
    std::fs::rename(&tmp, &base).unwrap();
    base
}

/// A booted container; dropping it kills the nspawn process and removes
/// its root.
struct Container {
    nspawn: Child,
    /// The host's memory cgroup (v1) the container runs in, when there is
    /// one: systemd-nspawn mounts the v1 memory controller read-only in the
    /// container, so its systemd cannot apply `MemoryMax=` itself there.
    memcg: Option<PathBuf>,
    /// The container's systemd (the child of the nspawn process).
    init: u32,
    root: tempfile::TempDir,
}

impl Container {
    fn boot() -> Container {
        let base = base_root();
        let root = tempfile::Builder::new()
            .prefix("wasmpool-e2e.")
            .tempdir_in("/var/tmp")
            .unwrap();
        let st = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(base.join("."))
            .arg(root.path())
            .status()
            .unwrap();
        assert!(st.success());
        // A machine id of its own (an empty one makes systemd generate one).
        let _ = std::fs::write(root.path().join("etc/machine-id"), "");
        let log = std::fs::File::create(root.path().join("root/nspawn.log")).unwrap();
        // A cgroup of its own under the v1 memory controller, where it is
        // mounted (as on these machines), for a limit set from outside.
        let memcg = PathBuf::from("/sys/fs/cgroup/memory/system.slice");
        let memcg = memcg
            .parent()
            .filter(|m| m.join("memory.limit_in_bytes").exists())
            .map(|m| m.join(format!("wasmpool-e2e-{}", std::process::id())));
        let mut cmd = match &memcg {
            Some(dir) => {
                let _ = std::fs::remove_dir(dir);
                std::fs::create_dir(dir).unwrap();
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0\" && exec systemd-nspawn \"$@\"")
                    .arg(dir.join("cgroup.procs"));
                c
            }
            None => Command::new("systemd-nspawn"),
        };
        let nspawn = cmd
            .args([
                "-q",
                "-b",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "-D",
            ])
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn runs");
        let mut c = Container {
            init: 0,
            nspawn,
            memcg,
            root,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "the container did not boot");
            if let Ok(None) = c.nspawn.try_wait() {
            } else {
                panic!("systemd-nspawn exited: {}", c.nspawn_log());
            }
            if c.init == 0 {
                c.init = children(c.nspawn.id()).first().copied().unwrap_or(0);
            }
            if c.init != 0 {
                let o = c.sh("systemctl is-system-running");
                let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
                if state == "running" || state == "degraded" {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("root/nspawn.log")).unwrap_or_default()
    }

    /// A path inside the container, seen from the host.
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }

    fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a shell command in the container; it must succeed.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(
            o.status.success(),
            "`{script}` failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -P {prop} {unit}"))
            .trim()
            .to_string()
    }

    /// Waits until the unit's status text (sd_notify STATUS=) contains
    /// `needle`, and returns it.
    fn wait_status(&self, unit: &str, needle: &str, timeout: Duration) -> String {
        self.wait_for(
            &format!("{needle:?} in the status of {unit}"),
            timeout,
            |c| c.show(unit, "StatusText").contains(needle),
        );
        self.show(unit, "StatusText")
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Container) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET over an app's unix socket: (status, body).
    fn get(&self, sock: &str, path: &str) -> (String, String) {
        self.get_within(sock, path, 30)
    }

    /// GET with an answer due within `secs` seconds (a first start that
    /// compiles a large guest on a busy host needs minutes, not seconds).
    fn get_within(&self, sock: &str, path: &str, secs: u32) -> (String, String) {
        let o = self.ok(&format!(
            "curl -sS --max-time {secs} -w '\\n%{{http_code}}' --unix-socket {sock} http://localhost{path}"
        ));
        let (body, code) = o.rsplit_once('\n').unwrap();
        (code.to_string(), body.to_string())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to shut the container down; SIGKILL if slow.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        if let Some(dir) = &self.memcg {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

/// A bounded load: `workers` loops of sequential curl requests inside the
/// container until stopped; each request's status is recorded.
struct Load<'a> {
    c: &'a Container,
    dir: String,
    runner: Child,
}

const LOAD_SH: &str = r#"#!/bin/sh
# load.sh DIR WORKERS SOCK PATH: WORKERS loops of one request at a time
# until DIR/stop exists; each line of DIR/N.log is "HTTP-CODE CURL-EXIT".
dir=$1; workers=$2; sock=$3; path=$4
i=0
while [ $i -lt $workers ]; do
  (
    while [ ! -e $dir/stop ]; do
      code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 --unix-socket $sock http://localhost$path)
      echo "$code $?" >>$dir/$i.log
    done
  ) &
  i=$((i + 1))
done
wait
"#;

impl<'a> Load<'a> {
    fn start(c: &'a Container, name: &str, workers: u32, sock: &str, path: &str) -> Load<'a> {
        let dir = format!("/root/e2e/load-{name}");
        std::fs::create_dir_all(c.path(&dir)).unwrap();
        std::fs::write(c.path("/root/e2e/load.sh"), LOAD_SH).unwrap();
        let runner = Command::new("nsenter")
            .args([
                "-t",
                &c.init.to_string(),
                "-a",
                "/bin/sh",
                "/root/e2e/load.sh",
            ])
            .args([&dir, &workers.to_string(), sock, path])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let l = Load { c, dir, runner };
        // Running: every worker has answers.
        c.wait_for("the load to run", Duration::from_secs(30), |_| {
            l.results().0 >= workers as usize * 3
        });
        l
    }

    /// (ok, failures as "CODE EXIT" lines)
    fn results(&self) -> (usize, Vec<String>) {
        let mut ok = 0;
        let mut failed = Vec::new();
        for e in std::fs::read_dir(self.c.path(&self.dir)).unwrap().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for line in text.lines() {
                if line == "200 0" {
                    ok += 1;
                } else {
                    failed.push(line.to_string());
                }
            }
        }
        (ok, failed)
    }

    /// Lets at least 10 more requests finish (the service serves again
    /// after whatever was done under load), then stops.
    fn finish(self, what: &str) -> (usize, Vec<String>) {
        let before = self.results().0;
        self.c.wait_for(what, Duration::from_secs(10), |_| {
            self.results().0 > before + 10
        });
        let (ok, failed) = self.stop();
        eprintln!("{what}: {ok} ok, {} failed: {failed:?}", failed.len());
        (ok, failed)
    }

    fn stop(mut self) -> (usize, Vec<String>) {
        std::fs::write(self.c.path(&format!("{}/stop", self.dir)), "").unwrap();
        let _ = self.runner.wait();
        self.results()
    }
}

/// The four packages build-deb.sh made: server, library, development,
/// nginx module.
struct Debs {
    server: PathBuf,
    lib: PathBuf,
    dev: PathBuf,
    nginx: PathBuf,
}

fn debs() -> Debs {
    let list = std::env::var("WASMPOOL_DEBS")
        .expect("WASMPOOL_DEBS names the four packages (see tests/run-all.sh)");
    let paths: Vec<PathBuf> = list.split_whitespace().map(PathBuf::from).collect();
    let find = |prefix: &str| {
        let p = paths
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .unwrap_or_else(|| panic!("no {prefix}*.deb in WASMPOOL_DEBS={list}"))
            .clone();
        assert!(p.exists(), "{} does not exist", p.display());
        p
    };
    Debs {
        server: find("wasmpool_"),
        lib: find("libwasmpool0_"),
        dev: find("libwasmpool-dev_"),
        nginx: find("libnginx-mod-http-wasmpool_"),
    }
}

/// Lintian warnings left on the packages, each with the reason it stays.
/// Errors are never allowed.
const LINTIAN_WARNINGS: &[(&str, &str)] = &[(
    "initial-upload-closes-no-bugs",
    "wasmpool is not uploaded to the Debian archive, so there is no ITP bug for the changelog to close",
)];

#[test]
#[ignore = "needs lintian and the .debs: run by tests/run-all.sh"]
fn lintian_reports_no_errors() {
    let d = debs();
    let out = Command::new("lintian")
        .args(["--no-cfg", "--fail-on", "error", "--tag-display-limit", "0"])
        .args([&d.server, &d.lib, &d.dev, &d.nginx])
        .output()
        .expect("lintian runs");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    let mut unexplained = Vec::new();
    let mut packages_seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some((level, rest)) = line.split_once(": ") else {
            continue;
        };
        let Some((package, tag)) = rest.split_once(": ") else {
            continue;
        };
        let tag = tag.split_whitespace().next().unwrap_or("");
        match level {
            "E" => unexplained.push(line.to_string()),
            "W" => {
                packages_seen.insert(package.to_string());
                if !LINTIAN_WARNINGS.iter().any(|(t, _)| *t == tag) {
                    unexplained.push(line.to_string());
                }
            }
            _ => {}
        }
    }
    assert!(
        unexplained.is_empty(),
        "lintian errors or unexplained warnings:\n{}",
        unexplained.join("\n")
    );
    assert!(
        out.status.success(),
        "lintian failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // It did look at all four (each has the changelog warning).
    assert_eq!(
        packages_seen.into_iter().collect::<Vec<_>>(),
        [
            "libnginx-mod-http-wasmpool",
            "libwasmpool-dev",
            "libwasmpool0",
            "wasmpool"
        ],
        "{text}"
    );
}

fn write(c: &Container, path: &str, data: &[u8]) {
    let p = c.path(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
}

fn exposure(c: &Container, unit: &str) -> f64 {
    let out = c.sh(&format!("systemd-analyze security --no-pager {unit}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let after = line.split(':').nth(1).unwrap().trim();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
#[ignore = "needs root, debootstrap, systemd-nspawn and the .deb: run by tests/run-all.sh"]
fn package_under_real_systemd() {
    let debs = debs();
    let started = Instant::now();
    let c = Container::boot();
    eprintln!("booted in {:?}", started.elapsed());

    // The server alone does not install: it needs the library package.
    for (name, deb) in [
        ("wasmpool", &debs.server),
        ("libwasmpool0", &debs.lib),
        ("libwasmpool-dev", &debs.dev),
        ("libnginx-mod-http-wasmpool", &debs.nginx),
    ] {
        write(
            &c,
            &format!("/root/e2e/repo/{name}.deb"),
            &std::fs::read(deb).unwrap(),
        );
    }
    let alone = c.sh("dpkg -i /root/e2e/repo/wasmpool.deb");
    let err = String::from_utf8_lossy(&alone.stderr);
    assert!(
        !alone.status.success() && err.contains("libwasmpool0"),
        "dpkg -i of the server alone: {err}"
    );
    c.ok("dpkg --remove wasmpool");

    // From a local apt repository (the way users install): installing the
    // server pulls the library; nothing is enabled or running afterwards.
    let packages = Command::new("dpkg-scanpackages")
        .args(["-m", "."])
        .current_dir(c.path("/root/e2e/repo"))
        .stderr(Stdio::null())
        .output()
        .expect("dpkg-scanpackages (dpkg-dev) runs");
    assert!(packages.status.success());
    write(&c, "/root/e2e/repo/Packages", &packages.stdout);
    write(
        &c,
        "/root/e2e/local.list",
        b"deb [trusted=yes] file:/root/e2e/repo ./\n",
    );
    let apt = "apt-get -q -o Dir::Etc::SourceList=/root/e2e/local.list -o Dir::Etc::SourceParts=-";
    c.ok(&format!(
        "{apt} update && DEBIAN_FRONTEND=noninteractive {apt} install -y --no-install-recommends wasmpool"
    ));
    c.ok("dpkg-query -W -f='${Status}' libwasmpool0 | grep -q 'install ok installed'");
    for unit in [
        "wasmpool@hello.socket",
        "wasmpool.socket",
        "wasmpool.service",
    ] {
        assert_eq!(c.show(unit, "UnitFileState"), "disabled", "{unit}");
        assert_eq!(c.show(unit, "ActiveState"), "inactive", "{unit}");
    }
    c.ok("test -x /usr/bin/wasmpool && test -f /usr/share/man/man1/wasmpool.1.gz");
    c.ok(
        "test -f /usr/lib/x86_64-linux-gnu/libwasmpool.so.0.1.0 \
         && test -L /usr/lib/x86_64-linux-gnu/libwasmpool.so.0 \
         && ldconfig -p | grep -q 'libwasmpool.so.0 .*=> .*/lib/x86_64-linux-gnu/libwasmpool.so.0'",
    );
    c.ok("! test -e /usr/include/wasmpool.h");

    // The development package: a C host built with pkg-config in the
    // container, run against the installed library.
    c.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive {apt} install -y --no-install-recommends libwasmpool-dev"
    ));
    c.ok("test -f /usr/include/wasmpool.h \
         && test -f /usr/lib/x86_64-linux-gnu/pkgconfig/wasmpool.pc \
         && test -f /usr/lib/x86_64-linux-gnu/libwasmpool.a \
         && test -L /usr/lib/x86_64-linux-gnu/libwasmpool.so");
    write(
        &c,
        "/root/e2e/quickstart.c",
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/ffi/examples/quickstart.c"
        ))
        .unwrap(),
    );
    c.ok(
        "cd /root/e2e && cc -Wall -Werror -o quickstart quickstart.c $(pkg-config --cflags --libs wasmpool)",
    );
    let needed = c.ok("cd /root/e2e && ldd ./quickstart");
    // (/lib is /usr/lib on a merged-/usr system.)
    assert!(
        needed.contains("libwasmpool.so.0 => /lib/x86_64-linux-gnu/libwasmpool.so.0")
            || needed.contains("libwasmpool.so.0 => /usr/lib/x86_64-linux-gnu/libwasmpool.so.0"),
        "{needed}"
    );
    let out = c.ok(
        "cd /root/e2e && XDG_CACHE_HOME=/root/e2e/cache ./quickstart /usr/share/wasmpool/hello.wasm",
    );
    assert_eq!(out, "200 Hello from wasmpool!\n");
    c.ok("wasmpool check --no-cache /usr/share/wasmpool/hello.wasm");

    // Socket activation: the service starts on the first connection.
    c.ok("systemctl enable --now wasmpool@hello.socket");
    assert_eq!(c.show("wasmpool@hello.socket", "ActiveState"), "active");
    assert_eq!(c.show("wasmpool@hello.service", "ActiveState"), "inactive");
    let (code, body) = c.get(HELLO_SOCK, "/");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "Hello from wasmpool!\n")
    );
    assert_eq!(c.show("wasmpool@hello.service", "ActiveState"), "active");
    let status = c.show("wasmpool@hello.service", "StatusText");
    assert!(
        status.starts_with("Serving /usr/share/wasmpool/hello.wasm"),
        "{status}"
    );
    c.wait_status(
        "wasmpool@hello.service",
        "1 requests served",
        Duration::from_secs(10),
    );

    // Reload under load: no request fails.
    let load = Load::start(&c, "reload", 3, HELLO_SOCK, "/");
    for n in 1..=3 {
        c.ok("systemctl reload wasmpool@hello.service");
        c.wait_for("the reload to finish", Duration::from_secs(30), |c| {
            let log = c.ok("journalctl -u wasmpool@hello.service -o cat --no-pager");
            log.matches("reloaded; new requests go to the new component")
                .count()
                == n
        });
        let status = c.show("wasmpool@hello.service", "StatusText");
        assert!(status.contains("last reload: ok"), "{status}");
    }
    let (_, failed) = load.finish("reload under load");
    assert!(
        failed.is_empty(),
        "requests failed across reloads: {failed:?}"
    );

    // Restart under load: systemd holds the socket; no connection is
    // refused and no request fails.
    let pid_before = c.show("wasmpool@hello.service", "MainPID");
    let load = Load::start(&c, "restart", 3, HELLO_SOCK, "/");
    c.ok("systemctl restart wasmpool@hello.service");
    assert_ne!(c.show("wasmpool@hello.service", "MainPID"), pid_before);
    let (_, failed) = load.finish("restart under load");
    assert!(
        failed.is_empty(),
        "requests failed across a restart: {failed:?}"
    );

    // kill -9 under load: systemd restarts the service; only the requests
    // in flight at that moment (at most one per worker) fail.
    let load = Load::start(&c, "kill", 3, HELLO_SOCK, "/");
    let restarts = c.show("wasmpool@hello.service", "NRestarts");
    c.ok("kill -9 $(systemctl show -P MainPID wasmpool@hello.service)");
    c.wait_for(
        "systemd to restart the service",
        Duration::from_secs(30),
        |c| {
            c.show("wasmpool@hello.service", "NRestarts") != restarts
                && c.show("wasmpool@hello.service", "ActiveState") == "active"
        },
    );
    let (_, failed) = load.finish("kill -9 under load");
    assert!(
        failed.len() <= 3,
        "more than the in-flight requests failed: {failed:?}"
    );

    // A second app, the test guest with slow routes and a log route.
    write(&c, "/srv/suite.wasm", &p2_suite());
    write(
        &c,
        "/etc/wasmpool/suite.toml",
        b"component = \"/srv/suite.wasm\"\nmax-instance-reuse-count = 16\n",
    );
    c.ok("systemctl enable --now wasmpool@suite.socket");

    // Stop during slow requests: they complete, the unit ends inactive
    // and not failed.
    c.ok("rm -f /root/e2e/slow.*; for i in 1 2 3; do \
          (curl -s -o /dev/null -w '%{http_code}' --max-time 30 --unix-socket /run/wasmpool/suite.sock \
           http://localhost/sleep/3000 >/root/e2e/slow.$i) & done");
    c.wait_status(
        "wasmpool@suite.service",
        "3 live instances",
        Duration::from_secs(30),
    );
    c.ok("systemctl stop wasmpool@suite.service");
    c.ok("while [ $(ls /root/e2e/slow.* | wc -l) -lt 3 ] || [ -n \"$(find /root/e2e -name 'slow.*' -empty)\" ]; do sleep 0.1; done");
    for i in 1..=3 {
        let code = std::fs::read_to_string(c.path(&format!("/root/e2e/slow.{i}"))).unwrap();
        assert_eq!(code, "200", "slow request {i} during stop");
    }
    assert_eq!(c.show("wasmpool@suite.service", "ActiveState"), "inactive");
    assert_eq!(c.show("wasmpool@suite.service", "Result"), "success");

    // Guest stdout reaches the journal of the app's unit.
    let (code, _) = c.get(SUITE_SOCK, "/log");
    assert_eq!(code, "200");
    c.wait_for(
        "the guest's line in the journal",
        Duration::from_secs(10),
        |c| {
            c.ok("journalctl -u wasmpool@suite.service --no-pager -o cat")
                .contains("guest log line from p2")
        },
    );

    // A broken component on reload: the old one keeps serving and the
    // status says why.
    write(&c, "/srv/suite.wasm", b"this is not wasm");
    c.ok("systemctl reload wasmpool@suite.service");
    let status = c.wait_status(
        "wasmpool@suite.service",
        "last reload: FAILED",
        Duration::from_secs(30),
    );
    assert!(status.contains("not a WebAssembly"), "{status}");
    let (code, body) = c.get(SUITE_SOCK, "/");
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from p2\n"));
    assert_eq!(c.show("wasmpool@suite.service", "ActiveState"), "active");

    tls_on_a_tcp_socket(&c);
    memory_storm(&c);

    // Hardening.
    for unit in ["wasmpool@hello.service", "wasmpool.service"] {
        let e = exposure(&c, unit);
        eprintln!("{unit}: exposure {e}");
        assert!(e <= 1.5, "{unit}: exposure {e} > 1.5");
    }

    nginx_module(&c, apt);

    // Purge leaves nothing behind (the admin removes their own app first).
    c.ok(
        "rm -rf /etc/wasmpool/suite.toml /srv/suite.wasm /etc/wasmpool/storm.toml /srv/storm.wasm \
          /etc/systemd/system/wasmpool@storm.service.d",
    );
    c.ok("dpkg --purge wasmpool libwasmpool-dev libwasmpool0");
    let left = c.ok(
        "find / -xdev \\( -path /proc -o -path /root/e2e \\) -prune -o -name '*wasmpool*' -print; \
         ls -d /run/wasmpool 2>/dev/null; true",
    );
    assert!(left.trim().is_empty(), "left behind after purge:\n{left}");
    assert_eq!(c.show("wasmpool@hello.socket", "ActiveState"), "inactive");
    eprintln!("end-to-end test took {:?}", started.elapsed());
    drop(c);
}

/// A componentize-py echo app with `MemoryMax=640M` on its unit gets 48
/// concurrent 12 MiB uploads: it is not killed, every connection gets a
/// status, and it serves normally afterwards.
fn memory_storm(c: &Container) {
    const LIMIT: u64 = 640 << 20;
    write(c, "/srv/storm.wasm", &python_guest("p2"));
    write(
        c,
        "/etc/wasmpool/storm.toml",
        b"component = \"/srv/storm.wasm\"\n",
    );
    write(
        c,
        "/etc/systemd/system/wasmpool@storm.service.d/memory.conf",
        format!("[Service]\nMemoryMax={LIMIT}\n").as_bytes(),
    );
    c.ok("systemctl daemon-reload && systemctl enable --now wasmpool@storm.socket");
    assert_eq!(
        c.show("wasmpool@storm.service", "MemoryMax"),
        LIMIT.to_string()
    );
    // The first start compiles the guest (without a limit yet, see below):
    // 16 s on an idle 2-core host, more than 30 s while other tests run.
    let (code, _) = c.get_within("/run/wasmpool/storm.sock", "/", 300);
    assert_eq!(code, "200");
    // Where systemd can apply MemoryMax= (cgroup v2, or a writable v1
    // memory controller) the service's cgroup has the limit. Under
    // systemd-nspawn on a cgroup v1 host the container's memory controller
    // is read-only, so the same limit goes on the container's cgroup from
    // outside: what the service sees is the same file the budget reads.
    let applied = c
        .sh("cat /sys/fs/cgroup/system.slice/system-wasmpool.slice/wasmpool@storm.service/memory.max \
             /sys/fs/cgroup/memory/system.slice/system-wasmpool.slice/wasmpool@storm.service/memory.limit_in_bytes \
             2>/dev/null")
        .stdout;
    let applied = String::from_utf8_lossy(&applied).contains(&LIMIT.to_string());
    if !applied {
        let dir = c
            .memcg
            .as_ref()
            .expect("MemoryMax= not applied and no memory cgroup for the container");
        eprintln!(
            "MemoryMax= cannot be applied inside this container: limiting the container to it"
        );
        std::fs::write(dir.join("memory.limit_in_bytes"), LIMIT.to_string()).unwrap();
    }
    c.ok("systemctl restart wasmpool@storm.service");
    let (code, _) = c.get("/run/wasmpool/storm.sock", "/");
    assert_eq!(code, "200");
    let status = c.wait_status("wasmpool@storm.service", "memory ", Duration::from_secs(10));
    let budget = status
        .split("memory ")
        .nth(1)
        .and_then(|r| r.split(" of ").nth(1))
        .and_then(|r| r.split(';').next())
        .expect("the budget in the status")
        .to_string();
    let budget_bytes = shown_size(&budget);
    assert!(
        budget_bytes < LIMIT && budget_bytes > LIMIT / 3,
        "the budget follows MemoryMax=: {status}"
    );
    let pid = c.show("wasmpool@storm.service", "MainPID");
    let restarts = c.show("wasmpool@storm.service", "NRestarts");
    c.ok("head -c 12582912 /dev/urandom > /root/e2e/12m.bin && rm -f /root/e2e/storm.*");
    c.ok("for i in $(seq 1 48); do \
          (curl -s -o /dev/null -w '%{http_code}' --max-time 120 --unix-socket /run/wasmpool/storm.sock \
           --data-binary @/root/e2e/12m.bin http://localhost/echo > /root/e2e/storm.$i) & done; wait");
    let mut counts = std::collections::BTreeMap::new();
    for i in 1..=48 {
        let code = std::fs::read_to_string(c.path(&format!("/root/e2e/storm.{i}"))).unwrap();
        *counts.entry(code).or_insert(0) += 1;
    }
    eprintln!("memory storm under systemd (budget {budget}): {counts:?}");
    for code in counts.keys() {
        assert!(
            ["200", "413", "500", "503"].contains(&code.as_str()),
            "a connection got {code:?}: {counts:?}"
        );
    }
    assert_eq!(
        c.show("wasmpool@storm.service", "MainPID"),
        pid,
        "the service was killed"
    );
    assert_eq!(c.show("wasmpool@storm.service", "NRestarts"), restarts);
    assert_eq!(c.show("wasmpool@storm.service", "ActiveState"), "active");
    if let (false, Some(dir)) = (applied, &c.memcg) {
        let oom = std::fs::read_to_string(dir.join("memory.oom_control")).unwrap();
        assert!(oom.contains("oom_kill 0"), "{oom}");
        std::fs::write(dir.join("memory.limit_in_bytes"), "-1").unwrap();
    }
    let (code, body) = c.get("/run/wasmpool/storm.sock", "/");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "hello from python p2\n")
    );
    c.ok("systemctl disable --now wasmpool@storm.socket wasmpool@storm.service");
}

/// A size as the status shows it (`427.9MiB`), in bytes.
fn shown_size(s: &str) -> u64 {
    let split = s
        .find(|ch: char| ch.is_ascii_alphabetic())
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult = match unit {
        "KiB" => 1u64 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => 1,
    };
    (num.parse::<f64>().unwrap_or_else(|_| panic!("size {s:?}")) * mult as f64) as u64
}

/// The packaged unit writes the access log to a file in its
/// LogsDirectory= (not the journal, whose rate limit would drop lines at
/// load); the packaged logrotate snippet rotates it and SIGUSR1 makes the
/// service reopen it.
fn access_log_file_and_logrotate(c: &Container) {
    let file = "/var/log/wasmpool/hello/access.log";
    // Lines are written in batches, at least every second.
    let wait_for = |needle: &str, path: &str| {
        for _ in 0..50 {
            if c.sh(&format!("grep -q -- '{needle}' {path}"))
                .status
                .success()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "no {needle:?} in {path}: {}",
            c.ok(&format!("cat {path} || true"))
        );
    };
    let (code, _) = c.get(HELLO_SOCK, "/before-rotation");
    assert_eq!(code, "200");
    wait_for("target=/before-rotation", file);
    let journal = c.ok("journalctl -u wasmpool@hello.service -o cat --no-pager");
    assert!(
        !journal.contains("access: "),
        "access lines in the journal: {journal}"
    );
    c.ok("logrotate -f /etc/logrotate.d/wasmpool");
    c.ok(&format!("grep -q -- target=/before-rotation {file}.1"));
    let (code, _) = c.get(HELLO_SOCK, "/after-rotation");
    assert_eq!(code, "200");
    wait_for("target=/after-rotation", file);
    c.ok(&format!("! grep -q -- target=/after-rotation {file}.1"));
    assert_eq!(c.show("wasmpool@hello.service", "ActiveState"), "active");
}

/// TLS on a TCP socket added to the hello app by drop-ins, the key handed
/// over with `LoadCredential=` (the service's dynamic user cannot read
/// /etc/wasmpool/tls): curl over HTTPS (HTTP/2 by ALPN) inside the
/// container, while the unix socket keeps serving plain HTTP.
fn tls_on_a_tcp_socket(c: &Container) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "wasmpool e2e");
    let cert = p.self_signed(&key).unwrap();
    write(c, "/etc/wasmpool/tls/hello.crt", cert.pem().as_bytes());
    write(
        c,
        "/etc/wasmpool/tls/hello.key",
        key.serialize_pem().as_bytes(),
    );
    c.ok("chmod 600 /etc/wasmpool/tls/hello.key");
    write(
        c,
        "/etc/systemd/system/wasmpool@hello.socket.d/tls.conf",
        b"[Socket]\nListenStream=127.0.0.1:8443\n",
    );
    write(
        c,
        "/etc/systemd/system/wasmpool@hello.service.d/tls.conf",
        b"[Service]\n\
          LoadCredential=tls.crt:/etc/wasmpool/tls/hello.crt\n\
          LoadCredential=tls.key:/etc/wasmpool/tls/hello.key\n\
          ExecStart=\n\
          ExecStart=/usr/bin/wasmpool serve --config /etc/wasmpool/%i.toml \
          --tls-cert ${CREDENTIALS_DIRECTORY}/tls.crt --tls-key ${CREDENTIALS_DIRECTORY}/tls.key\n",
    );
    c.ok(
        "systemctl daemon-reload && systemctl stop wasmpool@hello.service wasmpool@hello.socket \
          && systemctl start wasmpool@hello.socket",
    );
    let out = c.ok(
        "curl -sS --max-time 30 --cacert /etc/wasmpool/tls/hello.crt --resolve localhost:8443:127.0.0.1 \
         -w ' %{http_code} %{http_version}' https://localhost:8443/",
    );
    assert_eq!(out, "Hello from wasmpool!\n 200 2", "{out}");
    let (code, body) = c.get(HELLO_SOCK, "/");
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("200", "Hello from wasmpool!\n")
    );
    let log = c.ok("journalctl -u wasmpool@hello.service -o cat --no-pager");
    assert!(
        log.contains("Serving HTTPS on https://127.0.0.1:8443/"),
        "{log}"
    );
    access_log_file_and_logrotate(c);
    // Back to the packaged units.
    c.ok("rm -rf /etc/systemd/system/wasmpool@hello.socket.d /etc/systemd/system/wasmpool@hello.service.d \
          /etc/wasmpool/tls && systemctl daemon-reload && systemctl restart wasmpool@hello.socket");
}

/// The nginx module's package in Debian's nginx (in the base root, started
/// at boot): installed from the local repository it enables itself the way
/// Debian's libnginx-mod-* packages do (a link in modules-enabled, nginx
/// reloaded by dpkg's trigger); a site on a loopback port serves the
/// packaged hello component, with the compile cache in a directory of the
/// workers' user, across reloads; purging removes the link and the module
/// and leaves nginx running without it.
fn nginx_module(c: &Container, apt: &str) {
    const PKG: &str = "libnginx-mod-http-wasmpool";
    const LINK: &str = "/etc/nginx/modules-enabled/50-mod-http-wasmpool.conf";
    const LOAD: &str = "/usr/share/nginx/modules-available/mod-http-wasmpool.conf";
    const MODULE: &str = "/usr/lib/nginx/modules/ngx_http_wasmpool_module.so";
    const SITE: &str = "/etc/nginx/conf.d/wasmpool-hello.conf";
    const CACHE: &str = "/var/cache/nginx/wasmpool";
    const URL: &str = "http://127.0.0.1:8090/";
    let nginx_log = |c: &Container| {
        c.ok("journalctl -u nginx.service --no-pager -o cat; cat /var/log/nginx/error.log; true")
    };
    assert_eq!(
        c.show("nginx.service", "ActiveState"),
        "active",
        "nginx is not running: {}",
        nginx_log(c)
    );
    let master = c.ok("cat /run/nginx.pid").trim().to_string();
    // The worker processes: the children of the master.
    let workers = |c: &Container| -> Vec<String> {
        c.ok(&format!("cat /proc/{master}/task/*/children"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // Waits until none of `old` serves any more (a reload's new workers
    // took over), then checks the master is the same process.
    let reloaded = |c: &Container, old: &[String]| {
        c.wait_for(
            "nginx's old workers to exit",
            Duration::from_secs(30),
            |c| {
                let now = workers(c);
                !now.is_empty() && now.iter().all(|p| !old.contains(p))
            },
        );
        assert_eq!(c.ok("cat /run/nginx.pid").trim(), master, "nginx restarted");
    };

    let before = workers(c);
    c.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive {apt} install -y --no-install-recommends {PKG}"
    ));
    assert_eq!(c.ok(&format!("readlink {LINK}")).trim(), LOAD);
    assert_eq!(
        c.ok(&format!("cat {LINK}")),
        "load_module modules/ngx_http_wasmpool_module.so;\n"
    );
    // Its dependencies: the installed nginx's ABI and the library package.
    let depends = c.ok(&format!("dpkg-query -W -f '${{Depends}}' {PKG}"));
    let provides = c.ok("dpkg-query -W -f '${Provides}' nginx");
    let abi = depends
        .split(", ")
        .find(|d| d.starts_with("nginx-abi-"))
        .unwrap_or_else(|| panic!("no nginx-abi-* in Depends: {depends}"));
    assert!(
        provides.split(", ").any(|p| p == abi),
        "{depends} / nginx provides {provides}"
    );
    assert!(depends.contains("libwasmpool0 (>= "), "{depends}");
    // No run path: libwasmpool.so.0 comes from the multiarch directory.
    let dynamic = c.ok(&format!("readelf -d {MODULE}"));
    assert!(
        dynamic.contains("Shared library: [libwasmpool.so.0]")
            && !dynamic.contains("RPATH")
            && !dynamic.contains("RUNPATH"),
        "{dynamic}"
    );
    let needed = c.ok(&format!("ldd {MODULE}"));
    assert!(
        needed.contains("libwasmpool.so.0 => /lib/x86_64-linux-gnu/libwasmpool.so.0")
            || needed.contains("libwasmpool.so.0 => /usr/lib/x86_64-linux-gnu/libwasmpool.so.0"),
        "{needed}"
    );
    // dpkg's trigger reloaded nginx, which now has the module loaded.
    reloaded(c, &before);
    assert!(
        c.ok(&format!("cat /proc/{master}/maps"))
            .contains("ngx_http_wasmpool_module.so"),
        "the module is not loaded in nginx: {}",
        nginx_log(c)
    );

    // A site serving the packaged example component.
    c.ok(&format!("install -d -o www-data -g www-data {CACHE}"));
    write(
        c,
        SITE,
        format!(
            "server {{\n    listen 127.0.0.1:8090;\n    wasmpool_cache_dir {CACHE};\n    \
             location / {{\n        wasmpool_component /usr/share/wasmpool/hello.wasm;\n    }}\n}}\n"
        )
        .as_bytes(),
    );
    c.ok("nginx -t");
    let get = |c: &Container| {
        let o = c.sh(&format!("curl -sS --max-time 30 -w '%{{http_code}}' {URL}"));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    const HELLO: &str = "Hello from wasmpool!\n200";
    for round in 1..=2 {
        let old = workers(c);
        c.ok("systemctl reload nginx");
        reloaded(c, &old);
        let out = get(c);
        assert_eq!(
            out,
            HELLO,
            "GET {URL} after reload {round}: {}",
            nginx_log(c)
        );
        // The workers compiled into (then loaded from) the cache directory.
        c.ok(&format!(
            "find {CACHE} -maxdepth 1 -name '*.cwasm' -user www-data | grep -q ."
        ));
    }
    assert_eq!(c.show("nginx.service", "ActiveState"), "active");
    let errors = c.ok("grep -E '\\[(emerg|alert|crit)\\]' /var/log/nginx/error.log || true");
    assert!(errors.is_empty(), "nginx's error log: {errors}");

    // The admin removes their site, then purges: the link (moved aside on
    // removal) and the module are gone, and nginx, reloaded by the
    // trigger, runs without the module.
    c.ok(&format!("rm -rf {SITE} {CACHE}"));
    let old = workers(c);
    c.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get purge -y {PKG}"
    ));
    c.ok(&format!(
        "! test -e {LINK} && ! test -L {LINK} && ! test -L {LINK}.removed \
         && ! test -e {MODULE} && ! test -e {LOAD}"
    ));
    c.ok("dpkg-query -W -f='${Status}' libwasmpool0 | grep -q 'install ok installed'");
    reloaded(c, &old);
    assert_eq!(c.show("nginx.service", "ActiveState"), "active");
    assert!(
        !c.ok(&format!("cat /proc/{master}/maps"))
            .contains("ngx_http_wasmpool_module.so"),
        "nginx still has the module loaded"
    );
    c.ok("nginx -t");
    let out = c.ok("curl -sS --max-time 30 -o /dev/null -w '%{http_code}' http://127.0.0.1/");
    assert_eq!(out, "200", "nginx's default site after the purge");
}
