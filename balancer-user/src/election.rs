//! The VIP election at run time: drives one [`Instance`] (the pure VRRP
//! state machine) with real adverts, timers, interface events and the
//! node's health, and carries out what it decides.
//!
//! [`Election::start`] opens everything (VRRP socket, gratuitous-ARP
//! socket, netlink) and runs the loop on a thread of its own with its own
//! single-threaded tokio runtime, so neither a busy agent runtime nor a
//! saturated CPU delays adverts or the Master_Down timer:
//!
//! - Own thread and runtime: health checks, conntrack sweeps and log
//!   forwarding on the agent's runtime can never hold up an election task.
//! - `SCHED_FIFO` priority [`ELECTION_RT_PRIORITY`] (the lowest real-time
//!   one) for that thread, so under full CPU load (the issue's 60 s of
//!   redis-benchmark on both cores) it runs as soon as its timer or socket
//!   is ready instead of waiting for a CFS time slice. The loop only wakes
//!   for events and does little work per wake, so it cannot starve the
//!   machine (and the kernel's RT throttling caps it anyway).
//!   `SCHED_RESET_ON_FORK` keeps children (none are forked from it: notify
//!   commands run on the agent's runtime) from inheriting it. Without
//!   `CAP_SYS_NICE` the call fails; the election then runs at normal
//!   priority and says so in the log.
//!
//! What each [`Action`] does, the one place where the election changes the
//! node (holo-vrrp's `change_state` pattern):
//!
//! - Becoming master: add every VIP as a /32 to the interface, send the
//!   advert, send the first round of gratuitous ARPs, *then* set the
//!   data-plane active flag; the rest of the burst follows a few
//!   milliseconds apart on a task of its own.
//! - Leaving master (backup, fault, stopped): clear the active flag, *then*
//!   remove the VIPs (every configured VIP found on the interface: they are
//!   ours by config, also ones a crashed earlier run left behind).
//! - While master, a VIP that disappears from the interface (netlink
//!   notification, or the one-second check) is re-added with a warning.
//! - Every state change is queued to the notify command ([`crate::notify`]).
//!
//! Adverts that fail a receive check are counted by reason
//! ([`AdvertCounters`]) and logged at debug, with at most one warning per
//! reason per minute.

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    sync::{atomic::Ordering, mpsc as std_mpsc, Arc, Mutex},
    thread,
    time::{Duration, SystemTime},
};

use tokio::{
    runtime::Handle,
    sync::{oneshot, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, Vrrp},
    dataplane::{DataPlaneError, ServiceTable},
    error_chain,
    garp::GarpSocket,
    netlink::{InterfaceEvent, InterfaceEvents, Netlink, NetlinkError},
    notify::Notifier,
    vrrp::{
        effective_priority, packet, Action, Advert, Format, GarpBurst, Input, Instance,
        InstanceConfig, ReceiveRules, State, Time, Version,
    },
    vrrp_socket::{parse_ipv4, AdvertCounters, VrrpSocket, VrrpSocketError, MALFORMED_IP_REASON},
};

/// Real-time priority of the election thread (`SCHED_FIFO`, 1 = lowest).
pub const ELECTION_RT_PRIORITY: i32 = 1;
/// Time between two gratuitous ARP rounds of one burst.
pub const GARP_SPACING: Duration = Duration::from_millis(5);
/// How often the link state and, while master, the VIPs are checked, in
/// case a netlink notification was missed.
pub const INTERFACE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A VIP is added valid for this long and renewed at every interface
/// check while master: if the agent dies without removing it (SIGKILL, a
/// crash), the kernel removes it by itself, so the dead node stops
/// answering ARP for the VIP that the peer took over. It bounds the time
/// both nodes hold the VIP after a crash (keepalived's VIPs stay until
/// someone deletes them). Three renewals fit in it, so a starved agent
/// keeps its VIP through two missed checks.
pub const VIP_LIFETIME_SECS: u32 = 3;
/// The same warning about dropped adverts at most this often.
pub const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// [`Election::shutdown`] waits this long for the thread (priority-0 advert,
/// releasing the VIPs, the last notify command).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many packets are read from the VRRP socket per
/// [`RECEIVE_WINDOW`] (20 000/s; a LAN's VRRP traffic is tens per second):
/// a flood must not keep a real-time thread busy.
pub const RECEIVE_BUDGET: u32 = 200;
/// See [`RECEIVE_BUDGET`].
pub const RECEIVE_WINDOW: Duration = Duration::from_millis(10);
/// Queued notify commands get this long to finish when the election stops.
const NOTIFY_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("invalid VRRP instance")]
    Instance(#[from] crate::vrrp::ConfigError),
    #[error(transparent)]
    Socket(#[from] VrrpSocketError),
    #[error("cannot open a packet socket for gratuitous ARP")]
    GarpSocket(#[source] io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot start the election thread")]
    Thread(#[source] io::Error),
    #[error("cannot start the election runtime")]
    Runtime(#[source] io::Error),
    #[error("the election thread ended during startup")]
    Died,
}

/// The data-plane switch the election flips: [`ServiceTable::set_active`]
/// in the agent, a recorder in tests.
pub trait ActiveFlag: Send + 'static {
    fn set_active(&mut self, active: bool) -> Result<(), DataPlaneError>;
}

impl ActiveFlag for ServiceTable {
    fn set_active(&mut self, active: bool) -> Result<(), DataPlaneError> {
        ServiceTable::set_active(self, active)
    }
}

/// Everything the election needs to know, from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionSetup {
    /// `[vrrp]`.
    pub vrrp: Vrrp,
    /// The VRRP interface (`node.interface`).
    pub interface: String,
    pub ifindex: u32,
    /// Primary address: advert source and tie-break (`node.address`).
    pub node_address: Ipv4Addr,
    /// The virtual addresses: every service's VIP.
    pub vips: Vec<Ipv4Addr>,
}

impl ElectionSetup {
    /// The setup for `config`, or `None` without `[vrrp]`.
    pub fn from_config(config: &Config, ifindex: u32) -> Option<ElectionSetup> {
        Some(ElectionSetup {
            vrrp: config.vrrp.clone()?,
            interface: config.node.interface.clone(),
            ifindex,
            node_address: config.node.address,
            vips: config.vips(),
        })
    }

    /// The state machine's configuration.
    pub fn instance_config(&self) -> InstanceConfig {
        InstanceConfig {
            vrid: self.vrrp.vrid,
            version: self.vrrp.version,
            priority: self.vrrp.priority,
            advert_interval_cs: self.vrrp.advert_interval_cs,
            preempt: self.vrrp.preempt,
            preempt_delay: self.vrrp.preempt_delay,
            primary_address: self.node_address,
            garp_repeat_delay: self.vrrp.garp_repeat_delay,
        }
    }

    /// What received adverts are checked against. The address list is not
    /// a drop reason (a peer listing other VIPs still takes part in the
    /// election, as RFC 5798 section 7.1 only asks to log it); a mismatch
    /// is warned about instead.
    pub fn receive_rules(&self) -> ReceiveRules {
        ReceiveRules {
            version: self.vrrp.version,
            vrid: self.vrrp.vrid,
            auth: self.vrrp.auth.clone(),
            v3_checksum: self.vrrp.v3_checksum,
            accept_other_v3_checksum: true,
            adver_int_cs: self.vrrp.advert_interval_cs,
            addresses: self.vips.clone(),
            check_addresses: false,
            allowed_sources: if self.vrrp.unicast_peers.is_empty() {
                None
            } else {
                Some(self.vrrp.unicast_peers.clone())
            },
            local_is_owner: self.vrrp.priority == 255,
        }
    }

    /// The advert we send with `priority`.
    pub fn advert(&self, priority: u8) -> Advert {
        let format = match self.vrrp.version {
            Version::V2 => Format::V2 {
                adver_int_s: u8::try_from(self.vrrp.advert_interval_cs / 100).unwrap_or(u8::MAX),
                auth: self.vrrp.auth.clone(),
            },
            Version::V3 => Format::V3 {
                max_adver_int_cs: self.vrrp.advert_interval_cs,
            },
        };
        Advert {
            vrid: self.vrrp.vrid,
            priority,
            format,
            addresses: self.vips.clone(),
        }
    }
}

/// What the election is doing, for the admin interface: updated on every
/// state change and every change of the priority the instance runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionStatus {
    pub state: State,
    /// When `state` was entered (wall clock).
    pub since: SystemTime,
    /// The priority the instance runs with: the configured one, lowered by
    /// `no_ready_backend_weight` while the node has no READY backend.
    pub priority: u8,
}

/// The running election. Stop it with [`Election::shutdown`]; dropping it
/// also stops it (blocking the dropping thread for up to
/// [`SHUTDOWN_TIMEOUT`]).
#[derive(Debug)]
pub struct Election {
    stop: Option<oneshot::Sender<()>>,
    done: Option<std_mpsc::Receiver<()>>,
    thread: Option<thread::JoinHandle<()>>,
    state: watch::Receiver<State>,
    status: watch::Receiver<ElectionStatus>,
    counters: Arc<AdvertCounters>,
}

impl Election {
    /// Opens the sockets and starts the election thread; returns once the
    /// instance runs (in Backup, or Fault if the link is down). `flag` is
    /// set only while master. `has_ready_backend` lowers the priority by
    /// `no_ready_backend_weight` while false. Notify commands run on the
    /// calling runtime. The thread inherits the caller's network namespace.
    pub async fn start<F: ActiveFlag>(
        setup: ElectionSetup,
        flag: Arc<Mutex<F>>,
        has_ready_backend: watch::Receiver<bool>,
    ) -> Result<Election, ElectionError> {
        // Fail early, before anything starts, on a bad instance config.
        Instance::new(setup.instance_config(), Time::ZERO)?;
        let counters = Arc::new(AdvertCounters::default());
        let (state_tx, state) = watch::channel(State::Initialize);
        let (status_tx, status) = watch::channel(ElectionStatus {
            state: State::Initialize,
            since: SystemTime::now(),
            priority: setup.vrrp.priority,
        });
        let (stop, stop_rx) = oneshot::channel();
        let (started_tx, started_rx) = oneshot::channel();
        let (done_tx, done) = std_mpsc::channel();
        let notifier = setup
            .vrrp
            .notify
            .clone()
            .map(|command| Notifier::spawn(&Handle::current(), command, setup.vrrp.vrid));
        let thread_counters = counters.clone();
        let thread = thread::Builder::new()
            .name(format!("vrrp-{}", setup.vrrp.vrid))
            .spawn(move || {
                election_thread(ElectionThread {
                    setup,
                    flag,
                    has_ready_backend,
                    stop: stop_rx,
                    started: started_tx,
                    state: state_tx,
                    status: status_tx,
                    counters: thread_counters,
                    notifier,
                });
                let _ = done_tx.send(());
            })
            .map_err(ElectionError::Thread)?;
        let mut election = Election {
            stop: Some(stop),
            done: Some(done),
            thread: Some(thread),
            state,
            status,
            counters,
        };
        match started_rx.await {
            Ok(Ok(())) => Ok(election),
            Ok(Err(error)) => {
                election.join_blocking();
                Err(error)
            }
            Err(_) => {
                election.join_blocking();
                Err(ElectionError::Died)
            }
        }
    }

    /// The current state, updated on every change.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// State, since when, and the priority in effect, updated on every
    /// change.
    pub fn status(&self) -> watch::Receiver<ElectionStatus> {
        self.status.clone()
    }

    /// Advert counters (sent, received, dropped by reason).
    pub fn counters(&self) -> Arc<AdvertCounters> {
        self.counters.clone()
    }

    /// Graceful stop: a master sends a priority-0 advert (the backup takes
    /// over after Skew_Time), clears the active flag and removes the VIPs.
    /// Waits for all of it, at most [`SHUTDOWN_TIMEOUT`].
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (Some(done), Some(thread)) = (self.done.take(), self.thread.take()) else {
            return;
        };
        let finished = tokio::task::spawn_blocking(move || wait_for_thread(&done, thread))
            .await
            .unwrap_or(false);
        if !finished {
            warn!(timeout = ?SHUTDOWN_TIMEOUT, "the election did not stop in time");
        }
    }

    /// Resolves if the election thread ends without being asked to (a
    /// bug): the node no longer takes part in the election, and the agent
    /// should stop rather than serve on without it.
    pub async fn ended(&self) {
        let mut state = self.state.clone();
        while state.changed().await.is_ok() {}
    }

    fn join_blocking(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(done), Some(thread)) = (self.done.take(), self.thread.take()) {
            if !wait_for_thread(&done, thread) {
                warn!(timeout = ?SHUTDOWN_TIMEOUT, "the election did not stop in time");
            }
        }
    }
}

/// Waits up to [`SHUTDOWN_TIMEOUT`] for the election thread to end and
/// joins it; false if it is still running.
fn wait_for_thread(done: &std_mpsc::Receiver<()>, thread: thread::JoinHandle<()>) -> bool {
    match done.recv_timeout(SHUTDOWN_TIMEOUT) {
        // Disconnected: the thread ended without reporting (a panic).
        Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
            if thread.join().is_err() {
                warn!("the election thread panicked");
            }
            true
        }
        Err(std_mpsc::RecvTimeoutError::Timeout) => false,
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.join_blocking();
    }
}

struct ElectionThread<F: ActiveFlag> {
    setup: ElectionSetup,
    flag: Arc<Mutex<F>>,
    has_ready_backend: watch::Receiver<bool>,
    stop: oneshot::Receiver<()>,
    started: oneshot::Sender<Result<(), ElectionError>>,
    state: watch::Sender<State>,
    status: watch::Sender<ElectionStatus>,
    counters: Arc<AdvertCounters>,
    notifier: Option<Notifier>,
}

fn election_thread<F: ActiveFlag>(args: ElectionThread<F>) {
    let vrid = args.setup.vrrp.vrid;
    match raise_priority() {
        Ok(()) => debug!(
            vrid,
            priority = ELECTION_RT_PRIORITY,
            "election thread runs SCHED_FIFO"
        ),
        Err(error) => info!(
            vrid,
            %error,
            "cannot give the election thread real-time priority; running at normal priority"
        ),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = args.started.send(Err(ElectionError::Runtime(error)));
            return;
        }
    };
    runtime.block_on(async move {
        let ElectionThread {
            setup,
            flag,
            has_ready_backend,
            stop,
            started,
            state,
            status,
            counters,
            notifier,
        } = args;
        let runner = match Runner::open(
            setup,
            flag,
            has_ready_backend,
            state,
            status,
            counters,
            notifier,
        )
        .await
        {
            Ok(runner) => runner,
            Err(error) => {
                let _ = started.send(Err(error));
                return;
            }
        };
        runner.run(stop, started).await;
    });
}

/// `SCHED_FIFO` at [`ELECTION_RT_PRIORITY`] for the calling thread, reset
/// to normal in any child it forks.
fn raise_priority() -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: ELECTION_RT_PRIORITY,
    };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// At most one warning per key per [`DROP_WARNING_INTERVAL`].
#[derive(Default)]
struct WarnLimiter {
    last: HashMap<&'static str, Instant>,
}

impl WarnLimiter {
    fn allow(&mut self, key: &'static str) -> bool {
        let now = Instant::now();
        match self.last.get(key) {
            Some(at) if now.duration_since(*at) < DROP_WARNING_INTERVAL => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// Packets read in the current [`RECEIVE_WINDOW`].
struct ReceiveBudget {
    window_start: Instant,
    spent: u32,
}

impl ReceiveBudget {
    fn new() -> ReceiveBudget {
        ReceiveBudget {
            window_start: Instant::now(),
            spent: 0,
        }
    }

    /// Counts one packet; true when this one used up the budget.
    fn spend(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= RECEIVE_WINDOW {
            self.window_start = now;
            self.spent = 0;
        }
        self.spent += 1;
        self.spent == RECEIVE_BUDGET
    }

    /// When reading may go on, while the budget is used up.
    fn throttled_until(&self) -> Option<Instant> {
        (self.spent >= RECEIVE_BUDGET).then(|| self.window_start + RECEIVE_WINDOW)
    }

    fn reset(&mut self) {
        self.window_start = Instant::now();
        self.spent = 0;
    }
}

/// The election loop's state, on the election thread.
struct Runner<F: ActiveFlag> {
    setup: ElectionSetup,
    rules: ReceiveRules,
    instance: Instance,
    epoch: Instant,
    socket: VrrpSocket,
    garp: Arc<GarpSocket>,
    garp_task: Option<JoinHandle<()>>,
    netlink: Netlink,
    events: Option<InterfaceEvents>,
    flag: Arc<Mutex<F>>,
    has_ready_backend: Option<watch::Receiver<bool>>,
    state: watch::Sender<State>,
    status: watch::Sender<ElectionStatus>,
    counters: Arc<AdvertCounters>,
    notifier: Option<Notifier>,
    link_up: bool,
    /// What the active flag was last set to.
    active: Option<bool>,
    /// Between BecomeMaster and the first gratuitous ARP round: the active
    /// flag is still to be set.
    activate_pending: bool,
    warnings: WarnLimiter,
    receive_budget: ReceiveBudget,
    buf: Vec<u8>,
}

impl<F: ActiveFlag> Runner<F> {
    async fn open(
        setup: ElectionSetup,
        flag: Arc<Mutex<F>>,
        has_ready_backend: watch::Receiver<bool>,
        state: watch::Sender<State>,
        status: watch::Sender<ElectionStatus>,
        counters: Arc<AdvertCounters>,
        notifier: Option<Notifier>,
    ) -> Result<Runner<F>, ElectionError> {
        let epoch = Instant::now();
        let instance = Instance::new(setup.instance_config(), Time::ZERO)?;
        let socket = VrrpSocket::open(
            &setup.interface,
            setup.ifindex,
            setup.node_address,
            &setup.vrrp.unicast_peers,
        )?;
        let garp = Arc::new(GarpSocket::open(setup.ifindex).map_err(ElectionError::GarpSocket)?);
        let netlink = Netlink::connect()?;
        let events = match InterfaceEvents::subscribe() {
            Ok(events) => Some(events),
            Err(error) => {
                warn!(
                    error = %error_chain(&error),
                    "no interface notifications; checking the link every second instead"
                );
                None
            }
        };
        let link_up = netlink.link_up(setup.ifindex).await?;
        Ok(Runner {
            rules: setup.receive_rules(),
            setup,
            instance,
            epoch,
            socket,
            garp,
            garp_task: None,
            netlink,
            events,
            flag,
            has_ready_backend: Some(has_ready_backend),
            state,
            status,
            counters,
            notifier,
            link_up,
            // The agent starts every service inactive in election mode.
            active: Some(false),
            activate_pending: false,
            warnings: WarnLimiter::default(),
            receive_budget: ReceiveBudget::new(),
            buf: vec![0; VrrpSocket::BUFFER_LEN],
        })
    }

    fn now(&self) -> Time {
        Time::from_epoch(self.epoch.elapsed())
    }

    fn vrid(&self) -> u8 {
        self.setup.vrrp.vrid
    }

    fn effective_priority(&self, has_ready_backend: bool) -> u8 {
        effective_priority(
            self.setup.vrrp.priority,
            self.setup.vrrp.no_ready_backend_weight,
            has_ready_backend,
        )
    }

    /// Runs the instance with `priority` from now on.
    async fn set_priority(&mut self, priority: u8) {
        self.status.send_if_modified(|s| {
            let changed = s.priority != priority;
            s.priority = priority;
            changed
        });
        self.input(Input::PriorityChanged(priority)).await;
    }

    async fn run(
        mut self,
        mut stop: oneshot::Receiver<()>,
        started: oneshot::Sender<Result<(), ElectionError>>,
    ) {
        let ready = self
            .has_ready_backend
            .as_mut()
            .is_none_or(|rx| *rx.borrow_and_update());
        let priority = self.effective_priority(ready);
        info!(
            vrid = self.vrid(),
            interface = %self.setup.interface,
            version = %self.setup.vrrp.version,
            priority,
            configured_priority = self.setup.vrrp.priority,
            advert_interval_ms = u64::from(self.setup.vrrp.advert_interval_cs) * 10,
            destinations = ?self.socket.destinations(),
            vips = ?self.setup.vips,
            link_up = self.link_up,
            "starting the VRRP election"
        );
        self.set_priority(priority).await;
        if !self.link_up {
            self.input(Input::InterfaceDown).await;
        }
        self.input(Input::Startup).await;
        let _ = started.send(Ok(()));

        let mut interface_check = tokio::time::interval(INTERFACE_CHECK_INTERVAL);
        interface_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interface_check.reset();
        loop {
            let deadline = self
                .instance
                .poll_timeout()
                .map(|at| self.epoch + at.since_epoch());
            let throttled_until = self.receive_budget.throttled_until();
            // Everything else before packets, so a flood of them delays
            // nothing; the receive budget bounds the time spent on them.
            let event = tokio::select! {
                biased;
                _ = &mut stop => break,
                () = sleep_until(deadline), if deadline.is_some() => Event::Timer,
                changed = changed(&mut self.has_ready_backend), if self.has_ready_backend.is_some() => {
                    Event::Health(changed)
                }
                event = next_event(&mut self.events), if self.events.is_some() => {
                    Event::Interface(event)
                }
                _ = interface_check.tick() => Event::CheckInterface,
                () = sleep_until(throttled_until), if throttled_until.is_some() => Event::Unthrottle,
                received = self.socket.recv(&mut self.buf), if throttled_until.is_none() => {
                    Event::Packet(received)
                }
            };
            match event {
                Event::Timer => self.input(Input::Timer).await,
                Event::Unthrottle => self.receive_budget.reset(),
                Event::Packet(Ok(len)) => {
                    if self.receive_budget.spend() && self.warnings.allow("flood") {
                        warn!(
                            vrid = self.vrid(),
                            budget = RECEIVE_BUDGET,
                            window = ?RECEIVE_WINDOW,
                            "VRRP packet flood: reading at most the budget per window, the kernel drops the rest"
                        );
                    }
                    self.on_packet(len).await;
                }
                Event::Packet(Err(error)) => {
                    self.counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                    if self.warnings.allow("receive") {
                        warn!(vrid = self.vrid(), %error, "cannot read the VRRP socket");
                    }
                    // Do not spin on a persistent error.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Event::Health(Some(ready)) => {
                    let priority = self.effective_priority(ready);
                    self.set_priority(priority).await;
                }
                Event::Health(None) => {
                    debug!(
                        vrid = self.vrid(),
                        "health publisher gone; priority stays as is"
                    );
                    self.has_ready_backend = None;
                }
                Event::Interface(Some(event)) => self.on_interface_event(event).await,
                Event::Interface(None) => {
                    warn!(
                        vrid = self.vrid(),
                        "interface notifications ended; checking the link every second instead"
                    );
                    self.events = None;
                }
                Event::CheckInterface => self.check_interface().await,
            }
        }
        info!(vrid = self.vrid(), state = %self.instance.state(), "stopping the VRRP election");
        self.input(Input::Shutdown).await;
        if let Some(task) = self.garp_task.take() {
            task.abort();
        }
        if let Some(notifier) = self.notifier.take() {
            notifier.close(NOTIFY_DRAIN).await;
        }
    }

    async fn input(&mut self, input: Input) {
        let now = self.now();
        for action in self.instance.handle(now, input) {
            self.perform(action).await;
        }
    }

    async fn perform(&mut self, action: Action) {
        match action {
            Action::StateChanged { old, new } => {
                // The instance logs the change itself (vrid, old, new).
                // The status first: whoever sees the new state sees it too.
                let since = SystemTime::now();
                self.status.send_modify(|s| {
                    s.state = new;
                    s.since = since;
                });
                self.state.send_replace(new);
                if let Some(notifier) = &self.notifier {
                    notifier.notify(new);
                }
                debug!(vrid = self.vrid(), %old, %new, "carrying out the state change");
            }
            Action::BecomeMaster => {
                self.stop_garp();
                self.add_vips().await;
                self.activate_pending = true;
            }
            Action::SendAdvert { priority } => self.send_advert(priority).await,
            Action::SendGratuitousArp { burst } => self.gratuitous_arp(burst).await,
            Action::BecomeBackup | Action::EnterFault | Action::Stopped => {
                self.stop_garp();
                self.activate_pending = false;
                self.set_active(false);
                self.remove_vips().await;
            }
        }
    }

    /// Writes the flag every time (cheap, and it repairs a map someone else
    /// changed); logs at info only when it changes.
    fn set_active(&mut self, active: bool) {
        let mut flag = self.flag.lock().unwrap_or_else(|e| e.into_inner());
        match flag.set_active(active) {
            Ok(()) if self.active != Some(active) => {
                self.active = Some(active);
                info!(
                    vrid = self.setup.vrrp.vrid,
                    active,
                    "data plane {}",
                    if active {
                        "serves the VIPs"
                    } else {
                        "no longer serves the VIPs"
                    }
                );
            }
            Ok(()) => {}
            Err(error) => warn!(
                vrid = self.vrid(),
                active,
                error = %error_chain(&error),
                "cannot set the data-plane active flag"
            ),
        }
    }

    async fn add_vips(&mut self) {
        for &vip in &self.setup.vips {
            match self
                .netlink
                .add_vip(self.setup.ifindex, vip, Some(VIP_LIFETIME_SECS))
                .await
            {
                Ok(true) => {
                    info!(vrid = self.vrid(), %vip, interface = %self.setup.interface, "added VIP")
                }
                Ok(false) => debug!(vrid = self.vrid(), %vip, "VIP already on the interface"),
                Err(error) => {
                    warn!(vrid = self.vrid(), %vip, error = %error_chain(&error), "cannot add VIP")
                }
            }
        }
    }

    async fn remove_vips(&mut self) {
        for &vip in &self.setup.vips {
            match self.netlink.remove_vip(self.setup.ifindex, vip).await {
                Ok(true) => {
                    info!(vrid = self.vrid(), %vip, interface = %self.setup.interface, "removed VIP")
                }
                Ok(false) => {}
                Err(error) => {
                    warn!(vrid = self.vrid(), %vip, error = %error_chain(&error), "cannot remove VIP")
                }
            }
        }
    }

    async fn send_advert(&mut self, priority: u8) {
        let advert = self.setup.advert(priority);
        if let Err(error) = self
            .socket
            .send(&advert, self.setup.vrrp.v3_checksum, &self.counters)
            .await
        {
            if self.warnings.allow("send") {
                warn!(vrid = self.vrid(), error = %error_chain(&error), "cannot send a VRRP advert");
            } else {
                debug!(vrid = self.vrid(), error = %error_chain(&error), "cannot send a VRRP advert");
            }
        }
    }

    fn stop_garp(&mut self) {
        if let Some(task) = self.garp_task.take() {
            task.abort();
        }
    }

    /// One burst: `garp_count` rounds of one announcement per VIP,
    /// [`GARP_SPACING`] apart. The first round goes out here; then, on
    /// becoming master, the active flag is set; the other rounds follow on
    /// a task (aborted when leaving master).
    async fn gratuitous_arp(&mut self, burst: GarpBurst) {
        self.stop_garp();
        let count = self.setup.vrrp.garp_count;
        let mac = if count == 0 {
            None
        } else {
            match self.netlink.hardware_address(self.setup.ifindex).await {
                Ok(mac) => Some(mac),
                Err(error) => {
                    warn!(vrid = self.vrid(), error = %error_chain(&error), "no gratuitous ARP");
                    None
                }
            }
        };
        if let Some(mac) = mac {
            announce_round(&self.garp, mac, &self.setup.vips, self.vrid());
        }
        if self.activate_pending {
            self.activate_pending = false;
            self.set_active(true);
        }
        let Some(mac) = mac else { return };
        debug!(vrid = self.vrid(), ?burst, count, "gratuitous ARP burst");
        if count > 1 {
            let garp = self.garp.clone();
            let vips = self.setup.vips.clone();
            let vrid = self.vrid();
            self.garp_task = Some(tokio::spawn(async move {
                for _ in 1..count {
                    tokio::time::sleep(GARP_SPACING).await;
                    announce_round(&garp, mac, &vips, vrid);
                }
            }));
        }
    }

    async fn on_packet(&mut self, len: usize) {
        let Some(packet) = self.buf.get(..len) else {
            return;
        };
        let (ip, payload) = match parse_ipv4(packet) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.counters.count_dropped(MALFORMED_IP_REASON);
                debug!(vrid = self.setup.vrrp.vrid, %error, "dropped a VRRP packet");
                return;
            }
        };
        if ip.src == self.setup.node_address {
            self.counters.own.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let decoded = match packet::receive(&ip, payload, &self.rules) {
            Ok(decoded) => decoded,
            Err(error) => {
                let reason = error.reason();
                self.counters.count_dropped(reason);
                // Other virtual routers on the LAN are normal; anything else
                // points at a misconfigured or broken peer.
                if reason != "vrid" && self.warnings.allow(reason) {
                    warn!(
                        vrid = self.setup.vrrp.vrid,
                        src = %ip.src,
                        reason,
                        %error,
                        "dropped a VRRP advert (further ones for this reason are logged at debug for a minute)"
                    );
                } else {
                    debug!(vrid = self.setup.vrrp.vrid, src = %ip.src, reason, %error, "dropped a VRRP advert");
                }
                return;
            }
        };
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let advert = decoded.advert;
        if !same_addresses(&advert.addresses, &self.setup.vips)
            && self.warnings.allow("address_list")
        {
            warn!(
                vrid = self.vrid(),
                src = %ip.src,
                theirs = ?advert.addresses,
                ours = ?self.setup.vips,
                "a VRRP peer advertises other virtual addresses"
            );
        }
        let interval = advert.interval_cs();
        self.counters.saw_peer(ip.src, advert.priority, interval);
        self.input(Input::AdvertReceived {
            src: ip.src,
            priority: advert.priority,
            max_adver_int_cs: interval,
        })
        .await;
    }

    async fn on_interface_event(&mut self, event: InterfaceEvent) {
        let ours = self.setup.ifindex;
        match event {
            InterfaceEvent::Link { ifindex, up } if ifindex == ours => self.link_changed(up).await,
            InterfaceEvent::LinkRemoved { ifindex } if ifindex == ours => {
                self.link_changed(false).await
            }
            InterfaceEvent::AddressRemoved { ifindex, addr }
                if ifindex == ours
                    && self.instance.state() == State::Master
                    && self.setup.vips.contains(&addr) =>
            {
                self.restore_vip(addr).await
            }
            _ => {}
        }
    }

    async fn link_changed(&mut self, up: bool) {
        if up == self.link_up {
            return;
        }
        self.link_up = up;
        if up {
            info!(vrid = self.vrid(), interface = %self.setup.interface, "interface up");
            self.input(Input::InterfaceUp).await;
        } else {
            warn!(vrid = self.vrid(), interface = %self.setup.interface, "interface down");
            self.input(Input::InterfaceDown).await;
        }
    }

    async fn restore_vip(&mut self, vip: Ipv4Addr) {
        match self
            .netlink
            .add_vip(self.setup.ifindex, vip, Some(VIP_LIFETIME_SECS))
            .await
        {
            Ok(true) => warn!(
                vrid = self.vrid(),
                %vip,
                interface = %self.setup.interface,
                "VIP was removed from the interface behind our back; re-added it"
            ),
            Ok(false) => {}
            Err(error) => warn!(
                vrid = self.vrid(),
                %vip,
                error = %error_chain(&error),
                "VIP was removed from the interface and cannot be re-added"
            ),
        }
    }

    /// The safety net for missed notifications: link state always, the
    /// VIPs while master (and their lifetime renewed,
    /// [`VIP_LIFETIME_SECS`]).
    async fn check_interface(&mut self) {
        match self.netlink.link_up(self.setup.ifindex).await {
            Ok(up) => self.link_changed(up).await,
            Err(error) => {
                if self.warnings.allow("link") {
                    warn!(vrid = self.vrid(), error = %error_chain(&error), "cannot read the link state");
                }
                self.link_changed(false).await;
            }
        }
        if self.instance.state() != State::Master {
            return;
        }
        let present = match self.netlink.ipv4_addresses_on(self.setup.ifindex).await {
            Ok(present) => present,
            Err(error) => {
                debug!(vrid = self.vrid(), error = %error_chain(&error), "cannot list addresses");
                return;
            }
        };
        for vip in self.setup.vips.clone() {
            if !present.contains(&vip) {
                self.restore_vip(vip).await;
            } else if let Err(error) = self
                .netlink
                .renew_vip(self.setup.ifindex, vip, VIP_LIFETIME_SECS)
                .await
            {
                if self.warnings.allow("renew") {
                    warn!(vrid = self.vrid(), %vip, error = %error_chain(&error), "cannot renew the VIP's lifetime");
                }
            }
        }
    }
}

enum Event {
    Timer,
    Unthrottle,
    Packet(io::Result<usize>),
    Health(Option<bool>),
    Interface(Option<InterfaceEvent>),
    CheckInterface,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next value of the health watch; `None` once its sender is gone.
async fn changed(rx: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    let rx = rx.as_mut()?;
    rx.changed().await.ok()?;
    Some(*rx.borrow_and_update())
}

async fn next_event(events: &mut Option<InterfaceEvents>) -> Option<InterfaceEvent> {
    events.as_mut()?.next().await
}

fn announce_round(garp: &GarpSocket, mac: [u8; 6], vips: &[Ipv4Addr], vrid: u8) {
    for &vip in vips {
        if let Err(error) = garp.announce(mac, vip) {
            debug!(vrid, %vip, %error, "cannot send a gratuitous ARP");
        }
    }
}

fn same_addresses(a: &[Ipv4Addr], b: &[Ipv4Addr]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_unstable();
    a.dedup();
    b.sort_unstable();
    b.dedup();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, vrrp::Auth};

    fn setup(text: &str) -> ElectionSetup {
        let config = config::parse(text, "t.toml").unwrap();
        ElectionSetup::from_config(&config, 7).unwrap()
    }

    const BASE: &str = r#"
[node]
interface = "eth0"
address = "198.18.0.1"
[[service]]
vip = "198.18.0.100"
port = 6380
backends = ["198.18.0.1:6380"]
[[service]]
vip = "198.18.0.100"
port = 6381
backends = ["198.18.0.1:6381"]
[[service]]
vip = "198.18.0.101"
port = 6380
backends = ["198.18.0.1:6380"]
"#;

    #[test]
    fn no_election_without_vrrp() {
        let config = config::parse(BASE, "t.toml").unwrap();
        assert_eq!(ElectionSetup::from_config(&config, 7), None);
    }

    #[test]
    fn v3_setup_from_config() {
        let s = setup(&format!(
            "{BASE}[vrrp]\nvrid = 101\npriority = 150\nunicast_peers = [\"198.18.0.2\"]\n"
        ));
        assert_eq!(s.ifindex, 7);
        assert_eq!(s.interface, "eth0");
        assert_eq!(
            s.vips,
            vec![
                Ipv4Addr::new(198, 18, 0, 100),
                Ipv4Addr::new(198, 18, 0, 101)
            ]
        );
        let ic = s.instance_config();
        assert_eq!(ic.vrid, 101);
        assert_eq!(ic.priority, 150);
        assert_eq!(ic.version, Version::V3);
        assert_eq!(ic.advert_interval_cs, 10);
        assert_eq!(ic.primary_address, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(ic.garp_repeat_delay, Some(Duration::from_secs(5)));
        assert_eq!(ic.validate(), Ok(()));
        let rules = s.receive_rules();
        assert_eq!(
            rules.allowed_sources,
            Some(vec![Ipv4Addr::new(198, 18, 0, 2)])
        );
        assert!(rules.accept_other_v3_checksum);
        assert!(!rules.local_is_owner);
        let advert = s.advert(150);
        assert_eq!(
            advert.format,
            Format::V3 {
                max_adver_int_cs: 10
            }
        );
        assert_eq!(advert.addresses, s.vips);
        assert_eq!(advert.priority, 150);
    }

    #[test]
    fn v2_advert_carries_seconds_and_password_and_round_trips() {
        let s = setup(&format!(
            "{BASE}[vrrp]\nvrid = 101\npriority = 255\nversion = 2\nadvert_interval_ms = 1000\nauth_pass = \"1111\"\n"
        ));
        let advert = s.advert(0);
        assert_eq!(
            advert.format,
            Format::V2 {
                adver_int_s: 1,
                auth: Auth::pass("1111").unwrap()
            }
        );
        assert!(s.receive_rules().local_is_owner);
        // What we send, a peer with the same config accepts.
        let peer_rules = ReceiveRules {
            local_is_owner: false,
            ..s.receive_rules()
        };
        let src = Ipv4Addr::new(198, 18, 0, 2);
        let bytes = advert.encode(src, packet::VRRP_MULTICAST_V4, s.vrrp.v3_checksum);
        let ip = crate::vrrp::IpHeaderFields {
            src,
            dst: packet::VRRP_MULTICAST_V4,
            ttl: 255,
            protocol: 112,
        };
        let decoded = packet::receive(&ip, &bytes, &peer_rules).unwrap();
        assert_eq!(decoded.advert, advert);
    }

    #[test]
    fn address_lists_compare_as_sets() {
        let a = Ipv4Addr::new(198, 18, 0, 100);
        let b = Ipv4Addr::new(198, 18, 0, 101);
        assert!(same_addresses(&[a, b], &[b, a]));
        assert!(same_addresses(&[a, a], &[a]));
        assert!(!same_addresses(&[a], &[a, b]));
    }

    #[test]
    fn receive_budget_throttles_for_the_rest_of_the_window() {
        let mut budget = ReceiveBudget::new();
        for _ in 1..RECEIVE_BUDGET {
            assert!(!budget.spend());
        }
        assert_eq!(budget.throttled_until(), None);
        assert!(budget.spend(), "the last packet of the budget");
        let until = budget.throttled_until().expect("throttled");
        assert!(until <= Instant::now() + RECEIVE_WINDOW);
        budget.reset();
        assert_eq!(budget.throttled_until(), None);
    }

    #[test]
    fn warnings_are_rate_limited_per_reason() {
        let mut limiter = WarnLimiter::default();
        assert!(limiter.allow("ttl"));
        assert!(!limiter.allow("ttl"));
        assert!(limiter.allow("checksum"));
    }
}
