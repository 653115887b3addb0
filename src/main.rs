//! The `wasmpool` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    wasmpool::cli::main()
}
