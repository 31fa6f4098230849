//! The agent's side of `CONNTRACK`: the expiry sweep, and purging the
//! flows of a backend taken out of service.
//!
//! Expiry: the XDP program only notices an expired flow when a packet of
//! it arrives; a flow that simply goes quiet would hold its SNAT port until
//! LRU eviction. Every [`SWEEP_INTERVAL`] this module walks `CONNTRACK` and
//! deletes both entries (forward and reverse) of each flow whose entries
//! have all expired. Timestamps are `bpf_ktime_get_coarse_ns()`, i.e.
//! `CLOCK_MONOTONIC` at tick resolution.
//!
//! Purge ([`purge_backends`]): deletes both entries of every flow of given
//! (service, backend) pairs and returns the flows, so that
//! [`crate::flow_reset`] can tell their clients. The client's next packet
//! then finds no flow, XDP passes it and the local stack answers with an
//! RST.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    time::Duration,
};

use crate::error_chain;
use aya::maps::{HashMap, IterableMap, Map, MapData, MapError};
use balancer_common::{
    FlowEntry, FlowKey, DIR_TO_BACKEND, DIR_TO_CLIENT, FLOW_CLOSING, IPPROTO_TCP,
};
use tracing::{debug, info, warn};

/// The `CONNTRACK` map as user space holds it.
pub type ConntrackMap = HashMap<MapData, FlowKey, FlowEntry>;

/// How often the table is swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The timeouts, in the units the data plane uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTimeouts {
    pub idle_ns: u64,
    pub closing_ns: u64,
}

impl FlowTimeouts {
    pub fn new(idle: Duration, closing: Duration) -> Self {
        FlowTimeouts {
            idle_ns: u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX),
            closing_ns: u64::try_from(closing.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Whether `entry` has gone without packets for longer than its
    /// timeout (the closing one once both sides sent FIN) at `now_ns`.
    pub fn expired(&self, entry: &FlowEntry, now_ns: u64) -> bool {
        let timeout = if entry.flags & FLOW_CLOSING != 0 {
            self.closing_ns
        } else {
            self.idle_ns
        };
        now_ns.saturating_sub(entry.last_seen_ns) > timeout
    }
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

/// Keys to delete, given the expired entries and a way to look up any
/// entry. A flow is removed only when its partner entry is missing or
/// expired too, and then both of its keys are returned.
pub fn keys_to_delete(
    expired: &StdHashMap<FlowKey, FlowEntry>,
    lookup: impl Fn(&FlowKey) -> Option<FlowEntry>,
    timeouts: FlowTimeouts,
    now_ns: u64,
) -> Vec<FlowKey> {
    let mut out = Vec::new();
    for (key, entry) in expired {
        let partner = partner_key(entry);
        if expired.contains_key(&partner) {
            // Both expired; the pair is emitted once, by its smaller key.
            if key_order(key) < key_order(&partner) {
                out.push(*key);
                out.push(partner);
            } else if key_order(key) == key_order(&partner) {
                out.push(*key);
            }
            continue;
        }
        match lookup(&partner) {
            Some(p) if !timeouts.expired(&p, now_ns) => {}
            Some(_) => {
                out.push(*key);
                out.push(partner);
            }
            None => out.push(*key),
        }
    }
    out
}

fn key_order(k: &FlowKey) -> (u32, u32, u16, u16, u8) {
    (k.saddr, k.daddr, k.sport, k.dport, k.proto)
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries seen.
    pub entries: usize,
    /// Entries deleted.
    pub deleted: usize,
}

/// Walks the table once and deletes expired flows. Blocking (one syscall
/// per entry): run it off the async threads.
pub fn sweep(
    table: &mut HashMap<MapData, FlowKey, FlowEntry>,
    timeouts: FlowTimeouts,
    max_entries: usize,
) -> SweepReport {
    let now_ns = monotonic_now_ns();
    let mut report = SweepReport::default();
    let mut expired = StdHashMap::new();
    // Deleting while iterating restarts the kernel's key walk, so collect
    // first. Entries vanishing mid-walk (the data plane deletes too) are
    // skipped; the bound stops a walk that keeps restarting.
    for item in table.iter().take(max_entries.saturating_mul(2)) {
        match item {
            Ok((key, entry)) => {
                report.entries += 1;
                if timeouts.expired(&entry, now_ns) {
                    expired.insert(key, entry);
                }
            }
            Err(MapError::KeyNotFound) => {}
            Err(error) => {
                warn!(error = %error_chain(&error), "conntrack walk stopped early");
                break;
            }
        }
    }
    if expired.is_empty() {
        return report;
    }
    let doomed = keys_to_delete(&expired, |k| table.get(k, 0).ok(), timeouts, now_ns);
    for key in doomed {
        // The walk took a while: the data plane may have dropped the dead
        // flow and given its key to a new one since (a freed SNAT port, a
        // reused client port). Look again right before deleting.
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
/// is still expired; `None` (gone already) needs no deletion either.
pub fn still_expired(current: Option<FlowEntry>, timeouts: FlowTimeouts, now_ns: u64) -> bool {
    current.is_some_and(|e| timeouts.expired(&e, now_ns))
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

/// Sweeps `table` every [`SWEEP_INTERVAL`] until the task is aborted;
/// after each sweep, `entries` is the number of entries it left (the table
/// starts empty, so 0 before the first).
pub async fn run_sweeper(
    table: HashMap<MapData, FlowKey, FlowEntry>,
    timeouts: FlowTimeouts,
    max_entries: usize,
    entries: tokio::sync::watch::Sender<usize>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use balancer_common::FLOW_FIN_SEEN;

    const SEC: u64 = 1_000_000_000;
    const TIMEOUTS: FlowTimeouts = FlowTimeouts {
        idle_ns: 300 * SEC,
        closing_ns: 10 * SEC,
    };

    fn ip(d: u8) -> u32 {
        u32::from_ne_bytes([198, 18, 0, d])
    }
    fn port(p: u16) -> u16 {
        u16::from_ne_bytes(p.to_be_bytes())
    }

    /// Forward (client -> VIP) and reverse (backend -> node:snat) entries of
    /// one flow to backend 198.18.0.2, last seen at `last_fwd` / `last_rev`.
    fn flow(
        client_port: u16,
        snat: u16,
        last_fwd: u64,
        last_rev: u64,
    ) -> [(FlowKey, FlowEntry); 2] {
        let [(fwd_key, mut fwd), (rev_key, mut rev)] = nat(0, client_port, snat, 2);
        fwd.last_seen_ns = last_fwd;
        rev.last_seen_ns = last_rev;
        [(fwd_key, fwd), (rev_key, rev)]
    }

    fn plan(entries: &[(FlowKey, FlowEntry)], now: u64) -> Vec<FlowKey> {
        let all: StdHashMap<FlowKey, FlowEntry> = entries.iter().copied().collect();
        let expired: StdHashMap<FlowKey, FlowEntry> = entries
            .iter()
            .copied()
            .filter(|(_, e)| TIMEOUTS.expired(e, now))
            .collect();
        let mut keys = keys_to_delete(&expired, |k| all.get(k).copied(), TIMEOUTS, now);
        keys.sort_by_key(key_order);
        keys
    }

    fn sorted(mut keys: Vec<FlowKey>) -> Vec<FlowKey> {
        keys.sort_by_key(key_order);
        keys
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

    #[test]
    fn expiry_uses_idle_or_closing_timeout() {
        let mut e = FlowEntry {
            last_seen_ns: 1000 * SEC,
            ..Default::default()
        };
        assert!(!TIMEOUTS.expired(&e, 1300 * SEC));
        assert!(TIMEOUTS.expired(&e, 1300 * SEC + 1));
        // One FIN is not enough for the closing timeout.
        e.flags = FLOW_FIN_SEEN;
        assert!(!TIMEOUTS.expired(&e, 1010 * SEC + 1));
        e.flags = FLOW_CLOSING | FLOW_FIN_SEEN;
        assert!(!TIMEOUTS.expired(&e, 1010 * SEC));
        assert!(TIMEOUTS.expired(&e, 1010 * SEC + 1));
        // An entry refreshed after the clock was read is not expired.
        assert!(!TIMEOUTS.expired(&e, 999 * SEC));
    }

    #[test]
    fn a_flow_expired_in_both_directions_is_deleted_once() {
        let entries = flow(40000, 61000, 0, 0);
        let keys = plan(&entries, 400 * SEC);
        assert_eq!(keys, sorted(vec![entries[0].0, entries[1].0]));
    }

    #[test]
    fn a_flow_alive_in_one_direction_is_kept() {
        let entries = flow(40000, 61000, 0, 350 * SEC);
        assert!(plan(&entries, 400 * SEC).is_empty());
    }

    #[test]
    fn an_orphan_entry_is_deleted_alone() {
        let [fwd, _] = flow(40000, 61000, 0, 0);
        assert_eq!(plan(&[fwd], 400 * SEC), vec![fwd.0]);
    }

    #[test]
    fn a_key_taken_by_a_new_flow_during_the_walk_is_kept() {
        let now = 400 * SEC;
        let [(_, dead_fwd), (_, dead_rev)] = flow(40000, 61000, 0, 0);
        // During the walk the data plane freed the dead flow's SNAT port
        // and gave it to a new flow: the reverse key now holds a fresh
        // entry. Only a still-expired entry may be deleted.
        let [_, (_, fresh_rev)] = flow(40001, 61000, now, now);
        assert!(TIMEOUTS.expired(&dead_rev, now));
        assert!(!still_expired(Some(fresh_rev), TIMEOUTS, now));
        assert!(still_expired(Some(dead_fwd), TIMEOUTS, now));
        assert!(!still_expired(None, TIMEOUTS, now));
    }

    #[test]
    fn only_expired_flows_go() {
        let mut entries = flow(40000, 61000, 0, 0).to_vec();
        entries.extend(flow(40001, 61001, 390 * SEC, 390 * SEC));
        let mut closing = flow(40002, 61002, 385 * SEC, 385 * SEC);
        for (_, e) in &mut closing {
            e.flags = FLOW_CLOSING | FLOW_FIN_SEEN;
        }
        entries.extend(closing);
        let keys = plan(&entries, 400 * SEC);
        assert_eq!(
            keys,
            sorted(vec![entries[0].0, entries[1].0, entries[4].0, entries[5].0])
        );
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
