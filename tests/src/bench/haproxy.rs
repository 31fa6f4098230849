//! HAProxy as the keepalived + HAProxy setup our users start from runs it: a TCP proxy on the
//! VIP, round-robin over every KeyDB, each checked with PING. Config text,
//! and the process in a lab node's namespace.
//!
//! The seed stops before its HAProxy section, so the config follows the
//! usual KeyDB/Redis HAProxy recipe it points to: `mode tcp`, `balance
//! roundrobin`, `option tcp-check` sending PING and expecting +PONG (then
//! QUIT/+OK), HAProxy's default check timing (`inter 2s fall 3 rise 2`,
//! [`CheckTiming::default`]) or a tuned one for the failover comparison,
//! and HAProxy's default threading (one thread per CPU).
//!
//! With a stats socket configured, [`Haproxy::server_states`] reads each
//! server's check state (`show stat`), so a caller can wait until HAProxy
//! sees every backend UP instead of sleeping.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::SocketAddrV4,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    lab::{run_with_timeout, Node},
    netns::ChildGuard,
};

use super::cpu::ProcessCpu;

/// The health-check timing of every server line: `check inter I fall F
/// rise R`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTiming {
    /// As HAProxy writes it: "2s", "100ms".
    pub inter: String,
    pub fall: u32,
    pub rise: u32,
}

impl Default for CheckTiming {
    /// HAProxy's defaults, as the usual recipe leaves them: `inter 2s
    /// fall 3 rise 2`.
    fn default() -> Self {
        CheckTiming {
            inter: "2s".into(),
            fall: 3,
            rise: 2,
        }
    }
}

impl CheckTiming {
    /// Checks every 100 ms, `fall 3 rise 2` (the tuned failover setup).
    pub fn fast() -> Self {
        CheckTiming {
            inter: "100ms".into(),
            ..CheckTiming::default()
        }
    }
}

/// What the HAProxy config says.
#[derive(Clone, Debug)]
pub struct HaproxyConfig {
    pub bind: SocketAddrV4,
    pub backends: Vec<SocketAddrV4>,
    pub check: CheckTiming,
    /// `stats socket PATH` (read by [`Haproxy::server_states`]).
    pub stats_socket: Option<PathBuf>,
}

impl HaproxyConfig {
    pub fn to_config(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# HAProxy in front of the KeyDBs, as in the seed setup");
        let _ = writeln!(s, "global");
        let _ = writeln!(s, "    maxconn 4096");
        if let Some(sock) = &self.stats_socket {
            let _ = writeln!(s, "    stats socket {} mode 600 level user", sock.display());
        }
        let _ = writeln!(s, "\ndefaults");
        let _ = writeln!(s, "    mode tcp");
        let _ = writeln!(s, "    timeout connect 3s");
        let _ = writeln!(s, "    timeout client 30s");
        let _ = writeln!(s, "    timeout server 30s");
        let _ = writeln!(s, "\nfrontend keydb");
        let _ = writeln!(s, "    bind {}", self.bind);
        let _ = writeln!(s, "    default_backend {BACKEND_NAME}");
        let _ = writeln!(s, "\nbackend {BACKEND_NAME}");
        let _ = writeln!(s, "    balance roundrobin");
        let _ = writeln!(s, "    option tcp-check");
        let _ = writeln!(s, "    tcp-check connect");
        let _ = writeln!(s, "    tcp-check send PING\\r\\n");
        let _ = writeln!(s, "    tcp-check expect string +PONG");
        let _ = writeln!(s, "    tcp-check send QUIT\\r\\n");
        let _ = writeln!(s, "    tcp-check expect string +OK");
        for (i, b) in self.backends.iter().enumerate() {
            let _ = writeln!(
                s,
                "    server keydb{} {b} check inter {} fall {} rise {}",
                i + 1,
                self.check.inter,
                self.check.fall,
                self.check.rise
            );
        }
        s
    }
}

/// A running HAProxy (`haproxy -db`, one process) in a node's namespace;
/// killed when dropped.
pub struct Haproxy {
    child: ChildGuard,
    log: PathBuf,
    stats_socket: Option<PathBuf>,
}

/// One server of the backend as `show stat` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerState {
    /// `svname`: keydb1, keydb2, ...
    pub name: String,
    /// `status`: "UP", "DOWN", or a transition such as "UP 1/3" (going
    /// down) or "DOWN 1/2" (going up).
    pub status: String,
}

impl ServerState {
    /// Up and not on its way down.
    pub fn is_up(&self) -> bool {
        self.status == "UP"
    }
}

/// Parses `show stat` CSV: a `# pxname,svname,...,status,...` header, one
/// line per frontend, backend and server. Returns the servers (rows that
/// are neither FRONTEND nor BACKEND) of proxy `proxy`.
pub fn parse_show_stat(text: &str, proxy: &str) -> Result<Vec<ServerState>> {
    let mut lines = text.lines();
    let header = lines
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .with_context(|| format!("no `# pxname,...` header in show stat: {text:?}"))?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .with_context(|| format!("show stat has no column {name}"))
    };
    let (px, sv, st) = (col("pxname")?, col("svname")?, col("status")?);
    let mut servers = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let get = |i: usize| f.get(i).copied().unwrap_or("");
        if get(px) == proxy && !matches!(get(sv), "FRONTEND" | "BACKEND") {
            servers.push(ServerState {
                name: get(sv).to_string(),
                status: get(st).to_string(),
            });
        }
    }
    Ok(servers)
}

/// The backend's name in [`HaproxyConfig::to_config`].
pub const BACKEND_NAME: &str = "keydb_servers";

const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Haproxy {
    /// Writes the config under `dir`, checks it (`haproxy -c`) and starts
    /// HAProxy in `node`'s namespace. Readiness is the caller's to check
    /// (traffic through the bind address).
    /// `cpus`: run it under `taskset -c CPUS` (its default thread count
    /// follows the CPUs it may use).
    pub fn start(
        node: &Node,
        config: &HaproxyConfig,
        dir: &Path,
        cpus: Option<&str>,
    ) -> Result<Self> {
        let cfg = dir.join("haproxy.cfg");
        fs::write(&cfg, config.to_config()).with_context(|| format!("write {}", cfg.display()))?;
        let cfg_arg = cfg.display().to_string();
        let mut check = node.ns().command("haproxy");
        check.args(["-c", "-q", "-f", &cfg_arg]);
        run_with_timeout(&mut check, Duration::from_secs(10)).context("haproxy -c")?;
        let log = dir.join("haproxy.log");
        let out = fs::File::create(&log)?;
        // -db: foreground, no daemon; `ip netns exec` (and taskset) exec
        // it, so the child's pid is HAProxy's.
        let mut cmd = match cpus {
            Some(cpus) => {
                let mut c = node.ns().command("taskset");
                c.args(["-c", cpus, "haproxy"]);
                c
            }
            None => node.ns().command("haproxy"),
        };
        cmd.args(["-db", "-f", &cfg_arg])
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().context("start haproxy")?;
        Ok(Haproxy {
            child: ChildGuard::new(child),
            log,
            stats_socket: config.stats_socket.clone(),
        })
    }

    /// Each server's check state, read from the stats socket (`show
    /// stat`). Fails if the config has no stats socket or HAProxy does not
    /// answer within a second.
    pub fn server_states(&self) -> Result<Vec<ServerState>> {
        let path = self
            .stats_socket
            .as_ref()
            .context("this HAProxy has no stats socket")?;
        let mut sock =
            UnixStream::connect(path).with_context(|| format!("connect to {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        sock.set_write_timeout(Some(Duration::from_secs(1)))?;
        sock.write_all(b"show stat\n")?;
        let mut text = String::new();
        sock.read_to_string(&mut text)
            .with_context(|| format!("read show stat from {}", path.display()))?;
        parse_show_stat(&text, BACKEND_NAME)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log if HAProxy has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("haproxy exited ({status}):\n{}", self.log_text());
        }
        Ok(())
    }

    pub fn cpu(&self) -> Result<ProcessCpu> {
        ProcessCpu::of(self.pid())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (HAProxy's hard stop) and wait.
    pub fn stop(mut self) -> Result<()> {
        let started = Instant::now();
        self.child
            .stop_within(libc::SIGTERM, STOP_TIMEOUT)
            .with_context(|| format!("stop haproxy ({:?})", started.elapsed()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_tcp_roundrobin_with_ping_checks() {
        let mut c = HaproxyConfig {
            bind: "198.18.0.100:6380".parse().unwrap(),
            backends: vec![
                "198.18.0.1:6380".parse().unwrap(),
                "198.18.0.2:6380".parse().unwrap(),
            ],
            check: CheckTiming::default(),
            stats_socket: None,
        };
        let text = c.to_config();
        for needle in [
            "mode tcp",
            "bind 198.18.0.100:6380",
            "balance roundrobin",
            "option tcp-check",
            "tcp-check send PING\\r\\n",
            "tcp-check expect string +PONG",
            "server keydb1 198.18.0.1:6380 check inter 2s fall 3 rise 2",
            "server keydb2 198.18.0.2:6380 check",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("stats socket"), "{text}");
        c.check = CheckTiming::fast();
        c.stats_socket = Some("/tmp/x/haproxy.sock".into());
        let text = c.to_config();
        assert!(
            text.contains("server keydb2 198.18.0.2:6380 check inter 100ms fall 3 rise 2"),
            "{text}"
        );
        assert!(
            text.contains("stats socket /tmp/x/haproxy.sock mode 600 level user"),
            "{text}"
        );
    }

    #[test]
    fn show_stat_servers_and_their_states() {
        let text = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight\n\
keydb,FRONTEND,,,0,1,4096,3,0,0,0,0,0,,,,,OPEN,\n\
keydb_servers,keydb1,0,0,0,1,,2,0,0,,0,,0,0,0,0,UP,1\n\
keydb_servers,keydb2,0,0,0,1,,1,0,0,,0,,0,0,0,0,DOWN 1/2,1\n\
keydb_servers,BACKEND,0,0,0,1,410,3,0,0,0,0,,0,0,0,0,UP,2\n\n";
        let servers = parse_show_stat(text, BACKEND_NAME).unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].name, "keydb1");
        assert!(servers[0].is_up());
        assert_eq!(servers[1].status, "DOWN 1/2");
        assert!(!servers[1].is_up());
        let going_down = ServerState {
            name: "k".into(),
            status: "UP 1/3".into(),
        };
        assert!(!going_down.is_up());
        assert!(parse_show_stat("Unknown command\n", BACKEND_NAME).is_err());
    }
}
