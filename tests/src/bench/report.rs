//! The benchmark's outputs: medians and ratios over the rounds
//! ([`Summary`]), the Markdown report, the table printed to the terminal,
//! the raw results as JSON and an SVG chart drawn with plotters.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context, Result};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{
    churn::{self, ChurnResults, Front},
    failover::{self, FailoverStatus},
    lab_run::{BalancerCpu, LabResults, Mode, Sample},
    packet_cost::{Method, PacketCost},
    redis_benchmark::Workload,
    storm::{self, StormResults},
};

/// Medians over the rounds of one mode for one test row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModeFigures {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rounds: usize,
}

/// One report row: a test of a workload in every mode.
#[derive(Clone, Debug)]
pub struct Row {
    pub label: String,
    pub short: String,
    pub modes: BTreeMap<Mode, ModeFigures>,
}

impl Row {
    /// The figures of mode `m`; NaN (printed as a dash) if it did not run.
    fn get(&self, m: Mode) -> ModeFigures {
        self.modes.get(&m).copied().unwrap_or(ModeFigures {
            rps: f64::NAN,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            rounds: 0,
        })
    }

    pub fn rps_ratio(&self, num: Mode, den: Mode) -> f64 {
        self.get(num).rps / self.get(den).rps
    }

    pub fn p99_ratio(&self, num: Mode, den: Mode) -> f64 {
        self.get(num).p99_ms / self.get(den).p99_ms
    }
}

/// Balancer CPU per 100k requests of one workload (medians over rounds).
#[derive(Clone, Debug)]
pub struct CpuRow {
    pub label: String,
    pub short: String,
    pub requests_per_run: u64,
    pub xdp_us: f64,
    pub agent_us: f64,
    pub haproxy_us: f64,
    pub packets_per_request: f64,
    /// Machine busy time per request, µs, by mode.
    pub machine_us: BTreeMap<Mode, f64>,
    /// Busy share of all CPUs during the run, by mode.
    pub utilisation: BTreeMap<Mode, f64>,
}

impl CpuRow {
    pub fn xdp_over_haproxy(&self) -> f64 {
        self.xdp_us / self.haproxy_us
    }
    pub fn with_agent_over_haproxy(&self) -> f64 {
        (self.xdp_us + self.agent_us) / self.haproxy_us
    }
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub rows: Vec<Row>,
    pub cpu: Vec<CpuRow>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn short_label(w: Workload, test: &str) -> String {
    match w {
        Workload::SetGet => format!("{test} c50"),
        Workload::GetPipelined => "GET P16 c50".into(),
        Workload::GetKib => "GET 1KiB c200".into(),
    }
}

fn per_100k(d: std::time::Duration, requests: u64) -> f64 {
    d.as_nanos() as f64 / 1_000.0 / requests.max(1) as f64 * 100_000.0
}

/// Medians and ratios of the lab runs.
pub fn summarize(lab: &LabResults) -> Summary {
    let mut rows = Vec::new();
    let mut cpu = Vec::new();
    for w in Workload::ALL {
        let of = |m: Mode| -> Vec<&Sample> {
            lab.samples
                .iter()
                .filter(|s| s.workload == w && s.mode == m)
                .collect()
        };
        for test in w.tests() {
            let mut modes = BTreeMap::new();
            for m in Mode::ALL {
                let results: Vec<_> = of(m)
                    .iter()
                    .filter_map(|s| s.tests.iter().find(|t| t.test == *test))
                    .cloned()
                    .collect();
                if results.is_empty() {
                    continue;
                }
                modes.insert(
                    m,
                    ModeFigures {
                        rps: median(results.iter().map(|r| r.rps).collect()),
                        p50_ms: median(results.iter().map(|r| r.p50_ms).collect()),
                        p99_ms: median(results.iter().map(|r| r.p99_ms).collect()),
                        rounds: results.len(),
                    },
                );
            }
            rows.push(Row {
                label: w.label(test),
                short: short_label(w, test),
                modes,
            });
        }
        let xdp: Vec<&Sample> = of(Mode::Xdp);
        let ha: Vec<&Sample> = of(Mode::Haproxy);
        let mut machine = BTreeMap::new();
        let mut utilisation = BTreeMap::new();
        for m in Mode::ALL {
            machine.insert(
                m,
                median(
                    of(m)
                        .iter()
                        .map(|s| per_100k(s.machine.busy, s.total_requests()) / 100_000.0)
                        .collect(),
                ),
            );
            utilisation.insert(m, median(of(m).iter().map(|s| s.utilisation()).collect()));
        }
        let pick = |s: &Sample| match s.balancer {
            BalancerCpu::Xdp { program, agent } => Some((program, agent)),
            _ => None,
        };
        cpu.push(CpuRow {
            label: match w {
                Workload::SetGet => "SET + GET, 50 clients".into(),
                _ => w.label("GET"),
            },
            short: match w {
                Workload::SetGet => "SET+GET c50".into(),
                _ => short_label(w, "GET"),
            },
            requests_per_run: u64::from(w.requests(lab.plan.quick)) * w.tests().len() as u64,
            xdp_us: median(
                xdp.iter()
                    .filter_map(|s| pick(s).map(|(p, _)| per_100k(p.run_time, s.total_requests())))
                    .collect(),
            ),
            agent_us: median(
                xdp.iter()
                    .filter_map(|s| pick(s).map(|(_, a)| per_100k(a, s.total_requests())))
                    .collect(),
            ),
            haproxy_us: median(
                ha.iter()
                    .filter_map(|s| match s.balancer {
                        BalancerCpu::Haproxy { process } => {
                            Some(per_100k(process, s.total_requests()))
                        }
                        _ => None,
                    })
                    .collect(),
            ),
            packets_per_request: median(
                xdp.iter()
                    .filter_map(|s| {
                        pick(s).map(|(p, _)| p.run_count as f64 / s.total_requests() as f64)
                    })
                    .collect(),
            ),
            machine_us: machine,
            utilisation,
        });
    }
    Summary { rows, cpu }
}

fn f(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "–".into()
    }
}

fn rps(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "–".into()
    }
}

/// The throughput and latency table (Markdown; also printed).
pub fn throughput_table(s: &Summary) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| workload | (a) direct req/s | (b) XDP req/s | (c) HAProxy req/s | b/a | c/a | b/c | p50 ms a / b / c | p99 ms a / b / c | p99 b/a |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &s.rows {
        let (a, b, c) = (r.get(Mode::Direct), r.get(Mode::Xdp), r.get(Mode::Haproxy));
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} / {} / {} | {} |",
            r.label,
            rps(a.rps),
            rps(b.rps),
            rps(c.rps),
            f(r.rps_ratio(Mode::Xdp, Mode::Direct), 2),
            f(r.rps_ratio(Mode::Haproxy, Mode::Direct), 2),
            f(r.rps_ratio(Mode::Xdp, Mode::Haproxy), 2),
            f(a.p50_ms, 3),
            f(b.p50_ms, 3),
            f(c.p50_ms, 3),
            f(a.p99_ms, 3),
            f(b.p99_ms, 3),
            f(c.p99_ms, 3),
            f(r.p99_ratio(Mode::Xdp, Mode::Direct), 2),
        );
    }
    t
}

/// Balancer CPU per 100k requests (Markdown; also printed).
pub fn cpu_table(s: &Summary) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| workload | requests per run | (b) XDP program µs/100k req | (b) agent process µs/100k | (c) HAProxy process µs/100k | XDP / HAProxy | (XDP + agent) / HAProxy | packets through XDP per request |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &s.cpu {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.requests_per_run,
            f(r.xdp_us, 0),
            f(r.agent_us, 0),
            f(r.haproxy_us, 0),
            f(r.xdp_over_haproxy(), 3),
            f(r.with_agent_over_haproxy(), 3),
            f(r.packets_per_request, 2),
        );
    }
    t
}

/// The whole machine during each mode: busy time per request and how
/// saturated the CPUs were (Markdown; also printed).
pub fn machine_table(s: &Summary) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| workload | machine busy µs/request a / b / b′ / c | CPU utilisation a / b / b′ / c |"
    );
    let _ = writeln!(t, "|---|---:|---:|");
    for r in &s.cpu {
        let join = |map: &BTreeMap<Mode, f64>, digits: usize, scale: f64| {
            Mode::ALL
                .iter()
                .map(|m| f(map.get(m).copied().unwrap_or(f64::NAN) * scale, digits))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} |",
            r.label,
            join(&r.machine_us, 1, 1.0),
            join(&r.utilisation, 0, 100.0)
                .split(" / ")
                .map(|v| format!("{v}%"))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    t
}

/// The diagnostic mode (b′) next to (a) and (b) (Markdown; also printed).
pub fn diagnostic_table(s: &Summary) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| workload | (a) direct req/s | (b′) XDP, all NATed to node 2, req/s | b′/a | p50 ms a / b′ | p99 ms a / b′ | p99 b′/a |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|");
    for r in &s.rows {
        let (a, d) = (r.get(Mode::Direct), r.get(Mode::XdpRemoteOnly));
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} / {} | {} / {} | {} |",
            r.label,
            rps(a.rps),
            rps(d.rps),
            f(r.rps_ratio(Mode::XdpRemoteOnly, Mode::Direct), 2),
            f(a.p50_ms, 3),
            f(d.p50_ms, 3),
            f(a.p99_ms, 3),
            f(d.p99_ms, 3),
            f(r.p99_ratio(Mode::XdpRemoteOnly, Mode::Direct), 2),
        );
    }
    t
}

/// The per-packet cost table (Markdown; also printed).
pub fn packet_table(p: &PacketCost) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| path | timing | runs | ns/packet | `xdp_pass` ns, same timing | ratio to `xdp_pass` | ns above `xdp_pass` | proof every run took the path |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---|");
    for c in &p.cases {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            match c.method {
                Method::Looped => format!("repeat = {}", c.runs),
                Method::Single => "repeat = 1 per run".into(),
            },
            match c.method {
                Method::Looped => format!("{} × {}", p.plan.trials, c.runs),
                Method::Single => c.runs.to_string(),
            },
            f(c.ns, if c.method == Method::Single { 1 } else { 0 }),
            f(c.pass_ns, if c.method == Method::Single { 1 } else { 0 }),
            f(c.ratio(), 2),
            f(c.ns - c.pass_ns, 0),
            c.check
        );
    }
    t
}

/// The targets of issue 4 against the measured figures.
pub fn targets_table(s: &Summary, p: Option<&PacketCost>) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "| target (issue 4) | measured | met |");
    let _ = writeln!(t, "|---|---|---|");
    let worst = |key: &dyn Fn(&Row) -> f64, lowest: bool| -> Option<(f64, String)> {
        s.rows
            .iter()
            .map(|r| (key(r), r.label.clone()))
            .filter(|(v, _)| v.is_finite())
            .reduce(|a, b| {
                if (lowest && b.0 < a.0) || (!lowest && b.0 > a.0) {
                    b
                } else {
                    a
                }
            })
    };
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    if let Some((v, l)) = worst(&|r| r.rps_ratio(Mode::Xdp, Mode::Direct), true) {
        let _ = writeln!(
            t,
            "| throughput through our VIP ≥ 0.95 × direct, every workload | lowest b/a = {v:.2} ({l}) | {} |",
            yes(v >= 0.95)
        );
    }
    if let Some((v, l)) = worst(&|r| r.rps_ratio(Mode::Xdp, Mode::Haproxy), true) {
        let _ = writeln!(
            t,
            "| throughput through our VIP ≥ 1.3 × HAProxy, every workload | lowest b/c = {v:.2} ({l}) | {} |",
            yes(v >= 1.3)
        );
    }
    if let Some((v, l)) = worst(&|r| r.p99_ratio(Mode::Xdp, Mode::Direct), false) {
        let _ = writeln!(
            t,
            "| p99 latency through our VIP ≤ 1.15 × direct | highest p99 b/a = {v:.2} ({l}) | {} |",
            yes(v <= 1.15)
        );
    }
    let cpu_worst = s
        .cpu
        .iter()
        .map(|r| (r.with_agent_over_haproxy(), r.label.clone()))
        .filter(|(v, _)| v.is_finite())
        .reduce(|a, b| if b.0 > a.0 { b } else { a });
    if let Some((v, l)) = cpu_worst {
        let _ = writeln!(
            t,
            "| balancer-node CPU per request ≤ 1/5 of HAProxy's | highest (XDP program + agent) / HAProxy = {v:.3} ({l}) | {} |",
            yes(v <= 0.2)
        );
    }
    if let Some(p) = p {
        let find = |prefix: &str| {
            p.cases
                .iter()
                .find(|c| c.method == Method::Looped && c.name.starts_with(prefix))
        };
        if let (Some(fw), Some(rv)) = (find("established"), find("reverse")) {
            let _ = writeln!(
                t,
                "| per-packet cost: forward and reverse NAT profiled, ratio to the minimal program reported | forward {:.0} ns ({:.1} × `xdp_pass`), reverse {:.0} ns ({:.1} ×) | reported (see per-packet section) |",
                fw.ns,
                fw.ratio(),
                rv.ns,
                rv.ratio()
            );
        }
    }
    t
}

/// Facts about the machine the figures come from.
pub fn machine_facts() -> Vec<(String, String)> {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let hypervisor = cpuinfo.contains(" hypervisor");
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let first_line = |program: &str, args: &[&str]| -> String {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "?".into())
    };
    vec![
        (
            "CPU".into(),
            format!(
                "{cpus} × {model}{}",
                if hypervisor { " (virtual machine)" } else { "" }
            ),
        ),
        ("memory".into(), format!("{} MiB", mem_kb / 1024)),
        ("kernel".into(), first_line("uname", &["-r"])),
        (
            "clocksource".into(),
            read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
                .trim()
                .to_string(),
        ),
        (
            "BPF JIT".into(),
            match read("/proc/sys/net/core/bpf_jit_enable").trim() {
                "1" => "on".into(),
                "0" => "off".into(),
                other => other.to_string(),
            },
        ),
        (
            "KeyDB server".into(),
            first_line(crate::lab::keydb_server_program(), &["--version"]),
        ),
        (
            "redis-benchmark".into(),
            first_line("redis-benchmark", &["--version"]),
        ),
        ("HAProxy".into(), first_line("haproxy", &["-v"])),
        (
            "load average at report time".into(),
            read("/proc/loadavg").trim().to_string(),
        ),
    ]
}

/// What limits each figure: the method's own limits, independent of a run.
pub const LIMITS: &str = r#"
- **Per-packet cost** is the program alone on one CPU with hot caches: the
  same packet and the same few map entries every run (looped), or one new
  5-tuple per run into a table that never evicts (new flows). It does not
  include driver work after the verdict (XDP_TX/redirect transmission), nor
  cache misses of a table with many live flows. The kernel reports whole
  nanoseconds (truncated), so looped figures are ±1 ns. Single-run figures
  include the kernel's per-call timer overhead, which is why `xdp_pass`
  costs more there; compare within one timing method only.
- **End to end** runs everything on one 2-core machine: redis-benchmark
  (one thread), two redis-servers, HAProxy or the XDP data plane, the
  veth/bridge softirq work of every hop. They compete for the same two
  CPUs, so a figure is a property of this machine's contention as much as
  of the path; the alternation a / b / b′ / c within each round and the
  median over rounds keep slow drifts (other users of the machine) from
  favouring one mode. Direct (a) and the diagnostic (b′) use one server;
  (b) and (c) spread connections over two servers, one of them on the
  balancer node itself.
- **CPU** for (b) is the XDP program's run time as the kernel's BPF
  statistics count it (`run_time_ns`; stats on during (b) and (b′) only,
  which adds two clock reads per program run) plus the agent process's user+system
  time; it excludes the veth driver's XDP_TX work and the stack's work for
  packets passed to the local KeyDB (which (a) pays too). For (c) it is
  HAProxy's user+system time from `/proc/<pid>/stat` (10 ms ticks), which
  includes its syscalls but not all of the softirq TCP work done for its
  sockets. The machine-wide busy time per request is the all-inclusive
  cross-check: everything on the machine, balancer and client and servers
  alike, and other users of the machine too; near 100% utilisation it is
  little more than the inverse of throughput.
"#;

/// What the report is made of.
pub struct ReportInput<'a> {
    pub quick: bool,
    pub command: String,
    pub date: String,
    pub packet: Option<&'a PacketCost>,
    pub lab: Option<&'a LabResults>,
    pub summary: Option<&'a Summary>,
    pub failover: &'a FailoverStatus,
    pub churn: Option<&'a ChurnResults>,
    pub storm: Option<&'a StormResults>,
    pub chart_file: &'a str,
}

pub fn render_markdown(r: &ReportInput) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# Benchmark: XDP data plane vs HAProxy (issue 4)\n");
    let xdp = r
        .lab
        .map(|l| l.plan.xdp)
        .or(match r.failover {
            FailoverStatus::Measured(f) => Some(f.plan.xdp),
            FailoverStatus::NotRun => None,
        })
        .map(|x| format!("; {}", x.describe()))
        .unwrap_or_default();
    let _ = writeln!(
        m,
        "Run of {} with `{}`{}. Everything ran in network namespaces on 198.18.0.0/15 \
         (2 nodes + client on a bridge{xdp}).\n",
        r.date,
        r.command,
        if r.quick {
            " (**quick smoke run: tiny counts, figures meaningless**)"
        } else {
            ""
        }
    );
    let _ = writeln!(m, "![chart]({})\n", r.chart_file);
    if let Some(s) = r.summary {
        let _ = writeln!(m, "## Targets\n");
        let _ = writeln!(m, "{}", targets_table(s, r.packet));
        let _ = writeln!(
            m,
            "## End to end: redis-benchmark from the client namespace\n"
        );
        if let Some(lab) = r.lab {
            let _ = writeln!(
                m,
                "Medians over {} round(s); each round runs (a) {}, (b) {}, (b′) {}, (c) {} \
                 in turn, every workload in each. Requests per test: {}. \
                 Load average of the machine (other users included) before / after: {} / {}. \
                 CPU placement: {}.\n",
                lab.plan.rounds,
                Mode::Direct.describe(),
                Mode::Xdp.describe(),
                Mode::XdpRemoteOnly.describe(),
                Mode::Haproxy.describe(),
                Workload::ALL
                    .iter()
                    .map(|w| format!(
                        "{} `-n {}`",
                        short_label(*w, "SET/GET"),
                        w.requests(lab.plan.quick)
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                lab.loadavg.0,
                lab.loadavg.1,
                lab.plan.placement.describe()
            );
        }
        let _ = writeln!(m, "{}", throughput_table(s));
        let _ = writeln!(
            m,
            "Diagnostic (b′): the same data plane with node 2 as the only backend, so every \
             connection takes the NAT path and one server is busy, as in (a).\n"
        );
        let _ = writeln!(m, "{}", diagnostic_table(s));
        let _ = writeln!(m, "The whole machine (client, servers, balancer, the lab's virtual switch and every other user of the machine):\n");
        let _ = writeln!(m, "{}", machine_table(s));
        let _ = writeln!(m, "## CPU on the balancer node, per 100k requests\n");
        let _ = writeln!(m, "{}", cpu_table(s));
        if let Some(lab) = r.lab {
            let (b, d, a) = &lab.bpf_stats_sysctl;
            let _ = writeln!(
                m,
                "BPF run-time statistics were on during (b) and (b′) only, switched on with \
                 `BPF_ENABLE_STATS`: the same kernel switch `kernel.bpf_stats_enabled` flips, \
                 held by a file descriptor, so it goes off when the descriptor closes, even if \
                 the benchmark dies. The sysctl file shows only what was written to it and \
                 read {b} before, {d} during (b) and {a} after; the non-zero `run_time_ns` of \
                 every (b) run shows the statistics were counting.\n"
            );
        }
    }
    if let Some(p) = r.packet {
        let _ = writeln!(m, "## Per-packet cost through BPF_PROG_TEST_RUN\n");
        let _ = writeln!(m, "{}", packet_table(p));
        let _ = writeln!(
            m,
            "Program size after verification: {} bytes of BPF, {} bytes JITed. \
             Measured in {:.1} s.\n",
            p.xlated_bytes.map(|v| v.to_string()).unwrap_or("?".into()),
            p.jited_bytes.map(|v| v.to_string()).unwrap_or("?".into()),
            p.elapsed.as_secs_f64()
        );
        let _ = writeln!(m, "{}", PACKET_METHOD);
    }
    let _ = writeln!(m, "## Failover\n");
    match r.failover {
        FailoverStatus::NotRun => {
            let _ = writeln!(m, "{}", r.failover.summary());
        }
        FailoverStatus::Measured(f) => render_failover(&mut m, f),
    }
    if r.churn.is_some() || r.storm.is_some() {
        let _ = writeln!(m, "![churn chart]({CHURN_CHART})\n");
    }
    if let Some(c) = r.churn {
        churn::render(&mut m, c);
    }
    if let Some(st) = r.storm {
        storm::render(&mut m, st);
    }
    let _ = writeln!(m, "## What limits each figure\n{LIMITS}");
    let _ = writeln!(
        m,
        "The hand-written analysis of the run committed with this report (what limits each \
         target, the profile of the per-packet cost, experiments) is in `bench/ANALYSIS.md`; \
         it names the run it discusses by date.\n"
    );
    let _ = writeln!(m, "## Machine\n");
    let _ = writeln!(m, "| | |\n|---|---|");
    for (k, v) in machine_facts() {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    if let Some(lab) = r.lab {
        let _ = writeln!(m, "\n## Every run\n");
        let _ = writeln!(
            m,
            "| round | mode | test | req/s | p50 ms | p99 ms | seconds | balancer CPU ms | machine busy ms |"
        );
        let _ = writeln!(m, "|---:|---|---|---:|---:|---:|---:|---:|---:|");
        for s in &lab.samples {
            let cpu = match s.balancer {
                BalancerCpu::None => "–".to_string(),
                BalancerCpu::Xdp { program, agent } => format!(
                    "XDP {:.1} + agent {:.0}",
                    program.run_time.as_secs_f64() * 1e3,
                    agent.as_secs_f64() * 1e3
                ),
                BalancerCpu::Haproxy { process } => {
                    format!("HAProxy {:.0}", process.as_secs_f64() * 1e3)
                }
            };
            for t in &s.tests {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.2} | {} | {:.0} |",
                    s.round,
                    s.mode.letter(),
                    s.workload.label(&t.test),
                    t.rps,
                    t.p50_ms,
                    t.p99_ms,
                    s.elapsed.as_secs_f64(),
                    cpu,
                    s.machine.busy.as_secs_f64() * 1e3
                );
            }
        }
        let _ = writeln!(m, "\n## HAProxy configuration used for (c)\n");
        let _ = writeln!(m, "```\n{}```", lab.haproxy_config);
    }
    m
}

fn render_failover(m: &mut String, f: &failover::FailoverResults) {
    let _ = writeln!(
        m,
        "{} hard node loss(es) per setup: the VIP holder's bridge port goes down while a client \
         `SET`s through VIP:6380 every 2 ms (100 ms timeout per command, reconnecting at once \
         after any error). The longest gap is the longest time between two successful writes \
         from the cut until 1 s of writes after the VIP moved; after each trial the link comes \
         back and the next trial starts once node 1 holds the VIP again and every balancer sees \
         both KeyDBs up. Load average before / after: {} / {}. Measured in {:.0} s.\n",
        f.plan.trials,
        f.loadavg.0,
        f.loadavg.1,
        f.elapsed.as_secs_f64()
    );
    let _ = writeln!(m, "{}", failover::summary_table(f));
    for s in &f.setups {
        let _ = writeln!(m, "- **{}**: {}.", s.setup.name(), s.setup.settings());
        if let Some(e) = &s.error {
            let _ = writeln!(
                m,
                "  **Stopped after {} trial(s)**: `{}`",
                s.trials.len(),
                e.lines().next().unwrap_or("")
            );
        }
    }
    let _ = writeln!(m, "\nEvery trial:\n");
    let _ = writeln!(m, "{}", failover::trials_table(f));
    let _ = writeln!(m, "{FAILOVER_METHOD}\n");
    for (title, text) in &f.configs {
        let _ = writeln!(m, "{title}:\n\n```\n{text}```\n");
    }
}

const FAILOVER_METHOD: &str = r#"How it is measured (tests/src/bench/failover.rs): one 2-node lab per
setup, redis-server on both nodes, node 1 the higher priority (150 against
100) with preemption, so node 1 holds the VIP at the start of every trial.
Trial k of n cuts the link (k - 1)/n s after the cluster settled, so the
cuts fall at different points of the advert interval (a backup takes over
Master_Down_Interval after the last advert it received; with 1 s adverts
that phase alone moves the gap by up to 1 s). The client retries every
100 ms (its command and connect timeout), so a gap includes up to 100 ms
of its own retry wait after the path is back.
"VIP on the other node after" is when `ip addr` in node 2's namespace first
showed the VIP (polled every ~10 ms). keepalived runs VRRP only (no
`virtual_server`, no `vrrp_strict`, which would add firewall rules); in
(ii) and (iii) each KeyDB is bound to its node's own address so that both
HAProxies can bind VIP:6380, and `net.ipv4.ip_nonlocal_bind=1` lets the
backup's HAProxy bind it before it holds the VIP. keepalived and our
agents both put the instance of a node whose interface loses carrier in a
fault state and release the VIP; when the link returns, node 1 ignores node
2's lower-priority adverts and takes the VIP back when its own
Master_Down_Interval expires (preemption; our agent also waits for its own
KeyDB to be READY). "Gap when node 1 returns" is the client's longest gap
from the link's return until the cluster settled again."#;

const PACKET_METHOD: &str = r#"How the cases are built (tests/src/bench/packet_cost.rs, in the
packet-fixture namespace of tests/src/fixture.rs): `BPF_PROG_TEST_RUN` with
`repeat` = R runs the program R times on one buffer, so a rewritten packet
would be measured once and then R - 1 times as its own rewrite. Each
rewriting case is therefore a *cycle*: a second, synthetic conntrack entry
rewrites the translated packet back into the original (for the forward and
retransmitted-SYN cases the backend's address:port is also configured as a
service, so the translated packet is again a forward packet; for the reverse
case the client is this node's own address at a port of the SNAT range, so
the translated reply is again a reply). Every run then takes the same path,
which the verdict counter proves (+R per trial) and the buffer after an even
number of runs equalling the input confirms. A new flow cannot be repeated
(the second run of a SYN finds the flow the first created), so new flows are
single runs of distinct SYNs (client ports 1024–65535, 16 remote backends,
SNAT range 1024–65535, conntrack of the agent's default 524,288 entries,
emptied untimed every 64,512 SYNs so it never evicts)."#;

/// Raw results as JSON.
pub fn to_json(
    packet: Option<&PacketCost>,
    lab: Option<&LabResults>,
    failover: &FailoverStatus,
) -> serde_json::Value {
    use serde_json::json;
    let packet = packet.map(|p| {
        json!({
            "repeat": p.plan.repeat,
            "trials": p.plan.trials,
            "single_runs": p.plan.single_runs,
            "xlated_bytes": p.xlated_bytes,
            "jited_bytes": p.jited_bytes,
            "cases": p.cases.iter().map(|c| json!({
                "name": c.name,
                "method": c.method.describe(),
                "runs": c.runs,
                "ns": c.ns,
                "xdp_pass_ns": c.pass_ns,
                "check": c.check,
            })).collect::<Vec<_>>(),
        })
    });
    let lab = lab.map(|l| {
        json!({
            "rounds": l.plan.rounds,
            "quick": l.plan.quick,
            "xdp": l.plan.xdp.agent_mode(),
            "bridge_port_xdp_pass": l.plan.xdp == super::lab_run::LabXdp::Native,
            "placement": { "client": l.plan.placement.client, "nodes": l.plan.placement.nodes },
            "bpf_stats_enabled": [l.bpf_stats_sysctl.0, l.bpf_stats_sysctl.1, l.bpf_stats_sysctl.2],
            "samples": l.samples.iter().map(|s| json!({
                "round": s.round,
                "mode": s.mode.letter(),
                "workload": format!("{:?}", s.workload),
                "requests_per_test": s.requests,
                "elapsed_s": s.elapsed.as_secs_f64(),
                "machine_busy_s": s.machine.busy.as_secs_f64(),
                "machine_softirq_s": s.machine.softirq.as_secs_f64(),
                "balancer": match s.balancer {
                    BalancerCpu::None => json!(null),
                    BalancerCpu::Xdp { program, agent } => json!({
                        "xdp_run_time_ns": program.run_time.as_nanos() as u64,
                        "xdp_run_count": program.run_count,
                        "agent_cpu_s": agent.as_secs_f64(),
                    }),
                    BalancerCpu::Haproxy { process } => json!({
                        "haproxy_cpu_s": process.as_secs_f64(),
                    }),
                },
                "tests": s.tests.iter().map(|t| json!({
                    "test": t.test, "rps": t.rps, "avg_ms": t.avg_ms,
                    "p50_ms": t.p50_ms, "p99_ms": t.p99_ms, "max_ms": t.max_ms,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    });
    json!({ "packet_cost": packet, "lab": lab, "failover": failover::to_json(failover) })
}

/// Grey (direct / xdp_pass), blue (XDP), red (HAProxy), light blue (b′),
/// green (nftables).
const COLORS: [RGBColor; 5] = [
    RGBColor(0x88, 0x88, 0x88),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x9e, 0xc9, 0xe8),
    RGBColor(0x2c, 0xa0, 0x2c),
];

/// A number for an axis whose top is `top`: no more digits than useful.
fn axis_number(v: f64, top: f64) -> String {
    if top >= 100.0 {
        format!("{v:.0}")
    } else if top >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars: one group per label, one bar per series.
fn bars(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    labels: &[String],
    series: &[(&str, RGBColor, Vec<f64>)],
    reference: Option<(f64, &str)>,
) -> DrawResult {
    let n = labels.len().max(1);
    let top = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .chain(reference.map(|r| r.0))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        * 1.45; // headroom for the legend
    let top = if top > 0.0 { top } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Key points every half unit: groups are centred on i + 0.5, and
        // only those points get a label.
        .x_labels(2 * n + 1)
        .x_label_formatter(&|x| {
            let i = x.floor();
            if (x - i - 0.5).abs() < 1e-6 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .y_label_formatter(&|v| axis_number(*v, top))
        .label_style(("sans-serif", 12))
        .draw()?;
    let k = series.len().max(1) as f64;
    let width = 0.8 / k;
    for (j, (name, color, values)) in series.iter().enumerate() {
        let color = *color;
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, v)| {
                        let x0 = i as f64 + 0.1 + j as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
                    }),
            )?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        // The value above each bar: small bars stay readable.
        chart.draw_series(
            values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| {
                    let x = i as f64 + 0.1 + (j as f64 + 0.45) * width;
                    Text::new(
                        axis_number(*v, *v * 10.0),
                        (x, *v + top * 0.01),
                        ("sans-serif", 10)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }),
        )?;
    }
    if let Some((y, name)) = reference {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, y), (n as f64, y)],
                BLACK.stroke_width(1),
            )))?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn draw(
    path: &Path,
    s: Option<&Summary>,
    p: Option<&PacketCost>,
    f: Option<&failover::FailoverResults>,
) -> DrawResult {
    let root = SVGBackend::new(path, (1200, 1150)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(800);
    let panels = top.split_evenly((2, 2));
    if let Some(f) = f {
        let labels: Vec<String> = f
            .setups
            .iter()
            .map(|s| s.setup.name().to_string())
            .collect();
        let in_ms = |d: Option<std::time::Duration>| {
            d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)
        };
        bars(
            &bottom,
            &format!(
                "Failover: client's longest gap per hard node loss, ms ({} trial(s) per setup)",
                f.plan.trials
            ),
            "ms",
            &labels,
            &[
                (
                    "median",
                    COLORS[1],
                    f.setups.iter().map(|s| in_ms(s.median_gap())).collect(),
                ),
                (
                    "max",
                    COLORS[2],
                    f.setups.iter().map(|s| in_ms(s.max_gap())).collect(),
                ),
            ],
            None,
        )?;
    }
    if let Some(s) = s {
        let labels: Vec<String> = s.rows.iter().map(|r| r.short.clone()).collect();
        let rel = |m: Mode| -> Vec<f64> {
            s.rows
                .iter()
                .map(|r| r.rps_ratio(m, Mode::Direct))
                .collect()
        };
        bars(
            &panels[0],
            "Throughput relative to direct (median)",
            "req/s ÷ direct",
            &labels,
            &[
                ("(b) XDP", COLORS[1], rel(Mode::Xdp)),
                ("(b′) XDP, all NATed", COLORS[3], rel(Mode::XdpRemoteOnly)),
                ("(c) HAProxy", COLORS[2], rel(Mode::Haproxy)),
            ],
            Some((0.95, "target 0.95")),
        )?;
        let p99 = |m: Mode| -> Vec<f64> { s.rows.iter().map(|r| r.get(m).p99_ms).collect() };
        bars(
            &panels[1],
            "p99 latency (median), ms",
            "ms",
            &labels,
            &[
                ("(a) direct", COLORS[0], p99(Mode::Direct)),
                ("(b) XDP", COLORS[1], p99(Mode::Xdp)),
                ("(b′) XDP, all NATed", COLORS[3], p99(Mode::XdpRemoteOnly)),
                ("(c) HAProxy", COLORS[2], p99(Mode::Haproxy)),
            ],
            None,
        )?;
        let cpu_labels: Vec<String> = s.cpu.iter().map(|r| r.short.clone()).collect();
        bars(
            &panels[3],
            "Balancer-node CPU per request, µs (median)",
            "µs per request",
            &cpu_labels,
            &[
                (
                    "(b) XDP program + agent",
                    COLORS[1],
                    s.cpu
                        .iter()
                        .map(|r| (r.xdp_us + r.agent_us) / 100_000.0)
                        .collect(),
                ),
                (
                    "(c) HAProxy process",
                    COLORS[2],
                    s.cpu.iter().map(|r| r.haproxy_us / 100_000.0).collect(),
                ),
            ],
            None,
        )?;
    }
    if let Some(p) = p {
        let looped: Vec<_> = p
            .cases
            .iter()
            .filter(|c| c.method == Method::Looped)
            .collect();
        let labels: Vec<String> = looped.iter().map(|c| c.short.to_string()).collect();
        bars(
            &panels[2],
            "Per-packet cost (test_run, looped), ns",
            "ns/packet",
            &labels,
            &[
                (
                    "xdp_pass",
                    COLORS[0],
                    looped.iter().map(|c| c.pass_ns).collect(),
                ),
                ("balancer", COLORS[1], looped.iter().map(|c| c.ns).collect()),
            ],
            None,
        )?;
    }
    root.present()?;
    Ok(())
}

/// Draws the SVG chart.
pub fn draw_chart(
    path: &Path,
    s: Option<&Summary>,
    p: Option<&PacketCost>,
    f: Option<&failover::FailoverResults>,
) -> Result<()> {
    draw(path, s, p, f).map_err(|e| anyhow::anyhow!("draw {}: {e}", path.display()))
}

/// Writes REPORT.md, chart.svg and results.json into `dir`.
pub fn write_all(dir: &Path, input: &ReportInput, json: &serde_json::Value) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let failover = match input.failover {
        FailoverStatus::Measured(f) => Some(f),
        FailoverStatus::NotRun => None,
    };
    draw_chart(
        &dir.join(input.chart_file),
        input.summary,
        input.packet,
        failover,
    )?;
    fs::write(dir.join("REPORT.md"), render_markdown(input)).context("write REPORT.md")?;
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(json).context("serialise results")?,
    )
    .context("write results.json")?;
    Ok(())
}

/// The churn and storm chart's file name, next to REPORT.md.
pub const CHURN_CHART: &str = "churn.svg";

fn front_color(f: Front) -> RGBColor {
    match f {
        Front::Direct => COLORS[0],
        Front::Balancer => COLORS[1],
        Front::Haproxy => COLORS[2],
        Front::Nftables => COLORS[4],
    }
}

fn draw_churn(path: &Path, c: Option<&ChurnResults>, st: Option<&StormResults>) -> DrawResult {
    let root = SVGBackend::new(path, (1200, 1150)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(800);
    let panels = top.split_evenly((2, 2));
    if let Some(c) = c {
        let groups: Vec<(u32, usize)> = c
            .plan
            .concurrency
            .iter()
            .flat_map(|&cl| (1..=c.plan.runs).map(move |run| (cl, run)))
            .collect();
        let labels: Vec<String> = groups
            .iter()
            .map(|(cl, run)| format!("-c {cl} run {run}"))
            .collect();
        let per_front =
            |value: &dyn Fn(&churn::ChurnRun) -> f64| -> Vec<(&str, RGBColor, Vec<f64>)> {
                c.plan
                    .fronts
                    .iter()
                    .map(|&f| {
                        (
                            f.name(),
                            front_color(f),
                            groups
                                .iter()
                                .map(|&(cl, run)| c.find(f, cl, run).map_or(f64::NAN, value))
                                .collect(),
                        )
                    })
                    .collect()
            };
        bars(
            &panels[0],
            "New connections per second (redis-benchmark -k 0)",
            "connections/s",
            &labels,
            &per_front(&|r| r.rate()),
            None,
        )?;
        let direct: Vec<f64> = groups
            .iter()
            .map(|&(cl, run)| {
                c.find(Front::Direct, cl, run)
                    .map_or(f64::NAN, |r| r.rate())
            })
            .collect();
        let relative: Vec<(&str, RGBColor, Vec<f64>)> = per_front(&|r| r.rate())
            .into_iter()
            .filter(|(name, _, _)| *name != Front::Direct.name())
            .map(|(name, color, v)| {
                (
                    name,
                    color,
                    v.iter().zip(&direct).map(|(a, d)| a / d).collect(),
                )
            })
            .collect();
        bars(
            &panels[1],
            "New connections per second relative to direct",
            "÷ direct",
            &labels,
            &relative,
            Some((0.5, "target 0.5 (this balancer)")),
        )?;
        bars(
            &panels[2],
            "Client SYN retransmits per run (nstat)",
            "SYN retransmits",
            &labels,
            &per_front(&|r| r.syn_retransmits as f64),
            None,
        )?;
        bars(
            &panels[3],
            "Client failed connects per run (TcpAttemptFails)",
            "failed connects",
            &labels,
            &per_front(&|r| r.failed_connects as f64),
            None,
        )?;
    }
    if let Some(st) = st {
        let in_ms = |d: Option<std::time::Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        bars(
            &bottom,
            &format!(
                "Reconnect storm: {} of {} clients reconnected; time from the VIP move, ms",
                st.succeeded(),
                st.plan.clients
            ),
            "ms",
            &["this balancer (our agents)".to_string()],
            &[
                ("median", COLORS[3], vec![in_ms(st.quantile(0.5))]),
                ("p99", COLORS[1], vec![in_ms(st.quantile(0.99))]),
                ("last", COLORS[2], vec![in_ms(st.last())]),
            ],
            None,
        )?;
    }
    root.present()?;
    Ok(())
}

/// Writes churn.md, churn.svg and churn.json into `dir`: the churn and
/// storm figures on their own, so a run of only those parts leaves the
/// other parts' REPORT.md, chart.svg and results.json as they were.
pub fn write_churn(
    dir: &Path,
    input: &ReportInput,
    c: Option<&ChurnResults>,
    st: Option<&StormResults>,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let chart = dir.join(CHURN_CHART);
    draw_churn(&chart, c, st).map_err(|e| anyhow::anyhow!("draw {}: {e}", chart.display()))?;
    let mut m = String::new();
    let _ = writeln!(
        m,
        "# Benchmark: connection churn and reconnect storm (issue 9)\n"
    );
    let _ = writeln!(
        m,
        "Run of {} with `{}`{}. Everything ran in network namespaces on 198.18.0.0/15 \
         (2 nodes + client on a bridge; {}).\n",
        input.date,
        input.command,
        if input.quick {
            " (**quick smoke run: tiny counts, figures meaningless**)"
        } else {
            ""
        },
        c.map(|c| c.plan.xdp)
            .or(st.map(|s| s.plan.xdp))
            .map_or("", |x| x.describe())
    );
    let _ = writeln!(m, "![chart]({CHURN_CHART})\n");
    match c {
        Some(c) => churn::render(&mut m, c),
        None => {
            let _ = writeln!(
                m,
                "## Connection churn (issue 9)\n\nNot run in this invocation.\n"
            );
        }
    }
    match st {
        Some(st) => storm::render(&mut m, st),
        None => {
            let _ = writeln!(
                m,
                "## Reconnect storm (issue 9)\n\nNot run in this invocation.\n"
            );
        }
    }
    let _ = writeln!(m, "## Machine\n");
    let _ = writeln!(m, "| | |\n|---|---|");
    for (k, v) in machine_facts() {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    if let Some(c) = c {
        let _ = writeln!(
            m,
            "\n## HAProxy configuration of the churn runs\n\n```\n{}```",
            c.haproxy_config
        );
    }
    fs::write(dir.join("churn.md"), m).context("write churn.md")?;
    let json = serde_json::json!({
        "date": input.date,
        "command": input.command,
        "quick": input.quick,
        "churn": c.map(churn::to_json),
        "storm": st.map(storm::to_json),
    });
    fs::write(
        dir.join("churn.json"),
        serde_json::to_string_pretty(&json).context("serialise churn results")?,
    )
    .context("write churn.json")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::{
        cpu::{MachineCpu, ProgramRunTime},
        failover::{FailoverPlan, FailoverResults, Setup, SetupResult, Trial},
        lab_run::{LabPlan, LabXdp, Placement},
        redis_benchmark::TestResult,
    };

    fn sample(round: usize, mode: Mode, rps: f64, p99: f64, balancer: BalancerCpu) -> Sample {
        Sample {
            round,
            mode,
            workload: Workload::GetKib,
            requests: 100_000,
            tests: vec![TestResult {
                test: "GET".into(),
                rps,
                avg_ms: 1.0,
                p50_ms: 1.0,
                p99_ms: p99,
                max_ms: 9.0,
            }],
            elapsed: Duration::from_secs(2),
            machine: MachineCpu {
                busy: Duration::from_secs(4),
                softirq: Duration::ZERO,
            },
            balancer,
        }
    }

    fn lab(samples: Vec<Sample>) -> LabResults {
        LabResults {
            plan: LabPlan {
                rounds: 3,
                quick: false,
                xdp: LabXdp::Generic,
                placement: Placement::default(),
            },
            samples,
            bpf_stats_sysctl: ("0".into(), "1".into(), "0".into()),
            haproxy_config: String::new(),
            loadavg: (String::new(), String::new()),
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn medians_ratios_and_targets() {
        let xdp = |ms: u64| BalancerCpu::Xdp {
            program: ProgramRunTime {
                run_time: Duration::from_millis(ms),
                run_count: 150_000,
            },
            agent: Duration::ZERO,
        };
        let ha = BalancerCpu::Haproxy {
            process: Duration::from_millis(2000),
        };
        let mut samples = Vec::new();
        for (round, (a, b, c)) in [
            (100.0, 99.0, 50.0),
            (200.0, 190.0, 90.0),
            (300.0, 290.0, 70.0),
        ]
        .into_iter()
        .enumerate()
        {
            samples.push(sample(round, Mode::Direct, a, 1.0, BalancerCpu::None));
            samples.push(sample(round, Mode::Xdp, b, 1.1, xdp(50)));
            samples.push(sample(round, Mode::Haproxy, c, 3.0, ha));
        }
        let s = summarize(&lab(samples));
        let row = s
            .rows
            .iter()
            .find(|r| r.label == "GET 1 KiB, 200 clients")
            .unwrap();
        // Medians: a 200, b 190, c 70.
        assert!((row.rps_ratio(Mode::Xdp, Mode::Direct) - 0.95).abs() < 1e-9);
        assert!((row.rps_ratio(Mode::Xdp, Mode::Haproxy) - 190.0 / 70.0).abs() < 1e-9);
        let cpu = &s.cpu[2];
        // 50 ms per 100k requests = 50,000 µs; HAProxy 2,000,000 µs.
        assert!((cpu.xdp_us - 50_000.0).abs() < 1e-6, "{}", cpu.xdp_us);
        assert!((cpu.xdp_over_haproxy() - 0.025).abs() < 1e-9);
        assert!((cpu.packets_per_request - 1.5).abs() < 1e-9);
        // Machine: 4 s busy over 2 s on this machine's CPUs.
        assert!(cpu.machine_us[&Mode::Direct] > 0.0);
        let targets = targets_table(&s, None);
        assert!(
            targets.contains("lowest b/a = 0.95 (GET 1 KiB, 200 clients) | yes"),
            "{targets}"
        );
        assert!(targets.contains("lowest b/c = 2.71"), "{targets}");
        assert!(targets.contains("highest p99 b/a = 1.10"), "{targets}");
        assert!(
            targets.contains("= 0.025 (GET 1 KiB, 200 clients) | yes"),
            "{targets}"
        );
        // Workloads without samples show dashes, not NaN.
        assert!(throughput_table(&s).contains("| SET, 50 clients | – |"));
        assert!(!throughput_table(&s).contains("NaN"));
    }

    #[test]
    fn report_has_failover_figures_and_chart_draws() {
        let s = summarize(&lab(vec![sample(
            1,
            Mode::Direct,
            1.0,
            1.0,
            BalancerCpu::None,
        )]));
        let trial = Trial {
            number: 1,
            cut: 1,
            takeover: Duration::from_millis(330),
            client: crate::lab::WriterReport {
                window: Duration::from_secs(2),
                writes: 500,
                failed_commands: 1,
                connects: 1,
                failed_connects: 0,
                longest_gap: Duration::from_millis(412),
                longest_gap_span: (Duration::from_secs(1), Duration::from_secs(2)),
                errors: vec![(Duration::from_secs(1), "command: timed out".into())],
            },
            rejoin_gap: Duration::from_millis(30),
        };
        let failover = FailoverStatus::Measured(FailoverResults {
            plan: FailoverPlan::quick(LabXdp::Generic),
            setups: vec![SetupResult {
                setup: Setup::Agents,
                trials: vec![trial],
                error: None,
                elapsed: Duration::from_secs(5),
            }],
            loadavg: (String::new(), String::new()),
            elapsed: Duration::from_secs(5),
            configs: vec![("keepalived.conf".into(), "vrrp_instance VI_1 {}\n".into())],
        });
        let l = lab(Vec::new());
        let input = ReportInput {
            quick: true,
            command: "cargo xtask bench --quick".into(),
            date: "today".into(),
            packet: None,
            lab: Some(&l),
            summary: Some(&s),
            failover: &failover,
            churn: None,
            storm: None,
            chart_file: "chart.svg",
        };
        let md = render_markdown(&input);
        assert!(
            md.contains("| (i) our agents, defaults | 1 | 412 | 412 | 1 | 0 | 412 | 330 | 30 |"),
            "{md}"
        );
        assert!(md.contains("generic (skb) XDP on node 1"), "{md}");
        assert!(md.contains("command: timed out"), "{md}");
        let dir = std::env::temp_dir().join(format!("bench-report-test-{}", std::process::id()));
        let json = to_json(None, Some(&l), &failover);
        assert_eq!(
            json["failover"]["setups"][0]["trials"][0]["failed_commands"],
            1
        );
        assert_eq!(json["lab"]["xdp"], "generic");
        write_all(&dir, &input, &json).unwrap();
        let svg = std::fs::read_to_string(dir.join("chart.svg")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg") && svg.contains("Throughput relative to direct"));
        assert!(svg.contains("Failover: client"), "no failover panel");
        let none = render_markdown(&ReportInput {
            failover: &FailoverStatus::NotRun,
            ..input
        });
        assert!(none.contains("Failover: not run"), "{none}");
    }

    #[test]
    fn churn_and_storm_files_stand_apart() {
        use crate::bench::{
            churn::{ChurnPlan, ChurnRun, Outcome},
            storm::StormPlan,
        };
        let runs = Front::ALL
            .iter()
            .map(|&front| ChurnRun {
                front,
                clients: 50,
                run: 1,
                outcome: Outcome::Finished,
                elapsed: Duration::from_secs(2),
                accepted: 1000,
                bench_rps: Vec::new(),
                failed_connects: 0,
                syn_retransmits: 2,
                active_opens: 1000,
                drops: Vec::new(),
            })
            .collect();
        let churn = ChurnResults {
            plan: ChurnPlan::quick(LabXdp::Generic),
            runs,
            errors: Vec::new(),
            loadavg: (String::new(), String::new()),
            elapsed: Duration::from_secs(8),
            nft_ruleset: churn::nft_ruleset(),
            haproxy_config: "global\n".into(),
        };
        let storm = StormResults {
            plan: StormPlan::quick(LabXdp::Generic),
            connected_before: 50,
            takeover: Duration::from_millis(300),
            reconnect_times: vec![Duration::from_millis(5); 50],
            failed: 0,
            attempts: 50,
            errors: Vec::new(),
            syn_retransmits: 0,
            drops: Vec::new(),
            elapsed: Duration::from_secs(9),
        };
        let input = ReportInput {
            quick: true,
            command: "cargo xtask bench --quick --only churn,storm".into(),
            date: "today".into(),
            packet: None,
            lab: None,
            summary: None,
            failover: &FailoverStatus::NotRun,
            churn: Some(&churn),
            storm: Some(&storm),
            chart_file: "chart.svg",
        };
        let dir = std::env::temp_dir().join(format!("bench-churn-test-{}", std::process::id()));
        write_churn(&dir, &input, Some(&churn), Some(&storm)).unwrap();
        let md = std::fs::read_to_string(dir.join("churn.md")).unwrap();
        let svg = std::fs::read_to_string(dir.join(CHURN_CHART)).unwrap();
        let json = std::fs::read_to_string(dir.join("churn.json")).unwrap();
        let main_files = ["REPORT.md", "chart.svg", "results.json"].map(|f| dir.join(f).exists());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(main_files, [false; 3]);
        assert!(
            md.contains("## Connection churn") && md.contains("## Reconnect storm"),
            "{md}"
        );
        assert!(md.contains("| nftables | 50 | 1 | 500 |"), "{md}");
        assert!(svg.contains("New connections per second") && svg.contains("Reconnect storm"));
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json["storm"]["reconnected"], 50);
        assert!(render_markdown(&input).contains("## Reconnect storm"));
    }
}
