//! The agent's side of `CONNTRACK`: the expiry sweep, and purging the
//! flows of a backend taken out of service.
//!
//! Expiry: the XDP program only notices an expired flow when a packet of
//! it arrives. Every [`SWEEP_INTERVAL`] this module walks `CONNTRACK`,
//! deletes the forward entries (client -> VIP) past their hold, and counts
//! the SNAT ports still held per backend. How long an entry is held is
//! [`HoldTimes::hold_ns`], the data plane's own rule. Reverse entries
//! (backend -> node:port) are never deleted here: each is the claim on an
//! SNAT port, and only the CPU owning the port may take it over (an
//! expired one is free already; the data plane reclaims it when its cursor
//! comes round, and LRU eviction prefers it when the table is full).
//! Deleting one from here could race the owner handing the port to a new
//! flow and delete that flow's claim. Timestamps are
//! `bpf_ktime_get_coarse_ns()`, i.e. `CLOCK_MONOTONIC` at tick resolution.
//!
//! Purge ([`purge_backends`]): deletes both entries of every flow of given
//! (service, backend) pairs and returns the flows, so that
//! [`crate::flow_reset`] can tell their clients. The client's next packet
//! then finds no flow, XDP passes it and the local stack answers with an
//! RST.

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    time::Duration,
};

use crate::error_chain;
use aya::maps::{HashMap, IterableMap, Map, MapData, MapError};
use balancer_common::{FlowEntry, FlowKey, HoldTimes, DIR_TO_BACKEND, DIR_TO_CLIENT, IPPROTO_TCP};
use tracing::{debug, info, warn};

/// The `CONNTRACK` map as user space holds it.
pub type ConntrackMap = HashMap<MapData, FlowKey, FlowEntry>;

/// How often the table is swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The hold times the sweep applies: the data plane's, from `SETTINGS`.
pub type FlowTimeouts = HoldTimes;

/// Whether `entry` is past its hold at `now_ns` (the data plane's rule).
pub fn expired(timeouts: &FlowTimeouts, entry: &FlowEntry, now_ns: u64) -> bool {
    timeouts.expired(entry.flags, entry.last_seen_ns, now_ns)
}

/// Key of the other direction's entry of the same flow.
pub fn partner_key(entry: &FlowEntry) -> FlowKey {
    FlowKey {
        saddr: entry.nat_daddr,
        daddr: entry.nat_saddr,
        sport: entry.nat_dport,
        dport: entry.nat_sport,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// What the sweep does with one entry at `now_ns`: delete it (a forward
/// entry past its hold), count it as an SNAT port held towards its backend
/// (a reverse entry within its hold), or leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepAction {
    Delete,
    HoldsPort(SocketAddrV4),
    Keep,
}

/// The sweep's decision for one entry. Pure.
pub fn sweep_action(
    key: &FlowKey,
    entry: &FlowEntry,
    timeouts: &FlowTimeouts,
    now_ns: u64,
) -> SweepAction {
    let past = expired(timeouts, entry, now_ns);
    match entry.direction {
        DIR_TO_BACKEND if past => SweepAction::Delete,
        DIR_TO_CLIENT if !past => SweepAction::HoldsPort(sock(key.saddr, key.sport)),
        _ => SweepAction::Keep,
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns()`.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries seen.
    pub entries: usize,
    /// Entries deleted.
    pub deleted: usize,
    /// SNAT ports held (reverse entries within their hold), per backend.
    pub snat_in_use: BTreeMap<SocketAddrV4, u32>,
}

/// Walks the table once, deletes the forward entries past their hold and
/// counts the SNAT ports held. Blocking (one syscall per entry): run it off
/// the async threads.
pub fn sweep(
    table: &mut HashMap<MapData, FlowKey, FlowEntry>,
    timeouts: FlowTimeouts,
    max_entries: usize,
) -> SweepReport {
    let now_ns = monotonic_now_ns();
    let mut report = SweepReport::default();
    let mut doomed = Vec::new();
    // Deleting while iterating restarts the kernel's key walk, so collect
    // first. Entries vanishing mid-walk (the data plane deletes too) are
    // skipped; the bound stops a walk that keeps restarting.
    for item in table.iter().take(max_entries.saturating_mul(2)) {
        match item {
            Ok((key, entry)) => {
                report.entries += 1;
                match sweep_action(&key, &entry, &timeouts, now_ns) {
                    SweepAction::Delete => doomed.push(key),
                    SweepAction::HoldsPort(backend) => {
                        *report.snat_in_use.entry(backend).or_default() += 1
                    }
                    SweepAction::Keep => {}
                }
            }
            Err(MapError::KeyNotFound) => {}
            Err(error) => {
                warn!(error = %error_chain(&error), "conntrack walk stopped early");
                break;
            }
        }
    }
    for key in doomed {
        // The walk took a while: the client may have reused its port for a
        // new flow since. Look again right before deleting.
        if !still_expired(table.get(&key, 0).ok(), timeouts, now_ns) {
            continue;
        }
        match table.remove(&key) {
            Ok(()) => report.deleted += 1,
            // Gone already: the data plane removed it (RST, expiry on lookup).
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => warn!(error = %error_chain(&error), "could not delete a conntrack entry"),
        }
    }
    report
}

/// Whether the entry found under a doomed key right before its deletion
/// is still a forward entry past its hold; `None` (gone already) needs no
/// deletion either.
pub fn still_expired(current: Option<FlowEntry>, timeouts: FlowTimeouts, now_ns: u64) -> bool {
    current.is_some_and(|e| e.direction == DIR_TO_BACKEND && expired(&timeouts, &e, now_ns))
}

/// A second handle on the same kernel map (a duplicated descriptor), for a
/// task other than the sweeper.
pub fn another_handle(table: &ConntrackMap) -> Result<ConntrackMap, MapError> {
    let fd = table
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|io_error| aya::sys::SyscallError {
            call: "dup",
            io_error,
        })?;
    HashMap::try_from(Map::from_map_data(MapData::from_fd(fd)?)?)
}

/// The flows of one backend of one service: what [`purge_backends`] looks
/// for. A backend shared by two services can leave one and stay in the
/// other, so the service is part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceBackend {
    /// The service's id (its index in `SERVICES` values and stats).
    pub service_id: u32,
    /// The backend's address and port.
    pub backend: SocketAddrV4,
}

/// One NATed flow, with the addresses of both of its legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatFlow {
    /// The service it belongs to.
    pub service_id: u32,
    /// The client's address and port.
    pub client: SocketAddrV4,
    /// The address the client talks to: VIP and service port.
    pub vip: SocketAddrV4,
    /// This node's address and the flow's SNAT port: the source the
    /// backend sees.
    pub snat: SocketAddrV4,
    /// The backend.
    pub backend: SocketAddrV4,
}

fn wire_addr(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

fn wire_port(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

fn sock(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(wire_addr(addr), wire_port(port))
}

/// The flow an entry belongs to, and the keys of its forward and reverse
/// entries. `None` for an entry of unknown direction.
pub fn nat_flow(key: &FlowKey, entry: &FlowEntry) -> Option<(NatFlow, [FlowKey; 2])> {
    let service_id = u32::from(entry.service_id);
    match entry.direction {
        // Key client -> VIP; rewritten to node:snat -> backend.
        DIR_TO_BACKEND => Some((
            NatFlow {
                service_id,
                client: sock(key.saddr, key.sport),
                vip: sock(key.daddr, key.dport),
                snat: sock(entry.nat_saddr, entry.nat_sport),
                backend: sock(entry.nat_daddr, entry.nat_dport),
            },
            [*key, partner_key(entry)],
        )),
        // Key backend -> node:snat; rewritten to VIP -> client.
        DIR_TO_CLIENT => Some((
            NatFlow {
                service_id,
                client: sock(entry.nat_daddr, entry.nat_dport),
                vip: sock(entry.nat_saddr, entry.nat_sport),
                snat: sock(key.daddr, key.dport),
                backend: sock(key.saddr, key.sport),
            },
            [partner_key(entry), *key],
        )),
        _ => None,
    }
}

/// The flows among `entries` that belong to one of `targets`, each once
/// (a flow is usually seen through both of its entries), with the keys of
/// both of their entries. Pure.
pub fn flows_to_purge(
    entries: impl IntoIterator<Item = (FlowKey, FlowEntry)>,
    targets: &HashSet<ServiceBackend>,
) -> Vec<(NatFlow, [FlowKey; 2])> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (key, entry) in entries {
        let Some((flow, keys)) = nat_flow(&key, &entry) else {
            continue;
        };
        let target = ServiceBackend {
            service_id: flow.service_id,
            backend: flow.backend,
        };
        if targets.contains(&target) && seen.insert(keys[0]) {
            out.push((flow, keys));
        }
    }
    out
}

/// What one purge did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PurgeReport {
    /// Entries seen in the walk.
    pub entries: usize,
    /// The flows found, each purged (both of its entries deleted, or
    /// already gone).
    pub flows: Vec<NatFlow>,
    /// Entries deleted.
    pub deleted: usize,
}

/// Deletes both entries of every flow of `targets` from `table` and returns
/// the flows. Blocking (one syscall per entry): run it off the async
/// threads. Flows created while the walk runs may be missed: take the
/// backend out of the service's READY set first, so that none are.
pub fn purge_backends(
    table: &mut ConntrackMap,
    targets: &HashSet<ServiceBackend>,
    max_entries: usize,
) -> PurgeReport {
    let mut report = PurgeReport::default();
    if targets.is_empty() {
        return report;
    }
    let mut entries = Vec::new();
    // Collect first: deleting while iterating restarts the kernel's walk.
    for item in table.iter().take(max_entries.saturating_mul(2)) {
        match item {
            Ok(pair) => {
                report.entries += 1;
                entries.push(pair);
            }
            Err(MapError::KeyNotFound) => {}
            Err(error) => {
                warn!(error = %error_chain(&error), "conntrack walk stopped early");
                break;
            }
        }
    }
    for (flow, keys) in flows_to_purge(entries, targets) {
        for key in keys {
            // The walk took a while: a port of a resting flow may have been
            // taken over by the CPU owning it, for a new flow (of another
            // service sharing the backend). Delete only what still belongs
            // to the flow found.
            if !still_of(&flow, &key, table.get(&key, 0).ok()) {
                continue;
            }
            match table.remove(&key) {
                Ok(()) => report.deleted += 1,
                // Gone already: the data plane removed it (RST, expiry).
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => {
                    warn!(error = %error_chain(&error), "could not delete a conntrack entry")
                }
            }
        }
        report.flows.push(flow);
    }
    report
}

/// Whether `current`, found under `key` right before a purge deletes it,
/// still belongs to `flow`; `None` (gone already) needs no deletion.
pub fn still_of(flow: &NatFlow, key: &FlowKey, current: Option<FlowEntry>) -> bool {
    current
        .and_then(|e| nat_flow(key, &e))
        .is_some_and(|(f, _)| f == *flow)
}

/// Sweeps `table` every [`SWEEP_INTERVAL`] until the task is aborted;
/// after each sweep, `entries` is the number of entries it left (the table
/// starts empty, so 0 before the first) and `snat_in_use` the SNAT ports
/// held per backend.
pub async fn run_sweeper(
    table: HashMap<MapData, FlowKey, FlowEntry>,
    timeouts: FlowTimeouts,
    max_entries: usize,
    entries: tokio::sync::watch::Sender<usize>,
    snat_in_use: tokio::sync::watch::Sender<BTreeMap<SocketAddrV4, u32>>,
) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await; // the first tick is immediate: nothing to sweep yet
    let mut table = Some(table);
    loop {
        interval.tick().await;
        let Some(mut t) = table.take() else { return };
        let joined = tokio::task::spawn_blocking(move || {
            let report = sweep(&mut t, timeouts, max_entries);
            (t, report)
        })
        .await;
        match joined {
            Ok((t, report)) => {
                table = Some(t);
                entries.send_replace(report.entries.saturating_sub(report.deleted));
                snat_in_use.send_replace(report.snat_in_use.clone());
                if report.deleted > 0 {
                    info!(
                        entries = report.entries,
                        deleted = report.deleted,
                        "removed expired conntrack entries"
                    );
                } else {
                    debug!(entries = report.entries, "conntrack sweep");
                }
            }
            Err(error) => {
                warn!(%error, "conntrack sweep failed; stopping the sweeper");
                return;
            }
        }
    }
}

/// How often [`run_exhaustion_log`] reads `drop_snat_exhausted`.
pub const EXHAUSTION_POLL: Duration = Duration::from_secs(2);
/// At most one exhaustion warning this often.
pub const EXHAUSTION_LOG_EVERY: Duration = Duration::from_secs(60);

/// Rate limit of the SNAT exhaustion warning: the first drop is reported at
/// once, later ones at most once per `every`, with the drops since the
/// last report. Pure (the caller passes the time).
#[derive(Debug, Clone)]
pub struct ExhaustionLog {
    every: Duration,
    /// Counter value at the last report (or at start).
    reported: u64,
    last_report: Option<std::time::Instant>,
}

impl ExhaustionLog {
    /// Starts from the counter's current value: drops from before the agent
    /// started (a restart reuses the pinned maps) are not reported.
    pub fn new(every: Duration, total: u64) -> Self {
        ExhaustionLog {
            every,
            reported: total,
            last_report: None,
        }
    }

    /// The drops to report now, given the counter's value `total`: `Some`
    /// when there are new ones and no report was made within `every`.
    pub fn observe(&mut self, now: std::time::Instant, total: u64) -> Option<u64> {
        let new = total.wrapping_sub(self.reported);
        if new == 0
            || self
                .last_report
                .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        self.reported = total;
        self.last_report = Some(now);
        Some(new)
    }
}

/// Warns, rate limited ([`ExhaustionLog`]), when SYNs are dropped for want
/// of a free SNAT port, until the task is aborted.
pub async fn run_exhaustion_log(maps: crate::stats::PinnedMaps, ports: u32) {
    let read = || maps.counter(balancer_common::counter::DROP_SNAT_EXHAUSTED);
    let Ok(start) = read() else { return };
    let mut log = ExhaustionLog::new(EXHAUSTION_LOG_EVERY, start);
    let mut interval = tokio::time::interval(EXHAUSTION_POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let total = match read() {
            Ok(t) => t,
            Err(error) => {
                warn!(error = %error_chain(&error), "cannot read drop_snat_exhausted; stopping its log");
                return;
            }
        };
        if let Some(dropped) = log.observe(std::time::Instant::now(), total) {
            warn!(
                dropped,
                total,
                ports_per_backend = ports,
                "SYNs dropped for want of a free SNAT port (a CPU's share of the range towards \
                 one backend is held by live or resting flows): widen the SNAT range, shrink \
                 net.ipv4.ip_local_port_range to make room, or use persistent connections; \
                 `balancer status` shows ports in use per backend"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use balancer_common::{
        FLOW_BACKEND_FIN, FLOW_BACKEND_FIRST, FLOW_BOTH_FIN, FLOW_CLIENT_FIN, FLOW_LAST_ACK,
        FLOW_REPLIED, FLOW_RESET,
    };

    const SEC: u64 = 1_000_000_000;
    const TIMEOUTS: FlowTimeouts = FlowTimeouts {
        idle_ns: 300 * SEC,
        closing_ns: 10 * SEC,
        close_grace_ns: 2 * SEC,
        time_wait_ns: 60 * SEC,
        embryonic_ns: 5 * SEC,
    };

    fn ip(d: u8) -> u32 {
        u32::from_ne_bytes([198, 18, 0, d])
    }
    fn port(p: u16) -> u16 {
        u16::from_ne_bytes(p.to_be_bytes())
    }

    /// Forward (client -> VIP) and reverse (backend -> node:snat) entries of
    /// one answered flow to backend 198.18.0.2, with `flags`, last seen at
    /// `last`.
    fn flow(client_port: u16, snat: u16, flags: u32, last: u64) -> [(FlowKey, FlowEntry); 2] {
        let [(fwd_key, mut fwd), (rev_key, mut rev)] = nat(0, client_port, snat, 2);
        for e in [&mut fwd, &mut rev] {
            e.flags = flags | FLOW_REPLIED;
            e.last_seen_ns = last;
        }
        [(fwd_key, fwd), (rev_key, rev)]
    }

    #[test]
    fn exhaustion_is_logged_at_once_then_at_most_once_a_minute() {
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs;
        let mut log = ExhaustionLog::new(s(60), 5);
        assert_eq!(log.observe(t0, 5), None, "drops from before the start");
        assert_eq!(log.observe(t0 + s(1), 8), Some(3), "the first at once");
        assert_eq!(log.observe(t0 + s(2), 20), None);
        assert_eq!(log.observe(t0 + s(60), 30), None);
        assert_eq!(log.observe(t0 + s(61), 31), Some(23), "all since the last");
        assert_eq!(log.observe(t0 + s(200), 31), None, "nothing new");
        assert_eq!(log.observe(t0 + s(201), 32), Some(1));
    }

    #[test]
    fn partner_of_partner_is_the_flow() {
        let [(fwd_key, _), (rev_key, rev)] = flow(40000, 61000, 0, 0);
        assert_eq!(rev_key.saddr, ip(2));
        assert_eq!(rev_key.daddr, ip(1));
        assert_eq!(rev_key.sport, port(6380));
        assert_eq!(rev_key.dport, port(61000));
        assert_eq!(partner_key(&rev), fwd_key);
    }

    /// Each state's hold, at its edge: held one nanosecond before, free at.
    #[test]
    fn hold_by_state() {
        let t0 = 1000 * SEC;
        for (flags, hold) in [
            (0, 5 * SEC),                                // SYN never answered
            (FLOW_REPLIED, 300 * SEC),                   // established
            (FLOW_REPLIED | FLOW_CLIENT_FIN, 300 * SEC), // half closed
            (FLOW_REPLIED | FLOW_BOTH_FIN, 10 * SEC),    // client first, no last ACK
            (FLOW_REPLIED | FLOW_BOTH_FIN | FLOW_LAST_ACK, 2 * SEC),
            (
                FLOW_REPLIED | FLOW_BACKEND_FIN | FLOW_BACKEND_FIRST,
                300 * SEC, // the client has not closed yet
            ),
            (
                FLOW_REPLIED | FLOW_BOTH_FIN | FLOW_BACKEND_FIRST,
                60 * SEC, // backend TIME_WAIT
            ),
            (FLOW_REPLIED | FLOW_RESET, 0),
            (FLOW_RESET | FLOW_BOTH_FIN | FLOW_BACKEND_FIRST, 0),
        ] {
            assert_eq!(TIMEOUTS.hold_ns(flags), hold, "flags {flags:#x}");
            let e = FlowEntry {
                flags,
                last_seen_ns: t0,
                ..Default::default()
            };
            if hold > 0 {
                assert!(!expired(&TIMEOUTS, &e, t0 + hold - 1), "flags {flags:#x}");
            }
            assert!(expired(&TIMEOUTS, &e, t0 + hold), "flags {flags:#x}");
            // Refreshed after the clock was read: not expired.
            assert!(!expired(&TIMEOUTS, &e, t0 - 1), "flags {flags:#x}");
        }
    }

    #[test]
    fn the_sweep_deletes_expired_forward_entries_and_never_reverse_ones() {
        let backend: SocketAddrV4 = "198.18.0.2:6380".parse().unwrap();
        let [(fk, fe), (rk, re)] = flow(40000, 61000, 0, 0);
        // Both expired: the forward entry goes, the reverse entry (the
        // port's claim) stays for its owning CPU.
        let now = 400 * SEC;
        assert_eq!(sweep_action(&fk, &fe, &TIMEOUTS, now), SweepAction::Delete);
        assert_eq!(sweep_action(&rk, &re, &TIMEOUTS, now), SweepAction::Keep);
        // Live: kept, and the reverse entry counts as a port held.
        let now = 100 * SEC;
        assert_eq!(sweep_action(&fk, &fe, &TIMEOUTS, now), SweepAction::Keep);
        assert_eq!(
            sweep_action(&rk, &re, &TIMEOUTS, now),
            SweepAction::HoldsPort(backend)
        );
        // Reset: the port is free at once, the forward entry goes.
        let [(fk, fe), (rk, re)] = flow(40001, 61001, FLOW_RESET, now);
        assert_eq!(sweep_action(&fk, &fe, &TIMEOUTS, now), SweepAction::Delete);
        assert_eq!(sweep_action(&rk, &re, &TIMEOUTS, now), SweepAction::Keep);
        // Backend closed first: held for its TIME_WAIT.
        let closed = FLOW_BOTH_FIN | FLOW_BACKEND_FIRST;
        let [_, (rk, re)] = flow(40002, 61002, closed, now);
        assert_eq!(
            sweep_action(&rk, &re, &TIMEOUTS, now + 59 * SEC),
            SweepAction::HoldsPort(backend)
        );
        assert_eq!(
            sweep_action(&rk, &re, &TIMEOUTS, now + 60 * SEC),
            SweepAction::Keep
        );
    }

    #[test]
    fn a_key_taken_by_a_new_flow_during_the_walk_is_kept() {
        let now = 400 * SEC;
        let [(_, dead_fwd), _] = flow(40000, 61000, 0, 0);
        // During the walk the client reused its port: the forward key now
        // holds a fresh entry. Only a still-expired forward entry may go.
        let [(_, fresh_fwd), (_, fresh_rev)] = flow(40000, 61001, 0, now);
        assert!(!still_expired(Some(fresh_fwd), TIMEOUTS, now));
        assert!(still_expired(Some(dead_fwd), TIMEOUTS, now));
        let dead_rev = FlowEntry {
            last_seen_ns: 0,
            ..fresh_rev
        };
        assert!(!still_expired(Some(dead_rev), TIMEOUTS, now));
        assert!(!still_expired(None, TIMEOUTS, now));
    }

    /// Both entries of a flow of `service` from client 198.18.0.50:`client_port`
    /// to VIP 198.18.0.100:6380, NATed from 198.18.0.1:`snat` to
    /// 198.18.0.`backend`:6380.
    fn nat(service: u16, client_port: u16, snat: u16, backend: u8) -> [(FlowKey, FlowEntry); 2] {
        let fwd_key = FlowKey {
            saddr: ip(50),
            daddr: ip(100),
            sport: port(client_port),
            dport: port(6380),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let fwd = FlowEntry {
            nat_saddr: ip(1),
            nat_daddr: ip(backend),
            nat_sport: port(snat),
            nat_dport: port(6380),
            service_id: service,
            backend_slot: backend,
            direction: DIR_TO_BACKEND,
            last_seen_ns: 1,
            ..Default::default()
        };
        let rev_key = partner_key(&fwd);
        let rev = FlowEntry {
            nat_saddr: ip(100),
            nat_daddr: ip(50),
            nat_sport: port(6380),
            nat_dport: port(client_port),
            service_id: service,
            backend_slot: backend,
            direction: DIR_TO_CLIENT,
            last_seen_ns: 1,
            ..Default::default()
        };
        [(fwd_key, fwd), (rev_key, rev)]
    }

    fn target(service_id: u32, backend: u8) -> ServiceBackend {
        ServiceBackend {
            service_id,
            backend: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, backend), 6380),
        }
    }

    #[test]
    fn nat_flow_reads_both_legs_from_either_entry() {
        let [(fk, fe), (rk, re)] = nat(3, 40000, 61000, 2);
        let expected = NatFlow {
            service_id: 3,
            client: "198.18.0.50:40000".parse().unwrap(),
            vip: "198.18.0.100:6380".parse().unwrap(),
            snat: "198.18.0.1:61000".parse().unwrap(),
            backend: "198.18.0.2:6380".parse().unwrap(),
        };
        assert_eq!(nat_flow(&fk, &fe), Some((expected, [fk, rk])));
        assert_eq!(nat_flow(&rk, &re), Some((expected, [fk, rk])));
        let odd = FlowEntry { direction: 7, ..fe };
        assert_eq!(nat_flow(&fk, &odd), None);
    }

    #[test]
    fn purge_keeps_a_key_taken_over_by_a_new_flow_during_the_walk() {
        let [_, (rk, old)] = nat(0, 40000, 61000, 2);
        let (flow, _) = nat_flow(&rk, &old).unwrap();
        assert!(still_of(&flow, &rk, Some(old)));
        // The port went to a new flow of another service to the same backend.
        let [_, (rk2, new)] = nat(1, 40001, 61000, 2);
        assert_eq!(rk2, rk);
        assert!(!still_of(&flow, &rk, Some(new)));
        assert!(!still_of(&flow, &rk, None));
    }

    #[test]
    fn purge_selects_exactly_the_flows_of_the_target() {
        let mut entries = Vec::new();
        entries.extend(nat(0, 40000, 61000, 2)); // target
        entries.extend(nat(0, 40001, 61001, 2)); // target
        entries.extend(nat(0, 40002, 61002, 3)); // other backend
        entries.extend(nat(1, 40003, 61003, 2)); // same backend, other service
        let [orphan_rev, _] = {
            let [f, r] = nat(0, 40004, 61004, 2); // target, reverse entry only
            [r, f]
        };
        entries.push(orphan_rev);
        let targets = HashSet::from([target(0, 2)]);
        let mut found = flows_to_purge(entries.iter().copied(), &targets);
        found.sort_by_key(|(f, _)| f.client.port());
        let clients: Vec<u16> = found.iter().map(|(f, _)| f.client.port()).collect();
        assert_eq!(clients, [40000, 40001, 40004]);
        assert_eq!(found[0].1, [entries[0].0, entries[1].0]);
        assert_eq!(found[2].1[1], orphan_rev.0);
        assert!(found
            .iter()
            .all(|(f, _)| f.service_id == 0 && f.backend == target(0, 2).backend));
        assert!(flows_to_purge(entries, &HashSet::new()).is_empty());
    }

    /// Root: a real (standalone) BPF hash map with the conntrack layout.
    #[test]
    fn purge_deletes_exactly_the_target_entries_from_a_map() {
        let mut table = ConntrackMap::create(64, 0).expect("creating a BPF map needs root");
        let mut all = Vec::new();
        all.extend(nat(0, 40000, 61000, 2));
        all.extend(nat(0, 40001, 61001, 2));
        all.extend(nat(0, 40002, 61002, 3));
        all.extend(nat(1, 40003, 61003, 2));
        for (k, v) in &all {
            table.insert(k, v, 0).unwrap();
        }
        // A second handle sees and changes the same map.
        let mut other = another_handle(&table).unwrap();
        let report = purge_backends(&mut other, &HashSet::from([target(0, 2)]), 64);
        assert_eq!(report.entries, 8);
        assert_eq!(report.deleted, 4);
        let mut clients: Vec<u16> = report.flows.iter().map(|f| f.client.port()).collect();
        clients.sort();
        assert_eq!(clients, [40000, 40001]);
        let left: HashSet<FlowKey> = table.keys().map(Result::unwrap).collect();
        let expected: HashSet<FlowKey> = all[4..].iter().map(|(k, _)| *k).collect();
        assert_eq!(left, expected);
        // Nothing left to purge: a second purge finds nothing.
        let again = purge_backends(&mut table, &HashSet::from([target(0, 2)]), 64);
        assert_eq!((again.entries, again.deleted, again.flows.len()), (4, 0, 0));
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(a > 0 && b >= a);
    }
}
