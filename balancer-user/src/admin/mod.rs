//! The agent's admin interface: what an operator asks a running agent.
//!
//! - [`socket`]: the root-only unix socket (`[admin] socket`), one request
//!   line in, one JSON reply out ([`protocol`]); `balancer status` is its
//!   client ([`client`]).
//! - [`metrics`]: Prometheus text on `GET /metrics` (`[admin]
//!   metrics_listen`, loopback by default, or off), and on `GET /` of the
//!   same listener the status page ([`page`]).
//! - [`status`]: the document both are rendered from, joined from what the
//!   election, the health monitor and the data plane publish
//!   ([`AgentStatus`]), and its readable form.
//!
//! Startup and shutdown follow the agent's guard pattern:
//! [`AdminListeners::bind`] runs before the agent touches the node, so a
//! live agent on the socket or a port in use stops the start with a clear
//! error; [`AdminListeners::serve`] starts answering once the data plane and
//! the election run; dropping the returned [`Admin`] stops both servers and
//! removes the socket (also when the start fails half-way).
//!
//! The interface reads, with one exception: `drain` / `ready` on the
//! root-only socket ask the health monitor to keep a backend out of the
//! READY sets (or let it back), which the monitor applies like a health
//! change but without resetting the backend's flows. The XDP program is
//! untouched (its maps are read through their pins); the election
//! publishes its state and priority into a `watch` channel when they
//! change, the health monitor its report after each check.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::info;

use crate::{
    config,
    election::ElectionStatus,
    error_chain,
    health::HealthReport,
    netlink::Netlink,
    path_check::PathReport,
    stats::{PinnedMaps, StatsError},
    vrrp_socket::AdvertCounters,
};

pub mod client;
pub mod metrics;
pub mod page;
pub mod protocol;
pub mod socket;
pub mod status;

use self::{
    socket::{AdminSocket, SocketError, SocketFile},
    status::{AdvertInfo, AgentFacts, ElectionInput, SnatInputs, Status, StatusInputs},
};

/// How long a status may wait for the interface's address list.
const ADDRESS_LIST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot listen for metrics on {addr} ([admin] metrics_listen; \"off\" turns the endpoint off)")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the data plane's maps for the admin interface")]
    Maps(#[from] StatsError),
}

/// Why no status document could be made.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read the data plane's maps")]
    Maps(#[from] StatsError),
}

/// Where status documents come from: the running agent ([`AgentStatus`]),
/// or a fixed document in tests.
pub trait StatusProvider: Send + Sync + 'static {
    /// The status now, or why it cannot be had.
    fn status(&self) -> impl Future<Output = Result<Status, StatusError>> + Send;

    /// Drains `backend` (`drained`) or makes it eligible again: what
    /// changed, or why nothing did.
    fn set_drained(
        &self,
        backend: SocketAddrV4,
        drained: bool,
    ) -> impl Future<Output = Result<String, String>> + Send {
        let _ = (backend, drained);
        async { Err("this agent cannot drain backends".to_string()) }
    }
}

/// The election's handles, in VRRP mode.
#[derive(Debug, Clone)]
pub struct ElectionHandles {
    pub vrid: u8,
    pub version: u8,
    pub configured_priority: u8,
    pub no_ready_backend_weight: u8,
    pub status: watch::Receiver<ElectionStatus>,
    pub counters: Arc<AdvertCounters>,
}

/// The running agent's parts, as the admin interface reads them.
#[derive(Debug)]
pub struct AgentStatus {
    pub facts: AgentFacts,
    /// `None` without `[vrrp]`.
    pub election: Option<ElectionHandles>,
    pub health: watch::Receiver<HealthReport>,
    /// `drain` / `ready` requests to the health monitor.
    pub drains: tokio::sync::mpsc::Sender<crate::health::monitor::DrainRequest>,
    /// Entries the last conntrack sweep left.
    pub conntrack_entries: watch::Receiver<usize>,
    /// The SNAT range and the remote backends; `in_use` is filled from
    /// `snat_in_use`.
    pub snat: SnatInputs,
    /// SNAT ports held per backend at the last sweep.
    pub snat_in_use: watch::Receiver<BTreeMap<SocketAddrV4, u32>>,
    /// The path check's verdicts on remote backends.
    pub paths: watch::Receiver<PathReport>,
    pub maps: PinnedMaps,
    /// To list the interface's addresses (is a VIP held?).
    pub netlink: Netlink,
    pub ifindex: u32,
    pub vips: Vec<Ipv4Addr>,
}

impl StatusProvider for AgentStatus {
    async fn set_drained(&self, backend: SocketAddrV4, drained: bool) -> Result<String, String> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let request = crate::health::monitor::DrainRequest {
            backend,
            drained,
            reply,
        };
        self.drains
            .send(request)
            .await
            .map_err(|_| "the health monitor is not running".to_string())?;
        outcome
            .await
            .map_err(|_| "the health monitor stopped before it answered".to_string())?
    }

    async fn status(&self) -> Result<Status, StatusError> {
        let mut warnings = Vec::new();
        let present = match tokio::time::timeout(
            ADDRESS_LIST_TIMEOUT,
            self.netlink.ipv4_addresses_on(self.ifindex),
        )
        .await
        {
            Ok(Ok(present)) => Some(present),
            Ok(Err(error)) => {
                warnings.push(format!(
                    "cannot list the addresses of {}: {}",
                    self.facts.node.interface,
                    error_chain(&error)
                ));
                None
            }
            Err(_) => {
                warnings.push(format!(
                    "listing the addresses of {} took longer than {ADDRESS_LIST_TIMEOUT:?}",
                    self.facts.node.interface
                ));
                None
            }
        };
        let snapshot = self.maps.traffic()?;
        // Without the address list, the data plane's active flag says
        // whether this node serves the VIPs.
        let active = snapshot.services.iter().any(|s| s.active);
        let vips = self
            .vips
            .iter()
            .map(|&vip| (vip, present.as_ref().map_or(active, |p| p.contains(&vip))))
            .collect();
        let election = match &self.election {
            None => ElectionInput::Static,
            Some(e) => ElectionInput::Vrrp {
                vrid: e.vrid,
                version: e.version,
                configured_priority: e.configured_priority,
                no_ready_backend_weight: e.no_ready_backend_weight,
                status: *e.status.borrow(),
                adverts: AdvertInfo::read(&e.counters),
            },
        };
        let health = self.health.borrow().clone();
        let paths = self.paths.borrow().clone();
        Ok(Status::build(StatusInputs {
            now: SystemTime::now(),
            facts: &self.facts,
            election,
            vips,
            health: &health,
            snapshot: &snapshot,
            paths: &paths,
            conntrack_entries: *self.conntrack_entries.borrow(),
            snat: SnatInputs {
                in_use: self.snat_in_use.borrow().clone(),
                ..self.snat.clone()
            },
            warnings,
        }))
    }
}

/// The admin socket and the metrics listener, bound but not served yet.
#[derive(Debug)]
pub struct AdminListeners {
    socket: AdminSocket,
    metrics: Option<TcpListener>,
}

impl AdminListeners {
    /// Creates the admin socket and binds the metrics endpoint (see the
    /// module docs). Connections wait in the backlog until
    /// [`AdminListeners::serve`].
    pub async fn bind(config: &config::Admin) -> Result<AdminListeners, AdminError> {
        let socket = AdminSocket::bind(&config.socket)?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AdminError::MetricsListen { addr, source })?,
            ),
            None => None,
        };
        Ok(AdminListeners { socket, metrics })
    }

    /// Starts answering with documents from `provider`.
    pub fn serve<P: StatusProvider>(self, provider: P) -> Admin {
        let provider = Arc::new(provider);
        let AdminSocket { file, listener } = self.socket;
        let metrics_addr = self.metrics.as_ref().and_then(|l| l.local_addr().ok());
        info!(
            socket = %file.path().display(),
            metrics = %metrics_addr.map_or_else(|| "off".to_string(), |a| format!("http://{a}{}", metrics::METRICS_PATH)),
            "admin interface ready"
        );
        let mut tasks = vec![AbortOnDrop(tokio::spawn(socket::serve(
            listener,
            Arc::clone(&provider),
        )))];
        if let Some(listener) = self.metrics {
            tasks.push(AbortOnDrop(tokio::spawn(metrics::serve(
                listener, provider,
            ))));
        }
        Admin {
            _tasks: tasks,
            _socket: file,
        }
    }
}

/// The serving admin interface. Dropping it stops the servers (and every
/// connection), then removes the socket.
#[derive(Debug)]
pub struct Admin {
    _tasks: Vec<AbortOnDrop>,
    _socket: SocketFile,
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
