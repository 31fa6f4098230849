//! `balancer run`: brings the data plane up in a fixed order, keeps it
//! running until SIGTERM or SIGINT, and takes it down again.
//!
//! Every change to the node is held by a guard ([`PinDir`], [`SysctlGuard`],
//! [`VipGuard`], [`DataPlane`]), so a failure half-way through startup, a
//! signal during startup, or a normal stop all undo exactly what was done,
//! in reverse order. The XDP link is pinned last: its pin
//! (`<pin_dir>/v<LAYOUT_VERSION>/xdp_link`) is the "data plane ready"
//! signal.

use std::{collections::HashSet, net::Ipv4Addr};

use aya_log::EbpfLogger;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, Signal, SignalKind},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    config::Config,
    conntrack::{self, FlowTimeouts},
    dataplane::{
        remote_backends, service_entry, settings_value, DataPlane, DataPlaneError, ServiceTable,
    },
    error_chain, neighbour,
    netlink::{self, Netlink, NetlinkError, VipGuard},
    pins::{self, PinDir, PinDirError},
    sysctl::{SysctlError, SysctlGuard},
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
}

/// SIGTERM and SIGINT.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals, AgentError> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).map_err(AgentError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(AgentError::Signals)?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
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

/// The running data plane. Fields drop in declaration order: tasks stop,
/// the program is detached and unpinned, the pin directory goes, VIPs are
/// removed, sysctls restored.
struct Running {
    _tasks: Vec<Task>,
    services: ServiceTable,
    _dataplane: DataPlane,
    _pins: PinDir,
    _vips: Option<VipGuard>,
    _sysctls: SysctlGuard,
}

impl Running {
    fn stop(mut self) {
        // Tell the data plane first that this node no longer holds the VIPs,
        // so nothing is half-handled while the rest comes down.
        if let Err(error) = self.services.set_active(false) {
            warn!(error = %error_chain(&error), "could not clear the active flags");
        }
        drop(self);
    }
}

/// Runs the agent with a validated `config` until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AgentError> {
    let mut signals = StopSignals::new()?;
    let running = tokio::select! {
        running = start(&config) => running?,
        signal = signals.recv() => {
            info!(signal, "stopping before the data plane was ready");
            return Ok(());
        }
    };
    let signal = signals.recv().await;
    info!(signal, "stopping");
    running.stop();
    info!("stopped");
    Ok(())
}

async fn start(config: &Config) -> Result<Running, AgentError> {
    let dp = &config.dataplane;
    let interface = config.node.interface.as_str();
    let ifindex = netlink::interface_index(interface)?;
    let netlink = Netlink::connect()?;

    pins::ensure_bpffs(&dp.pin_dir)?;
    let pins = PinDir::create(&dp.pin_dir)?;

    let mut dataplane = DataPlane::load(dp.conntrack_flows)?;
    let logger = dataplane.take_logger();
    dataplane.write_settings(&settings_value(config.node.address, dp))?;

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
    let entries = config
        .services
        .iter()
        .enumerate()
        .map(|(id, service)| service_entry(id as u32, service, dp.active, is_local))
        .collect();

    let sysctls = SysctlGuard::apply(dp.snat_ports, interface)?;

    let vips = if dp.active {
        let vips: Vec<Ipv4Addr> = config.services.iter().map(|s| s.vip).collect();
        Some(VipGuard::add(&netlink, ifindex, interface, &vips).await?)
    } else {
        None
    };

    let remote = remote_backends(&config.services, is_local);
    let unresolved = neighbour::wait_resolved(&netlink, &remote, neighbour::STARTUP_WAIT).await;
    let mut tasks = vec![Task(tokio::spawn(neighbour::keep_resolved(
        remote.clone(),
        unresolved.clone(),
    )))];

    let mode = dataplane.attach(ifindex, dp.xdp_mode)?;
    dataplane.pin_maps(pins.dir())?;

    let services = dataplane.take_service_table(entries)?;
    let table = dataplane.take_conntrack()?;
    let timeouts = FlowTimeouts::new(dp.idle_timeout, dp.closing_timeout);
    let max_entries = balancer_common::conntrack_entries(dp.conntrack_flows) as usize;
    tasks.push(Task(tokio::spawn(conntrack::run_sweeper(
        table,
        timeouts,
        max_entries,
    ))));
    if let Some(logger) = logger {
        tasks.push(Task(tokio::spawn(forward_logs(logger))));
    }

    let link = dataplane.pin_link(pins.dir())?;
    info!(
        interface,
        ifindex,
        %mode,
        active = dp.active,
        services = config.services.len(),
        remote_backends = remote.len(),
        unresolved_backends = unresolved.len(),
        snat_ports = %dp.snat_ports,
        link = %link.display(),
        "data plane ready"
    );

    Ok(Running {
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
