//! `balancer run`: brings the data plane up in a fixed order, keeps it
//! running until SIGTERM or SIGINT, and takes it down again.
//!
//! Every change to the node is held by a guard ([`PinDir`], [`SysctlGuard`],
//! [`VipGuard`], [`DataPlane`], the admin socket in [`Admin`]), so a
//! failure half-way through startup, a signal during startup, or a normal
//! stop all undo exactly what was done, in reverse order. The XDP link is
//! pinned last: its pin (`<pin_dir>/v<LAYOUT_VERSION>/xdp_link`) is the
//! "data plane ready" signal.
//!
//! Two modes. Static (no `[vrrp]`): `[dataplane] active` decides once
//! whether this node holds the VIPs. Election (`[vrrp]`): services start
//! inactive, no VIP is added at startup, and once the data plane is ready
//! the [`Election`] adds/removes the VIPs and flips the active flag. On
//! SIGTERM/SIGINT the election stops first (a master sends priority 0,
//! clears the flag, removes the VIPs), then the data plane comes down.
//!
//! The admin interface ([`crate::admin`]) binds its socket and metrics
//! port before anything else changes on the node (another live agent on
//! the socket, or a port in use, is a startup error) and answers once the
//! election runs; it goes first when the agent stops.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use aya_log::EbpfLogger;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, Signal, SignalKind},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use crate::{
    admin::{
        status::{AgentFacts, NodeInfo},
        Admin, AdminError, AdminListeners, AgentStatus, ElectionHandles,
    },
    config::Config,
    conntrack,
    dataplane::{
        remote_backends, service_entry, settings_value, DataPlane, DataPlaneError, ServiceTable,
    },
    election::{Election, ElectionError, ElectionSetup},
    error_chain,
    flow_reset::{self, FlowReset, FlowResetError},
    health::{
        monitor::{self, MonitoredService},
        Checker, HealthReport, PasswordError,
    },
    neighbour,
    netlink::{self, Netlink, NetlinkError, VipGuard},
    path_check::{self, PathReport},
    pins::{self, PinDir, PinDirError},
    service_manager,
    stats::PinnedMaps,
    sysctl::{SysctlError, SysctlGuard},
    xdp_mode::{self, NativeRefused},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen for signals")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    PinDir(#[from] PinDirError),
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    #[error("cannot start the VRRP election")]
    Election(#[from] ElectionError),
    #[error("the VRRP election ended unexpectedly")]
    ElectionEnded,
    #[error("cannot read the health-check password")]
    Password(#[from] PasswordError),
    #[error("cannot reset flows of failed backends")]
    FlowReset(#[from] FlowResetError),
    #[error("cannot start the admin interface")]
    Admin(#[from] AdminError),
    #[error(transparent)]
    XdpMode(#[from] NativeRefused),
    #[error(
        "dataplane.snat_addresses[{index}]: {addr} is not configured on {interface}: \
         add it (ip address add {addr}/32 dev {interface}) or remove it from the list"
    )]
    SnatAddress {
        index: usize,
        addr: Ipv4Addr,
        interface: String,
    },
}

/// The first of `configured` (SNAT addresses) that is not in `present` (the
/// interface's addresses), with its index. Replies to an address the
/// interface does not hold would never reach the data plane.
pub fn missing_snat_address(
    configured: &[Ipv4Addr],
    present: &[Ipv4Addr],
) -> Option<(usize, Ipv4Addr)> {
    configured
        .iter()
        .copied()
        .enumerate()
        .find(|(_, a)| !present.contains(a))
}

/// SIGTERM and SIGINT; SIGHUP is caught too, so that an operator's
/// reload reflex (`kill -HUP`, whose default action ends a process) does
/// not stop a node.
struct StopSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals, AgentError> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).map_err(AgentError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(AgentError::Signals)?,
            hup: signal(SignalKind::hangup()).map_err(AgentError::Signals)?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => warn!(
                    "SIGHUP: reloading the configuration is not supported yet; \
                     the agent keeps running with the configuration it started with \
                     (restart it to apply a change)"
                ),
            }
        }
    }
}

/// A background task, aborted when this is dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The running data plane. Fields drop in declaration order: the election
/// stops (releasing the VIPs), the admin interface stops and its socket
/// goes, tasks stop, the program is detached and unpinned, the pin
/// directory goes, static VIPs are removed, sysctls restored.
struct Running {
    /// One line for `systemctl status` (see [`service_manager::ready`]).
    summary: String,
    election: Option<Election>,
    _admin: Admin,
    _tasks: Vec<Task>,
    services: Arc<Mutex<ServiceTable>>,
    _dataplane: DataPlane,
    _pins: PinDir,
    _vips: Option<VipGuard>,
    _sysctls: SysctlGuard,
}

impl Running {
    /// Resolves only if the election thread ends on its own.
    async fn election_ended(&self) {
        match &self.election {
            Some(election) => election.ended().await,
            None => std::future::pending().await,
        }
    }

    async fn stop(mut self) {
        // A graceful election stop first: the backup takes over after
        // Skew_Time, and this node has released the VIPs.
        if let Some(election) = self.election.take() {
            election.shutdown().await;
        }
        // Tell the data plane that this node no longer holds the VIPs, so
        // nothing is half-handled while the rest comes down.
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = services.set_active(false) {
            warn!(error = %error_chain(&error), "could not clear the active flags");
        }
        drop(services);
        drop(self);
    }
}

/// Runs the agent with a validated `config` until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AgentError> {
    let started_at = SystemTime::now();
    let mut signals = StopSignals::new()?;
    let running = tokio::select! {
        running = start(&config, started_at) => running?,
        signal = signals.recv() => {
            info!(signal, "stopping before the data plane was ready");
            return Ok(());
        }
    };
    service_manager::ready(&running.summary);
    let watchdog = service_manager::Watchdog::start();
    let signal = tokio::select! {
        signal = signals.recv() => signal,
        () = running.election_ended() => {
            error!("the VRRP election ended unexpectedly; stopping");
            service_manager::stopping();
            drop(watchdog);
            running.stop().await;
            return Err(AgentError::ElectionEnded);
        }
    };
    info!(signal, "stopping");
    service_manager::stopping();
    drop(watchdog);
    running.stop().await;
    info!("stopped");
    Ok(())
}

async fn start(config: &Config, started_at: SystemTime) -> Result<Running, AgentError> {
    let dp = &config.dataplane;
    let interface = config.node.interface.as_str();
    let ifindex = netlink::interface_index(interface)?;
    let netlink = Netlink::connect()?;
    if !dp.snat_addresses.is_empty() {
        let present = netlink.ipv4_addresses_on(ifindex).await?;
        if let Some((index, addr)) = missing_snat_address(&dp.snat_addresses, &present) {
            return Err(AgentError::SnatAddress {
                index,
                addr,
                interface: interface.to_string(),
            });
        }
    }
    // Before anything changes on the node: refuses to start next to a live
    // agent on the same socket, or with the metrics port taken.
    let admin = AdminListeners::bind(&config.admin).await?;
    let kind = netlink.interface_kind(ifindex).await?;
    let xdp_plan = xdp_mode::choose(dp.xdp_mode, interface, kind)?;

    pins::ensure_bpffs(&dp.pin_dir)?;
    let pins = PinDir::create(&dp.pin_dir)?;

    let mut dataplane = DataPlane::load(dp.conntrack_flows)?;
    let logger = dataplane.take_logger();
    dataplane.write_settings(&settings_value(
        config.node.address,
        dp,
        crate::dataplane::snat_partitions(),
    ))?;

    let node_addrs: HashSet<Ipv4Addr> = netlink
        .ipv4_addresses()
        .await?
        .into_iter()
        .map(|(_, addr)| addr)
        .collect();
    if !node_addrs.contains(&config.node.address) {
        warn!(
            address = %config.node.address,
            "node.address is not configured on any interface: backends' replies will not reach this node"
        );
    }
    let is_local = |addr: Ipv4Addr| addr == config.node.address || node_addrs.contains(&addr);
    // Every service starts with an empty READY set: a backend serves only
    // once the health monitor has checked it.
    let entries = config
        .services
        .iter()
        .enumerate()
        .map(|(id, service)| {
            let (key, mut value) = service_entry(id as u32, service, dp.active, is_local);
            value.ready_count = 0;
            (key, value)
        })
        .collect();

    let sysctls = SysctlGuard::apply(dp.snat_ports, interface)?;

    // With an election, the election adds the VIPs when it becomes master.
    let vips = if dp.active && config.vrrp.is_none() {
        let vips: Vec<Ipv4Addr> = config.services.iter().map(|s| s.vip).collect();
        Some(VipGuard::add(&netlink, ifindex, interface, &vips).await?)
    } else {
        None
    };

    let remote = remote_backends(&config.services, is_local);
    // The health checks connect to every backend each interval, which keeps
    // the neighbour entries the XDP program's FIB lookups need resolved.
    let unresolved = neighbour::wait_resolved(&netlink, &remote, neighbour::STARTUP_WAIT).await;
    let mut tasks = Vec::new();

    let mode = dataplane.attach(ifindex, &xdp_plan)?;
    dataplane.pin_maps(pins.dir())?;
    // The admin interface reads the maps through their pins, as
    // `balancer stats` does.
    let maps = PinnedMaps::open(&dp.pin_dir).map_err(AdminError::from)?;

    let services = Arc::new(Mutex::new(dataplane.take_service_table(entries)?));
    let table = dataplane.take_conntrack()?;
    let timeouts = crate::dataplane::hold_times(dp);
    let max_entries = balancer_common::conntrack_entries(dp.conntrack_flows) as usize;

    // Health: backends leaving a service's READY set have their flows
    // through this node reset, so clients reconnect at once.
    let reset_table = conntrack::another_handle(&table).map_err(|source| DataPlaneError::Map {
        name: balancer_common::names::CONNTRACK,
        source,
    })?;
    let own_addrs = node_addrs.iter().copied().chain([config.node.address]);
    let service_addrs = config
        .services
        .iter()
        .map(|s| SocketAddrV4::new(s.vip, s.port))
        .collect();
    let reset = FlowReset::new(reset_table, own_addrs, max_entries)?.with_services(service_addrs);
    let (resets, requests) = flow_reset::channel();
    tasks.push(Task(tokio::spawn(flow_reset::run(reset, requests))));
    let checker = Checker::from_config(&config.health)?;
    let (has_ready_backend, mut has_ready_backend_rx) = watch::channel(false);
    has_ready_backend_rx.mark_unchanged();
    let (health_report, health_report_rx) = watch::channel(HealthReport::default());
    let (drains, drain_requests) = tokio::sync::mpsc::channel(4);
    tasks.push(Task(tokio::spawn(monitor::run(
        MonitoredService::from_config(&config.services, is_local),
        checker,
        &config.health,
        Arc::clone(&services),
        has_ready_backend,
        health_report,
        move |left| resets.request(left.service_id, left.backend),
        drain_requests,
    ))));
    // Announce readiness only once the first checks set the READY sets
    // (bounded: a backend that does not answer times out).
    let first_sets = config.health.timeout() * 2 + std::time::Duration::from_millis(500);
    if tokio::time::timeout(first_sets, has_ready_backend_rx.changed())
        .await
        .is_err()
    {
        warn!(after = ?first_sets, "the first health checks have not finished; starting anyway");
    }
    let exhaustion_maps = PinnedMaps::open(&dp.pin_dir).map_err(AdminError::from)?;
    tasks.push(Task(tokio::spawn(conntrack::run_exhaustion_log(
        exhaustion_maps,
        dp.snat_ports.len() * (1 + dp.snat_addresses.len() as u32),
    ))));
    let (conntrack_entries, conntrack_entries_rx) = watch::channel(0);
    let (snat_in_use, snat_in_use_rx) = watch::channel(Default::default());
    tasks.push(Task(tokio::spawn(conntrack::run_sweeper(
        table,
        timeouts,
        max_entries,
        conntrack_entries,
        snat_in_use,
    ))));
    if let Some(logger) = logger {
        tasks.push(Task(tokio::spawn(forward_logs(logger))));
    }
    let (paths, paths_rx) = watch::channel(PathReport::new());
    let path_maps = PinnedMaps::open(&dp.pin_dir).map_err(AdminError::from)?;
    tasks.push(Task(tokio::spawn(path_check::run(path_maps, paths))));

    let link = dataplane.pin_link(pins.dir())?;
    info!(
        interface,
        ifindex,
        %mode,
        active = dp.active,
        election = config.vrrp.is_some(),
        services = config.services.len(),
        remote_backends = remote.len(),
        unresolved_backends = unresolved.len(),
        snat_ports = %dp.snat_ports,
        link = %link.display(),
        "data plane ready"
    );

    let election = match ElectionSetup::from_config(config, ifindex) {
        Some(setup) => Some(Election::start(setup, services.clone(), has_ready_backend_rx).await?),
        None => None,
    };

    let admin = admin.serve(AgentStatus {
        facts: AgentFacts {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            started_at,
            node: NodeInfo {
                name: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "unknown".to_string()),
                address: config.node.address,
                interface: interface.to_string(),
                ifindex,
                xdp_mode: mode.to_string(),
            },
        },
        election: match (&election, &config.vrrp) {
            (Some(election), Some(vrrp)) => Some(ElectionHandles {
                vrid: vrrp.vrid,
                version: vrrp.version.number(),
                configured_priority: vrrp.priority,
                no_ready_backend_weight: vrrp.no_ready_backend_weight,
                status: election.status(),
                counters: election.counters(),
            }),
            _ => None,
        },
        health: health_report_rx,
        drains,
        conntrack_entries: conntrack_entries_rx,
        snat: crate::admin::status::SnatInputs {
            port_min: dp.snat_ports.min,
            port_max: dp.snat_ports.max,
            addresses: 1 + dp.snat_addresses.len() as u32,
            remote_backends: remote.clone(),
            in_use: Default::default(),
        },
        snat_in_use: snat_in_use_rx,
        paths: paths_rx,
        maps,
        netlink: netlink.clone(),
        ifindex,
        vips: config.vips(),
    });

    let summary = format!(
        "serving {} service(s) on {interface} ({mode} XDP), {}",
        config.services.len(),
        match (&config.vrrp, dp.active) {
            (Some(vrrp), _) => format!("VRRP vrid {}", vrrp.vrid),
            (None, true) => "static VIP holder".to_string(),
            (None, false) => "static, not holding the VIPs".to_string(),
        }
    );
    Ok(Running {
        summary,
        election,
        _admin: admin,
        _tasks: tasks,
        services,
        _dataplane: dataplane,
        _pins: pins,
        _vips: vips,
        _sysctls: sysctls,
    })
}

/// Hands the XDP program's aya-log records to the `log` facade (which
/// tracing-subscriber forwards) whenever the ring buffer has data.
async fn forward_logs(logger: EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's map fd: it stays open, and
    // `as_raw_fd` returns that same fd, for as long as the AsyncFd owns it.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(error) => {
            debug!(%error, "cannot poll the XDP log buffer");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                warn!(%error, "stopped reading the XDP log buffer");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snat_address_missing_from_the_interface_is_named() {
        let a = |d| Ipv4Addr::new(198, 18, 0, d);
        assert_eq!(
            missing_snat_address(&[a(11), a(12)], &[a(1), a(11), a(12)]),
            None
        );
        assert_eq!(
            missing_snat_address(&[a(11), a(12)], &[a(1), a(11)]),
            Some((1, a(12)))
        );
        let e = AgentError::SnatAddress {
            index: 1,
            addr: a(12),
            interface: "eth0".into(),
        };
        assert_eq!(
            e.to_string(),
            "dataplane.snat_addresses[1]: 198.18.0.12 is not configured on eth0: add it \
             (ip address add 198.18.0.12/32 dev eth0) or remove it from the list"
        );
    }
}
