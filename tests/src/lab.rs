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
//! redis-server) on port 6380 and the `balancer` agent with a generated
//! config. Everything it creates (processes, namespaces, the bpffs mount for
//! the agents' pins, the XDP_PASS programs on the bridge ports, its temp
//! directory) is removed when the [`Lab`] drops, also when a test panics.
//!
//! Addresses come only from 198.18.0.0/15 and no packet leaves the lab's
//! namespaces. It is a test fixture, not a deployment tool.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
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

/// How long a KeyDB server may take to answer PING after starting.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent may take to pin its XDP link after starting.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to exit after SIGTERM.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a condition.
const POLL: Duration = Duration::from_millis(25);

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
    /// `[dataplane] active`: this node holds the VIP.
    pub active: bool,
    /// `[dataplane] xdp_mode`: "native", "generic" or "auto".
    pub xdp_mode: String,
    /// `[dataplane] conntrack_flows`.
    pub conntrack_flows: u32,
    /// The service's backends.
    pub backends: Vec<SocketAddrV4>,
}

impl AgentConfig {
    /// Native XDP, a small conntrack table, every node of `lab` a backend.
    pub fn for_lab(lab: &Lab, active: bool) -> Self {
        AgentConfig {
            active,
            xdp_mode: "native".into(),
            conntrack_flows: 16_384,
            backends: (1..=lab.node_count())
                .map(|i| SocketAddrV4::new(node_addr(i), KEYDB_PORT))
                .collect(),
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
        let _ = writeln!(s, "active = {}", self.active);
        let _ = writeln!(s, "conntrack_flows = {}", self.conntrack_flows);
        let _ = writeln!(s, "pin_dir = \"{}\"", pin_dir.display());
        let _ = writeln!(s, "\n[[service]]");
        let _ = writeln!(s, "vip = \"{VIP}\"");
        let _ = writeln!(s, "port = {KEYDB_PORT}");
        let backends: Vec<String> = self.backends.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(s, "backends = [{}]", backends.join(", "));
        s
    }
}

/// One balancer node: its namespace and what runs in it.
#[derive(Debug)]
pub struct Node {
    // Processes first: fields drop in order, and the namespace goes last.
    agent: Option<ChildGuard>,
    server: Option<ChildGuard>,
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
        let mut cmd = node.ns.command(&bin.display().to_string());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} on node {index}", bin.display()))?;
        let link = node.versioned_pin_dir().join(XDP_LINK_PIN);
        self.node_mut(index).agent = Some(ChildGuard::new(child));

        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if link.exists() {
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
            node.server = None;
        }
        self.port_xdp = None;
        // Namespaces, then the bpffs (anything still pinned goes with it),
        // then the temp directory: field drops, in this order.
        self.nodes.clear();
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
