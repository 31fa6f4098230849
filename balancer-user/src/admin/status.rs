//! The status document: what `balancer status` shows and what the metrics
//! endpoint renders, in one serde type ([`Status`]) so both always agree.
//!
//! [`Status::build`] is pure: it joins what the agent's parts publish (the
//! election's [`ElectionStatus`] and advert counters, the health monitor's
//! [`HealthReport`], the data plane's [`Snapshot`], the VIPs found on the
//! interface) into the document. [`render_text`] is the operator's
//! multi-line summary of it. Times are Unix seconds (wall clock), so the
//! CLI can say "3 s ago" by its own clock.
//!
//! The JSON field names are the interface: add fields, do not rename them.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use balancer_common::TrafficStats;

use crate::{
    election::ElectionStatus,
    health::{Badness, HealthReport},
    path_check::{PathReport, PathState},
    stats::Snapshot,
    vrrp_socket::AdvertCounters,
};

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    pub node: NodeInfo,
    pub election: ElectionInfo,
    /// In service id order.
    pub services: Vec<ServiceInfo>,
    pub dataplane: DataplaneInfo,
    /// Things the agent could not find out for this document.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The agent process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: f64,
    pub uptime_seconds: f64,
}

/// This node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Host name.
    pub name: String,
    /// `node.address`.
    pub address: Ipv4Addr,
    pub interface: String,
    pub ifindex: u32,
    /// How XDP is attached: "native" or "generic".
    pub xdp_mode: String,
}

/// Who holds the VIPs, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElectionInfo {
    /// "vrrp", or "static" without `[vrrp]`.
    pub mode: String,
    /// "initialize", "backup", "master", "fault", or "static".
    pub state: String,
    /// When `state` was entered, Unix seconds (VRRP only).
    pub state_since: Option<f64>,
    pub vrid: Option<u8>,
    /// 2 or 3.
    pub vrrp_version: Option<u8>,
    pub configured_priority: Option<u8>,
    /// The priority in the adverts: `configured_priority`, lowered by
    /// `no_ready_backend_weight` while `node_ready` is false.
    pub effective_priority: Option<u8>,
    pub no_ready_backend_weight: Option<u8>,
    /// Every service has a READY backend (a local one where there is one).
    pub node_ready: bool,
    /// Every VIP is on the interface.
    pub holds_vips: bool,
    pub vips: Vec<VipInfo>,
    /// VRRP only.
    pub adverts: Option<AdvertInfo>,
}

/// One virtual address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipInfo {
    pub address: Ipv4Addr,
    /// On the interface now.
    pub held: bool,
}

/// The VRRP socket's counters ([`AdvertCounters`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdvertInfo {
    pub sent: u64,
    pub received: u64,
    /// Our own adverts seen again, ignored.
    pub own: u64,
    pub send_errors: u64,
    pub receive_errors: u64,
    /// Dropped adverts by reason, every reason listed.
    pub dropped: BTreeMap<String, u64>,
    /// The other routers whose adverts were accepted, by address.
    #[serde(default)]
    pub peers: Vec<PeerInfo>,
}

/// Another router of the group, as its last accepted advert showed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub address: Ipv4Addr,
    pub priority: u8,
    /// Advertised interval, milliseconds.
    pub interval_ms: u32,
    /// Unix seconds.
    pub last_advert: f64,
    pub adverts: u64,
}

impl PeerInfo {
    /// What its last advert said, as of `now` (Unix seconds).
    pub fn summary(&self, now: f64) -> String {
        format!(
            "priority {}, interval {} ms, last advert {} ago ({} accepted)",
            self.priority,
            self.interval_ms,
            ago(now, self.last_advert),
            self.adverts
        )
    }
}

impl AdvertInfo {
    /// The counters as they are now.
    pub fn read(counters: &AdvertCounters) -> AdvertInfo {
        use std::sync::atomic::Ordering::Relaxed;
        AdvertInfo {
            sent: counters.sent.load(Relaxed),
            received: counters.received.load(Relaxed),
            own: counters.own.load(Relaxed),
            send_errors: counters.send_errors.load(Relaxed),
            receive_errors: counters.receive_errors.load(Relaxed),
            dropped: counters
                .dropped()
                .into_iter()
                .map(|(reason, n)| (reason.to_string(), n))
                .collect(),
            peers: counters
                .peers()
                .into_iter()
                .map(|(address, p)| PeerInfo {
                    address,
                    priority: p.priority,
                    interval_ms: u32::from(p.interval_cs) * 10,
                    last_advert: unix_seconds(p.last),
                    adverts: p.adverts,
                })
                .collect(),
        }
    }

    /// Dropped adverts, every reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// One line: sent, received, dropped (by reason, those seen), errors.
    pub fn summary(&self) -> String {
        let dropped: Vec<String> = self
            .dropped
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        format!(
            "{} sent, {} received, {} dropped{}, {} send errors, {} receive errors",
            self.sent,
            self.received,
            self.dropped_total(),
            if dropped.is_empty() {
                String::new()
            } else {
                format!(" ({})", dropped.join(", "))
            },
            self.send_errors,
            self.receive_errors
        )
    }
}

/// Packets, bytes and new connections the data plane counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// New TCP connections (SYNs that picked a backend).
    pub connections: u64,
    /// Of `packets`, replies from a remote backend.
    #[serde(default)]
    pub replies: u64,
}

impl From<TrafficStats> for Traffic {
    fn from(t: TrafficStats) -> Traffic {
        Traffic {
            packets: t.packets,
            bytes: t.bytes,
            connections: t.new_flows,
            replies: t.replies,
        }
    }
}

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub id: u32,
    /// `VIP:port`.
    pub vip: SocketAddrV4,
    /// The data plane serves it on this node (the node holds the VIP).
    pub active: bool,
    /// "round_robin" or "first".
    #[serde(default)]
    pub scheduler: String,
    /// The backends new connections go to, as the data plane has them now.
    pub ready_set: Vec<SocketAddrV4>,
    pub traffic: Traffic,
    /// In round-robin slot order.
    pub backends: Vec<BackendInfo>,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub address: SocketAddrV4,
    /// On this node (its connections are passed to the local stack).
    pub local: bool,
    /// Damped health: "ready", "replica_link_down", "replica_syncing",
    /// "loading", "catching_up", "unavailable", or "unchecked" before the
    /// first check.
    pub health: String,
    /// `health` is "ready".
    pub ready: bool,
    /// In the service's READY set in the data plane (a backend that is not
    /// READY can be there as the least bad one when no backend is).
    pub in_ready_set: bool,
    /// Drained by the operator (`balancer drain`): no new connections,
    /// established ones stay.
    #[serde(default)]
    pub drained: bool,
    /// When `health` last changed, Unix seconds.
    pub health_since: Option<f64>,
    pub checks: u64,
    pub failed_checks: u64,
    /// Failed checks by reason (only reasons seen).
    pub failures: BTreeMap<String, u64>,
    /// When the last check ended, Unix seconds.
    pub last_check: Option<f64>,
    /// The last check did not find the backend READY.
    pub last_check_failed: bool,
    /// The last failed check, however long ago.
    pub last_failure: Option<FailureInfo>,
    /// Bytes of a peer's replication stream still to apply, when the last
    /// check found the backend catching up (docs/readiness.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind_bytes: Option<u64>,
    pub traffic: Traffic,
    /// Remote backends: whether connections forwarded to it through the
    /// data plane are answered (`crate::path_check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathState>,
}

/// A failed health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureInfo {
    /// When it ended, Unix seconds.
    pub at: f64,
    /// Stable name: "refused", "timeout", "loading", "replica_link_down", ...
    pub kind: String,
    /// What the check found, e.g. "connection refused".
    pub reason: String,
}

/// The data plane's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneInfo {
    /// Every counter slot by name (`balancer_common::counter::NAMES`).
    pub counters: BTreeMap<String, u64>,
    /// Entries in the conntrack table (two per NATed flow), as of the last
    /// sweep (every 10 s).
    pub conntrack_entries: usize,
    /// SNAT ports in use and free per remote backend, as of the last sweep.
    #[serde(default)]
    pub snat: SnatInfo,
}

/// The SNAT range and its use. Each remote backend has the whole range to
/// itself (the port space is per backend), so free = ports - in use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnatInfo {
    pub port_min: u16,
    pub port_max: u16,
    /// SNAT source addresses: the node's and `snat_addresses`.
    #[serde(default)]
    pub addresses: u32,
    /// Ports in the range times addresses: what each backend can hold at
    /// once.
    pub ports: u32,
    pub backends: Vec<SnatBackend>,
}

/// SNAT ports of one remote backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnatBackend {
    pub backend: String,
    /// Ports whose reverse entry is within its hold (live flows and ports
    /// resting after a close).
    pub in_use: u32,
    pub free: u32,
}

/// The SNAT side of [`StatusInputs`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnatInputs {
    pub port_min: u16,
    pub port_max: u16,
    /// SNAT source addresses (at least the node's).
    pub addresses: u32,
    /// Every remote backend, listed even with no port in use.
    pub remote_backends: Vec<SocketAddrV4>,
    /// Ports held per backend at the last sweep.
    pub in_use: BTreeMap<SocketAddrV4, u32>,
}

impl SnatInputs {
    fn info(&self) -> SnatInfo {
        let addresses = self.addresses.max(1);
        let ports = if self.port_max >= self.port_min {
            (u32::from(self.port_max) - u32::from(self.port_min) + 1) * addresses
        } else {
            0
        };
        let mut all: BTreeMap<SocketAddrV4, u32> =
            self.remote_backends.iter().map(|b| (*b, 0)).collect();
        for (b, n) in &self.in_use {
            *all.entry(*b).or_default() += n;
        }
        SnatInfo {
            port_min: self.port_min,
            port_max: self.port_max,
            addresses,
            ports,
            backends: all
                .into_iter()
                .map(|(b, in_use)| SnatBackend {
                    backend: b.to_string(),
                    in_use,
                    free: ports.saturating_sub(in_use),
                })
                .collect(),
        }
    }
}

/// What does not change while the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    pub version: String,
    pub pid: u32,
    pub started_at: SystemTime,
    pub node: NodeInfo,
}

/// The election's side of the inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum ElectionInput {
    /// No `[vrrp]`: `[dataplane] active` decided once.
    Static,
    /// `[vrrp]`.
    Vrrp {
        vrid: u8,
        version: u8,
        configured_priority: u8,
        no_ready_backend_weight: u8,
        status: ElectionStatus,
        adverts: AdvertInfo,
    },
}

/// Everything [`Status::build`] joins.
#[derive(Debug, Clone)]
pub struct StatusInputs<'a> {
    pub now: SystemTime,
    pub facts: &'a AgentFacts,
    pub election: ElectionInput,
    /// Each VIP and whether it is on the interface.
    pub vips: Vec<(Ipv4Addr, bool)>,
    pub health: &'a HealthReport,
    pub snapshot: &'a Snapshot,
    /// The path check's verdicts on remote backends.
    pub paths: &'a PathReport,
    pub conntrack_entries: usize,
    pub snat: SnatInputs,
    pub warnings: Vec<String>,
}

/// `at` as Unix seconds.
pub fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `health` string of a backend.
fn health_name(checked: bool, badness: Badness) -> &'static str {
    if !checked {
        return "unchecked";
    }
    match badness {
        Badness::Ready => "ready",
        Badness::ReplicaLinkDown => "replica_link_down",
        Badness::ReplicaSyncing => "replica_syncing",
        Badness::Loading => "loading",
        Badness::CatchingUp => "catching_up",
        Badness::Unavailable => "unavailable",
    }
}

impl Status {
    /// Joins the inputs into the document.
    pub fn build(inputs: StatusInputs<'_>) -> Status {
        let facts = inputs.facts;
        let health = inputs.health;
        let vips: Vec<VipInfo> = inputs
            .vips
            .iter()
            .map(|&(address, held)| VipInfo { address, held })
            .collect();
        let holds_vips = !vips.is_empty() && vips.iter().all(|v| v.held);
        let election = match inputs.election {
            ElectionInput::Static => ElectionInfo {
                mode: "static".into(),
                state: "static".into(),
                state_since: None,
                vrid: None,
                vrrp_version: None,
                configured_priority: None,
                effective_priority: None,
                no_ready_backend_weight: None,
                node_ready: health.node_ready,
                holds_vips,
                vips,
                adverts: None,
            },
            ElectionInput::Vrrp {
                vrid,
                version,
                configured_priority,
                no_ready_backend_weight,
                status,
                adverts,
            } => ElectionInfo {
                mode: "vrrp".into(),
                state: status.state.as_str().into(),
                state_since: Some(unix_seconds(status.since)),
                vrid: Some(vrid),
                vrrp_version: Some(version),
                configured_priority: Some(configured_priority),
                effective_priority: Some(status.priority),
                no_ready_backend_weight: Some(no_ready_backend_weight),
                node_ready: health.node_ready,
                holds_vips,
                vips,
                adverts: Some(adverts),
            },
        };
        let services = inputs
            .snapshot
            .services
            .iter()
            .map(|row| ServiceInfo {
                id: row.id,
                vip: row.vip,
                active: row.active,
                scheduler: row.scheduler.into(),
                ready_set: row
                    .backends
                    .iter()
                    .filter(|b| b.ready)
                    .map(|b| b.addr)
                    .collect(),
                traffic: row.traffic.into(),
                backends: row
                    .backends
                    .iter()
                    .map(|b| {
                        let report = health.backend(b.addr);
                        let checked = report.is_some_and(|r| r.checks > 0);
                        let badness = report.map_or(Badness::Unavailable, |r| r.badness);
                        BackendInfo {
                            address: b.addr,
                            local: b.local,
                            health: health_name(checked, badness).into(),
                            ready: checked && badness == Badness::Ready,
                            in_ready_set: b.ready,
                            drained: report.is_some_and(|r| r.drained),
                            health_since: report.and_then(|r| r.since).map(unix_seconds),
                            checks: report.map_or(0, |r| r.checks),
                            failed_checks: report.map_or(0, |r| r.failed_checks()),
                            failures: report
                                .map(|r| {
                                    r.failures_by_kind()
                                        .filter(|(_, n)| *n > 0)
                                        .map(|(k, n)| (k.to_string(), n))
                                        .collect()
                                })
                                .unwrap_or_default(),
                            last_check: report.and_then(|r| r.last_check).map(unix_seconds),
                            last_check_failed: report.is_some_and(|r| r.last_check_failed),
                            last_failure: report.and_then(|r| r.last_failure.as_ref()).map(|f| {
                                FailureInfo {
                                    at: unix_seconds(f.at),
                                    kind: f.kind.into(),
                                    reason: f.reason.clone(),
                                }
                            }),
                            behind_bytes: report.and_then(|r| r.behind_bytes),
                            traffic: b.traffic.into(),
                            path: inputs.paths.get(&(row.id, b.addr)).copied(),
                        }
                    })
                    .collect(),
            })
            .collect();
        let started_at = unix_seconds(facts.started_at);
        Status {
            agent: AgentInfo {
                version: facts.version.clone(),
                pid: facts.pid,
                started_at,
                uptime_seconds: (unix_seconds(inputs.now) - started_at).max(0.0),
            },
            node: facts.node.clone(),
            election,
            services,
            dataplane: DataplaneInfo {
                counters: inputs
                    .snapshot
                    .counters
                    .iter()
                    .map(|(name, v)| (name.to_string(), *v))
                    .collect(),
                conntrack_entries: inputs.conntrack_entries,
                snat: inputs.snat.info(),
            },
            warnings: inputs.warnings,
        }
    }
}

/// The operator's summary of `status`, with ages relative to `now` (Unix
/// seconds).
pub fn render_text(status: &Status, now: f64) -> String {
    let mut out = String::new();
    let agent = &status.agent;
    let node = &status.node;
    let _ = writeln!(
        out,
        "balancer {} (pid {}) on {}: node {}, interface {}, XDP {}, up {}",
        agent.version,
        agent.pid,
        node.name,
        node.address,
        node.interface,
        node.xdp_mode,
        duration(agent.uptime_seconds)
    );
    for warning in &status.warnings {
        let _ = writeln!(out, "WARNING: {warning}");
    }

    let e = &status.election;
    let _ = writeln!(out);
    if e.mode == "static" {
        let _ = writeln!(
            out,
            "Election   static (no [vrrp]): {}",
            if e.holds_vips {
                "this node holds the VIPs"
            } else {
                "this node does not hold the VIPs"
            }
        );
    } else {
        let since = e
            .state_since
            .map(|at| format!(" for {} (since {})", ago(now, at), utc(at)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "Election   VRRPv{} vrid {}: {}{since}",
            e.vrrp_version.unwrap_or(0),
            e.vrid.unwrap_or(0),
            e.state.to_uppercase()
        );
        let (effective, configured) = (
            e.effective_priority.unwrap_or(0),
            e.configured_priority.unwrap_or(0),
        );
        let lowered = if effective < configured {
            format!(
                ", lowered by no_ready_backend_weight {}",
                e.no_ready_backend_weight.unwrap_or(0)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "           priority {effective} (configured {configured}{lowered})"
        );
    }
    let _ = writeln!(
        out,
        "           node ready: {}",
        if e.node_ready {
            "yes"
        } else {
            "NO (a service has no READY backend, or this node's own backend is not READY)"
        }
    );
    for vip in &e.vips {
        let _ = writeln!(
            out,
            "           VIP {}: {}",
            vip.address,
            if vip.held { "held" } else { "not held" }
        );
    }
    if let Some(a) = &e.adverts {
        let _ = writeln!(out, "           adverts: {}", a.summary());
        for p in &a.peers {
            let _ = writeln!(out, "           peer {}: {}", p.address, p.summary(now));
        }
    }

    for s in &status.services {
        let _ = writeln!(out);
        let set: Vec<String> = s.ready_set.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "Service    {}: {}, scheduler {}, READY set: {}",
            s.vip,
            if s.active { "active" } else { "inactive" },
            s.scheduler,
            if set.is_empty() {
                "(empty)".to_string()
            } else {
                set.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "  {:<21} {:<7} {:<10} {:<6} {:>14} {:>11} {:>12} {:>14}",
            "BACKEND", "WHERE", "HEALTH", "IN SET", "CHECKS/FAILED", "CONNS", "PACKETS", "BYTES"
        );
        for b in &s.backends {
            let _ = writeln!(
                out,
                "  {:<21} {:<7} {:<10} {:<6} {:>14} {:>11} {:>12} {:>14}",
                b.address.to_string(),
                if b.local { "local" } else { "remote" },
                health_label(&b.health),
                if b.in_ready_set { "yes" } else { "no" },
                format!("{}/{}", b.checks, b.failed_checks),
                b.traffic.connections,
                b.traffic.packets,
                b.traffic.bytes
            );
            if b.drained {
                let _ = writeln!(
                    out,
                    "      DRAINED: no new connections (`balancer ready {}` undoes it)",
                    b.address
                );
            }
            if let Some(path) = b.path.filter(PathState::is_failing) {
                let _ = writeln!(out, "      data path: {path}");
            }
            if !b.ready || b.last_check_failed {
                if let Some(f) = &b.last_failure {
                    let _ = writeln!(
                        out,
                        "      last failed check {} ago: {}",
                        ago(now, f.at),
                        f.reason
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "  {:<21} {:<7} {:<10} {:<6} {:>14} {:>11} {:>12} {:>14}",
            "(service total)",
            "",
            "",
            "",
            "",
            s.traffic.connections,
            s.traffic.packets,
            s.traffic.bytes
        );
    }

    let _ = writeln!(out);
    let nonzero: Vec<String> = status
        .dataplane
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(name, v)| format!("{name} {v}"))
        .collect();
    let _ = writeln!(
        out,
        "Data plane conntrack entries: {} (at the last sweep)",
        status.dataplane.conntrack_entries
    );
    let snat = &status.dataplane.snat;
    let exhausted = status
        .dataplane
        .counters
        .get(
            balancer_common::counter::NAMES[balancer_common::counter::DROP_SNAT_EXHAUSTED as usize],
        )
        .copied()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "           SNAT ports {}-{} on {} address(es) ({} per backend); SYNs dropped for want of a port: {exhausted}",
        snat.port_min, snat.port_max, snat.addresses, snat.ports
    );
    for b in &snat.backends {
        let _ = writeln!(
            out,
            "             {:<21} in use {:>6}, free {:>6}",
            b.backend, b.in_use, b.free
        );
    }
    let _ = writeln!(
        out,
        "           counters: {}",
        if nonzero.is_empty() {
            "(all zero)".to_string()
        } else {
            nonzero.join(", ")
        }
    );
    out
}

pub(crate) fn health_label(health: &str) -> String {
    match health {
        "ready" => "READY".into(),
        "unavailable" => "DOWN".into(),
        "replica_link_down" => "LINK-DOWN".into(),
        "replica_syncing" => "SYNCING".into(),
        "catching_up" => "CATCH-UP".into(),
        other => other.to_uppercase(),
    }
}

/// "2h03m", "4m05s", "12s", "0.4s".
pub(crate) fn duration(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let whole = secs as u64;
    let (d, h, m, s) = (
        whole / 86_400,
        whole / 3600 % 24,
        whole / 60 % 60,
        whole % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

pub(crate) fn ago(now: f64, at: f64) -> String {
    duration(now - at)
}

/// `at` (Unix seconds) as "2026-11-26 13:51:46 UTC".
pub(crate) fn utc(at: f64) -> String {
    let secs = at.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        health::{BackendReport, NotReady, Probe, Readiness},
        stats::{BackendRow, ServiceRow},
        vrrp::State,
    };

    pub(crate) fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000 + secs)
    }

    const N1: &str = "198.18.0.1:6380";
    const N2: &str = "198.18.0.2:6380";

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn facts() -> AgentFacts {
        AgentFacts {
            version: "0.1.0".into(),
            pid: 4242,
            started_at: at(0),
            node: NodeInfo {
                name: "kv1".into(),
                address: Ipv4Addr::new(198, 18, 0, 1),
                interface: "eth0".into(),
                ifindex: 2,
                xdp_mode: "native".into(),
            },
        }
    }

    /// Node 1 of two, master; node 2's KeyDB refuses connections.
    pub(crate) fn master_with_a_failed_backend() -> Status {
        let mut local = BackendReport::new(addr(N1), true, Badness::Unavailable);
        let ok = Probe {
            readiness: Readiness::Ready,
            role: None,
            elapsed: Duration::from_millis(1),
            info: None,
        };
        local.record(&ok, Badness::Ready, at(1));
        let mut remote = BackendReport::new(addr(N2), false, Badness::Unavailable);
        remote.record(&ok, Badness::Ready, at(1));
        let refused = Probe {
            readiness: Readiness::NotReady(NotReady::Refused),
            ..ok.clone()
        };
        for s in 2..5 {
            remote.record(&refused, Badness::Unavailable, at(s));
        }
        let health = HealthReport {
            backends: vec![local, remote],
            node_ready: true,
            started: true,
        };
        let snapshot = Snapshot {
            services: vec![ServiceRow {
                id: 0,
                vip: addr("198.18.0.100:6380"),
                active: true,
                scheduler: "round_robin",
                traffic: TrafficStats {
                    packets: 30,
                    bytes: 3000,
                    new_flows: 3,
                    replies: 0,
                },
                backends: vec![
                    BackendRow {
                        addr: addr(N1),
                        local: true,
                        ready: true,
                        traffic: TrafficStats {
                            packets: 10,
                            bytes: 1000,
                            new_flows: 2,
                            replies: 0,
                        },
                    },
                    BackendRow {
                        addr: addr(N2),
                        local: false,
                        ready: false,
                        traffic: TrafficStats {
                            packets: 20,
                            bytes: 2000,
                            new_flows: 1,
                            replies: 0,
                        },
                    },
                ],
            }],
            counters: vec![
                ("pass_local_backend", 10),
                ("forwarded", 7),
                ("drop_fib", 0),
            ],
            conntrack_entries: None,
        };
        let mut adverts = AdvertInfo {
            sent: 600,
            received: 1,
            ..AdvertInfo::default()
        };
        adverts.dropped.insert("ttl".into(), 0);
        adverts.dropped.insert("vrid".into(), 2);
        adverts.peers.push(PeerInfo {
            address: "198.18.0.2".parse().unwrap(),
            priority: 100,
            interval_ms: 100,
            last_advert: unix_seconds(at(4)),
            adverts: 1,
        });
        let facts = facts();
        let paths = PathReport::from([(
            (0, addr(N2)),
            PathState::Failing {
                unanswered: 7,
                seconds: 4,
            },
        )]);
        Status::build(StatusInputs {
            now: at(60),
            facts: &facts,
            election: ElectionInput::Vrrp {
                vrid: 101,
                version: 3,
                configured_priority: 150,
                no_ready_backend_weight: 50,
                status: ElectionStatus {
                    state: State::Master,
                    since: at(2),
                    priority: 150,
                },
                adverts,
            },
            vips: vec![(Ipv4Addr::new(198, 18, 0, 100), true)],
            health: &health,
            snapshot: &snapshot,
            paths: &paths,
            conntrack_entries: 2,
            snat: SnatInputs {
                port_min: 1024,
                port_max: 32767,
                addresses: 1,
                remote_backends: vec![addr(N2), "198.18.0.3:6380".parse().unwrap()],
                in_use: BTreeMap::from([(addr(N2), 12)]),
            },
            warnings: vec![],
        })
    }

    #[test]
    fn the_document_joins_election_health_and_data_plane() {
        let s = master_with_a_failed_backend();
        assert_eq!(s.agent.uptime_seconds, 60.0);
        assert_eq!(s.election.mode, "vrrp");
        assert_eq!(s.election.state, "master");
        assert_eq!(s.election.effective_priority, Some(150));
        assert!(s.election.holds_vips);
        assert_eq!(s.election.state_since, Some(unix_seconds(at(2))));
        let svc = &s.services[0];
        assert_eq!(svc.ready_set, vec![addr(N1)]);
        assert_eq!(svc.traffic.connections, 3);
        let (b1, b2) = (&svc.backends[0], &svc.backends[1]);
        assert!(b1.ready && b1.local && b1.in_ready_set && b1.last_failure.is_none());
        assert_eq!(b1.health, "ready");
        assert!(!b2.ready && !b2.local && !b2.in_ready_set);
        assert_eq!(b2.health, "unavailable");
        assert_eq!((b2.checks, b2.failed_checks), (4, 3));
        assert_eq!(b2.failures.get("refused"), Some(&3));
        let failure = b2.last_failure.as_ref().unwrap();
        assert_eq!(failure.kind, "refused");
        assert_eq!(failure.reason, "connection refused");
        assert_eq!(failure.at, unix_seconds(at(4)));
        assert_eq!(b2.health_since, Some(unix_seconds(at(2))));
        assert_eq!(b1.path, None, "a local backend has no data path to check");
        assert!(b2.path.is_some_and(|p| p.is_failing()));
        assert_eq!(s.dataplane.counters.get("forwarded"), Some(&7));
        assert_eq!(s.dataplane.conntrack_entries, 2);
        let snat = &s.dataplane.snat;
        assert_eq!(
            (snat.port_min, snat.port_max, snat.ports),
            (1024, 32767, 31744)
        );
        assert_eq!(
            snat.backends,
            vec![
                SnatBackend {
                    backend: N2.to_string(),
                    in_use: 12,
                    free: 31732
                },
                SnatBackend {
                    backend: "198.18.0.3:6380".into(),
                    in_use: 0,
                    free: 31744
                },
            ]
        );
        let text = render_text(&s, unix_seconds(at(60)));
        assert!(
            text.contains("SNAT ports 1024-32767 on 1 address(es) (31744 per backend)")
                && text.contains(&format!("{N2:<21} in use     12, free  31732")),
            "{text}"
        );
    }

    #[test]
    fn the_json_round_trips_and_names_the_fields() {
        let s = master_with_a_failed_backend();
        let json = serde_json::to_string(&s).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["election"]["state"], "master");
        assert_eq!(v["node"]["address"], "198.18.0.1");
        assert_eq!(v["services"][0]["vip"], "198.18.0.100:6380");
        assert_eq!(v["services"][0]["backends"][1]["address"], N2);
        assert_eq!(v["services"][0]["backends"][1]["ready"], false);
        assert_eq!(
            v["services"][0]["backends"][1]["last_failure"]["reason"],
            "connection refused"
        );
        assert!(v.get("warnings").is_none(), "no warnings, no field");
        assert_eq!(v["services"][0]["backends"][1]["path"]["state"], "failing");
    }

    #[test]
    fn a_static_node_has_no_vrrp_fields() {
        let health = HealthReport::default();
        let snapshot = Snapshot {
            services: vec![],
            counters: vec![],
            conntrack_entries: None,
        };
        let facts = facts();
        let s = Status::build(StatusInputs {
            now: at(5),
            facts: &facts,
            election: ElectionInput::Static,
            vips: vec![(Ipv4Addr::new(198, 18, 0, 100), false)],
            health: &health,
            snapshot: &snapshot,
            paths: &PathReport::new(),
            conntrack_entries: 0,
            snat: SnatInputs::default(),
            warnings: vec!["cannot list the addresses of eth0".into()],
        });
        assert_eq!(
            (s.election.mode.as_str(), s.election.state.as_str()),
            ("static", "static")
        );
        assert_eq!(s.election.effective_priority, None);
        assert!(s.election.adverts.is_none());
        assert!(!s.election.holds_vips);
        let text = render_text(&s, unix_seconds(at(5)));
        assert!(
            text.contains("static (no [vrrp]): this node does not hold the VIPs"),
            "{text}"
        );
        assert!(text.contains("WARNING: cannot list"), "{text}");
    }

    #[test]
    fn the_text_shows_state_priority_backends_and_the_failure() {
        let s = master_with_a_failed_backend();
        let text = render_text(&s, unix_seconds(at(64)));
        assert!(
            text.starts_with("balancer 0.1.0 (pid 4242) on kv1: node 198.18.0.1"),
            "{text}"
        );
        assert!(
            text.contains("VRRPv3 vrid 101: MASTER for 1m02s (since 2026-09-21 14:13:22 UTC)"),
            "{text}"
        );
        assert!(text.contains("priority 150 (configured 150)"), "{text}");
        assert!(text.contains("VIP 198.18.0.100: held"), "{text}");
        assert!(text.contains("2 dropped (vrid 2)"), "{text}");
        assert!(text.contains("READY set: 198.18.0.1:6380"), "{text}");
        let n1 = text
            .lines()
            .find(|l| l.contains(N1) && l.contains("local"))
            .unwrap();
        assert!(n1.contains("READY") && n1.contains(" yes "), "{n1}");
        let n2 = text
            .lines()
            .find(|l| l.contains(N2) && l.contains("remote"))
            .unwrap();
        assert!(
            n2.contains("DOWN") && n2.contains(" no ") && n2.contains("4/3"),
            "{n2}"
        );
        assert!(
            text.contains("last failed check 1m00s ago: connection refused"),
            "{text}"
        );
        assert!(
            text.contains("data path: FAILING: 7 connections forwarded, none answered for 4 s"),
            "{text}"
        );
        assert!(text.contains("forwarded 7"), "{text}");
        assert!(!text.contains("drop_fib"), "{text}");
    }

    #[test]
    fn a_lowered_priority_says_why() {
        let mut s = master_with_a_failed_backend();
        s.election.state = "backup".into();
        s.election.effective_priority = Some(100);
        s.election.node_ready = false;
        let text = render_text(&s, unix_seconds(at(64)));
        assert!(text.contains("BACKUP"), "{text}");
        assert!(
            text.contains("priority 100 (configured 150, lowered by no_ready_backend_weight 50)"),
            "{text}"
        );
        assert!(text.contains("node ready: NO"), "{text}");
    }

    #[test]
    fn durations_and_dates_read_well() {
        assert_eq!(duration(0.42), "0.4s");
        assert_eq!(duration(12.0), "12s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(7380.0), "2h03m");
        assert_eq!(duration(90_000.0), "1d01h");
        assert_eq!(duration(-3.0), "0.0s");
        assert_eq!(utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_700_506.0), "2026-11-26 13:41:46 UTC");
    }
}
