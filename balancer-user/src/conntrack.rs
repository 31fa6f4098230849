//! Conntrack expiry sweep: removes NAT flows nobody has sent a packet on
//! for longer than their timeout, so their SNAT ports become free again.
//!
//! The XDP program only notices an expired flow when a packet of it
//! arrives; a flow that simply goes quiet would hold its SNAT port until
//! LRU eviction. Every [`SWEEP_INTERVAL`] this module walks `CONNTRACK` and
//! deletes both entries (forward and reverse) of each flow whose entries
//! have all expired. Timestamps are `bpf_ktime_get_ns()`, i.e.
//! `CLOCK_MONOTONIC`.

use std::{collections::HashMap as StdHashMap, time::Duration};

use crate::error_chain;
use aya::maps::{HashMap, MapData, MapError};
use balancer_common::{FlowEntry, FlowKey, FLOW_CLOSING, IPPROTO_TCP};
use tracing::{debug, info, warn};

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

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
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
        match table.remove(&key) {
            Ok(()) => report.deleted += 1,
            // Gone already: the data plane removed it (RST, expiry on lookup).
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => warn!(error = %error_chain(&error), "could not delete a conntrack entry"),
        }
    }
    report
}

/// Sweeps `table` every [`SWEEP_INTERVAL`] until the task is aborted.
pub async fn run_sweeper(
    table: HashMap<MapData, FlowKey, FlowEntry>,
    timeouts: FlowTimeouts,
    max_entries: usize,
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
    /// one flow.
    fn flow(
        client_port: u16,
        snat: u16,
        last_fwd: u64,
        last_rev: u64,
    ) -> [(FlowKey, FlowEntry); 2] {
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
            nat_daddr: ip(2),
            nat_sport: port(snat),
            nat_dport: port(6380),
            last_seen_ns: last_fwd,
            ..Default::default()
        };
        let rev_key = partner_key(&fwd);
        let rev = FlowEntry {
            nat_saddr: ip(100),
            nat_daddr: ip(50),
            nat_sport: port(6380),
            nat_dport: port(client_port),
            last_seen_ns: last_rev,
            ..Default::default()
        };
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

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(a > 0 && b >= a);
    }
}
