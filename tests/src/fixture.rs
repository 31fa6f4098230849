//! The packet-fixture harness: runs the XDP program `balancer` on frames
//! built with [`crate::packet`] through `BPF_PROG_TEST_RUN` and compares the
//! verdict and the output bytes with what each case expects.
//!
//! `bpf_fib_lookup` in the program resolves next hops in the namespace of
//! the ingress device, so every [`Dataplane`] lives in a namespace of its own
//! ([`with_dataplane`]) holding two veth pairs:
//!
//! ```text
//!   fx0 198.18.0.1/24 <-> fx1      client 198.18.0.10 and backends
//!                                   198.18.0.2..=198.18.0.17 (permanent
//!                                   neighbour entries, MACs from mac_of)
//!   fy0 198.18.1.1/24 <-> fy1      one backend, 198.18.1.2 (redirect case)
//! ```
//!
//! IPv4 forwarding is on (the helper refuses otherwise). Test runs pass an
//! `xdp_md` context naming fx0 (or fy0) as the ingress device, and the thread
//! is pinned to one CPU so the per-CPU round-robin cursor is deterministic.
//!
//! Not here: the cases themselves (tests/tests/fixtures.rs), anything that
//! attaches the program to an interface.

use std::{fmt, net::Ipv4Addr};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use balancer_common::{
    backend_stats_index, counter, names, Backend, FlowEntry, FlowKey, HoldTimes, Service,
    ServiceKey, Settings, TrafficStats, BACKEND_LOCAL, IPPROTO_TCP, MAX_BACKENDS, SERVICE_ACTIVE,
};

use crate::{
    netns::{unique_prefix, Netns},
    packet::{field_diff, Frame, FrameView, Mac},
};

/// This node's address on fx0 (`Settings::node_addr`).
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// This node's address on fy0.
pub const NODE_FY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The client every case talks from.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The service's virtual address and port.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const VIP_PORT: u16 = 6380;
/// Port every backend listens on.
pub const BACKEND_PORT: u16 = 6380;
/// A backend behind fy0: reaching it needs a redirect.
pub const FAR_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// On fx0's subnet but with no neighbour entry: the FIB lookup fails.
pub const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);

pub const FX0_MAC: Mac = [0x02, 0xf0, 0, 0, 0, 0x01];
pub const FX1_MAC: Mac = [0x02, 0xf0, 0, 0, 0, 0x02];
pub const FY0_MAC: Mac = [0x02, 0xf0, 0, 0, 1, 0x01];
pub const FY1_MAC: Mac = [0x02, 0xf0, 0, 0, 1, 0x02];

/// Default SNAT range of the fixtures.
pub const SNAT_MIN: u16 = 20000;
pub const SNAT_MAX: u16 = 29999;
/// Conntrack entries the fixtures load the program with.
pub const CONNTRACK_ENTRIES: u32 = 4096;

/// Backend `i` (0..16) on fx0's subnet: 198.18.0.2 + i.
pub fn backend(i: usize) -> Ipv4Addr {
    assert!(i < MAX_BACKENDS, "backend index {i}");
    Ipv4Addr::new(198, 18, 0, 2 + i as u8)
}

/// The MAC the lab's neighbour table gives `addr` (client and backends).
pub fn mac_of(addr: Ipv4Addr) -> Mac {
    let o = addr.octets();
    [0x02, 0xbe, o[0], o[1], o[2], o[3]]
}

/// XDP verdicts (`enum xdp_action`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Other(u32),
}

impl From<u32> for Verdict {
    fn from(v: u32) -> Self {
        match v {
            0 => Verdict::Aborted,
            1 => Verdict::Drop,
            2 => Verdict::Pass,
            3 => Verdict::Tx,
            4 => Verdict::Redirect,
            n => Verdict::Other(n),
        }
    }
}

/// The interface a frame arrives on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ingress {
    Fx0,
    Fy0,
}

/// What a case expects in the output buffer.
#[derive(Clone, Debug)]
pub enum Expected {
    /// The input, byte for byte.
    Unchanged,
    /// These bytes (built with the packet builder).
    Frame(Vec<u8>),
}

/// One fixture: {description, input, expected verdict, expected output}.
#[derive(Clone, Debug)]
pub struct Case {
    pub description: String,
    pub input: Vec<u8>,
    pub ingress: Ingress,
    pub verdict: Verdict,
    pub output: Expected,
    /// A `counter::*` slot this packet must add exactly one to.
    pub counts: Option<u32>,
}

impl Case {
    /// A case whose input arrives on fx0.
    pub fn new(
        description: impl Into<String>,
        input: &Frame,
        verdict: Verdict,
        output: Expected,
    ) -> Self {
        Case {
            description: description.into(),
            input: input.build(),
            ingress: Ingress::Fx0,
            verdict,
            output,
            counts: None,
        }
    }

    /// Passed with its bytes unchanged.
    pub fn passes(description: impl Into<String>, input: &Frame) -> Self {
        Case::new(description, input, Verdict::Pass, Expected::Unchanged)
    }

    /// Sent with exactly the bytes of `output` (verdict `verdict`).
    pub fn rewritten(
        description: impl Into<String>,
        input: &Frame,
        verdict: Verdict,
        output: &Frame,
    ) -> Self {
        Case::new(description, input, verdict, Expected::Frame(output.build()))
    }

    pub fn on(mut self, ingress: Ingress) -> Self {
        self.ingress = ingress;
        self
    }

    pub fn counting(mut self, slot: u32) -> Self {
        self.counts = Some(slot);
        self
    }
}

/// Verdict and output frame of one test run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub frame: Vec<u8>,
}

/// A case that did not go as expected: the description and what differed.
#[derive(Debug, thiserror::Error)]
pub struct CaseFailure {
    pub description: String,
    pub problems: Vec<String>,
    pub input: Vec<u8>,
    pub observed: Option<Outcome>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl fmt::Display for CaseFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "case \"{}\" failed:", self.description)?;
        for p in &self.problems {
            writeln!(f, "    {p}")?;
        }
        writeln!(
            f,
            "    input    ({} bytes) {}",
            self.input.len(),
            hex(&self.input)
        )?;
        if let Some(o) = &self.observed {
            writeln!(
                f,
                "    observed ({} bytes, {:?}) {}",
                o.frame.len(),
                o.verdict,
                hex(&o.frame)
            )?;
        }
        Ok(())
    }
}

/// Failures of several cases of a table, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{} of {total} fixture cases failed:\n{}", .failures.len(), .failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(""))]
pub struct TableFailure {
    pub total: usize,
    pub failures: Vec<CaseFailure>,
}

/// The key of a conntrack entry for a packet from `src` to `dst`.
pub fn flow_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(src.0.octets()),
        daddr: u32::from_ne_bytes(dst.0.octets()),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// An address in a map's network byte order.
pub fn net_addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// An address from a map's network byte order.
pub fn host_addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

/// A service whose VIP this node holds, with the given backends (port
/// [`BACKEND_PORT`]; [`NODE`] is flagged local), all READY in slot order.
pub fn active_service(id: u32, backends: &[Ipv4Addr]) -> Service {
    assert!(backends.len() <= MAX_BACKENDS);
    let mut s = Service::empty(id);
    s.flags = SERVICE_ACTIVE;
    for (slot, addr) in backends.iter().enumerate() {
        s.backends[slot] = Backend {
            addr: net_addr(*addr),
            port: BACKEND_PORT.to_be(),
            flags: if *addr == NODE { BACKEND_LOCAL } else { 0 },
        };
        s.ready[slot] = slot as u8;
    }
    s.backend_count = backends.len() as u32;
    s.ready_count = backends.len() as u32;
    s
}

/// The settings the fixtures start with: node 198.18.0.1, SNAT range
/// 20000-29999 split over the possible CPUs, every hold an hour except a
/// closing timeout of a minute (tests set the one they look at to 0 to make
/// it pass at once).
pub fn default_settings() -> Settings {
    const HOUR: u64 = 3_600_000_000_000;
    Settings {
        node_addr: net_addr(NODE),
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        snat_partitions: balancer_user::dataplane::snat_partitions(),
        snat_addr_count: 0,
        snat_addrs: [0; balancer_common::MAX_SNAT_ADDRS],
        holds: HoldTimes {
            idle_ns: HOUR,
            closing_ns: 60_000_000_000,
            close_grace_ns: HOUR,
            time_wait_ns: HOUR,
            embryonic_ns: HOUR,
        },
    }
}

/// The namespace of one dataplane: veths, addresses, neighbours.
struct FixtureNet {
    ns: Netns,
}

impl FixtureNet {
    fn create() -> Result<Self> {
        let ns = Netns::create(&unique_prefix("fx"))?;
        let mac = |m: &Mac| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        for (a, am, b, bm, addr) in [
            ("fx0", FX0_MAC, "fx1", FX1_MAC, "198.18.0.1/24"),
            ("fy0", FY0_MAC, "fy1", FY1_MAC, "198.18.1.1/24"),
        ] {
            ns.ip(&[
                "link",
                "add",
                a,
                "address",
                &mac(&am),
                "type",
                "veth",
                "peer",
                "name",
                b,
                "address",
                &mac(&bm),
            ])?;
            ns.ip(&["addr", "add", addr, "dev", a])?;
            ns.ip(&["link", "set", a, "up"])?;
            ns.ip(&["link", "set", b, "up"])?;
        }
        ns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        ns.sysctl("net.ipv4.conf.fx0.forwarding", "1")?;
        ns.sysctl("net.ipv4.conf.fy0.forwarding", "1")?;
        let mut neighbours: Vec<(Ipv4Addr, &str)> = vec![(CLIENT, "fx0"), (FAR_BACKEND, "fy0")];
        neighbours.extend((0..MAX_BACKENDS).map(|i| (backend(i), "fx0")));
        for (addr, dev) in neighbours {
            ns.ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac(&mac_of(addr)),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        Ok(FixtureNet { ns })
    }
}

/// The loaded program and its maps, on a thread inside the fixture
/// namespace pinned to one CPU.
pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    settings: Array<MapData, Settings>,
    conntrack: HashMap<MapData, FlowKey, FlowEntry>,
    counters: PerCpuArray<MapData, u64>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    /// Interface index of fx0.
    pub fx0: u32,
    /// Interface index of fy0.
    pub fy0: u32,
    /// The CPU every test run of this dataplane executes on.
    pub cpu: usize,
}

/// Creates a fixture namespace, enters it on a new thread pinned to one
/// CPU, loads the program with [`default_settings`] and no services, and
/// runs `f`. The namespace is deleted when this returns, also on failure.
pub fn with_dataplane<F>(f: F) -> Result<()>
where
    F: FnOnce(&mut Dataplane) -> Result<()> + Send + 'static,
{
    with_dataplane_sized(CONNTRACK_ENTRIES, f)
}

/// [`with_dataplane`] with a conntrack table of `conntrack_entries`
/// entries, returning what `f` returns (the per-packet benchmark needs room
/// for many flows and brings its figures back).
pub fn with_dataplane_sized<F, R>(conntrack_entries: u32, f: F) -> Result<R>
where
    F: FnOnce(&mut Dataplane) -> Result<R> + Send + 'static,
    R: Send + 'static,
{
    let net = FixtureNet::create()?;
    net.ns.run_in(move || -> Result<R> {
        let mut dp = Dataplane::load(conntrack_entries)?;
        f(&mut dp)
    })?
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn sum_u64(values: &[u64]) -> u64 {
    values.iter().sum()
}

impl Dataplane {
    fn load(conntrack_entries: u32) -> Result<Self> {
        let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0);
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).context("CPU set")?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .context("pin the fixture thread to one CPU")?;

        let fx0 = nix::net::if_::if_nametoindex("fx0").context("ifindex of fx0")?;
        let fy0 = nix::net::if_::if_nametoindex("fy0").context("ifindex of fy0")?;

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::CONNTRACK, conntrack_entries)
            .load(balancer_user::BPF_OBJECT)
            .context("load the XDP object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROG_BALANCER)
            .context("program `balancer` missing")?
            .try_into()?;
        prog.load().context("load (verify) program `balancer`")?;
        let pass: &mut Xdp = ebpf
            .program_mut(names::PROG_PASS)
            .context("program `xdp_pass` missing")?
            .try_into()?;
        pass.load().context("load (verify) program `xdp_pass`")?;

        let mut dp = Dataplane {
            services: take(&mut ebpf, names::SERVICES)?,
            settings: take(&mut ebpf, names::SETTINGS)?,
            conntrack: take(&mut ebpf, names::CONNTRACK)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            ebpf,
            fx0,
            fy0,
            cpu,
        };
        dp.set_settings(default_settings())?;
        Ok(dp)
    }

    pub fn set_settings(&mut self, s: Settings) -> Result<()> {
        self.settings.set(0, s, 0).context("write SETTINGS")
    }

    pub fn settings(&self) -> Result<Settings> {
        Ok(self.settings.get(&0, 0)?)
    }

    /// Installs (or replaces) the service at `vip:port`.
    pub fn set_service(&mut self, vip: Ipv4Addr, port: u16, s: &Service) -> Result<()> {
        let key = ServiceKey {
            vip: net_addr(vip),
            port: port.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        self.services.insert(key, s, 0).context("write SERVICES")
    }

    /// Installs `s` at [`VIP`]:[`VIP_PORT`].
    pub fn set_vip_service(&mut self, s: &Service) -> Result<()> {
        self.set_service(VIP, VIP_PORT, s)
    }

    fn ifindex(&self, ingress: Ingress) -> u32 {
        match ingress {
            Ingress::Fx0 => self.fx0,
            Ingress::Fy0 => self.fy0,
        }
    }

    /// Runs, at the same time on each CPU of `jobs` (one thread per job,
    /// pinned to its CPU with `sched_setaffinity`), that job's frames in
    /// order, each arriving on fx0. `next(cpu, i, previous outcomes)` gives
    /// frame `i` of the job, `None` to end it, so a job can react to what
    /// its own earlier runs did. Returns each job's outcomes. Threads
    /// spawned here inherit the fixture namespace of the calling thread.
    pub fn run_concurrently<F>(&self, cpus: &[usize], next: F) -> Result<Vec<Vec<Outcome>>>
    where
        F: Fn(usize, usize, &[Outcome]) -> Option<Vec<u8>> + Sync,
    {
        let start = std::sync::Barrier::new(cpus.len());
        std::thread::scope(|scope| {
            let handles: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    let (start, next) = (&start, &next);
                    scope.spawn(move || -> Result<Vec<Outcome>> {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(cpu).context("CPU set")?;
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                            .with_context(|| format!("pin a thread to CPU {cpu}"))?;
                        start.wait();
                        let mut outcomes = Vec::new();
                        while let Some(frame) = next(cpu, outcomes.len(), &outcomes) {
                            outcomes.push(self.try_run(&frame, Ingress::Fx0)?);
                        }
                        Ok(outcomes)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a test-run thread panicked"))?
                })
                .collect()
        })
    }

    /// One `BPF_PROG_TEST_RUN` of `input` arriving on `ingress`. The kernel
    /// refuses frames shorter than an Ethernet header (EINVAL).
    pub fn try_run(&self, input: &[u8], ingress: Ingress) -> Result<Outcome, ProgramError> {
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex }: data_end must equal the input
        // length; the ingress device decides the FIB lookup's namespace.
        let md: [u32; 6] = [0, input.len() as u32, 0, self.ifindex(ingress), 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; input.len() + 256];
        let prog: &Xdp = self
            .ebpf
            .program(names::PROG_BALANCER)
            .expect("program present since load")
            .try_into()
            .expect("program is XDP");
        let r = prog.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Outcome {
            verdict: Verdict::from(r.return_value),
            frame: out,
        })
    }

    /// `repeat` back-to-back runs of `program` ([`names::PROG_BALANCER`] or
    /// [`names::PROG_PASS`]) on `input` in one `BPF_PROG_TEST_RUN`. The
    /// kernel runs every repetition on the same buffer, so a rewrite made by
    /// one run is the input of the next; the outcome is the last run's.
    pub fn timed_run(
        &self,
        program: &str,
        input: &[u8],
        ingress: Ingress,
        repeat: u32,
    ) -> Result<TimedRun> {
        let md: [u32; 6] = [0, input.len() as u32, 0, self.ifindex(ingress), 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; input.len() + 256];
        let prog: &Xdp = self
            .ebpf
            .program(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        let started = std::time::Instant::now();
        let r = prog.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })?;
        let wall = started.elapsed();
        out.truncate(r.data_size_out as usize);
        Ok(TimedRun {
            outcome: Outcome {
                verdict: Verdict::from(r.return_value),
                frame: out,
            },
            kernel_ns_per_run: r.duration.as_nanos() as u64,
            wall,
        })
    }

    /// Inserts (or replaces) a conntrack entry.
    pub fn insert_flow(&mut self, key: FlowKey, entry: FlowEntry) -> Result<()> {
        self.conntrack
            .insert(key, entry, 0)
            .context("write CONNTRACK")
    }

    /// One pass of the agent's conntrack sweeper over this table.
    pub fn sweep(
        &mut self,
        timeouts: balancer_user::conntrack::FlowTimeouts,
    ) -> balancer_user::conntrack::SweepReport {
        balancer_user::conntrack::sweep(&mut self.conntrack, timeouts, CONNTRACK_ENTRIES as usize)
    }

    /// Removes every conntrack entry; returns how many there were.
    pub fn clear_flows(&mut self) -> Result<usize> {
        let keys = self
            .conntrack
            .keys()
            .collect::<Result<Vec<_>, MapError>>()?;
        for k in &keys {
            self.conntrack.remove(k).context("delete from CONNTRACK")?;
        }
        Ok(keys.len())
    }

    /// What the kernel says about a loaded program of the object (sizes,
    /// ids).
    pub fn program_info(&self, program: &str) -> Result<aya::programs::ProgramInfo> {
        let prog = self
            .ebpf
            .program(program)
            .with_context(|| format!("no program {program}"))?;
        Ok(prog.info()?)
    }

    pub fn run(&self, input: &Frame) -> Result<Outcome> {
        Ok(self.try_run(&input.build(), Ingress::Fx0)?)
    }

    /// Runs `case`; on a mismatch the error names the case and each field
    /// that differs. Rewritten frames (TX/REDIRECT) must also carry IP and
    /// TCP checksums that verify when recomputed from scratch.
    pub fn check(&self, case: &Case) -> Result<Outcome> {
        let before = match case.counts {
            Some(slot) => self.counter(slot)?,
            None => 0,
        };
        let observed = match self.try_run(&case.input, case.ingress) {
            Ok(o) => o,
            Err(e) => {
                return Err(CaseFailure {
                    description: case.description.clone(),
                    problems: vec![format!("test run failed: {e:#}")],
                    input: case.input.clone(),
                    observed: None,
                }
                .into())
            }
        };
        let mut problems = Vec::new();
        if observed.verdict != case.verdict {
            problems.push(format!(
                "verdict: observed {:?}, expected {:?}",
                observed.verdict, case.verdict
            ));
        }
        let expected = match &case.output {
            Expected::Unchanged => &case.input,
            Expected::Frame(f) => f,
        };
        problems.extend(field_diff(&observed.frame, expected));
        if matches!(observed.verdict, Verdict::Tx | Verdict::Redirect) {
            problems.extend(
                FrameView::checksum_errors(&observed.frame)
                    .into_iter()
                    .map(|e| format!("checksum recomputed from scratch: {e}")),
            );
        }
        if let Some(slot) = case.counts {
            let after = self.counter(slot)?;
            if after != before + 1 {
                problems.push(format!(
                    "counter {}: went from {before} to {after}, expected +1",
                    counter::NAMES[slot as usize]
                ));
            }
        }
        if problems.is_empty() {
            Ok(observed)
        } else {
            Err(CaseFailure {
                description: case.description.clone(),
                problems,
                input: case.input.clone(),
                observed: Some(observed),
            }
            .into())
        }
    }

    /// Runs every case in order and reports all failures together.
    pub fn check_table(&self, cases: &[Case]) -> Result<()> {
        let mut failures = Vec::new();
        for case in cases {
            if let Err(e) = self.check(case) {
                match e.downcast::<CaseFailure>() {
                    Ok(f) => failures.push(f),
                    Err(other) => return Err(other),
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TableFailure {
                total: cases.len(),
                failures,
            }
            .into())
        }
    }

    /// `COUNTERS[slot]` summed over CPUs.
    pub fn counter(&self, slot: u32) -> Result<u64> {
        Ok(sum_u64(&self.counters.get(&slot, 0)?))
    }

    /// All counters, by slot.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..counter::COUNT).map(|s| self.counter(s)).collect()
    }

    /// `BACKEND_STATS` of a service's backend slot, summed over CPUs.
    pub fn backend_stats(&self, service_id: u32, slot: u32) -> Result<TrafficStats> {
        let per_cpu = self
            .backend_stats
            .get(&backend_stats_index(service_id, slot), 0)?;
        Ok(per_cpu
            .iter()
            .fold(TrafficStats::default(), |a, s| TrafficStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                new_flows: a.new_flows + s.new_flows,
                replies: a.replies + s.replies,
            }))
    }

    /// The conntrack entry for packets from `src` to `dst`, if any.
    pub fn flow(&self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Result<Option<FlowEntry>> {
        match self.conntrack.get(&flow_key(src, dst), 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Number of conntrack entries.
    pub fn flow_count(&self) -> Result<usize> {
        let mut n = 0;
        for k in self.conntrack.keys() {
            k?;
            n += 1;
        }
        Ok(n)
    }

    /// Sends a SYN from `client` to the VIP service and returns the SNAT
    /// port and backend the program chose (read back from the forward
    /// conntrack entry, checked against the output frame and the SNAT
    /// range). The output must be a TX/redirect of the SYN.
    pub fn open_flow(&self, syn: &Frame) -> Result<NatFlow> {
        let ip = syn.ip().context("SYN is IPv4")?;
        let t = syn.tcp_segment().context("SYN is TCP")?;
        let client = (ip.src, t.sport);
        let vip = (ip.dst, t.dport);
        let out = self.run(syn)?;
        ensure!(
            matches!(out.verdict, Verdict::Tx | Verdict::Redirect),
            "SYN {client:?} -> {vip:?}: verdict {:?}",
            out.verdict
        );
        let fwd = self
            .flow(client, vip)?
            .with_context(|| format!("no forward conntrack entry for {client:?} -> {vip:?}"))?;
        let snat = u16::from_be(fwd.nat_sport);
        let settings = self.settings()?;
        ensure!(
            (settings.snat_port_min..=settings.snat_port_max).contains(&snat),
            "SNAT port {snat} outside {}..={}",
            settings.snat_port_min,
            settings.snat_port_max
        );
        let view = FrameView::parse(&out.frame)?;
        let oip = view.ipv4.context("output is IPv4")?;
        let otcp = oip.tcp.context("output is TCP")?;
        let backend = host_addr(fwd.nat_daddr);
        if (oip.dst, otcp.sport) != (backend, snat) {
            bail!(
                "output goes to {}:{} from port {}, conntrack says {backend} port {snat}",
                oip.dst,
                otcp.dport,
                otcp.sport
            );
        }
        Ok(NatFlow {
            client,
            vip,
            snat,
            backend: (backend, u16::from_be(fwd.nat_dport)),
            slot: fwd.backend_slot,
            output: out,
        })
    }
}

/// A repeated test run: the last run's outcome, the kernel's mean time per
/// run (whole nanoseconds, as `BPF_PROG_TEST_RUN` reports it) and the wall
/// time of the whole system call.
#[derive(Clone, Debug)]
pub struct TimedRun {
    pub outcome: Outcome,
    pub kernel_ns_per_run: u64,
    pub wall: std::time::Duration,
}

/// A flow the program NATed: who talks to whom through which SNAT port.
#[derive(Clone, Debug)]
pub struct NatFlow {
    pub client: (Ipv4Addr, u16),
    pub vip: (Ipv4Addr, u16),
    pub snat: u16,
    pub backend: (Ipv4Addr, u16),
    pub slot: u8,
    /// The test run that opened it.
    pub output: Outcome,
}

impl NatFlow {
    /// This node's side of the flow towards the backend.
    pub fn node(&self) -> (Ipv4Addr, u16) {
        (NODE, self.snat)
    }
}
