//! The agent's configuration file (TOML): its serde shape, and [`validate`]
//! which turns it into a checked [`Config`] or an error naming the field.
//!
//! Parsing and validation are pure: nothing here touches the system, so a
//! bad file is rejected before the agent changes anything on the node.
//!
//! ```toml
//! [node]
//! interface = "eth0"
//! address = "198.18.0.1"
//! [dataplane]
//! active = true
//! [[service]]
//! vip = "198.18.0.100"
//! port = 6380
//! backends = ["198.18.0.1:6380", "198.18.0.2:6380"]
//! ```
//!
//! [`validate`]: ConfigFile::validate

use std::{
    collections::HashSet,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use balancer_common::{DEFAULT_CONNTRACK_FLOWS, MAX_BACKENDS, MAX_SERVICES};
use serde::Deserialize;

/// Default `[dataplane] pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/balancer";
/// Default first SNAT port.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61000;
/// Default last SNAT port.
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65535;
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
    /// The services (`[[service]]` tables). Required: 1 to 64 of them.
    #[serde(default)]
    pub service: Vec<ServiceSection>,
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
    /// This node holds the VIPs (stand-in until the VRRP election lands).
    /// Default `false`.
    #[serde(default)]
    pub active: bool,
    /// First source port used for NAT towards remote backends. Default 61000.
    #[serde(default = "default_snat_port_min")]
    pub snat_port_min: u16,
    /// Last source port (inclusive) used for NAT. Default 65535.
    #[serde(default = "default_snat_port_max")]
    pub snat_port_max: u16,
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
    /// Directory on a bpffs where maps and the XDP link are pinned, under
    /// `v<LAYOUT_VERSION>/`. Default `"/sys/fs/bpf/balancer"`.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
}

impl Default for DataplaneSection {
    fn default() -> Self {
        DataplaneSection {
            xdp_mode: XdpMode::default(),
            active: false,
            snat_port_min: DEFAULT_SNAT_PORT_MIN,
            snat_port_max: DEFAULT_SNAT_PORT_MAX,
            conntrack_flows: DEFAULT_CONNTRACK_FLOWS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            closing_timeout_secs: DEFAULT_CLOSING_TIMEOUT_SECS,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
        }
    }
}

fn default_snat_port_min() -> u16 {
    DEFAULT_SNAT_PORT_MIN
}
fn default_snat_port_max() -> u16 {
    DEFAULT_SNAT_PORT_MAX
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
    /// In file order; a service's index is its id in the data plane.
    pub services: Vec<ServiceConfig>,
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
    /// In round-robin order; the index is the backend's slot.
    pub backends: Vec<SocketAddrV4>,
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

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file)
}

/// Parses and validates `text`; `file` is only used in error messages.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let raw: ConfigFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
        file: file.to_string(),
        source,
    })?;
    raw.validate().map_err(|problem| ConfigError::Invalid {
        file: file.to_string(),
        problem,
    })
}

impl ConfigFile {
    /// Checks every field and returns the typed configuration, or the first
    /// problem found (fields in file order).
    pub fn validate(&self) -> Result<Config, FieldError> {
        let node = self.node.validate()?;
        let dataplane = self.dataplane.validate()?;

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
        if vips.contains(&node.address) {
            return Err(field_error(
                "node.address",
                format!("{} is also a service VIP", node.address),
            ));
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
            services,
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
    fn validate(&self) -> Result<Dataplane, FieldError> {
        if self.snat_port_min < MIN_SNAT_PORT {
            return Err(field_error(
                "dataplane.snat_port_min",
                format!(
                    "{} is below {MIN_SNAT_PORT}: SNAT ports must not be well-known ports",
                    self.snat_port_min
                ),
            ));
        }
        if self.snat_port_min > self.snat_port_max {
            return Err(field_error(
                "dataplane.snat_port_max",
                format!(
                    "{} is below snat_port_min ({})",
                    self.snat_port_max, self.snat_port_min
                ),
            ));
        }
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
            active: self.active,
            snat_ports: SnatPortRange {
                min: self.snat_port_min,
                max: self.snat_port_max,
            },
            conntrack_flows: self.conntrack_flows,
            idle_timeout,
            closing_timeout,
            pin_dir: self.pin_dir.clone(),
        })
    }
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
    }

    #[test]
    fn defaults_apply_when_dataplane_is_missing() {
        let c = parse(MINIMAL, "balancer.toml").unwrap();
        let d = c.dataplane;
        assert_eq!(d.xdp_mode, XdpMode::Auto);
        assert!(!d.active);
        assert_eq!(
            d.snat_ports,
            SnatPortRange {
                min: 61000,
                max: 65535
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
                with("dataplane", "snat_port_min = 80"),
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

    #[test]
    fn single_port_snat_range_is_valid() {
        let text = with("dataplane", "snat_port_min = 2000\nsnat_port_max = 2000");
        let c = parse(&text, "b.toml").unwrap();
        assert_eq!(c.dataplane.snat_ports.len(), 1);
    }

    #[test]
    fn unreadable_file_names_it() {
        let err = load(Path::new("/nonexistent/balancer.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert_eq!(err.to_string(), "/nonexistent/balancer.toml: cannot read");
        assert!(crate::error_chain(&err).contains("No such file"));
    }
}
