//! A small HTTP/1.1 client over a Unix socket, written on std only.
//!
//! It is test tooling and deliberately independent of the daemon's HTTP stack: it writes the
//! request bytes itself (`Content-Length`, `Connection: close`), reads the answer to EOF, and
//! decodes `Transfer-Encoding: chunked` and Server-Sent Events by hand, so the tests check the
//! wire format rather than what a shared library believes it to be.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// How long any read may block before the client gives up (only to turn a hang into a failure).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, with any chunked transfer coding removed.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn bad_data(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// A client of one Unix socket; every request opens its own connection.
#[derive(Debug, Clone)]
pub struct UdsClient {
    socket: PathBuf,
}

impl UdsClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> UdsClient {
        UdsClient {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> io::Result<UnixStream> {
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        Ok(stream)
    }

    /// Opens a connection and writes one request. A write error is returned only if nothing at
    /// all could be written: a server that refuses a large body may answer and close before
    /// reading it all, and its answer is still to be read.
    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> io::Result<UnixStream> {
        let mut stream = self.connect()?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: tileflowd\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        match stream.write_all(body) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(e),
        }
        Ok(stream)
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let mut stream = self.send(method, path, content_type, body)?;
        let mut raw = Vec::new();
        match stream.read_to_end(&mut raw) {
            Ok(_) => {}
            // A reset after the answer was sent (the server closed with our body unread).
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
        parse_response(&raw)
    }

    fn must(&self, method: &str, path: &str, ct: Option<&str>, body: &[u8]) -> HttpResponse {
        self.request(method, path, ct, body)
            .unwrap_or_else(|e| panic!("{method} {path} over {}: {e}", self.socket.display()))
    }

    /// `GET path`; panics if the exchange fails at the transport level.
    pub fn get(&self, path: &str) -> HttpResponse {
        self.must("GET", path, None, b"")
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> HttpResponse {
        self.must("DELETE", path, None, b"")
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> HttpResponse {
        self.must(
            "POST",
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
    }

    /// `POST path` with raw bytes labelled as JSON (for malformed bodies).
    pub fn post_raw(&self, path: &str, body: &[u8]) -> HttpResponse {
        self.must("POST", path, Some("application/json"), body)
    }

    /// `POST path` with a JSON body, reading the answer as a stream of Server-Sent Events.
    pub fn stream_json(&self, path: &str, body: &Value) -> io::Result<SseStream> {
        let stream = self.send(
            "POST",
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )?;
        SseStream::open(stream)
    }
}

/// Parses a complete response read to EOF.
pub fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let mut reader = BufReader::new(raw);
    let (status, headers) = read_head(&mut reader)?;
    let mut body = Vec::new();
    if is_chunked(&headers) {
        ChunkedReader::new(reader).read_to_end(&mut body)?;
    } else if let Some(len) = find_header(&headers, "content-length") {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| bad_data(format!("bad Content-Length {len:?}")))?;
        reader.read_to_end(&mut body)?;
        if body.len() < len {
            return Err(bad_data(format!(
                "body ended after {} of {len} bytes",
                body.len()
            )));
        }
        body.truncate(len);
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    find_header(headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
}

/// Reads one CRLF-terminated line (without the CRLF); None at EOF.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| bad_data("a header line is not UTF-8"))
}

/// Reads the status line and header fields.
fn read_head(r: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let status_line =
        read_line(r)?.ok_or_else(|| bad_data("the connection closed before a status line"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad_data(format!("bad status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad_data(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| bad_data("the headers did not end"))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad_data(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok((status, headers))
}

/// Removes the chunked transfer coding from a body as it is read.
#[derive(Debug)]
pub struct ChunkedReader<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> ChunkedReader<R> {
    /// Decodes the chunked body that `inner` is positioned at.
    pub fn new(inner: R) -> ChunkedReader<R> {
        ChunkedReader {
            inner,
            left: 0,
            done: false,
        }
    }

    /// Reads the next chunk-size line; at the last chunk, reads the trailers.
    fn next_chunk(&mut self) -> io::Result<()> {
        let line =
            read_line(&mut self.inner)?.ok_or_else(|| bad_data("chunked body ended early"))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| bad_data(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            // Trailer fields up to an empty line (EOF right after the last chunk is tolerated).
            while let Some(l) = read_line(&mut self.inner)? {
                if l.is_empty() {
                    break;
                }
            }
            self.done = true;
        }
        self.left = size;
        Ok(())
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let want = out.len().min(self.left);
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(bad_data("chunked body ended inside a chunk"));
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(bad_data("a chunk is not followed by CRLF"));
            }
        }
        Ok(n)
    }
}

/// One Server-Sent Event: its raw lines (without line ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The lines of the event, in order.
    pub lines: Vec<String>,
}

impl SseEvent {
    /// The event's data: its `data:` fields joined by newlines (one leading space stripped).
    pub fn data(&self) -> String {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A response read incrementally as Server-Sent Events.
pub struct SseStream {
    /// Status code.
    pub status: u16,
    /// Header fields, names lower-cased.
    pub headers: Vec<(String, String)>,
    body: BufReader<Box<dyn Read + Send>>,
}

impl std::fmt::Debug for SseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseStream")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl SseStream {
    fn open(stream: UnixStream) -> io::Result<SseStream> {
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader)?;
        let body: Box<dyn Read + Send> = if is_chunked(&headers) {
            Box::new(ChunkedReader::new(reader))
        } else if let Some(len) = find_header(&headers, "content-length") {
            let len: u64 = len
                .trim()
                .parse()
                .map_err(|_| bad_data("bad Content-Length"))?;
            Box::new(reader.take(len))
        } else {
            Box::new(reader)
        };
        Ok(SseStream {
            status,
            headers,
            body: BufReader::new(body),
        })
    }

    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The next event as it arrives; None when the body ends (an incomplete last event is an
    /// error, so a stream cut in the middle of an event is noticed).
    pub fn next_event(&mut self) -> io::Result<Option<SseEvent>> {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            if self.body.read_until(b'\n', &mut line)? == 0 {
                return if lines.is_empty() {
                    Ok(None)
                } else {
                    Err(bad_data(format!(
                        "the stream ended inside an event: {lines:?}"
                    )))
                };
            }
            if line.pop() != Some(b'\n') {
                return Err(bad_data(format!(
                    "the stream ended inside a line: {:?}",
                    String::from_utf8_lossy(&line)
                )));
            }
            let line =
                String::from_utf8(line).map_err(|_| bad_data("an event line is not UTF-8"))?;
            if line.is_empty() {
                if lines.is_empty() {
                    continue;
                }
                return Ok(Some(SseEvent { lines }));
            }
            lines.push(line);
        }
    }

    /// The next event's data, panicking on a transport error.
    pub fn next_data(&mut self) -> Option<String> {
        self.next_event()
            .unwrap_or_else(|e| panic!("reading the event stream: {e}"))
            .map(|e| e.data())
    }

    /// Every remaining event, to the end of the body.
    pub fn collect_events(&mut self) -> io::Result<Vec<SseEvent>> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event()? {
            out.push(e);
        }
        Ok(out)
    }

    /// The rest of the body (for a non-stream answer such as an error object).
    pub fn rest(mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.body.read_to_end(&mut out)?;
        Ok(out)
    }
}

impl Iterator for SseStream {
    type Item = String;

    /// The data of each event as it arrives.
    fn next(&mut self) -> Option<String> {
        self.next_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_chunked_bodies_and_trailers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n\
                    5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-a"), Some("b"));
        assert_eq!(r.body, b"hello world");
    }

    #[test]
    fn honours_content_length_and_rejects_short_bodies() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{}"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab")
                .is_err()
        );
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn splits_events_and_joins_data_lines() {
        let body = "data: {\"a\":1}\n\ndata: x\ndata: y\n\n: comment\n\ndata: [DONE]\n\n";
        let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        let mut s = SseStream {
            status: 200,
            headers: Vec::new(),
            body: BufReader::new(Box::new(ChunkedReader::new(BufReader::new(
                io::Cursor::new(chunked.into_bytes()),
            )))),
        };
        let events = s.collect_events().unwrap();
        let data: Vec<String> = events.iter().map(SseEvent::data).collect();
        assert_eq!(data, ["{\"a\":1}", "x\ny", "", "[DONE]"]);
        assert_eq!(events[1].lines, ["data: x", "data: y"]);
    }

    #[test]
    fn a_stream_cut_inside_an_event_is_an_error() {
        let mut s = SseStream {
            status: 200,
            headers: Vec::new(),
            body: BufReader::new(Box::new(io::Cursor::new(b"data: {\"a\"".to_vec()))),
        };
        assert!(s.next_event().is_err());
    }
}
