//! Throughput of the Rust API: N requests of GET / through `Pool::handle`
//! with at most INFLIGHT at once (the counterpart of
//! ffi/bench/push_bench.c, which does the same through the C API).
//!
//! `cargo bench --bench api_push -- COMPONENT CACHE_DIR N INFLIGHT`
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Instant;
use wasmpool::{KnobArgs, Pool, Source};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [component, cache, n, inflight] = &args[..] else {
        eprintln!("usage: api_push COMPONENT CACHE_DIR N INFLIGHT");
        std::process::exit(2);
    };
    let n: usize = n.parse().unwrap();
    let inflight: u32 = inflight.parse().unwrap();
    let knobs = KnobArgs {
        cache_dir: Some(cache.into()),
        max_concurrent_requests: Some(inflight),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    // The same runtime shape as the C API's handler: engine threads = CPUs
    // (at most 4).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    let pool = Arc::new(Pool::load(knobs, &Source::File(component.into())).unwrap());
    let get = wasmpool::engine::pool::get_root;
    rt.block_on(async {
        for _ in 0..100 {
            let r = pool.handle(get()).await.unwrap();
            r.into_body().collect().await.unwrap();
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(inflight as usize));
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let pool = pool.clone();
            let req = get();
            tasks.spawn(async move {
                let ok = match pool.handle(req).await {
                    Ok(r) => r.status() == 200 && r.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                drop(permit);
                ok
            });
            while let Some(r) = tasks.try_join_next() {
                assert!(r.unwrap(), "a request failed");
            }
        }
        while let Some(r) = tasks.join_next().await {
            assert!(r.unwrap(), "a request failed");
        }
        let secs = t0.elapsed().as_secs_f64();
        println!("{:.0} req/s ({n} requests, {secs:.2} s)", n as f64 / secs);
    });
}
