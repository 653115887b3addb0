//! Criterion micro-benchmarks of the hot path, without the network:
//! making an instance from the pool, and one request through the engine
//! (`Pool::handle`, body collected) on a fresh and on a reused instance.
//!
//! `cargo bench --bench engine`
#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use wasmpool::engine::pool::get_root;
use wasmpool::{KnobArgs, Pool, Source};

fn pool(bytes: Vec<u8>, reuse: u32) -> Pool {
    let knobs = KnobArgs {
        max_instance_reuse_count: Some(reuse),
        cache_dir: Some(common::shared_cache()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    Pool::load(
        knobs,
        &Source::Bytes {
            name: "bench".into(),
            bytes,
        },
    )
    .unwrap()
}

fn engine(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hello = std::fs::read(common::root().join("examples/hello.wasm")).unwrap();
    let guests = [("p2 hello", hello), ("p3 hello", common::p3_suite())];
    for (name, bytes) in guests {
        let fresh = pool(bytes.clone(), 1);
        c.bench_function(&format!("instantiate/{name}"), |b| {
            b.iter(|| rt.block_on(fresh.probe()).unwrap())
        });
        c.bench_function(&format!("request/{name}/fresh instance"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let r = fresh.handle(get_root()).await.unwrap();
                    r.into_body().collect().await.unwrap()
                })
            })
        });
        let reused = pool(bytes, 1_000_000);
        c.bench_function(&format!("request/{name}/reused instance"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let r = reused.handle(get_root()).await.unwrap();
                    r.into_body().collect().await.unwrap()
                })
            })
        });
        let s = reused.stats();
        eprintln!(
            "{name}: {} of {} requests on a reused instance",
            s.instances_reused, s.requests
        );
    }
}

criterion_group!(benches, engine);
criterion_main!(benches);
