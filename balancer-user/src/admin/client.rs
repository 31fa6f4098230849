//! The CLI's side of the admin socket (`balancer status`): connect, send
//! one request line, read the one-line JSON reply. Blocking, with a
//! deadline on every step, so a wedged agent cannot hang the command.

use std::{
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use socket2::{Domain, SockAddr, Socket, Type};

use super::{
    protocol::{self, Request},
    status::Status,
};

/// Default time the CLI waits for the agent: connect, request and reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply accepted (a status of 64 services × 16 backends is a few
/// hundred KiB).
pub const MAX_REPLY_LEN: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the path, or nothing listening on it (the OS error adds
    /// nothing for the operator, so it is not shown).
    #[error("no agent answers on {}: is `balancer run` running?", path.display())]
    NoAgent { path: PathBuf },
    #[error("permission denied on {}: the admin socket is root's (run as root)", path.display())]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent on {} did not answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("cannot talk to the agent on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent's reply is larger than {MAX_REPLY_LEN} bytes")]
    TooLarge,
    #[error("the agent's reply is not what this version of balancer understands")]
    BadReply(#[source] serde_json::Error),
    #[error("the agent answered with an error: {0}")]
    Agent(String),
}

/// Sends `request` to the agent at `path` and returns its reply line
/// (without the line end), which is JSON and not an error reply.
pub fn request(path: &Path, request: Request, timeout: Duration) -> Result<String, ClientError> {
    let io_error = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout {
                path: path.to_path_buf(),
                timeout,
            }
        } else {
            ClientError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut stream = connect(path, timeout)?;
    stream
        .write_all(format!("{}\n", request.line()).as_bytes())
        .map_err(io_error)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    stream
        .take(MAX_REPLY_LEN as u64 + 1)
        .read_to_end(&mut reply)
        .map_err(io_error)?;
    if reply.len() > MAX_REPLY_LEN {
        return Err(ClientError::TooLarge);
    }
    let text = String::from_utf8_lossy(&reply).trim_end().to_string();
    let value: serde_json::Value = serde_json::from_str(&text).map_err(ClientError::BadReply)?;
    if let Some(error) = protocol::reply_error(&value) {
        return Err(ClientError::Agent(error));
    }
    Ok(text)
}

/// The agent's status: the raw reply and the parsed document.
pub fn status(path: &Path, timeout: Duration) -> Result<(String, Status), ClientError> {
    let raw = request(path, Request::Status, timeout)?;
    let status = serde_json::from_str(&raw).map_err(ClientError::BadReply)?;
    Ok((raw, status))
}

/// Connects with `timeout` on the connect itself (a full backlog blocks a
/// unix connect) and on every read and write after it.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let fail = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NoAgent {
            path: path.to_path_buf(),
        },
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: path.to_path_buf(),
            source,
        },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            path: path.to_path_buf(),
            timeout,
        },
        _ => ClientError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(fail)?;
    socket.set_read_timeout(Some(timeout)).map_err(fail)?;
    // SO_SNDTIMEO also bounds a blocking unix connect.
    socket.set_write_timeout(Some(timeout)).map_err(fail)?;
    socket
        .connect(&SockAddr::unix(path).map_err(fail)?)
        .map_err(fail)?;
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_agent_is_named_clearly() {
        let path =
            std::env::temp_dir().join(format!("balancer-client-{}-none.sock", std::process::id()));
        let err = request(&path, Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ClientError::NoAgent { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "no agent answers on {}: is `balancer run` running?",
                path.display()
            )
        );
        // A socket file nobody listens on (a crashed agent's) reads the same.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(listener);
        let err = request(&path, Request::Status, Duration::from_secs(1)).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, ClientError::NoAgent { .. }), "{err}");
    }

    #[test]
    fn a_silent_agent_times_out() {
        let path = std::env::temp_dir().join(format!(
            "balancer-client-{}-silent.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = request(&path, Request::Ping, Duration::from_millis(200)).unwrap_err();
        drop(listener);
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    }
}
