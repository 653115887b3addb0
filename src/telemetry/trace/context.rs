//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` header, read leniently where the spec says so and written
//! exactly; `tracestate` travels untouched beside it.

/// The ids and flags of one span, as `traceparent` carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Bit 0: sampled. Other bits are kept as received.
    pub flags: u8,
}

pub const SAMPLED: u8 = 1;

impl SpanContext {
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// Parses a `traceparent` value; `None` for anything the spec says to
    /// ignore (a new trace then starts).
    ///
    /// Version `00` is exactly `00-<32 hex>-<16 hex>-<2 hex>`. A later
    /// version is read by the same layout and may carry more after a `-`;
    /// version `ff` is invalid. Hex is lowercase; all-zero ids are invalid.
    pub fn parse(value: &[u8]) -> Option<SpanContext> {
        if value.len() < 55 {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        match (version, value.len()) {
            (0, 55) => {}
            (0, _) => return None,
            (_, 55) => {}
            (_, _) if value[55] == b'-' => {}
            _ => return None,
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        // Flags of a later version are not ours to pass on.
        let flags = if version == 0 { flags } else { flags & SAMPLED };
        Some(SpanContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace's root context.
    pub fn new_root(sampled: bool) -> SpanContext {
        SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            flags: if sampled { SAMPLED } else { 0 },
        }
    }

    /// A child of this span, in the same trace.
    pub fn child(&self, sampled: bool) -> SpanContext {
        SpanContext {
            trace_id: self.trace_id,
            span_id: new_span_id(),
            flags: (self.flags & !SAMPLED) | if sampled { SAMPLED } else { 0 },
        }
    }

    /// The `traceparent` value (version 00).
    pub fn header(&self) -> http::HeaderValue {
        // Written on the stack, copied once into the value.
        let mut v = [0u8; 55];
        v[..3].copy_from_slice(b"00-");
        hex_into(&mut v[3..35], &self.trace_id);
        v[35] = b'-';
        hex_into(&mut v[36..52], &self.span_id);
        v[52] = b'-';
        hex_into(&mut v[53..55], &[self.flags]);
        http::HeaderValue::from_bytes(&v).expect("hex is a valid header value")
    }

    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        hex(&mut s, &self.trace_id);
        s
    }

    pub fn span_id_hex(&self) -> String {
        let mut s = String::with_capacity(16);
        hex(&mut s, &self.span_id);
        s
    }
}

/// A random, non-zero trace id.
pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

/// A random, non-zero span id.
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn hex(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// `bytes` in lowercase hex into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(nibble(two[0])? << 4 | nibble(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_and_writes_version_00() {
        let c = SpanContext::parse(GOOD.as_bytes()).unwrap();
        assert!(c.sampled());
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(c.header(), GOOD);
        let child = c.child(true);
        assert_eq!(child.trace_id, c.trace_id);
        assert_ne!(child.span_id, c.span_id);
        assert!(!c.child(false).sampled());
    }

    #[test]
    fn ignores_what_the_spec_says_to_ignore() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(SpanContext::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn reads_a_later_version_by_the_same_layout() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-what-comes-next";
        let c = SpanContext::parse(v.as_bytes()).unwrap();
        assert_eq!(c.flags, SAMPLED);
        assert_eq!(c.header(), GOOD);
    }

    #[test]
    fn new_ids_are_not_zero_and_differ() {
        let a = SpanContext::new_root(true);
        let b = SpanContext::new_root(true);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.trace_id, [0; 16]);
    }
}
