//! The access log's own line writer.
//!
//! An access line has twelve fields and is written for every request, so
//! going through `tracing-subscriber`'s formatter (a visitor per field,
//! escaping, styling, a date computed per line) cost 7 to 12% of the
//! requests/s of a small guest. When the process installed its own log
//! output ([`crate::logging::init`]), lines are formatted here instead, byte
//! for byte as that formatter writes them (human, journal or JSON; the time
//! by `humantime`, in the same RFC 3339 shape), and written to stderr with
//! one `write`. Otherwise (the library inside a
//! host's subscriber, or colours on a terminal) they go through `tracing`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The shape of the lines `logging::init` set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `2026-12-01T07:28:21.885528Z  INFO access: message k=v ...`
    Human,
    /// `<6>access: message k=v ...` (journald adds the time).
    Journal,
    /// One JSON object per line, as `tracing-subscriber`'s JSON format.
    Json,
}

static SHAPE: OnceLock<Shape> = OnceLock::new();

/// Access lines are written here from now on, in `shape`. Called once, by
/// the code that installed the matching subscriber.
pub fn install(shape: Shape) {
    let _ = SHAPE.set(shape);
}

/// One request's line.
pub struct Line<'a> {
    pub client: &'a dyn std::fmt::Display,
    pub method: &'a str,
    pub target: &'a str,
    pub version: http::Version,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Rounded to microseconds by the caller.
    pub duration_ms: f64,
    /// -1 when no instance answered.
    pub instance: i64,
    pub reused: bool,
    pub complete: bool,
}

thread_local! {
    /// The line and the client's text, reused by each thread's lines.
    static BUF: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
}

/// Writes `line` if an output shape is installed; `false` means the caller
/// logs it through `tracing`.
pub fn write(line: &Line<'_>) -> bool {
    let Some(&shape) = SHAPE.get() else {
        return false;
    };
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        let (out, client) = &mut *b;
        out.clear();
        client.clear();
        let _ = write!(client, "{}", line.client);
        // What tracing-subscriber would escape: none of it comes from a
        // parsed request, but a line must never carry a terminal escape.
        if [client.as_str(), line.method, line.target]
            .iter()
            .any(|s| s.bytes().any(|c| c < 0x20 || c == 0x7f))
        {
            return false;
        }
        match shape {
            Shape::Human => {
                now(out);
                out.push_str("  INFO access: ");
                fields(out, client, line);
            }
            Shape::Journal => {
                out.push_str("<6>access: ");
                fields(out, client, line);
            }
            Shape::Json => json(out, client, line),
        }
        out.push('\n');
        // One write: lines from different threads do not mix.
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
        true
    })
}

fn version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// The message, then `name=value` pairs, as `DefaultFields` writes them.
fn fields(out: &mut String, client: &str, l: &Line<'_>) {
    let _ = write!(
        out,
        "{client} {m} {t} {s} client={client} method={m} target={t} version={v} status={s} \
         bytes_in={bi} bytes_out={bo} duration_ms={d:?} instance={i} reused={r} complete={c}",
        m = l.method,
        t = l.target,
        s = l.status,
        v = version(l.version),
        bi = l.bytes_in,
        bo = l.bytes_out,
        d = l.duration_ms,
        i = l.instance,
        r = l.reused,
        c = l.complete,
    );
}

fn json(out: &mut String, client: &str, l: &Line<'_>) {
    out.push_str("{\"timestamp\":\"");
    now(out);
    out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":\"");
    let _ = write!(out, "{client} {} ", l.method);
    json_str(out, l.target);
    let _ = write!(out, " {}\",\"client\":\"{client}\",\"method\":\"", l.status);
    json_str(out, l.method);
    out.push_str("\",\"target\":\"");
    json_str(out, l.target);
    let _ = write!(
        out,
        "\",\"version\":\"{}\",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\
         \"duration_ms\":{:?},\"instance\":{},\"reused\":{},\"complete\":{}}},\"target\":\"access\"}}",
        version(l.version),
        l.status,
        l.bytes_in,
        l.bytes_out,
        l.duration_ms,
        l.instance,
        l.reused,
        l.complete
    );
}

/// The inside of a JSON string (control characters were refused before).
fn json_str(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
}

/// `2026-12-01T07:28:21.885528Z`, as `tracing-subscriber`'s default timer.
fn now(out: &mut String) {
    let _ = write!(
        out,
        "{}",
        humantime::format_rfc3339_micros(SystemTime::now())
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(client: &'a dyn std::fmt::Display, target: &'a str) -> Line<'a> {
        Line {
            client,
            method: "POST",
            target,
            version: http::Version::HTTP_11,
            status: 200,
            bytes_in: 5,
            bytes_out: 123,
            duration_ms: 0.852,
            instance: 1,
            reused: false,
            complete: true,
        }
    }

    #[test]
    fn fields_as_tracing_writes_them() {
        let mut out = String::new();
        fields(&mut out, "127.0.0.1", &line(&"127.0.0.1", "/echo?q=1"));
        assert_eq!(
            out,
            "127.0.0.1 POST /echo?q=1 200 client=127.0.0.1 method=POST target=/echo?q=1 \
             version=HTTP/1.1 status=200 bytes_in=5 bytes_out=123 duration_ms=0.852 instance=1 \
             reused=false complete=true"
        );
    }

    #[test]
    fn json_is_json() {
        let mut out = String::new();
        json(&mut out, "::1", &line(&"::1", "/a\"b\\c?x=\u{e9}"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        let f = &v["fields"];
        assert_eq!(f["target"], "/a\"b\\c?x=\u{e9}");
        assert_eq!(f["message"], "::1 POST /a\"b\\c?x=\u{e9} 200");
        assert_eq!(f["status"], 200);
        assert_eq!(f["duration_ms"], 0.852);
        assert_eq!(f["instance"], 1);
        assert_eq!(f["complete"], true);
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }
}
