//! The namespace lab: a client and 2–3 balancer nodes on one LAN, each in
//! its own network namespace, joined by a bridge in a "switch" namespace.
//!
//! ```text
//!   client 198.18.0.10 ─eth0══p-c─┐
//!   n1     198.18.0.1  ─eth0══p-n1┼─ br0   (switch namespace)
//!   n2     198.18.0.2  ─eth0══p-n2┘        VIP 198.18.0.100 (held by an agent)
//! ```
//!
//! The lab also runs what the tests need on the nodes: a KeyDB (or
//! redis-server) on port 6380, the `balancer` agent with a generated config
//! (static `[dataplane] active`, or `[vrrp]` + `[health]` for a cluster,
//! with a notify recorder whose log [`Lab::transitions`] reads), a real
//! keepalived ([`keepalived`]), or a fake KeyDB stuck loading ([`fake`]).
//! Each agent gets its own admin socket in the lab's directory and its
//! metrics endpoint on its node's lab address ([`Lab::balancer_status`],
//! [`Lab::scrape_metrics`]).
//! It pulls a node's cable ([`Lab::cut_link`]), tells who holds the VIP
//! ([`Lab::vip_holders`]), reads a node's SERVICES entry
//! ([`Lab::service_view`]), and runs a client writing through the VIP every
//! 2 ms ([`writer`]). Everything it creates (processes, namespaces, the
//! bpffs mount for the agents' pins, the XDP_PASS programs on the bridge
//! ports, its temp directory) is removed when the [`Lab`] drops, also when
//! a test panics.
//!
//! Addresses come only from 198.18.0.0/15 and no packet leaves the lab's
//! namespaces. It is a test fixture, not a deployment tool.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use balancer_common::{names, LAYOUT_VERSION};

use crate::{
    netns::{run, unique_prefix, ChildGuard, Netns},
    resp,
};

pub mod fake;
pub mod keepalived;
pub mod keydb;
pub mod writer;

pub use fake::LoadingKeydb;
pub use keepalived::KeepalivedConfig;
pub use keydb::{require_keydb, KeydbOptions};
pub use writer::{WriterConfig, WriterLoop, WriterReport};

/// The service's virtual IP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// Prefix length of the lab's LAN.
pub const LAN_PREFIX_LEN: u8 = 24;
/// The port KeyDB listens on, on every node, and the service port.
pub const KEYDB_PORT: u16 = 6380;
/// Name of the node-side interface in every member namespace.
pub const NODE_IFACE: &str = "eth0";
/// File the agent pins its XDP link to, last, once the data plane is ready.
pub const XDP_LINK_PIN: &str = "xdp_link";
/// The port of every agent's metrics endpoint, on its node's lab address.
pub const METRICS_PORT: u16 = 9638;

/// How long a KeyDB server may take to answer PING after starting.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent may take to pin its XDP link after starting.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to exit after SIGTERM.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a condition.
const POLL: Duration = Duration::from_millis(25);
/// Poll interval of the VIP holder checks (each runs `ip` once per node).
const HOLDER_POLL: Duration = Duration::from_millis(10);

/// Address of node `index` (1-based).
pub fn node_addr(index: usize) -> Ipv4Addr {
    assert!((1..=3).contains(&index), "the lab has nodes 1 to 3");
    Ipv4Addr::new(198, 18, 0, index as u8)
}

/// `node_addr(index):KEYDB_PORT`.
pub fn node_keydb(index: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(node_addr(index), KEYDB_PORT))
}

/// `VIP:KEYDB_PORT`.
pub fn vip_keydb() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, KEYDB_PORT))
}

/// The `balancer` binary: `$BALANCER_BIN`, else the workspace's
/// `target/debug/balancer`.
pub fn balancer_bin() -> PathBuf {
    match std::env::var_os("BALANCER_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_dir().join("target/debug/balancer"),
    }
}

/// The workspace root (this crate lives in `<workspace>/tests`).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// The KeyDB server program: `keydb-server` when installed, else
/// `redis-server` (same command line, same protocol).
pub fn keydb_server_program() -> &'static str {
    if on_path("keydb-server") {
        "keydb-server"
    } else {
        "redis-server"
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// What one agent is told in its config file.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `[dataplane] active`: this node holds the VIP (issue-2 static mode).
    /// `None` leaves the key out, as a config with `[vrrp]` must.
    pub active: Option<bool>,
    /// `[dataplane] xdp_mode`: "native", "generic" or "auto".
    pub xdp_mode: String,
    /// `[dataplane] conntrack_flows`.
    pub conntrack_flows: u32,
    /// The service's backends.
    pub backends: Vec<SocketAddrV4>,
    /// `[vrrp]`: the election decides who holds the VIP.
    pub vrrp: Option<VrrpSection>,
    /// `[health]`: the health monitor decides which backends serve.
    pub health: Option<HealthSection>,
    /// `[admin] socket`. [`Lab::start_agent`] fills in the node's own
    /// ([`Lab::admin_socket`]) when `None`: agents of one lab share a
    /// filesystem, so the default path would collide.
    pub admin_socket: Option<PathBuf>,
    /// `[admin] metrics_listen`. [`Lab::start_agent`] fills in the node's
    /// lab address ([`Lab::metrics_addr`]) when `None`.
    pub metrics_listen: Option<String>,
}

impl AgentConfig {
    /// Static mode: native XDP, a small conntrack table, every node of
    /// `lab` a backend, `active` as given, no election, no health checks.
    pub fn for_lab(lab: &Lab, active: bool) -> Self {
        AgentConfig {
            active: Some(active),
            xdp_mode: "native".into(),
            conntrack_flows: 16_384,
            backends: (1..=lab.node_count())
                .map(|i| SocketAddrV4::new(node_addr(i), KEYDB_PORT))
                .collect(),
            vrrp: None,
            health: None,
            admin_socket: None,
            metrics_listen: None,
        }
    }

    /// Cluster mode: as [`AgentConfig::for_lab`] but without `active`, with
    /// a `[vrrp]` section (VRID [`CLUSTER_VRID`], `priority`, every other
    /// key at its default) and a `[health]` section of defaults.
    pub fn for_cluster(lab: &Lab, priority: u8) -> Self {
        AgentConfig {
            active: None,
            vrrp: Some(VrrpSection::new(CLUSTER_VRID, priority)),
            health: Some(HealthSection::default()),
            ..AgentConfig::for_lab(lab, false)
        }
    }

    /// The TOML text for node `index` pinning under `pin_dir`.
    pub fn to_toml(&self, index: usize, pin_dir: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "[node]");
        let _ = writeln!(s, "interface = \"{NODE_IFACE}\"");
        let _ = writeln!(s, "address = \"{}\"", node_addr(index));
        let _ = writeln!(s, "\n[dataplane]");
        let _ = writeln!(s, "xdp_mode = \"{}\"", self.xdp_mode);
        if let Some(active) = self.active {
            let _ = writeln!(s, "active = {active}");
        }
        let _ = writeln!(s, "conntrack_flows = {}", self.conntrack_flows);
        let _ = writeln!(s, "pin_dir = \"{}\"", pin_dir.display());
        if let Some(vrrp) = &self.vrrp {
            vrrp.write_toml(&mut s);
        }
        if let Some(health) = &self.health {
            health.write_toml(&mut s);
        }
        let _ = writeln!(s, "\n[[service]]");
        let _ = writeln!(s, "vip = \"{VIP}\"");
        let _ = writeln!(s, "port = {KEYDB_PORT}");
        let backends: Vec<String> = self.backends.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(s, "backends = [{}]", backends.join(", "));
        if self.admin_socket.is_some() || self.metrics_listen.is_some() {
            let _ = writeln!(s, "\n[admin]");
            if let Some(socket) = &self.admin_socket {
                let _ = writeln!(s, "socket = {:?}", socket.display().to_string());
            }
            if let Some(listen) = &self.metrics_listen {
                let _ = writeln!(s, "metrics_listen = {listen:?}");
            }
        }
        s
    }
}

/// The VRRP router id the cluster tests use (the seed's `virtual_router_id`).
pub const CLUSTER_VRID: u8 = 101;

/// The agent's `[vrrp]` table. `None` fields are left out of the file, so
/// the agent's defaults apply.
#[derive(Clone, Debug, Default)]
pub struct VrrpSection {
    pub vrid: u8,
    pub priority: Option<u8>,
    /// 2 or 3.
    pub version: Option<u8>,
    pub advert_interval_ms: Option<u32>,
    pub preempt: Option<bool>,
    pub preempt_delay_ms: Option<u32>,
    /// VRRPv2 `auth_type PASS` password.
    pub auth_pass: Option<String>,
    /// "pseudo-header" or "rfc9568".
    pub v3_checksum: Option<String>,
    pub unicast_peers: Vec<Ipv4Addr>,
    pub garp_count: Option<u32>,
    pub garp_repeat_delay_ms: Option<u32>,
    /// The notify command. `None`: the lab's recorder, which appends each
    /// state change to a file [`Lab::transitions`] reads.
    pub notify: Option<PathBuf>,
    pub no_ready_backend_weight: Option<u8>,
}

impl VrrpSection {
    /// `vrid` and `priority`, everything else at the agent's defaults.
    pub fn new(vrid: u8, priority: u8) -> Self {
        VrrpSection {
            vrid,
            priority: Some(priority),
            ..VrrpSection::default()
        }
    }

    fn write_toml(&self, s: &mut String) {
        let _ = writeln!(s, "\n[vrrp]");
        let _ = writeln!(s, "vrid = {}", self.vrid);
        let mut opt = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                let _ = writeln!(s, "{key} = {v}");
            }
        };
        opt("priority", self.priority.map(|v| v.to_string()));
        opt("version", self.version.map(|v| v.to_string()));
        opt(
            "advert_interval_ms",
            self.advert_interval_ms.map(|v| v.to_string()),
        );
        opt("preempt", self.preempt.map(|v| v.to_string()));
        opt(
            "preempt_delay_ms",
            self.preempt_delay_ms.map(|v| v.to_string()),
        );
        opt(
            "auth_pass",
            self.auth_pass.as_ref().map(|v| format!("{v:?}")),
        );
        opt(
            "v3_checksum",
            self.v3_checksum.as_ref().map(|v| format!("{v:?}")),
        );
        opt("garp_count", self.garp_count.map(|v| v.to_string()));
        opt(
            "garp_repeat_delay_ms",
            self.garp_repeat_delay_ms.map(|v| v.to_string()),
        );
        opt(
            "notify",
            self.notify
                .as_ref()
                .map(|v| format!("{:?}", v.display().to_string())),
        );
        opt(
            "no_ready_backend_weight",
            self.no_ready_backend_weight.map(|v| v.to_string()),
        );
        if !self.unicast_peers.is_empty() {
            let peers: Vec<String> = self
                .unicast_peers
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect();
            let _ = writeln!(s, "unicast_peers = [{}]", peers.join(", "));
        }
    }
}

/// The agent's `[health]` table. `None` fields are left out (defaults:
/// interval 100 ms, timeout 100 ms, rise 2, fall 3, initial "first-check").
#[derive(Clone, Debug, Default)]
pub struct HealthSection {
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    /// "up", "down" or "first-check".
    pub initial: Option<String>,
}

impl HealthSection {
    fn write_toml(&self, s: &mut String) {
        let _ = writeln!(s, "\n[health]");
        let mut opt = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                let _ = writeln!(s, "{key} = {v}");
            }
        };
        opt("interval_ms", self.interval_ms.map(|v| v.to_string()));
        opt("timeout_ms", self.timeout_ms.map(|v| v.to_string()));
        opt("rise", self.rise.map(|v| v.to_string()));
        opt("fall", self.fall.map(|v| v.to_string()));
        opt("initial", self.initial.as_ref().map(|v| format!("{v:?}")));
    }

    /// How long after a backend stops answering it is out of service at
    /// the latest: `fall × interval + timeout` (the health design's bound).
    pub fn detection_bound(&self) -> Duration {
        let interval = self.interval_ms.unwrap_or(100);
        let timeout = self.timeout_ms.unwrap_or(100);
        let fall = u64::from(self.fall.unwrap_or(3));
        Duration::from_millis(fall * interval + timeout)
    }
}

/// One balancer node: its namespace and what runs in it.
#[derive(Debug)]
pub struct Node {
    // Processes first: fields drop in order, and the namespace goes last.
    agent: Option<ChildGuard>,
    keepalived: Option<ChildGuard>,
    server: Option<ChildGuard>,
    fake: Option<LoadingKeydb>,
    index: usize,
    pin_dir: PathBuf,
    ns: Netns,
}

impl Node {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn addr(&self) -> Ipv4Addr {
        node_addr(self.index)
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The agent's pin directory (on the lab's bpffs).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `<pin_dir>/v<LAYOUT_VERSION>`: where the agent pins maps and link.
    pub fn versioned_pin_dir(&self) -> PathBuf {
        self.pin_dir.join(format!("v{LAYOUT_VERSION}"))
    }

    fn name(&self) -> String {
        format!("n{}", self.index)
    }
}

/// One state change an agent reported through its notify command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// When the recorder ran (wall clock).
    pub at: std::time::SystemTime,
    /// "master", "backup", "fault" or "stopped".
    pub state: String,
    /// The VRID argument.
    pub vrid: Option<u8>,
}

/// A bpffs mounted outside /sys (which `ip netns exec` remounts), removed
/// on drop together with everything pinned in it.
#[derive(Debug)]
struct BpffsMount {
    dir: PathBuf,
    mounted: bool,
}

impl BpffsMount {
    fn mount(dir: PathBuf) -> Result<Self> {
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut guard = BpffsMount {
            dir,
            mounted: false,
        };
        nix::mount::mount(
            Some("bpf"),
            &guard.dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount bpffs on {}", guard.dir.display()))?;
        guard.mounted = true;
        Ok(guard)
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A directory removed with its contents on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn create(path: PathBuf) -> Result<Self> {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The whole lab. Fields are torn down in [`Drop`] in a fixed order:
/// agents (SIGTERM, so they detach and unpin), servers, the bridge-port XDP
/// programs, namespaces, the bpffs mount, the temp directory.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    nodes: Vec<Node>,
    client: Netns,
    switch: Netns,
    port_xdp: Option<Ebpf>,
    bpffs: BpffsMount,
    dir: TempDir,
}

impl Lab {
    /// Builds the topology for `node_count` nodes (2 or 3), namespaces named
    /// from `unique_prefix(tag)`.
    pub fn new(tag: &str, node_count: usize) -> Result<Self> {
        if !(2..=3).contains(&node_count) {
            bail!("a lab has 2 or 3 nodes, not {node_count}");
        }
        let prefix = unique_prefix(tag);
        // Built field by field: if a step fails, what exists so far is
        // dropped (and removed) on the way out.
        let dir = TempDir::create(std::env::temp_dir().join(format!("{prefix}-lab")))?;
        let bpffs = BpffsMount::mount(PathBuf::from(format!("/run/{prefix}-bpf")))?;
        let switch = Netns::create(&format!("{prefix}-sw"))?;
        switch.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        switch.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        // A switch forwards frames; it does not run them through IPv4 and
        // ARP netfilter hooks (br_netfilter's default in a new namespace).
        // Those hooks cost a header check, an skb extension and three hook
        // traversals per frame and per crossing of the bridge.
        for table in ["iptables", "ip6tables", "arptables"] {
            switch.sysctl(&format!("net.bridge.bridge-nf-call-{table}"), "0")?;
        }
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;

        let client = Netns::create(&format!("{prefix}-c"))?;
        join_lan(&switch, &client, "p-c", CLIENT_ADDR)?;
        let mut nodes = Vec::with_capacity(node_count);
        for index in 1..=node_count {
            let ns = Netns::create(&format!("{prefix}-n{index}"))?;
            let node = Node {
                index,
                pin_dir: bpffs.dir.join(format!("n{index}")),
                ns,
                server: None,
                agent: None,
                keepalived: None,
                fake: None,
            };
            join_lan(
                &switch,
                &node.ns,
                &format!("p-{}", node.name()),
                node.addr(),
            )?;
            fs::create_dir_all(&node.pin_dir)
                .with_context(|| format!("create {}", node.pin_dir.display()))?;
            nodes.push(node);
        }

        let mut lab = Lab {
            prefix,
            nodes,
            client,
            switch,
            port_xdp: None,
            bpffs,
            dir,
        };
        let mut ports = vec!["p-c".to_string()];
        ports.extend(lab.nodes.iter().map(|n| format!("p-{}", n.name())));
        lab.port_xdp = Some(attach_port_xdp(&lab.switch, ports)?);

        Ok(lab)
    }

    /// Detaches the XDP_PASS programs from the bridge ports (they are
    /// attached by [`Lab::new`]). For labs whose agents run in generic
    /// (skb) XDP mode only: generic XDP_TX hands the frame to the veth as
    /// an skb, which reaches the bridge without a program on the peer,
    /// while native XDP_TX from a node needs one (TOOLCHAIN.md). Without
    /// them every bridge port is a plain veth (no NAPI receive, no skb to
    /// xdp_buff conversion). Idempotent.
    pub fn detach_port_xdp(&mut self) {
        self.port_xdp = None;
    }

    /// The name prefix of every namespace of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn client(&self) -> &Netns {
        &self.client
    }

    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Node `index` (1-based).
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index - 1]
    }

    fn node_mut(&mut self, index: usize) -> &mut Node {
        &mut self.nodes[index - 1]
    }

    /// The lab's temp directory (configs, logs, server data).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Where the lab's bpffs is mounted.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs.dir
    }

    fn server_log_path(&self, index: usize) -> PathBuf {
        self.dir().join(format!("n{index}-keydb.log"))
    }

    fn agent_log_path(&self, index: usize) -> PathBuf {
        self.dir().join(format!("n{index}-agent.log"))
    }

    /// Path of node `index`'s agent config file.
    pub fn agent_config_path(&self, index: usize) -> PathBuf {
        self.dir().join(format!("n{index}-agent.toml"))
    }

    /// Node `index`'s admin socket, in a directory of the lab's temp
    /// directory that the agent creates.
    pub fn admin_socket(&self, index: usize) -> PathBuf {
        self.dir()
            .join(format!("n{index}-admin"))
            .join("balancer.sock")
    }

    /// Where node `index`'s metrics endpoint listens: its lab address.
    pub fn metrics_addr(&self, index: usize) -> SocketAddrV4 {
        SocketAddrV4::new(node_addr(index), METRICS_PORT)
    }

    /// `config` as node `index`'s agent gets it: the node's own admin
    /// socket and metrics address filled in where `config` leaves them
    /// open.
    pub fn agent_config(&self, index: usize, config: &AgentConfig) -> AgentConfig {
        let mut config = config.clone();
        config
            .admin_socket
            .get_or_insert_with(|| self.admin_socket(index));
        config
            .metrics_listen
            .get_or_insert_with(|| self.metrics_addr(index).to_string());
        config
    }

    /// Runs `balancer status --socket <node index's socket>` (with
    /// `--json` if asked) and returns what it printed.
    pub fn balancer_status(&self, index: usize, json: bool) -> Result<String> {
        let mut cmd = Command::new(balancer_bin());
        cmd.arg("status")
            .arg("--socket")
            .arg(self.admin_socket(index));
        if json {
            cmd.arg("--json");
        }
        run_with_timeout(&mut cmd, Duration::from_secs(15))
    }

    /// Node `index`'s status document, parsed (`balancer status --json`).
    pub fn status_json(&self, index: usize) -> Result<serde_json::Value> {
        let out = self.balancer_status(index, true)?;
        serde_json::from_str(&out)
            .with_context(|| format!("parse the status of node {index}: {out}"))
    }

    /// `GET /metrics` on node `index`'s endpoint, from the client's
    /// namespace: the HTTP status code and the body.
    pub fn scrape_metrics(&self, index: usize) -> Result<(u16, String)> {
        let addr = SocketAddr::V4(self.metrics_addr(index));
        self.in_client(move || http_get(addr, "/metrics", Duration::from_secs(5)))?
    }

    /// Runs `f` on a thread inside the client's namespace.
    pub fn in_client<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.client.run_in(f)
    }

    /// Starts KeyDB (or redis-server) on every node and waits until each
    /// answers PING.
    pub fn start_servers(&mut self) -> Result<()> {
        for index in 1..=self.node_count() {
            self.start_server(index)?;
        }
        Ok(())
    }

    /// Starts KeyDB (or redis-server) on node `index`, listening on
    /// 0.0.0.0:6380 without persistence, and waits until it answers PING
    /// from the client's namespace (so the LAN is proven too).
    pub fn start_server(&mut self, index: usize) -> Result<()> {
        let data_dir = self.dir().join(format!("n{index}-data"));
        fs::create_dir_all(&data_dir)?;
        let log = fs::File::create(self.server_log_path(index))?;
        let port = KEYDB_PORT.to_string();
        let data = data_dir.display().to_string();
        let program = keydb_server_program();
        let node = self.node(index);
        let mut cmd = node.ns.command(program);
        cmd.args([
            "--port",
            &port,
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &data,
        ])
        .stdout(log.try_clone()?)
        .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {program} on node {index}"))?;
        self.node_mut(index).server = Some(ChildGuard::new(child));

        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        let target = node_keydb(index);
        loop {
            let answered = self.client.run_in(move || {
                resp::Connection::connect(target, Duration::from_millis(500))
                    .and_then(|mut c| c.ping())
                    .is_ok()
            })?;
            if answered {
                return Ok(());
            }
            let exited = match self.node_mut(index).server.as_mut() {
                Some(server) => server.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                bail!(
                    "{program} on node {index} exited ({status}):\n{}",
                    self.server_log(index)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{program} on node {index} did not answer PING within {SERVER_START_TIMEOUT:?}:\n{}",
                    self.server_log(index)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Kills node `index`'s server (SIGKILL), as a crash would.
    pub fn kill_server(&mut self, index: usize) -> Result<()> {
        let mut server = self
            .node_mut(index)
            .server
            .take()
            .with_context(|| format!("no server runs on node {index}"))?;
        server.stop(libc::SIGKILL)?;
        Ok(())
    }

    /// Writes node `index`'s agent config, starts `balancer run` in its
    /// namespace and waits until the XDP link is pinned (the data plane is
    /// ready). Fails with the agent's log if it exits or times out.
    pub fn start_agent(&mut self, index: usize, config: &AgentConfig) -> Result<()> {
        self.start_agent_with_env(index, config, &[])
    }

    /// [`Lab::start_agent`] with extra environment variables for the agent
    /// (e.g. systemd's `NOTIFY_SOCKET`).
    pub fn start_agent_with_env(
        &mut self,
        index: usize,
        config: &AgentConfig,
        env: &[(&str, &str)],
    ) -> Result<()> {
        let mut config = self.agent_config(index, config);
        if let Some(vrrp) = config.vrrp.as_mut() {
            if vrrp.notify.is_none() {
                vrrp.notify = Some(self.write_notify_recorder(index)?);
            }
        }
        let node = self.node(index);
        let config_path = self.agent_config_path(index);
        fs::write(&config_path, config.to_toml(index, &node.pin_dir))
            .with_context(|| format!("write {}", config_path.display()))?;
        let bin = balancer_bin();
        if !bin.is_file() {
            bail!(
                "the agent binary {} does not exist: build it (`cargo build -p balancer-user`) or set BALANCER_BIN",
                bin.display()
            );
        }
        let log = fs::File::create(self.agent_log_path(index))?;
        // A crashed agent's link pin may still be there (the new agent
        // replaces it): only a pin with another inode is the new agent's.
        let link = node.versioned_pin_dir().join(XDP_LINK_PIN);
        let stale_link = fs::metadata(&link).ok().map(|m| m.ino());
        let mut cmd = node.ns.command(&bin.display().to_string());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} on node {index}", bin.display()))?;
        self.node_mut(index).agent = Some(ChildGuard::new(child));

        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if fs::metadata(&link).is_ok_and(|m| Some(m.ino()) != stale_link) {
                return Ok(());
            }
            let agent = self.node_mut(index).agent.as_mut().expect("just started");
            if let Some(status) = agent.try_wait()? {
                self.node_mut(index).agent = None;
                bail!(
                    "the agent on node {index} exited ({status}) before pinning {}:\n{}",
                    link.display(),
                    self.agent_log(index)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent on node {index} did not pin {} within {AGENT_START_TIMEOUT:?}:\n{}",
                    link.display(),
                    self.agent_log(index)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Writes node `index`'s notify recorder: a shell script appending
    /// `<unix time> <state> <vrid>` to the file [`Lab::transitions`] reads.
    fn write_notify_recorder(&self, index: usize) -> Result<PathBuf> {
        let script = self.dir().join(format!("n{index}-notify.sh"));
        let log = self.transitions_path(index);
        fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$(date +%s.%N) $*\" >> '{}'\n",
                log.display()
            ),
        )
        .with_context(|| format!("write {}", script.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
        Ok(script)
    }

    fn transitions_path(&self, index: usize) -> PathBuf {
        self.dir().join(format!("n{index}-transitions.log"))
    }

    /// The state changes node `index`'s agent reported through the lab's
    /// notify recorder so far, oldest first (the notify command is not
    /// awaited by the election, so order within a few milliseconds may
    /// be off).
    pub fn transitions(&self, index: usize) -> Vec<Transition> {
        let text = fs::read_to_string(self.transitions_path(index)).unwrap_or_default();
        let mut all: Vec<Transition> = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let at: f64 = words.next()?.parse().ok()?;
                let state = words.next()?.to_string();
                let vrid = words.next().and_then(|v| v.parse().ok());
                Some(Transition {
                    at: std::time::UNIX_EPOCH + Duration::from_secs_f64(at),
                    state,
                    vrid,
                })
            })
            .collect();
        all.sort_by_key(|t| t.at);
        all
    }

    /// How many times node `index`'s agent became master (per its notify
    /// recorder).
    pub fn master_transitions(&self, index: usize) -> usize {
        self.transitions(index)
            .iter()
            .filter(|t| t.state == "master")
            .count()
    }

    /// Sends SIGKILL to node `index`'s agent (a crash: nothing is cleaned
    /// up by the agent; the lab's teardown removes what it left).
    pub fn kill_agent(&mut self, index: usize) -> Result<()> {
        let mut agent = self
            .node_mut(index)
            .agent
            .take()
            .with_context(|| format!("no agent runs on node {index}"))?;
        agent.stop(libc::SIGKILL)?;
        Ok(())
    }

    /// The pid of node `index`'s agent.
    pub fn agent_pid(&self, index: usize) -> Option<u32> {
        self.node(index).agent.as_ref().map(|a| a.id())
    }

    /// Sends `signal` to node `index`'s KeyDB server without waiting
    /// (SIGSTOP freezes it: connections are accepted by the kernel but
    /// never answered; SIGCONT thaws it).
    pub fn signal_server(&mut self, index: usize, signal: i32) -> Result<()> {
        let server = self
            .node(index)
            .server
            .as_ref()
            .with_context(|| format!("no server runs on node {index}"))?;
        let pid = server.id();
        // SAFETY: a plain kill(2) of our own child.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        if signal == libc::SIGSTOP {
            // kill(2) returns before every thread has stopped; KeyDB's
            // threads can still answer a command sent right after it.
            wait_until_stopped(pid)?;
        }
        Ok(())
    }

    /// Starts a fake KeyDB that is still loading its dataset (`+PONG` to
    /// PING, `-LOADING` to everything else) on 0.0.0.0:6380 in node
    /// `index`'s namespace, instead of a real server.
    pub fn start_loading_fake(&mut self, index: usize) -> Result<&LoadingKeydb> {
        let fake = LoadingKeydb::start(self.node(index).ns())?;
        Ok(self.node_mut(index).fake.insert(fake))
    }

    /// The loading fake running on node `index`, if any.
    pub fn loading_fake(&self, index: usize) -> Option<&LoadingKeydb> {
        self.node(index).fake.as_ref()
    }

    /// Cuts node `index` off the LAN: its bridge port goes down (as if
    /// its cable were pulled; its own eth0 loses carrier).
    pub fn cut_link(&self, index: usize) -> Result<()> {
        self.switch
            .ip(&["link", "set", &format!("p-n{index}"), "down"])?;
        Ok(())
    }

    /// Brings node `index`'s bridge port back up.
    pub fn restore_link(&self, index: usize) -> Result<()> {
        self.switch
            .ip(&["link", "set", &format!("p-n{index}"), "up"])?;
        Ok(())
    }

    /// Whether node `index` has the VIP on its eth0.
    pub fn holds_vip(&self, index: usize) -> Result<bool> {
        let out = self
            .node(index)
            .ns
            .ip(&["-4", "-o", "addr", "show", "dev", NODE_IFACE])?;
        let needle = format!("inet {VIP}/");
        Ok(out.contains(&needle))
    }

    /// The nodes that have the VIP on their eth0, in index order.
    pub fn vip_holders(&self) -> Result<Vec<usize>> {
        let mut holders = Vec::new();
        for index in 1..=self.node_count() {
            if self.holds_vip(index)? {
                holders.push(index);
            }
        }
        Ok(holders)
    }

    /// The node holding the VIP when exactly one does; `None` when none or
    /// several do.
    pub fn vip_holder(&self) -> Result<Option<usize>> {
        let holders = self.vip_holders()?;
        Ok((holders.len() == 1).then(|| holders[0]))
    }

    /// Polls until `check(holders)` is true; returns the holders then and
    /// when that was first seen. Fails with the agents' logs after
    /// `timeout`.
    pub fn wait_for_holders(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&[usize]) -> bool,
    ) -> Result<(Vec<usize>, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let holders = self.vip_holders()?;
            let seen = Instant::now();
            if check(&holders) {
                return Ok((holders, seen));
            }
            if seen >= deadline {
                bail!(
                    "{what}: not within {timeout:?} (VIP holders now: {holders:?})\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(HOLDER_POLL);
        }
    }

    /// Waits until exactly one node holds the VIP, then checks it stays
    /// that one node, alone, for `stable_for`. Returns the holder.
    pub fn wait_for_stable_holder(&self, timeout: Duration, stable_for: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        'outer: loop {
            let (holders, since) = self.wait_for_holders(
                "exactly one node holds the VIP",
                deadline.saturating_duration_since(Instant::now()),
                |h| h.len() == 1,
            )?;
            let holder = holders[0];
            while since.elapsed() < stable_for {
                std::thread::sleep(HOLDER_POLL);
                let now = self.vip_holders()?;
                if now != [holder] {
                    if Instant::now() >= deadline {
                        bail!(
                            "the VIP did not settle on one node within {timeout:?}: held by {holders:?}, then {now:?}\n{}",
                            self.diagnostics()
                        );
                    }
                    continue 'outer;
                }
            }
            return Ok(holder);
        }
    }

    /// Waits until `node` alone holds the VIP, then checks it stays so
    /// for `stable_for`. Returns when it was first seen alone.
    pub fn wait_for_sole_holder(
        &self,
        node: usize,
        timeout: Duration,
        stable_for: Duration,
    ) -> Result<Instant> {
        let (_, since) =
            self.wait_for_holders(&format!("node {node} alone holds the VIP"), timeout, |h| {
                h == [node]
            })?;
        self.expect_holders_for(&[node], stable_for)?;
        Ok(since)
    }

    /// Checks that the VIP holders stay exactly `expected` for `period`
    /// (polled); fails at the first change.
    pub fn expect_holders_for(&self, expected: &[usize], period: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let now = self.vip_holders()?;
            if now != expected {
                bail!(
                    "VIP holders changed from {expected:?} to {now:?} after {:?}\n{}",
                    start.elapsed(),
                    self.diagnostics()
                );
            }
            if start.elapsed() >= period {
                return Ok(());
            }
            std::thread::sleep(HOLDER_POLL);
        }
    }

    /// The last lines of every agent's and keepalived's log and every
    /// node's recorded transitions: what a failing cluster test prints.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for index in 1..=self.node_count() {
            let agent = self.agent_log_tail(index, 40);
            if !agent.is_empty() {
                let _ = writeln!(
                    out,
                    "--- agent log, node {index} (last 40 lines) ---\n{agent}"
                );
            }
            let keepalived = tail(&self.keepalived_log(index), 40);
            if !keepalived.is_empty() {
                let _ = writeln!(
                    out,
                    "--- keepalived log, node {index} (last 40 lines) ---\n{keepalived}"
                );
            }
            let transitions = self.transitions(index);
            if !transitions.is_empty() {
                let _ = writeln!(out, "--- state changes, node {index}: {transitions:?}");
            }
        }
        out
    }

    /// Writes node `index`'s keepalived.conf from `config` and starts
    /// keepalived (VRRP only, in the foreground, logging to a file in the
    /// lab's directory). Waits until its VRRP child has written its pid
    /// file; fails with its log if it exits first.
    pub fn start_keepalived(&mut self, index: usize, config: &KeepalivedConfig) -> Result<()> {
        let conf = self.dir().join(format!("n{index}-keepalived.conf"));
        let pid = self.dir().join(format!("n{index}-keepalived.pid"));
        let vrrp_pid = self.dir().join(format!("n{index}-keepalived-vrrp.pid"));
        fs::write(&conf, config.to_conf(index))
            .with_context(|| format!("write {}", conf.display()))?;
        let log = fs::File::create(self.keepalived_log_path(index))?;
        let mut cmd = self.node(index).ns.command("keepalived");
        cmd.args([
            "--dont-fork",
            "--log-console",
            "--log-detail",
            "--no-syslog",
        ])
        .args(["--vrrp", "--dont-respawn"])
        .arg("--use-file")
        .arg(&conf)
        .arg("--pid")
        .arg(&pid)
        .arg("--vrrp_pid")
        .arg(&vrrp_pid)
        .stdout(log.try_clone()?)
        .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("start keepalived on node {index}"))?;
        self.node_mut(index).keepalived = Some(ChildGuard::new(child));
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if fs::read_to_string(&vrrp_pid)
                .map(|p| !p.trim().is_empty())
                .unwrap_or(false)
            {
                return Ok(());
            }
            let k = self
                .node_mut(index)
                .keepalived
                .as_mut()
                .expect("just started");
            if let Some(status) = k.try_wait()? {
                self.node_mut(index).keepalived = None;
                bail!(
                    "keepalived on node {index} exited ({status}):\n{}",
                    self.keepalived_log(index)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "keepalived on node {index} did not start its VRRP process within {SERVER_START_TIMEOUT:?}:\n{}",
                    self.keepalived_log(index)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops node `index`'s keepalived with SIGTERM (it releases the VIP).
    pub fn stop_keepalived(&mut self, index: usize) -> Result<ExitStatus> {
        let mut k = self
            .node_mut(index)
            .keepalived
            .take()
            .with_context(|| format!("no keepalived runs on node {index}"))?;
        k.stop_within(libc::SIGTERM, AGENT_STOP_TIMEOUT)
    }

    fn keepalived_log_path(&self, index: usize) -> PathBuf {
        self.dir().join(format!("n{index}-keepalived.log"))
    }

    /// keepalived's log on node `index`.
    pub fn keepalived_log(&self, index: usize) -> String {
        fs::read_to_string(self.keepalived_log_path(index)).unwrap_or_default()
    }

    /// Sends SIGTERM to node `index`'s agent and returns its exit status
    /// (fails if it has not exited within 10 s; it is then killed).
    pub fn stop_agent(&mut self, index: usize) -> Result<ExitStatus> {
        let mut agent = self
            .node_mut(index)
            .agent
            .take()
            .with_context(|| format!("no agent runs on node {index}"))?;
        agent.stop_within(libc::SIGTERM, AGENT_STOP_TIMEOUT)
    }

    /// Whether node `index`'s agent is still running.
    pub fn agent_running(&mut self, index: usize) -> bool {
        match self.node_mut(index).agent.as_mut() {
            Some(a) => matches!(a.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The agent's log on node `index` (stdout and stderr).
    pub fn agent_log(&self, index: usize) -> String {
        fs::read_to_string(self.agent_log_path(index)).unwrap_or_default()
    }

    /// The last `lines` lines of the agent's log on node `index`.
    pub fn agent_log_tail(&self, index: usize, lines: usize) -> String {
        tail(&self.agent_log(index), lines)
    }

    /// The KeyDB server's log on node `index`.
    pub fn server_log(&self, index: usize) -> String {
        tail(
            &fs::read_to_string(self.server_log_path(index)).unwrap_or_default(),
            40,
        )
    }

    /// `bpftool -j map dump pinned <node's versioned pin dir>/<map>`, parsed.
    pub fn dump_pinned_map(&self, index: usize, map: &str) -> Result<serde_json::Value> {
        let path = self.node(index).versioned_pin_dir().join(map);
        let out = run(
            "bpftool",
            &["-j", "map", "dump", "pinned", &path.display().to_string()],
        )?;
        serde_json::from_str(&out).with_context(|| format!("parse bpftool dump of {map}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut agent) = node.agent.take() {
                // A clean stop detaches and unpins; SIGKILL if it hangs.
                let _ = agent.stop_within(libc::SIGTERM, AGENT_STOP_TIMEOUT);
            }
            if let Some(mut keepalived) = node.keepalived.take() {
                // SIGTERM lets its VRRP child go too (the namespace's
                // teardown kills any straggler).
                let _ = keepalived.stop_within(libc::SIGTERM, AGENT_STOP_TIMEOUT);
            }
            node.server = None;
            node.fake = None;
        }
        self.port_xdp = None;
        // Namespaces, then the bpffs (anything still pinned goes with it),
        // then the temp directory: field drops, in this order.
        self.nodes.clear();
    }
}

/// Waits until every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/*/stat`).
fn wait_until_stopped(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("list the threads of {pid}"))?;
        let mut all = true;
        for task in tasks {
            let stat = fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            if !matches!(state, Some('T' | 't')) {
                all = false;
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("process {pid} not stopped 5 s after SIGSTOP");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Joins `member` to the bridge: a veth pair `eth0` (in `member`) ⇄ `port`
/// (in `switch`, enslaved to br0), `addr/24` on eth0, tx checksum offload off
/// (XDP_TX keeps no offload metadata; see TOOLCHAIN.md).
fn join_lan(switch: &Netns, member: &Netns, port: &str, addr: Ipv4Addr) -> Result<()> {
    member.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    member.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    member.ip(&[
        "link",
        "add",
        NODE_IFACE,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        switch.name(),
    ])?;
    switch.ip(&["link", "set", port, "master", "br0"])?;
    switch.ip(&["link", "set", port, "up"])?;
    member.ip(&[
        "addr",
        "add",
        &format!("{addr}/{LAN_PREFIX_LEN}"),
        "dev",
        NODE_IFACE,
    ])?;
    member.ip(&["link", "set", NODE_IFACE, "up"])?;
    member.exec(&["ethtool", "-K", NODE_IFACE, "tx", "off"])?;
    Ok(())
}

/// Loads the object's XDP_PASS program and attaches it in native mode to
/// every bridge port: native XDP_TX from a node's veth only reaches the
/// bridge if the peer runs an XDP program (TOOLCHAIN.md). Dropping the
/// returned `Ebpf` detaches them.
fn attach_port_xdp(switch: &Netns, ports: Vec<String>) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(names::CONNTRACK, 64)
        .load(balancer_user::BPF_OBJECT)
        .context("load the XDP object")?;
    switch.run_in(move || -> Result<Ebpf> {
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROG_PASS)
            .with_context(|| format!("no program {} in the object", names::PROG_PASS))?
            .try_into()?;
        prog.load().context("load xdp_pass")?;
        for port in &ports {
            prog.attach(port, XdpMode::Driver)
                .with_context(|| format!("attach xdp_pass to {port} (native)"))?;
        }
        Ok(ebpf)
    })?
}

/// A minimal HTTP/1.1 GET of `path` from `addr` (in the calling thread's
/// network namespace): the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("read the reply of {addr}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in the reply of {addr}: {reply:?}"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_string()))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a command with a deadline; its stdout, or an error with stderr.
/// Past the deadline the command is killed.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    // Drain both pipes on threads so a chatty command never blocks on a
    // full pipe while we poll for its exit.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(POLL);
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{cmd:?} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Starts `f` on a new thread that has entered `ns` (setns moves only that
/// thread) and returns at once; the thread's result comes with `join`.
pub fn spawn_in_netns<F, R>(
    ns: &Netns,
    name: &str,
    f: F,
) -> Result<std::thread::JoinHandle<Result<R>>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    use std::os::fd::AsFd;
    let path = format!("/run/netns/{}", ns.name());
    let file = fs::File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || -> Result<R> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns")?;
            Ok(f())
        })
        .context("spawn a thread")
}

/// Serialises the timing-sensitive cluster tests of one test binary: cargo
/// runs a binary's tests on parallel threads, and two labs failing over at
/// once on a 2-core machine would measure each other. Hold the guard for
/// the whole test.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

impl Lab {
    /// The run_id of every node's real KeyDB server (nodes without one are
    /// left out), asked directly from the client: run_id -> node index.
    pub fn server_run_ids(&self) -> Result<HashMap<String, usize>> {
        let nodes: Vec<usize> = (1..=self.node_count())
            .filter(|&i| self.node(i).server.is_some())
            .collect();
        self.in_client(move || -> Result<HashMap<String, usize>> {
            let mut ids = HashMap::new();
            for node in nodes {
                let id = resp::Connection::connect(node_keydb(node), Duration::from_secs(3))?
                    .run_id()
                    .with_context(|| format!("INFO server of node {node}"))?;
                if ids.insert(id.clone(), node).is_some() {
                    bail!("two servers share run_id {id}");
                }
            }
            Ok(ids)
        })?
    }

    /// Opens `count` new connections to the VIP from the client, one after
    /// the other, and asks each `INFO server`: the node whose server
    /// answered (by `run_ids`), or what went wrong, with the time the
    /// attempt started.
    pub fn sample_vip(
        &self,
        run_ids: &HashMap<String, usize>,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<VipAttempt>> {
        let ids = run_ids.clone();
        self.in_client(move || {
            (0..count)
                .map(|_| VipAttempt::make(&ids, timeout))
                .collect::<Vec<_>>()
        })
    }
}

/// One new connection through the VIP and who answered on it.
#[derive(Clone, Debug)]
pub struct VipAttempt {
    /// When the attempt started.
    pub at: Instant,
    /// The serving node, or the error (`unknown run_id ...` when a server
    /// not in the map answered).
    pub outcome: std::result::Result<usize, String>,
}

impl VipAttempt {
    /// Connects to the VIP from the current thread (which must be in the
    /// client's namespace) and asks `INFO server`.
    pub fn make(run_ids: &HashMap<String, usize>, timeout: Duration) -> VipAttempt {
        let at = Instant::now();
        let outcome = resp::Connection::connect(vip_keydb(), timeout)
            .and_then(|mut c| c.run_id())
            .map_err(|e| writer::describe(&e))
            .and_then(|id| {
                run_ids
                    .get(&id)
                    .copied()
                    .ok_or_else(|| format!("unknown run_id {id}"))
            });
        VipAttempt { at, outcome }
    }
}

/// The lab's service as node `index`'s data plane sees it right now: read
/// from the SERVICES map its agent pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    /// The SERVICE_ACTIVE flag: this node serves the VIP.
    pub active: bool,
    /// The READY backends, in round-robin order.
    pub ready: Vec<SocketAddrV4>,
}

/// The SERVICES entry of the lab's service (VIP:6380) in the data plane
/// pinned in `pins` (a `<pin_dir>/v<LAYOUT_VERSION>` directory).
pub fn pinned_lab_service(pins: &Path) -> Result<balancer_common::Service> {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use balancer_common::{Service, ServiceKey, IPPROTO_TCP};
    let path = pins.join(names::SERVICES);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    let services: BpfHashMap<MapData, ServiceKey, Service> =
        BpfHashMap::try_from(Map::from_map_data(data)?)?;
    let key = ServiceKey {
        vip: u32::from_ne_bytes(VIP.octets()),
        port: KEYDB_PORT.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    services
        .get(&key, 0)
        .with_context(|| format!("service {VIP}:{KEYDB_PORT} in {}", path.display()))
}

impl Lab {
    /// Reads node `index`'s SERVICES entry for VIP:6380 from its pins.
    pub fn service_view(&self, index: usize) -> Result<ServiceView> {
        use balancer_common::SERVICE_ACTIVE;
        let service = pinned_lab_service(&self.node(index).versioned_pin_dir())
            .with_context(|| format!("node {index}"))?;
        let count = (service.ready_count as usize).min(service.ready.len());
        let ready = service.ready[..count]
            .iter()
            .filter_map(|&slot| service.backends.get(usize::from(slot)))
            .map(|b| SocketAddrV4::new(Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port)))
            .collect();
        Ok(ServiceView {
            active: service.flags & SERVICE_ACTIVE != 0,
            ready,
        })
    }

    /// Polls node `index`'s SERVICES entry until `check` holds; returns it.
    pub fn wait_for_service(
        &self,
        index: usize,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&ServiceView) -> bool,
    ) -> Result<ServiceView> {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.service_view(index)?;
            if check(&view) {
                return Ok(view);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what}: not within {timeout:?} (node {index}'s service now: {view:?})\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}
