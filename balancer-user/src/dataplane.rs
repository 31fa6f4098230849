//! The loaded XDP data plane: loads [`crate::BPF_OBJECT`], fills the
//! `SETTINGS` and `SERVICES` maps, attaches the `balancer` program to the
//! node's interface and pins maps and link.
//!
//! Dropping a [`DataPlane`] detaches the program and unpins what it pinned.
//! How map values are laid out (byte orders) is decided here and only here,
//! by the pure functions [`settings_value`] and [`service_entry`].

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError},
    pin::PinError,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use balancer_common::{
    conntrack_entries, names, Backend, FlowEntry, FlowKey, HoldTimes, Service, ServiceKey,
    Settings, BACKEND_LOCAL, CLOSE_GRACE_NS, EMBRYONIC_NS, IPPROTO_TCP, MAX_BACKENDS,
    MAX_SNAT_ADDRS, SERVICE_ACTIVE, SERVICE_SCHEDULER_FIRST, TIME_WAIT_NS,
};
use tracing::{debug, info, warn};

use crate::{
    config::{Dataplane, Scheduler, ServiceConfig},
    error_chain,
    pins::LINK_PIN_NAME,
    xdp_mode::Plan,
};

/// The maps this agent pins, by name.
pub const PINNED_MAPS: [&str; 8] = [
    names::SERVICES,
    names::CONNTRACK,
    names::SETTINGS,
    names::RR_CURSOR,
    names::SERVICE_STATS,
    names::BACKEND_STATS,
    names::COUNTERS,
    names::SNAT_CURSOR,
];

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("cannot load the XDP object")]
    Load(#[source] Box<EbpfError>),
    #[error("the XDP object has no program {0:?}")]
    NoProgram(&'static str),
    #[error("the XDP object has no map {0:?}")]
    NoMap(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach XDP to interface {ifindex} in {mode} mode")]
    Attach {
        ifindex: u32,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the kernel attached XDP through netlink, not a bpf_link; \
         the attachment cannot be pinned"
    )]
    LinkNotPinnable,
    #[error("the XDP program is not attached")]
    NotAttached,
    #[error("cannot pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
}

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Generic,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IPv4 address as the data plane stores it: the wire bytes, read as a
/// native-endian integer ("network byte order").
pub fn addr_be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// A port as the data plane stores it: network byte order.
pub fn port_be(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The `SETTINGS` value for this node, whose SNAT range is split into
/// `partitions` parts, one per possible CPU.
pub fn settings_value(node_addr: Ipv4Addr, dataplane: &Dataplane, partitions: u32) -> Settings {
    let mut snat_addrs = [0; MAX_SNAT_ADDRS];
    let extra = &dataplane.snat_addresses[..dataplane.snat_addresses.len().min(MAX_SNAT_ADDRS)];
    for (slot, addr) in snat_addrs.iter_mut().zip(extra) {
        *slot = addr_be(*addr);
    }
    Settings {
        node_addr: addr_be(node_addr),
        snat_port_min: dataplane.snat_ports.min,
        snat_port_max: dataplane.snat_ports.max,
        snat_partitions: partitions.max(1),
        snat_addr_count: extra.len() as u32,
        holds: hold_times(dataplane),
        snat_addrs,
    }
}

/// The hold times by state: idle and closing from the config, the others
/// the defaults of `balancer_common`.
pub fn hold_times(dataplane: &Dataplane) -> HoldTimes {
    HoldTimes {
        idle_ns: duration_ns(dataplane.idle_timeout),
        closing_ns: duration_ns(dataplane.closing_timeout),
        close_grace_ns: CLOSE_GRACE_NS,
        time_wait_ns: TIME_WAIT_NS,
        embryonic_ns: EMBRYONIC_NS,
    }
}

/// The number of SNAT partitions: one per possible CPU, so that every CPU
/// the program can run on owns one (the kernel numbers possible CPUs from
/// 0 without holes on x86 and arm64).
pub fn snat_partitions() -> u32 {
    aya::util::nr_cpus()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
        .max(1)
}

fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The `SERVICES` entry of service `id`: every backend READY, backends for
/// which `is_local` holds flagged [`BACKEND_LOCAL`], [`SERVICE_ACTIVE`] set
/// when `active`.
pub fn service_entry(
    id: u32,
    service: &ServiceConfig,
    active: bool,
    is_local: impl Fn(Ipv4Addr) -> bool,
) -> (ServiceKey, Service) {
    let key = ServiceKey {
        vip: addr_be(service.vip),
        port: port_be(service.port),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let mut value = Service::empty(id);
    let count = service.backends.len().min(MAX_BACKENDS);
    for (slot, backend) in service.backends.iter().take(count).enumerate() {
        value.backends[slot] = Backend {
            addr: addr_be(*backend.ip()),
            port: port_be(backend.port()),
            flags: if is_local(*backend.ip()) {
                BACKEND_LOCAL
            } else {
                0
            },
        };
        value.ready[slot] = slot as u8;
    }
    value.backend_count = count as u32;
    value.ready_count = count as u32;
    if active {
        value.flags |= SERVICE_ACTIVE;
    }
    if service.scheduler == Scheduler::First {
        value.flags |= SERVICE_SCHEDULER_FIRST;
    }
    (key, value)
}

enum LinkState {
    Attached(XdpLink),
    Pinned(PinnedLink),
}

/// The loaded object, its attachment and its pins.
pub struct DataPlane {
    ebpf: Ebpf,
    link: Option<LinkState>,
    mode: Option<AttachMode>,
    pinned: Vec<PathBuf>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("mode", &self.mode)
            .field("pinned", &self.pinned)
            .finish()
    }
}

impl DataPlane {
    /// Loads the embedded object with a conntrack table for `flows` flows
    /// and loads (verifies) the `balancer` program. Attaches nothing.
    pub fn load(flows: u32) -> Result<DataPlane, DataPlaneError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::CONNTRACK, conntrack_entries(flows))
            .load(crate::BPF_OBJECT)
            .map_err(|e| DataPlaneError::Load(Box::new(e)))?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(|source| DataPlaneError::Program {
            name: names::PROG_BALANCER,
            source,
        })?;
        info!(
            conntrack_entries = conntrack_entries(flows),
            "loaded the XDP object"
        );
        Ok(DataPlane {
            ebpf,
            link: None,
            mode: None,
            pinned: Vec::new(),
        })
    }

    /// Starts forwarding the object's aya-log records to the `log` facade
    /// (and so to tracing). `None` when the object has no log map.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                debug!(error = %error_chain(&error), "no aya-log records from the XDP program");
                None
            }
        }
    }

    pub fn write_settings(&mut self, settings: &Settings) -> Result<(), DataPlaneError> {
        let name = names::SETTINGS;
        let map = self.ebpf.map_mut(name).ok_or(DataPlaneError::NoMap(name))?;
        let mut array: Array<&mut MapData, Settings> =
            Array::try_from(map).map_err(|source| DataPlaneError::Map { name, source })?;
        array
            .set(0, settings, 0)
            .map_err(|source| DataPlaneError::Map { name, source })
    }

    /// Writes one `SERVICES` entry per service and hands back the table
    /// that keeps them up to date from now on (holder flag, READY sets).
    /// Pin the maps first: this moves the map out of the object.
    pub fn take_service_table(
        &mut self,
        services: Vec<(ServiceKey, Service)>,
    ) -> Result<ServiceTable, DataPlaneError> {
        let name = names::SERVICES;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DataPlaneError::NoMap(name))?;
        let map = HashMap::try_from(map).map_err(|source| DataPlaneError::Map { name, source })?;
        let mut table = ServiceTable {
            map,
            entries: services,
        };
        for i in 0..table.entries.len() {
            table.store(i)?;
        }
        Ok(table)
    }

    /// Attaches the program to `ifindex` as [`crate::xdp_mode::choose`]
    /// planned: native, falling back to generic with a warning when the
    /// plan allows it, or generic.
    pub fn attach(&mut self, ifindex: u32, plan: &Plan) -> Result<AttachMode, DataPlaneError> {
        let attached = match plan {
            Plan::Native { fallback: false } => self.attach_as(ifindex, AttachMode::Native)?,
            Plan::Native { fallback: true } => match self.attach_as(ifindex, AttachMode::Native) {
                Ok(m) => m,
                Err(error) => {
                    warn!(
                        ifindex,
                        error = %error_chain(&error),
                        "native XDP unavailable, falling back to generic mode"
                    );
                    self.attach_as(ifindex, AttachMode::Generic)?
                }
            },
            Plan::Generic { reason } => {
                if let Some(reason) = reason {
                    warn!(ifindex, %reason, "xdp_mode = \"auto\" chose generic mode");
                }
                self.attach_as(ifindex, AttachMode::Generic)?
            }
        };
        info!(ifindex, mode = %attached, "attached the XDP program");
        Ok(attached)
    }

    fn attach_as(&mut self, ifindex: u32, mode: AttachMode) -> Result<AttachMode, DataPlaneError> {
        let flags = match mode {
            AttachMode::Native => AyaXdpMode::Driver,
            AttachMode::Generic => AyaXdpMode::Skb,
        };
        let program = xdp_program(&mut self.ebpf)?;
        let id = program
            .attach_to_if_index(ifindex, flags)
            .map_err(|source| DataPlaneError::Attach {
                ifindex,
                mode: mode.as_str(),
                source,
            })?;
        let link = program
            .take_link(id)
            .map_err(|source| DataPlaneError::Program {
                name: names::PROG_BALANCER,
                source,
            })?;
        self.link = Some(LinkState::Attached(link));
        self.mode = Some(mode);
        Ok(mode)
    }

    /// Pins every map in [`PINNED_MAPS`] as `dir/<NAME>`.
    pub fn pin_maps(&mut self, dir: &Path) -> Result<(), DataPlaneError> {
        for name in PINNED_MAPS {
            let map = self.ebpf.map(name).ok_or(DataPlaneError::NoMap(name))?;
            let path = dir.join(name);
            map.pin(&path).map_err(|source| DataPlaneError::Pin {
                path: path.clone(),
                source,
            })?;
            self.pinned.push(path);
        }
        debug!(dir = %dir.display(), "pinned the maps");
        Ok(())
    }

    /// Pins the XDP link as `dir/xdp_link`. Call last: its appearance tells
    /// observers the data plane is ready.
    pub fn pin_link(&mut self, dir: &Path) -> Result<PathBuf, DataPlaneError> {
        let path = dir.join(LINK_PIN_NAME);
        let link = match self.link.take() {
            Some(LinkState::Attached(link)) => link,
            Some(pinned @ LinkState::Pinned(_)) => {
                self.link = Some(pinned);
                return Ok(path);
            }
            None => return Err(DataPlaneError::NotAttached),
        };
        // A netlink attachment cannot become an FdLink; it is detached when
        // `link` drops here.
        let fd_link = FdLink::try_from(link).map_err(|_| DataPlaneError::LinkNotPinnable)?;
        let pinned = fd_link.pin(&path).map_err(|source| DataPlaneError::Pin {
            path: path.clone(),
            source,
        })?;
        self.link = Some(LinkState::Pinned(pinned));
        Ok(path)
    }

    /// Moves the `CONNTRACK` map out, for the expiry sweep. Pin it first.
    pub fn take_conntrack(
        &mut self,
    ) -> Result<HashMap<MapData, FlowKey, FlowEntry>, DataPlaneError> {
        let name = names::CONNTRACK;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DataPlaneError::NoMap(name))?;
        HashMap::try_from(map).map_err(|source| DataPlaneError::Map { name, source })
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataPlaneError> {
    let name = names::PROG_BALANCER;
    ebpf.program_mut(name)
        .ok_or(DataPlaneError::NoProgram(name))?
        .try_into()
        .map_err(|source| DataPlaneError::Program { name, source })
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        match self.link.take() {
            Some(LinkState::Pinned(pinned)) => match pinned.unpin() {
                // Closing the last reference detaches the program.
                Ok(fd_link) => drop(fd_link),
                Err(error) => warn!(%error, "could not unpin the XDP link"),
            },
            Some(LinkState::Attached(link)) => drop(link),
            None => {}
        }
        if let Some(mode) = self.mode.take() {
            info!(%mode, "detached the XDP program");
        }
        for path in self.pinned.drain(..) {
            if let Err(error) = std::fs::remove_file(&path) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %path.display(), %error, "could not unpin map");
                }
            }
        }
    }
}

/// Backends of `services` that are not local, without duplicates, in
/// configuration order.
pub fn remote_backends(
    services: &[ServiceConfig],
    is_local: impl Fn(Ipv4Addr) -> bool,
) -> Vec<SocketAddrV4> {
    let mut out: Vec<SocketAddrV4> = Vec::new();
    for backend in services.iter().flat_map(|s| &s.backends) {
        if !is_local(*backend.ip()) && !out.contains(backend) {
            out.push(*backend);
        }
    }
    out
}

/// The `SERVICES` map and the values the agent last wrote to it. Every
/// change rewrites a service's whole value in one map update, so a packet
/// sees either the old or the new backend set, never a mix.
pub struct ServiceTable {
    map: HashMap<MapData, ServiceKey, Service>,
    entries: Vec<(ServiceKey, Service)>,
}

impl std::fmt::Debug for ServiceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTable")
            .field("entries", &self.entries)
            .finish()
    }
}

impl ServiceTable {
    /// Number of services.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value last written for service `id`.
    pub fn get(&self, id: usize) -> Option<&Service> {
        self.entries.get(id).map(|(_, v)| v)
    }

    /// Sets or clears [`SERVICE_ACTIVE`] on every service.
    pub fn set_active(&mut self, active: bool) -> Result<(), DataPlaneError> {
        for i in 0..self.entries.len() {
            let value = &mut self.entries[i].1;
            if active {
                value.flags |= SERVICE_ACTIVE;
            } else {
                value.flags &= !SERVICE_ACTIVE;
            }
            self.store(i)?;
        }
        Ok(())
    }

    /// Whether this node currently serves the VIPs.
    pub fn is_active(&self) -> bool {
        self.entries
            .first()
            .is_some_and(|(_, v)| v.flags & SERVICE_ACTIVE != 0)
    }

    /// Makes `slots` (indices into the service's backends, in round-robin
    /// order) the READY set of service `id`. Unknown or repeated slots are
    /// ignored.
    pub fn set_ready(&mut self, id: usize, slots: &[u8]) -> Result<(), DataPlaneError> {
        let Some((_, value)) = self.entries.get_mut(id) else {
            return Ok(());
        };
        let mut ready = [0u8; MAX_BACKENDS];
        let mut n = 0usize;
        for &slot in slots {
            if (slot as u32) < value.backend_count
                && !ready[..n].contains(&slot)
                && n < MAX_BACKENDS
            {
                ready[n] = slot;
                n += 1;
            }
        }
        value.ready = ready;
        value.ready_count = n as u32;
        self.store(id)
    }

    fn store(&mut self, id: usize) -> Result<(), DataPlaneError> {
        let (key, value) = &self.entries[id];
        self.map
            .insert(key, value, 0)
            .map_err(|source| DataPlaneError::Map {
                name: names::SERVICES,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{SnatPortRange, XdpMode};

    fn service() -> ServiceConfig {
        ServiceConfig {
            vip: Ipv4Addr::new(198, 18, 0, 100),
            port: 6380,
            backends: vec![
                "198.18.0.1:6380".parse().unwrap(),
                "198.18.0.2:7000".parse().unwrap(),
            ],
            scheduler: Scheduler::RoundRobin,
        }
    }

    #[test]
    fn addresses_and_ports_keep_wire_bytes() {
        assert_eq!(
            addr_be(Ipv4Addr::new(198, 18, 0, 100)).to_ne_bytes(),
            [198, 18, 0, 100]
        );
        assert_eq!(port_be(6380).to_ne_bytes(), [0x18, 0xEC]);
    }

    #[test]
    fn service_entry_flags_local_backends_and_readies_all() {
        let local = Ipv4Addr::new(198, 18, 0, 1);
        let (key, value) = service_entry(3, &service(), true, |a| a == local);
        assert_eq!(key.vip.to_ne_bytes(), [198, 18, 0, 100]);
        assert_eq!(key.port.to_ne_bytes(), 6380u16.to_be_bytes());
        assert_eq!(key.proto, IPPROTO_TCP);
        assert_eq!(value.id, 3);
        assert_eq!(value.flags, SERVICE_ACTIVE);
        assert_eq!(value.backend_count, 2);
        assert_eq!(value.ready_count, 2);
        assert_eq!(&value.ready[..2], &[0, 1]);
        assert_eq!(value.backends[0].flags, BACKEND_LOCAL);
        assert_eq!(value.backends[1].flags, 0);
        assert_eq!(value.backends[1].addr.to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(value.backends[1].port.to_ne_bytes(), 7000u16.to_be_bytes());
        assert_eq!(value.backends[2], Backend::default());

        let (_, inactive) = service_entry(3, &service(), false, |_| false);
        assert_eq!(inactive.flags, 0);
        assert!(inactive.backends[..2].iter().all(|b| b.flags == 0));
    }

    #[test]
    fn scheduler_first_is_a_service_flag() {
        let first = ServiceConfig {
            scheduler: Scheduler::First,
            ..service()
        };
        let (_, value) = service_entry(0, &first, true, |_| false);
        assert_eq!(value.flags, SERVICE_ACTIVE | SERVICE_SCHEDULER_FIRST);
        let (_, value) = service_entry(0, &service(), false, |_| false);
        assert_eq!(value.flags & SERVICE_SCHEDULER_FIRST, 0);
    }

    #[test]
    fn settings_use_network_order_address_and_host_order_ports() {
        let dp = Dataplane {
            xdp_mode: XdpMode::Auto,
            active: true,
            snat_ports: SnatPortRange {
                min: 61000,
                max: 65535,
            },
            conntrack_flows: 10,
            idle_timeout: Duration::from_secs(300),
            closing_timeout: Duration::from_secs(10),
            snat_addresses: vec![Ipv4Addr::new(198, 18, 0, 11)],
            pin_dir: PathBuf::from("/sys/fs/bpf/balancer"),
        };
        let s = settings_value(Ipv4Addr::new(198, 18, 0, 1), &dp, 4);
        assert_eq!(s.snat_addr_count, 1);
        assert_eq!(s.snat_addrs[0].to_ne_bytes(), [198, 18, 0, 11]);
        assert_eq!(s.snat_addrs[1], 0);
        assert_eq!(s.node_addr.to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(s.snat_port_min, 61000);
        assert_eq!(s.snat_port_max, 65535);
        assert_eq!(s.snat_partitions, 4);
        assert_eq!(s.holds.idle_ns, 300_000_000_000);
        assert_eq!(s.holds.closing_ns, 10_000_000_000);
        assert_eq!(s.holds.time_wait_ns, 60_000_000_000);
        assert_eq!(
            settings_value(Ipv4Addr::LOCALHOST, &dp, 0).snat_partitions,
            1
        );
    }

    #[test]
    fn remote_backends_are_deduplicated() {
        let local = Ipv4Addr::new(198, 18, 0, 1);
        let mut other = service();
        other.port = 6381;
        other.backends.push("198.18.0.3:6380".parse().unwrap());
        let remote = remote_backends(&[service(), other], |a| a == local);
        assert_eq!(
            remote,
            vec![
                "198.18.0.2:7000".parse::<SocketAddrV4>().unwrap(),
                "198.18.0.3:6380".parse().unwrap()
            ]
        );
    }
}
