//! The compile cache: precompiled components on disk, keyed by the
//! component's bytes, the engine configuration and the wasmtime version.
//!
//! An entry is two files: `KEY.cwasm`, wasmtime's serialized component as
//! it is, and `KEY.b3`, `MAGIC` and the BLAKE3 hash of the first. The
//! component is mapped from its file, not read and copied: loading the
//! Python guest from the cache reads no 43 MB into memory, and its code is
//! shared page cache rather than the process's own memory. An entry whose
//! hash does not match (or has none), or that wasmtime refuses to
//! deserialize, is treated as absent and rewritten: the cache is never
//! trusted blindly. Files are written to a temporary file in the same
//! directory and renamed into place, never changed in place, so a mapped
//! file stays what was hashed, and a reader sees either the old entry,
//! none, or the complete new one (a new component with the old hash is a
//! mismatch, hence a miss).

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 16] = b"wasmpool-cwasm2\n";

/// Where the cache lives when no `cache-dir` is configured:
/// `$CACHE_DIRECTORY` (set by systemd's `CacheDirectory=`; the first entry if
/// it lists several), else `$XDG_CACHE_HOME/wasmpool`, else
/// `$HOME/.cache/wasmpool`.
pub fn default_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dirs) = nonempty("CACHE_DIRECTORY") {
        let first = dirs
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        if !first.is_empty() {
            return Some(PathBuf::from(first));
        }
    }
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
    pub fn new(dir: PathBuf) -> CompileCache {
        CompileCache { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry path for `bytes` under `engine`'s configuration.
    pub fn entry_path(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(b"wasmpool layout 2 ");
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(b" wasmtime ");
        h.update(wasmtime_version().as_bytes());
        std::hash::Hash::hash(
            &engine.precompile_compatibility_hash(),
            &mut Blake3Hasher(&mut h),
        );
        h.update(&blake3::hash(bytes).as_bytes()[..]);
        self.dir.join(format!("{}.cwasm", h.finalize().to_hex()))
    }

    /// Loads `bytes` as a component: from the cache when a valid entry
    /// exists, otherwise by compiling (and storing the result).
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        compile: impl FnOnce() -> wasmtime::Result<Component>,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.entry_path(engine, bytes);
        let mut found_bad = false;
        match open_verified(&path) {
            Ok(Some((file, map))) => {
                // Through the descriptor that was hashed: the file at `path`
                // may have been replaced since.
                use std::os::fd::AsRawFd;
                let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                // SAFETY: the file was written by `Component::serialize` of
                // this program (its hash matches what we stored, and the key
                // covers the engine configuration and versions); entries are
                // replaced by rename, never modified in place, so the mapping
                // stays what was hashed; wasmtime checks the header's
                // compatibility again.
                let mapped = unsafe { Component::deserialize_file(engine, &fd_path) };
                // A cache on a `noexec` mount cannot be mapped executable:
                // then the verified bytes are copied instead.
                // SAFETY: as above.
                let loaded = mapped.or_else(|e| {
                    tracing::debug!(path = %path.display(), "cannot map the cache entry, copying it: {e:#}");
                    unsafe { Component::deserialize(engine, &map[..]) }
                });
                match loaded {
                    Ok(c) => return Ok((c, CacheOutcome::Hit)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), "stale compile cache entry, recompiling: {e:#}");
                        found_bad = true;
                    }
                }
            }
            Ok(None) => {
                tracing::warn!(path = %path.display(), "corrupt compile cache entry, recompiling");
                found_bad = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot read compile cache entry: {e}")
            }
        }
        let component = compile()?;
        let outcome = match component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|art| self.store(&path, &art).map_err(|e| e.to_string()))
        {
            Ok(()) if found_bad => CacheOutcome::Replaced,
            Ok(()) => CacheOutcome::Stored,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot write the compile cache: {e}");
                CacheOutcome::Compiled
            }
        };
        Ok((component, outcome))
    }

    fn store(&self, path: &Path, payload: &[u8]) -> std::io::Result<()> {
        create_private_dir(&self.dir)?;
        let sum = checksum(payload);
        // The component first: a reader that finds it with the old hash
        // (or none) takes it as a miss.
        write_new(&self.dir, path, payload)?;
        write_new(&self.dir, &sum_path(path), &sum)
    }
}

/// Writes `data` to a new file in `dir` and renames it to `path`.
fn write_new(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = tempfile_in(dir)?;
    let result = (|| {
        tmp.1.write_all(data)?;
        tmp.1.sync_all()?;
        std::fs::rename(&tmp.0, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp.0);
    }
    result
}

/// What `KEY.b3` holds for a component `payload`: `MAGIC`, then its hash.
pub fn checksum(payload: &[u8]) -> Vec<u8> {
    let mut sum = MAGIC.to_vec();
    sum.extend_from_slice(blake3::hash(payload).as_bytes());
    sum
}

/// `KEY.b3` beside `KEY.cwasm`.
fn sum_path(path: &Path) -> PathBuf {
    path.with_extension("b3")
}

/// Opens (and maps) the entry at `path` if its hash file matches its
/// contents; `Ok(None)` when it does not (or has no hash), `NotFound` when
/// there is no entry.
fn open_verified(path: &Path) -> std::io::Result<Option<(std::fs::File, memmap2::Mmap)>> {
    let file = std::fs::File::open(path)?;
    let sum = match std::fs::read(sum_path(path)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: entries are replaced by rename, never modified in place, so
    // the mapping does not change while it is hashed or used.
    let map = unsafe { memmap2::Mmap::map(&file) }?;
    Ok(verify(&sum, &map).then_some((file, map)))
}

/// Whether `sum` (a `.b3` file's contents) is the hash of `payload`.
fn verify(sum: &[u8], payload: &[u8]) -> bool {
    sum.strip_prefix(MAGIC)
        .is_some_and(|hash| hash == blake3::hash(payload).as_bytes())
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
        let mut old = b"wasmpool-cwasm1\n".to_vec();
        old.extend_from_slice(blake3::hash(&payload).as_bytes());
        assert!(!verify(&old, &payload));
    }
}
