//! Writes the benchmark guests into a directory (benches/run.sh calls it):
//! `cargo bench --bench guests -- OUTDIR`.
//!
//! - p2_hello.wasm: examples/hello.wasm (WASIp2, hand-written WAT)
//! - p3_suite.wasm: the WASIp3 test guest ("/" says hello, "/sleep/N" sleeps)
//! - p2_suite.wasm: the WASIp2 test guest
//! - py_p2.wasm, py_p3.wasm: the componentize-py guests (needs
//!   componentize-py, which tests/run-all.sh installs; left out when
//!   WASMPOOL_GUESTS_WAT_ONLY is set)
#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let out = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .expect("usage: cargo bench --bench guests -- OUTDIR");
    let out = std::path::PathBuf::from(out);
    std::fs::create_dir_all(&out).unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        std::fs::write(out.join(name), bytes).unwrap();
        eprintln!("wrote {}", out.join(name).display());
    };
    write(
        "p2_hello.wasm",
        std::fs::read(common::root().join("examples/hello.wasm")).unwrap(),
    );
    write("p2_suite.wasm", common::p2_suite());
    write("p3_suite.wasm", common::p3_suite());
    if std::env::var_os("WASMPOOL_GUESTS_WAT_ONLY").is_none() {
        write("py_p2.wasm", common::python_guest("p2"));
        write("py_p3.wasm", common::python_guest("p3"));
    }
}
