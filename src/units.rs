//! Parsing of the human-friendly values that knobs take: durations with a
//! unit (`500ms`, `5s`, `2m`) and sizes in bytes or with a unit (`64KiB`,
//! `128MiB`, `1GB`).
//!
//! The same functions back clap's value parsers, the TOML deserializer and the
//! C API setters, so every front end rejects the same values with the same
//! message.

use std::time::Duration;

/// Parses a duration that carries a unit: `ns`, `us`, `ms`, `s`, `m`, `h`
/// (anything `humantime` understands, such as `1m 30s`). A bare number is
/// refused because it is ambiguous.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.starts_with('-') {
        return Err(format!("duration `{s}` is negative"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration `{s}` needs a unit, for example `{t}s` or `{t}ms`"
        ));
    }
    humantime::parse_duration(t).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

/// Like [`parse_duration`] but refuses zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("duration `{s}` must be greater than zero"));
    }
    Ok(d)
}

/// Parses a size: plain bytes (`1048576`) or a number with a unit. Binary
/// units: `KiB`, `MiB`, `GiB`, `TiB` (also `K`, `M`, `G`, `T`); decimal units:
/// `KB`, `MB`, `GB`, `TB`; `B` for bytes. Units are case-insensitive except
/// that `KB`-style units are decimal and `KiB`-style units binary.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    if t.starts_with('-') {
        return Err(format!("size `{s}` is negative"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid size `{s}`: expected a number of bytes, e.g. `128MiB`"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size `{s}`: number too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "invalid size `{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size `{s}`: too large"))
}

/// Like [`parse_size`] but refuses zero.
pub fn parse_positive_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 {
        return Err(format!("size `{s}` must be greater than zero"));
    }
    Ok(n)
}

/// Parses a count that must be at least one.
pub fn parse_positive_count(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is negative; expected a whole number of at least 1"
        ));
    }
    let n: u32 = t
        .parse()
        .map_err(|_| format!("invalid number `{s}`: expected a whole number of at least 1"))?;
    if n == 0 {
        return Err("must be at least 1, not 0".into());
    }
    Ok(n)
}

/// Parses a count that may be zero.
pub fn parse_count(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("`{s}` is negative; expected a whole number"));
    }
    t.parse()
        .map_err(|_| format!("invalid number `{s}`: expected a whole number"))
}

/// Formats a size the way the parsers accept it back, in the largest
/// binary unit that keeps one decimal (`1.5GiB`, `640KiB`, `12B`).
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size {
            let tenths = (n as u128 * 10 / size as u128) as u64;
            return if tenths.is_multiple_of(10) {
                format!("{}{unit}", tenths / 10)
            } else {
                format!("{}.{}{unit}", tenths / 10, tenths % 10)
            };
        }
    }
    format!("{n}B")
}

/// Parses a transfer rate: a size per second, written `1KiB/s` or as a
/// plain size (`1KiB`, `500`), meaning that much per second; `0` is
/// "no minimum".
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let size = t.strip_suffix("/s").unwrap_or(t);
    parse_size(size).map_err(|e| e.replace("size", "rate"))
}

/// Formats a duration the way the parsers accept it back.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("five seconds").is_err());
        assert!(parse_duration("").is_err());
        assert!(
            parse_positive_duration("0ms")
                .unwrap_err()
                .contains("greater than zero")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("134217728").unwrap(), 134217728);
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("128 MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("-1").unwrap_err().contains("negative"));
        assert!(parse_size("12XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(
            parse_size("17179869184GiB")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_positive_size("0B").is_err());
    }

    #[test]
    fn formatted_sizes() {
        assert_eq!(format_size(12), "12B");
        assert_eq!(format_size(640 << 10), "640KiB");
        assert_eq!(format_size(1536 << 20), "1.5GiB");
        assert_eq!(parse_rate("1KiB/s").unwrap(), 1024);
        assert_eq!(parse_rate("500").unwrap(), 500);
        assert!(parse_rate("fast").unwrap_err().contains("rate"));
    }

    #[test]
    fn counts() {
        assert_eq!(parse_positive_count("8").unwrap(), 8);
        assert!(parse_positive_count("0").is_err());
        assert!(parse_positive_count("-3").unwrap_err().contains("negative"));
        assert!(parse_positive_count("x").is_err());
        assert_eq!(parse_count("0").unwrap(), 0);
    }
}
