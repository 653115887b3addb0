//! The compile cache: stored on first load, deserialized later, keyed by
//! the engine configuration, and never trusted blindly.
mod common;
use common::*;
use std::path::Path;
use wasmpool::engine::cache::{CacheOutcome, CompileCache};
use wasmpool::{KnobArgs, Pool, Source};

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The compiled components (each has its hash in `KEY.b3` beside it).
fn entries(dir: &Path) -> Vec<std::path::PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect()
}

/// `component` with a custom section appended: the same code, another
/// component (another cache key).
fn with_custom_section(component: &[u8]) -> Vec<u8> {
    let (name, data) = (b"wasmpool-test", b"another key");
    let mut out = component.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + data.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(data);
    out
}

/// The entry for `bytes` is bad: the next load recompiles and replaces it,
/// the one after hits.
fn replaced_then_hit(dir: &Path, bytes: &[u8]) {
    assert_eq!(
        load(dir, KnobArgs::default(), bytes),
        CacheOutcome::Replaced
    );
    assert_eq!(load(dir, KnobArgs::default(), bytes), CacheOutcome::Hit);
}

fn load(dir: &Path, args: KnobArgs, bytes: &[u8]) -> CacheOutcome {
    let knobs = KnobArgs {
        cache_dir: Some(dir.to_path_buf()),
        ..args
    }
    .resolve()
    .unwrap();
    let pool = Pool::load(
        knobs,
        &Source::Bytes {
            name: "guest".into(),
            bytes: bytes.to_vec(),
        },
    )
    .unwrap();
    pool.cache_outcome()
}

/// A directory that does not exist yet.
struct DirRef(std::path::PathBuf);
impl DirRef {
    fn path(&self) -> &Path {
        &self.0
    }
}

#[test]
fn stores_then_hits_and_keys_by_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    // The cache creates its directory, private to the user.
    let dir = DirRef(tmp.path().join("cache"));
    let bytes = p2_suite();
    assert_eq!(
        load(dir.path(), KnobArgs::default(), &bytes),
        CacheOutcome::Stored
    );
    let all = files(dir.path());
    assert_eq!(all.len(), 2, "{all:?}");
    let entry = &entries(dir.path())[0];
    // The component as wasmtime serialized it (mapped from the file when
    // loaded), its hash beside it.
    assert!(std::fs::read(entry).unwrap().starts_with(b"\x7fELF"));
    assert!(entry.with_extension("b3").exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        load(dir.path(), KnobArgs::default(), &bytes),
        CacheOutcome::Hit
    );
    // Knobs that do not change code generation share the key: memories
    // reserve 4 GiB of address space whatever their limit.
    assert_eq!(
        load(
            dir.path(),
            KnobArgs {
                max_memory_size: Some(64 << 20),
                ..Default::default()
            },
            &bytes
        ),
        CacheOutcome::Hit
    );
    assert_eq!(
        load(
            dir.path(),
            KnobArgs {
                max_instance_reuse_count: Some(7),
                ..Default::default()
            },
            &bytes
        ),
        CacheOutcome::Hit
    );
    // Another component, another entry.
    assert_eq!(
        load(dir.path(), KnobArgs::default(), &p3_suite()),
        CacheOutcome::Stored
    );
    assert_eq!(entries(dir.path()).len(), 2);
    // No temporary files left behind.
    assert!(
        files(dir.path()).iter().all(|p| !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".tmp"))
    );
}

#[test]
fn corrupt_entries_are_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = p2_suite();
    assert_eq!(
        load(dir.path(), KnobArgs::default(), &bytes),
        CacheOutcome::Stored
    );
    let entry = entries(dir.path()).remove(0);
    let good = std::fs::read(&entry).unwrap();
    // A flipped byte in the payload.
    let mut bad = good.clone();
    let n = bad.len() - 100;
    bad[n] ^= 0xff;
    std::fs::write(&entry, &bad).unwrap();
    assert_eq!(
        load(dir.path(), KnobArgs::default(), &bytes),
        CacheOutcome::Replaced
    );
    assert_eq!(
        std::fs::read(&entry).unwrap(),
        good,
        "the entry was not rewritten"
    );
    // Truncated, empty, garbage.
    for junk in [&good[..good.len() / 2], &b""[..], &b"not a cache entry"[..]] {
        std::fs::write(&entry, junk).unwrap();
        replaced_then_hit(dir.path(), &bytes);
    }
    // No hash beside it, or a hash in the old layout's header.
    let sum = entry.with_extension("b3");
    std::fs::remove_file(&sum).unwrap();
    replaced_then_hit(dir.path(), &bytes);
    let mut old = b"wasmpool-cwasm1\n".to_vec();
    old.extend_from_slice(blake3::hash(&good).as_bytes());
    std::fs::write(&sum, &old).unwrap();
    replaced_then_hit(dir.path(), &bytes);
}

#[test]
fn stale_entries_are_recompiled() {
    // An entry with a valid checksum whose payload was compiled for another
    // engine configuration: wasmtime refuses it, the cache recompiles.
    let dir = tempfile::tempdir().unwrap();
    let bytes = p2_suite();
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true).epoch_interruption(false);
    let other = wasmtime::Engine::new(&config).unwrap();
    let stale = wasmtime::component::Component::new(&other, &bytes)
        .unwrap()
        .serialize()
        .unwrap();
    let knobs = KnobArgs::default().resolve().unwrap();
    let engine = wasmpool::engine::component::engine(&knobs, None).unwrap();
    let cache = CompileCache::new(dir.path().to_path_buf());
    let path = cache.entry_path(&engine, &bytes);
    std::fs::write(&path, &stale).unwrap();
    std::fs::write(
        path.with_extension("b3"),
        wasmpool::engine::cache::checksum(&stale),
    )
    .unwrap();
    replaced_then_hit(dir.path(), &bytes);
}

#[test]
fn unwritable_cache_is_not_fatal() {
    assert_eq!(
        load(
            Path::new("/proc/no/such/dir"),
            KnobArgs::default(),
            &p2_suite()
        ),
        CacheOutcome::Compiled
    );
}

#[test]
fn no_cache_neither_reads_nor_writes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = p2_suite();
    let mut knobs = KnobArgs {
        cache_dir: Some(dir.path().to_path_buf()),
        no_cache: true,
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let pool = Pool::load(
        knobs.clone(),
        &Source::Bytes {
            name: "guest".into(),
            bytes: bytes.clone(),
        },
    )
    .unwrap();
    assert_eq!(pool.cache_outcome(), CacheOutcome::Compiled);
    assert!(entries(dir.path()).is_empty());
    knobs.no_cache = false;
    let pool = Pool::load(
        knobs.clone(),
        &Source::Bytes {
            name: "guest".into(),
            bytes: bytes.clone(),
        },
    )
    .unwrap();
    assert_eq!(pool.cache_outcome(), CacheOutcome::Stored);
    knobs.no_cache = true;
    let pool = Pool::load(
        knobs,
        &Source::Bytes {
            name: "guest".into(),
            bytes,
        },
    )
    .unwrap();
    assert_eq!(
        pool.cache_outcome(),
        CacheOutcome::Compiled,
        "no-cache read the cache"
    );
}

/// A component file that has not changed since it was last loaded is
/// neither read nor hashed again; any write to it undoes that.
#[test]
fn unchanged_component_files_are_not_read_again() {
    use wasmpool::engine::cache::{Remembered, read_source};
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let (p2, p3) = (dir.path().join("p2.wasm"), dir.path().join("p3.wasm"));
    std::fs::write(&p2, p2_suite()).unwrap();
    std::fs::write(&p3, p3_suite()).unwrap();
    // Files changed in the last two seconds are always read.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let memory = std::cell::Cell::new(None);
    let load = |file: &Path| {
        let knobs = KnobArgs {
            cache_dir: Some(cache_dir.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let pool = Pool::load(knobs, &Source::File(file.to_path_buf())).unwrap();
        memory.set(pool.largest_initial_memory());
        (pool.cache_outcome(), pool.world().is_p3())
    };
    assert_eq!(load(&p2), (CacheOutcome::Stored, false));
    assert_eq!(load(&p3), (CacheOutcome::Stored, true));
    assert_eq!(files(&cache_dir.join("sources")).len(), 2);
    assert_eq!(load(&p2), (CacheOutcome::Hit, false));
    // The suite's memory is 2 pages, also when remembered.
    assert_eq!(memory.get(), Some(2 << 16));

    // Tell the cache that p2.wasm, as it is, hashes like p3.wasm and has a
    // 64 MiB memory: a load that does not read the file then gets the
    // WASIp3 component, and sets its slots up for that memory.
    let cache = CompileCache::new(cache_dir.clone());
    let (_, stamp) = read_source(&p2).unwrap();
    let what = Remembered {
        digest: blake3::hash(&std::fs::read(&p3).unwrap()),
        largest_memory: 64 << 20,
    };
    cache.remember(&p2, &stamp.unwrap(), &what);
    assert_eq!(load(&p2), (CacheOutcome::Hit, true), "the file was read");
    assert_eq!(memory.get(), Some(64 << 20));

    // Writing the file (here: the same bytes again) makes it be read.
    std::fs::write(&p2, p2_suite()).unwrap();
    assert_eq!(
        load(&p2),
        (CacheOutcome::Hit, false),
        "a changed file was not read"
    );
}

#[test]
fn a_full_cache_removes_the_entries_used_longest_ago() {
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (p2, p3) = (p2_suite(), p3_suite());
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(load(dir, KnobArgs::default(), &p2), CacheOutcome::Stored);
    let p2_entry = entries(dir).pop().unwrap();
    assert_eq!(load(dir, KnobArgs::default(), &p3), CacheOutcome::Stored);
    let p3_entry = entries(dir).into_iter().find(|e| *e != p2_entry).unwrap();
    // A hit marks its entry as used now: p2's is then the newer one.
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&p2_entry)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(load(dir, KnobArgs::default(), &p2), CacheOutcome::Hit);
    let used = std::fs::metadata(&p2_entry).unwrap().modified().unwrap();
    assert!(used > old + Duration::from_secs(3000), "{used:?}");
    // Room for two entries the size of p2's: storing a third (p2 with a
    // custom section: another component, another key) removes the one
    // used longest ago, p3's, and keeps the new one.
    let limit = 2 * size(&p2_entry) + size(&p3_entry) / 2;
    let limited = || KnobArgs {
        cache_max_size: Some(limit),
        ..KnobArgs::default()
    };
    let other = with_custom_section(&p2);
    assert_eq!(load(dir, limited(), &other), CacheOutcome::Stored);
    let left = entries(dir);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&p2_entry), "the entry used last was removed");
    assert!(
        !left.contains(&p3_entry),
        "the entry used longest ago stayed"
    );
    assert!(!p3_entry.with_extension("b3").exists());
    assert_eq!(load(dir, KnobArgs::default(), &p3), CacheOutcome::Stored);
    assert_eq!(load(dir, KnobArgs::default(), &p2), CacheOutcome::Hit);
    assert_eq!(load(dir, limited(), &other), CacheOutcome::Hit);
    // 0: no limit.
    let before = entries(dir).len();
    let unlimited = KnobArgs {
        cache_max_size: Some(0),
        ..KnobArgs::default()
    };
    assert_eq!(
        load(dir, unlimited, &with_custom_section(&p3)),
        CacheOutcome::Stored
    );
    assert_eq!(entries(dir).len(), before + 1);
}

#[test]
fn a_seed_cache_is_read_when_the_cache_has_no_entry_and_never_written() {
    // The seed: filled as an image build does (`compile --cache-dir SEED`).
    let seed = tempfile::tempdir().unwrap();
    let bytes = p2_suite();
    assert_eq!(
        load(seed.path(), KnobArgs::default(), &bytes),
        CacheOutcome::Stored
    );
    let seeded = files(seed.path());
    let with_seed = || KnobArgs {
        cache_seed_dir: Some(seed.path().to_path_buf()),
        ..Default::default()
    };
    // An empty cache (a new pod's emptyDir) hits in the seed, stores
    // nothing of its own, and leaves the seed as it was.
    let cache = tempfile::tempdir().unwrap();
    assert_eq!(load(cache.path(), with_seed(), &bytes), CacheOutcome::Hit);
    assert!(
        entries(cache.path()).is_empty(),
        "{:?}",
        files(cache.path())
    );
    assert_eq!(files(seed.path()), seeded);
    // A cache that cannot be written at all still hits in the seed.
    assert_eq!(
        load(Path::new("/proc/no/such/dir"), with_seed(), &bytes),
        CacheOutcome::Hit
    );
    // What the seed does not hold is compiled into the cache, not the seed.
    let other = with_custom_section(&bytes);
    assert_eq!(
        load(cache.path(), with_seed(), &other),
        CacheOutcome::Stored
    );
    assert_eq!(load(cache.path(), with_seed(), &other), CacheOutcome::Hit);
    assert_eq!(files(seed.path()), seeded);
    // A corrupt seed entry is a miss, never trusted (and never rewritten).
    let entry = entries(seed.path()).pop().unwrap();
    std::fs::write(&entry, b"not a component").unwrap();
    let fresh = tempfile::tempdir().unwrap();
    assert_eq!(
        load(fresh.path(), with_seed(), &bytes),
        CacheOutcome::Stored
    );
    assert_eq!(std::fs::read(&entry).unwrap(), b"not a component");
}
