//! Real KeyDB in the lab: an active-active pair (or trio) on the nodes,
//! each `replicaof` the others with `active-replica yes`, and what tests
//! read from it (INFO, links up, offsets).
//!
//! KeyDB is not a Debian package: `cargo xtask test` builds it from
//! `../shared/keydb/` and names the binary in `$BALANCER_KEYDB_SERVER`.
//! A test that needs it calls [`require_keydb`] first, which records a
//! skip (in the file `$BALANCER_TEST_SKIPS` names, which xtask counts)
//! when it cannot be found, so the test never passes silently.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{node_addr, node_keydb, on_path, Lab, KEYDB_PORT, POLL, VIP};
use crate::{netns::ChildGuard, resp};

/// How long a KeyDB may take to answer PING after starting.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of each INFO connection.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// The `keydb-server` to run: `$BALANCER_KEYDB_SERVER`, else one on PATH.
/// When there is none, prints "skipped: no KeyDB (<test>)", appends that
/// line to the file `$BALANCER_TEST_SKIPS` names (xtask counts them), and
/// returns `None`: the caller returns at once.
pub fn require_keydb(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BALANCER_KEYDB_SERVER").map(PathBuf::from) {
        assert!(
            path.is_file(),
            "BALANCER_KEYDB_SERVER={} is not a file",
            path.display()
        );
        return Some(path);
    }
    if on_path("keydb-server") {
        return Some(PathBuf::from("keydb-server"));
    }
    let line =
        format!("skipped: no KeyDB ({test}; set BALANCER_KEYDB_SERVER or run `cargo xtask test`)");
    println!("{line}");
    if let Some(file) = std::env::var_os("BALANCER_TEST_SKIPS") {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .expect("open $BALANCER_TEST_SKIPS");
        writeln!(f, "{line}").expect("write $BALANCER_TEST_SKIPS");
    }
    None
}

/// How one KeyDB of the lab is started.
#[derive(Debug, Clone)]
pub struct KeydbOptions {
    /// The `keydb-server` binary ([`require_keydb`]).
    pub server: PathBuf,
    /// The nodes it replicates from (`replicaof`), with
    /// `active-replica yes`; empty for a plain master.
    pub peers: Vec<usize>,
    /// Extra `directive value` lines for its config file, e.g.
    /// `key-load-delay 10` to make loading observable.
    pub extra: Vec<String>,
}

impl KeydbOptions {
    /// Node `index` of an active-active group of `nodes` nodes.
    pub fn active_active(server: PathBuf, index: usize, nodes: usize) -> Self {
        KeydbOptions {
            server,
            peers: (1..=nodes).filter(|&n| n != index).collect(),
            extra: Vec::new(),
        }
    }

    /// The config file's text for node `index`, data in `dir`.
    pub fn config(&self, index: usize, dir: &str) -> String {
        let mut c = String::new();
        let addr = node_addr(index);
        // The node's address (peers and agents) and the VIP (the data plane
        // passes a client's connection to the local backend unchanged, so
        // it arrives addressed to the VIP; see start_keydb for why the VIP
        // can be bound while another node holds it).
        let _ = writeln!(c, "bind {addr} {VIP}\nport {KEYDB_PORT}\nprotected-mode no");
        let _ = writeln!(c, "daemonize no\ndir {dir}\nsave \"\"\nappendonly no");
        if !self.peers.is_empty() {
            let _ = writeln!(c, "active-replica yes");
            if self.peers.len() > 1 {
                let _ = writeln!(c, "multi-master yes");
            }
            for &peer in &self.peers {
                let _ = writeln!(c, "replicaof {} {KEYDB_PORT}", node_addr(peer));
            }
        }
        for line in &self.extra {
            let _ = writeln!(c, "{line}");
        }
        c
    }
}

impl Lab {
    /// Starts real KeyDB on node `index` from an empty data directory
    /// (whatever an earlier run left there, e.g. the RDB of a full sync it
    /// served, is removed first: a restart starts empty), and waits until
    /// it answers PING on its node address.
    pub fn start_keydb(&mut self, index: usize, options: &KeydbOptions) -> Result<()> {
        let data_dir = self.dir().join(format!("n{index}-data"));
        let _ = fs::remove_dir_all(&data_dir);
        fs::create_dir_all(&data_dir)?;
        let conf = self.dir().join(format!("n{index}-keydb.conf"));
        fs::write(
            &conf,
            options.config(index, &data_dir.display().to_string()),
        )?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.server_log_path(index))?;
        // The VIP is on this node only while it is the VRRP master.
        self.node(index)
            .ns
            .sysctl("net.ipv4.ip_nonlocal_bind", "1")?;
        let server = options.server.display().to_string();
        let mut cmd = self.node(index).ns.command(&server);
        cmd.arg(&conf).stdout(log.try_clone()?).stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {server} on node {index}"))?;
        self.node_mut(index).server = Some(ChildGuard::new(child));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.keydb_ping(index) {
                return Ok(());
            }
            if let Some(status) = self
                .node_mut(index)
                .server
                .as_mut()
                .map(ChildGuard::try_wait)
                .transpose()?
                .flatten()
            {
                bail!(
                    "keydb-server on node {index} exited ({status}):\n{}",
                    self.server_log(index)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "keydb-server on node {index} did not answer PING within {START_TIMEOUT:?}:\n{}",
                    self.server_log(index)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts an active-active group on every node and waits until every
    /// replication link is up and no sync is under way.
    pub fn start_keydb_group(&mut self, server: &std::path::Path, timeout: Duration) -> Result<()> {
        let nodes = self.node_count();
        for index in 1..=nodes {
            let options = KeydbOptions::active_active(server.to_path_buf(), index, nodes);
            self.start_keydb(index, &options)?;
        }
        for index in 1..=nodes {
            self.wait_for_links_up(index, timeout)?;
        }
        Ok(())
    }

    fn keydb_ping(&self, index: usize) -> bool {
        let target = node_keydb(index);
        self.node(index)
            .ns
            .run_in(move || {
                resp::Connection::connect(target, Duration::from_millis(500))
                    .and_then(|mut c| c.ping())
                    .is_ok()
            })
            .unwrap_or(false)
    }

    /// Runs `args` on node `index`'s KeyDB (from its own namespace, so it
    /// works while the node is cut off the LAN) and returns the reply.
    pub fn keydb_command(&self, index: usize, args: &[&str]) -> Result<resp::Value> {
        let target = node_keydb(index);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.node(index).ns.run_in(move || -> Result<resp::Value> {
            let mut c = resp::Connection::connect(target, INFO_TIMEOUT)?;
            Ok(c.command(&args)?)
        })?
    }

    /// `INFO section` of node `index`'s KeyDB.
    pub fn keydb_info(&self, index: usize, section: &str) -> Result<String> {
        let reply = self.keydb_command(index, &["INFO", section])?;
        reply
            .as_text()
            .with_context(|| format!("INFO {section} of node {index}: {reply:?}"))
    }

    /// Waits until node `index`'s KeyDB reports `loading:0`, every
    /// `master*_link_status:up` and no `master*_sync_in_progress:1`.
    pub fn wait_for_links_up(&self, index: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let (Ok(p), Ok(r)) = (
                self.keydb_info(index, "persistence"),
                self.keydb_info(index, "replication"),
            ) {
                if links_up(&p, &r) {
                    return Ok(());
                }
                last = r;
            }
            if Instant::now() >= deadline {
                bail!("node {index}'s KeyDB links not up within {timeout:?}; last INFO replication:\n{last}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `key` reads `value` on node `index` (a write made on
    /// another node has replicated).
    pub fn wait_for_value(
        &self,
        index: usize,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(v) = self.keydb_command(index, &["GET", key]) {
                if v.as_text().as_deref() == Some(value) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("{key} did not read {value:?} on node {index} within {timeout:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Node `index`'s KeyDB address as the client sees it.
    pub fn keydb_addr(&self, index: usize) -> SocketAddr {
        node_keydb(index)
    }
}

/// `loading:0`, at least one link, every link up, none syncing.
pub fn links_up(persistence: &str, replication: &str) -> bool {
    let field = |text: &str, name: &str| resp::info_field(text, name).map(str::to_string);
    if field(persistence, "loading").as_deref() != Some("0") {
        return false;
    }
    let mut links = 0;
    for line in replication.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.starts_with("master_")
            && k.ends_with("link_status")
            && k != "master_global_link_status"
        {
            links += 1;
            if v != "up" {
                return false;
            }
        }
        if k.starts_with("master_") && k.ends_with("sync_in_progress") && v != "0" {
            return false;
        }
    }
    links > 0
}
