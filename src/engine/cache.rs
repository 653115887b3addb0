//! The compile cache: precompiled components on disk, keyed by the
//! component's bytes, the engine configuration and the wasmtime version.
//!
//! An entry is two files: `KEY.cwasm`, wasmtime's serialized component as
//! it is, and `KEY.b3`, `MAGIC` and a checksum (XXH3-128) of the first. The
//! component is mapped from its file, not read and copied: loading the
//! Python guest from the cache reads no 43 MB into memory, and its code is
//! shared page cache rather than the process's own memory. An entry whose
//! checksum does not match (or has none), or that wasmtime refuses to
//! deserialize, is treated as absent and rewritten: the cache is never
//! trusted blindly. Files are written to a temporary file in the same
//! directory and renamed into place, never changed in place, so a mapped
//! file stays what was checked, and a reader sees either the old entry,
//! none, or the complete new one (a new component with the old checksum is
//! a mismatch, hence a miss).
//!
//! The key needs the BLAKE3 hash of the component's bytes. For a component
//! file, `sources/` remembers that hash beside the file's identity and
//! times (device, inode, size, modification and change times), so a
//! restart with an unchanged file neither reads nor hashes it (the Python
//! guest: 21 MB read and hashed at every start before). Any change to the
//! file changes its change time, which nobody can set back; a file changed
//! within two seconds of being looked at is not remembered (its times could
//! still collide with a later change in the same clock tick), and anything
//! that does not match exactly is hashed again.
//!
//! The cache is bounded (`cache-max-size`): a hit sets its entry's
//! modification time, so after a new entry is stored the entries used
//! longest ago are removed until the cache fits; a running server keeps
//! using an entry removed under it (it is mapped), and the next start that
//! needs it compiles again. Temporary files that a crash left behind go
//! too, and `sources/` keeps at most [`MAX_SOURCE_RECORDS`] records.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 16] = b"wasmpool-cwasm3\n";

/// First line of a `sources/` record.
const SOURCE_MAGIC: &str = "wasmpool-source2";

/// Most `sources/` records kept (the most recently written).
pub const MAX_SOURCE_RECORDS: usize = 1024;

/// Age past which a temporary file is a crash's leftover, not a write in
/// progress.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long a file must have been left alone before its hash is remembered.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the cache lives when no `cache-dir` is configured:
/// `$CACHE_DIRECTORY` (set by systemd's `CacheDirectory=`; the first entry if
/// it lists several), else `$XDG_CACHE_HOME/wasmpool`, else
/// `$HOME/.cache/wasmpool`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(dir) = crate::config::systemd_directory("CACHE_DIRECTORY") {
        return Some(dir);
    }
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = nonempty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("wasmpool"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".cache").join("wasmpool"))
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Deserialized from a valid cache entry.
    Hit,
    /// Compiled, then stored.
    Stored,
    /// Compiled; the cache is disabled or could not be written.
    Compiled,
    /// Compiled after a corrupt or stale entry was found (and replaced).
    Replaced,
}

/// A cache directory bound to one engine configuration.
pub struct CompileCache {
    dir: PathBuf,
    /// Bytes; 0 for no limit.
    max_size: u64,
    /// A read-only cache looked in when `dir` has no entry
    /// (`cache-seed-dir`): what an image compiled at build time, for a
    /// container whose `dir` is an empty volume.
    seed: Option<PathBuf>,
}

struct Blake3Hasher<'a>(&'a mut blake3::Hasher);

impl Hasher for Blake3Hasher<'_> {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        unreachable!("only used to feed bytes")
    }
}

impl CompileCache {
    /// A cache in `dir` with no size limit.
    pub fn new(dir: PathBuf) -> CompileCache {
        CompileCache {
            dir,
            max_size: 0,
            seed: None,
        }
    }

    /// Also looks in the read-only cache `seed` when `dir` has no entry.
    pub fn with_seed(mut self, seed: Option<PathBuf>) -> CompileCache {
        self.seed = seed;
        self
    }

    /// Keeps the cache within `bytes` (0: no limit).
    pub fn with_max_size(mut self, bytes: u64) -> CompileCache {
        self.max_size = bytes;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry path for `bytes` under `engine`'s configuration.
    pub fn entry_path(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        self.entry_path_for(engine, &blake3::hash(bytes))
    }

    /// The entry path for bytes with BLAKE3 hash `digest`.
    fn entry_path_for(&self, engine: &Engine, digest: &blake3::Hash) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(b"wasmpool layout 2 ");
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(b" wasmtime ");
        h.update(wasmtime_version().as_bytes());
        std::hash::Hash::hash(
            &engine.precompile_compatibility_hash(),
            &mut Blake3Hasher(&mut h),
        );
        h.update(&digest.as_bytes()[..]);
        self.dir.join(format!("{}.cwasm", h.finalize().to_hex()))
    }

    /// Loads the component whose bytes have BLAKE3 hash `digest`: from the
    /// cache when a valid entry exists, otherwise with `compile` (and
    /// stores the result). `looked_up` is what an earlier
    /// [`CompileCache::lookup`] of the same digest found, if there was one
    /// (it is not looked up twice).
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        digest: &blake3::Hash,
        looked_up: Option<Lookup>,
        compile: impl FnOnce() -> wasmtime::Result<Component>,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let found_bad = match looked_up.unwrap_or_else(|| self.lookup(engine, digest)) {
            Lookup::Hit(c) => return Ok((c, CacheOutcome::Hit)),
            Lookup::Missing => false,
            Lookup::Bad => true,
        };
        let path = self.entry_path_for(engine, digest);
        let component = compile()?;
        let outcome = match component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|art| self.store(&path, &art).map_err(|e| e.to_string()))
        {
            Ok(()) if found_bad => CacheOutcome::Replaced,
            Ok(()) => CacheOutcome::Stored,
            Err(e) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    "cannot write the compile cache ({e}): serving without it, so the next start compiles again; make the directory writable (a volume or tmpfs) or set cache-dir"
                );
                CacheOutcome::Compiled
            }
        };
        Ok((component, outcome))
    }

    /// The cache entry for bytes with hash `digest`, if there is a valid
    /// one: in the cache, else in the seed (which is never written: an
    /// entry missing or unusable there is only a miss).
    pub fn lookup(&self, engine: &Engine, digest: &blake3::Hash) -> Lookup {
        let path = self.entry_path_for(engine, digest);
        match lookup_at(engine, &path) {
            Lookup::Missing => {}
            found => return found,
        }
        let Some(seed) = &self.seed else {
            return Lookup::Missing;
        };
        let seeded = seed.join(path.file_name().expect("entry paths name a file"));
        match lookup_at(engine, &seeded) {
            Lookup::Hit(c) => {
                tracing::debug!(path = %seeded.display(), "component from the seed cache");
                Lookup::Hit(c)
            }
            _ => Lookup::Missing,
        }
    }

    fn store(&self, path: &Path, payload: &[u8]) -> std::io::Result<()> {
        create_private_dir(&self.dir)?;
        let sum = checksum(payload);
        // The component first: a reader that finds it with the old checksum
        // (or none) takes it as a miss.
        write_new(&self.dir, path, payload, Durable::Yes)?;
        write_new(&self.dir, &sum_path(path), &sum, Durable::Yes)?;
        self.prune(path);
        Ok(())
    }

    /// Removes the entries used longest ago until the cache fits in
    /// `max_size` (`keep`, the entry just stored, stays whatever its size),
    /// temporary files a crash left behind, and the oldest `sources/`
    /// records beyond [`MAX_SOURCE_RECORDS`]. Best effort: what cannot be
    /// removed stays.
    pub fn prune(&self, keep: &Path) {
        let now = std::time::SystemTime::now();
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries = Vec::new();
        let mut total = 0u64;
        for e in dir.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            let name = e.file_name();
            if name.as_encoded_bytes().starts_with(b".tmp-") {
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok());
                if age.is_some_and(|a| a > STALE_TEMPORARY) {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            if path.extension() != Some("cwasm".as_ref()) {
                continue;
            }
            let size = meta.len() + std::fs::metadata(sum_path(&path)).map_or(0, |m| m.len());
            total += size;
            if path != keep {
                let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                entries.push((used, path, size));
            }
        }
        if self.max_size > 0 && total > self.max_size {
            entries.sort_by_key(|(used, ..)| *used);
            let before = total;
            let mut removed = 0;
            for (_, path, size) in entries {
                if total <= self.max_size {
                    break;
                }
                // The checksum first: an entry without one is a miss,
                // never a wrong hit.
                let _ = std::fs::remove_file(sum_path(&path));
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        total -= size;
                        removed += 1;
                    }
                    Err(e) => {
                        tracing::debug!(path = %path.display(), "cannot remove a cache entry: {e}")
                    }
                }
            }
            tracing::info!(
                removed,
                before,
                after = total,
                limit = self.max_size,
                "compile cache over cache-max-size: removed the entries used longest ago"
            );
        }
        self.prune_source_records();
    }

    /// Keeps the newest [`MAX_SOURCE_RECORDS`] records of `sources/`.
    fn prune_source_records(&self) {
        let Ok(dir) = std::fs::read_dir(self.dir.join("sources")) else {
            return;
        };
        let mut records: Vec<_> = dir
            .flatten()
            .filter_map(|e| {
                let used = e.metadata().ok()?.modified().ok()?;
                Some((used, e.path()))
            })
            .collect();
        if records.len() <= MAX_SOURCE_RECORDS {
            return;
        }
        records.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
        for (_, path) in records.drain(MAX_SOURCE_RECORDS..) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Where the hash of the component file at `path` is remembered.
    fn source_record(&self, path: &Path) -> Option<PathBuf> {
        let canonical = std::fs::canonicalize(path).ok()?;
        let name = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
        Some(self.dir.join("sources").join(name.as_str()))
    }

    /// What was remembered of the component file at `path`, if it was
    /// remembered for exactly the file that is there now.
    pub fn remembered(&self, path: &Path) -> Option<Remembered> {
        let record = std::fs::read_to_string(self.source_record(path)?).ok()?;
        let now = SourceStamp::of(&std::fs::metadata(path).ok()?);
        let mut lines = record.lines();
        (lines.next()? == SOURCE_MAGIC && lines.next()? == now.to_string()).then_some(())?;
        Some(Remembered {
            digest: blake3::Hash::from_hex(lines.next()?).ok()?,
            largest_memory: lines.next()?.parse().ok()?,
        })
    }

    /// Remembers `what` of the file at `path`, as `stamp` describes it, if
    /// it has been left alone long enough.
    pub fn remember(&self, path: &Path, stamp: &SourceStamp, what: &Remembered) {
        self.remember_at(path, stamp, what, std::time::SystemTime::now())
    }

    fn remember_at(
        &self,
        path: &Path,
        stamp: &SourceStamp,
        what: &Remembered,
        now: std::time::SystemTime,
    ) {
        if !stamp.settled(now) {
            return;
        }
        let Some(record) = self.source_record(path) else {
            return;
        };
        let text = format!(
            "{SOURCE_MAGIC}\n{stamp}\n{}\n{}\n",
            what.digest.to_hex(),
            what.largest_memory
        );
        let dir = self.dir.join("sources");
        // Only a shortcut: a record lost in a crash means hashing again.
        match create_private_dir(&dir)
            .and_then(|()| write_new(&dir, &record, text.as_bytes(), Durable::No))
        {
            Ok(()) => self.prune_source_records(),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), "cannot remember the component's hash: {e}")
            }
        }
    }
}

/// What `sources/` keeps of a component file, so that a file seen before
/// need not be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remembered {
    /// BLAKE3 hash of the file's bytes.
    pub digest: blake3::Hash,
    /// Its largest initial linear memory, in bytes (see
    /// `component::largest_initial_memory`).
    pub largest_memory: u64,
}

/// What [`CompileCache::lookup`] found.
pub enum Lookup {
    /// A valid entry, deserialized.
    Hit(Component),
    /// No entry.
    Missing,
    /// An entry that is corrupt or stale (it will be replaced).
    Bad,
}

/// A component file's identity and times: while they stay the same, so do
/// its bytes (any write moves the change time forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl SourceStamp {
    pub fn of(meta: &std::fs::Metadata) -> SourceStamp {
        use std::os::unix::fs::MetadataExt;
        SourceStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file was last changed at least [`SETTLED`] before `now`
    /// (a later change cannot then share its times).
    fn settled(&self, now: std::time::SystemTime) -> bool {
        let Ok(now) = now.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let latest = self.mtime.max(self.ctime);
        let Ok(secs) = u64::try_from(latest.0) else {
            return true;
        };
        let changed = std::time::Duration::new(secs, latest.1.clamp(0, 999_999_999) as u32);
        now.checked_sub(changed).is_some_and(|d| d >= SETTLED)
    }
}

impl std::fmt::Display for SourceStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {}.{:09} {}.{:09}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        )
    }
}

/// The entry at `path`, if it is valid (see [`CompileCache::lookup`]).
fn lookup_at(engine: &Engine, path: &Path) -> Lookup {
    match open_verified(path) {
        Ok(Ok((file, map))) => {
            // Through the descriptor that was checked: the file at `path`
            // may have been replaced since.
            use std::os::fd::AsRawFd;
            let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
            // SAFETY: the file was written by `Component::serialize` of
            // this program (its checksum matches what we stored, and the
            // key covers the engine configuration and versions); entries
            // are replaced by rename, never modified in place, so the
            // mapping stays what was checked; wasmtime checks the
            // header's compatibility again.
            let mapped = unsafe { Component::deserialize_file(engine, &fd_path) };
            // A cache on a `noexec` mount cannot be mapped executable:
            // then the verified bytes are copied instead.
            // SAFETY: as above.
            let loaded = mapped.or_else(|e| {
                tracing::debug!(path = %path.display(), "cannot map the cache entry, copying it: {e:#}");
                unsafe { Component::deserialize(engine, &map[..]) }
            });
            match loaded {
                Ok(c) => {
                    // Used now: pruning removes the entries used
                    // longest ago (best effort: a read-only cache
                    // still serves).
                    let _ = file.set_modified(std::time::SystemTime::now());
                    Lookup::Hit(c)
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "stale compile cache entry, recompiling: {e:#}");
                    Lookup::Bad
                }
            }
        }
        Ok(Err(Unusable::OtherLayout)) => {
            tracing::info!(path = %path.display(), "compile cache entry of another wasmpool version, recompiling");
            Lookup::Bad
        }
        Ok(Err(Unusable::Corrupt)) => {
            tracing::warn!(path = %path.display(), "corrupt compile cache entry, recompiling");
            Lookup::Bad
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Lookup::Missing,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read compile cache entry: {e}");
            Lookup::Missing
        }
    }
}

/// Reads the component file at `path`, with its stamp when the file did
/// not change while it was read.
pub fn read_source(path: &Path) -> std::io::Result<(Vec<u8>, Option<SourceStamp>)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let before = SourceStamp::of(&file.metadata()?);
    let mut bytes = Vec::new();
    // (As `std::fs::read`: a size that cannot be allocated is an error, not
    // an abort.)
    bytes
        .try_reserve_exact(usize::try_from(before.size).unwrap_or(usize::MAX))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
    file.read_to_end(&mut bytes)?;
    let after = SourceStamp::of(&file.metadata()?);
    Ok((bytes, (before == after).then_some(before)))
}

/// Whether a file must reach the disk before it is renamed into place.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durable {
    Yes,
    No,
}

/// Writes `data` to a new file in `dir` and renames it to `path`.
fn write_new(dir: &Path, path: &Path, data: &[u8], durable: Durable) -> std::io::Result<()> {
    let mut tmp = tempfile_in(dir)?;
    let result = (|| {
        tmp.1.write_all(data)?;
        if durable == Durable::Yes {
            tmp.1.sync_all()?;
        }
        std::fs::rename(&tmp.0, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp.0);
    }
    result
}

/// What `KEY.b3` holds for a component `payload`: `MAGIC`, then its
/// checksum. It guards against corruption, not against someone who can
/// write the cache (they could write the checksum too), so it is XXH3-128:
/// checking the 43 MB Python entry at every start took 21 ms with BLAKE3
/// on a 2-core test host, and takes 6 ms with XXH3.
pub fn checksum(payload: &[u8]) -> Vec<u8> {
    let mut sum = MAGIC.to_vec();
    sum.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(payload).to_le_bytes());
    sum
}

/// `KEY.b3` beside `KEY.cwasm`.
fn sum_path(path: &Path) -> PathBuf {
    path.with_extension("b3")
}

/// Why an entry that exists cannot be used.
#[derive(Debug, PartialEq, Eq)]
enum Unusable {
    /// Its checksum does not match, or it has none.
    Corrupt,
    /// Written by a version of wasmpool with another layout.
    OtherLayout,
}

/// Opens (and maps) the entry at `path` if its checksum file matches its
/// contents; `NotFound` when there is no entry.
#[allow(clippy::type_complexity)]
fn open_verified(path: &Path) -> std::io::Result<Result<(std::fs::File, memmap2::Mmap), Unusable>> {
    let file = std::fs::File::open(path)?;
    let sum = match std::fs::read(sum_path(path)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(Unusable::Corrupt)),
        Err(e) => return Err(e),
    };
    if !sum.starts_with(MAGIC) && sum.starts_with(b"wasmpool-cwasm") {
        return Ok(Err(Unusable::OtherLayout));
    }
    // SAFETY: entries are replaced by rename, never modified in place, so
    // the mapping does not change while it is checked or used.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    Ok(if verify(&sum, &map) {
        Ok((file, map))
    } else {
        Err(Unusable::Corrupt)
    })
}

/// Whether `sum` (a `.b3` file's contents) is the checksum of `payload`.
fn verify(sum: &[u8], payload: &[u8]) -> bool {
    sum.strip_prefix(MAGIC)
        .is_some_and(|hash| hash == xxhash_rust::xxh3::xxh3_128(payload).to_le_bytes())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let path = dir.join(format!(".tmp-{}-{n}-{nanos}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    Ok((path, file))
}

/// The wasmtime version this program is built with.
pub fn wasmtime_version() -> &'static str {
    "48.0.8"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_rejects_tampering() {
        let payload = b"hello".to_vec();
        let sum = checksum(&payload);
        assert!(verify(&sum, &payload));
        let mut bad = payload.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(!verify(&sum, &bad));
        assert!(!verify(&sum[..20], &payload));
        assert!(!verify(b"garbage", &payload));
        // The previous layout (BLAKE3) is a miss, hence recompiled.
        let mut old = b"wasmpool-cwasm2\n".to_vec();
        old.extend_from_slice(blake3::hash(&payload).as_bytes());
        assert!(!verify(&old, &payload));
    }

    #[test]
    fn a_hash_is_remembered_only_for_the_same_settled_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(dir.path().join("cache"));
        let file = dir.path().join("guest.wasm");
        std::fs::write(&file, b"first").unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(10);

        // Just written: not settled, so not remembered.
        let (bytes, stamp) = read_source(&file).unwrap();
        let stamp = stamp.expect("the file did not change while read");
        let what = Remembered {
            digest: blake3::hash(&bytes),
            largest_memory: 17 << 16,
        };
        cache.remember(&file, &stamp, &what);
        assert_eq!(cache.remembered(&file), None);

        // Settled: remembered, also under another spelling of its path.
        cache.remember_at(&file, &stamp, &what, later);
        assert_eq!(cache.remembered(&file), Some(what));
        let other = dir.path().join(".").join("guest.wasm");
        assert_eq!(cache.remembered(&other), Some(what));

        let remember_as_is = |file: &Path| {
            let stamp = read_source(file).unwrap().1.unwrap();
            cache.remember_at(file, &stamp, &what, later)
        };

        // Rewritten with bytes of the same size: forgotten.
        std::fs::write(&file, b"secnd").unwrap();
        assert_eq!(cache.remembered(&file), None);

        // Replaced by another file: forgotten.
        remember_as_is(&file);
        assert!(cache.remembered(&file).is_some());
        let new = dir.path().join("new.wasm");
        std::fs::write(&new, b"secnd").unwrap();
        std::fs::rename(&new, &file).unwrap();
        assert_eq!(cache.remembered(&file), None);

        // A damaged record is no record.
        remember_as_is(&file);
        let record = cache.source_record(&file).unwrap();
        std::fs::write(&record, "wasmpool-source2\n").unwrap();
        assert_eq!(cache.remembered(&file), None);
        // So is one from before the memory size was kept.
        let stamp = read_source(&file).unwrap().1.unwrap();
        let old = format!("wasmpool-source1\n{stamp}\n{}\n", what.digest.to_hex());
        std::fs::write(&record, old).unwrap();
        assert_eq!(cache.remembered(&file), None);
        assert_eq!(cache.remembered(&dir.path().join("missing.wasm")), None);
    }

    #[test]
    fn pruning_removes_crash_leftovers_and_old_source_records() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(dir.path().to_path_buf());
        let touch = |p: &Path, age: Duration| {
            std::fs::write(p, b"x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(SystemTime::now() - age)
                .unwrap();
        };
        let stale = dir.path().join(".tmp-1-2-3");
        let writing = dir.path().join(".tmp-4-5-6");
        touch(&stale, Duration::from_secs(7200));
        touch(&writing, Duration::from_secs(1));
        let sources = dir.path().join("sources");
        std::fs::create_dir(&sources).unwrap();
        for i in 0..MAX_SOURCE_RECORDS + 5 {
            // Record i was written i minutes ago.
            touch(
                &sources.join(format!("r{i}")),
                Duration::from_secs(60 * i as u64),
            );
        }
        cache.prune(&dir.path().join("none.cwasm"));
        assert!(!stale.exists());
        assert!(writing.exists(), "a write in progress was removed");
        assert_eq!(
            std::fs::read_dir(&sources).unwrap().count(),
            MAX_SOURCE_RECORDS
        );
        assert!(sources.join("r0").exists());
        assert!(!sources.join(format!("r{}", MAX_SOURCE_RECORDS)).exists());
    }

    #[test]
    fn only_files_left_alone_for_a_while_are_settled() {
        let t = |secs: i64| SourceStamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (secs, 0),
            ctime: (secs, 0),
        };
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert!(t(100).settled(at(102)));
        assert!(!t(100).settled(at(101)));
        // A modification time in the future (or a clock set back).
        assert!(!t(200).settled(at(100)));
        // The later of the two times counts.
        let s = SourceStamp {
            ctime: (105, 0),
            ..t(100)
        };
        assert!(!s.settled(at(106)));
        assert!(s.settled(at(107)));
    }
}
