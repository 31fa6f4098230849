//! A small blocking RESP2 client for the namespace tests and the demo: just
//! enough of the Redis protocol to send commands to KeyDB / redis-server
//! and read their replies, over a std `TcpStream` whose every operation has
//! a timeout.
//!
//! Not a general-purpose client: no pooling, no pub/sub, no RESP3. Replies
//! are parsed defensively (bounded sizes and nesting), so a misbehaving
//! peer gives an error, never a panic or an unbounded allocation.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use thiserror::Error;

/// Largest bulk string accepted in a reply (INFO is a few KiB).
const MAX_BULK_LEN: usize = 16 << 20;
/// Largest array accepted in a reply.
const MAX_ARRAY_LEN: usize = 1 << 16;
/// Deepest nesting of arrays accepted in a reply.
const MAX_DEPTH: usize = 8;
/// Longest status / error / integer line accepted in a reply.
const MAX_LINE_LEN: usize = 64 << 10;

/// Failures of a RESP exchange.
#[derive(Debug, Error)]
pub enum RespError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("i/o with the server: {0}")]
    Io(#[from] io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("malformed reply: {0}")]
    Protocol(String),
    #[error("server error reply: {0}")]
    Server(String),
    #[error("unexpected reply to {command}: {reply:?}")]
    Unexpected { command: String, reply: Value },
}

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Status(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$n ...`; `None` is the null bulk string `$-1`.
    Bulk(Option<Vec<u8>>),
    /// `*n ...`; `None` is the null array `*-1`.
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The payload of a bulk or status reply as text.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Status(s) => Some(s.clone()),
            Value::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply from `r`.
pub fn read_value<R: BufRead>(r: &mut R) -> Result<Value, RespError> {
    read_nested(r, 0)
}

fn read_nested<R: BufRead>(r: &mut R, depth: usize) -> Result<Value, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Protocol(format!(
            "arrays nested deeper than {MAX_DEPTH}"
        )));
    }
    let line = read_line(r)?;
    let (kind, rest) = match line.split_first() {
        Some((k, rest)) => (*k, rest),
        None => return Err(RespError::Protocol("empty line".into())),
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' => Ok(Value::Status(text())),
        b'-' => Ok(Value::Error(text())),
        b':' => Ok(Value::Int(parse_int(rest)?)),
        b'$' => {
            let len = parse_int(rest)?;
            if len < 0 {
                return Ok(Value::Bulk(None));
            }
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > MAX_BULK_LEN {
                return Err(RespError::Protocol(format!("bulk string of {len} bytes")));
            }
            let mut buf = vec![0u8; len + 2];
            read_exact(r, &mut buf)?;
            if &buf[len..] != b"\r\n" {
                return Err(RespError::Protocol("bulk string not ended by CRLF".into()));
            }
            buf.truncate(len);
            Ok(Value::Bulk(Some(buf)))
        }
        b'*' => {
            let n = parse_int(rest)?;
            if n < 0 {
                return Ok(Value::Array(None));
            }
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > MAX_ARRAY_LEN {
                return Err(RespError::Protocol(format!("array of {n} elements")));
            }
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_nested(r, depth + 1)?);
            }
            Ok(Value::Array(Some(items)))
        }
        other => Err(RespError::Protocol(format!(
            "unknown reply type byte 0x{other:02x}"
        ))),
    }
}

/// Reads up to CRLF (not included), bounded by [`MAX_LINE_LEN`].
fn read_line<R: BufRead>(r: &mut R) -> Result<Vec<u8>, RespError> {
    let mut line = Vec::new();
    loop {
        let available = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if available.is_empty() {
            return Err(RespError::Closed);
        }
        let (used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&available[..i]);
                (i + 1, true)
            }
            None => {
                line.extend_from_slice(available);
                (available.len(), false)
            }
        };
        r.consume(used);
        if line.len() > MAX_LINE_LEN {
            return Err(RespError::Protocol(format!(
                "line longer than {MAX_LINE_LEN} bytes"
            )));
        }
        if done {
            if line.pop() != Some(b'\r') {
                return Err(RespError::Protocol("line not ended by CRLF".into()));
            }
            return Ok(line);
        }
    }
}

fn read_exact<R: BufRead>(r: &mut R, buf: &mut [u8]) -> Result<(), RespError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => RespError::Closed,
        _ => RespError::Io(e),
    })
}

fn parse_int(digits: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            RespError::Protocol(format!(
                "not an integer: {:?}",
                String::from_utf8_lossy(digits)
            ))
        })
}

/// The value of `field` in an `INFO` reply (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == field).then(|| v.trim())
    })
}

/// A connection to a RESP server; every read and write has a timeout.
#[derive(Debug)]
pub struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    /// Connects within `timeout`; reads and writes then time out after
    /// `timeout` too.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, RespError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| RespError::Connect { addr, source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        Ok(Connection {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// This side's address (the client's source port is how the conntrack
    /// map knows the flow).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// Sends a command without waiting for its reply (pipelining).
    pub fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<(), RespError> {
        self.writer.write_all(&encode_command(args))?;
        Ok(())
    }

    /// Sends several commands in one write (pipelining).
    pub fn send_all(&mut self, encoded: &[u8]) -> Result<(), RespError> {
        self.writer.write_all(encoded)?;
        Ok(())
    }

    /// Reads the next reply.
    pub fn read_reply(&mut self) -> Result<Value, RespError> {
        read_value(&mut self.reader)
    }

    /// Sends a command and reads its reply; an error reply is an error.
    pub fn command<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Value, RespError> {
        self.send(args)?;
        match self.read_reply()? {
            Value::Error(e) => Err(RespError::Server(e)),
            v => Ok(v),
        }
    }

    /// `PING`, expecting `PONG`.
    pub fn ping(&mut self) -> Result<(), RespError> {
        match self.command(&["PING"])? {
            Value::Status(s) if s == "PONG" => Ok(()),
            reply => Err(RespError::Unexpected {
                command: "PING".into(),
                reply,
            }),
        }
    }

    /// `INFO section` as text.
    pub fn info(&mut self, section: &str) -> Result<String, RespError> {
        let reply = self.command(&["INFO", section])?;
        reply.as_text().ok_or(RespError::Unexpected {
            command: format!("INFO {section}"),
            reply,
        })
    }

    /// The server's `run_id` (from `INFO server`): tells servers apart.
    pub fn run_id(&mut self) -> Result<String, RespError> {
        let info = self.info("server")?;
        info_field(&info, "run_id")
            .map(str::to_string)
            .ok_or_else(|| RespError::Protocol("INFO server without run_id".into()))
    }

    /// `SET key value`, expecting `OK`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), RespError> {
        match self.command(&["SET", key, value])? {
            Value::Status(s) if s == "OK" => Ok(()),
            reply => Err(RespError::Unexpected {
                command: "SET".into(),
                reply,
            }),
        }
    }

    /// `GET key`; `None` when the key does not exist.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, RespError> {
        match self.command(&["GET", key])? {
            Value::Bulk(None) => Ok(None),
            v @ Value::Bulk(Some(_)) => Ok(v.as_text()),
            reply => Err(RespError::Unexpected {
                command: "GET".into(),
                reply,
            }),
        }
    }

    /// `INCR key`, returning the new value.
    pub fn incr(&mut self, key: &str) -> Result<i64, RespError> {
        match self.command(&["INCR", key])? {
            Value::Int(n) => Ok(n),
            reply => Err(RespError::Unexpected {
                command: "INCR".into(),
                reply,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Value, RespError> {
        read_value(&mut io::BufReader::new(bytes))
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        assert_eq!(
            encode_command(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn parses_every_reply_type() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), Value::Status("OK".into()));
        assert_eq!(
            parse(b"-ERR no\r\n").unwrap(),
            Value::Error("ERR no".into())
        );
        assert_eq!(parse(b":-12\r\n").unwrap(), Value::Int(-12));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Value::Bulk(None));
        assert_eq!(
            parse(b"$5\r\na\r\nbc\r\n").unwrap(),
            Value::Bulk(Some(b"a\r\nbc".to_vec()))
        );
        assert_eq!(
            parse(b"*2\r\n:1\r\n*-1\r\n").unwrap(),
            Value::Array(Some(vec![Value::Int(1), Value::Array(None)]))
        );
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        for bad in [
            &b""[..],
            b"\r\n",
            b"+OK\n",
            b"?x\r\n",
            b":abc\r\n",
            b"$3\r\nab",
            b"$3\r\nabcd\r\n",
            b"$99999999999\r\n",
            b"*99999999\r\n",
            b"$-99999999999999999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(
                parse(bad).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn finds_info_fields() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n";
        assert_eq!(info_field(info, "run_id"), Some("abc123"));
        assert_eq!(info_field(info, "run"), None);
    }
}
