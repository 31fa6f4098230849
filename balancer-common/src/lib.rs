//! Map keys, values and constants shared by the XDP program (`balancer-ebpf`)
//! and the agent (`balancer-user`).
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width integers with
//! explicit padding, and has its size asserted at compile time, because the
//! kernel sees these bytes through the map ABI. Byte order is stated per
//! field: addresses and ports copied from packets stay in **network byte
//! order** (the integer holds the wire bytes as-is); everything else is host
//! order.
//!
//! This crate is not the place for logic: only layout, constants, and the
//! one rule both sides must apply identically ([`HoldTimes::hold_ns`]: how
//! long a flow entry, and with it an SNAT port, is held in each TCP state),
//! because the agent's sweep and status must agree with the data plane.
#![no_std]

/// Bumped whenever a map's key or value layout changes. The agent pins maps
/// under `<pin root>/v<LAYOUT_VERSION>/`, so an agent of another layout never
/// reuses (and misreads) a map pinned by this one.
pub const LAYOUT_VERSION: u32 = 3;

/// Most (VIP, port) services one data plane serves.
pub const MAX_SERVICES: u32 = 64;
/// Most backends one service can have.
pub const MAX_BACKENDS: usize = 16;
/// Cursor slots of the `SNAT_CURSOR` array (a power of two).
pub const SNAT_CURSORS: u32 = 1024;
/// The `SNAT_CURSOR` slot after the cursors: per CPU, the turn of the
/// round robin over SNAT addresses.
pub const SNAT_ADDR_TURN: u32 = SNAT_CURSORS;
/// Most SNAT addresses besides the node's own (`snat_addresses`).
pub const MAX_SNAT_ADDRS: usize = 4;
/// Default number of flows the conntrack table holds (each remote flow takes
/// two entries, forward and reverse; see [`conntrack_entries`]).
pub const DEFAULT_CONNTRACK_FLOWS: u32 = 262_144;

/// Number of conntrack map entries needed for `flows` NATed flows.
pub const fn conntrack_entries(flows: u32) -> u32 {
    flows.saturating_mul(2)
}

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;

/// Map and program names as they appear in the object file and under the pin
/// directory (`bpftool map dump pinned <pin dir>/<NAME>`).
pub mod names {
    /// `HashMap<ServiceKey, Service>`: the configured services.
    pub const SERVICES: &str = "SERVICES";
    /// `LruHashMap<FlowKey, FlowEntry>`: NAT state, both directions.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// `Array<Settings, 1>`: node-wide settings written by the agent.
    pub const SETTINGS: &str = "SETTINGS";
    /// `PerCpuArray<u32, MAX_SERVICES>`: round-robin cursor per service.
    pub const RR_CURSOR: &str = "RR_CURSOR";
    /// `PerCpuArray<TrafficStats, MAX_SERVICES>`: per-service traffic.
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// `PerCpuArray<TrafficStats, MAX_SERVICES * MAX_BACKENDS>`: per-backend
    /// traffic, indexed by [`crate::backend_stats_index`].
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// `PerCpuArray<u64, counter::SLOTS>`: verdicts by reason.
    pub const COUNTERS: &str = "COUNTERS";
    /// `PerCpuArray<u32, SNAT_CURSORS + 1>`: per CPU and backend and SNAT
    /// address (by a hash of them), the index in this CPU's SNAT partition
    /// where the next probe starts; then [`crate::SNAT_ADDR_TURN`].
    pub const SNAT_CURSOR: &str = "SNAT_CURSOR";
    /// The data-plane program attached to the node's interface.
    pub const PROG_BALANCER: &str = "balancer";
    /// A program that only returns `XDP_PASS`: attached to the bridge-side
    /// veth peers in the lab (native XDP_TX on veth needs an XDP program on
    /// the receiving peer) and the baseline of the per-packet benchmark.
    pub const PROG_PASS: &str = "xdp_pass";
}

/// Index into `BACKEND_STATS` of backend `slot` of service `service_id`.
pub const fn backend_stats_index(service_id: u32, slot: u32) -> u32 {
    service_id * MAX_BACKENDS as u32 + slot
}

/// Key of the `SERVICES` map: a VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Virtual IPv4 address, network byte order.
    pub vip: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// IP protocol ([`IPPROTO_TCP`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// [`Backend::flags`]: the backend's address is this node's own; its traffic
/// is passed to the local stack unchanged.
pub const BACKEND_LOCAL: u16 = 1;

/// One backend of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// `BACKEND_*` flags, host order.
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

/// [`Service::flags`]: this node currently holds the service's VIP. Without
/// it the data plane passes the service's traffic untouched.
pub const SERVICE_ACTIVE: u32 = 1;
/// [`Service::flags`]: new connections go to the first READY backend in
/// configured order (`ready[0]`) instead of round robin, the others
/// standing by (HAProxy's `balance first`).
pub const SERVICE_SCHEDULER_FIRST: u32 = 2;

/// Value of the `SERVICES` map. The agent rewrites the whole value in one
/// map update whenever the holder flag or the READY set changes, so a packet
/// never sees a half-updated backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index of the service in the stats and cursor arrays, `< MAX_SERVICES`.
    pub id: u32,
    /// `SERVICE_*` flags.
    pub flags: u32,
    /// Number of valid entries in `ready`, `<= MAX_BACKENDS`.
    pub ready_count: u32,
    /// Number of configured entries in `backends`, `<= MAX_BACKENDS`.
    pub backend_count: u32,
    /// Slots (indices into `backends`) of the READY backends, ascending
    /// (configured order); only the first `ready_count` are meaningful.
    pub ready: [u8; MAX_BACKENDS],
    /// Every configured backend; its slot is stable for the agent's lifetime
    /// and indexes the per-backend stats.
    pub backends: [Backend; MAX_BACKENDS],
}
const _: () = assert!(core::mem::size_of::<Service>() == 160);

impl Service {
    pub const fn empty(id: u32) -> Self {
        Service {
            id,
            flags: 0,
            ready_count: 0,
            backend_count: 0,
            ready: [0; MAX_BACKENDS],
            backends: [Backend {
                addr: 0,
                port: 0,
                flags: 0,
            }; MAX_BACKENDS],
        }
    }
}

/// How long a flow entry is held after its last packet, by TCP state; all
/// nanoseconds. An SNAT port is free again once its reverse entry is absent
/// or held no longer (see [`HoldTimes::hold_ns`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldTimes {
    /// Established (the backend answered), no FIN or one FIN: forgotten
    /// after this long without packets.
    pub idle_ns: u64,
    /// Client closed first, the backend's FIN seen, the client's final ACK
    /// not yet seen.
    pub closing_ns: u64,
    /// Client closed first and acknowledged the backend's FIN: the backend
    /// keeps no TIME_WAIT; this only covers a lost final ACK.
    pub close_grace_ns: u64,
    /// Backend closed first: its socket sits in TIME_WAIT on the
    /// (backend, node:port) tuple for this long after the client's FIN.
    pub time_wait_ns: u64,
    /// The backend never answered the SYN: a SYN flood or a dead backend
    /// must not pin the range.
    pub embryonic_ns: u64,
}
const _: () = assert!(core::mem::size_of::<HoldTimes>() == 40);

/// Default [`HoldTimes::close_grace_ns`]: a couple of seconds covers a lost
/// final ACK and the backend's retransmitted FIN.
pub const CLOSE_GRACE_NS: u64 = 2_000_000_000;
/// Default [`HoldTimes::time_wait_ns`]: Linux's TIME_WAIT (`TCP_TIMEWAIT_LEN`).
pub const TIME_WAIT_NS: u64 = 60_000_000_000;
/// Default [`HoldTimes::embryonic_ns`]: longer than the client's first two
/// SYN retransmissions (1 s and 3 s after the first), which follow the flow.
pub const EMBRYONIC_NS: u64 = 5_000_000_000;

impl HoldTimes {
    /// How long an entry with `FLOW_*` `flags` is held after its
    /// `last_seen_ns`. Every state change stamps `last_seen_ns`, so the hold
    /// runs from the packet that decided it.
    #[inline(always)]
    pub const fn hold_ns(&self, flags: u32) -> u64 {
        if flags & FLOW_RESET != 0 {
            0
        } else if flags & FLOW_BOTH_FIN == FLOW_BOTH_FIN {
            if flags & FLOW_BACKEND_FIRST != 0 {
                self.time_wait_ns
            } else if flags & FLOW_LAST_ACK != 0 {
                self.close_grace_ns
            } else {
                self.closing_ns
            }
        } else if flags & FLOW_REPLIED == 0 {
            self.embryonic_ns
        } else {
            self.idle_ns
        }
    }

    /// Whether an entry with `flags`, last seen at `last_seen_ns`, is past
    /// its hold at `now_ns`. `>=`: with the coarse clock two packets often
    /// share a timestamp, and a hold of zero must mean "free now". A
    /// timestamp after `now_ns` (refreshed after the clock was read) is not
    /// expired.
    #[inline(always)]
    pub const fn expired(&self, flags: u32, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns >= last_seen_ns && now_ns - last_seen_ns >= self.hold_ns(flags)
    }
}

/// Value of the single `SETTINGS` entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// This node's IPv4 address, used as the source of NATed packets to
    /// remote backends; network byte order.
    pub node_addr: u32,
    /// First port of the SNAT range, host order.
    pub snat_port_min: u16,
    /// Last port of the SNAT range (inclusive), host order.
    pub snat_port_max: u16,
    /// Number of SNAT partitions, one per possible CPU: CPU `c` only ever
    /// allocates (and reclaims) ports `p` with `(p - snat_port_min) %
    /// snat_partitions == c`. 0 is read as 1.
    pub snat_partitions: u32,
    /// Number of valid entries in `snat_addrs`.
    pub snat_addr_count: u32,
    /// Hold times by state.
    pub holds: HoldTimes,
    /// SNAT source addresses besides `node_addr`, network byte order: each
    /// new flow takes the next of `node_addr` and these in turn (per CPU),
    /// so every address adds a full port range per backend.
    pub snat_addrs: [u32; MAX_SNAT_ADDRS],
}
const _: () = assert!(core::mem::size_of::<Settings>() == 72);

/// Key of the `CONNTRACK` map: a packet's 5-tuple as it arrives.
///
/// Forward entry: `client -> VIP`. Reverse entry: `backend -> node:snat`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source IPv4 address, network byte order.
    pub saddr: u32,
    /// Destination IPv4 address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// [`FlowEntry::direction`]: client to backend.
pub const DIR_TO_BACKEND: u8 = 0;
/// [`FlowEntry::direction`]: backend to client.
pub const DIR_TO_CLIENT: u8 = 1;

/// [`FlowEntry::flags`], kept the same in both entries of a flow: the
/// client sent FIN.
pub const FLOW_CLIENT_FIN: u32 = 1;
/// The backend sent FIN.
pub const FLOW_BACKEND_FIN: u32 = 2;
/// Both sides sent FIN.
pub const FLOW_BOTH_FIN: u32 = FLOW_CLIENT_FIN | FLOW_BACKEND_FIN;
/// The backend's FIN came before the client's: the backend holds TIME_WAIT.
pub const FLOW_BACKEND_FIRST: u32 = 4;
/// Client closed first, and a client ACK followed the backend's FIN.
pub const FLOW_LAST_ACK: u32 = 8;
/// A packet came back from the backend (the SYN was answered).
pub const FLOW_REPLIED: u32 = 16;
/// An RST was seen in either direction: the port is free at once.
pub const FLOW_RESET: u32 = 32;

/// Value of the `CONNTRACK` map: how to rewrite a packet of this direction.
///
/// The partner entry's key is `(nat_daddr, nat_saddr, nat_dport,
/// nat_sport)`: the rewritten tuple seen from the other side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// New source address, network byte order.
    pub nat_saddr: u32,
    /// New destination address, network byte order.
    pub nat_daddr: u32,
    /// New source port, network byte order.
    pub nat_sport: u16,
    /// New destination port, network byte order.
    pub nat_dport: u16,
    /// Egress interface index from the FIB lookup made when the flow began.
    pub ifindex: u32,
    /// Source MAC of the rewritten frame.
    pub eth_src: [u8; 6],
    /// Destination MAC of the rewritten frame (next hop).
    pub eth_dst: [u8; 6],
    /// Service the flow belongs to.
    pub service_id: u16,
    /// Backend slot within the service.
    pub backend_slot: u8,
    /// `DIR_*`.
    pub direction: u8,
    /// `FLOW_*` flags.
    pub flags: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the
    /// last packet, refreshed at most once a second, and on every change of
    /// `flags`.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 48);

/// Per-service or per-backend traffic (one copy per CPU; sum in user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    /// New connections (SYNs that created or chose this target).
    pub new_flows: u64,
    /// Of `packets`, those that came from a remote backend and were
    /// reverse-NATed to a client: proof that frames sent to it left the
    /// node and were answered.
    pub replies: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficStats>() == 32);

/// Slots of the `COUNTERS` per-CPU array: verdicts by reason.
pub mod counter {
    /// Not IPv4 (ARP, IPv6, ...): passed.
    pub const PASS_NOT_IPV4: u32 = 0;
    /// Frame too short for the headers it announces: passed untouched.
    pub const PASS_TRUNCATED: u32 = 1;
    /// IPv4 header with options: passed.
    pub const PASS_IP_OPTIONS: u32 = 2;
    /// IPv4 fragment: passed.
    pub const PASS_FRAGMENT: u32 = 3;
    /// Not TCP (VRRP, ICMP, UDP, ...): passed.
    pub const PASS_NOT_TCP: u32 = 4;
    /// TCP not to a service nor to an SNAT port of this node: passed.
    pub const PASS_NOT_SERVICE: u32 = 5;
    /// To a service whose VIP this node does not hold: passed.
    pub const PASS_INACTIVE: u32 = 6;
    /// New connection given to the local backend: passed.
    pub const PASS_LOCAL_BACKEND: u32 = 7;
    /// Non-SYN to a service with no conntrack entry (local flow, or one we
    /// forgot): passed, the local stack answers or resets it.
    pub const PASS_NO_FLOW: u32 = 8;
    /// SYN to a service with no READY backend: dropped.
    pub const DROP_NO_BACKEND: u32 = 9;
    /// No free SNAT port for the chosen backend: SYN dropped.
    pub const DROP_SNAT_EXHAUSTED: u32 = 10;
    /// Conntrack insert failed: SYN dropped, nothing left behind.
    pub const DROP_CONNTRACK_INSERT: u32 = 11;
    /// `bpf_fib_lookup` gave no next hop (e.g. neighbour unresolved):
    /// dropped before any rewrite.
    pub const DROP_FIB: u32 = 12;
    /// Packets NATed towards a backend.
    pub const FORWARDED: u32 = 13;
    /// Replies reverse-NATed towards a client.
    pub const REVERSED: u32 = 14;
    /// Remote flows created.
    pub const FLOWS_CREATED: u32 = 15;
    /// Flows ended by RST.
    pub const FLOWS_RESET: u32 = 16;
    /// Flows found expired (idle or closing timeout) on lookup.
    pub const FLOWS_EXPIRED: u32 = 17;
    /// SNAT ports taken over from an expired flow by the CPU owning them.
    pub const SNAT_RECLAIMED: u32 = 18;
    /// Number of slots in use.
    pub const COUNT: u32 = 19;
    /// Size of the array (room to add reasons without a layout bump).
    pub const SLOTS: u32 = 32;

    /// Stable snake_case names, indexed by slot, for logs and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ipv4",
        "pass_truncated",
        "pass_ip_options",
        "pass_fragment",
        "pass_not_tcp",
        "pass_not_service",
        "pass_inactive",
        "pass_local_backend",
        "pass_no_flow",
        "drop_no_backend",
        "drop_snat_exhausted",
        "drop_conntrack_insert",
        "drop_fib",
        "forwarded",
        "reversed",
        "flows_created",
        "flows_reset",
        "flows_expired",
        "snat_reclaimed",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for HoldTimes {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for TrafficStats {}
}
