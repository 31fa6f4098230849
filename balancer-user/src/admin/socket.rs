//! The admin unix socket: created at startup, served while the agent runs,
//! removed when it stops.
//!
//! [`AdminSocket::bind`]:
//! - creates the socket's directory with mode 0700 when it is missing
//!   (and removes it again on drop if it is then empty);
//! - finds an existing file at the path: a socket some live process
//!   accepts on is another agent (refused: [`SocketError::InUse`]), a
//!   socket nobody listens on is a dead agent's leftover (removed), and
//!   anything that is not a socket is left alone (refused);
//! - binds and sets mode 0600: only root reaches the agent. Each
//!   connection's peer is checked too (uid 0 or the agent's own).
//!
//! [`serve`] answers one request per connection ([`super::protocol`]),
//! bounded everywhere so a slow, stuck or hostile client costs the agent
//! one small task for a few seconds at most: at most
//! [`MAX_CONNECTIONS`] at a time (more are closed at once), the request
//! line within [`REQUEST_TIMEOUT`] and [`super::protocol::MAX_REQUEST_LEN`]
//! bytes, the reply within [`REPLY_TIMEOUT`].

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::{
    protocol::{self, Request, RequestError},
    StatusProvider,
};

/// Connections served at the same time; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The client must have sent its request line within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Collecting and writing the reply may take this long.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning about failed accepts this often.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another balancer agent answers on the admin socket {} \
         (stop it first, or give this one another [admin] socket)",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it ([admin] socket)", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot create the admin socket's directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot check whether an agent answers on {}", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale admin socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the admin socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restrict the admin socket {} to root (mode 0600)", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether a process accepts connections on the socket at `path`: `Ok(true)`
/// if one does (or its backlog is full), `Ok(false)` if nothing listens
/// (or the file is gone). Never blocks.
pub fn answers(path: &Path) -> io::Result<bool> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    let addr = SockAddr::unix(path)?;
    match socket.connect(&addr) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The socket file, removed on drop if it is still the one this agent
/// created (a successor's socket at the same path is left alone), and the
/// directory made for it, removed if empty.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket this agent bound.
    id: (u64, u64),
    created_dir: Option<PathBuf>,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.id => {
                match std::fs::remove_file(&self.path) {
                    Ok(()) => info!(path = %self.path.display(), "removed the admin socket"),
                    Err(error) => {
                        warn!(path = %self.path.display(), %error, "could not remove the admin socket")
                    }
                }
            }
            _ => {}
        }
        if let Some(dir) = &self.created_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The bound socket: its file guard and its listener.
#[derive(Debug)]
pub struct AdminSocket {
    pub file: SocketFile,
    pub listener: UnixListener,
}

impl AdminSocket {
    /// Creates the admin socket at `path` (see the module docs). Needs a
    /// tokio runtime.
    pub fn bind(path: &Path) -> Result<AdminSocket, SocketError> {
        let created_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| SocketError::CreateDir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                Some(dir.to_path_buf())
            }
            _ => None,
        };
        // From here on, a failure removes the directory made above.
        let mut guard = SocketFile {
            path: path.to_path_buf(),
            id: (u64::MAX, u64::MAX),
            created_dir,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(SocketError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => {
                let live = answers(path).map_err(|source| SocketError::Probe {
                    path: path.to_path_buf(),
                    source,
                })?;
                if live {
                    return Err(SocketError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                match std::fs::remove_file(path) {
                    Ok(()) => warn!(
                        path = %path.display(),
                        "removed the admin socket of an agent that did not stop cleanly"
                    ),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(SocketError::RemoveStale {
                            path: path.to_path_buf(),
                            source,
                        })
                    }
                }
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| SocketError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        guard.id = (meta.dev(), meta.ino());
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| SocketError::Permissions {
                path: path.to_path_buf(),
                source,
            },
        )?;
        Ok(AdminSocket {
            file: guard,
            listener,
        })
    }
}

/// Serves the admin socket until the task is aborted (which also ends
/// every connection it serves).
pub async fn serve<P: StatusProvider>(listener: UnixListener, provider: Arc<P>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match Arc::clone(&limit).try_acquire_owned() {
                    Ok(permit) => {
                        let provider = Arc::clone(&provider);
                        connections.spawn(async move {
                            handle(stream, &*provider).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        debug!(limit = MAX_CONNECTIONS, "admin socket busy; closed a connection");
                        let busy = protocol::error_reply("busy: too many admin connections");
                        let _ = stream.try_write(format!("{busy}\n").as_bytes());
                    }
                },
                Err(error) => {
                    if last_warning.is_none_or(|at| at.elapsed() >= ACCEPT_WARNING_INTERVAL) {
                        last_warning = Some(Instant::now());
                        warn!(%error, "cannot accept on the admin socket");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = joined {
                    if error.is_panic() {
                        warn!(%error, "an admin connection panicked");
                    }
                }
            }
        }
    }
}

/// Whether `stream`'s peer may use the socket: root, or the agent's own
/// user.
fn peer_allowed(stream: &UnixStream) -> bool {
    match stream.peer_cred() {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

/// One connection: read the request, answer it, close.
async fn handle<P: StatusProvider>(mut stream: UnixStream, provider: &P) {
    let reply =
        if !peer_allowed(&stream) {
            protocol::error_reply("permission denied: the admin socket is root's")
        } else {
            let request =
                match tokio::time::timeout(REQUEST_TIMEOUT, protocol::read_request(&mut stream))
                    .await
                {
                    Ok(Ok(line)) => protocol::parse(&line),
                    Ok(Err(error)) => Err(error),
                    Err(_) => Err(RequestError::Timeout(REQUEST_TIMEOUT)),
                };
            match request {
                Ok(request) => respond(request, provider).await,
                Err(error) => {
                    debug!(%error, "bad admin request");
                    protocol::error_reply(&error.to_string())
                }
            }
        };
    let written = tokio::time::timeout(REPLY_TIMEOUT, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(b"\n").await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "could not send the admin reply"),
        Err(_) => debug!(timeout = ?REPLY_TIMEOUT, "the admin client did not take the reply"),
    }
}

/// The reply line to `request`.
pub async fn respond<P: StatusProvider>(request: Request, provider: &P) -> String {
    respond_within(request, provider, REPLY_TIMEOUT).await
}

async fn respond_within<P: StatusProvider>(
    request: Request,
    provider: &P,
    timeout: Duration,
) -> String {
    match request {
        Request::Ping => protocol::pong_reply(),
        Request::Status => match tokio::time::timeout(timeout, provider.status()).await {
            Ok(Ok(status)) => serde_json::to_string(&status).unwrap_or_else(|error| {
                protocol::error_reply(&format!("cannot encode the status: {error}"))
            }),
            Ok(Err(error)) => protocol::error_reply(&crate::error_chain(&error)),
            Err(_) => {
                protocol::error_reply(&format!("the status was not ready within {timeout:?}"))
            }
        },
        Request::Drain(backend) | Request::Ready(backend) => {
            let drained = matches!(request, Request::Drain(_));
            match tokio::time::timeout(timeout, provider.set_drained(backend, drained)).await {
                Ok(Ok(message)) => protocol::ok_reply(&message),
                Ok(Err(message)) => protocol::error_reply(&message),
                Err(_) => protocol::error_reply(&format!(
                    "the health monitor did not answer within {timeout:?}"
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use crate::admin::{
        status::{tests::master_with_a_failed_backend, Status},
        StatusError, StatusProvider,
    };

    /// A fresh directory under the temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path =
                std::env::temp_dir().join(format!("balancer-admin-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Fixed;

    impl StatusProvider for Fixed {
        async fn status(&self) -> Result<Status, StatusError> {
            Ok(master_with_a_failed_backend())
        }
    }

    struct Stuck;

    impl StatusProvider for Stuck {
        async fn status(&self) -> Result<Status, StatusError> {
            std::future::pending().await
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn creates_the_directory_and_a_root_only_socket_and_removes_both() {
        let tmp = TempDir::new("create");
        let dir = tmp.0.join("run/balancer");
        let path = dir.join("balancer.sock");
        let socket = AdminSocket::bind(&path).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert!(answers(&path).unwrap());
        drop(socket);
        assert!(!path.exists(), "socket removed");
        assert!(!dir.exists(), "the directory it made removed");
        assert!(
            tmp.0.join("run").exists(),
            "only the leaf it made is removed"
        );
    }

    #[tokio::test]
    async fn a_live_agent_is_refused_a_stale_socket_replaced_a_file_kept() {
        let tmp = TempDir::new("probe");
        let path = tmp.0.join("balancer.sock");
        let first = AdminSocket::bind(&path).unwrap();
        let err = AdminSocket::bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
        assert!(
            err.to_string().contains("another balancer agent answers"),
            "{err}"
        );
        assert!(path.exists(), "the live agent's socket stays");

        // A crashed agent: the file stays, nobody listens.
        let AdminSocket { file, listener } = first;
        drop(listener);
        std::mem::forget(file);
        assert!(path.exists() && !answers(&path).unwrap());
        let second = AdminSocket::bind(&path).unwrap();
        assert!(answers(&path).unwrap());
        drop(second);

        let file = tmp.0.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let err = AdminSocket::bind(&file).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn a_successors_socket_is_not_removed() {
        let tmp = TempDir::new("successor");
        let path = tmp.0.join("balancer.sock");
        let old = AdminSocket::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let new = AdminSocket::bind(&path).unwrap();
        drop(old);
        assert!(path.exists() && answers(&path).unwrap());
        drop(new);
        assert!(!path.exists());
    }

    /// Sends `request` raw and returns the reply line, on a blocking thread.
    async fn exchange(path: &Path, request: Vec<u8>) -> String {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // The agent may close early on an oversized request (and the
            // kernel then reports a reset after the reply).
            let _ = s.write_all(&request);
            let _ = s.shutdown(std::net::Shutdown::Write);
            read_reply(&mut s)
        })
        .await
        .unwrap()
    }

    /// What the agent sent before closing (a reset after it is not an
    /// error here).
    fn read_reply(s: &mut std::os::unix::net::UnixStream) -> String {
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8(reply).unwrap()
    }

    fn error_of(reply: &str) -> String {
        assert!(
            reply.ends_with('\n') && reply.matches('\n').count() == 1,
            "{reply:?}"
        );
        let v: serde_json::Value = serde_json::from_str(reply).unwrap();
        protocol::reply_error(&v).unwrap_or_else(|| panic!("not an error: {reply}"))
    }

    #[tokio::test]
    async fn serves_status_and_answers_bad_requests_with_errors() {
        let tmp = TempDir::new("serve");
        let path = tmp.0.join("balancer.sock");
        let AdminSocket {
            file: _file,
            listener,
        } = AdminSocket::bind(&path).unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed)));

        let reply = exchange(&path, b"status\n".to_vec()).await;
        let status: Status = serde_json::from_str(&reply).unwrap();
        assert_eq!(status, master_with_a_failed_backend());
        let pong: serde_json::Value =
            serde_json::from_str(&exchange(&path, b"ping".to_vec()).await).unwrap();
        assert_eq!(pong["pong"], true);

        assert!(error_of(&exchange(&path, b"bogus\n".to_vec()).await).contains("unknown request"));
        assert!(error_of(&exchange(&path, b"\n".to_vec()).await).contains("empty request"));
        assert!(error_of(&exchange(&path, vec![0xff, b'\n']).await).contains("UTF-8"));
        let huge = vec![b's'; 1 << 20];
        assert!(error_of(&exchange(&path, huge).await).contains("longer than"));
        // A client that connects and says nothing is answered after the timeout.
        let started = Instant::now();
        let silent = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
                read_reply(&mut s)
            })
        };
        // Meanwhile others are served.
        assert!(exchange(&path, b"status\n".to_vec())
            .await
            .contains("\"master\""));
        let reply = silent.await.unwrap();
        assert!(error_of(&reply).contains("no complete request"), "{reply}");
        assert!(started.elapsed() >= REQUEST_TIMEOUT);
        assert!(!server.is_finished(), "the server keeps running");
        server.abort();
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_turned_away() {
        let tmp = TempDir::new("limit");
        let path = tmp.0.join("balancer.sock");
        let AdminSocket {
            file: _file,
            listener,
        } = AdminSocket::bind(&path).unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed)));
        // MAX_CONNECTIONS silent clients hold every slot.
        let holders: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        // Give the server time to accept them all: poll with a ping-free
        // probe until one more connection is turned away.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let reply = exchange(&path, b"ping\n".to_vec()).await;
            if reply.contains("busy") {
                break;
            }
            assert!(Instant::now() < deadline, "never busy: {reply}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(holders);
        // Slots free up once the held connections end.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if exchange(&path, b"ping\n".to_vec()).await.contains("pong") {
                break;
            }
            assert!(Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.abort();
    }

    #[tokio::test]
    async fn a_stuck_status_is_answered_with_an_error() {
        let reply = respond_within(Request::Status, &Stuck, Duration::from_millis(50)).await;
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert!(protocol::reply_error(&v)
            .unwrap()
            .contains("not ready within"));
    }
}
