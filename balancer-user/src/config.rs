//! The agent's configuration file (TOML): its serde shape, and [`validate`]
//! which turns it into a checked [`Config`] or an error naming the field.
//!
//! Parsing and validation are pure: nothing here touches the system, so a
//! bad file is rejected before the agent changes anything on the node. The
//! one fact about the node they need, its `net.ipv4.ip_local_port_range`
//! (the SNAT range must stay clear of it), is read by [`load`] and passed
//! in; [`parse`] assumes Linux's default.
//!
//! ```toml
//! [node]
//! interface = "eth0"
//! address = "198.18.0.1"
//! [vrrp]                  # optional: without it, [dataplane] active decides
//! vrid = 101
//! priority = 150
//! [health]                # optional: health::HealthConfig defaults
//! interval_ms = 100
//! [[service]]
//! vip = "198.18.0.100"
//! port = 6380
//! backends = ["198.18.0.1:6380", "198.18.0.2:6380"]
//! [admin]                 # optional: these are the defaults
//! socket = "/run/balancer/balancer.sock"
//! metrics_listen = "127.0.0.1:9638"   # or "off"
//! ```
//!
//! [`validate`]: ConfigFile::validate

use std::{
    collections::HashSet,
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use balancer_common::{DEFAULT_CONNTRACK_FLOWS, MAX_BACKENDS, MAX_SERVICES, MAX_SNAT_ADDRS};
use serde::Deserialize;

use crate::{
    health::HealthConfig,
    vrrp::{Auth, V3Checksum, Version},
};

/// Default `[dataplane] pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/balancer";
/// Where the node's own ephemeral port range is read.
pub const LOCAL_PORT_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Linux's default `net.ipv4.ip_local_port_range`.
pub const LINUX_LOCAL_PORT_RANGE: SnatPortRange = SnatPortRange {
    min: 32768,
    max: 60999,
};
/// Default idle timeout of a NATed flow, seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
/// Default timeout of a flow whose both sides sent FIN, seconds.
pub const DEFAULT_CLOSING_TIMEOUT_SECS: u64 = 10;
/// Largest `conntrack_flows` accepted (two map entries of ~100 bytes each
/// per flow: about 1 GiB of kernel memory).
pub const MAX_CONNTRACK_FLOWS: u32 = 4 * 1024 * 1024;
/// Largest timeout accepted, seconds (one day).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// SNAT ports must not be well-known ports.
pub const MIN_SNAT_PORT: u16 = 1024;

/// The file as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// This node. Required.
    pub node: NodeSection,
    /// Data-plane settings. Default: every field at its default.
    #[serde(default)]
    pub dataplane: DataplaneSection,
    /// The VIP election. Default: none; `[dataplane] active` decides
    /// statically whether this node holds the VIPs.
    #[serde(default)]
    pub vrrp: Option<VrrpSection>,
    /// Health checks of the backends. Default: every field at its default.
    #[serde(default)]
    pub health: HealthConfig,
    /// The services (`[[service]]` tables). Required: 1 to 64 of them.
    #[serde(default)]
    pub service: Vec<ServiceSection>,
    /// The admin interface (`balancer status`, Prometheus metrics).
    /// Default: every field at its default.
    #[serde(default)]
    pub admin: AdminSection,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Interface the XDP program attaches to and VIPs are added on.
    /// Required, no default.
    pub interface: String,
    /// This node's IPv4 address: the source of NATed packets, and a backend
    /// with this address is served locally. Required, no default.
    pub address: String,
}

/// `[dataplane]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSection {
    /// How the XDP program is attached. Default `"auto"`: native, falling
    /// back to generic with a warning.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// This node holds the VIPs, statically (no election). Must not be set
    /// together with `[vrrp]`. Default `false`.
    #[serde(default)]
    pub active: Option<bool>,
    /// First source port used for NAT towards remote backends. Set both or
    /// neither. Default: the larger side of 1024-65535 outside the node's
    /// `net.ipv4.ip_local_port_range` (1024-32767 with Linux's default).
    #[serde(default)]
    pub snat_port_min: Option<u16>,
    /// Last source port (inclusive) used for NAT.
    #[serde(default)]
    pub snat_port_max: Option<u16>,
    /// Number of NATed flows the conntrack table holds. Default 262144.
    #[serde(default = "default_conntrack_flows")]
    pub conntrack_flows: u32,
    /// A NATed flow without packets for this long is forgotten, seconds.
    /// Default 300.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// A flow whose both sides sent FIN is forgotten after this long without
    /// packets, seconds. Default 10.
    #[serde(default = "default_closing_timeout_secs")]
    pub closing_timeout_secs: u64,
    /// SNAT source addresses besides `node.address`, each configured on
    /// the interface: every one adds a full SNAT range per backend. New
    /// flows take the addresses in turn. Default none; at most 4.
    #[serde(default)]
    pub snat_addresses: Vec<String>,
    /// Directory on a bpffs where maps and the XDP link are pinned, under
    /// `v<LAYOUT_VERSION>/`. Default `"/sys/fs/bpf/balancer"`.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
}

impl Default for DataplaneSection {
    fn default() -> Self {
        DataplaneSection {
            xdp_mode: XdpMode::default(),
            active: None,
            snat_port_min: None,
            snat_port_max: None,
            conntrack_flows: DEFAULT_CONNTRACK_FLOWS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            closing_timeout_secs: DEFAULT_CLOSING_TIMEOUT_SECS,
            snat_addresses: Vec::new(),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
        }
    }
}

fn default_conntrack_flows() -> u32 {
    DEFAULT_CONNTRACK_FLOWS
}
fn default_idle_timeout_secs() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_closing_timeout_secs() -> u64 {
    DEFAULT_CLOSING_TIMEOUT_SECS
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

/// `[[service]]`: one VIP:port balanced over backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Virtual IPv4 address clients connect to. Required, no default.
    pub vip: String,
    /// TCP port clients connect to. Required, no default.
    pub port: u16,
    /// Backends as `"IPv4:port"`, 1 to 16, in round-robin order. Required,
    /// no default.
    pub backends: Vec<String>,
    /// How new connections pick a READY backend: `"round_robin"` (default)
    /// or `"first"`: the first READY backend in `backends` order takes them
    /// all and the others stand by (HAProxy's `balance first`), so a client
    /// reads its own writes on its next connection.
    #[serde(default)]
    pub scheduler: Scheduler,
}

/// `[[service]] scheduler`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Each new connection takes the next READY backend.
    #[default]
    #[serde(alias = "roundrobin")]
    RoundRobin,
    /// Every new connection takes the first READY backend in configured
    /// order.
    First,
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::RoundRobin => "round_robin",
            Scheduler::First => "first",
        })
    }
}

/// Default `[admin] socket`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/balancer/balancer.sock";
/// Default `[admin] metrics_listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9638";
/// The `[admin] metrics_listen` value that turns the metrics endpoint off.
pub const METRICS_OFF: &str = "off";
/// Longest unix socket path: `sun_path` holds 108 bytes with the final NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// `[admin]`: how an operator reaches the running agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Absolute path of the unix socket `balancer status` talks to (mode
    /// 0600, so root only; a missing directory is created with mode 0700).
    /// Default `"/run/balancer/balancer.sock"`.
    #[serde(default = "default_admin_socket")]
    pub socket: PathBuf,
    /// `address:port` the Prometheus endpoint (`GET /metrics`) listens on,
    /// or `"off"` for none. Default `"127.0.0.1:9638"`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            socket: default_admin_socket(),
            metrics_listen: default_metrics_listen(),
        }
    }
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}
fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.to_string()
}

/// Validated `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// The admin socket's path (absolute).
    pub socket: PathBuf,
    /// Where the Prometheus endpoint listens; `None` = off.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            socket: default_admin_socket(),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().ok(),
        }
    }
}

/// `[dataplane] xdp_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver; fails if the driver has no XDP support.
    Native,
    /// In the network stack (skb mode): works everywhere, slower.
    Generic,
    /// Native, falling back to generic with a warning.
    #[default]
    Auto,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Auto => "auto",
        })
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: Node,
    pub dataplane: Dataplane,
    /// The election; `None` = static mode (`dataplane.active`).
    pub vrrp: Option<Vrrp>,
    /// Validated health-check settings.
    pub health: HealthConfig,
    /// In file order; a service's index is its id in the data plane.
    pub services: Vec<ServiceConfig>,
    /// The admin socket and the metrics endpoint.
    pub admin: Admin,
}

impl Config {
    /// The VRRP virtual addresses: every service's VIP, once, in file order.
    pub fn vips(&self) -> Vec<Ipv4Addr> {
        let mut vips: Vec<Ipv4Addr> = Vec::new();
        for service in &self.services {
            if !vips.contains(&service.vip) {
                vips.push(service.vip);
            }
        }
        vips
    }
}

/// This node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub interface: String,
    pub address: Ipv4Addr,
}

/// Validated `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataplane {
    pub xdp_mode: XdpMode,
    pub active: bool,
    pub snat_ports: SnatPortRange,
    pub conntrack_flows: u32,
    pub idle_timeout: Duration,
    pub closing_timeout: Duration,
    /// SNAT source addresses besides the node's; the agent checks each is
    /// on the interface before it changes anything.
    pub snat_addresses: Vec<Ipv4Addr>,
    /// Absolute; the agent pins under `pin_dir/v<LAYOUT_VERSION>/`.
    pub pin_dir: PathBuf,
}

/// The inclusive range of source ports used for NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnatPortRange {
    pub min: u16,
    pub max: u16,
}

impl SnatPortRange {
    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.max) - u32::from(self.min) + 1
    }

    /// Never true for a validated range; here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.max < self.min
    }
}

impl fmt::Display for SnatPortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// One validated service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub vip: Ipv4Addr,
    pub port: u16,
    /// In configured order; the index is the backend's slot.
    pub backends: Vec<SocketAddrV4>,
    pub scheduler: Scheduler,
}

/// Default `[vrrp] priority`.
pub const DEFAULT_VRRP_PRIORITY: u32 = 100;
/// Default `[vrrp] version`.
pub const DEFAULT_VRRP_VERSION: u32 = 3;
/// Default `[vrrp] advert_interval_ms` (keepalived's is 1000).
pub const DEFAULT_ADVERT_INTERVAL_MS: u64 = 100;
/// Default `[vrrp] garp_count`.
pub const DEFAULT_GARP_COUNT: u32 = 5;
/// Largest `[vrrp] garp_count`.
pub const MAX_GARP_COUNT: u32 = 100;
/// Default `[vrrp] garp_repeat_delay_ms`.
pub const DEFAULT_GARP_REPEAT_DELAY_MS: u64 = 5000;
/// Default `[vrrp] no_ready_backend_weight`.
pub const DEFAULT_NO_READY_BACKEND_WEIGHT: u32 = 50;
/// Largest `preempt_delay_ms` and `garp_repeat_delay_ms` (one hour).
pub const MAX_VRRP_DELAY_MS: u64 = 3_600_000;

/// `[vrrp]`: this node's VRRP instance. One per node; its virtual
/// addresses are the services' VIPs, its primary address `node.address`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VrrpSection {
    /// Virtual Router ID, 1 to 255. Required, no default.
    pub vrid: u32,
    /// Priority, 1 to 254, or 255 for the address owner. Default 100.
    #[serde(default = "default_vrrp_priority")]
    pub priority: u32,
    /// Protocol version, 2 or 3. Default 3.
    #[serde(default = "default_vrrp_version")]
    pub version: u32,
    /// Time between adverts, milliseconds. VRRPv3: a multiple of 10 from 10
    /// to 40950; VRRPv2: a multiple of 1000 from 1000 to 255000. Default 100.
    #[serde(default = "default_advert_interval_ms")]
    pub advert_interval_ms: u64,
    /// A higher-priority backup takes over from a live lower-priority
    /// master. Default true.
    #[serde(default = "default_true")]
    pub preempt: bool,
    /// Preemption waits this long, milliseconds. Default 0.
    #[serde(default)]
    pub preempt_delay_ms: u64,
    /// VRRPv2 only: simple password (`auth_type PASS`), 1 to 8 bytes.
    /// Default: none (auth type 0).
    #[serde(default)]
    pub auth_pass: Option<String>,
    /// How the VRRPv3 checksum is computed when sending: `"pseudo-header"`
    /// (keepalived 2.2) or `"rfc9568"`. The other form is accepted on
    /// receive. Default `"pseudo-header"`.
    #[serde(default)]
    pub v3_checksum: V3ChecksumName,
    /// Send adverts to these addresses instead of multicast 224.0.0.18, and
    /// accept adverts only from them. Default `[]` (multicast).
    #[serde(default)]
    pub unicast_peers: Vec<String>,
    /// Gratuitous ARPs per VIP in each burst, 0 to 100. Default 5.
    #[serde(default = "default_garp_count")]
    pub garp_count: u32,
    /// The burst sent on becoming master is repeated this long after,
    /// milliseconds; 0 = no repeat. Default 5000.
    #[serde(default = "default_garp_repeat_delay_ms")]
    pub garp_repeat_delay_ms: u64,
    /// Absolute path of a command run as `<notify> <state> <vrid>` (state:
    /// master, backup, fault or stopped) on each state change; never waited
    /// for by the election. Default: none.
    #[serde(default)]
    pub notify: Option<PathBuf>,
    /// Priority is lowered by this much while this node's data plane has no
    /// READY backend, 0 to 254. Default 50.
    #[serde(default = "default_no_ready_backend_weight")]
    pub no_ready_backend_weight: u32,
}

/// `[vrrp] v3_checksum`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum V3ChecksumName {
    /// keepalived 2.2's default: with the IPv4 pseudo-header.
    #[default]
    #[serde(rename = "pseudo-header")]
    PseudoHeader,
    /// RFC 9568: without a pseudo-header.
    #[serde(rename = "rfc9568")]
    Rfc9568,
}

fn default_vrrp_priority() -> u32 {
    DEFAULT_VRRP_PRIORITY
}
fn default_vrrp_version() -> u32 {
    DEFAULT_VRRP_VERSION
}
fn default_advert_interval_ms() -> u64 {
    DEFAULT_ADVERT_INTERVAL_MS
}
fn default_true() -> bool {
    true
}
fn default_garp_count() -> u32 {
    DEFAULT_GARP_COUNT
}
fn default_garp_repeat_delay_ms() -> u64 {
    DEFAULT_GARP_REPEAT_DELAY_MS
}
fn default_no_ready_backend_weight() -> u32 {
    DEFAULT_NO_READY_BACKEND_WEIGHT
}

/// Validated `[vrrp]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vrrp {
    pub vrid: u8,
    /// Configured (base) priority.
    pub priority: u8,
    pub version: Version,
    /// Advertisement interval, centiseconds.
    pub advert_interval_cs: u16,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// VRRPv2 authentication; [`Auth::None`] for VRRPv3.
    pub auth: Auth,
    pub v3_checksum: V3Checksum,
    /// Empty = multicast.
    pub unicast_peers: Vec<Ipv4Addr>,
    pub garp_count: u32,
    /// `None` = no repeat burst.
    pub garp_repeat_delay: Option<Duration>,
    pub notify: Option<PathBuf>,
    pub no_ready_backend_weight: u8,
}

/// Why a configuration was rejected. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: invalid TOML")]
    Parse {
        file: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{file}: {problem}")]
    Invalid { file: String, problem: FieldError },
    #[error("{file} holds {text:?}, not two ports")]
    LocalPorts { file: String, text: String },
}

/// A semantic problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `service[0].backends[1]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// What a valid configuration sets up, one line per part, for `balancer
/// check`. Never shows the VRRP password.
pub fn summary(c: &Config) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "node: {} on {}", c.node.address, c.node.interface);
    match &c.vrrp {
        Some(v) => {
            let peers = if v.unicast_peers.is_empty() {
                "multicast 224.0.0.18".to_string()
            } else {
                let peers: Vec<String> = v.unicast_peers.iter().map(|p| p.to_string()).collect();
                format!("unicast to {}", peers.join(", "))
            };
            let _ = writeln!(
                s,
                "election: VRRPv{} vrid {}, priority {} (minus {} while no backend of this node is READY), adverts every {} ms, {}{}, {peers}",
                v.version.number(),
                v.vrid,
                v.priority,
                v.no_ready_backend_weight,
                u64::from(v.advert_interval_cs) * 10,
                if v.preempt { "preempt" } else { "no preempt" },
                if v.auth == crate::vrrp::packet::Auth::None {
                    ""
                } else {
                    ", auth_type PASS"
                },
            );
        }
        None if c.dataplane.active => {
            let _ = writeln!(s, "election: none (static: this node holds the VIPs)");
        }
        None => {
            let _ = writeln!(
                s,
                "election: none (static: this node does not hold the VIPs)"
            );
        }
    }
    let h = &c.health;
    let _ = writeln!(
        s,
        "health: every {} ms, timeout {} ms, READY after {} good checks, out after {} bad{}",
        h.interval_ms,
        h.timeout_ms,
        h.rise,
        h.fall,
        match &h.password_file {
            Some(f) => format!(", AUTH with the password in {}", f.display()),
            None => String::new(),
        }
    );
    let d = &c.dataplane;
    let _ = writeln!(
        s,
        "data plane: XDP {} mode, SNAT ports {}{}, {} flows, idle timeout {} s, closing {} s, pins in {}",
        d.xdp_mode,
        d.snat_ports,
        if d.snat_addresses.is_empty() {
            String::new()
        } else {
            let extra: Vec<String> = d.snat_addresses.iter().map(|a| a.to_string()).collect();
            format!(" (also from {})", extra.join(", "))
        },
        d.conntrack_flows,
        d.idle_timeout.as_secs(),
        d.closing_timeout.as_secs(),
        d.pin_dir.display()
    );
    for service in &c.services {
        let backends: Vec<String> = service
            .backends
            .iter()
            .map(|b| {
                if *b.ip() == c.node.address {
                    format!("{b} (local)")
                } else {
                    b.to_string()
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "service {}:{} -> {}",
            service.vip,
            service.port,
            backends.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "admin: socket {}, metrics {}",
        c.admin.socket.display(),
        match c.admin.metrics_listen {
            Some(addr) => format!("on http://{addr}/metrics"),
            None => "off".to_string(),
        }
    );
    s
}

/// Reads, parses and validates the file at `path`, for this node (its
/// `net.ipv4.ip_local_port_range`, read from [`LOCAL_PORT_RANGE_FILE`]).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let local = read_local_port_range()?;
    parse_for(&text, &file, local)
}

/// The node's `net.ipv4.ip_local_port_range`.
pub fn read_local_port_range() -> Result<SnatPortRange, ConfigError> {
    let file = LOCAL_PORT_RANGE_FILE.to_string();
    let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse_local_port_range(&text).ok_or(ConfigError::LocalPorts { file, text })
}

/// Parses `ip_local_port_range` as the kernel prints it (`"32768\t60999"`).
pub fn parse_local_port_range(text: &str) -> Option<SnatPortRange> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(min)), Some(Ok(max)), None) = (it.next(), it.next(), it.next()) else {
        return None;
    };
    (min <= max).then_some(SnatPortRange { min, max })
}

/// Parses and validates `text` as if the node had Linux's default
/// `ip_local_port_range`; `file` is only used in error messages.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    parse_for(text, file, LINUX_LOCAL_PORT_RANGE)
}

/// Parses and validates `text` for a node whose `ip_local_port_range` is
/// `local`.
pub fn parse_for(text: &str, file: &str, local: SnatPortRange) -> Result<Config, ConfigError> {
    let raw: ConfigFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
        file: file.to_string(),
        source,
    })?;
    raw.validate_for(local)
        .map_err(|problem| ConfigError::Invalid {
            file: file.to_string(),
            problem,
        })
}

/// The default SNAT range: every unprivileged port outside the node's own
/// ephemeral range `local`, on the larger side of it (the data plane takes
/// one contiguous range). `None` if there is no room either side.
pub fn default_snat_ports(local: SnatPortRange) -> Option<SnatPortRange> {
    let below = (local.min > MIN_SNAT_PORT).then(|| SnatPortRange {
        min: MIN_SNAT_PORT,
        max: local.min - 1,
    });
    let above = (local.max < u16::MAX).then(|| SnatPortRange {
        min: local.max.max(MIN_SNAT_PORT - 1) + 1,
        max: u16::MAX,
    });
    match (below, above) {
        (Some(b), Some(a)) => Some(if a.len() > b.len() { a } else { b }),
        (b, a) => b.or(a),
    }
}

impl ConfigFile {
    /// [`Self::validate_for`] a node with Linux's default
    /// `ip_local_port_range`.
    pub fn validate(&self) -> Result<Config, FieldError> {
        self.validate_for(LINUX_LOCAL_PORT_RANGE)
    }

    /// Checks every field and returns the typed configuration, or the first
    /// problem found (fields in file order), for a node whose own ephemeral
    /// ports (`ip_local_port_range`) are `local`.
    pub fn validate_for(&self, local: SnatPortRange) -> Result<Config, FieldError> {
        let node = self.node.validate()?;
        let dataplane = self.dataplane.validate(local)?;
        let admin = self.admin.validate()?;
        let vrrp = match &self.vrrp {
            Some(section) => {
                if self.dataplane.active.is_some() {
                    return Err(field_error(
                        "dataplane.active",
                        "must not be set together with [vrrp]: the election decides which node holds the VIPs",
                    ));
                }
                Some(section.validate(node.address)?)
            }
            None => None,
        };
        self.health
            .validate()
            .map_err(|e| field_error(format!("health.{}", e.field), e.message))?;

        if self.service.is_empty() {
            return Err(field_error(
                "service",
                "at least one [[service]] is required",
            ));
        }
        if self.service.len() > MAX_SERVICES as usize {
            return Err(field_error(
                "service",
                format!(
                    "{} services configured, at most {MAX_SERVICES} are supported",
                    self.service.len()
                ),
            ));
        }
        let mut services = Vec::with_capacity(self.service.len());
        for (i, section) in self.service.iter().enumerate() {
            services.push(section.validate(i)?);
        }

        let mut seen = HashSet::new();
        for (i, s) in services.iter().enumerate() {
            if !seen.insert((s.vip, s.port)) {
                return Err(field_error(
                    format!("service[{i}]"),
                    format!("{}:{} is configured twice", s.vip, s.port),
                ));
            }
        }
        let vips: HashSet<Ipv4Addr> = services.iter().map(|s| s.vip).collect();
        for (i, a) in dataplane.snat_addresses.iter().enumerate() {
            let field = format!("dataplane.snat_addresses[{i}]");
            if *a == node.address {
                return Err(field_error(
                    field,
                    format!("{a} is node.address, a SNAT address already: remove it"),
                ));
            }
            if vips.contains(a) {
                return Err(field_error(field, format!("{a} is a service VIP")));
            }
            if services
                .iter()
                .any(|s| s.backends.iter().any(|b| b.ip() == a))
            {
                return Err(field_error(field, format!("{a} is a backend's address")));
            }
        }
        if vips.contains(&node.address) {
            return Err(field_error(
                "node.address",
                format!("{} is also a service VIP", node.address),
            ));
        }
        if let Some(vrrp) = &vrrp {
            for (i, peer) in vrrp.unicast_peers.iter().enumerate() {
                if vips.contains(peer) {
                    return Err(field_error(
                        format!("vrrp.unicast_peers[{i}]"),
                        format!("{peer} is a service VIP, not a peer"),
                    ));
                }
            }
        }
        for (i, s) in services.iter().enumerate() {
            for (j, b) in s.backends.iter().enumerate() {
                if vips.contains(b.ip()) {
                    return Err(field_error(
                        format!("service[{i}].backends[{j}]"),
                        format!("{} is a service VIP, not a backend", b.ip()),
                    ));
                }
            }
        }

        Ok(Config {
            node,
            dataplane,
            vrrp,
            health: self.health.clone(),
            services,
            admin,
        })
    }
}

impl AdminSection {
    fn validate(&self) -> Result<Admin, FieldError> {
        let socket = &self.socket;
        if !socket.is_absolute() {
            return Err(field_error(
                "admin.socket",
                format!("{socket:?} is not an absolute path"),
            ));
        }
        if socket.parent().is_none() || socket.file_name().is_none() {
            return Err(field_error(
                "admin.socket",
                format!("{socket:?} does not name a file"),
            ));
        }
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH_LEN {
            return Err(field_error(
                "admin.socket",
                format!(
                    "{socket:?} is {len} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH_LEN}"
                ),
            ));
        }
        let text = self.metrics_listen.trim();
        let metrics_listen = if text == METRICS_OFF {
            None
        } else {
            let addr: SocketAddr = text.parse().map_err(|_| {
                field_error(
                    "admin.metrics_listen",
                    format!(
                        "{:?} is not an address:port such as \"{DEFAULT_METRICS_LISTEN}\" \
                         (\"{METRICS_OFF}\" turns the endpoint off)",
                        self.metrics_listen
                    ),
                )
            })?;
            if addr.port() == 0 {
                return Err(field_error(
                    "admin.metrics_listen",
                    format!("{addr} has port 0: Prometheus needs a fixed port"),
                ));
            }
            Some(addr)
        };
        Ok(Admin {
            socket: socket.clone(),
            metrics_listen,
        })
    }
}

impl NodeSection {
    fn validate(&self) -> Result<Node, FieldError> {
        let name = &self.interface;
        // IFNAMSIZ is 16 including the terminating NUL.
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c == '\0')
        {
            return Err(field_error(
                "node.interface",
                format!("{name:?} is not a valid interface name"),
            ));
        }
        let address = parse_unicast(&self.address, "node.address")?;
        Ok(Node {
            interface: name.clone(),
            address,
        })
    }
}

impl DataplaneSection {
    fn snat_ports(&self, local: SnatPortRange) -> Result<SnatPortRange, FieldError> {
        let (min, max) =
            match (self.snat_port_min, self.snat_port_max) {
                (None, None) => {
                    return default_snat_ports(local).ok_or_else(|| {
                        field_error(
                            "dataplane.snat_port_min",
                            format!(
                                "not set, and net.ipv4.ip_local_port_range ({local}) leaves no \
                             unprivileged port outside it for SNAT: shrink ip_local_port_range, \
                             or set snat_port_min and snat_port_max"
                            ),
                        )
                    })
                }
                (Some(min), Some(max)) => (min, max),
                (Some(_), None) => return Err(field_error(
                    "dataplane.snat_port_max",
                    "missing: set both snat_port_min and snat_port_max, or neither for the default",
                )),
                (None, Some(_)) => return Err(field_error(
                    "dataplane.snat_port_min",
                    "missing: set both snat_port_min and snat_port_max, or neither for the default",
                )),
            };
        if min < MIN_SNAT_PORT {
            return Err(field_error(
                "dataplane.snat_port_min",
                format!("{min} is below {MIN_SNAT_PORT}: SNAT ports must not be well-known ports"),
            ));
        }
        if min > max {
            return Err(field_error(
                "dataplane.snat_port_max",
                format!("{max} is below snat_port_min ({min}): the range is empty"),
            ));
        }
        if min <= local.max && max >= local.min {
            let hint = match default_snat_ports(local) {
                Some(d) => format!(" (for example {d}, the default)"),
                None => String::new(),
            };
            return Err(field_error(
                "dataplane.snat_port_min",
                format!(
                    "{min}-{max} overlaps net.ipv4.ip_local_port_range ({local}), the ports of \
                     the node's own outgoing connections: choose ports outside it{hint}, or \
                     shrink ip_local_port_range"
                ),
            ));
        }
        Ok(SnatPortRange { min, max })
    }

    fn snat_address_list(&self) -> Result<Vec<Ipv4Addr>, FieldError> {
        if self.snat_addresses.len() > MAX_SNAT_ADDRS {
            return Err(field_error(
                "dataplane.snat_addresses",
                format!(
                    "{} addresses, at most {MAX_SNAT_ADDRS} are supported",
                    self.snat_addresses.len()
                ),
            ));
        }
        let mut out = Vec::new();
        for (i, text) in self.snat_addresses.iter().enumerate() {
            let field = format!("dataplane.snat_addresses[{i}]");
            let addr = parse_unicast(text, &field)?;
            if out.contains(&addr) {
                return Err(field_error(field, format!("{addr} is listed twice")));
            }
            out.push(addr);
        }
        Ok(out)
    }

    fn validate(&self, local: SnatPortRange) -> Result<Dataplane, FieldError> {
        let snat_ports = self.snat_ports(local)?;
        if self.conntrack_flows == 0 || self.conntrack_flows > MAX_CONNTRACK_FLOWS {
            return Err(field_error(
                "dataplane.conntrack_flows",
                format!(
                    "{} is out of range 1..={MAX_CONNTRACK_FLOWS}",
                    self.conntrack_flows
                ),
            ));
        }
        let idle_timeout = timeout(self.idle_timeout_secs, "dataplane.idle_timeout_secs")?;
        let closing_timeout = timeout(self.closing_timeout_secs, "dataplane.closing_timeout_secs")?;
        if !self.pin_dir.is_absolute() {
            return Err(field_error(
                "dataplane.pin_dir",
                format!("{:?} is not an absolute path", self.pin_dir),
            ));
        }
        if self.pin_dir.parent().is_none() {
            return Err(field_error(
                "dataplane.pin_dir",
                "the root directory cannot be the pin directory",
            ));
        }
        Ok(Dataplane {
            xdp_mode: self.xdp_mode,
            active: self.active.unwrap_or(false),
            snat_ports,
            conntrack_flows: self.conntrack_flows,
            idle_timeout,
            closing_timeout,
            snat_addresses: self.snat_address_list()?,
            pin_dir: self.pin_dir.clone(),
        })
    }
}

impl VrrpSection {
    fn validate(&self, node_address: Ipv4Addr) -> Result<Vrrp, FieldError> {
        let vrid = match u8::try_from(self.vrid) {
            Ok(v) if v >= 1 => v,
            _ => {
                return Err(field_error(
                    "vrrp.vrid",
                    format!("{} is outside 1..=255", self.vrid),
                ))
            }
        };
        let priority = match u8::try_from(self.priority) {
            Ok(p) if p >= 1 => p,
            _ => {
                return Err(field_error(
                    "vrrp.priority",
                    format!("{} is outside 1..=255 (255 = address owner)", self.priority),
                ))
            }
        };
        let version = match self.version {
            2 => Version::V2,
            3 => Version::V3,
            other => {
                return Err(field_error(
                    "vrrp.version",
                    format!("{other} is not a VRRP version: 2 or 3"),
                ))
            }
        };
        let ms = self.advert_interval_ms;
        let advert_interval_cs = match version {
            Version::V3 => {
                if !ms.is_multiple_of(10) || !(10..=40_950).contains(&ms) {
                    return Err(field_error(
                        "vrrp.advert_interval_ms",
                        format!("{ms} is not a multiple of 10 from 10 to 40950 (VRRPv3 counts centiseconds)"),
                    ));
                }
                (ms / 10) as u16
            }
            Version::V2 => {
                if !ms.is_multiple_of(1000) || !(1000..=255_000).contains(&ms) {
                    return Err(field_error(
                        "vrrp.advert_interval_ms",
                        format!("{ms} is not a multiple of 1000 from 1000 to 255000 (VRRPv2 counts seconds)"),
                    ));
                }
                (ms / 10) as u16
            }
        };
        let preempt_delay = delay(self.preempt_delay_ms, "vrrp.preempt_delay_ms")?;
        let auth = match (&self.auth_pass, version) {
            (None, _) => Auth::None,
            (Some(_), Version::V3) => {
                return Err(field_error(
                    "vrrp.auth_pass",
                    "VRRPv3 has no authentication; auth_pass needs version = 2",
                ))
            }
            (Some(pass), Version::V2) => {
                if pass.is_empty() {
                    return Err(field_error("vrrp.auth_pass", "must not be empty"));
                }
                // The message never shows the password.
                Auth::pass(pass).map_err(|e| field_error("vrrp.auth_pass", e.to_string()))?
            }
        };
        let v3_checksum = match self.v3_checksum {
            V3ChecksumName::PseudoHeader => V3Checksum::WithPseudoHeader,
            V3ChecksumName::Rfc9568 => V3Checksum::WithoutPseudoHeader,
        };
        let mut unicast_peers = Vec::with_capacity(self.unicast_peers.len());
        for (i, text) in self.unicast_peers.iter().enumerate() {
            let field = format!("vrrp.unicast_peers[{i}]");
            let peer = parse_unicast(text, &field)?;
            if peer == node_address {
                return Err(field_error(
                    &field,
                    format!("{peer} is node.address: list the other nodes"),
                ));
            }
            if unicast_peers.contains(&peer) {
                return Err(field_error(&field, format!("{peer} is listed twice")));
            }
            unicast_peers.push(peer);
        }
        if self.garp_count > MAX_GARP_COUNT {
            return Err(field_error(
                "vrrp.garp_count",
                format!("{} is outside 0..={MAX_GARP_COUNT}", self.garp_count),
            ));
        }
        let garp_repeat_delay = match delay(self.garp_repeat_delay_ms, "vrrp.garp_repeat_delay_ms")?
        {
            d if d.is_zero() => None,
            d => Some(d),
        };
        if let Some(path) = &self.notify {
            if !path.is_absolute() {
                return Err(field_error(
                    "vrrp.notify",
                    format!("{:?} is not an absolute path", path),
                ));
            }
        }
        let no_ready_backend_weight = match u8::try_from(self.no_ready_backend_weight) {
            Ok(w) if w <= 254 => w,
            _ => {
                return Err(field_error(
                    "vrrp.no_ready_backend_weight",
                    format!("{} is outside 0..=254", self.no_ready_backend_weight),
                ))
            }
        };
        Ok(Vrrp {
            vrid,
            priority,
            version,
            advert_interval_cs,
            preempt: self.preempt,
            preempt_delay,
            auth,
            v3_checksum,
            unicast_peers,
            garp_count: self.garp_count,
            garp_repeat_delay,
            notify: self.notify.clone(),
            no_ready_backend_weight,
        })
    }
}

fn delay(ms: u64, field: &str) -> Result<Duration, FieldError> {
    if ms > MAX_VRRP_DELAY_MS {
        return Err(field_error(
            field,
            format!("{ms} is outside 0..={MAX_VRRP_DELAY_MS}"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

fn timeout(secs: u64, field: &str) -> Result<Duration, FieldError> {
    if secs == 0 || secs > MAX_TIMEOUT_SECS {
        return Err(field_error(
            field,
            format!("{secs} is out of range 1..={MAX_TIMEOUT_SECS}"),
        ));
    }
    Ok(Duration::from_secs(secs))
}

impl ServiceSection {
    fn validate(&self, index: usize) -> Result<ServiceConfig, FieldError> {
        let at = |field: &str| format!("service[{index}].{field}");
        let vip = parse_unicast(&self.vip, &at("vip"))?;
        if self.port == 0 {
            return Err(field_error(at("port"), "port 0 is not a service port"));
        }
        if self.backends.is_empty() || self.backends.len() > MAX_BACKENDS {
            return Err(field_error(
                at("backends"),
                format!(
                    "{} backends configured, 1 to {MAX_BACKENDS} are supported",
                    self.backends.len()
                ),
            ));
        }
        let mut backends = Vec::with_capacity(self.backends.len());
        for (j, text) in self.backends.iter().enumerate() {
            let field = format!("service[{index}].backends[{j}]");
            let addr: SocketAddrV4 = text
                .parse()
                .map_err(|_| field_error(&field, format!("{text:?} is not an IPv4:port")))?;
            check_unicast(*addr.ip(), text, &field)?;
            if addr.port() == 0 {
                return Err(field_error(&field, format!("{text:?} has port 0")));
            }
            if backends.contains(&addr) {
                return Err(field_error(&field, format!("{addr} is listed twice")));
            }
            backends.push(addr);
        }
        Ok(ServiceConfig {
            vip,
            port: self.port,
            backends,
            scheduler: self.scheduler,
        })
    }
}

fn parse_unicast(text: &str, field: &str) -> Result<Ipv4Addr, FieldError> {
    let addr: Ipv4Addr = text
        .parse()
        .map_err(|_| field_error(field, format!("{text:?} is not an IPv4 address")))?;
    check_unicast(addr, text, field)?;
    Ok(addr)
}

fn check_unicast(addr: Ipv4Addr, text: &str, field: &str) -> Result<(), FieldError> {
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback() {
        return Err(field_error(
            field,
            format!("{text:?} is not a unicast address"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
interface = "eth0"
address = "198.18.0.1"
[dataplane]
xdp_mode = "native"
active = true
snat_port_min = 62000
snat_port_max = 62999
conntrack_flows = 1000
idle_timeout_secs = 60
closing_timeout_secs = 5
pin_dir = "/run/balancer-bpf/n1"
[[service]]
vip = "198.18.0.100"
port = 6380
backends = ["198.18.0.1:6380", "198.18.0.2:6380"]
[[service]]
vip = "198.18.0.100"
port = 6381
backends = ["198.18.0.3:7000"]
scheduler = "first"
"#;

    const MINIMAL: &str = r#"
[node]
interface = "eth0"
address = "198.18.0.1"
[[service]]
vip = "198.18.0.100"
port = 6380
backends = ["198.18.0.2:6380"]
"#;

    fn invalid(text: &str) -> FieldError {
        match parse(text, "balancer.toml") {
            Err(ConfigError::Invalid { problem, .. }) => problem,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    /// `MINIMAL` with `line` inserted after `[section]`'s header (added if
    /// missing).
    fn with(section: &str, line: &str) -> String {
        let header = format!("[{section}]\n");
        if MINIMAL.contains(&header) {
            MINIMAL.replacen(&header, &format!("{header}{line}\n"), 1)
        } else {
            format!("{MINIMAL}{header}{line}\n")
        }
    }

    #[test]
    fn good_config_parses_every_field() {
        let c = parse(GOOD, "balancer.toml").unwrap();
        assert_eq!(c.node.interface, "eth0");
        assert_eq!(c.node.address, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(c.dataplane.xdp_mode, XdpMode::Native);
        assert!(c.dataplane.active);
        assert_eq!(
            c.dataplane.snat_ports,
            SnatPortRange {
                min: 62000,
                max: 62999
            }
        );
        assert_eq!(c.dataplane.snat_ports.len(), 1000);
        assert_eq!(c.dataplane.conntrack_flows, 1000);
        assert_eq!(c.dataplane.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.dataplane.closing_timeout, Duration::from_secs(5));
        assert_eq!(c.dataplane.pin_dir, PathBuf::from("/run/balancer-bpf/n1"));
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].vip, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(c.services[0].port, 6380);
        assert_eq!(
            c.services[0].backends,
            vec![
                "198.18.0.1:6380".parse::<SocketAddrV4>().unwrap(),
                "198.18.0.2:6380".parse().unwrap()
            ]
        );
        assert_eq!(c.services[1].port, 6381);
        assert_eq!(c.services[0].scheduler, Scheduler::RoundRobin);
        assert_eq!(c.services[1].scheduler, Scheduler::First);
    }

    #[test]
    fn scheduler_names() {
        let svc = |v: &str| {
            MINIMAL.replace(
                "port = 6380\n",
                &format!("port = 6380\nscheduler = {v:?}\n"),
            )
        };
        for (name, want) in [
            ("round_robin", Scheduler::RoundRobin),
            ("roundrobin", Scheduler::RoundRobin),
            ("first", Scheduler::First),
        ] {
            let c = parse(&svc(name), "balancer.toml").unwrap();
            assert_eq!(c.services[0].scheduler, want, "{name}");
        }
        let err = crate::error_chain(&parse(&svc("leastconn"), "balancer.toml").unwrap_err());
        assert!(err.contains("leastconn") && err.contains("first"), "{err}");
    }

    #[test]
    fn defaults_apply_when_dataplane_is_missing() {
        let c = parse(MINIMAL, "balancer.toml").unwrap();
        let d = c.dataplane;
        assert_eq!(d.xdp_mode, XdpMode::Auto);
        assert!(!d.active);
        // Below Linux's default ip_local_port_range, the larger side.
        assert_eq!(
            d.snat_ports,
            SnatPortRange {
                min: 1024,
                max: 32767
            }
        );
        assert_eq!(d.conntrack_flows, 262_144);
        assert_eq!(d.idle_timeout, Duration::from_secs(300));
        assert_eq!(d.closing_timeout, Duration::from_secs(10));
        assert_eq!(d.pin_dir, PathBuf::from("/sys/fs/bpf/balancer"));
    }

    #[test]
    fn bad_backend_names_file_field_and_value() {
        let text = MINIMAL.replace(
            r#"backends = ["198.18.0.2:6380"]"#,
            r#"backends = ["198.18.0.3:6380", "198.18.0.2"]"#,
        );
        let err = parse(&text, "balancer.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"balancer.toml: service[0].backends[1]: "198.18.0.2" is not an IPv4:port"#
        );
    }

    #[test]
    fn unknown_field_is_rejected_with_file_and_name() {
        let err = parse(&with("dataplane", "activ = true"), "balancer.toml").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        let text = crate::error_chain(&err);
        assert!(text.starts_with("balancer.toml: invalid TOML: "), "{text}");
        assert!(text.contains("unknown field `activ`"), "{text}");
    }

    #[test]
    fn unknown_section_and_bad_mode_are_parse_errors() {
        for text in [
            with("nodes", "x = 1"),
            with("dataplane", r#"xdp_mode = "fast""#),
            with("dataplane", "snat_port_max = 70000"),
        ] {
            let err = parse(&text, "b.toml").unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        }
    }

    #[test]
    fn missing_required_fields_are_parse_errors() {
        let no_node = MINIMAL.replace(
            "[node]\ninterface = \"eth0\"\naddress = \"198.18.0.1\"\n",
            "",
        );
        let no_addr = MINIMAL.replace("address = \"198.18.0.1\"\n", "");
        for text in [no_node, no_addr] {
            let err = parse(&text, "b.toml").unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        }
    }

    #[test]
    fn each_invalid_field_is_named() {
        let cases: Vec<(String, &str)> = vec![
            (
                MINIMAL.replace(r#"interface = "eth0""#, r#"interface = """#),
                "node.interface",
            ),
            (
                MINIMAL.replace(
                    r#"interface = "eth0""#,
                    r#"interface = "a-very-long-ifname""#,
                ),
                "node.interface",
            ),
            (
                MINIMAL.replace(r#"address = "198.18.0.1""#, r#"address = "eth0""#),
                "node.address",
            ),
            (
                MINIMAL.replace(r#"address = "198.18.0.1""#, r#"address = "0.0.0.0""#),
                "node.address",
            ),
            (
                MINIMAL.replace(r#"address = "198.18.0.1""#, r#"address = "198.18.0.100""#),
                "node.address",
            ),
            (
                with("dataplane", "snat_port_min = 80\nsnat_port_max = 2000"),
                "dataplane.snat_port_min",
            ),
            (
                with("dataplane", "snat_port_min = 5000\nsnat_port_max = 4999"),
                "dataplane.snat_port_max",
            ),
            (
                with("dataplane", "conntrack_flows = 0"),
                "dataplane.conntrack_flows",
            ),
            (
                with("dataplane", "conntrack_flows = 100000000"),
                "dataplane.conntrack_flows",
            ),
            (
                with("dataplane", "idle_timeout_secs = 0"),
                "dataplane.idle_timeout_secs",
            ),
            (
                with("dataplane", "closing_timeout_secs = 0"),
                "dataplane.closing_timeout_secs",
            ),
            (
                with("dataplane", r#"pin_dir = "bpf/balancer""#),
                "dataplane.pin_dir",
            ),
            (with("dataplane", r#"pin_dir = "/""#), "dataplane.pin_dir"),
            (
                MINIMAL.replace(r#"vip = "198.18.0.100""#, r#"vip = "198.18.0""#),
                "service[0].vip",
            ),
            (
                MINIMAL.replace(r#"vip = "198.18.0.100""#, r#"vip = "224.0.0.18""#),
                "service[0].vip",
            ),
            (
                MINIMAL.replace("port = 6380", "port = 0"),
                "service[0].port",
            ),
            (
                MINIMAL.replace(r#"backends = ["198.18.0.2:6380"]"#, "backends = []"),
                "service[0].backends",
            ),
            (
                MINIMAL.replace("198.18.0.2:6380", "198.18.0.2:0"),
                "service[0].backends[0]",
            ),
            (
                MINIMAL.replace("198.18.0.2:6380", "255.255.255.255:6380"),
                "service[0].backends[0]",
            ),
            (
                MINIMAL.replace(
                    r#"["198.18.0.2:6380"]"#,
                    r#"["198.18.0.2:6380", "198.18.0.2:6380"]"#,
                ),
                "service[0].backends[1]",
            ),
            (
                MINIMAL.replace("198.18.0.2:6380", "198.18.0.100:6380"),
                "service[0].backends[0]",
            ),
            (format!("{MINIMAL}{}", service_block(6380, 1)), "service[1]"),
        ];
        for (text, field) in cases {
            let err = invalid(&text);
            assert_eq!(err.field, field, "{err} for\n{text}");
        }
    }

    fn service_block(port: u16, backends: usize) -> String {
        let list: Vec<String> = (0..backends)
            .map(|i| format!("\"198.18.1.{}:6380\"", i + 1))
            .collect();
        format!(
            "[[service]]\nvip = \"198.18.0.100\"\nport = {port}\nbackends = [{}]\n",
            list.join(", ")
        )
    }

    #[test]
    fn service_and_backend_counts_are_bounded() {
        let head = "[node]\ninterface = \"eth0\"\naddress = \"198.18.0.1\"\n";
        assert_eq!(invalid(head).field, "service");

        let max: String = (0..64).map(|i| service_block(1000 + i, 16)).collect();
        let c = parse(&format!("{head}{max}"), "b.toml").unwrap();
        assert_eq!(c.services.len(), 64);
        assert!(c.services.iter().all(|s| s.backends.len() == 16));

        let too_many: String = (0..65).map(|i| service_block(1000 + i, 1)).collect();
        assert_eq!(invalid(&format!("{head}{too_many}")).field, "service");

        let wide = format!("{head}{}", service_block(6380, 17));
        assert_eq!(invalid(&wide).field, "service[0].backends");
    }

    fn range(min: u16, max: u16) -> SnatPortRange {
        SnatPortRange { min, max }
    }

    #[test]
    fn default_snat_range_is_the_larger_side_outside_the_local_range() {
        assert_eq!(
            default_snat_ports(LINUX_LOCAL_PORT_RANGE),
            Some(range(1024, 32767))
        );
        assert_eq!(
            default_snat_ports(range(10000, 20000)),
            Some(range(20001, 65535))
        );
        assert_eq!(
            default_snat_ports(range(1024, 60000)),
            Some(range(60001, 65535))
        );
        assert_eq!(
            default_snat_ports(range(2000, 65535)),
            Some(range(1024, 1999))
        );
        assert_eq!(default_snat_ports(range(1024, 65535)), None);
        assert_eq!(default_snat_ports(range(500, 65535)), None);
        assert_eq!(
            default_snat_ports(range(100, 200)),
            Some(range(1024, 65535))
        );
    }

    #[test]
    fn local_port_range_is_read_as_the_kernel_prints_it() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Some(LINUX_LOCAL_PORT_RANGE)
        );
        assert_eq!(
            parse_local_port_range("1024 65535"),
            Some(range(1024, 65535))
        );
        assert_eq!(parse_local_port_range("60999 32768"), None);
        assert_eq!(parse_local_port_range("32768"), None);
        assert_eq!(parse_local_port_range("a b"), None);
    }

    #[test]
    fn snat_range_follows_the_nodes_local_port_range() {
        let c = parse_for(MINIMAL, "balancer.toml", range(40000, 65535)).unwrap();
        assert_eq!(c.dataplane.snat_ports, range(1024, 39999));
        let err = parse_for(MINIMAL, "balancer.toml", range(1024, 65535)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("dataplane.snat_port_min")
                && text.contains("ip_local_port_range (1024-65535)")
                && text.contains("shrink"),
            "{text}"
        );
    }

    #[test]
    fn snat_range_must_stay_clear_of_the_local_port_range() {
        let text = with("dataplane", "snat_port_min = 60000\nsnat_port_max = 65535");
        let err = parse(&text, "balancer.toml").unwrap_err().to_string();
        assert!(
            err.contains("dataplane.snat_port_min: 60000-65535 overlaps net.ipv4.ip_local_port_range (32768-60999)")
                && err.contains("1024-32767, the default"),
            "{err}"
        );
        // Just outside on either side is fine.
        for (min, max) in [(61000, 65535), (1024, 32767)] {
            let text = with(
                "dataplane",
                &format!("snat_port_min = {min}\nsnat_port_max = {max}"),
            );
            let c = parse(&text, "balancer.toml").unwrap();
            assert_eq!(c.dataplane.snat_ports, range(min, max));
        }
        for (line, field) in [
            ("snat_port_min = 2000", "dataplane.snat_port_max: missing"),
            ("snat_port_max = 2000", "dataplane.snat_port_min: missing"),
            (
                "snat_port_min = 1000\nsnat_port_max = 2000",
                "dataplane.snat_port_min: 1000 is below 1024",
            ),
            (
                "snat_port_min = 3000\nsnat_port_max = 2000",
                "the range is empty",
            ),
        ] {
            let err = parse(&with("dataplane", line), "balancer.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{line}: {err}");
        }
    }

    #[test]
    fn snat_addresses_are_checked() {
        let c = parse(
            &with(
                "dataplane",
                r#"snat_addresses = ["198.18.0.11", "198.18.0.12"]"#,
            ),
            "balancer.toml",
        )
        .unwrap();
        assert_eq!(
            c.dataplane.snat_addresses,
            vec![Ipv4Addr::new(198, 18, 0, 11), Ipv4Addr::new(198, 18, 0, 12)]
        );
        let text = summary(&c);
        assert!(
            text.contains("SNAT ports 1024-32767 (also from 198.18.0.11, 198.18.0.12),"),
            "{text}"
        );
        assert!(parse(MINIMAL, "b.toml")
            .unwrap()
            .dataplane
            .snat_addresses
            .is_empty());
        for (list, want) in [
            (
                r#"["198.18.0.11", "198.18.0.11"]"#,
                "dataplane.snat_addresses[1]: 198.18.0.11 is listed twice",
            ),
            (
                r#"["198.18.0.1"]"#,
                "dataplane.snat_addresses[0]: 198.18.0.1 is node.address",
            ),
            (
                r#"["198.18.0.100"]"#,
                "dataplane.snat_addresses[0]: 198.18.0.100 is a service VIP",
            ),
            (
                r#"["198.18.0.2"]"#,
                "dataplane.snat_addresses[0]: 198.18.0.2 is a backend's address",
            ),
            (r#"["224.0.0.1"]"#, "dataplane.snat_addresses[0]"),
            (
                r#"["x"]"#,
                "dataplane.snat_addresses[0]: \"x\" is not an IPv4 address",
            ),
            (
                r#"["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14", "198.18.0.15"]"#,
                "dataplane.snat_addresses: 5 addresses, at most 4",
            ),
        ] {
            let err = parse(
                &with("dataplane", &format!("snat_addresses = {list}")),
                "b.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{list}: {err}");
        }
    }

    #[test]
    fn single_port_snat_range_is_valid() {
        let text = with("dataplane", "snat_port_min = 2000\nsnat_port_max = 2000");
        let c = parse(&text, "b.toml").unwrap();
        assert_eq!(c.dataplane.snat_ports.len(), 1);
    }

    const VRRP_FULL: &str = r#"
[node]
interface = "eth0"
address = "198.18.0.1"
[dataplane]
pin_dir = "/run/balancer-bpf/n1"
[vrrp]
vrid = 101
priority = 150
version = 3
advert_interval_ms = 250
preempt = false
preempt_delay_ms = 1500
v3_checksum = "rfc9568"
unicast_peers = ["198.18.0.2", "198.18.0.3"]
garp_count = 3
garp_repeat_delay_ms = 0
notify = "/usr/local/bin/vrrp-notify"
no_ready_backend_weight = 60
[health]
interval_ms = 200
timeout_ms = 150
rise = 1
fall = 2
[[service]]
vip = "198.18.0.100"
port = 6380
backends = ["198.18.0.1:6380", "198.18.0.2:6380"]
[[service]]
vip = "198.18.0.100"
port = 6381
backends = ["198.18.0.1:6381"]
[[service]]
vip = "198.18.0.101"
port = 6380
backends = ["198.18.0.1:6380"]
"#;

    #[test]
    fn vrrp_section_parses_every_field() {
        let c = parse(VRRP_FULL, "b.toml").unwrap();
        let v = c.vrrp.clone().expect("[vrrp] present");
        assert_eq!(v.vrid, 101);
        assert_eq!(v.priority, 150);
        assert_eq!(v.version, Version::V3);
        assert_eq!(v.advert_interval_cs, 25);
        assert!(!v.preempt);
        assert_eq!(v.preempt_delay, Duration::from_millis(1500));
        assert_eq!(v.auth, Auth::None);
        assert_eq!(v.v3_checksum, V3Checksum::WithoutPseudoHeader);
        assert_eq!(
            v.unicast_peers,
            vec![Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)]
        );
        assert_eq!(v.garp_count, 3);
        assert_eq!(v.garp_repeat_delay, None);
        assert_eq!(v.notify, Some(PathBuf::from("/usr/local/bin/vrrp-notify")));
        assert_eq!(v.no_ready_backend_weight, 60);
        assert!(!c.dataplane.active);
        assert_eq!(c.health.interval_ms, 200);
        assert_eq!(c.health.timeout_ms, 150);
        assert_eq!((c.health.rise, c.health.fall), (1, 2));
        assert_eq!(
            c.vips(),
            vec![
                Ipv4Addr::new(198, 18, 0, 100),
                Ipv4Addr::new(198, 18, 0, 101)
            ]
        );
    }

    #[test]
    fn vrrp_defaults() {
        let c = parse(&with("vrrp", "vrid = 7"), "b.toml").unwrap();
        let v = c.vrrp.unwrap();
        assert_eq!(v.vrid, 7);
        assert_eq!(v.priority, 100);
        assert_eq!(v.version, Version::V3);
        assert_eq!(v.advert_interval_cs, 10);
        assert!(v.preempt);
        assert_eq!(v.preempt_delay, Duration::ZERO);
        assert_eq!(v.auth, Auth::None);
        assert_eq!(v.v3_checksum, V3Checksum::WithPseudoHeader);
        assert!(v.unicast_peers.is_empty());
        assert_eq!(v.garp_count, 5);
        assert_eq!(v.garp_repeat_delay, Some(Duration::from_secs(5)));
        assert_eq!(v.notify, None);
        assert_eq!(v.no_ready_backend_weight, 50);
        assert_eq!(c.health, HealthConfig::default());
        // Without [vrrp]: static mode, no election.
        assert_eq!(parse(MINIMAL, "b.toml").unwrap().vrrp, None);
    }

    #[test]
    fn vrrp_v2_with_password_as_keepalived_writes_it() {
        let c = parse(
            &with(
                "vrrp",
                "vrid = 101\nversion = 2\nadvert_interval_ms = 1000\nauth_pass = \"1111\"",
            ),
            "b.toml",
        )
        .unwrap();
        let v = c.vrrp.unwrap();
        assert_eq!(v.version, Version::V2);
        assert_eq!(v.advert_interval_cs, 100);
        assert_eq!(v.auth, Auth::pass("1111").unwrap());
    }

    #[test]
    fn vrrp_fields_are_named_in_errors() {
        let cases: &[(&str, &str)] = &[
            ("vrid = 0", "vrrp.vrid"),
            ("vrid = 256", "vrrp.vrid"),
            ("vrid = 1\npriority = 0", "vrrp.priority"),
            ("vrid = 1\npriority = 256", "vrrp.priority"),
            ("vrid = 1\nversion = 4", "vrrp.version"),
            (
                "vrid = 1\nadvert_interval_ms = 0",
                "vrrp.advert_interval_ms",
            ),
            (
                "vrid = 1\nadvert_interval_ms = 105",
                "vrrp.advert_interval_ms",
            ),
            (
                "vrid = 1\nadvert_interval_ms = 40960",
                "vrrp.advert_interval_ms",
            ),
            ("vrid = 1\nversion = 2", "vrrp.advert_interval_ms"),
            (
                "vrid = 1\nversion = 2\nadvert_interval_ms = 1500",
                "vrrp.advert_interval_ms",
            ),
            (
                "vrid = 1\nversion = 2\nadvert_interval_ms = 256000",
                "vrrp.advert_interval_ms",
            ),
            (
                "vrid = 1\npreempt_delay_ms = 3600001",
                "vrrp.preempt_delay_ms",
            ),
            ("vrid = 1\nauth_pass = \"1111\"", "vrrp.auth_pass"),
            (
                "vrid = 1\nversion = 2\nadvert_interval_ms = 1000\nauth_pass = \"\"",
                "vrrp.auth_pass",
            ),
            (
                "vrid = 1\nversion = 2\nadvert_interval_ms = 1000\nauth_pass = \"123456789\"",
                "vrrp.auth_pass",
            ),
            (
                "vrid = 1\nunicast_peers = [\"198.18.0\"]",
                "vrrp.unicast_peers[0]",
            ),
            (
                "vrid = 1\nunicast_peers = [\"198.18.0.2\", \"224.0.0.18\"]",
                "vrrp.unicast_peers[1]",
            ),
            (
                "vrid = 1\nunicast_peers = [\"198.18.0.1\"]",
                "vrrp.unicast_peers[0]",
            ),
            (
                "vrid = 1\nunicast_peers = [\"198.18.0.2\", \"198.18.0.2\"]",
                "vrrp.unicast_peers[1]",
            ),
            (
                "vrid = 1\nunicast_peers = [\"198.18.0.100\"]",
                "vrrp.unicast_peers[0]",
            ),
            ("vrid = 1\ngarp_count = 101", "vrrp.garp_count"),
            (
                "vrid = 1\ngarp_repeat_delay_ms = 3600001",
                "vrrp.garp_repeat_delay_ms",
            ),
            ("vrid = 1\nnotify = \"notify.sh\"", "vrrp.notify"),
            (
                "vrid = 1\nno_ready_backend_weight = 255",
                "vrrp.no_ready_backend_weight",
            ),
        ];
        for (lines, field) in cases {
            let err = invalid(&with("vrrp", lines));
            assert_eq!(err.field, *field, "{err} for {lines:?}");
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
    }

    #[test]
    fn vrrp_password_never_appears_in_errors() {
        let err = parse(
            &with(
                "vrrp",
                "vrid = 1\nversion = 2\nadvert_interval_ms = 1000\nauth_pass = \"sekret-pass\"",
            ),
            "b.toml",
        )
        .unwrap_err();
        let text = crate::error_chain(&err);
        assert!(text.contains("vrrp.auth_pass"), "{text}");
        assert!(!text.contains("sekret"), "{text}");
    }

    #[test]
    fn vrrp_and_static_active_are_exclusive() {
        for active in ["true", "false"] {
            let text = with("dataplane", &format!("active = {active}"));
            let err = invalid(&with_section(&text, "vrrp", "vrid = 1"));
            assert_eq!(err.field, "dataplane.active", "{err}");
        }
        // Static mode keeps working.
        let c = parse(&with("dataplane", "active = true"), "b.toml").unwrap();
        assert!(c.dataplane.active);
        assert_eq!(c.vrrp, None);
    }

    #[test]
    fn vrrp_unknown_field_and_bad_checksum_name_are_parse_errors() {
        for lines in [
            "vrid = 1\nadvert_int = 1",
            "vrid = 1\nv3_checksum = \"none\"",
            "priority = 100",
            "vrid = -1",
        ] {
            let err = parse(&with("vrrp", lines), "b.toml").unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{lines}: {err}");
        }
    }

    #[test]
    fn health_fields_are_named_in_errors() {
        let cases: &[(&str, &str)] = &[
            ("interval_ms = 5", "health.interval_ms"),
            ("timeout_ms = 0", "health.timeout_ms"),
            ("rise = 0", "health.rise"),
            ("fall = 0", "health.fall"),
            ("password_file = \"relative\"", "health.password_file"),
        ];
        for (line, field) in cases {
            let err = invalid(&with("health", line));
            assert_eq!(err.field, *field, "{err} for {line:?}");
        }
        let err = parse(&with("health", "intervall_ms = 100"), "b.toml").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    /// `text` with `line` inserted after `[section]`'s header (added if
    /// missing).
    fn with_section(text: &str, section: &str, line: &str) -> String {
        let header = format!("[{section}]\n");
        if text.contains(&header) {
            text.replacen(&header, &format!("{header}{line}\n"), 1)
        } else {
            format!("{text}{header}{line}\n")
        }
    }

    #[test]
    fn admin_defaults() {
        let c = parse(MINIMAL, "b.toml").unwrap();
        assert_eq!(c.admin, Admin::default());
        assert_eq!(c.admin.socket, PathBuf::from("/run/balancer/balancer.sock"));
        assert_eq!(
            c.admin.metrics_listen,
            Some("127.0.0.1:9638".parse().unwrap())
        );
    }

    #[test]
    fn admin_section_parses_every_field() {
        let c = parse(
            &with(
                "admin",
                "socket = \"/run/balancer-n1/admin.sock\"\nmetrics_listen = \"198.18.0.1:9100\"",
            ),
            "b.toml",
        )
        .unwrap();
        assert_eq!(c.admin.socket, PathBuf::from("/run/balancer-n1/admin.sock"));
        assert_eq!(
            c.admin.metrics_listen,
            Some("198.18.0.1:9100".parse().unwrap())
        );
        let v6 = parse(&with("admin", "metrics_listen = \"[::1]:9638\""), "b.toml").unwrap();
        assert_eq!(v6.admin.metrics_listen, Some("[::1]:9638".parse().unwrap()));
    }

    #[test]
    fn metrics_can_be_turned_off() {
        let c = parse(&with("admin", "metrics_listen = \"off\""), "b.toml").unwrap();
        assert_eq!(c.admin.metrics_listen, None);
        assert_eq!(c.admin.socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn admin_fields_are_named_in_errors() {
        let long = format!("/run/{}/balancer.sock", "x".repeat(100));
        let cases: Vec<(String, &str)> = vec![
            ("socket = \"balancer.sock\"".into(), "admin.socket"),
            ("socket = \"/\"".into(), "admin.socket"),
            (format!("socket = {long:?}"), "admin.socket"),
            ("metrics_listen = \"\"".into(), "admin.metrics_listen"),
            ("metrics_listen = \"9638\"".into(), "admin.metrics_listen"),
            (
                "metrics_listen = \"localhost:9638\"".into(),
                "admin.metrics_listen",
            ),
            (
                "metrics_listen = \"127.0.0.1\"".into(),
                "admin.metrics_listen",
            ),
            (
                "metrics_listen = \"127.0.0.1:0\"".into(),
                "admin.metrics_listen",
            ),
            ("metrics_listen = \"Off\"".into(), "admin.metrics_listen"),
        ];
        for (line, field) in cases {
            let err = invalid(&with("admin", &line));
            assert_eq!(err.field, field, "{err} for {line:?}");
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
        // The hint tells how to turn the endpoint off.
        let err = invalid(&with("admin", "metrics_listen = \"\""));
        assert!(err.message.contains("\"off\""), "{err}");
    }

    #[test]
    fn admin_unknown_field_and_wrong_type_are_parse_errors() {
        for line in [
            "sock = \"/run/b.sock\"",
            "metrics_listen = 9638",
            "metrics = false",
        ] {
            let err = parse(&with("admin", line), "b.toml").unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{line}: {err}");
        }
    }

    #[test]
    fn unreadable_file_names_it() {
        let err = load(Path::new("/nonexistent/balancer.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert_eq!(err.to_string(), "/nonexistent/balancer.toml: cannot read");
        assert!(crate::error_chain(&err).contains("No such file"));
    }
}
