//! One KeyDB-aware health check of one backend: connect, optional `AUTH`,
//! `PING`, `INFO persistence`, `INFO replication`, and the verdict.
//!
//! KeyDB (like Redis) answers PING while it is still loading its dataset,
//! so PING alone would let clients reach a server that answers every
//! command with `-LOADING`. A backend is READY only when it answers +PONG,
//! reports `loading:0`, and is a master or a replica whose replication
//! link is up and not mid-sync (see [`super::info`]). Whether a replica
//! has also caught up with its peers needs their checks too: the monitor
//! applies that rule ([`super::catchup`]) to each probe.
//!
//! The four commands are pipelined in one write; their replies are read in
//! order and the first bad one decides. The whole check, connect included,
//! is bounded by one timeout. A fresh connection per check also proves the
//! server still accepts connections, and keeps the neighbour entry of the
//! backend fresh for the data plane's FIB lookups.
//!
//! Not here: scheduling checks, damping their results, choosing which
//! backends serve ([`super::damping`], [`super::policy`]).

use std::{
    fmt,
    future::Future,
    io::{self, Read},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{
    catchup::{self, Behind},
    config::HealthConfig,
    info::{self, LinkState, Replication, Role},
    policy::Badness,
    resp::{self, Reply, RespError},
};

/// Longest password accepted from a password file, bytes.
pub const MAX_PASSWORD_LEN: usize = 4096;

/// The step of a check that was under way when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Opening the TCP connection.
    Connect,
    /// Waiting for the reply to `AUTH`.
    Auth,
    /// Waiting for the reply to `PING`.
    Ping,
    /// Waiting for the reply to `INFO persistence`.
    InfoPersistence,
    /// Waiting for the reply to `INFO replication`.
    InfoReplication,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Auth => "AUTH",
            Stage::Ping => "PING",
            Stage::InfoPersistence => "INFO persistence",
            Stage::InfoReplication => "INFO replication",
        })
    }
}

/// Why a check did not find the backend READY. Texts that came from the
/// backend are made printable and cut short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The connection was refused: nothing listens on the port.
    #[error("connection refused")]
    Refused,
    /// The check did not finish within its timeout.
    #[error("no answer within {timeout:?} (at {stage})")]
    Timeout {
        /// What the check was waiting for.
        stage: Stage,
        /// The timeout.
        timeout: Duration,
    },
    /// A socket error other than a refused connection.
    #[error("socket error at {stage}: {message}")]
    Io {
        /// What the check was doing.
        stage: Stage,
        /// The error's kind.
        kind: io::ErrorKind,
        /// The error's text.
        message: String,
    },
    /// The backend closed the connection before answering.
    #[error("connection closed by the backend at {stage}")]
    Closed {
        /// What the check was waiting for.
        stage: Stage,
    },
    /// `AUTH` was answered with an error: wrong password, or none set.
    #[error("AUTH rejected: {message}")]
    AuthFailed {
        /// The backend's error text.
        message: String,
    },
    /// The backend wants a password and none is configured (`-NOAUTH`).
    #[error("the backend requires a password (no password_file configured)")]
    AuthRequired,
    /// `-LOADING` error reply: the dataset is still being loaded.
    #[error("dataset loading (-LOADING reply to {stage})")]
    Loading {
        /// The command answered with `-LOADING`.
        stage: Stage,
    },
    /// `loading:1` in `INFO persistence`.
    #[error("dataset loading (loading:1)")]
    LoadingFlag,
    /// Any other error reply, e.g. `-BUSY`, `-MASTERDOWN`, or a renamed
    /// `INFO` command.
    #[error("error reply to {stage}: {message}")]
    ErrorReply {
        /// The command answered with the error.
        stage: Stage,
        /// The backend's error text.
        message: String,
    },
    /// A reply that is not what the command returns: wrong type, garbled
    /// or oversized RESP, an INFO text without the needed fields.
    #[error("unexpected reply to {stage}: {detail}")]
    BadReply {
        /// The command whose reply was bad.
        stage: Stage,
        /// What was wrong.
        detail: String,
    },
    /// A replica whose every replication link is down.
    #[error("{role} with its replication link down")]
    ReplicaLinkDown {
        /// `Replica` or `ActiveReplica`.
        role: Role,
    },
    /// A replica in the middle of a full synchronisation.
    #[error("{role} in the middle of a full sync")]
    ReplicaSyncing {
        /// `Replica` or `ActiveReplica`.
        role: Role,
    },
    /// Has not applied what its peer had written by the peer's last check
    /// (see [`super::catchup`]); set by the monitor, not by one check.
    #[error("catching up: {}", catching_up(*peer, *bytes, *why))]
    CatchingUp {
        /// The peer it is behind.
        peer: std::net::SocketAddrV4,
        /// Bytes of the peer's stream still to apply, when known.
        bytes: Option<u64>,
        /// Why, when the bytes are not known.
        why: Behind,
    },
}

fn catching_up(peer: std::net::SocketAddrV4, bytes: Option<u64>, why: Behind) -> String {
    match bytes {
        Some(n) => format!("{} behind {peer}", catchup::human_bytes(n)),
        None => format!("{why} ({peer})"),
    }
}

impl NotReady {
    /// Every [`NotReady::kind`], in a fixed order: the `reason` label of
    /// the health-check failure counters.
    pub const KINDS: [&'static str; 12] = [
        "refused",
        "timeout",
        "socket_error",
        "closed",
        "auth_failed",
        "auth_required",
        "loading",
        "error_reply",
        "bad_reply",
        "replica_link_down",
        "replica_syncing",
        "catching_up",
    ];

    /// A short, stable snake_case name of the reason, without the
    /// details (for metrics labels and counters).
    pub fn kind(&self) -> &'static str {
        match self {
            NotReady::Refused => "refused",
            NotReady::Timeout { .. } => "timeout",
            NotReady::Io { .. } => "socket_error",
            NotReady::Closed { .. } => "closed",
            NotReady::AuthFailed { .. } => "auth_failed",
            NotReady::AuthRequired => "auth_required",
            NotReady::Loading { .. } | NotReady::LoadingFlag => "loading",
            NotReady::ErrorReply { .. } => "error_reply",
            NotReady::BadReply { .. } => "bad_reply",
            NotReady::ReplicaLinkDown { .. } => "replica_link_down",
            NotReady::ReplicaSyncing { .. } => "replica_syncing",
            NotReady::CatchingUp { .. } => "catching_up",
        }
    }

    /// Position of [`NotReady::kind`] in [`NotReady::KINDS`].
    pub fn kind_index(&self) -> usize {
        let kind = self.kind();
        NotReady::KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(NotReady::KINDS.len() - 1)
    }

    /// The backend is loading its dataset (`-LOADING` or `loading:1`).
    pub fn is_loading(&self) -> bool {
        matches!(self, NotReady::Loading { .. } | NotReady::LoadingFlag)
    }

    /// How unfit this makes the backend, for [`super::select_serving`].
    pub fn badness(&self) -> Badness {
        match self {
            NotReady::ReplicaLinkDown { .. } => Badness::ReplicaLinkDown,
            NotReady::ReplicaSyncing { .. } => Badness::ReplicaSyncing,
            NotReady::Loading { .. } | NotReady::LoadingFlag => Badness::Loading,
            NotReady::CatchingUp { .. } => Badness::CatchingUp,
            _ => Badness::Unavailable,
        }
    }
}

/// The verdict of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// May take clients.
    Ready,
    /// May not (or only as a last resort; see [`NotReady::badness`]).
    NotReady(NotReady),
}

/// The result of one check of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// READY or why not.
    pub readiness: Readiness,
    /// The role the backend reported, when the check got that far.
    pub role: Option<Role>,
    /// How long the check took.
    pub elapsed: Duration,
    /// What `INFO replication` said, when the check got that far with
    /// `loading:0`: for the catch-up rule ([`super::catchup`]).
    pub info: Option<ProbeInfo>,
}

/// The replication state one check read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInfo {
    /// When the check started (before its connect).
    pub started: Instant,
    /// The parsed `INFO replication`.
    pub replication: Replication,
}

impl Probe {
    /// The check found the backend READY.
    pub fn is_ready(&self) -> bool {
        self.readiness == Readiness::Ready
    }

    /// Why the backend is not READY, if it is not.
    pub fn reason(&self) -> Option<&NotReady> {
        match &self.readiness {
            Readiness::Ready => None,
            Readiness::NotReady(reason) => Some(reason),
        }
    }

    /// How unfit the check found the backend; what
    /// [`super::BackendHealth::observe`] takes.
    pub fn badness(&self) -> Badness {
        self.reason().map_or(Badness::Ready, NotReady::badness)
    }
}

/// Something that checks one backend. The agent's scheduler is written
/// against this so that its tests can substitute scripted results.
pub trait HealthCheck: Send + Sync {
    /// Checks the backend at `backend`. Must return within the checker's
    /// own timeout; never fails otherwise (failures are probes too).
    fn check(&self, backend: SocketAddr) -> impl Future<Output = Probe> + Send;
}

/// The password sent with `AUTH`. Its `Debug` output is redacted, it has no
/// `Display`, and it is never logged.
#[derive(Clone)]
pub struct Password(Arc<[u8]>);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Why the password file could not be used. The messages name the file,
/// never its content.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Opening or reading the file failed.
    #[error("cannot read password file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file holds nothing but line ends.
    #[error("password file {} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_PASSWORD_LEN`] bytes.
    #[error("password file {} holds more than {MAX_PASSWORD_LEN} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

impl Password {
    /// A password from its bytes (tests, or a caller with its own source).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Password(bytes.into().into())
    }

    /// Reads the password from `path`: the whole file, without trailing CR
    /// and LF. Warns (without the password) when others may read the file.
    pub fn from_file(path: &Path) -> Result<Self, PasswordError> {
        let read = |source| PasswordError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        if let Ok(meta) = file.metadata() {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                    "password file is readable by group or others"
                );
            }
        }
        let mut bytes = Vec::new();
        file.take(MAX_PASSWORD_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() > MAX_PASSWORD_LEN {
            return Err(PasswordError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(PasswordError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Password::new(bytes))
    }

    fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// The KeyDB-aware checker. Cheap to clone; one serves every backend.
#[derive(Debug, Clone)]
pub struct Checker {
    timeout: Duration,
    password: Option<Password>,
}

impl Checker {
    /// A checker whose checks each end within `timeout`, sending `AUTH`
    /// with `password` when there is one.
    pub fn new(timeout: Duration, password: Option<Password>) -> Self {
        Checker { timeout, password }
    }

    /// A checker for a validated config; reads the password file.
    pub fn from_config(config: &HealthConfig) -> Result<Self, PasswordError> {
        let password = config
            .password_file
            .as_deref()
            .map(Password::from_file)
            .transpose()?;
        Ok(Checker::new(config.timeout(), password))
    }

    /// The timeout of one check.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Checks the backend at `backend`; returns within the timeout (plus
    /// scheduling delay).
    pub async fn check(&self, backend: SocketAddr) -> Probe {
        let started = Instant::now();
        let mut stage = Stage::Connect;
        let mut replication = None;
        let outcome = tokio::time::timeout(
            self.timeout,
            self.exchange(backend, &mut stage, &mut replication),
        )
        .await;
        let outcome = outcome.unwrap_or(Err(NotReady::Timeout {
            stage,
            timeout: self.timeout,
        }));
        let (readiness, role) = match outcome {
            Ok(role) => (Readiness::Ready, Some(role)),
            Err(reason) => {
                let role = match reason {
                    NotReady::ReplicaLinkDown { role } | NotReady::ReplicaSyncing { role } => {
                        Some(role)
                    }
                    _ => None,
                };
                (Readiness::NotReady(reason), role)
            }
        };
        let probe = Probe {
            readiness,
            role,
            elapsed: started.elapsed(),
            info: replication.map(|replication| ProbeInfo {
                started,
                replication,
            }),
        };
        tracing::trace!(%backend, ?probe, "health check");
        probe
    }

    /// The check without its timeout; keeps `stage` current so that a
    /// timeout can say what it interrupted.
    /// `replication_out` gets what `INFO replication` said, when it was
    /// read.
    async fn exchange(
        &self,
        backend: SocketAddr,
        stage: &mut Stage,
        replication_out: &mut Option<Replication>,
    ) -> Result<Role, NotReady> {
        *stage = Stage::Connect;
        let stream = TcpStream::connect(backend).await.map_err(|e| {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                NotReady::Refused
            } else {
                io_error(Stage::Connect, &e)
            }
        })?;
        // Best effort: the commands go out in one write anyway.
        let _ = stream.set_nodelay(true);
        let mut stream = BufReader::new(stream);

        let mut request = Vec::with_capacity(128);
        if let Some(password) = &self.password {
            resp::write_command(&mut request, &[b"AUTH", password.expose()]);
        }
        resp::write_command(&mut request, &[b"PING"]);
        resp::write_command(&mut request, &[b"INFO", b"persistence"]);
        resp::write_command(&mut request, &[b"INFO", b"replication"]);
        *stage = if self.password.is_some() {
            Stage::Auth
        } else {
            Stage::Ping
        };
        let written = stream.write_all(&request).await;
        // The request holds the password: do not keep it around.
        request.fill(0);
        written.map_err(|e| io_error(*stage, &e))?;

        if self.password.is_some() {
            match read(&mut stream, Stage::Auth).await? {
                Reply::Simple(s) if s == "OK" => {}
                Reply::Error(e) if is_loading(&e) => {
                    return Err(NotReady::Loading { stage: Stage::Auth })
                }
                Reply::Error(e) => {
                    return Err(NotReady::AuthFailed {
                        message: resp::printable(&e, 200),
                    })
                }
                other => return Err(bad_reply(Stage::Auth, &other)),
            }
        }

        *stage = Stage::Ping;
        match read(&mut stream, Stage::Ping).await? {
            Reply::Simple(s) if s == "PONG" => {}
            Reply::Error(e) => return Err(error_reply(Stage::Ping, &e)),
            other => return Err(bad_reply(Stage::Ping, &other)),
        }

        *stage = Stage::InfoPersistence;
        let text = read_info(&mut stream, Stage::InfoPersistence).await?;
        let persistence = info::parse_persistence(&text).map_err(|e| NotReady::BadReply {
            stage: Stage::InfoPersistence,
            detail: e.to_string(),
        })?;
        if persistence.loading {
            return Err(NotReady::LoadingFlag);
        }

        *stage = Stage::InfoReplication;
        let text = read_info(&mut stream, Stage::InfoReplication).await?;
        let replication = info::parse_replication(&text).map_err(|e| NotReady::BadReply {
            stage: Stage::InfoReplication,
            detail: e.to_string(),
        })?;
        let role = replication.role;
        let state = replication.link_state();
        *replication_out = Some(replication);
        match state {
            LinkState::InSync => Ok(role),
            LinkState::Down => Err(NotReady::ReplicaLinkDown { role }),
            LinkState::Syncing => Err(NotReady::ReplicaSyncing { role }),
        }
    }
}

impl HealthCheck for Checker {
    fn check(&self, backend: SocketAddr) -> impl Future<Output = Probe> + Send {
        Checker::check(self, backend)
    }
}

/// Reads one reply, turning transport and protocol failures into verdicts.
async fn read(stream: &mut BufReader<TcpStream>, stage: Stage) -> Result<Reply, NotReady> {
    resp::read_reply(stream).await.map_err(|e| match e {
        RespError::Closed => NotReady::Closed { stage },
        RespError::Io(e) => io_error(stage, &e),
        other => NotReady::BadReply {
            stage,
            detail: other.to_string(),
        },
    })
}

/// Reads the bulk string an `INFO` returns.
async fn read_info(stream: &mut BufReader<TcpStream>, stage: Stage) -> Result<Vec<u8>, NotReady> {
    match read(stream, stage).await? {
        Reply::Bulk(text) => Ok(text),
        Reply::Error(e) => Err(error_reply(stage, &e)),
        other => Err(bad_reply(stage, &other)),
    }
}

fn is_loading(error: &str) -> bool {
    error.starts_with("LOADING")
}

/// The verdict for an error reply to PING or INFO.
fn error_reply(stage: Stage, error: &str) -> NotReady {
    if is_loading(error) {
        NotReady::Loading { stage }
    } else if error.starts_with("NOAUTH") {
        NotReady::AuthRequired
    } else {
        NotReady::ErrorReply {
            stage,
            message: resp::printable(error, 200),
        }
    }
}

fn bad_reply(stage: Stage, reply: &Reply) -> NotReady {
    NotReady::BadReply {
        stage,
        detail: format!("got {}", reply.describe()),
    }
}

fn io_error(stage: Stage, e: &io::Error) -> NotReady {
    NotReady::Io {
        stage,
        kind: e.kind(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file under the system temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn with(name: &str, content: &[u8], mode: u32) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("balancer-health-{}-{name}", std::process::id()));
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn every_reason_has_a_listed_kind() {
        let stage = Stage::Ping;
        let all = [
            NotReady::Refused,
            NotReady::Timeout {
                stage,
                timeout: Duration::from_millis(100),
            },
            NotReady::Io {
                stage,
                kind: io::ErrorKind::ConnectionReset,
                message: "reset".into(),
            },
            NotReady::Closed { stage },
            NotReady::AuthFailed {
                message: "WRONGPASS".into(),
            },
            NotReady::AuthRequired,
            NotReady::Loading { stage },
            NotReady::LoadingFlag,
            NotReady::ErrorReply {
                stage,
                message: "BUSY".into(),
            },
            NotReady::BadReply {
                stage,
                detail: "got an integer".into(),
            },
            NotReady::ReplicaLinkDown {
                role: Role::ActiveReplica,
            },
            NotReady::ReplicaSyncing {
                role: Role::Replica,
            },
            NotReady::CatchingUp {
                peer: "198.18.0.2:6380".parse().unwrap(),
                bytes: None,
                why: Behind::LinkNotUp,
            },
        ];
        for reason in &all {
            assert_eq!(
                NotReady::KINDS[reason.kind_index()],
                reason.kind(),
                "{reason}"
            );
        }
        let mut kinds: Vec<&str> = all.iter().map(NotReady::kind).collect();
        kinds.dedup();
        assert_eq!(kinds, NotReady::KINDS, "each kind listed once, in order");
    }

    #[test]
    fn password_from_file_strips_line_ends_only() {
        let f = TempFile::with("pw-strip", b" s3cret pass\r\n\n", 0o600);
        assert_eq!(Password::from_file(&f.0).unwrap().expose(), b" s3cret pass");
    }

    #[test]
    fn password_file_errors_name_the_file_not_the_content() {
        let empty = TempFile::with("pw-empty", b"\n", 0o600);
        let err = Password::from_file(&empty.0).unwrap_err();
        assert!(matches!(err, PasswordError::Empty { .. }));
        assert!(err.to_string().contains(&*empty.0.to_string_lossy()));

        let big = TempFile::with("pw-big", &[b'x'; MAX_PASSWORD_LEN + 1], 0o600);
        assert!(matches!(
            Password::from_file(&big.0),
            Err(PasswordError::TooLarge { .. })
        ));
        let max = TempFile::with("pw-max", &[b'x'; MAX_PASSWORD_LEN], 0o600);
        assert!(Password::from_file(&max.0).is_ok());

        let missing = Path::new("/nonexistent/balancer/keydb.pass");
        let err = Password::from_file(missing).unwrap_err();
        assert!(matches!(err, PasswordError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/balancer/keydb.pass"));
    }

    #[test]
    fn password_never_shows_in_debug() {
        let f = TempFile::with("pw-debug", b"hunter2-secret\n", 0o644);
        let config = HealthConfig {
            password_file: Some(f.0.clone()),
            ..HealthConfig::default()
        };
        let checker = Checker::from_config(&config).unwrap();
        let debug = format!("{checker:?} {:?}", checker.password);
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }

    #[test]
    fn badness_of_each_reason() {
        let unavailable = [
            NotReady::Refused,
            NotReady::Timeout {
                stage: Stage::Ping,
                timeout: Duration::from_millis(1),
            },
            NotReady::Closed { stage: Stage::Ping },
            NotReady::AuthRequired,
        ];
        for reason in unavailable {
            assert_eq!(reason.badness(), Badness::Unavailable, "{reason}");
        }
        for reason in [
            NotReady::Loading {
                stage: Stage::InfoPersistence,
            },
            NotReady::LoadingFlag,
        ] {
            assert_eq!(reason.badness(), Badness::Loading, "{reason}");
        }
        let behind = NotReady::CatchingUp {
            peer: "198.18.0.12:6380".parse().unwrap(),
            bytes: Some(1_234_567),
            why: Behind::Offsets,
        };
        assert_eq!(behind.badness(), Badness::CatchingUp);
        assert_eq!(
            behind.to_string(),
            "catching up: 1.2 MB behind 198.18.0.12:6380"
        );
        assert_eq!(
            NotReady::ReplicaLinkDown {
                role: Role::ActiveReplica
            }
            .badness(),
            Badness::ReplicaLinkDown
        );
        assert_eq!(
            NotReady::ReplicaSyncing {
                role: Role::Replica
            }
            .badness(),
            Badness::ReplicaSyncing
        );
    }
}
