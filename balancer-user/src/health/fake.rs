//! A fake KeyDB for tests: a TCP server that speaks real RESP
//! and answers `AUTH`, `PING` and `INFO` as scripted by a [`Behaviour`].
//!
//! It plays the states a real server is hard to hold still in: loading
//! (`+PONG` to PING but `-LOADING` to everything else, the acceptance case
//! of the health design), an active replica whose link is down or mid-sync,
//! a server that stalls, closes, or answers garbage. Public so that the
//! integration tests of other crates can put it behind a VIP too.
//!
//! Not a KeyDB: it stores nothing and knows no other command (they get
//! [`Behaviour::other`]). [`FakeKeydb::start`] listens on 127.0.0.1;
//! [`FakeKeydb::start_on`] on the address given (e.g. a test namespace's).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

use super::{
    info::{LinkState, Role},
    resp,
};

/// The error KeyDB answers while it loads its dataset.
pub const LOADING_ERROR: &str = "LOADING KeyDB is loading the dataset in memory";
/// The error answered to commands before a required `AUTH`.
pub const NOAUTH_ERROR: &str = "NOAUTH Authentication required.";
/// The error answered to `AUTH` with a wrong password.
pub const WRONGPASS_ERROR: &str = "WRONGPASS invalid username-password pair or user is disabled.";
/// The error answered to `AUTH` when no password is configured.
pub const NO_PASSWORD_ERROR: &str = "ERR AUTH <password> called without any password configured \
     for the default user. Are you sure your configuration is correct?";

/// How the server answers one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Writes these bytes as they are (valid RESP or not).
    Raw(Vec<u8>),
    /// Never answers; keeps the connection open until the client leaves.
    Stall,
    /// Closes the connection (a clean end of stream).
    Close,
    /// Writes these bytes, then closes the connection (a reply cut short).
    Partial(Vec<u8>),
}

impl Answer {
    /// `+text`.
    pub fn simple(text: &str) -> Answer {
        Answer::Raw(format!("+{text}\r\n").into_bytes())
    }

    /// `-text`.
    pub fn error(text: &str) -> Answer {
        Answer::Raw(format!("-{text}\r\n").into_bytes())
    }

    /// A bulk string holding `text`.
    pub fn bulk(text: &str) -> Answer {
        let mut raw = Vec::new();
        resp::write_bulk(&mut raw, text.as_bytes());
        Answer::Raw(raw)
    }
}

/// What the server does; read once per accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behaviour {
    /// The password `AUTH` must carry (as `AUTH pw` or `AUTH default pw`);
    /// until then every other command gets `-NOAUTH`. `None`: no password,
    /// and `AUTH` gets the error KeyDB gives in that case.
    pub password: Option<Vec<u8>>,
    /// The answer to `PING`.
    pub ping: Answer,
    /// The answer to `INFO persistence`.
    pub info_persistence: Answer,
    /// The answer to `INFO replication`.
    pub info_replication: Answer,
    /// The answer to anything else.
    pub other: Answer,
}

impl Behaviour {
    /// A READY master.
    pub fn master() -> Behaviour {
        Behaviour {
            password: None,
            ping: Answer::simple("PONG"),
            info_persistence: Answer::bulk(&persistence_text(false)),
            info_replication: Answer::bulk(&replication_text(Role::Master, LinkState::InSync)),
            other: Answer::error("ERR unknown command"),
        }
    }

    /// A replica (`Role::Replica` or `Role::ActiveReplica`) whose link is
    /// in `link` state; `LinkState::InSync` makes it READY.
    pub fn replica(role: Role, link: LinkState) -> Behaviour {
        Behaviour {
            info_replication: Answer::bulk(&replication_text(role, link)),
            ..Behaviour::master()
        }
    }

    /// Loading its dataset the way KeyDB shows it to clients: `+PONG` to
    /// PING, `-LOADING` to INFO and every other command.
    pub fn loading() -> Behaviour {
        let loading = Answer::error(LOADING_ERROR);
        Behaviour {
            password: None,
            ping: Answer::simple("PONG"),
            info_persistence: loading.clone(),
            info_replication: loading.clone(),
            other: loading,
        }
    }

    /// Loading, as `INFO persistence` reports it (`loading:1`) to a server
    /// that lets INFO through while loading (Redis does).
    pub fn loading_flag() -> Behaviour {
        Behaviour {
            info_persistence: Answer::bulk(&persistence_text(true)),
            ..Behaviour::master()
        }
    }

    /// Accepts connections and never answers anything.
    pub fn silent() -> Behaviour {
        Behaviour {
            password: None,
            ping: Answer::Stall,
            info_persistence: Answer::Stall,
            info_replication: Answer::Stall,
            other: Answer::Stall,
        }
    }

    /// This behaviour, behind a password.
    pub fn with_password(self, password: &[u8]) -> Behaviour {
        Behaviour {
            password: Some(password.to_vec()),
            ..self
        }
    }
}

/// The text of `INFO persistence` as KeyDB writes it (abridged).
pub fn persistence_text(loading: bool) -> String {
    let mut text = format!(
        "# Persistence\r\nloading:{}\r\nrdb_changes_since_last_save:0\r\n\
         rdb_bgsave_in_progress:0\r\nrdb_last_bgsave_status:ok\r\naof_enabled:0\r\n",
        u8::from(loading)
    );
    if loading {
        text.push_str("loading_start_time:1700000000\r\nloading_total_bytes:1048576\r\n");
    }
    text
}

/// The text of `INFO replication` as KeyDB 6.3 writes it (abridged) for
/// `role` with one master link in `link` state.
pub fn replication_text(role: Role, link: LinkState) -> String {
    let role_field = match role {
        Role::Master => "master",
        Role::Replica => "slave",
        Role::ActiveReplica => "active-replica",
    };
    let mut text = format!("# Replication\r\nrole:{role_field}\r\n");
    if role != Role::Master {
        let (up, syncing) = match link {
            LinkState::InSync => (true, false),
            LinkState::Down => (false, false),
            LinkState::Syncing => (false, true),
        };
        text.push_str(&format!(
            "master_global_link_status:{status}\r\nconnected_masters:{connected}\r\n\
             master_host:198.18.0.2\r\nmaster_port:6380\r\nmaster_link_status:{status}\r\n\
             master_last_io_seconds_ago:{io}\r\nmaster_sync_in_progress:{sync}\r\n\
             slave_read_repl_offset:1\r\nslave_repl_offset:1\r\n",
            status = if up { "up" } else { "down" },
            connected = u8::from(up),
            io = if up { 0 } else { -1 },
            sync = u8::from(syncing),
        ));
        if syncing {
            text.push_str("master_sync_total_bytes:1048576\r\nmaster_sync_read_bytes:4096\r\n");
        }
        if !up {
            text.push_str("master_link_down_since_seconds:5\r\n");
        }
        text.push_str("slave_priority:100\r\nslave_read_only:0\r\nreplica_announced:1\r\n");
    }
    text.push_str("connected_slaves:0\r\nmaster_failover_state:no-failover\r\n");
    text
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    accepted: AtomicUsize,
}

/// A running fake KeyDB. Dropping it stops the server and closes every
/// connection it holds.
pub struct FakeKeydb {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeKeydb {
    /// Starts a server on 127.0.0.1 and a free port.
    pub async fn start(behaviour: Behaviour) -> io::Result<FakeKeydb> {
        FakeKeydb::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), behaviour).await
    }

    /// Starts a server on `addr` (port 0 for a free one).
    pub async fn start_on(addr: SocketAddr, behaviour: Behaviour) -> io::Result<FakeKeydb> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            accepted: AtomicUsize::new(0),
        });
        let server = tokio::spawn(accept(listener, Arc::clone(&shared)));
        Ok(FakeKeydb {
            addr,
            shared,
            server,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes what connections accepted from now on see.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self
            .shared
            .behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = behaviour;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Stops the server and returns once its port is closed (dropping it
    /// stops it too, but the port may stay open until the runtime next
    /// runs the server's task).
    pub async fn stop(mut self) {
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

impl Drop for FakeKeydb {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task.
        self.server.abort();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                let behaviour = shared
                    .behaviour
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                connections.spawn(serve(stream, behaviour));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Answers the commands of one connection until it closes or a scripted
/// answer ends it.
async fn serve(stream: TcpStream, behaviour: Behaviour) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut authenticated = behaviour.password.is_none();
    loop {
        let Ok(Some(command)) = resp::read_command(&mut read).await else {
            return;
        };
        let name = command[0].to_ascii_uppercase();
        let answer = match name.as_slice() {
            b"AUTH" => match &behaviour.password {
                None => Answer::error(NO_PASSWORD_ERROR),
                Some(password) => {
                    let given = match command.as_slice() {
                        [_, pw] => Some(pw),
                        [_, user, pw] if user.as_slice() == b"default" => Some(pw),
                        _ => None,
                    };
                    if given == Some(password) {
                        authenticated = true;
                        Answer::simple("OK")
                    } else {
                        Answer::error(WRONGPASS_ERROR)
                    }
                }
            },
            _ if !authenticated => Answer::error(NOAUTH_ERROR),
            b"PING" => behaviour.ping.clone(),
            b"INFO" => match command.get(1).map(|s| s.to_ascii_lowercase()).as_deref() {
                Some(b"persistence") => behaviour.info_persistence.clone(),
                Some(b"replication") => behaviour.info_replication.clone(),
                _ => behaviour.other.clone(),
            },
            _ => behaviour.other.clone(),
        };
        match answer {
            Answer::Raw(bytes) => {
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::Stall => {
                drain(&mut read).await;
                return;
            }
            Answer::Close | Answer::Partial(_) => {
                if let Answer::Partial(bytes) = answer {
                    let _ = write.write_all(&bytes).await;
                }
                // FIN first, then wait for the client to leave: closing
                // with unread input would send an RST instead of the clean
                // end of stream this answer stands for.
                let _ = write.shutdown().await;
                drain(&mut read).await;
                return;
            }
        }
    }
}

/// Reads and discards until the client closes its side.
async fn drain(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) {
    let mut sink = [0; 1024];
    while let Ok(n) = read.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}
