//! The admin socket's protocol: the client sends one request line, the
//! agent answers with one line of JSON and closes the connection.
//!
//! | request  | reply |
//! |---|---|
//! | `status` | the [`super::status::Status`] document |
//! | `ping`   | `{"pong":true,"version":"…"}` |
//! | `drain ADDR:PORT` | `{"ok":true,"message":"…"}`: no new connections to that backend, established ones stay |
//! | `ready ADDR:PORT` | `{"ok":true,"message":"…"}`: the backend takes new connections again when healthy |
//! | anything else | `{"error":"…"}` |
//!
//! A request is at most [`MAX_REQUEST_LEN`] bytes of UTF-8 ended by `\n`
//! (or by the client closing its side); surrounding whitespace and a `\r`
//! are ignored. Every malformed, oversized, unknown or incomplete request
//! gets an `{"error": …}` reply: parsing is pure and total, and
//! [`read_request`] never reads more than the limit.

use std::net::SocketAddrV4;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest request accepted, bytes (the line end not counted).
pub const MAX_REQUEST_LEN: usize = 256;
/// The requests, as the client spells them.
pub const REQUESTS: [&str; 4] = ["status", "ping", "drain", "ready"];

/// A request the agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The status document.
    Status,
    /// Liveness.
    Ping,
    /// Take a backend out of the READY sets without touching its flows.
    Drain(SocketAddrV4),
    /// Undo [`Request::Drain`].
    Ready(SocketAddrV4),
}

impl Request {
    /// The request's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Ping => "ping",
            Request::Drain(_) => "drain",
            Request::Ready(_) => "ready",
        }
    }

    /// The request line for `self`, without the line end.
    pub fn line(self) -> String {
        match self {
            Request::Drain(backend) | Request::Ready(backend) => {
                format!("{} {backend}", self.as_str())
            }
            Request::Status | Request::Ping => self.as_str().to_string(),
        }
    }
}

/// Why a request is not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty request (known requests: status, ping, drain, ready)")]
    Empty,
    #[error("request longer than {MAX_REQUEST_LEN} bytes")]
    TooLong,
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error("unknown request {0:?} (known requests: status, ping, drain, ready)")]
    Unknown(String),
    #[error("request {0:?} takes no arguments")]
    Arguments(&'static str),
    #[error("request {0:?} takes one backend, ADDRESS:PORT")]
    Backend(&'static str),
    #[error("no complete request line within {0:?}")]
    Timeout(std::time::Duration),
    #[error("cannot read the request: {0}")]
    Io(String),
}

/// Parses one request line (without or with its line end).
pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST_LEN + 2 {
        return Err(RequestError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
    let mut words = text.split_whitespace();
    let Some(word) = words.next() else {
        return Err(RequestError::Empty);
    };
    let backend = |word: &'static str, arg: Option<&str>| -> Result<SocketAddrV4, RequestError> {
        arg.and_then(|a| a.parse().ok())
            .ok_or(RequestError::Backend(word))
    };
    let request = match word {
        "status" => Request::Status,
        "ping" => Request::Ping,
        "drain" => Request::Drain(backend("drain", words.next())?),
        "ready" => Request::Ready(backend("ready", words.next())?),
        other => {
            // Echo a bounded, printable prefix only.
            let shown: String = other
                .chars()
                .take(32)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            return Err(RequestError::Unknown(shown));
        }
    };
    if words.next().is_some() {
        return Err(match request {
            Request::Drain(_) | Request::Ready(_) => RequestError::Backend(request.as_str()),
            Request::Status | Request::Ping => RequestError::Arguments(request.as_str()),
        });
    }
    Ok(request)
}

/// Reads one request line: up to the first `\n` or the end of the stream,
/// at most [`MAX_REQUEST_LEN`] bytes (plus the line end). Stops reading as
/// soon as the limit is passed.
pub async fn read_request<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, RequestError> {
    let mut buf = vec![0u8; MAX_REQUEST_LEN + 2];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(RequestError::TooLong);
        }
        let n = reader
            .read(&mut buf[len..])
            .await
            .map_err(|e| RequestError::Io(e.to_string()))?;
        if n == 0 {
            buf.truncate(len);
            return Ok(buf);
        }
        if let Some(end) = buf[len..len + n].iter().position(|&b| b == b'\n') {
            buf.truncate(len + end);
            return Ok(buf);
        }
        len += n;
    }
}

/// The reply to a request that failed: `{"error":"<message>"}`.
pub fn error_reply(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The reply to a request that changed something.
pub fn ok_reply(message: &str) -> String {
    serde_json::json!({ "ok": true, "message": message }).to_string()
}

/// The reply to `ping`.
pub fn pong_reply() -> String {
    serde_json::json!({ "pong": true, "version": env!("CARGO_PKG_VERSION") }).to_string()
}

/// The error message of a reply, if it is an error reply.
pub fn reply_error(reply: &serde_json::Value) -> Option<String> {
    reply.get("error").map(|e| match e.as_str() {
        Some(text) => text.to_string(),
        None => e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_requests_parse_with_any_line_end() {
        for line in ["status", "status\n", "status\r\n", "  status  ", "status\r"] {
            assert_eq!(parse(line.as_bytes()), Ok(Request::Status), "{line:?}");
        }
        assert_eq!(parse(b"ping\n"), Ok(Request::Ping));
        let backend: SocketAddrV4 = "198.18.0.2:6380".parse().unwrap();
        assert_eq!(
            parse(b"drain 198.18.0.2:6380\n"),
            Ok(Request::Drain(backend))
        );
        assert_eq!(
            parse(b" ready  198.18.0.2:6380 "),
            Ok(Request::Ready(backend))
        );
        for r in [
            Request::Status,
            Request::Ping,
            Request::Drain(backend),
            Request::Ready(backend),
        ] {
            assert_eq!(parse(r.line().as_bytes()), Ok(r));
            assert!(REQUESTS.contains(&r.as_str()));
        }
    }

    #[test]
    fn drain_and_ready_take_exactly_one_backend() {
        for line in [
            "drain",
            "drain 198.18.0.2",
            "drain host:6380",
            "ready 198.18.0.2:99999",
            "drain 198.18.0.2:6380 198.18.0.1:6380",
        ] {
            assert!(
                matches!(parse(line.as_bytes()), Err(RequestError::Backend(_))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn bad_requests_are_errors_never_panics() {
        assert_eq!(parse(b""), Err(RequestError::Empty));
        assert_eq!(parse(b" \r\n"), Err(RequestError::Empty));
        assert_eq!(
            parse(b"STATUS"),
            Err(RequestError::Unknown("STATUS".into()))
        );
        assert_eq!(parse(b"status now"), Err(RequestError::Arguments("status")));
        assert_eq!(parse(&[0xff, 0xfe, b'\n']), Err(RequestError::NotUtf8));
        assert_eq!(parse(&[b'a'; 1000]), Err(RequestError::TooLong));
        let long_word = "x".repeat(200);
        match parse(long_word.as_bytes()) {
            Err(RequestError::Unknown(shown)) => assert_eq!(shown.len(), 32),
            other => panic!("{other:?}"),
        }
        match parse(b"\x1b[2Jstatus") {
            Err(RequestError::Unknown(shown)) => assert!(!shown.contains('\x1b'), "{shown:?}"),
            other => panic!("{other:?}"),
        }
        let err = parse(b"stats").unwrap_err().to_string();
        let known = format!("known requests: {})", REQUESTS.join(", "));
        assert!(err.contains("\"stats\"") && err.ends_with(&known), "{err}");
        assert!(RequestError::Empty.to_string().ends_with(&known));
    }

    #[tokio::test]
    async fn reading_stops_at_the_line_end_or_the_limit() {
        let mut input: &[u8] = b"status\nignored";
        assert_eq!(read_request(&mut input).await.unwrap(), b"status");
        let mut eof: &[u8] = b"ping";
        assert_eq!(read_request(&mut eof).await.unwrap(), b"ping");
        let mut empty: &[u8] = b"";
        assert_eq!(read_request(&mut empty).await.unwrap(), b"");
        let big = vec![b'a'; 10 * MAX_REQUEST_LEN];
        let mut oversized: &[u8] = &big;
        assert_eq!(
            read_request(&mut oversized).await,
            Err(RequestError::TooLong)
        );
        assert!(
            oversized.len() >= big.len() - MAX_REQUEST_LEN - 2,
            "read no more than the limit"
        );
        let exact = format!("{}\n", "a".repeat(MAX_REQUEST_LEN));
        let mut at_limit: &[u8] = exact.as_bytes();
        assert_eq!(
            read_request(&mut at_limit).await.unwrap().len(),
            MAX_REQUEST_LEN
        );
    }

    #[test]
    fn replies_are_one_line_of_json() {
        let e = error_reply("unknown request \"x\"\nsecond line");
        assert!(!e.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(
            reply_error(&v).unwrap(),
            "unknown request \"x\"\nsecond line"
        );
        let p: serde_json::Value = serde_json::from_str(&pong_reply()).unwrap();
        assert_eq!(p["pong"], true);
        assert_eq!(reply_error(&p), None);
    }
}
