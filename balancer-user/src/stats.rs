//! `balancer stats`: reads the maps a running agent pinned and prints
//! per-service and per-backend traffic, the verdict counters and the size of
//! the conntrack table, for an operator.
//!
//! Reading ([`Snapshot::read`], or [`PinnedMaps`] opened once and read many
//! times, as the agent's admin interface does) and printing
//! ([`Snapshot::render`]) are separate so the table layout is tested
//! without a kernel. The same [`Snapshot`] feeds `balancer stats`,
//! `balancer status` and the metrics endpoint.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use balancer_common::{
    backend_stats_index, counter, names, FlowEntry, FlowKey, Service, ServiceKey, TrafficStats,
    BACKEND_LOCAL, SERVICE_ACTIVE, SERVICE_SCHEDULER_FIRST,
};

use crate::pins::versioned_dir;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(
        "cannot open the pinned map {path} \
         (is the agent running, with this pin directory?)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("cannot read the pinned map {name}")]
    Read {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Traffic of one backend slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRow {
    pub addr: SocketAddrV4,
    pub local: bool,
    pub ready: bool,
    pub traffic: TrafficStats,
}

/// Traffic of one service and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub id: u32,
    pub vip: SocketAddrV4,
    pub active: bool,
    /// "round_robin", or "first" ([`SERVICE_SCHEDULER_FIRST`]).
    pub scheduler: &'static str,
    pub traffic: TrafficStats,
    pub backends: Vec<BackendRow>,
}

/// Everything `balancer stats` shows, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub services: Vec<ServiceRow>,
    /// `(name, value)` of every counter slot, in slot order.
    pub counters: Vec<(&'static str, u64)>,
    /// Entries in the conntrack table (two per NATed flow); `None` when not
    /// counted ([`PinnedMaps::traffic`]).
    pub conntrack_entries: Option<usize>,
}

/// The data plane's maps, opened from their pins once: every
/// [`PinnedMaps::traffic`] reads them anew.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, Service>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    counters: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, FlowKey, FlowEntry>,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps").finish_non_exhaustive()
    }
}

fn open(dir: &Path, name: &'static str) -> Result<Map, StatsError> {
    let path = dir.join(name);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|source| StatsError::Open { path, source })
}

fn sum(values: &[TrafficStats]) -> TrafficStats {
    values
        .iter()
        .fold(TrafficStats::default(), |acc, v| TrafficStats {
            packets: acc.packets.wrapping_add(v.packets),
            bytes: acc.bytes.wrapping_add(v.bytes),
            new_flows: acc.new_flows.wrapping_add(v.new_flows),
            replies: acc.replies.wrapping_add(v.replies),
        })
}

fn ipv4(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

fn port(be: u16) -> u16 {
    u16::from_be_bytes(be.to_ne_bytes())
}

impl PinnedMaps {
    /// Opens the maps pinned under `<pin_dir>/v<LAYOUT_VERSION>/`.
    pub fn open(pin_dir: &Path) -> Result<PinnedMaps, StatsError> {
        let dir = versioned_dir(pin_dir);
        let read_err = |name| move |source| StatsError::Read { name, source };
        Ok(PinnedMaps {
            services: HashMap::try_from(open(&dir, names::SERVICES)?)
                .map_err(read_err(names::SERVICES))?,
            service_stats: PerCpuArray::try_from(open(&dir, names::SERVICE_STATS)?)
                .map_err(read_err(names::SERVICE_STATS))?,
            backend_stats: PerCpuArray::try_from(open(&dir, names::BACKEND_STATS)?)
                .map_err(read_err(names::BACKEND_STATS))?,
            counters: PerCpuArray::try_from(open(&dir, names::COUNTERS)?)
                .map_err(read_err(names::COUNTERS))?,
            conntrack: HashMap::try_from(open(&dir, names::CONNTRACK)?)
                .map_err(read_err(names::CONNTRACK))?,
        })
    }

    /// Services, backends and counters, without counting the conntrack
    /// table (`conntrack_entries` is `None`): a few dozen map lookups,
    /// cheap enough for every scrape.
    pub fn traffic(&self) -> Result<Snapshot, StatsError> {
        let read_err = |name| move |source| StatsError::Read { name, source };
        let mut rows = Vec::new();
        for item in self.services.iter() {
            let (key, value) = item.map_err(read_err(names::SERVICES))?;
            let traffic = sum(&self
                .service_stats
                .get(&value.id, 0)
                .map_err(read_err(names::SERVICE_STATS))?);
            let ready = &value.ready[..(value.ready_count as usize).min(value.ready.len())];
            let mut backends = Vec::new();
            let count = (value.backend_count as usize).min(value.backends.len());
            for (slot, b) in value.backends[..count].iter().enumerate() {
                let index = backend_stats_index(value.id, slot as u32);
                backends.push(BackendRow {
                    addr: SocketAddrV4::new(ipv4(b.addr), port(b.port)),
                    local: b.flags & BACKEND_LOCAL != 0,
                    ready: ready.contains(&(slot as u8)),
                    traffic: sum(&self
                        .backend_stats
                        .get(&index, 0)
                        .map_err(read_err(names::BACKEND_STATS))?),
                });
            }
            rows.push(ServiceRow {
                id: value.id,
                vip: SocketAddrV4::new(ipv4(key.vip), port(key.port)),
                active: value.flags & SERVICE_ACTIVE != 0,
                scheduler: if value.flags & SERVICE_SCHEDULER_FIRST != 0 {
                    "first"
                } else {
                    "round_robin"
                },
                traffic,
                backends,
            });
        }
        rows.sort_by_key(|r| r.id);

        let mut counter_values = Vec::new();
        for (slot, name) in counter::NAMES.iter().enumerate() {
            let values = self
                .counters
                .get(&(slot as u32), 0)
                .map_err(read_err(names::COUNTERS))?;
            let total = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
            counter_values.push((*name, total));
        }

        Ok(Snapshot {
            services: rows,
            counters: counter_values,
            conntrack_entries: None,
        })
    }

    /// Counter slot `slot` summed over CPUs: one map lookup.
    pub fn counter(&self, slot: u32) -> Result<u64, StatsError> {
        let values = self
            .counters
            .get(&slot, 0)
            .map_err(|source| StatsError::Read {
                name: names::COUNTERS,
                source,
            })?;
        Ok(values.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
    }

    /// Entries in the conntrack table now: walks the whole table, one
    /// syscall per entry.
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }
}

impl Snapshot {
    /// Reads the maps pinned under `<pin_dir>/v<LAYOUT_VERSION>/`, the
    /// conntrack table counted.
    pub fn read(pin_dir: &Path) -> Result<Snapshot, StatsError> {
        let maps = PinnedMaps::open(pin_dir)?;
        let mut snapshot = maps.traffic()?;
        snapshot.conntrack_entries = Some(maps.conntrack_entries());
        Ok(snapshot)
    }

    /// The value of the counter `name` (0 when there is no such slot).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }

    /// The operator's table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<4} {:<24} {:<9} {:>14} {:>16} {:>12}",
            "ID", "SERVICE / BACKEND", "STATE", "PACKETS", "BYTES", "NEW FLOWS"
        );
        for s in &self.services {
            let _ = writeln!(
                out,
                "{:<4} {:<24} {:<9} {:>14} {:>16} {:>12}",
                s.id,
                s.vip.to_string(),
                if s.active { "active" } else { "inactive" },
                s.traffic.packets,
                s.traffic.bytes,
                s.traffic.new_flows
            );
            for b in &s.backends {
                let state = match (b.ready, b.local) {
                    (true, true) => "ready,local",
                    (true, false) => "ready",
                    (false, true) => "down,local",
                    (false, false) => "down",
                };
                let _ = writeln!(
                    out,
                    "{:<4} {:<24} {:<9} {:>14} {:>16} {:>12}",
                    "",
                    format!("  {}", b.addr),
                    state,
                    b.traffic.packets,
                    b.traffic.bytes,
                    b.traffic.new_flows
                );
            }
        }
        if self.services.is_empty() {
            let _ = writeln!(out, "(no services)");
        }
        let _ = writeln!(out);
        let nonzero: Vec<_> = self.counters.iter().filter(|(_, v)| *v > 0).collect();
        let _ = writeln!(out, "COUNTERS");
        if nonzero.is_empty() {
            let _ = writeln!(out, "  (all zero)");
        }
        for (name, value) in nonzero {
            let _ = writeln!(out, "  {name:<24} {value:>16}");
        }
        if let Some(entries) = self.conntrack_entries {
            let _ = writeln!(out);
            let _ = writeln!(out, "CONNTRACK entries: {entries}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_helpers_read_wire_bytes() {
        assert_eq!(
            ipv4(u32::from_ne_bytes([198, 18, 0, 100])),
            Ipv4Addr::new(198, 18, 0, 100)
        );
        assert_eq!(port(u16::from_ne_bytes(6380u16.to_be_bytes())), 6380);
    }

    #[test]
    fn per_cpu_values_are_summed() {
        let a = TrafficStats {
            packets: 1,
            bytes: 100,
            new_flows: 1,
            replies: 4,
        };
        let b = TrafficStats {
            packets: 2,
            bytes: 50,
            new_flows: 0,
            replies: 1,
        };
        assert_eq!(
            sum(&[a, b]),
            TrafficStats {
                packets: 3,
                bytes: 150,
                new_flows: 1,
                replies: 5,
            }
        );
    }

    #[test]
    fn table_shows_services_backends_and_nonzero_counters() {
        let snap = Snapshot {
            services: vec![ServiceRow {
                id: 0,
                vip: "198.18.0.100:6380".parse().unwrap(),
                active: true,
                scheduler: "round_robin",
                traffic: TrafficStats {
                    packets: 10,
                    bytes: 1000,
                    new_flows: 2,
                    replies: 0,
                },
                backends: vec![
                    BackendRow {
                        addr: "198.18.0.1:6380".parse().unwrap(),
                        local: true,
                        ready: true,
                        traffic: TrafficStats {
                            packets: 4,
                            bytes: 400,
                            new_flows: 1,
                            replies: 0,
                        },
                    },
                    BackendRow {
                        addr: "198.18.0.2:6380".parse().unwrap(),
                        local: false,
                        ready: false,
                        traffic: TrafficStats::default(),
                    },
                ],
            }],
            counters: vec![("forwarded", 6), ("drop_fib", 0)],
            conntrack_entries: Some(2),
        };
        let text = snap.render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"));
        assert!(lines[1].contains("198.18.0.100:6380") && lines[1].contains("active"));
        assert!(lines[1].contains(" 1000 ") || lines[1].contains(" 1000"));
        assert!(lines[2].contains("198.18.0.1:6380") && lines[2].contains("ready,local"));
        assert!(lines[3].contains("198.18.0.2:6380") && lines[3].contains("down"));
        assert!(text.contains("forwarded"));
        assert!(!text.contains("drop_fib"));
        assert!(text.contains("CONNTRACK entries: 2"));
        assert_eq!(snap.counter("forwarded"), 6);
        assert_eq!(snap.counter("no_such_counter"), 0);

        let uncounted = Snapshot {
            conntrack_entries: None,
            ..snap
        };
        assert!(!uncounted.render().contains("CONNTRACK"));
    }
}
