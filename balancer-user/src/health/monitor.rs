//! The health monitor: checks every backend on a timer, damps the results,
//! keeps each service's READY set in the data plane, tells the flow reset
//! about backends that left a set, and tells the election whether this
//! node can serve.
//!
//! - **One check loop per distinct backend address**: a backend shared by
//!   several services is checked once per interval. Each loop runs its
//!   check ([`HealthCheck::check`]) on a [`tokio::time::interval`] with
//!   [`MissedTickBehavior::Delay`], so a slow check delays the next one
//!   instead of bunching them.
//! - Results are damped per backend ([`BackendHealth`], initial state from
//!   [`HealthConfig::initial`]); a change of the damped badness is logged
//!   at info with the backend, old and new state and the check's reason.
//! - **Sets**: on every change, each service's serving set is recomputed
//!   with [`select_serving`] (serving = the set in the data plane now) and,
//!   when it differs, written in one [`ReadySink::set_ready`] call (one map
//!   update: a packet sees the old or the new set, never a mix). A backend
//!   that left the set gets no new connection from that write on; then its
//!   flows through this node are reset (the `on_leave` callback, normally
//!   [`crate::flow_reset::FlowResetHandle::request`]). A failed write is
//!   logged and retried after the next check.
//! - **Startup**: nothing is written before every backend has had its
//!   first check; until then the data plane keeps what the agent wrote at
//!   startup. With health checks on, the agent should start every service
//!   with an **empty** READY set (no connection to an unchecked backend);
//!   the first sets follow within one check timeout.
//! - **Node readiness** ([`node_ready`], published on a `watch<bool>`
//!   after the sets are written, `false` until the first checks are done):
//!   true when every service has a strictly READY backend, where a service
//!   with a backend on this node (its own KeyDB) needs that local backend
//!   READY. The election lowers the node's priority while it is false
//!   (`no_ready_backend_weight`), so a node whose own KeyDB is down,
//!   loading or resyncing after a rejoin does not take (or take back) the
//!   VIP, and a node serving a degraded service through the least-bad
//!   fallback (a replica with its link down) yields to one with a READY
//!   backend. Least-bad backends keep serving; they do not count as READY.
//!
//! - **Report** ([`HealthReport`], on a `watch` channel): every check's
//!   outcome, counted by reason, with the damped state and the last
//!   failure, for `balancer status` and the metrics endpoint. Receivers are
//!   woken only when a damped state or the node's readiness changes.
//!
//! Pure core ([`Core`]): damped states and sets in, writes out; the async
//! shell ([`run`]) owns the timers, the sink and the channels.

use std::{
    collections::HashMap,
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use balancer_common::MAX_BACKENDS;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::MissedTickBehavior,
};
use tracing::{info, warn};

use super::{
    catchup,
    report::{BackendReport, HealthReport},
    select_serving, BackendHealth, Badness, BadnessChange, Candidate, HealthCheck, HealthConfig,
    InitialHealth, Probe,
};
use crate::{
    config::ServiceConfig,
    conntrack::ServiceBackend,
    dataplane::{DataPlaneError, ServiceTable},
    error_chain,
};

/// One backend of a service, as the monitor needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonitoredBackend {
    /// Address and port checked, and that the data plane forwards to.
    pub addr: SocketAddrV4,
    /// It is on this node (the data plane passes its flows to the local
    /// stack; its readiness is this node's own).
    pub local: bool,
}

/// One service: its id in the data plane and its backends in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitoredService {
    /// Index in the [`ServiceTable`] (and `Service::id`).
    pub id: usize,
    /// `VIP:port`, for logs.
    pub vip: SocketAddrV4,
    /// Backends; the index is the slot.
    pub backends: Vec<MonitoredBackend>,
}

impl MonitoredService {
    /// The services of a config, with the ids and slots that
    /// [`crate::dataplane::service_entry`] gives them (id = position,
    /// slots = backend order, at most [`MAX_BACKENDS`]).
    pub fn from_config(
        services: &[ServiceConfig],
        is_local: impl Fn(Ipv4Addr) -> bool,
    ) -> Vec<MonitoredService> {
        services
            .iter()
            .enumerate()
            .map(|(id, s)| MonitoredService {
                id,
                vip: SocketAddrV4::new(s.vip, s.port),
                backends: s
                    .backends
                    .iter()
                    .take(MAX_BACKENDS)
                    .map(|b| MonitoredBackend {
                        addr: *b,
                        local: is_local(*b.ip()),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Where READY sets go: the data plane's [`ServiceTable`], or a recorder
/// in tests.
pub trait ReadySink: Send + 'static {
    /// The READY slots of service `id` as they are now.
    fn ready(&self, id: usize) -> Vec<u8>;
    /// Makes `slots` the READY set of service `id`, in one update.
    fn set_ready(&mut self, id: usize, slots: &[u8]) -> Result<(), DataPlaneError>;
}

impl ReadySink for Arc<Mutex<ServiceTable>> {
    fn ready(&self, id: usize) -> Vec<u8> {
        let table = self.lock().unwrap_or_else(|e| e.into_inner());
        table.get(id).map_or_else(Vec::new, |s| {
            let n = (s.ready_count as usize).min(MAX_BACKENDS);
            s.ready[..n].to_vec()
        })
    }

    fn set_ready(&mut self, id: usize, slots: &[u8]) -> Result<(), DataPlaneError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_ready(id, slots)
    }
}

/// Whether this node can serve, from the damped badness of each service's
/// backends (`(local, badness)` in slot order): every service has a READY
/// backend, and a service with local backends has a READY local one. No
/// services: false.
pub fn node_ready<'a>(services: impl IntoIterator<Item = &'a [(bool, Badness)]>) -> bool {
    let mut any = false;
    for backends in services {
        any = true;
        let has_local = backends.iter().any(|&(local, _)| local);
        let ok = backends
            .iter()
            .any(|&(local, b)| b == Badness::Ready && (local || !has_local));
        if !ok {
            return false;
        }
    }
    any
}

/// One distinct backend address and its damped health.
#[derive(Debug, Clone)]
struct Tracked {
    addr: SocketAddrV4,
    local: bool,
    health: BackendHealth,
    checked: bool,
    /// `balancer drain`: kept out of every READY set.
    drained: bool,
}

/// `balancer drain BACKEND` / `balancer ready BACKEND`, as the admin
/// socket hands it to the monitor; the outcome goes back on `reply`.
#[derive(Debug)]
pub struct DrainRequest {
    pub backend: SocketAddrV4,
    pub drained: bool,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// One service: the tracked backend of each slot, and its serving set.
#[derive(Debug, Clone)]
struct ServiceState {
    id: usize,
    vip: SocketAddrV4,
    /// Index into `Core::backends` per slot.
    slots: Vec<usize>,
    /// Slots in the data plane's READY set, ascending.
    serving: Vec<u8>,
}

/// A write the core asks for: service `index`'s set becomes `slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetChange {
    /// Position of the service in the monitor's list.
    pub index: usize,
    /// The service's id in the data plane.
    pub id: usize,
    /// The new READY slots, ascending.
    pub slots: Vec<u8>,
}

/// The monitor without I/O: damped health per distinct backend, the
/// serving set per service.
#[derive(Debug, Clone)]
pub struct Core {
    backends: Vec<Tracked>,
    services: Vec<ServiceState>,
}

impl Core {
    /// A core for `services`, each backend in `initial` state with the
    /// given thresholds; `current(id)` is the READY set the data plane
    /// holds for service `id` now.
    pub fn new(
        services: &[MonitoredService],
        rise: u32,
        fall: u32,
        initial: InitialHealth,
        current: impl Fn(usize) -> Vec<u8>,
    ) -> Core {
        let mut backends: Vec<Tracked> = Vec::new();
        let mut index: HashMap<SocketAddrV4, usize> = HashMap::new();
        let mut states = Vec::new();
        for service in services {
            let slots = service
                .backends
                .iter()
                .take(MAX_BACKENDS)
                .map(|b| {
                    let i = *index.entry(b.addr).or_insert_with(|| {
                        backends.push(Tracked {
                            addr: b.addr,
                            local: b.local,
                            health: BackendHealth::new(rise, fall, initial),
                            checked: false,
                            drained: false,
                        });
                        backends.len() - 1
                    });
                    backends[i].local |= b.local;
                    i
                })
                .collect::<Vec<_>>();
            let mut serving: Vec<u8> = current(service.id)
                .into_iter()
                .filter(|&s| (s as usize) < slots.len())
                .collect();
            serving.sort_unstable();
            serving.dedup();
            states.push(ServiceState {
                id: service.id,
                vip: service.vip,
                slots,
                serving,
            });
        }
        Core {
            backends,
            services: states,
        }
    }

    /// The distinct backend addresses, in the order [`Core::observe`]
    /// indexes them.
    pub fn backends(&self) -> Vec<SocketAddrV4> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// Every backend has had at least one check.
    pub fn all_checked(&self) -> bool {
        self.backends.iter().all(|b| b.checked)
    }

    /// Feeds the badness one check of backend `backend` found; returns the
    /// change of its damped badness.
    pub fn observe(&mut self, backend: usize, found: Badness) -> Option<BadnessChange> {
        let b = self.backends.get_mut(backend)?;
        b.checked = true;
        b.health.observe(found)
    }

    /// The damped badness of backend `backend`.
    pub fn badness(&self, backend: usize) -> Option<Badness> {
        self.backends.get(backend).map(|b| b.health.badness())
    }

    /// Whether `addr` is drained.
    pub fn is_drained(&self, addr: SocketAddrV4) -> bool {
        self.backends.iter().any(|b| b.addr == addr && b.drained)
    }

    /// Drains `addr` or makes it eligible again; refuses to drain the last
    /// READY backend of a service that is not drained. What changed, or
    /// why nothing did.
    pub fn set_drained(&mut self, addr: SocketAddrV4, drained: bool) -> Result<String, String> {
        let Some(index) = self.backends.iter().position(|b| b.addr == addr) else {
            let known: Vec<String> = self.backends.iter().map(|b| b.addr.to_string()).collect();
            return Err(format!(
                "{addr} is no backend of this agent (backends: {})",
                known.join(", ")
            ));
        };
        if self.backends[index].drained == drained {
            return Ok(format!(
                "{addr} is already {}",
                if drained { "drained" } else { "not drained" }
            ));
        }
        if drained {
            for s in &self.services {
                if !s.slots.contains(&index) {
                    continue;
                }
                let other_ready = s.slots.iter().any(|&b| {
                    b != index
                        && !self.backends[b].drained
                        && self.backends[b].health.badness() == Badness::Ready
                });
                if !other_ready {
                    return Err(format!(
                        "draining {addr} would leave service {} without a READY backend; \
                         nothing changed",
                        s.vip
                    ));
                }
            }
        }
        self.backends[index].drained = drained;
        Ok(if drained {
            format!("{addr} drained: no new connections; its established connections stay")
        } else {
            format!("{addr} is no longer drained: it takes new connections while it is READY")
        })
    }

    /// The sets that differ from what the data plane holds.
    pub fn plan(&self) -> Vec<SetChange> {
        self.services
            .iter()
            .enumerate()
            .filter_map(|(index, s)| {
                let pick = |eligible: Vec<usize>| -> Vec<u8> {
                    let candidates: Vec<Candidate> = eligible
                        .iter()
                        .map(|&slot| Candidate {
                            badness: self.backends[s.slots[slot]].health.badness(),
                            serving: s.serving.contains(&(slot as u8)),
                        })
                        .collect();
                    select_serving(&candidates)
                        .into_iter()
                        .map(|i| eligible[i] as u8)
                        .collect()
                };
                // Drained backends get no new connections while another
                // backend can take them; when none can, serving through a
                // drained one beats refusing every client.
                let undrained = (0..s.slots.len())
                    .filter(|&slot| !self.backends[s.slots[slot]].drained)
                    .collect();
                let mut slots = pick(undrained);
                if slots.is_empty() {
                    slots = pick((0..s.slots.len()).collect());
                }
                (slots != s.serving).then_some(SetChange {
                    index,
                    id: s.id,
                    slots,
                })
            })
            .collect()
    }

    /// Records that `change` was written; returns the backends that left
    /// the set.
    pub fn commit(&mut self, change: &SetChange) -> Vec<SocketAddrV4> {
        let Some(s) = self.services.get_mut(change.index) else {
            return Vec::new();
        };
        let left = s
            .serving
            .iter()
            .filter(|slot| !change.slots.contains(slot))
            .filter_map(|&slot| s.slots.get(slot as usize))
            .map(|&b| self.backends[b].addr)
            .collect();
        s.serving = change.slots.clone();
        left
    }

    /// The serving set of service `index` (slots, ascending).
    pub fn serving(&self, index: usize) -> &[u8] {
        self.services.get(index).map_or(&[], |s| &s.serving)
    }

    /// [`node_ready`] of the damped states.
    pub fn node_ready(&self) -> bool {
        let per_service: Vec<Vec<(bool, Badness)>> = self
            .services
            .iter()
            .map(|s| {
                s.slots
                    .iter()
                    .map(|&b| (self.backends[b].local, self.backends[b].health.badness()))
                    .collect()
            })
            .collect();
        node_ready(per_service.iter().map(Vec::as_slice))
    }

    /// A report of every backend before its first check.
    pub fn initial_report(&self) -> HealthReport {
        HealthReport {
            backends: self
                .backends
                .iter()
                .map(|b| BackendReport::new(b.addr, b.local, b.health.badness()))
                .collect(),
            node_ready: false,
            started: false,
        }
    }

    fn addresses(&self, index: usize, slots: &[u8]) -> Vec<SocketAddrV4> {
        let Some(s) = self.services.get(index) else {
            return Vec::new();
        };
        slots
            .iter()
            .filter_map(|&slot| s.slots.get(slot as usize))
            .map(|&b| self.backends[b].addr)
            .collect()
    }
}

/// Runs the monitor until the returned future is dropped (abort its task
/// to stop it; the check loops stop with it).
///
/// - `services`: every service with its backends in slot order
///   ([`MonitoredService::from_config`]).
/// - `checker`: the check ([`super::Checker::from_config`]).
/// - `cfg`: interval, rise, fall, initial state (the timeout is the
///   checker's).
/// - `sink`: the data plane's service table.
/// - `has_ready_backend`: [`node_ready`], sent after each write that
///   changes it; the receiver should start at `false`.
/// - `report`: replaced with the initial report at once, then updated
///   after every check.
/// - `on_leave`: called, after the write, for each backend that left a
///   service's set (reset its flows there), unless it left because it was
///   drained.
/// - `drains`: `balancer drain` / `balancer ready` requests.
#[allow(clippy::too_many_arguments)]
pub fn run<C, S, F>(
    services: Vec<MonitoredService>,
    checker: C,
    cfg: &HealthConfig,
    sink: S,
    has_ready_backend: watch::Sender<bool>,
    report: watch::Sender<HealthReport>,
    on_leave: F,
    drains: mpsc::Receiver<DrainRequest>,
) -> impl Future<Output = ()> + Send + 'static
where
    C: HealthCheck + 'static,
    S: ReadySink,
    F: FnMut(ServiceBackend) + Send + 'static,
{
    let core = Core::new(&services, cfg.rise, cfg.fall, cfg.initial, |id| {
        sink.ready(id)
    });
    report.send_replace(core.initial_report());
    let judge = catchup::Judge::new(core.backends());
    let shell = Shell {
        core,
        judge,
        sink,
        has_ready_backend,
        report,
        on_leave,
        published: false,
        retry: false,
    };
    shell.run(Arc::new(checker), cfg.interval(), drains)
}

struct Shell<S, F> {
    core: Core,
    /// The catch-up rule, applied to each probe before it is damped.
    judge: catchup::Judge,
    sink: S,
    has_ready_backend: watch::Sender<bool>,
    report: watch::Sender<HealthReport>,
    on_leave: F,
    /// The first sets have been written.
    published: bool,
    /// A write failed: plan again after the next check.
    retry: bool,
}

impl<S, F> Shell<S, F>
where
    S: ReadySink,
    F: FnMut(ServiceBackend) + Send + 'static,
{
    async fn run<C: HealthCheck + 'static>(
        mut self,
        checker: Arc<C>,
        interval: Duration,
        mut drains: mpsc::Receiver<DrainRequest>,
    ) {
        let backends = self.core.backends();
        if backends.is_empty() {
            return;
        }
        let (tx, mut rx) = mpsc::channel(backends.len() * 2);
        let mut loops = JoinSet::new();
        for (index, addr) in backends.into_iter().enumerate() {
            loops.spawn(check_loop(
                index,
                addr,
                Arc::clone(&checker),
                interval,
                tx.clone(),
            ));
        }
        drop(tx);
        info!(
            backends = self.core.backends.len(),
            services = self.core.services.len(),
            interval_ms = interval.as_millis() as u64,
            "health checks started"
        );
        let mut drains_open = true;
        loop {
            tokio::select! {
                probe = rx.recv() => {
                    let Some((index, probe)) = probe else { break };
                    let probe = self.judge.judge(index, probe);
                    self.handle(index, &probe);
                }
                request = drains.recv(), if drains_open => match request {
                    Some(request) => self.drain(request),
                    None => drains_open = false,
                },
            }
        }
        warn!("every health check loop ended");
    }

    fn drain(&mut self, request: DrainRequest) {
        let DrainRequest {
            backend,
            drained,
            reply,
        } = request;
        let outcome = self.core.set_drained(backend, drained);
        match &outcome {
            Ok(message) => {
                info!(%backend, drained, "{message}");
                self.report.send_if_modified(|report| {
                    let mut changed = false;
                    for b in report.backends.iter_mut().filter(|b| b.addr == backend) {
                        changed |= b.drained != drained;
                        b.drained = drained;
                    }
                    changed
                });
                // Before the first checks the first write applies it.
                if self.published {
                    self.write_sets(false);
                }
            }
            Err(message) => warn!(%backend, drained, "{message}"),
        }
        let _ = reply.send(outcome);
    }

    fn handle(&mut self, index: usize, probe: &Probe) {
        let change = self.core.observe(index, probe.badness());
        if let Some(badness) = self.core.badness(index) {
            let at = SystemTime::now();
            self.report.send_if_modified(|report| {
                report
                    .backends
                    .get_mut(index)
                    .is_some_and(|b| b.record(probe, badness, at))
            });
        }
        if let Some(change) = change {
            let backend = self.core.backends[index].addr;
            let reason = probe
                .reason()
                .map_or_else(|| "ready".to_string(), ToString::to_string);
            info!(
                %backend,
                old = %change.old,
                new = %change.new,
                %reason,
                "backend health changed"
            );
        }
        if !self.core.all_checked() {
            return;
        }
        if self.published && change.is_none() && !self.retry {
            return;
        }
        let first = !self.published;
        self.published = true;
        self.write_sets(first);
        let ready = self.core.node_ready();
        // The first value is always announced, even when it equals the
        // channel's initial `false`: the agent waits for it.
        let changed = self.has_ready_backend.send_if_modified(|v| {
            let changed = *v != ready;
            *v = ready;
            changed || first
        });
        if changed || first {
            info!(has_ready_backend = ready, "node readiness");
        }
        self.report.send_if_modified(|report| {
            let changed = report.node_ready != ready || !report.started;
            report.node_ready = ready;
            report.started = true;
            changed
        });
    }

    fn write_sets(&mut self, first: bool) {
        self.retry = false;
        for change in self.core.plan() {
            let s = &self.core.services[change.index];
            let old = self.core.addresses(change.index, &s.serving);
            let new = self.core.addresses(change.index, &change.slots);
            let vip = s.vip;
            if let Err(error) = self.sink.set_ready(change.id, &change.slots) {
                warn!(
                    service = change.id,
                    %vip,
                    error = %error_chain(&error),
                    "could not write the READY set; retrying after the next check"
                );
                self.retry = true;
                continue;
            }
            info!(
                service = change.id,
                %vip,
                old = ?old,
                new = ?new,
                first,
                "READY set changed"
            );
            for backend in self.core.commit(&change) {
                if self.core.is_drained(backend) {
                    info!(
                        service = change.id,
                        %vip,
                        %backend,
                        "drained backend left the READY set; its flows stay"
                    );
                    continue;
                }
                info!(
                    service = change.id,
                    %vip,
                    %backend,
                    "backend left the READY set; resetting its flows"
                );
                (self.on_leave)(ServiceBackend {
                    service_id: change.id as u32,
                    backend,
                });
            }
        }
    }
}

async fn check_loop<C: HealthCheck>(
    index: usize,
    addr: SocketAddrV4,
    checker: Arc<C>,
    interval: Duration,
    tx: mpsc::Sender<(usize, Probe)>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let probe = checker.check(SocketAddr::V4(addr)).await;
        if tx.send((index, probe)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::Badness::*;
    use super::*;
    use crate::health::{
        fake::{Behaviour, FakeKeydb},
        Checker, LinkState, Role,
    };

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn service(id: usize, backends: &[(&str, bool)]) -> MonitoredService {
        MonitoredService {
            id,
            vip: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 6380 + id as u16),
            backends: backends
                .iter()
                .map(|&(a, local)| MonitoredBackend {
                    addr: addr(a),
                    local,
                })
                .collect(),
        }
    }

    const A: &str = "198.18.0.1:6380";
    const B: &str = "198.18.0.2:6380";
    const C: &str = "198.18.0.3:6380";

    /// Applies every planned change; returns (service id, new slots, left).
    fn apply(core: &mut Core) -> Vec<(usize, Vec<u8>, Vec<SocketAddrV4>)> {
        core.plan()
            .into_iter()
            .map(|c| {
                let left = core.commit(&c);
                (c.id, c.slots, left)
            })
            .collect()
    }

    fn feed(core: &mut Core, backend: usize, found: &[Badness]) {
        for &b in found {
            core.observe(backend, b);
        }
    }

    #[test]
    fn a_shared_backend_is_tracked_once() {
        let services = [
            service(0, &[(A, true), (B, false)]),
            service(1, &[(B, false), (C, false)]),
        ];
        let core = Core::new(&services, 2, 3, InitialHealth::FirstCheck, |_| vec![]);
        assert_eq!(core.backends(), vec![addr(A), addr(B), addr(C)]);
    }

    #[test]
    fn the_current_set_is_read_from_the_data_plane() {
        let services = [service(0, &[(A, false), (B, false)])];
        // Out of range and repeated slots are ignored; order does not matter.
        let core = Core::new(&services, 2, 3, InitialHealth::Up, |_| vec![1, 7, 0, 1]);
        assert_eq!(core.serving(0), &[0, 1]);
        assert!(core.plan().is_empty(), "initial up, all serving: no write");
        let core = Core::new(&services, 2, 3, InitialHealth::Up, |_| vec![]);
        assert_eq!(core.plan()[0].slots, vec![0, 1]);
    }

    #[test]
    fn first_checks_gate_and_decide() {
        let services = [service(0, &[(A, false), (B, false)])];
        let mut core = Core::new(&services, 2, 3, InitialHealth::FirstCheck, |_| vec![]);
        assert!(!core.all_checked());
        core.observe(0, Ready);
        assert!(!core.all_checked());
        core.observe(1, Unavailable);
        assert!(core.all_checked());
        assert_eq!(apply(&mut core), vec![(0, vec![0], vec![])]);
        assert_eq!(core.badness(1), Some(Unavailable));
        assert!(core.node_ready(), "A is READY and nothing is local");
    }

    #[test]
    fn a_drained_backend_leaves_every_set_and_the_last_ready_one_cannot_be_drained() {
        let services = [
            service(0, &[(A, true), (B, false)]),
            service(1, &[(B, false), (C, false)]),
        ];
        let mut core = Core::new(&services, 1, 1, InitialHealth::Up, |_| vec![0, 1]);
        assert!(core.plan().is_empty());
        assert!(core.set_drained(addr("198.18.0.9:6380"), true).is_err());

        core.set_drained(addr(B), true).unwrap();
        assert!(core.is_drained(addr(B)));
        assert_eq!(
            apply(&mut core),
            vec![(0, vec![0], vec![addr(B)]), (1, vec![1], vec![addr(B)]),]
        );
        assert!(core.node_ready(), "draining changes no health");
        assert!(core.set_drained(addr(B), true).unwrap().contains("already"));

        // C is now the only one serving service 1: it stays.
        let refused = core.set_drained(addr(C), true).unwrap_err();
        assert!(refused.contains("without a READY backend"), "{refused}");
        assert!(!core.is_drained(addr(C)));

        // When nothing else can serve, the drained backend does: with C
        // down, service 1 goes to B rather than to nobody.
        feed(&mut core, 2, &[Unavailable]);
        assert_eq!(apply(&mut core), vec![(1, vec![0], vec![addr(C)])]);
        feed(&mut core, 2, &[Ready]);
        assert_eq!(apply(&mut core), vec![(1, vec![1], vec![addr(B)])]);

        core.set_drained(addr(B), false).unwrap();
        assert_eq!(
            apply(&mut core),
            vec![(0, vec![0, 1], vec![]), (1, vec![0, 1], vec![])]
        );
    }

    #[test]
    fn a_backend_goes_after_fall_checks_and_returns_after_rise() {
        let services = [service(0, &[(A, false), (B, false)])];
        let mut core = Core::new(&services, 2, 3, InitialHealth::FirstCheck, |_| vec![]);
        feed(&mut core, 0, &[Ready]);
        feed(&mut core, 1, &[Ready]);
        assert_eq!(apply(&mut core), vec![(0, vec![0, 1], vec![])]);

        for _ in 0..2 {
            core.observe(1, Unavailable);
            assert!(core.plan().is_empty(), "fewer than fall failures");
        }
        core.observe(1, Unavailable);
        assert_eq!(apply(&mut core), vec![(0, vec![0], vec![addr(B)])]);

        core.observe(1, Ready);
        assert!(core.plan().is_empty(), "fewer than rise passes");
        core.observe(1, Ready);
        assert_eq!(apply(&mut core), vec![(0, vec![0, 1], vec![])]);
    }

    #[test]
    fn the_last_backend_with_its_link_down_stays() {
        let services = [service(0, &[(A, false), (B, false)])];
        let mut core = Core::new(&services, 1, 1, InitialHealth::FirstCheck, |_| vec![]);
        core.observe(0, Ready);
        core.observe(1, Ready);
        apply(&mut core);
        // A's replication link goes down: B alone is READY.
        core.observe(0, ReplicaLinkDown);
        assert_eq!(apply(&mut core), vec![(0, vec![1], vec![addr(A)])]);
        assert!(core.node_ready());
        // B dies: A, least bad, serves alone; nothing is strictly READY.
        core.observe(1, Unavailable);
        assert_eq!(apply(&mut core), vec![(0, vec![0], vec![addr(B)])]);
        assert!(!core.node_ready());
        // B back: only the READY one serves again.
        core.observe(1, Ready);
        assert_eq!(apply(&mut core), vec![(0, vec![1], vec![addr(A)])]);
    }

    #[test]
    fn a_loading_backend_never_serves() {
        let services = [service(0, &[(A, false)])];
        let mut core = Core::new(&services, 1, 1, InitialHealth::Up, |_| vec![0]);
        feed(&mut core, 0, &[Unavailable; 5]);
        assert_eq!(apply(&mut core), vec![(0, vec![], vec![addr(A)])]);
        assert!(!core.node_ready());
    }

    #[test]
    fn a_backend_leaves_one_service_and_stays_in_another() {
        // B is shared; with its link down it is the last resort of service
        // 1 but not of service 0, where A is READY.
        let services = [
            service(0, &[(A, false), (B, false)]),
            service(1, &[(B, false), (C, false)]),
        ];
        let mut core = Core::new(&services, 1, 1, InitialHealth::FirstCheck, |_| vec![]);
        core.observe(0, Ready);
        core.observe(1, Ready);
        core.observe(2, Unavailable);
        assert_eq!(
            apply(&mut core),
            vec![(0, vec![0, 1], vec![]), (1, vec![0], vec![])]
        );
        core.observe(1, ReplicaLinkDown);
        assert_eq!(apply(&mut core), vec![(0, vec![0], vec![addr(B)])]);
        assert_eq!(core.serving(1), &[0]);
    }

    /// Each service's backends as (local, damped badness).
    type Services<'a> = &'a [&'a [(bool, Badness)]];

    #[test]
    fn node_ready_rules() {
        let cases: &[(&str, Services, bool)] = &[
            ("no services", &[], false),
            ("remote ready", &[&[(false, Ready)]], true),
            ("nothing ready", &[&[(false, ReplicaLinkDown)]], false),
            (
                "local ready, remote down",
                &[&[(true, Ready), (false, Unavailable)]],
                true,
            ),
            (
                "local not ready, remote ready: not this node",
                &[&[(true, ReplicaSyncing), (false, Ready)]],
                false,
            ),
            (
                "local loading",
                &[&[(true, Unavailable), (false, Ready)]],
                false,
            ),
            (
                "every service must have one",
                &[&[(false, Ready)], &[(false, Unavailable)]],
                false,
            ),
            (
                "two services, each ready",
                &[&[(true, Ready)], &[(false, Unavailable), (false, Ready)]],
                true,
            ),
        ];
        for (name, services, expected) in cases {
            assert_eq!(node_ready(services.iter().copied()), *expected, "{name}");
        }
    }

    #[test]
    fn node_readiness_follows_the_local_backend() {
        let services = [service(0, &[(A, true), (B, false)])];
        let mut core = Core::new(&services, 2, 3, InitialHealth::FirstCheck, |_| vec![]);
        assert!(!core.node_ready(), "nothing checked yet");
        core.observe(1, Ready);
        core.observe(0, ReplicaSyncing);
        assert!(!core.node_ready(), "own KeyDB resyncing after a rejoin");
        feed(&mut core, 0, &[Ready, Ready]);
        assert!(core.node_ready());
        feed(&mut core, 0, &[Unavailable; 3]);
        assert!(!core.node_ready());
    }

    // The async shell against fake KeyDBs on 127.0.0.1.

    type Writes = mpsc::UnboundedReceiver<(usize, Vec<u8>)>;

    /// Records writes; holds the sets like the data plane would.
    struct Recorder {
        sets: HashMap<usize, Vec<u8>>,
        tx: mpsc::UnboundedSender<(usize, Vec<u8>)>,
    }

    impl ReadySink for Recorder {
        fn ready(&self, id: usize) -> Vec<u8> {
            self.sets.get(&id).cloned().unwrap_or_default()
        }
        fn set_ready(&mut self, id: usize, slots: &[u8]) -> Result<(), DataPlaneError> {
            self.sets.insert(id, slots.to_vec());
            let _ = self.tx.send((id, slots.to_vec()));
            Ok(())
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    fn config() -> HealthConfig {
        HealthConfig::default() // 100 ms, 100 ms, rise 2, fall 3, first-check
    }

    fn v4(a: SocketAddr) -> SocketAddrV4 {
        match a {
            SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        }
    }

    struct Running {
        writes: Writes,
        left: mpsc::UnboundedReceiver<ServiceBackend>,
        ready: watch::Receiver<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Running {
        async fn next_write(&mut self) -> (usize, Vec<u8>) {
            tokio::time::timeout(WAIT, self.writes.recv())
                .await
                .expect("no write in time")
                .expect("monitor ended")
        }

        async fn ready_becomes(&mut self, value: bool) {
            tokio::time::timeout(WAIT, self.ready.wait_for(|&v| v == value))
                .await
                .unwrap_or_else(|_| panic!("has_ready_backend did not become {value}"))
                .unwrap();
        }
    }

    fn start(backends: &[(SocketAddrV4, bool)], sink_tx_ready: Option<Vec<u8>>) -> Running {
        let services = vec![MonitoredService {
            id: 0,
            vip: addr("198.18.0.100:6380"),
            backends: backends
                .iter()
                .map(|&(addr, local)| MonitoredBackend { addr, local })
                .collect(),
        }];
        let (tx, writes) = mpsc::unbounded_channel();
        let sink = Recorder {
            sets: sink_tx_ready.map(|s| (0, s)).into_iter().collect(),
            tx,
        };
        let (ready_tx, ready) = watch::channel(false);
        let (left_tx, left) = mpsc::unbounded_channel();
        let cfg = config();
        let checker = Checker::new(cfg.timeout(), None);
        let task = tokio::spawn(run(
            services,
            checker,
            &cfg,
            sink,
            ready_tx,
            watch::channel(HealthReport::default()).0,
            move |sb| {
                let _ = left_tx.send(sb);
            },
            mpsc::channel(1).1,
        ));
        Running {
            writes,
            left,
            ready,
            task,
        }
    }

    #[tokio::test]
    async fn a_stopped_backend_is_removed_and_readded_when_back() {
        let a = FakeKeydb::start(Behaviour::master()).await.unwrap();
        let b = FakeKeydb::start(Behaviour::master()).await.unwrap();
        let (a_addr, b_addr) = (v4(a.addr()), v4(b.addr()));
        let mut m = start(&[(a_addr, false), (b_addr, false)], Some(vec![]));

        assert_eq!(m.next_write().await, (0, vec![0, 1]));
        m.ready_becomes(true).await;
        assert!(m.left.try_recv().is_err());

        let cfg = config();
        b.stop().await;
        let stopped = Instant::now();
        assert_eq!(m.next_write().await, (0, vec![0]));
        let took = stopped.elapsed();
        // `fall` refused checks: the first may start right after the stop.
        assert!(took >= cfg.interval() * (cfg.fall - 1), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let left = tokio::time::timeout(WAIT, m.left.recv()).await.unwrap();
        assert_eq!(
            left,
            Some(ServiceBackend {
                service_id: 0,
                backend: b_addr
            })
        );
        assert!(*m.ready.borrow(), "A is still READY");

        let b = FakeKeydb::start_on(SocketAddr::V4(b_addr), Behaviour::master())
            .await
            .unwrap();
        let restarted = Instant::now();
        assert_eq!(m.next_write().await, (0, vec![0, 1]));
        assert!(restarted.elapsed() >= cfg.interval() * (cfg.rise - 1));
        assert!(b.connections() >= cfg.rise as usize);
        assert!(m.left.try_recv().is_err());
        drop(a);
    }

    /// The acceptance case of the health design: +PONG but -LOADING is
    /// never READY; a replica with its link down serves alone as the least
    /// bad, without making the node ready.
    #[tokio::test]
    async fn a_loading_backend_never_serves_and_a_lagging_one_serves_alone() {
        let loading = FakeKeydb::start(Behaviour::loading()).await.unwrap();
        let lagging = FakeKeydb::start(Behaviour::replica(Role::ActiveReplica, LinkState::Down))
            .await
            .unwrap();
        let mut m = start(
            &[(v4(loading.addr()), false), (v4(lagging.addr()), false)],
            Some(vec![]),
        );
        assert_eq!(m.next_write().await, (0, vec![1]));
        assert!(!*m.ready.borrow(), "least bad is not READY");

        lagging.set_behaviour(Behaviour::master());
        m.ready_becomes(true).await;
        // More checks of the loading server, and still no write.
        let seen = loading.connections();
        let deadline = Instant::now() + WAIT;
        while loading.connections() < seen + 5 {
            assert!(
                Instant::now() < deadline,
                "the loading server is not checked"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(m.writes.try_recv().is_err(), "the set must stay [1]");
    }

    #[tokio::test]
    async fn node_readiness_follows_the_local_backend_live() {
        let local = FakeKeydb::start(Behaviour::master()).await.unwrap();
        let remote = FakeKeydb::start(Behaviour::master()).await.unwrap();
        let local_addr = v4(local.addr());
        let mut m = start(&[(local_addr, true), (v4(remote.addr()), false)], None);
        assert_eq!(m.next_write().await, (0, vec![0, 1]));
        m.ready_becomes(true).await;

        local.stop().await;
        assert_eq!(m.next_write().await, (0, vec![1]));
        m.ready_becomes(false).await;

        let _local = FakeKeydb::start_on(SocketAddr::V4(local_addr), Behaviour::master())
            .await
            .unwrap();
        assert_eq!(m.next_write().await, (0, vec![0, 1]));
        m.ready_becomes(true).await;
    }

    /// A check that opens no socket: READY, or refused for the backends
    /// in `down`.
    struct Scripted {
        down: Arc<Mutex<Vec<SocketAddr>>>,
    }

    impl HealthCheck for Scripted {
        fn check(&self, backend: SocketAddr) -> impl Future<Output = Probe> + Send {
            let down = self.down.lock().unwrap().contains(&backend);
            async move {
                Probe {
                    readiness: if down {
                        crate::health::Readiness::NotReady(crate::health::NotReady::Refused)
                    } else {
                        crate::health::Readiness::Ready
                    },
                    role: None,
                    elapsed: Duration::from_millis(1),
                    info: None,
                }
            }
        }
    }

    #[tokio::test]
    async fn the_report_follows_checks_and_names_the_failure() {
        let (a_addr, b_addr) = (addr(A), addr(B));
        let down = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut writes) = mpsc::unbounded_channel();
        let sink = Recorder {
            sets: HashMap::new(),
            tx,
        };
        let (ready_tx, _ready) = watch::channel(false);
        let (report_tx, mut report) = watch::channel(HealthReport::default());
        let cfg = config();
        let task = tokio::spawn(run(
            vec![service(0, &[(A, true), (B, false)])],
            Scripted {
                down: Arc::clone(&down),
            },
            &cfg,
            sink,
            ready_tx,
            report_tx,
            |_| {},
            mpsc::channel(1).1,
        ));
        let _abort = AbortOnDrop(task);
        {
            let initial = report.borrow();
            assert_eq!(initial.backends.len(), 2);
            assert_eq!(initial.backends[0].addr, a_addr);
            assert!(initial.backends[0].local && !initial.backends[1].local);
            assert!(!initial.started);
        }
        let first = tokio::time::timeout(WAIT, writes.recv()).await.unwrap();
        assert_eq!(first, Some((0, vec![0, 1])));
        tokio::time::timeout(WAIT, report.wait_for(|r| r.started && r.node_ready))
            .await
            .expect("report: started and ready")
            .unwrap();
        assert!(report.borrow().backends.iter().all(BackendReport::is_ready));

        down.lock().unwrap().push(SocketAddr::V4(b_addr));
        let now = tokio::time::timeout(
            WAIT,
            report.wait_for(|r| r.backend(b_addr).is_some_and(|b| !b.is_ready())),
        )
        .await
        .expect("B not READY in the report")
        .unwrap()
        .clone();
        let b = now.backend(b_addr).unwrap();
        let failure = b.last_failure.as_ref().expect("a failure recorded");
        assert_eq!(failure.kind, "refused");
        assert_eq!(failure.reason, "connection refused");
        assert!(b.last_check_failed);
        assert!(b.failed_checks() >= u64::from(cfg.fall), "{b:?}");
        assert!(b.checks > b.failed_checks());
        assert!(now.node_ready, "A (local) is still READY");
        assert!(now.backend(a_addr).unwrap().last_failure.is_none());
    }

    /// Removes a directory (and what is in it) on drop.
    struct RemoveDir(std::path::PathBuf);

    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Root: the monitor writes the kernel's `SERVICES` map through a real
    /// [`ServiceTable`], and a backend that stops has its flows purged from
    /// a conntrack map by a real [`crate::flow_reset::FlowReset`]. Nothing
    /// is attached; every address is on loopback, so no poke is sent.
    #[tokio::test]
    async fn writes_the_kernel_map_and_purges_the_flows_of_a_stopped_backend() {
        use aya::maps::{HashMap as BpfHashMap, Map, MapData};
        use balancer_common::{
            names, FlowEntry, FlowKey, Service, ServiceKey, DIR_TO_BACKEND, DIR_TO_CLIENT,
            IPPROTO_TCP,
        };

        use crate::{
            conntrack::{self, ConntrackMap},
            dataplane::{addr_be, port_be, service_entry, DataPlane},
            flow_reset::{self, FlowReset},
            pins::PinDir,
        };

        let a = FakeKeydb::start(Behaviour::master()).await.unwrap();
        let b = FakeKeydb::start(Behaviour::master()).await.unwrap();
        let (a_addr, b_addr) = (v4(a.addr()), v4(b.addr()));
        let svc = ServiceConfig {
            vip: Ipv4Addr::new(127, 0, 0, 1),
            port: 1,
            backends: vec![a_addr, b_addr],
            scheduler: crate::config::Scheduler::RoundRobin,
        };

        let root = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/balancer-monitor-test-{}",
            std::process::id()
        ));
        let _remove = RemoveDir(root.clone());
        let pins = PinDir::create(&root).expect("bpffs at /sys/fs/bpf (root)");
        let mut dataplane = DataPlane::load(64).expect("loading the XDP object needs root");
        dataplane.pin_maps(pins.dir()).unwrap();
        let (key, mut value) = service_entry(0, &svc, true, |_| false);
        value.ready_count = 0; // as the agent starts it with health checks on
        let table = dataplane.take_service_table(vec![(key, value)]).unwrap();
        let table = Arc::new(Mutex::new(table));
        let kernel: BpfHashMap<MapData, ServiceKey, Service> = BpfHashMap::try_from(
            Map::from_map_data(MapData::from_pin(pins.dir().join(names::SERVICES)).unwrap())
                .unwrap(),
        )
        .unwrap();
        let kernel_ready = move || {
            let v = kernel.get(&key, 0).unwrap();
            v.ready[..v.ready_count as usize].to_vec()
        };
        assert_eq!(kernel_ready(), Vec::<u8>::new());

        // Two flows to B and one to A, client 127.0.0.1.
        let mut flows = ConntrackMap::create(64, 0).unwrap();
        let lo = addr_be(Ipv4Addr::LOCALHOST);
        for (client_port, backend) in [(40000, b_addr), (40001, b_addr), (40002, a_addr)] {
            let fwd_key = FlowKey {
                saddr: lo,
                daddr: lo,
                sport: port_be(client_port),
                dport: port_be(1),
                proto: IPPROTO_TCP,
                _pad: [0; 3],
            };
            let fwd = FlowEntry {
                nat_saddr: lo,
                nat_daddr: addr_be(*backend.ip()),
                nat_sport: port_be(client_port + 20000),
                nat_dport: port_be(backend.port()),
                direction: DIR_TO_BACKEND,
                ..FlowEntry::default()
            };
            let rev = FlowEntry {
                nat_saddr: lo,
                nat_daddr: lo,
                nat_sport: port_be(1),
                nat_dport: port_be(client_port),
                direction: DIR_TO_CLIENT,
                ..FlowEntry::default()
            };
            flows.insert(fwd_key, fwd, 0).unwrap();
            flows.insert(conntrack::partner_key(&fwd), rev, 0).unwrap();
        }
        let count = |m: &ConntrackMap| m.keys().count();
        assert_eq!(count(&flows), 6);
        let reset = FlowReset::new(conntrack::another_handle(&flows).unwrap(), [], 64).unwrap();
        let (resets, requests) = flow_reset::channel();
        let reset_task = tokio::spawn(flow_reset::run(reset, requests));

        let (ready_tx, mut ready) = watch::channel(false);
        let cfg = config();
        let monitor = tokio::spawn(run(
            MonitoredService::from_config(std::slice::from_ref(&svc), |_| false),
            Checker::new(cfg.timeout(), None),
            &cfg,
            Arc::clone(&table),
            ready_tx,
            watch::channel(HealthReport::default()).0,
            move |left| resets.request(left.service_id, left.backend),
            mpsc::channel(1).1,
        ));
        let _abort = (AbortOnDrop(monitor), AbortOnDrop(reset_task));

        poll("both READY in the kernel map", || kernel_ready() == [0, 1]).await;
        tokio::time::timeout(WAIT, ready.wait_for(|&v| v))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(count(&flows), 6, "nothing purged while all serve");

        b.stop().await;
        poll("B out of the kernel map", || kernel_ready() == [0]).await;
        poll("B's flows purged", || count(&flows) == 2).await;
        let left: Vec<FlowKey> = flows.keys().map(Result::unwrap).collect();
        assert!(
            left.iter().any(|k| k.sport == port_be(40002)),
            "A's flow stays"
        );
        assert_eq!(
            table.lock().unwrap().get(0).unwrap().ready_count,
            1,
            "the table's copy agrees"
        );
        drop(dataplane);
        drop(pins);
        drop(a);
    }

    /// Polls `cond` until it holds; fails after [`WAIT`].
    async fn poll(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    struct AbortOnDrop(tokio::task::JoinHandle<()>);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    /// Nothing is written before every backend had its first check: a
    /// backend whose check stalls holds the first write back by one
    /// timeout, not more.
    #[tokio::test]
    async fn the_first_write_waits_for_every_first_check() {
        let fast = FakeKeydb::start(Behaviour::master()).await.unwrap();
        let silent = FakeKeydb::start(Behaviour::silent()).await.unwrap();
        let started = Instant::now();
        let mut m = start(
            &[(v4(fast.addr()), false), (v4(silent.addr()), false)],
            Some(vec![0, 1]),
        );
        assert_eq!(m.next_write().await, (0, vec![0]));
        assert!(started.elapsed() >= config().timeout());
        assert_eq!(
            m.left.recv().await.map(|l| l.backend),
            Some(v4(silent.addr())),
            "the startup set held it"
        );
    }
}
