//! The config file parser: any text gives a config or a clear error,
//! never a panic; a parsed config resolves (defaults, cross-checks) or
//! errors, and its addresses parse or error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wasmpool::config::FileConfig;
use wasmpool::http::ListenAddr;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The unit parsers behind flags and keys, on the raw text too.
    let _ = wasmpool::units::parse_duration(text);
    let _ = wasmpool::units::parse_size(text);
    let _ = text.parse::<ListenAddr>();
    let Ok(cfg) = FileConfig::parse(text) else {
        return;
    };
    if let Ok(knobs) = cfg.knobs.resolve() {
        // A resolved config always validates.
        knobs.validate().expect("resolve() returned knobs that do not validate");
    }
    for l in &cfg.listen {
        let _ = l.parse::<ListenAddr>();
    }
});
