//! The checker against a real `redis-server` (Debian's, the same protocol
//! and INFO fields as KeyDB) started by each test on 127.0.0.1 and a free
//! port, killed by a drop guard. Covers what the fake cannot prove: that
//! the fields are read as a real server writes them, while it really
//! loads, really syncs, really requires a password.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{
    resp::{self, Reply},
    *,
};

const TIMEOUT: Duration = Duration::from_secs(1);
/// How long a test waits for a state that must come.
const DEADLINE: Duration = Duration::from_secs(30);

/// A `redis-server` child process with its own directory; killed and
/// cleaned up on drop.
struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A directory of its own under the system temp directory.
fn fresh_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "balancer-health-redis-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl RedisServer {
    /// Starts a server in a fresh directory.
    fn start(extra: &[&str]) -> RedisServer {
        RedisServer::start_in(fresh_dir(), extra)
    }

    /// Starts a server whose working directory (RDB location) is `dir`,
    /// and waits until its port accepts connections.
    fn start_in(dir: PathBuf, extra: &[&str]) -> RedisServer {
        // The port is free when chosen but could be taken before the
        // server binds it: retry with another one if the server exits.
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = dir.join("redis.log");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(&log)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (Debian package redis-server)");
            let mut server = RedisServer {
                child,
                port,
                dir: dir.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect(server.addr()).is_ok() {
                    return server;
                }
                if server.child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not listen; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            // Exited: look at the next port (the directory is reused, so
            // keep it: disarm this guard's cleanup by taking the path out).
            server.dir = PathBuf::new();
        }
        panic!(
            "redis-server exited at every attempt; see {}",
            dir.display()
        );
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sends `commands` pipelined on one connection and returns the replies.
async fn send(addr: SocketAddr, commands: &[&[&[u8]]]) -> Vec<Reply> {
    let mut stream = BufReader::new(TcpStream::connect(addr).await.unwrap());
    let mut request = Vec::new();
    for command in commands {
        resp::write_command(&mut request, command);
    }
    stream.write_all(&request).await.unwrap();
    let mut replies = Vec::new();
    for _ in commands {
        replies.push(resp::read_reply(&mut stream).await.unwrap());
    }
    replies
}

fn ok() -> Reply {
    Reply::Simple("OK".into())
}

/// Writes `keys` keys and saves them to the server's RDB file.
async fn fill_and_save(addr: SocketAddr, keys: usize) {
    let names: Vec<String> = (0..keys).map(|i| format!("key:{i:06}")).collect();
    let sets: Vec<[&[u8]; 3]> = names
        .iter()
        .map(|k| [&b"SET"[..], k.as_bytes(), b"value"])
        .collect();
    let commands: Vec<&[&[u8]]> = sets.iter().map(|c| &c[..]).collect();
    assert!(send(addr, &commands).await.iter().all(|r| *r == ok()));
    assert_eq!(send(addr, &[&[b"SAVE"]]).await, [ok()]);
}

/// Checks `addr` until `done` holds for a probe; returns every probe seen,
/// the last one included. Fails after [`DEADLINE`].
async fn check_until(
    checker: &Checker,
    addr: SocketAddr,
    done: impl Fn(&Probe) -> bool,
) -> Vec<Probe> {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let probe = checker.check(addr).await;
        let finished = done(&probe);
        seen.push(probe);
        if finished {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached; last probes: {:?}",
            &seen[seen.len().saturating_sub(3)..]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn real_master_is_ready() {
    let redis = RedisServer::start(&[]);
    let probe = Checker::new(TIMEOUT, None).check(redis.addr()).await;
    assert!(probe.is_ready(), "{probe:?}");
    assert_eq!(probe.role, Some(Role::Master));
}

/// `REPLICAOF` towards a port that never answers: a replica whose link is
/// down. NOT READY, yet served when it is the only backend, and left out
/// when a ready one exists.
#[tokio::test]
async fn real_replica_with_link_down() {
    let redis = RedisServer::start(&[]);
    // Bound, never accepted: the replica's handshake never completes.
    let nobody = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = nobody.local_addr().unwrap().port().to_string();
    assert_eq!(
        send(
            redis.addr(),
            &[&[b"REPLICAOF", b"127.0.0.1", port.as_bytes()]]
        )
        .await,
        [ok()]
    );

    let checker = Checker::new(TIMEOUT, None);
    let probe = checker.check(redis.addr()).await;
    assert_eq!(
        probe.reason(),
        Some(&NotReady::ReplicaLinkDown {
            role: Role::Replica
        }),
        "{probe:?}"
    );
    assert_eq!(probe.badness(), Badness::ReplicaLinkDown);

    let alone = [Candidate {
        badness: probe.badness(),
        serving: true,
    }];
    assert_eq!(
        select_serving(&alone),
        [0],
        "the only node stays in service"
    );

    let master = fake::FakeKeydb::start(fake::Behaviour::master())
        .await
        .unwrap();
    let other = checker.check(master.addr()).await;
    let both = [
        alone[0],
        Candidate {
            badness: other.badness(),
            serving: true,
        },
    ];
    assert_eq!(select_serving(&both), [1], "a ready node takes over");

    assert_eq!(
        send(redis.addr(), &[&[b"REPLICAOF", b"NO", b"ONE"]]).await,
        [ok()]
    );
    assert!(checker.check(redis.addr()).await.is_ready());
}

#[tokio::test]
async fn real_auth() {
    let redis = RedisServer::start(&["--requirepass", "s3cret pass"]);
    let right = Checker::new(TIMEOUT, Some(Password::new("s3cret pass")));
    assert!(right.check(redis.addr()).await.is_ready());

    let wrong = Checker::new(TIMEOUT, Some(Password::new("guess")));
    let probe = wrong.check(redis.addr()).await;
    assert!(
        matches!(probe.reason(), Some(NotReady::AuthFailed { message }) if message.starts_with("WRONGPASS")),
        "{probe:?}"
    );

    let none = Checker::new(TIMEOUT, None);
    assert_eq!(
        none.check(redis.addr()).await.reason(),
        Some(&NotReady::AuthRequired)
    );
}

/// A server loading its dataset is not READY until the load ends. `key-load-delay` (µs per key) makes the load last about two
/// seconds; `loading-process-events-interval-bytes` makes the server
/// answer clients often during it.
#[tokio::test]
async fn real_loading_is_not_ready_until_loaded() {
    let dir = fresh_dir();
    let mut writer = RedisServer::start_in(dir.clone(), &[]);
    fill_and_save(writer.addr(), 2000).await;
    // Keep the directory (and the RDB in it) for the next server.
    writer.dir = PathBuf::new();
    drop(writer);
    let redis = RedisServer::start_in(
        dir,
        &[
            "--key-load-delay",
            "1000",
            "--loading-process-events-interval-bytes",
            "1024",
        ],
    );
    let checker = Checker::new(TIMEOUT, None);
    let probes = check_until(&checker, redis.addr(), Probe::is_ready).await;
    // Redis 7.0 answers even PING with -LOADING while it loads (KeyDB
    // answers +PONG: the fake plays that); either way, every probe before
    // the READY one says loading.
    assert!(probes.len() > 1, "never seen loading: {probes:?}");
    for probe in &probes[..probes.len() - 1] {
        assert!(
            probe.reason().is_some_and(NotReady::is_loading),
            "{probe:?}"
        );
    }
    let keys = send(redis.addr(), &[&[b"DBSIZE"]]).await;
    assert_eq!(keys, [Reply::Integer(2000)], "READY only once fully loaded");
}

/// A replica doing a full sync from a master whose RDB takes about two
/// seconds to produce (`rdb-key-save-delay`, disk-based sync): mid-sync is
/// seen and is NOT READY, then the replica becomes READY.
#[tokio::test]
async fn real_replica_mid_sync_then_ready() {
    let master =
        RedisServer::start(&["--repl-diskless-sync", "no", "--rdb-key-save-delay", "1000"]);
    fill_and_save(master.addr(), 2000).await;
    let replica = RedisServer::start(&[]);
    let port = master.port.to_string();
    assert_eq!(
        send(
            replica.addr(),
            &[&[b"REPLICAOF", b"127.0.0.1", port.as_bytes()]]
        )
        .await,
        [ok()]
    );
    let checker = Checker::new(TIMEOUT, None);
    let until_sync = check_until(&checker, replica.addr(), |p| {
        p.reason()
            == Some(&NotReady::ReplicaSyncing {
                role: Role::Replica,
            })
    })
    .await;
    assert!(
        until_sync.iter().all(|p| !p.is_ready()),
        "READY before the sync: {until_sync:?}"
    );
    let until_ready = check_until(&checker, replica.addr(), Probe::is_ready).await;
    assert_eq!(until_ready.last().unwrap().role, Some(Role::Replica));
    let keys = send(replica.addr(), &[&[b"DBSIZE"]]).await;
    assert_eq!(keys, [Reply::Integer(2000)]);
}
