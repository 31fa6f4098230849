//! One VRRP virtual router as a deterministic state machine (RFC 5798
//! section 6.4, with the RFC 3768 timers for VRRPv2).
//!
//! [`Instance::handle`] takes the current [`Time`] and one [`Input`] and
//! returns the [`Action`]s to carry out, in order; [`Instance::poll_timeout`]
//! says when the next [`Input::Timer`] is due. Nothing here sends a packet,
//! touches an interface or reads a clock, so a test can run several
//! instances on a virtual clock.
//!
//! Not here: packet format and receive checks ([`super::packet`]), sockets,
//! netlink, gratuitous ARP frames, the data-plane active flag.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Add;
use std::time::Duration;

use tracing::info;

use super::packet::{Version, MAX_ADVER_INT_CS};

/// A point on the caller's monotonic clock: the time elapsed since an epoch
/// the caller picks (agent start, or zero in a simulation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(Duration);

impl Time {
    /// The epoch.
    pub const ZERO: Time = Time(Duration::ZERO);

    /// The point `since_epoch` after the epoch.
    pub const fn from_epoch(since_epoch: Duration) -> Time {
        Time(since_epoch)
    }

    /// Time elapsed from the epoch to this point.
    pub const fn since_epoch(self) -> Duration {
        self.0
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Time {
    type Output = Time;

    /// Saturates instead of panicking.
    fn add(self, rhs: Duration) -> Time {
        Time(self.0.saturating_add(rhs))
    }
}

/// The states of RFC 5798 section 6.4, plus Fault (keepalived's FAULT: the
/// interface is down, so the instance neither sends nor holds the VIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Not running: before [`Input::Startup`] or after [`Input::Shutdown`].
    Initialize,
    /// Watching the master; takes over when Master_Down_Timer fires.
    Backup,
    /// Holds the virtual addresses and advertises.
    Master,
    /// The interface is down.
    Fault,
}

impl State {
    /// Lower-case name, as passed to the notify command and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
            State::Fault => "fault",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened, as seen by the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Start the instance (RFC 5798 section 6.4.1). Ignored unless in
    /// Initialize.
    Startup,
    /// Stop it; a master sends priority 0 first. Ignored in Initialize.
    Shutdown,
    /// [`Instance::poll_timeout`] has been reached.
    Timer,
    /// An advert for our VRID that passed every check of
    /// [`super::packet::receive`].
    AdvertReceived {
        /// IPv4 source: the sender's primary address (tie-break key).
        src: Ipv4Addr,
        /// Advertised priority; 0 = the master is stopping.
        priority: u8,
        /// Advertised interval in centiseconds (VRRPv2: seconds × 100).
        max_adver_int_cs: u16,
    },
    /// New effective priority, e.g. [`effective_priority`] after the node's
    /// READY backends changed. 0 is raised to 1; 255 is lowered to 254
    /// unless the configured priority is 255 (address owner).
    PriorityChanged(u8),
    /// The VRRP interface went down: enter Fault.
    InterfaceDown,
    /// The interface is back: leave Fault as on Startup.
    InterfaceUp,
}

/// Which gratuitous ARP burst to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GarpBurst {
    /// On becoming master.
    Initial,
    /// [`InstanceConfig::garp_repeat_delay`] later, if still master.
    Repeat,
}

/// What the runtime must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// First action of every transition; for the log, the notify command and
    /// metrics. The side effects follow as one of [`Action::BecomeMaster`],
    /// [`Action::BecomeBackup`], [`Action::EnterFault`], [`Action::Stopped`].
    StateChanged {
        /// State left.
        old: State,
        /// State entered.
        new: State,
    },
    /// Add the virtual addresses to the interface. Followed by a
    /// [`Action::SendAdvert`] and a [`Action::SendGratuitousArp`].
    BecomeMaster,
    /// Make sure we do not hold the virtual addresses (clear the data-plane
    /// flag, remove the VIP if present).
    BecomeBackup,
    /// As [`Action::BecomeBackup`], because the interface is down.
    EnterFault,
    /// Back in Initialize after [`Input::Shutdown`]: release the virtual
    /// addresses if held.
    Stopped,
    /// Send one advert with this priority, our configured interval, VRID and
    /// addresses.
    SendAdvert {
        /// Priority to advertise: the effective one, or 0 on shutdown.
        priority: u8,
    },
    /// Send a burst of gratuitous ARPs for the virtual addresses.
    SendGratuitousArp {
        /// Which burst.
        burst: GarpBurst,
    },
}

/// Configuration of one virtual router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    /// Virtual Router ID, 1-255.
    pub vrid: u8,
    /// Protocol version; decides the timer formulas (VRRPv2 skew is in
    /// seconds and the master's interval is not learned).
    pub version: Version,
    /// Base priority, 1-254, or 255 for the address owner.
    pub priority: u8,
    /// Advertisement_Interval in centiseconds. Default 10 (100 ms).
    /// VRRPv3: 1-4095; VRRPv2: whole seconds, 100-25500.
    pub advert_interval_cs: u16,
    /// Preempt_Mode: a higher-priority backup takes over from a live
    /// lower-priority master. Default true.
    pub preempt: bool,
    /// Preemption waits this long after the first advert from a
    /// lower-priority master (keepalived `preempt_delay`). Default zero.
    pub preempt_delay: Duration,
    /// Our primary IPv4 address on the VRRP interface: the source of our
    /// adverts and the tie-break between equal priorities.
    pub primary_address: Ipv4Addr,
    /// Delay of the repeat gratuitous ARP burst after becoming master;
    /// `None` sends only the first. Default 5 s (keepalived's
    /// `garp_master_delay`).
    pub garp_repeat_delay: Option<Duration>,
}

impl InstanceConfig {
    /// Our default advert interval: 100 ms (keepalived's is 1 s).
    pub const DEFAULT_ADVERT_INTERVAL_CS: u16 = 10;
    /// Default delay of the repeat gratuitous ARP burst.
    pub const DEFAULT_GARP_REPEAT_DELAY: Duration = Duration::from_secs(5);

    /// A VRRPv3 instance with the defaults documented on each field.
    pub fn new(vrid: u8, priority: u8, primary_address: Ipv4Addr) -> InstanceConfig {
        InstanceConfig {
            vrid,
            version: Version::V3,
            priority,
            advert_interval_cs: Self::DEFAULT_ADVERT_INTERVAL_CS,
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary_address,
            garp_repeat_delay: Some(Self::DEFAULT_GARP_REPEAT_DELAY),
        }
    }

    /// Check the ranges documented on each field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vrid == 0 {
            return Err(ConfigError::ZeroVrid);
        }
        if self.priority == 0 {
            return Err(ConfigError::ZeroPriority);
        }
        match self.version {
            Version::V3 => {
                if !(1..=MAX_ADVER_INT_CS).contains(&self.advert_interval_cs) {
                    return Err(ConfigError::IntervalOutOfRange {
                        cs: self.advert_interval_cs,
                    });
                }
            }
            Version::V2 => {
                let cs = self.advert_interval_cs;
                if cs == 0 || !cs.is_multiple_of(100) || cs / 100 > u16::from(u8::MAX) {
                    return Err(ConfigError::V2IntervalNotWholeSeconds { cs });
                }
            }
        }
        Ok(())
    }

    /// Advertisement_Interval as a duration.
    pub fn advert_interval(&self) -> Duration {
        centiseconds(self.advert_interval_cs)
    }
}

/// An [`InstanceConfig`] out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// VRID 0.
    #[error("vrid must be 1-255")]
    ZeroVrid,
    /// Priority 0 is what a stopping master sends.
    #[error("priority must be 1-255 (0 is reserved for a master that stops)")]
    ZeroPriority,
    /// VRRPv3 interval outside 1-4095 cs.
    #[error("advert interval {cs} cs is outside 1-4095 cs (VRRPv3)")]
    IntervalOutOfRange {
        /// Configured value.
        cs: u16,
    },
    /// VRRPv2 carries whole seconds, 1-255.
    #[error("advert interval {cs} cs is not 1-255 whole seconds (VRRPv2)")]
    V2IntervalNotWholeSeconds {
        /// Configured value.
        cs: u16,
    },
}

/// The priority to run with: `base` lowered by `weight` while the node has
/// no READY backend (like keepalived's `track_script` weight), never below 1.
/// The address owner (255) keeps 255, as in keepalived.
pub fn effective_priority(base: u8, weight: u8, has_ready_backend: bool) -> u8 {
    if base == 255 || has_ready_backend {
        base
    } else {
        base.saturating_sub(weight).max(1)
    }
}

fn centiseconds(cs: u16) -> Duration {
    Duration::from_millis(u64::from(cs) * 10)
}

/// One virtual router (RFC 5798 section 6.4).
#[derive(Debug, Clone)]
pub struct Instance {
    config: InstanceConfig,
    state: State,
    state_since: Time,
    /// Effective priority (the configured one until [`Input::PriorityChanged`]).
    priority: u8,
    link_up: bool,
    /// Master_Adver_Interval: ours, or as a VRRPv3 backup the master's.
    master_adver_interval: Duration,
    adver_timer: Option<Time>,
    master_down_timer: Option<Time>,
    garp_repeat_timer: Option<Time>,
    /// With a preempt delay: when preempting a lower-priority master becomes
    /// allowed; set by the first advert from such a master.
    preempt_allowed_at: Option<Time>,
}

impl Instance {
    /// A new instance in Initialize; send [`Input::Startup`] to run it. The
    /// interface is assumed up until [`Input::InterfaceDown`].
    pub fn new(config: InstanceConfig, now: Time) -> Result<Instance, ConfigError> {
        config.validate()?;
        Ok(Instance {
            priority: config.priority,
            master_adver_interval: config.advert_interval(),
            config,
            state: State::Initialize,
            state_since: now,
            link_up: true,
            adver_timer: None,
            master_down_timer: None,
            garp_repeat_timer: None,
            preempt_allowed_at: None,
        })
    }

    /// Process one input at `now`; returns the actions to carry out in order.
    pub fn handle(&mut self, now: Time, input: Input) -> Vec<Action> {
        let mut actions = Vec::new();
        match input {
            Input::Startup => {
                if self.state == State::Initialize {
                    if self.link_up {
                        self.start(now, &mut actions);
                    } else {
                        self.change_state(now, State::Fault, &mut actions);
                    }
                }
            }
            Input::Shutdown => match self.state {
                State::Initialize => {}
                State::Master => {
                    // RFC 5798 section 6.4.3: cancel Adver_Timer, send an
                    // advert with priority 0, go to Initialize.
                    actions.push(Action::SendAdvert { priority: 0 });
                    self.change_state(now, State::Initialize, &mut actions);
                }
                State::Backup | State::Fault => {
                    self.change_state(now, State::Initialize, &mut actions);
                }
            },
            Input::Timer => self.on_timer(now, &mut actions),
            Input::AdvertReceived {
                src,
                priority,
                max_adver_int_cs,
            } => self.on_advert(now, src, priority, max_adver_int_cs, &mut actions),
            Input::PriorityChanged(priority) => {
                self.on_priority_changed(now, priority, &mut actions)
            }
            Input::InterfaceDown => {
                self.link_up = false;
                if matches!(self.state, State::Backup | State::Master) {
                    self.change_state(now, State::Fault, &mut actions);
                }
            }
            Input::InterfaceUp => {
                self.link_up = true;
                if self.state == State::Fault {
                    self.start(now, &mut actions);
                }
            }
        }
        actions
    }

    /// When [`Input::Timer`] is next due, or `None` when no timer runs.
    pub fn poll_timeout(&self) -> Option<Time> {
        [
            self.adver_timer,
            self.master_down_timer,
            self.garp_repeat_timer,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When the current state was entered (or the instance created).
    pub fn state_since(&self) -> Time {
        self.state_since
    }

    /// Effective priority.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The configuration.
    pub fn config(&self) -> &InstanceConfig {
        &self.config
    }

    /// Master_Adver_Interval: ours, or the master's as learned by a VRRPv3
    /// backup.
    pub fn master_adver_interval(&self) -> Duration {
        self.master_adver_interval
    }

    /// Skew_Time: VRRPv3 `((256 - Priority) × Master_Adver_Interval) / 256`
    /// (RFC 5798 section 6.1), VRRPv2 `(256 - Priority) / 256` seconds
    /// (RFC 3768 section 6.1). Kept to the nanosecond rather than rounded to
    /// centiseconds, so close priorities still time out apart.
    pub fn skew_time(&self) -> Duration {
        let unit = match self.config.version {
            Version::V3 => self.master_adver_interval,
            Version::V2 => Duration::from_secs(1),
        };
        unit * (256 - u32::from(self.priority)) / 256
    }

    /// Master_Down_Interval: `3 × Master_Adver_Interval + Skew_Time`.
    pub fn master_down_interval(&self) -> Duration {
        self.master_adver_interval * 3 + self.skew_time()
    }

    /// RFC 5798 section 6.4.1, also used to leave Fault.
    fn start(&mut self, now: Time, actions: &mut Vec<Action>) {
        if self.priority == 255 {
            self.change_state(now, State::Master, actions);
        } else {
            self.master_adver_interval = self.config.advert_interval();
            self.change_state(now, State::Backup, actions);
        }
    }

    /// The single place where the state changes: cancels the old state's
    /// timers, starts the new state's and emits its actions.
    fn change_state(&mut self, now: Time, new: State, actions: &mut Vec<Action>) {
        let old = self.state;
        self.state = new;
        self.state_since = now;
        self.adver_timer = None;
        self.master_down_timer = None;
        self.garp_repeat_timer = None;
        self.preempt_allowed_at = None;
        info!(
            vrid = self.config.vrid,
            %old,
            %new,
            priority = self.priority,
            "VRRP state change"
        );
        actions.push(Action::StateChanged { old, new });
        match new {
            State::Master => {
                actions.push(Action::BecomeMaster);
                actions.push(Action::SendAdvert {
                    priority: self.priority,
                });
                actions.push(Action::SendGratuitousArp {
                    burst: GarpBurst::Initial,
                });
                self.adver_timer = Some(now + self.config.advert_interval());
                self.garp_repeat_timer = self.config.garp_repeat_delay.map(|delay| now + delay);
            }
            State::Backup => {
                actions.push(Action::BecomeBackup);
                self.master_down_timer = Some(now + self.master_down_interval());
            }
            State::Fault => actions.push(Action::EnterFault),
            State::Initialize => actions.push(Action::Stopped),
        }
    }

    fn on_timer(&mut self, now: Time, actions: &mut Vec<Action>) {
        let due = |timer: Option<Time>| timer.is_some_and(|at| at <= now);
        match self.state {
            State::Master => {
                if due(self.garp_repeat_timer) {
                    self.garp_repeat_timer = None;
                    actions.push(Action::SendGratuitousArp {
                        burst: GarpBurst::Repeat,
                    });
                }
                if due(self.adver_timer) {
                    actions.push(Action::SendAdvert {
                        priority: self.priority,
                    });
                    self.adver_timer = Some(now + self.config.advert_interval());
                }
            }
            State::Backup => {
                if due(self.master_down_timer) {
                    // RFC 5798 section 6.4.2: Master_Down_Timer fired.
                    self.change_state(now, State::Master, actions);
                }
            }
            State::Initialize | State::Fault => {}
        }
    }

    /// Learn the master's interval (VRRPv3 only; VRRPv2 intervals must
    /// match and are checked on receipt). A zero interval is ignored.
    fn learn_interval(&mut self, max_adver_int_cs: u16) {
        if self.config.version == Version::V3 && max_adver_int_cs != 0 {
            self.master_adver_interval = centiseconds(max_adver_int_cs);
        }
    }

    /// With a preempt delay, whether preempting a lower-priority master must
    /// still wait; the delay starts with the first such advert.
    fn preempt_delay_pending(&mut self, now: Time) -> bool {
        if self.config.preempt_delay.is_zero() {
            return false;
        }
        let allowed_at = *self
            .preempt_allowed_at
            .get_or_insert(now + self.config.preempt_delay);
        now < allowed_at
    }

    fn on_advert(
        &mut self,
        now: Time,
        src: Ipv4Addr,
        priority: u8,
        max_adver_int_cs: u16,
        actions: &mut Vec<Action>,
    ) {
        match self.state {
            State::Backup => {
                // RFC 5798 section 6.4.2.
                if priority == 0 {
                    self.master_down_timer = Some(now + self.skew_time());
                } else if !self.config.preempt
                    || priority >= self.priority
                    || self.preempt_delay_pending(now)
                {
                    if priority >= self.priority {
                        self.preempt_allowed_at = None;
                    }
                    self.learn_interval(max_adver_int_cs);
                    self.master_down_timer = Some(now + self.master_down_interval());
                }
                // Otherwise: a lower-priority master and we preempt. The
                // advert is discarded and Master_Down_Timer runs out.
            }
            State::Master => {
                // RFC 5798 section 6.4.3.
                if priority == 0 {
                    actions.push(Action::SendAdvert {
                        priority: self.priority,
                    });
                    self.adver_timer = Some(now + self.config.advert_interval());
                } else if priority > self.priority
                    || (priority == self.priority && src > self.config.primary_address)
                {
                    self.learn_interval(max_adver_int_cs);
                    self.change_state(now, State::Backup, actions);
                }
                // Otherwise discarded: we stay master.
            }
            State::Initialize | State::Fault => {}
        }
    }

    fn on_priority_changed(&mut self, now: Time, priority: u8, actions: &mut Vec<Action>) {
        let priority = match priority {
            0 => 1,
            255 if self.config.priority != 255 => 254,
            p => p,
        };
        if priority == self.priority {
            return;
        }
        info!(
            vrid = self.config.vrid,
            old = self.priority,
            new = priority,
            "VRRP priority change"
        );
        self.priority = priority;
        if self.state == State::Master {
            // Advertise at once so a preempting backup starts its takeover
            // (or defers to us) without waiting for the next interval.
            actions.push(Action::SendAdvert { priority });
            self.adver_timer = Some(now + self.config.advert_interval());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LATENCY: Duration = Duration::from_millis(1);

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn at(d: Duration) -> Time {
        Time::from_epoch(d)
    }

    fn addr(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, i)
    }

    /// Skew_Time for VRRPv3, computed independently in nanoseconds.
    fn skew_v3(interval_cs: u64, priority: u64) -> Duration {
        Duration::from_nanos((256 - priority) * interval_cs * 10_000_000 / 256)
    }

    /// Master_Down_Interval for VRRPv3.
    fn mdi_v3(interval_cs: u64, priority: u64) -> Duration {
        Duration::from_nanos(3 * interval_cs * 10_000_000) + skew_v3(interval_cs, priority)
    }

    fn config(i: u8, priority: u8) -> InstanceConfig {
        InstanceConfig::new(101, priority, addr(i))
    }

    struct Delivery {
        at: Time,
        seq: u64,
        to: usize,
        input: Input,
    }

    /// A LAN of instances on a virtual clock: every SendAdvert reaches every
    /// other connected instance after `LATENCY`.
    struct Lan {
        now: Time,
        nodes: Vec<Instance>,
        connected: Vec<bool>,
        queue: Vec<Delivery>,
        seq: u64,
        /// (when, node, old, new)
        transitions: Vec<(Time, usize, State, State)>,
        /// (when, node, priority)
        adverts: Vec<(Time, usize, u8)>,
        /// (when, to, from)
        received: Vec<(Time, usize, usize)>,
        /// (when, node, burst)
        garps: Vec<(Time, usize, GarpBurst)>,
        /// Every action list, per node, for order checks.
        actions: Vec<(Time, usize, Vec<Action>)>,
    }

    impl Lan {
        fn new(configs: Vec<InstanceConfig>) -> Lan {
            let nodes: Vec<Instance> = configs
                .into_iter()
                .map(|c| Instance::new(c, Time::ZERO).unwrap())
                .collect();
            Lan {
                now: Time::ZERO,
                connected: vec![true; nodes.len()],
                nodes,
                queue: Vec::new(),
                seq: 0,
                transitions: Vec::new(),
                adverts: Vec::new(),
                received: Vec::new(),
                garps: Vec::new(),
                actions: Vec::new(),
            }
        }

        /// Feed `input` to `node` now.
        fn input(&mut self, node: usize, input: Input) {
            let actions = self.nodes[node].handle(self.now, input);
            self.apply(node, actions);
        }

        fn start_all(&mut self) {
            for node in 0..self.nodes.len() {
                self.input(node, Input::Startup);
            }
        }

        /// The node stops sending, receiving and running timers (crash or
        /// cable cut without telling the instance).
        fn crash(&mut self, node: usize) {
            self.connected[node] = false;
        }

        fn apply(&mut self, from: usize, actions: Vec<Action>) {
            if !self.connected[from] {
                return;
            }
            self.actions.push((self.now, from, actions.clone()));
            for action in actions {
                match action {
                    Action::StateChanged { old, new } => {
                        self.transitions.push((self.now, from, old, new));
                    }
                    Action::SendAdvert { priority } => {
                        self.adverts.push((self.now, from, priority));
                        let src = self.nodes[from].config().primary_address;
                        let max_adver_int_cs = self.nodes[from].config().advert_interval_cs;
                        for to in 0..self.nodes.len() {
                            if to != from {
                                self.seq += 1;
                                self.queue.push(Delivery {
                                    at: self.now + LATENCY,
                                    seq: self.seq,
                                    to,
                                    input: Input::AdvertReceived {
                                        src,
                                        priority,
                                        max_adver_int_cs,
                                    },
                                });
                            }
                        }
                    }
                    Action::SendGratuitousArp { burst } => self.garps.push((self.now, from, burst)),
                    Action::BecomeMaster
                    | Action::BecomeBackup
                    | Action::EnterFault
                    | Action::Stopped => {}
                }
            }
        }

        /// Process every delivery and timer up to and including `end`, in
        /// time order (deliveries before timers at the same instant).
        fn run_until(&mut self, end: Time) {
            let mut same_instant = 0;
            loop {
                let delivery =
                    (0..self.queue.len()).min_by_key(|&i| (self.queue[i].at, self.queue[i].seq));
                let timer = (0..self.nodes.len())
                    .filter(|&n| self.connected[n])
                    .filter_map(|n| self.nodes[n].poll_timeout().map(|t| (t, n)))
                    .min();
                let delivery_at = delivery.map(|i| self.queue[i].at);
                let next = match (delivery_at, timer) {
                    (Some(d), Some((t, _))) => d.min(t),
                    (Some(d), None) => d,
                    (None, Some((t, _))) => t,
                    (None, None) => break,
                };
                if next > end {
                    break;
                }
                assert!(next >= self.now, "time went backwards");
                same_instant = if next == self.now {
                    same_instant + 1
                } else {
                    0
                };
                assert!(same_instant < 1000, "livelock at {next:?}");
                self.now = next;
                if delivery_at == Some(next) {
                    let d = self.queue.swap_remove(delivery.unwrap());
                    if self.connected[d.to] {
                        if let Input::AdvertReceived { src, .. } = d.input {
                            let from = (0..self.nodes.len())
                                .find(|&n| self.nodes[n].config().primary_address == src)
                                .unwrap();
                            self.received.push((self.now, d.to, from));
                        }
                        self.input(d.to, d.input);
                    }
                } else {
                    let (_, node) = timer.unwrap();
                    self.input(node, Input::Timer);
                }
            }
            self.now = end;
        }

        fn masters(&self) -> Vec<usize> {
            (0..self.nodes.len())
                .filter(|&n| self.nodes[n].state() == State::Master)
                .collect()
        }

        /// When `node` entered `state`, in order.
        fn entered(&self, node: usize, state: State) -> Vec<Time> {
            self.transitions
                .iter()
                .filter(|&&(_, n, _, new)| n == node && new == state)
                .map(|&(t, ..)| t)
                .collect()
        }

        fn last_received(&self, to: usize, from: usize) -> Time {
            self.received
                .iter()
                .rev()
                .find(|&&(_, t, f)| t == to && f == from)
                .map(|&(at, ..)| at)
                .expect("received something")
        }
    }

    #[test]
    fn election_among_three_priorities() {
        let mut lan = Lan::new(vec![config(1, 100), config(2, 150), config(3, 200)]);
        lan.start_all();
        assert!(lan.nodes.iter().all(|n| n.state() == State::Backup));
        lan.run_until(at(ms(10_000)));

        // Priority 200 times out first: 3 × 100 ms + 56/256 × 100 ms.
        assert_eq!(lan.entered(2, State::Master), vec![at(mdi_v3(10, 200))]);
        assert!(lan.entered(0, State::Master).is_empty());
        assert!(lan.entered(1, State::Master).is_empty());
        assert_eq!(lan.masters(), vec![2]);
        // The master advertises every 100 ms, with its priority.
        let sent: Vec<_> = lan.adverts.iter().filter(|a| a.1 == 2).collect();
        assert!(sent.iter().all(|a| a.2 == 200));
        assert_eq!(sent.len(), 97, "adverts from 321.875 ms to 10 s");
        assert!(sent
            .windows(2)
            .all(|w| w[1].0.saturating_duration_since(w[0].0) == ms(100)));
        assert!(lan.adverts.iter().all(|a| a.1 == 2), "backups are silent");
    }

    #[test]
    fn preemption_on_higher_priority_takes_over() {
        let mut lan = Lan::new(vec![config(1, 100), config(2, 150), config(3, 200)]);
        lan.input(0, Input::Startup);
        lan.input(1, Input::Startup);
        lan.run_until(at(ms(1000)));
        assert_eq!(lan.masters(), vec![1]);
        assert_eq!(lan.entered(1, State::Master), vec![at(mdi_v3(10, 150))]);

        lan.input(2, Input::Startup);
        lan.run_until(at(ms(5000)));
        // It discards the lower-priority adverts, so its Master_Down_Timer
        // from startup runs out; the old master yields on its first advert.
        let takeover = at(ms(1000) + mdi_v3(10, 200));
        assert_eq!(lan.entered(2, State::Master), vec![takeover]);
        assert_eq!(
            lan.entered(1, State::Backup),
            vec![Time::ZERO, takeover + LATENCY]
        );
        assert_eq!(lan.masters(), vec![2]);
    }

    #[test]
    fn preemption_off_lower_master_keeps_the_role() {
        let mut high = config(3, 200);
        high.preempt = false;
        let mut lan = Lan::new(vec![config(1, 100), config(2, 150), high]);
        lan.input(0, Input::Startup);
        lan.input(1, Input::Startup);
        lan.run_until(at(ms(1000)));
        lan.input(2, Input::Startup);
        lan.run_until(at(ms(10_000)));
        assert!(lan.entered(2, State::Master).is_empty());
        assert_eq!(lan.masters(), vec![1]);
        assert_eq!(lan.entered(1, State::Master).len(), 1);

        // It still takes over when the master dies.
        lan.crash(1);
        lan.run_until(at(ms(12_000)));
        let last = lan.last_received(2, 1);
        assert_eq!(lan.entered(2, State::Master), vec![last + mdi_v3(10, 200)]);
    }

    #[test]
    fn preempt_delay_postpones_takeover() {
        let mut high = config(3, 200);
        high.preempt_delay = ms(1000);
        let mut lan = Lan::new(vec![config(1, 100), config(2, 150), high]);
        lan.input(0, Input::Startup);
        lan.input(1, Input::Startup);
        lan.run_until(at(ms(1000)));
        lan.input(2, Input::Startup);
        lan.run_until(at(ms(5000)));

        // Node 1 became master at 341.40625 ms; its adverts reach node 2 at
        // 342.40625 + k × 100 ms. The first one after 1 s (1042.40625 ms)
        // starts the delay; adverts until 2042.40625 ms still count as a live
        // master, the last at 1942.40625 ms; then Master_Down_Interval.
        let first_seen = at(mdi_v3(10, 150) + LATENCY + ms(700));
        assert_eq!(first_seen, at(Duration::from_nanos(1_042_406_250)));
        let last_accepted = first_seen + ms(900);
        let takeover = last_accepted + mdi_v3(10, 200);
        assert_eq!(takeover, at(Duration::from_nanos(2_264_281_250)));
        assert_eq!(lan.entered(2, State::Master), vec![takeover]);
        assert_eq!(lan.masters(), vec![2]);
    }

    #[test]
    fn equal_priority_simultaneous_masters_resolve_to_higher_address() {
        let mut lan = Lan::new(vec![config(1, 100), config(2, 100)]);
        lan.start_all();
        lan.run_until(at(ms(3000)));
        let both = at(mdi_v3(10, 100));
        assert_eq!(lan.entered(0, State::Master), vec![both]);
        assert_eq!(lan.entered(1, State::Master), vec![both]);
        // Each hears the other 1 ms later; the lower address yields.
        assert_eq!(
            lan.entered(0, State::Backup),
            vec![Time::ZERO, both + LATENCY]
        );
        assert_eq!(lan.masters(), vec![1]);
    }

    #[test]
    fn equal_priority_does_not_displace_a_running_master() {
        // Tie-break only applies between two masters: a backup accepts an
        // advert of equal priority as a live master.
        let mut lan = Lan::new(vec![config(1, 100), config(2, 100)]);
        lan.input(0, Input::Startup);
        lan.run_until(at(ms(1000)));
        lan.input(1, Input::Startup);
        lan.run_until(at(ms(5000)));
        assert_eq!(lan.masters(), vec![0]);
        assert!(lan.entered(1, State::Master).is_empty());
    }

    #[test]
    fn priority_zero_handover_after_exactly_skew_time() {
        let mut lan = Lan::new(vec![config(1, 100), config(2, 150), config(3, 200)]);
        lan.start_all();
        lan.run_until(at(ms(2000)));
        assert_eq!(lan.masters(), vec![2]);

        lan.input(2, Input::Shutdown);
        assert_eq!(lan.nodes[2].state(), State::Initialize);
        assert_eq!(lan.adverts.last(), Some(&(at(ms(2000)), 2, 0)));
        assert_eq!(lan.nodes[2].poll_timeout(), None);
        lan.run_until(at(ms(4000)));

        // Skew_Time of priority 150 is 106/256 × 100 ms = 41.40625 ms; the
        // priority-100 node (60.9375 ms) hears the new master first.
        let takeover = at(ms(2000)) + LATENCY + skew_v3(10, 150);
        assert_eq!(takeover, at(Duration::from_nanos(2_042_406_250)));
        assert_eq!(lan.entered(1, State::Master), vec![takeover]);
        assert!(lan.entered(0, State::Master).is_empty());
        assert_eq!(lan.masters(), vec![1]);
        assert!(lan.adverts.iter().all(|a| a.1 != 2 || a.0 <= at(ms(2000))));
    }

    #[test]
    fn master_down_timing_for_several_intervals() {
        for interval_cs in [1u16, 5, 10, 37, 100, 255, 4095] {
            let mut master = config(1, 200);
            master.advert_interval_cs = interval_cs;
            let mut backup = config(2, 100);
            backup.advert_interval_cs = interval_cs;
            let mut lan = Lan::new(vec![master, backup]);
            lan.start_all();
            let i = centiseconds(interval_cs);
            lan.run_until(at(i * 10 + ms(3)));
            assert_eq!(lan.masters(), vec![0], "{interval_cs} cs");
            lan.crash(0);
            lan.run_until(at(i * 20));
            let last = lan.last_received(1, 0);
            let expected = last + mdi_v3(u64::from(interval_cs), 100);
            assert_eq!(
                lan.entered(1, State::Master),
                vec![expected],
                "{interval_cs} cs"
            );
            assert_eq!(
                lan.nodes[1].master_down_interval(),
                mdi_v3(u64::from(interval_cs), 100)
            );
        }
    }

    #[test]
    fn vrrp_v2_timers_use_seconds_skew() {
        // The seed keepalived setup: advert_int 1, priorities 101 and 100.
        let v2 = |i, priority| InstanceConfig {
            version: Version::V2,
            advert_interval_cs: 100,
            ..config(i, priority)
        };
        let mut lan = Lan::new(vec![v2(1, 101), v2(2, 100)]);
        lan.start_all();
        lan.run_until(at(ms(10_000)));
        // 3 s + 155/256 s
        let first = at(ms(3000) + Duration::from_nanos(155_000_000_000 / 256));
        assert_eq!(lan.entered(0, State::Master), vec![first]);
        lan.crash(0);
        lan.run_until(at(ms(20_000)));
        let last = lan.last_received(1, 0);
        let expected = last + ms(3000) + Duration::from_nanos(156_000_000_000 / 256);
        assert_eq!(lan.entered(1, State::Master), vec![expected]);
    }

    #[test]
    fn backup_learns_the_masters_interval() {
        let mut master = config(1, 200);
        master.advert_interval_cs = 50;
        let mut lan = Lan::new(vec![master, config(2, 100)]);
        lan.start_all();
        assert_eq!(lan.nodes[1].master_adver_interval(), ms(100));
        lan.run_until(at(ms(3000)));
        assert_eq!(lan.nodes[1].master_adver_interval(), ms(500));
        assert_eq!(lan.nodes[1].master_down_interval(), mdi_v3(50, 100));

        lan.crash(0);
        lan.run_until(at(ms(6000)));
        let last = lan.last_received(1, 0);
        let takeover = last + mdi_v3(50, 100);
        // At startup node 1 (100 ms interval) timed out first and was master
        // until node 0 (500 ms) preempted it.
        assert_eq!(
            lan.entered(1, State::Master),
            vec![at(mdi_v3(10, 100)), takeover]
        );
        assert_eq!(lan.entered(0, State::Master), vec![at(mdi_v3(50, 200))]);
        // As master it advertises at its own interval.
        let own: Vec<Time> = lan
            .adverts
            .iter()
            .filter(|a| a.1 == 1 && a.0 >= takeover)
            .map(|a| a.0)
            .collect();
        assert_eq!(own[0], takeover);
        assert_eq!(own[1], takeover + ms(100));

        // VRRPv2 does not learn (mismatched intervals are dropped on receipt).
        let mut v2 = Instance::new(
            InstanceConfig {
                version: Version::V2,
                advert_interval_cs: 100,
                ..config(2, 100)
            },
            Time::ZERO,
        )
        .unwrap();
        v2.handle(Time::ZERO, Input::Startup);
        v2.handle(
            at(ms(10)),
            Input::AdvertReceived {
                src: addr(1),
                priority: 200,
                max_adver_int_cs: 300,
            },
        );
        assert_eq!(v2.master_adver_interval(), ms(1000));
    }

    #[test]
    fn zero_interval_in_an_advert_is_not_learned() {
        let mut backup = Instance::new(config(2, 100), Time::ZERO).unwrap();
        backup.handle(Time::ZERO, Input::Startup);
        backup.handle(
            at(ms(10)),
            Input::AdvertReceived {
                src: addr(1),
                priority: 200,
                max_adver_int_cs: 0,
            },
        );
        assert_eq!(backup.master_adver_interval(), ms(100));
        assert_eq!(backup.poll_timeout(), Some(at(ms(10) + mdi_v3(10, 100))));
    }

    #[test]
    fn priority_drop_moves_mastership_when_preempt_is_on() {
        let mut lan = Lan::new(vec![config(1, 200), config(2, 150)]);
        lan.start_all();
        lan.run_until(at(ms(1000)));
        assert_eq!(lan.masters(), vec![0]);

        // Node 0 loses its last READY backend: 200 - 100.
        lan.input(
            0,
            Input::PriorityChanged(effective_priority(200, 100, false)),
        );
        assert_eq!(lan.nodes[0].priority(), 100);
        assert_eq!(lan.adverts.last(), Some(&(at(ms(1000)), 0, 100)));
        lan.run_until(at(ms(3000)));
        // Node 1's timer was last reset by the priority-200 advert received at
        // 922.875 ms; the priority-100 ones are discarded.
        let last_high = at(mdi_v3(10, 200) + ms(600) + LATENCY);
        assert_eq!(last_high, at(Duration::from_nanos(922_875_000)));
        let takeover = last_high + mdi_v3(10, 150);
        assert_eq!(lan.entered(1, State::Master), vec![takeover]);
        assert_eq!(
            lan.entered(0, State::Backup),
            vec![Time::ZERO, takeover + LATENCY]
        );
        assert_eq!(lan.masters(), vec![1]);

        // Backends READY again: node 0 preempts back.
        lan.input(
            0,
            Input::PriorityChanged(effective_priority(200, 100, true)),
        );
        lan.run_until(at(ms(5000)));
        assert_eq!(lan.masters(), vec![0]);
        assert_eq!(lan.entered(0, State::Master).len(), 2);
    }

    #[test]
    fn priority_drop_without_preempt_keeps_the_master() {
        let mut backup = config(2, 150);
        backup.preempt = false;
        let mut lan = Lan::new(vec![config(1, 200), backup]);
        lan.start_all();
        lan.run_until(at(ms(1000)));
        lan.input(0, Input::PriorityChanged(100));
        lan.run_until(at(ms(5000)));
        assert_eq!(lan.masters(), vec![0]);
        assert!(lan.entered(1, State::Master).is_empty());
    }

    #[test]
    fn interface_down_enters_fault_and_up_rejoins() {
        let mut lan = Lan::new(vec![config(1, 200), config(2, 100)]);
        lan.start_all();
        lan.run_until(at(ms(1000)));
        assert_eq!(lan.masters(), vec![0]);

        let sent_before = lan.adverts.len();
        lan.input(0, Input::InterfaceDown);
        assert_eq!(lan.nodes[0].state(), State::Fault);
        assert_eq!(lan.adverts.len(), sent_before, "no advert from a dead link");
        let (_, _, actions) = lan.actions.last().unwrap();
        assert_eq!(
            actions,
            &vec![
                Action::StateChanged {
                    old: State::Master,
                    new: State::Fault
                },
                Action::EnterFault
            ]
        );
        assert_eq!(lan.nodes[0].poll_timeout(), None);
        lan.run_until(at(ms(2000)));
        let last = lan.last_received(1, 0);
        assert_eq!(lan.entered(1, State::Master), vec![last + mdi_v3(10, 100)]);
        // In Fault, adverts and timers change nothing.
        assert_eq!(lan.nodes[0].state(), State::Fault);

        lan.input(0, Input::InterfaceUp);
        assert_eq!(lan.nodes[0].state(), State::Backup);
        lan.run_until(at(ms(4000)));
        assert_eq!(
            lan.entered(0, State::Master).last(),
            Some(&at(ms(2000) + mdi_v3(10, 200)))
        );
        assert_eq!(lan.masters(), vec![0]);

        // Startup while the link is down goes straight to Fault.
        let mut inst = Instance::new(config(3, 100), Time::ZERO).unwrap();
        inst.handle(Time::ZERO, Input::InterfaceDown);
        assert_eq!(inst.state(), State::Initialize);
        inst.handle(Time::ZERO, Input::Startup);
        assert_eq!(inst.state(), State::Fault);
        inst.handle(at(ms(5)), Input::InterfaceUp);
        assert_eq!(inst.state(), State::Backup);
        assert_eq!(inst.poll_timeout(), Some(at(ms(5) + mdi_v3(10, 100))));
    }

    #[test]
    fn address_owner_is_master_at_once() {
        let mut owner = Instance::new(config(1, 255), Time::ZERO).unwrap();
        let actions = owner.handle(at(ms(7)), Input::Startup);
        assert_eq!(
            actions,
            vec![
                Action::StateChanged {
                    old: State::Initialize,
                    new: State::Master
                },
                Action::BecomeMaster,
                Action::SendAdvert { priority: 255 },
                Action::SendGratuitousArp {
                    burst: GarpBurst::Initial
                },
            ]
        );
        assert_eq!(owner.poll_timeout(), Some(at(ms(107))));
        // An owner keeps 255 whatever its backends do.
        assert_eq!(effective_priority(255, 50, false), 255);
        owner.handle(at(ms(8)), Input::PriorityChanged(255));
        assert_eq!(owner.priority(), 255);
    }

    #[test]
    fn gratuitous_arp_repeat_burst_only_while_master() {
        let mut lan = Lan::new(vec![config(1, 200), config(2, 100)]);
        lan.start_all();
        lan.run_until(at(ms(20_000)));
        let became = at(mdi_v3(10, 200));
        assert_eq!(
            lan.garps,
            vec![
                (became, 0, GarpBurst::Initial),
                (became + ms(5000), 0, GarpBurst::Repeat)
            ]
        );
        // The order of actions when becoming master.
        let (_, _, actions) = lan
            .actions
            .iter()
            .find(|(t, n, _)| *t == became && *n == 0)
            .unwrap();
        assert_eq!(
            actions,
            &vec![
                Action::StateChanged {
                    old: State::Backup,
                    new: State::Master
                },
                Action::BecomeMaster,
                Action::SendAdvert { priority: 200 },
                Action::SendGratuitousArp {
                    burst: GarpBurst::Initial
                },
            ]
        );

        // Stepping down before the repeat cancels it.
        let mut lan = Lan::new(vec![config(1, 100), config(2, 200)]);
        lan.input(0, Input::Startup);
        lan.run_until(at(ms(1000)));
        lan.input(1, Input::Startup);
        lan.run_until(at(ms(10_000)));
        assert!(lan
            .garps
            .iter()
            .all(|g| !(g.1 == 0 && g.2 == GarpBurst::Repeat)));
        assert!(lan
            .garps
            .contains(&(at(ms(1000) + mdi_v3(10, 200)), 1, GarpBurst::Initial)));

        // No repeat when disabled.
        let mut single = config(1, 100);
        single.garp_repeat_delay = None;
        let mut lan = Lan::new(vec![single]);
        lan.start_all();
        lan.run_until(at(ms(10_000)));
        assert_eq!(lan.garps.len(), 1);
    }

    #[test]
    fn shutdown_and_startup_edge_cases() {
        let mut inst = Instance::new(config(1, 100), Time::ZERO).unwrap();
        assert_eq!(inst.poll_timeout(), None);
        // Inputs before startup are ignored.
        assert!(inst.handle(Time::ZERO, Input::Timer).is_empty());
        assert!(inst.handle(Time::ZERO, Input::Shutdown).is_empty());
        assert!(inst
            .handle(
                Time::ZERO,
                Input::AdvertReceived {
                    src: addr(2),
                    priority: 0,
                    max_adver_int_cs: 10
                }
            )
            .is_empty());
        inst.handle(Time::ZERO, Input::Startup);
        assert!(
            inst.handle(at(ms(1)), Input::Startup).is_empty(),
            "already running"
        );
        // A backup stops without sending.
        assert_eq!(
            inst.handle(at(ms(2)), Input::Shutdown),
            vec![
                Action::StateChanged {
                    old: State::Backup,
                    new: State::Initialize
                },
                Action::Stopped
            ]
        );
        assert_eq!(inst.poll_timeout(), None);
        assert_eq!(inst.state_since(), at(ms(2)));
        // And can start again.
        inst.handle(at(ms(3)), Input::Startup);
        assert_eq!(inst.state(), State::Backup);

        // A master sends priority 0 before releasing the address.
        let mut owner = Instance::new(config(1, 255), Time::ZERO).unwrap();
        owner.handle(Time::ZERO, Input::Startup);
        assert_eq!(
            owner.handle(at(ms(50)), Input::Shutdown),
            vec![
                Action::SendAdvert { priority: 0 },
                Action::StateChanged {
                    old: State::Master,
                    new: State::Initialize
                },
                Action::Stopped
            ]
        );

        // A master hearing priority 0 (another stopping master) re-asserts.
        let mut master = Instance::new(config(1, 255), Time::ZERO).unwrap();
        master.handle(Time::ZERO, Input::Startup);
        let actions = master.handle(
            at(ms(30)),
            Input::AdvertReceived {
                src: addr(9),
                priority: 0,
                max_adver_int_cs: 10,
            },
        );
        assert_eq!(actions, vec![Action::SendAdvert { priority: 255 }]);
        assert_eq!(master.poll_timeout(), Some(at(ms(130))));
    }

    #[test]
    fn priority_changes_are_clamped() {
        let mut inst = Instance::new(config(1, 100), Time::ZERO).unwrap();
        inst.handle(Time::ZERO, Input::Startup);
        inst.handle(Time::ZERO, Input::PriorityChanged(0));
        assert_eq!(inst.priority(), 1);
        inst.handle(Time::ZERO, Input::PriorityChanged(255));
        assert_eq!(inst.priority(), 254);
        assert_eq!(effective_priority(100, 150, false), 1);
        assert_eq!(effective_priority(100, 30, false), 70);
        assert_eq!(effective_priority(100, 30, true), 100);
    }

    #[test]
    fn config_validation() {
        let good = config(1, 100);
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(good.advert_interval(), ms(100));
        let cases = [
            (
                InstanceConfig {
                    vrid: 0,
                    ..good.clone()
                },
                ConfigError::ZeroVrid,
            ),
            (
                InstanceConfig {
                    priority: 0,
                    ..good.clone()
                },
                ConfigError::ZeroPriority,
            ),
            (
                InstanceConfig {
                    advert_interval_cs: 0,
                    ..good.clone()
                },
                ConfigError::IntervalOutOfRange { cs: 0 },
            ),
            (
                InstanceConfig {
                    advert_interval_cs: 4096,
                    ..good.clone()
                },
                ConfigError::IntervalOutOfRange { cs: 4096 },
            ),
            (
                InstanceConfig {
                    version: Version::V2,
                    advert_interval_cs: 150,
                    ..good.clone()
                },
                ConfigError::V2IntervalNotWholeSeconds { cs: 150 },
            ),
            (
                InstanceConfig {
                    version: Version::V2,
                    advert_interval_cs: 25600,
                    ..good.clone()
                },
                ConfigError::V2IntervalNotWholeSeconds { cs: 25600 },
            ),
        ];
        for (config, error) in cases {
            assert_eq!(config.validate(), Err(error.clone()));
            assert_eq!(Instance::new(config, Time::ZERO).unwrap_err(), error);
        }
        let v2 = InstanceConfig {
            version: Version::V2,
            advert_interval_cs: 25500,
            ..good
        };
        assert_eq!(v2.validate(), Ok(()));
    }

    #[test]
    fn random_inputs_never_panic_and_timers_never_lie_in_the_past() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let mut cfg = config(1, (next() % 255) as u8 + 1);
            cfg.preempt = next() % 2 == 0;
            cfg.preempt_delay = ms(next() % 500);
            cfg.advert_interval_cs = (next() % 4095) as u16 + 1;
            if round % 3 == 0 {
                cfg.version = Version::V2;
                cfg.advert_interval_cs = ((next() % 255) as u16 + 1) * 100;
            }
            let mut inst = Instance::new(cfg, Time::ZERO).unwrap();
            let mut now = Time::ZERO;
            for _ in 0..500 {
                now = now + Duration::from_micros(next() % 2_000_000);
                let input = match next() % 9 {
                    0 => Input::Startup,
                    1 => Input::Shutdown,
                    2 => Input::PriorityChanged(next() as u8),
                    3 => Input::InterfaceDown,
                    4 => Input::InterfaceUp,
                    5 | 6 => Input::AdvertReceived {
                        src: Ipv4Addr::from(next() as u32),
                        priority: next() as u8,
                        max_adver_int_cs: next() as u16,
                    },
                    _ => {
                        if let Some(t) = inst.poll_timeout() {
                            now = now.max(t);
                        }
                        Input::Timer
                    }
                };
                inst.handle(now, input);
                // Timers belong to the running states only.
                match inst.state() {
                    State::Initialize | State::Fault => assert_eq!(inst.poll_timeout(), None),
                    State::Backup | State::Master => assert!(inst.poll_timeout().is_some()),
                }
                // Firing the due timer moves every timer past that instant.
                if let Some(t) = inst.poll_timeout() {
                    now = now.max(t);
                    let fired = inst.handle(now, Input::Timer);
                    assert!(
                        inst.poll_timeout().is_none_or(|after| after > now),
                        "timer due at {now:?} did not advance: {fired:?}"
                    );
                }
            }
        }
    }
}
