//! End to end in the namespace lab ([`crate::lab`]): `redis-benchmark` in
//! the client namespace against
//!
//! - (a) node 2's KeyDB directly,
//! - (b) the VIP through our data plane (agent on node 1, native or
//!   generic XDP as [`LabXdp`] says; node 1's KeyDB is the local backend,
//!   node 2's the remote, NATed one),
//! - (c) the VIP through HAProxy on node 1 ([`super::haproxy`]),
//! - and, as a diagnostic, (b′) the VIP through our data plane with node 2
//!   as the only backend: every connection NATed, one server busy, as in
//!   (a). Against (a) it isolates the cost of the NAT path from that of
//!   sharing the machine's two CPUs with a second busy server.
//!
//! One lab serves all three. Only one of agent and HAProxy runs at a time,
//! both on the same VIP (198.18.0.100:6380 on node 1's eth0): the agent
//! adds the VIP itself; for HAProxy it is added with `ip addr`. Node 1's
//! KeyDB listens on 0.0.0.0:6380 for (a) and (b) (the local backend
//! answers on the VIP) and is re-bound to 198.18.0.1:6380 with `CONFIG SET
//! bind` for (c), so HAProxy can bind VIP:6380; the data stays.
//!
//! Every round runs a, b, b′, c in that order, each with every workload. CPU
//! is sampled around each `redis-benchmark` run: the XDP program's kernel
//! run time (BPF stats on during (b) only) and the agent's process time,
//! HAProxy's process time, and the machine's busy time.

use std::{
    collections::{HashMap, HashSet},
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    lab::{node_addr, node_keydb, run_with_timeout, vip_keydb, AgentConfig, Lab, VIP},
    netns::run,
    resp::{Connection, Value},
};

use super::{
    cpu::{bpf_stats_sysctl, xdp_prog_id, BpfStats, MachineCpu, ProcessCpu, ProgramRunTime},
    haproxy::{CheckTiming, Haproxy, HaproxyConfig},
    redis_benchmark::{parse_csv, TestResult, Workload},
};

/// Timeout of every connect, read and write of the harness's own clients.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a freshly started balancer may take to serve the VIP.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The key redis-benchmark's GET and SET use (no `-r`).
const BENCH_KEY: &str = "key:__rand_int__";

/// How much to run, and how the lab is set up.
#[derive(Clone, Debug)]
pub struct LabPlan {
    pub rounds: usize,
    pub quick: bool,
    /// How node 1 runs the XDP program (and whether the bridge ports need
    /// the XDP_PASS program).
    pub xdp: LabXdp,
    /// CPU placement of the client and of the nodes' processes.
    pub placement: Placement,
}

/// How the lab runs our data plane. The choice applies to the whole lab,
/// so (a) and (c) see the same virtual switch as (b).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabXdp {
    /// Native (driver) XDP on node 1's veth, and the `xdp_pass` program on
    /// every bridge port, which native XDP_TX needs (TOOLCHAIN.md): the
    /// lab of `cargo xtask test`.
    Native,
    /// Generic (skb) XDP on node 1 (`xdp_mode = "generic"`) and no program
    /// on the bridge ports: every port is a plain veth.
    Generic,
}

impl LabXdp {
    /// The agent's `[dataplane] xdp_mode`.
    pub fn agent_mode(self) -> &'static str {
        match self {
            LabXdp::Native => "native",
            LabXdp::Generic => "generic",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            LabXdp::Native => "native XDP on node 1, `xdp_pass` on every bridge port",
            LabXdp::Generic => "generic (skb) XDP on node 1, no XDP program on the bridge ports",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(LabXdp::Native),
            "generic" => Some(LabXdp::Generic),
            _ => None,
        }
    }

    /// Builds a 2-node lab set up for this mode.
    pub fn lab(self, tag: &str) -> Result<Lab> {
        let mut lab = Lab::new(tag, 2)?;
        if self == LabXdp::Generic {
            lab.detach_port_xdp();
        }
        Ok(lab)
    }
}

/// Where the lab's busy processes run: `taskset -c` CPU lists for the
/// client (redis-benchmark) and for the nodes' processes (servers,
/// HAProxy); `None` leaves that side to the scheduler. Softirq work
/// follows the sender (veth transmits run the peer's receive path on the
/// sending CPU), so the client's CPU also carries the requests' trip
/// through the virtual switch and the XDP program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub client: Option<String>,
    pub nodes: Option<String>,
}

impl Placement {
    /// `--pin`: redis-benchmark alone on the last CPU, everything of the
    /// nodes on the rest.
    pub fn split(cpus: usize) -> Option<Self> {
        if cpus < 2 {
            return None;
        }
        Some(Placement {
            client: Some((cpus - 1).to_string()),
            nodes: Some(if cpus == 2 {
                "0".into()
            } else {
                format!("0-{}", cpus - 2)
            }),
        })
    }

    pub fn is_none(&self) -> bool {
        self.client.is_none() && self.nodes.is_none()
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        match (&self.client, &self.nodes) {
            (None, None) => "left to the scheduler".into(),
            (Some(c), None) => format!(
                "redis-benchmark pinned to CPU {c} with taskset, everything else left to the scheduler"
            ),
            (None, Some(n)) => format!(
                "the nodes' servers and HAProxy pinned to CPU {n} with taskset, redis-benchmark left to the scheduler"
            ),
            (Some(c), Some(n)) => format!(
                "pinned with taskset, redis-benchmark on CPU {c}, the nodes' servers and HAProxy on CPU {n}"
            ),
        }
    }
}

/// Who answers the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Direct,
    Xdp,
    XdpRemoteOnly,
    Haproxy,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Xdp, Mode::XdpRemoteOnly, Mode::Haproxy];

    pub fn letter(self) -> &'static str {
        match self {
            Mode::Direct => "a",
            Mode::Xdp => "b",
            Mode::XdpRemoteOnly => "b′",
            Mode::Haproxy => "c",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mode::Direct => "direct to node 2's KeyDB",
            Mode::Xdp => "VIP through our XDP data plane (node 1)",
            Mode::XdpRemoteOnly => "VIP through XDP, node 2 the only backend",
            Mode::Haproxy => "VIP through HAProxy (node 1)",
        }
    }

    fn target(self) -> SocketAddr {
        match self {
            Mode::Direct => node_keydb(2),
            Mode::Xdp | Mode::XdpRemoteOnly | Mode::Haproxy => vip_keydb(),
        }
    }

    /// The nodes whose servers answer through this mode.
    fn serving_nodes(self) -> &'static [usize] {
        match self {
            Mode::Direct | Mode::XdpRemoteOnly => &[2],
            Mode::Xdp | Mode::Haproxy => &[1, 2],
        }
    }
}

/// CPU the balancer on node 1 spent during one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BalancerCpu {
    /// (a): no balancer on the path.
    None,
    /// (b), (b′): the XDP program (kernel BPF statistics) and the agent
    /// process.
    Xdp {
        program: ProgramRunTime,
        agent: Duration,
    },
    /// (c): the HAProxy process (user + system).
    Haproxy { process: Duration },
}

/// One `redis-benchmark` run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub round: usize,
    pub mode: Mode,
    pub workload: Workload,
    /// Requests per test (`-n`).
    pub requests: u32,
    pub tests: Vec<TestResult>,
    pub elapsed: Duration,
    pub machine: MachineCpu,
    pub balancer: BalancerCpu,
}

impl Sample {
    /// Requests of every test of the run together.
    pub fn total_requests(&self) -> u64 {
        u64::from(self.requests) * self.tests.len() as u64
    }

    /// Busy share of all the machine's CPUs during the run (1.0: saturated).
    pub fn utilisation(&self) -> f64 {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        self.machine.busy.as_secs_f64() / (self.elapsed.as_secs_f64() * cpus)
    }
}

/// Everything the lab runs produced.
#[derive(Clone, Debug)]
pub struct LabResults {
    pub plan: LabPlan,
    pub samples: Vec<Sample>,
    /// `kernel.bpf_stats_enabled` before, during (b) and after.
    pub bpf_stats_sysctl: (String, String, String),
    pub haproxy_config: String,
    /// `/proc/loadavg` before and after (other users of the machine).
    pub loadavg: (String, String),
    pub elapsed: Duration,
}

/// The balancer of the mode being measured, running.
enum Serving {
    Direct,
    Xdp {
        _stats: BpfStats,
        prog_id: u32,
        agent_pid: u32,
    },
    Haproxy(Haproxy),
}

/// Runs the rounds; `interrupted` is polled between runs.
pub fn run_lab(plan: LabPlan, interrupted: &dyn Fn() -> bool) -> Result<LabResults> {
    let started = Instant::now();
    let loadavg_before = loadavg();
    let mut lab = plan.xdp.lab("B")?;
    lab.start_servers()?;
    if let Some(cpus) = &plan.placement.nodes {
        for node in 1..=2 {
            let ns = lab.node(node).ns().name().to_string();
            for pid in pids_named(&ns, &[crate::lab::keydb_server_program()])? {
                run("taskset", &["-a", "-p", "-c", cpus, &pid.to_string()])?;
            }
        }
    }
    let run_ids = lab.in_client(|| -> Result<HashMap<String, usize>> {
        let mut ids = HashMap::new();
        for node in 1..=2 {
            ids.insert(
                Connection::connect(node_keydb(node), IO_TIMEOUT)?.run_id()?,
                node,
            );
        }
        Ok(ids)
    })??;
    ensure!(run_ids.len() == 2, "both servers report the same run_id");
    let haproxy_config = haproxy_config(CheckTiming::default(), None);
    let before = bpf_stats_sysctl().unwrap_or_else(|| "?".into());
    let mut during = String::from("?");
    let mut samples = Vec::new();
    for round in 1..=plan.rounds {
        for mode in Mode::ALL {
            if interrupted() {
                bail!("interrupted");
            }
            let mut serving = start(&mut lab, mode, &haproxy_config, &plan)?;
            if matches!(serving, Serving::Xdp { .. }) {
                during = bpf_stats_sysctl().unwrap_or_else(|| "?".into());
            }
            if mode != Mode::Direct {
                wait_serving(&lab, &mut serving, &run_ids, mode.serving_nodes())?;
            }
            for workload in Workload::ALL {
                if interrupted() {
                    bail!("interrupted");
                }
                let sample = run_one(&lab, &mut serving, round, mode, workload, &plan)
                    .with_context(|| {
                        format!(
                            "round {round}, ({}) {}, {workload:?}",
                            mode.letter(),
                            mode.describe()
                        )
                    })?;
                println!(
                    "  round {round} ({}) {:<41} {}",
                    mode.letter(),
                    mode.describe(),
                    sample
                        .tests
                        .iter()
                        .map(|t| format!(
                            "{}: {:.0} req/s p50 {:.3} ms p99 {:.3} ms",
                            workload.label(&t.test),
                            t.rps,
                            t.p50_ms,
                            t.p99_ms
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                samples.push(sample);
            }
            stop(&mut lab, serving)?;
        }
    }
    let after = bpf_stats_sysctl().unwrap_or_else(|| "?".into());
    drop(lab);
    Ok(LabResults {
        plan,
        samples,
        bpf_stats_sysctl: (before, during, after),
        haproxy_config: haproxy_config.to_config(),
        loadavg: (loadavg_before, loadavg()),
        elapsed: started.elapsed(),
    })
}

/// The HAProxy config of the lab: VIP:6380 over both nodes' KeyDBs.
pub fn haproxy_config(
    check: CheckTiming,
    stats_socket: Option<std::path::PathBuf>,
) -> HaproxyConfig {
    HaproxyConfig {
        bind: match vip_keydb() {
            SocketAddr::V4(v) => v,
            SocketAddr::V6(_) => unreachable!("the lab's VIP is IPv4"),
        },
        backends: (1..=2)
            .map(|i| SocketAddrV4::new(node_addr(i), crate::lab::KEYDB_PORT))
            .collect(),
        check,
        stats_socket,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Sends one command to node `index`'s KeyDB from the client namespace.
fn command_on(lab: &Lab, index: usize, args: Vec<String>) -> Result<Value> {
    let target = SocketAddr::V4(SocketAddrV4::new(node_addr(index), 6380));
    lab.in_client(move || -> Result<Value> {
        let mut c = Connection::connect(target, IO_TIMEOUT)?;
        Ok(c.command(&args)?)
    })?
}

/// Re-binds node `index`'s KeyDB to `addrs` (`CONFIG SET bind`); its data
/// and its open connections stay. Binding it to the node's own address
/// frees VIP:6380 for an HAProxy on the same node.
pub fn config_set_bind(lab: &Lab, index: usize, addrs: &str) -> Result<()> {
    let reply = command_on(
        lab,
        index,
        vec!["CONFIG".into(), "SET".into(), "bind".into(), addrs.into()],
    )?;
    ensure!(
        matches!(&reply, Value::Status(s) if s == "OK"),
        "CONFIG SET bind {addrs} on node {index} answered {reply:?} (needs redis-server >= 7.0)"
    );
    Ok(())
}

fn start(lab: &mut Lab, mode: Mode, haproxy: &HaproxyConfig, plan: &LabPlan) -> Result<Serving> {
    match mode {
        Mode::Direct => Ok(Serving::Direct),
        Mode::Xdp | Mode::XdpRemoteOnly => {
            let stats = BpfStats::enable()?;
            let mut config = AgentConfig::for_lab(lab, true);
            config.xdp_mode = plan.xdp.agent_mode().into();
            if mode == Mode::XdpRemoteOnly {
                config.backends.retain(|b| *b.ip() == node_addr(2));
            }
            lab.start_agent(1, &config)?;
            let ns = lab.node(1).ns();
            let prog_id = xdp_prog_id(&ns.ip(&["-j", "-d", "link", "show", "dev", "eth0"])?)?;
            let agent_pid = *pids_named(ns.name(), &["balancer"])?
                .first()
                .context("no process named balancer in node 1's namespace")?;
            Ok(Serving::Xdp {
                _stats: stats,
                prog_id,
                agent_pid,
            })
        }
        Mode::Haproxy => {
            config_set_bind(lab, 1, &node_addr(1).to_string())?;
            lab.node(1)
                .ns()
                .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])?;
            let h = Haproxy::start(
                lab.node(1),
                haproxy,
                lab.dir(),
                plan.placement.nodes.as_deref(),
            )?;
            Ok(Serving::Haproxy(h))
        }
    }
}

fn stop(lab: &mut Lab, serving: Serving) -> Result<()> {
    match serving {
        Serving::Direct => Ok(()),
        Serving::Xdp { .. } => {
            let status = lab.stop_agent(1)?;
            ensure!(
                status.success(),
                "agent exited with {status}:\n{}",
                lab.agent_log_tail(1, 30)
            );
            Ok(())
        }
        Serving::Haproxy(h) => {
            h.stop()?;
            lab.node(1)
                .ns()
                .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "eth0"])?;
            config_set_bind(lab, 1, "0.0.0.0")
        }
    }
}

/// Pids of the processes in namespace `ns` whose command name is one of
/// `names`.
fn pids_named(ns: &str, names: &[&str]) -> Result<Vec<u32>> {
    let pids = run("ip", &["netns", "pids", ns])?;
    let mut found = Vec::new();
    for pid in pids.split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if names.contains(&comm.trim()) {
            found.push(pid.parse().context("pid")?);
        }
    }
    Ok(found)
}

/// Waits until new connections to the VIP reach exactly the servers of
/// `expected` nodes.
fn wait_serving(
    lab: &Lab,
    serving: &mut Serving,
    run_ids: &HashMap<String, usize>,
    expected: &[usize],
) -> Result<()> {
    let expected: HashSet<usize> = expected.iter().copied().collect();
    wait_reaching(lab, vip_keydb(), run_ids, &expected, || {
        if let Serving::Haproxy(h) = serving {
            h.ensure_running()?;
        }
        Ok(())
    })
}

/// Waits (up to [`READY_TIMEOUT`]) until six new connections in a row to
/// `target` all succeed and reach exactly the servers of the `expected`
/// nodes (told apart by `run_ids`); `before_each` runs before every try
/// (to notice a front that died).
pub(super) fn wait_reaching(
    lab: &Lab,
    target: SocketAddr,
    run_ids: &HashMap<String, usize>,
    expected: &HashSet<usize>,
    mut before_each: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        before_each()?;
        let seen = lab.in_client(move || -> Vec<Result<String, String>> {
            (0..6)
                .map(|_| {
                    Connection::connect(target, IO_TIMEOUT)
                        .and_then(|mut c| c.run_id())
                        .map_err(|e| e.to_string())
                })
                .collect()
        })?;
        let nodes: HashSet<usize> = seen
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter_map(|id| run_ids.get(id).copied())
            .collect();
        if &nodes == expected && seen.iter().all(|r| r.is_ok()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "new connections to {target} did not reach exactly nodes {expected:?} within {READY_TIMEOUT:?}: {seen:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU counters around one run.
struct Counters {
    machine: MachineCpu,
    program: Option<ProgramRunTime>,
    process: Option<ProcessCpu>,
}

fn counters(serving: &Serving) -> Result<Counters> {
    Ok(match serving {
        Serving::Direct => Counters {
            machine: MachineCpu::now()?,
            program: None,
            process: None,
        },
        Serving::Xdp {
            prog_id, agent_pid, ..
        } => Counters {
            machine: MachineCpu::now()?,
            program: Some(ProgramRunTime::of(*prog_id)?),
            process: Some(ProcessCpu::of(*agent_pid)?),
        },
        Serving::Haproxy(h) => Counters {
            machine: MachineCpu::now()?,
            program: None,
            process: Some(h.cpu()?),
        },
    })
}

fn run_one(
    lab: &Lab,
    serving: &mut Serving,
    round: usize,
    mode: Mode,
    workload: Workload,
    plan: &LabPlan,
) -> Result<Sample> {
    let quick = plan.quick;
    // The key GET reads holds the workload's value size on both servers.
    let value = "x".repeat(workload.value_size());
    for node in 1..=2 {
        let reply = command_on(
            lab,
            node,
            vec!["SET".into(), BENCH_KEY.into(), value.clone()],
        )?;
        ensure!(
            matches!(&reply, Value::Status(s) if s == "OK"),
            "SET on node {node}: {reply:?}"
        );
    }
    let requests = workload.requests(quick);
    let total = u64::from(requests) * workload.tests().len() as u64;
    // Bounded: even at 2,000 requests/s the run ends well before this.
    let timeout = Duration::from_secs(30 + total / 2_000);
    let mut cmd = match &plan.placement.client {
        Some(cpus) => {
            let mut c = lab.client().command("taskset");
            c.args(["-c", cpus, "redis-benchmark"]);
            c
        }
        None => lab.client().command("redis-benchmark"),
    };
    cmd.args(workload.args(mode.target(), requests));

    let before = counters(serving)?;
    let started = Instant::now();
    let out = run_with_timeout(&mut cmd, timeout)?;
    let elapsed = started.elapsed();
    let after = counters(serving)?;

    if let Serving::Haproxy(h) = serving {
        h.ensure_running()?;
    }
    let tests = parse_csv(&out)?;
    let names: Vec<&str> = tests.iter().map(|t| t.test.as_str()).collect();
    ensure!(
        names == workload.tests(),
        "redis-benchmark ran tests {names:?}, expected {:?}:\n{out}",
        workload.tests()
    );
    let balancer = match (after.program, before.program, after.process, before.process) {
        (Some(p1), Some(p0), Some(a1), Some(a0)) => {
            let program = p1.since(&p0);
            // Pipelined requests share packets: at least one packet per
            // 16 requests must have crossed the program.
            ensure!(
                program.run_count >= total / 16,
                "the XDP program ran {} times for {total} requests: traffic bypassed it, or BPF stats are off",
                program.run_count
            );
            BalancerCpu::Xdp {
                program,
                agent: a1.total().saturating_sub(a0.total()),
            }
        }
        (None, None, Some(h1), Some(h0)) => BalancerCpu::Haproxy {
            process: h1.total().saturating_sub(h0.total()),
        },
        _ => BalancerCpu::None,
    };
    Ok(Sample {
        round,
        mode,
        workload,
        requests,
        tests,
        elapsed,
        machine: after.machine.since(&before.machine),
        balancer,
    })
}
