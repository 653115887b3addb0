//! The compile cache: precompiled components on disk, keyed by the
//! component's bytes, the engine configuration and the wasmtime version.
//!
//! File layout: `MAGIC`, then the BLAKE3 hash of the payload, then the
//! payload (wasmtime's serialized component). An entry whose hash does not
//! match, or that wasmtime refuses to deserialize, is treated as absent and
//! rewritten: the cache is never trusted blindly. Entries are written to a
//! temporary file in the same directory and renamed into place, so a reader
//! sees either the old entry, none, or the complete new one.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 16] = b"wasmpool-cwasm1\n";
const HASH_LEN: usize = 32;

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
        h.update(b"wasmpool ");
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
        match std::fs::read(&path) {
            Ok(data) => match verify(&data) {
                Some(payload) => {
                    // SAFETY: the payload was written by `Component::serialize`
                    // of this program (its hash matches what we stored and the
                    // key covers the engine configuration and versions), and
                    // wasmtime checks the header's compatibility again.
                    match unsafe { Component::deserialize(engine, payload) } {
                        Ok(c) => return Ok((c, CacheOutcome::Hit)),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), "stale compile cache entry, recompiling: {e}");
                            found_bad = true;
                        }
                    }
                }
                None => {
                    tracing::warn!(path = %path.display(), "corrupt compile cache entry, recompiling");
                    found_bad = true;
                }
            },
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
        let mut tmp = tempfile_in(&self.dir)?;
        let result = (|| {
            tmp.1.write_all(MAGIC)?;
            tmp.1.write_all(blake3::hash(payload).as_bytes())?;
            tmp.1.write_all(payload)?;
            tmp.1.sync_all()?;
            std::fs::rename(&tmp.0, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp.0);
        }
        result
    }
}

fn verify(data: &[u8]) -> Option<&[u8]> {
    let rest = data.strip_prefix(MAGIC)?;
    if rest.len() < HASH_LEN {
        return None;
    }
    let (hash, payload) = rest.split_at(HASH_LEN);
    (blake3::hash(payload).as_bytes()[..] == *hash).then_some(payload)
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
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(blake3::hash(&payload).as_bytes());
        data.extend_from_slice(&payload);
        assert_eq!(verify(&data), Some(&payload[..]));
        let mut bad = data.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(verify(&bad), None);
        assert_eq!(verify(&data[..10]), None);
        assert_eq!(verify(b"garbage"), None);
    }
}
