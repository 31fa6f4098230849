//! The little of RESP2 (the Redis serialization protocol) that a health
//! check and the test server need.
//!
//! Commands are written as arrays of bulk strings. Replies read are simple
//! strings, errors, integers, bulk strings and the nil bulk string; arrays
//! and RESP3 types are rejected, because no reply to AUTH, PING or INFO is
//! one. Every length is checked against a fixed bound before anything is
//! allocated, so a garbled or hostile peer costs at most [`MAX_LINE`] +
//! [`MAX_BULK`] bytes of memory and yields a [`RespError`], never a panic.
//!
//! Not a client library: no connection handling, no pipelining bookkeeping,
//! no resynchronisation after an error (the caller drops the connection).

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Longest line accepted (simple string, error, integer, length header),
/// without its CRLF.
pub const MAX_LINE: usize = 4096;
/// Largest bulk string accepted. `INFO replication` of a KeyDB with a few
/// replicas is about 1 KiB.
pub const MAX_BULK: usize = 256 * 1024;
/// Most arguments accepted in one command (test server side).
pub const MAX_ARGS: usize = 16;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`, `+PONG`.
    Simple(String),
    /// `-ERR ...`, `-LOADING ...`: the text after the dash.
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$5\r\nhello\r\n`.
    Bulk(Vec<u8>),
    /// `$-1`.
    Nil,
}

impl Reply {
    /// A short description for error messages: the type, and the text of
    /// simple strings and errors (cut to 64 characters).
    pub fn describe(&self) -> String {
        match self {
            Reply::Simple(s) => format!("simple string {:?}", printable(s, 64)),
            Reply::Error(s) => format!("error {:?}", printable(s, 64)),
            Reply::Integer(i) => format!("integer {i}"),
            Reply::Bulk(b) => format!("bulk string of {} bytes", b.len()),
            Reply::Nil => "nil".to_string(),
        }
    }
}

/// Why a reply (or command) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The peer closed the connection before a whole reply arrived.
    #[error("connection closed before a complete reply")]
    Closed,
    /// The socket failed.
    #[error("socket error")]
    Io(#[source] io::Error),
    /// No CRLF within [`MAX_LINE`] bytes.
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A line ended in LF without CR, or a bulk string was not followed by CRLF.
    #[error("missing CRLF terminator")]
    BadTerminator,
    /// An empty line where a type byte was expected.
    #[error("empty line")]
    EmptyLine,
    /// A type byte RESP does not define.
    #[error("unknown reply type byte 0x{0:02x}")]
    UnknownType(u8),
    /// A RESP type this reader does not accept (arrays, RESP3 types).
    #[error("unexpected reply type {0:?}")]
    UnexpectedType(char),
    /// A length or integer that is not a decimal number.
    #[error("malformed number {0:?}")]
    BadNumber(String),
    /// A bulk string length below -1.
    #[error("negative length {0}")]
    NegativeLength(i64),
    /// A bulk string larger than [`MAX_BULK`].
    #[error("bulk string of {0} bytes exceeds the {MAX_BULK}-byte limit")]
    BulkTooLarge(i64),
    /// A command (test server side) with zero or more than [`MAX_ARGS`] arguments.
    #[error("command with {0} arguments")]
    BadArgCount(i64),
}

impl From<io::Error> for RespError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            RespError::Closed
        } else {
            RespError::Io(e)
        }
    }
}

/// Appends `args` to `buf` as one RESP command (an array of bulk strings).
pub fn write_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        write_bulk(buf, arg);
    }
}

/// Appends `data` to `buf` as a RESP bulk string.
pub fn write_bulk(buf: &mut Vec<u8>, data: &[u8]) {
    buf.extend_from_slice(format!("${}\r\n", data.len()).as_bytes());
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"\r\n");
}

/// Reads one reply.
pub async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Reply, RespError> {
    let line = read_line(r).await?;
    let (&kind, rest) = line.split_first().ok_or(RespError::EmptyLine)?;
    match kind {
        b'+' => Ok(Reply::Simple(String::from_utf8_lossy(rest).into_owned())),
        b'-' => Ok(Reply::Error(String::from_utf8_lossy(rest).into_owned())),
        b':' => parse_number(rest).map(Reply::Integer),
        b'$' => match read_bulk_body(r, parse_number(rest)?).await? {
            Some(data) => Ok(Reply::Bulk(data)),
            None => Ok(Reply::Nil),
        },
        b'*' | b'%' | b'~' | b'>' | b'|' | b'_' | b',' | b'#' | b'!' | b'=' | b'(' => {
            Err(RespError::UnexpectedType(char::from(kind)))
        }
        other => Err(RespError::UnknownType(other)),
    }
}

/// Reads one command (an array of bulk strings), as a server does.
/// `Ok(None)` when the peer closed the connection between commands.
pub async fn read_command<R: AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<Vec<u8>>>, RespError> {
    if r.fill_buf().await?.is_empty() {
        return Ok(None);
    }
    let line = read_line(r).await?;
    let (&kind, rest) = line.split_first().ok_or(RespError::EmptyLine)?;
    if kind != b'*' {
        return Err(RespError::UnexpectedType(char::from(kind)));
    }
    let count = parse_number(rest)?;
    if count < 1 || count > MAX_ARGS as i64 {
        return Err(RespError::BadArgCount(count));
    }
    let mut args = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let line = read_line(r).await?;
        match line.split_first() {
            Some((b'$', len)) => match read_bulk_body(r, parse_number(len)?).await? {
                Some(arg) => args.push(arg),
                None => return Err(RespError::NegativeLength(-1)),
            },
            Some((&other, _)) => return Err(RespError::UnexpectedType(char::from(other))),
            None => return Err(RespError::EmptyLine),
        }
    }
    Ok(Some(args))
}

/// Reads the body of a bulk string whose header announced `len` bytes.
async fn read_bulk_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    len: i64,
) -> Result<Option<Vec<u8>>, RespError> {
    if len == -1 {
        return Ok(None);
    }
    if len < 0 {
        return Err(RespError::NegativeLength(len));
    }
    if len > MAX_BULK as i64 {
        return Err(RespError::BulkTooLarge(len));
    }
    let mut data = vec![0; len as usize + 2];
    r.read_exact(&mut data).await?;
    if !data.ends_with(b"\r\n") {
        return Err(RespError::BadTerminator);
    }
    data.truncate(len as usize);
    Ok(Some(data))
}

/// Reads up to CRLF (at most [`MAX_LINE`] bytes before it) and returns the
/// line without the CRLF.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, RespError> {
    let mut line = Vec::new();
    let limit = MAX_LINE as u64 + 2;
    let n = (&mut *r).take(limit).read_until(b'\n', &mut line).await?;
    if line.last() != Some(&b'\n') {
        return Err(if n as u64 == limit {
            RespError::LineTooLong
        } else {
            RespError::Closed
        });
    }
    if !line.ends_with(b"\r\n") {
        return Err(RespError::BadTerminator);
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

/// Parses a RESP decimal: an optional minus sign and 1 to 19 digits.
fn parse_number(text: &[u8]) -> Result<i64, RespError> {
    let bad = || RespError::BadNumber(printable(&String::from_utf8_lossy(text), 32));
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)
}

/// `text` cut to `max` characters with control characters replaced, fit
/// for a log line or an error message although it came from the network.
pub fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn reply(bytes: &[u8]) -> Result<Reply, RespError> {
        let mut r = bytes;
        read_reply(&mut r).await
    }

    #[tokio::test]
    async fn reads_each_reply_type() {
        assert_eq!(
            reply(b"+PONG\r\n").await.unwrap(),
            Reply::Simple("PONG".into())
        );
        assert_eq!(
            reply(b"-LOADING KeyDB is loading the dataset in memory\r\n")
                .await
                .unwrap(),
            Reply::Error("LOADING KeyDB is loading the dataset in memory".into())
        );
        assert_eq!(reply(b":-42\r\n").await.unwrap(), Reply::Integer(-42));
        assert_eq!(
            reply(b"$11\r\nloading:0\r\n\r\n").await.unwrap(),
            Reply::Bulk(b"loading:0\r\n".to_vec())
        );
        assert_eq!(reply(b"$0\r\n\r\n").await.unwrap(), Reply::Bulk(vec![]));
        assert_eq!(reply(b"$-1\r\n").await.unwrap(), Reply::Nil);
    }

    #[tokio::test]
    async fn reads_consecutive_replies() {
        let mut r: &[u8] = b"+OK\r\n+PONG\r\n$3\r\nabc\r\n";
        assert_eq!(
            read_reply(&mut r).await.unwrap(),
            Reply::Simple("OK".into())
        );
        assert_eq!(
            read_reply(&mut r).await.unwrap(),
            Reply::Simple("PONG".into())
        );
        assert_eq!(
            read_reply(&mut r).await.unwrap(),
            Reply::Bulk(b"abc".to_vec())
        );
        assert!(matches!(read_reply(&mut r).await, Err(RespError::Closed)));
    }

    #[tokio::test]
    async fn rejects_garbled_replies() {
        type Expect = fn(&RespError) -> bool;
        let cases: &[(&[u8], Expect)] = &[
            (b"", |e| matches!(e, RespError::Closed)),
            (b"+PON", |e| matches!(e, RespError::Closed)),
            (b"+PONG\n", |e| matches!(e, RespError::BadTerminator)),
            (b"\r\n", |e| matches!(e, RespError::EmptyLine)),
            (b"PONG\r\n", |e| matches!(e, RespError::UnknownType(b'P'))),
            (b"*1\r\n$4\r\nPONG\r\n", |e| {
                matches!(e, RespError::UnexpectedType('*'))
            }),
            (b"=15\r\ntxt:loading:0\r\n", |e| {
                matches!(e, RespError::UnexpectedType('='))
            }),
            (b":12a\r\n", |e| matches!(e, RespError::BadNumber(_))),
            (b":+1\r\n", |e| matches!(e, RespError::BadNumber(_))),
            (b":\r\n", |e| matches!(e, RespError::BadNumber(_))),
            (b":99999999999999999999\r\n", |e| {
                matches!(e, RespError::BadNumber(_))
            }),
            (b"$-2\r\n", |e| matches!(e, RespError::NegativeLength(-2))),
            (b"$999999999999\r\n", |e| {
                matches!(e, RespError::BulkTooLarge(999_999_999_999))
            }),
            (b"$5\r\nab", |e| matches!(e, RespError::Closed)),
            (b"$2\r\nabcd\r\n", |e| matches!(e, RespError::BadTerminator)),
        ];
        for (bytes, expected) in cases {
            let err = reply(bytes).await.unwrap_err();
            assert!(
                expected(&err),
                "{:?}: got {err:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test]
    async fn bounds_line_length() {
        let mut long = vec![b'+'];
        long.extend(std::iter::repeat_n(b'a', MAX_LINE - 1));
        long.extend_from_slice(b"\r\n");
        assert!(
            reply(&long).await.is_ok(),
            "a line of exactly MAX_LINE bytes"
        );
        let mut longer = vec![b'+'];
        longer.extend(std::iter::repeat_n(b'a', 100_000));
        assert!(matches!(reply(&longer).await, Err(RespError::LineTooLong)));
    }

    #[tokio::test]
    async fn bounds_bulk_length() {
        let mut at_limit = format!("${MAX_BULK}\r\n").into_bytes();
        at_limit.extend(std::iter::repeat_n(b'x', MAX_BULK));
        at_limit.extend_from_slice(b"\r\n");
        assert!(matches!(reply(&at_limit).await, Ok(Reply::Bulk(b)) if b.len() == MAX_BULK));
        let over = format!("${}\r\n", MAX_BULK + 1).into_bytes();
        assert!(matches!(
            reply(&over).await,
            Err(RespError::BulkTooLarge(_))
        ));
    }

    #[tokio::test]
    async fn command_round_trip() {
        let mut buf = Vec::new();
        write_command(&mut buf, &[b"AUTH", b"s3cr\r\net"]);
        write_command(&mut buf, &[b"INFO", b"persistence"]);
        assert!(buf.starts_with(b"*2\r\n$4\r\nAUTH\r\n$8\r\ns3cr\r\net\r\n"));
        let mut r = &buf[..];
        assert_eq!(
            read_command(&mut r).await.unwrap().unwrap(),
            vec![b"AUTH".to_vec(), b"s3cr\r\net".to_vec()]
        );
        assert_eq!(
            read_command(&mut r).await.unwrap().unwrap(),
            vec![b"INFO".to_vec(), b"persistence".to_vec()]
        );
        assert!(read_command(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_bad_commands() {
        for bytes in [
            &b"PING\r\n"[..],
            b"*0\r\n",
            b"*17\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n$-1\r\n",
            b"*2\r\n$4\r\nPING\r\n",
        ] {
            let mut r = bytes;
            assert!(read_command(&mut r).await.is_err(), "{bytes:?}");
        }
    }

    /// Arbitrary bytes never panic the reader and never make it allocate
    /// more than the bounds allow (a fuzz target in miniature).
    #[tokio::test]
    async fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"+-:$*\r\n0123456789-abcLOADING";
        for _ in 0..5000 {
            let len = (next() % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let v = next();
                    if v % 4 == 0 {
                        v as u8
                    } else {
                        alphabet[(v >> 8) as usize % alphabet.len()]
                    }
                })
                .collect();
            let mut r = &bytes[..];
            while read_reply(&mut r).await.is_ok() {}
            let mut r = &bytes[..];
            while let Ok(Some(_)) = read_command(&mut r).await {}
        }
    }

    #[test]
    fn printable_replaces_control_characters_and_cuts() {
        assert_eq!(printable("a\u{1b}[31mb", 10), "a?[31mb");
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable("abc", 3), "abc");
    }
}
