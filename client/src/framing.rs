//! Incremental framing of streamed bodies: server-sent events (`/v1/*` with `stream`) and
//! newline-delimited JSON (`/api/models/import`). Bytes arrive in arbitrary pieces; these
//! parsers hand out only complete frames.

/// Splits a byte stream into lines (without `\n` or `\r\n`).
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Adds bytes; returns the lines they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        lines
    }

    /// What is left after the last newline (a last line without one), if anything.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        (!rest.iter().all(u8::is_ascii_whitespace))
            .then(|| String::from_utf8_lossy(&rest).into_owned())
    }
}

/// Server-sent events: collects `data:` lines until a blank line ends the event; returns each
/// event's data (lines joined by `\n`). Comments, `event:`, `id:` and `retry:` are skipped.
#[derive(Debug, Default)]
pub struct SseParser {
    lines: LineSplitter,
    data: Option<String>,
}

impl SseParser {
    /// Adds bytes; returns the data of the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for line in self.lines.push(bytes) {
            if line.is_empty() {
                events.extend(self.data.take());
            } else if let Some(value) = field(&line, "data") {
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                }
            }
        }
        events
    }

    /// The event in progress when the stream ended without its blank line.
    pub fn finish(&mut self) -> Option<String> {
        if let Some(line) = self.lines.finish() {
            self.push(format!("{line}\n").as_bytes());
        }
        self.data.take()
    }
}

/// The value of `name: value` (one optional space after the colon, as the SSE spec says).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(name)?;
    if rest.is_empty() {
        return Some("");
    }
    let value = rest.strip_prefix(':')?;
    Some(value.strip_prefix(' ').unwrap_or(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_across_pieces() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"{\"a\":").is_empty());
        assert_eq!(s.push(b"1}\r\n{\"b\"").as_slice(), ["{\"a\":1}"]);
        assert_eq!(s.push(b":2}\n\n").as_slice(), ["{\"b\":2}", ""]);
        assert_eq!(s.finish(), None);
        s.push(b"tail");
        assert_eq!(s.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn sse_events_byte_by_byte() {
        let body =
            b": comment\nevent: x\ndata: {\"n\":1}\n\ndata:two\ndata: lines\n\ndata: [DONE]\n\n";
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for b in body.iter() {
            got.extend(p.push(std::slice::from_ref(b)));
        }
        assert_eq!(got, ["{\"n\":1}", "two\nlines", "[DONE]"]);
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn sse_unterminated_last_event() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {}").is_empty());
        assert_eq!(p.finish().as_deref(), Some("{}"));
    }

    #[test]
    fn field_names_must_match_exactly() {
        assert_eq!(field("data: x", "data"), Some("x"));
        assert_eq!(field("data:x", "data"), Some("x"));
        assert_eq!(field("data", "data"), Some(""));
        assert_eq!(field("database: x", "data"), None);
    }
}
