//! The memory budget: the most memory the guests may hold at once, across
//! every instance of every pool of a process (linear memories, and request
//! bodies that wasmpool buffers before handing them to a guest).
//!
//! Without it, enough concurrent instances that each stay under
//! `max-memory-size` still add up past what the machine or the service's
//! cgroup allows, and the kernel OOM-kills the whole server with every
//! request in flight. With it:
//!
//! - a `memory.grow` that would cross the budget waits (at most
//!   `max-queue-wait`) for other guests to give memory back, then fails for
//!   that guest only (its allocator sees an ordinary out-of-memory). When
//!   every guest holding memory is waiting for more, none would ever give
//!   any back: the youngest gives up at once, so the older ones finish.
//!   An instance whose start-up memory does not fit is not created;
//! - while the budget cannot hold one more instance, new requests wait in
//!   the admission queue and then get 503 (see [`super::admission`]);
//! - buffered request bodies take their bytes from it and give them back
//!   when the guest has read them.
//!
//! The default (`memory-budget = "auto"`) follows the service's memory
//! limit: cgroup v2 `memory.max` (what systemd's `MemoryMax=` sets) or
//! cgroup v1 `memory.limit_in_bytes`, the smallest along the path from the
//! process's cgroup to the root; without one, physical memory. Of that,
//! [`headroom`] stays for the process itself (compiled code, connections,
//! warm instance slots).

use crate::error::ConfigError;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::Notify;

/// The process-wide account of guest memory.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: AtomicU64,
    used: AtomicU64,
    /// What idle instance slots keep resident past the process's headroom
    /// (see [`super::retained`]).
    retained: AtomicU64,
    /// Largest memory one instance started with.
    instance_floor: AtomicU64,
    /// Typical most memory an instance held in its life (a moving
    /// average): what a new instance will likely need.
    instance_peak: AtomicU64,
    /// `memory.grow` calls (and instantiations) refused by the budget.
    refused: AtomicU64,
    /// Tasks waiting in [`MemoryBudget::wait_for_room`] or
    /// [`MemoryBudget::wait_to_grow`]; releases notify only when there are
    /// some.
    waiters: AtomicUsize,
    freed: Notify,
    /// Stores that hold memory now.
    holders: AtomicUsize,
    /// Stores (by instance id: older ones have smaller ids) waiting for
    /// memory to grow.
    growing: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Ways to give memory back that serve no request (idle instances).
    reclaimers: std::sync::Mutex<Vec<std::sync::Weak<dyn Reclaim>>>,
}

/// Something holding memory that serves no request and can be dropped.
pub trait Reclaim: Send + Sync {
    /// Drops one idle thing; false if there was none.
    fn reclaim_one(&self) -> bool;
}

impl MemoryBudget {
    pub fn new(limit: u64) -> MemoryBudget {
        MemoryBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
            retained: AtomicU64::new(0),
            instance_floor: AtomicU64::new(0),
            instance_peak: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            freed: Notify::new(),
            holders: AtomicUsize::new(0),
            growing: Default::default(),
            reclaimers: Default::default(),
        }
    }

    /// Registers idle instances that may be dropped to free memory.
    pub(crate) fn add_reclaimer(&self, r: std::sync::Weak<dyn Reclaim>) {
        let mut v = self.reclaimers.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(r);
    }

    /// Drops idle instances until `enough` says so or none is left.
    pub(crate) fn reclaim_until(&self, enough: impl Fn() -> bool) {
        let live: Vec<_> = {
            let v = self.reclaimers.lock().unwrap_or_else(|e| e.into_inner());
            v.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        for r in live {
            while !enough() && r.reclaim_one() {}
        }
    }

    /// A store starts (`true`) or stops holding memory.
    pub(crate) fn holder(&self, start: bool) {
        if start {
            self.holders.fetch_add(1, Relaxed);
        } else {
            self.holders.fetch_sub(1, Relaxed);
            self.wake();
        }
    }

    /// Waits, at most `timeout`, until `grow` succeeds as memory is given
    /// back, for the store with instance id `id`. Gives up at once when
    /// every store holding memory waits to grow and this is the youngest.
    pub(crate) async fn wait_to_grow(
        &self,
        id: u64,
        timeout: Duration,
        mut grow: impl FnMut() -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.waiters.fetch_add(1, Relaxed);
        self.growing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
        // Others re-check whether everyone now waits.
        self.freed.notify_waiters();
        let _waiting = scopeguard(|| {
            self.growing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.waiters.fetch_sub(1, Relaxed);
            self.freed.notify_waiters();
        });
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            self.reclaim_until(|| self.used() < self.limit());
            if grow() {
                return true;
            }
            let stuck = {
                let g = self.growing.lock().unwrap_or_else(|e| e.into_inner());
                g.len() >= self.holders.load(Relaxed) && g.last() == Some(&id)
            };
            if stuck {
                tracing::debug!(
                    instance = id,
                    "every guest waits for memory: the youngest gives up"
                );
                return false;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return grow();
            }
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    /// Changes the limit (a reload with another `memory-budget`). Memory
    /// already held stays held; new reservations see the new limit.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Relaxed);
        self.wake();
    }

    /// Bytes in use: what guests and buffered bodies hold, and what idle
    /// instance slots keep past the headroom.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed) + self.retained()
    }

    /// What idle instance slots keep resident past the headroom.
    pub fn retained(&self) -> u64 {
        self.retained.load(Relaxed)
    }

    /// One engine's idle slots now keep `now` bytes past the headroom,
    /// where they kept `before`.
    pub(crate) fn retain(&self, before: u64, now: u64) {
        if now >= before {
            self.retained.fetch_add(now - before, Relaxed);
        } else {
            self.retained.fetch_sub(before - now, Relaxed);
            self.wake();
        }
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Takes `n` bytes if they fit.
    pub fn try_reserve(&self, n: u64) -> bool {
        let limit = self.limit().saturating_sub(self.retained());
        let ok = self
            .used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(n).filter(|after| *after <= limit)
            })
            .is_ok();
        if !ok {
            self.refused.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Takes `n` bytes whether they fit or not, for memory that exists
    /// already (a frame a guest wrote); it still counts, so nothing new
    /// starts until it is given back.
    pub fn force_reserve(&self, n: u64) {
        self.used.fetch_add(n, Relaxed);
    }

    /// Gives back `n` bytes taken with [`MemoryBudget::try_reserve`].
    pub fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let before = self.used.fetch_sub(n, Relaxed);
        debug_assert!(before >= n, "released more than reserved");
        self.wake();
    }

    fn wake(&self) {
        if self.waiters.load(Relaxed) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Records how much memory an instance held once created.
    pub(crate) fn saw_instance(&self, bytes: u64) {
        self.instance_floor.fetch_max(bytes, Relaxed);
    }

    /// Records the most memory an instance held before it ended.
    pub(crate) fn saw_peak(&self, bytes: u64) {
        // A racing update loses one sample at worst.
        // avg += (new - avg) / 4
        let avg = self.instance_peak.load(Relaxed);
        let next = if avg == 0 {
            bytes
        } else {
            (avg * 3 + bytes) / 4
        };
        self.instance_peak.store(next, Relaxed);
    }

    /// What a new instance is expected to need: its start-up memory, or
    /// what instances typically grew to, whichever is more. Reserving room
    /// for that (not only the start-up size) keeps a burst from starting
    /// more instances than can grow, which would fail them all.
    pub fn instance_estimate(&self) -> u64 {
        self.instance_floor
            .load(Relaxed)
            .max(self.instance_peak.load(Relaxed))
    }

    /// Whether one more instance fits (see [`MemoryBudget::instance_estimate`]),
    /// when it takes `credit` bytes back from what idle slots keep (the
    /// slot it starts in, see [`super::retained`]).
    pub fn has_room_for_instance(&self, credit: u64) -> bool {
        self.used()
            .saturating_sub(credit)
            .saturating_add(self.instance_estimate())
            <= self.limit()
    }

    /// Waits at most `timeout` until one more instance fits (taking back
    /// what `credit` says); false if it still does not.
    pub async fn wait_for_room(&self, timeout: Duration, credit: impl Fn() -> u64) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.waiters.fetch_add(1, Relaxed);
        let _waiting = scopeguard(|| {
            self.waiters.fetch_sub(1, Relaxed);
        });
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.has_room_for_instance(credit()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.has_room_for_instance(credit());
            }
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

/// Bytes of a [`MemoryBudget`] held by one owner (a store, a buffered
/// body), given back when it is dropped.
#[derive(Debug)]
pub struct Held {
    budget: std::sync::Arc<MemoryBudget>,
    bytes: u64,
    peak: u64,
}

impl Held {
    pub fn new(budget: std::sync::Arc<MemoryBudget>) -> Held {
        Held {
            budget,
            bytes: 0,
            peak: 0,
        }
    }

    /// Takes `n` more bytes, if they fit.
    pub fn grow(&mut self, n: u64) -> bool {
        if self.budget.try_reserve(n) {
            self.bytes += n;
            self.peak = self.peak.max(self.bytes);
            true
        } else {
            false
        }
    }

    /// The most bytes held at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Takes `n` more bytes even past the limit (see
    /// [`MemoryBudget::force_reserve`]).
    pub fn force_grow(&mut self, n: u64) {
        self.budget.force_reserve(n);
        self.bytes += n;
        self.peak = self.peak.max(self.bytes);
    }

    /// Gives back `n` of the bytes held.
    pub fn shrink(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.budget.release(n);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    pub fn budget_arc(&self) -> &std::sync::Arc<MemoryBudget> {
        &self.budget
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Where the memory limit a default budget follows came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitSource {
    /// A cgroup v2 `memory.max` (systemd's `MemoryMax=`).
    CgroupV2(PathBuf),
    /// A cgroup v1 `memory.limit_in_bytes`.
    CgroupV1(PathBuf),
    /// No cgroup limit: the machine's physical memory.
    Physical,
}

/// The memory the process may use, and where that figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub source: LimitSource,
}

impl std::fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = crate::units::format_size(self.bytes);
        match &self.source {
            LimitSource::CgroupV2(p) => write!(f, "{size} (cgroup memory.max, {})", p.display()),
            LimitSource::CgroupV1(p) => {
                write!(f, "{size} (cgroup memory.limit_in_bytes, {})", p.display())
            }
            LimitSource::Physical => write!(f, "{size} (physical memory)"),
        }
    }
}

/// The budget a `memory-budget` knob asks for, in bytes, and how it was
/// found (for the log). `base` is what the process needs besides its
/// guests (see [`process_base`]). An explicit budget above what the
/// service may use at all is refused: it would not prevent the OOM kill it
/// exists for.
pub fn resolve(
    arg: crate::config::MemoryBudgetArg,
    base: u64,
) -> Result<(u64, String), ConfigError> {
    use crate::config::MemoryBudgetArg;
    use crate::units::format_size;
    let limit = detect_limit();
    match arg {
        MemoryBudgetArg::Auto => {
            let b = limit.bytes.saturating_sub(headroom(limit.bytes, base));
            if b == 0 {
                return Err(ConfigError::Invalid {
                    key: "memory-budget",
                    reason: format!(
                        "nothing is left for guests: this process may use {limit} and needs {} itself; raise the memory limit (MemoryMax=, podman --memory, Kubernetes limits.memory) to at least {}",
                        format_size(base),
                        format_size(base + base / 2)
                    ),
                });
            }
            Ok((b, format!("{} of {limit}", format_size(b))))
        }
        MemoryBudgetArg::Bytes(b) if b > limit.bytes => Err(ConfigError::Invalid {
            key: "memory-budget",
            reason: format!(
                "{} is more than this process may use: {limit}",
                format_size(b)
            ),
        }),
        MemoryBudgetArg::Bytes(b) => Ok((b, format!("{} (set; limit {limit})", format_size(b)))),
    }
}

/// What of `limit` stays for the process itself rather than the guests:
/// a quarter, or `base` when that is more.
pub fn headroom(limit: u64, base: u64) -> u64 {
    (limit / 4).max(base)
}

/// Memory for connections, buffers and the runtime beyond what the
/// process holds at start-up.
const BASE_MARGIN: u64 = 64 << 20;

/// What the process needs besides its guests: what it holds now (code,
/// compiled components, the runtime), what idle instance slots keep
/// resident (`warm`), and a margin.
pub fn process_base(warm: u64) -> u64 {
    resident_bytes() + warm + BASE_MARGIN
}

/// The process's resident memory (VmRSS).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10)
}

/// The memory limit of this process: its cgroup's, else physical memory.
pub fn detect_limit() -> MemoryLimit {
    let physical = physical_memory();
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cgroup = cgroup_limit(&read("/proc/self/cgroup"), &read("/proc/self/mountinfo"));
    match cgroup {
        Some(c) if c.bytes < physical => c,
        _ => MemoryLimit {
            bytes: physical,
            source: LimitSource::Physical,
        },
    }
}

fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as u64).saturating_mul(size as u64)
    } else {
        u64::MAX / 2
    }
}

/// Where a cgroup hierarchy is mounted: the mount point, and which cgroup
/// its root is (not `/` inside a container).
struct Mount {
    point: PathBuf,
    root: PathBuf,
}

/// The cgroup2 mount and the cgroup v1 mount with the memory controller,
/// from the text of /proc/self/mountinfo.
fn cgroup_mounts(mountinfo: &str) -> (Option<Mount>, Option<Mount>) {
    let (mut v2, mut v1) = (None, None);
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if f.len() < 5 || r.is_empty() {
            continue;
        }
        let mount = || Mount {
            point: PathBuf::from(unescape(f[4])),
            root: PathBuf::from(unescape(f[3])),
        };
        match r[0] {
            "cgroup2" if v2.is_none() => v2 = Some(mount()),
            "cgroup"
                if v1.is_none()
                    && r.get(2)
                        .is_some_and(|o| o.split(',').any(|o| o == "memory")) =>
            {
                v1 = Some(mount())
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The smallest memory limit on the path from the process's cgroup (the
/// text of /proc/self/cgroup) up to the root of its hierarchy, for the
/// cgroup2 hierarchy and the v1 memory hierarchy found in `mountinfo`.
pub fn cgroup_limit(proc_self_cgroup: &str, mountinfo: &str) -> Option<MemoryLimit> {
    let (v2, v1) = cgroup_mounts(mountinfo);
    let mut best: Option<MemoryLimit> = None;
    for line in proc_self_cgroup.lines() {
        // hierarchy-ID:controller-list:cgroup-path
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (mount, file, v2) = if controllers.is_empty() {
            (v2.as_ref(), "memory.max", true)
        } else if controllers.split(',').any(|c| c == "memory") {
            (v1.as_ref(), "memory.limit_in_bytes", false)
        } else {
            continue;
        };
        let Some(mount) = mount else { continue };
        // The cgroup's path below the mount's root.
        let path = Path::new(path.trim());
        let rel = path
            .strip_prefix(&mount.root)
            .or_else(|_| path.strip_prefix("/"))
            .unwrap_or(path);
        let mut dir = mount.point.join(rel);
        loop {
            let f = dir.join(file);
            if let Some(bytes) = read_limit(&f)
                && best.as_ref().is_none_or(|b| bytes < b.bytes)
            {
                best = Some(MemoryLimit {
                    bytes,
                    source: if v2 {
                        LimitSource::CgroupV2(f)
                    } else {
                        LimitSource::CgroupV1(f)
                    },
                });
            }
            if dir == mount.point || !dir.pop() || !dir.starts_with(&mount.point) {
                break;
            }
        }
    }
    best
}

/// A limit file's value; `None` for "max", an unlimited v1 value, or a
/// file that cannot be read.
fn read_limit(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: u64 = text.trim().parse().ok()?;
    // cgroup v1 writes "no limit" as the largest page-aligned i64.
    (v < (1u64 << 62)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_and_release() {
        let b = MemoryBudget::new(100);
        assert!(b.try_reserve(60));
        assert!(!b.try_reserve(41));
        assert_eq!(b.refused(), 1);
        assert!(b.try_reserve(40));
        b.release(50);
        assert_eq!(b.used(), 50);
        let mut h = Held::new(std::sync::Arc::new(MemoryBudget::new(10)));
        assert!(h.grow(6) && !h.grow(5) && h.grow(4));
        h.shrink(3);
        assert_eq!(h.budget().used(), 7);
    }

    #[test]
    fn the_estimate_decides_room() {
        let b = MemoryBudget::new(100);
        b.saw_instance(30);
        assert!(b.try_reserve(70));
        assert!(b.has_room_for_instance(0));
        assert!(b.try_reserve(1));
        assert!(!b.has_room_for_instance(0));
        b.release(71);
        // Instances that grow to 60 need room for 60.
        b.saw_peak(60);
        assert_eq!(b.instance_estimate(), 60);
        assert!(b.try_reserve(41));
        assert!(!b.has_room_for_instance(0));
        // The average follows what instances do now.
        for _ in 0..40 {
            b.saw_peak(20);
        }
        assert_eq!(b.instance_estimate(), 30);
    }

    #[test]
    fn what_idle_slots_keep_counts_and_a_new_instance_takes_it_back() {
        let b = MemoryBudget::new(100);
        b.saw_instance(30);
        b.retain(0, 60);
        assert_eq!((b.used(), b.retained()), (60, 60));
        // Bodies and growth see it.
        assert!(!b.try_reserve(41));
        assert!(b.try_reserve(40));
        b.release(40);
        // An instance needs 30: 60 + 30 fits, 80 + 30 does not, unless it
        // starts in a slot that keeps 20 of the 80.
        assert!(b.has_room_for_instance(0));
        b.retain(60, 80);
        assert!(!b.has_room_for_instance(0));
        assert!(b.has_room_for_instance(20));
        b.retain(80, 0);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn when_every_guest_waits_to_grow_the_youngest_gives_up() {
        let b = std::sync::Arc::new(MemoryBudget::new(100));
        b.holder(true);
        b.holder(true);
        assert!(b.try_reserve(50) && b.try_reserve(50));
        // The older (id 1) waits; it is not stuck while id 2 may free.
        let older = {
            let b = b.clone();
            tokio::spawn(async move {
                b.wait_to_grow(1, Duration::from_secs(10), || b.try_reserve(30))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!older.is_finished());
        // Now the younger waits too: it gives up, frees its 50, and the
        // older one grows.
        let t = std::time::Instant::now();
        assert!(
            !b.wait_to_grow(2, Duration::from_secs(10), || b.try_reserve(30))
                .await
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        b.release(50);
        b.holder(false);
        assert!(older.await.unwrap());
    }

    #[tokio::test]
    async fn waiting_for_room_ends_when_memory_is_freed() {
        let b = std::sync::Arc::new(MemoryBudget::new(100));
        b.saw_instance(50);
        assert!(b.try_reserve(80));
        assert!(!b.wait_for_room(Duration::from_millis(20), || 0).await);
        let b2 = b.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            b2.release(40);
        });
        assert!(b.wait_for_room(Duration::from_secs(5), || 0).await);
    }

    #[test]
    fn headroom_keeps_some_for_the_process() {
        assert_eq!(headroom(1536 << 20, 200 << 20), 384 << 20);
        assert_eq!(headroom(640 << 20, 220 << 20), 220 << 20);
        assert_eq!(headroom(24 << 30, 200 << 20), 6 << 30);
        let base = process_base(64 << 20);
        assert!(
            base > (64 << 20) + BASE_MARGIN,
            "counts this process's RSS: {base}"
        );
    }

    #[test]
    fn cgroup_limits_are_found_along_the_path() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().display();
        // Hybrid layout, as on these machines: v1 memory at
        // .../memory, v2 at .../unified.
        let mountinfo = format!(
            "35 31 0:32 / {r}/memory rw,relatime - cgroup cgroup rw,memory\n\
             41 31 0:38 / {r}/unified rw,relatime - cgroup2 cgroup2 rw\n"
        );
        let v1 = root.path().join("memory/a/b");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::create_dir_all(root.path().join("unified")).unwrap();
        std::fs::write(
            root.path().join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("memory/a/memory.limit_in_bytes"),
            "2147483648\n",
        )
        .unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "1610612736\n").unwrap();
        let cg = "5:memory:/a/b\n1:name=systemd:/x\n0::/\n";
        let l = cgroup_limit(cg, &mountinfo).unwrap();
        assert_eq!(l.bytes, 1536 << 20);
        assert_eq!(
            l.source,
            LimitSource::CgroupV1(v1.join("memory.limit_in_bytes"))
        );
        // A parent's tighter limit wins.
        std::fs::write(
            root.path().join("memory/a/memory.limit_in_bytes"),
            "1073741824\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit(cg, &mountinfo).unwrap().bytes, 1 << 30);

        // v2 only, inside a container whose cgroup root is the service's
        // parent: "max" is no limit.
        let root = tempfile::tempdir().unwrap();
        let r = root.path().display();
        let mountinfo = format!("30 20 0:26 /machine.slice {r} rw - cgroup2 cgroup2 rw\n");
        let svc = root.path().join("system.slice/app.service");
        std::fs::create_dir_all(&svc).unwrap();
        std::fs::write(svc.join("memory.max"), "536870912\n").unwrap();
        std::fs::write(root.path().join("system.slice/memory.max"), "max\n").unwrap();
        let l = cgroup_limit("0::/machine.slice/system.slice/app.service\n", &mountinfo).unwrap();
        assert_eq!(l.bytes, 512 << 20);
        assert!(matches!(l.source, LimitSource::CgroupV2(_)));
        assert!(cgroup_limit("0::/machine.slice/system.slice\n", &mountinfo).is_none());

        // v2 in a container with its own cgroup namespace (podman,
        // Kubernetes): the cgroup is "/" and the mount's root is the
        // container's cgroup, whose memory.max is `--memory` or
        // `limits.memory`.
        let root = tempfile::tempdir().unwrap();
        let r = root.path().display();
        let mountinfo =
            format!("620 610 0:26 / {r} ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n");
        std::fs::write(root.path().join("memory.max"), "268435456\n").unwrap();
        let l = cgroup_limit("0::/\n", &mountinfo).unwrap();
        assert_eq!(l.bytes, 256 << 20);
        assert_eq!(
            l.source,
            LimitSource::CgroupV2(root.path().join("memory.max"))
        );
        assert_eq!(unescape("/a\\040b"), "/a b");
    }
}
