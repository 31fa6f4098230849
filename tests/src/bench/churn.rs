//! Connection churn (issue 9, item 2): clients that open a new connection
//! per request, through each front on node 1 of the namespace lab.
//!
//! `redis-benchmark -k 0 -t ping` from the client namespace (a new TCP
//! connection for every request; `-t ping` runs PING_INLINE then
//! PING_MBULK, `-n` = half the connections each) against:
//!
//! - direct: node 2's KeyDB, no front;
//! - this balancer: the agent on node 1 (static holder, round robin over
//!   node 1's and node 2's KeyDB; the remote half takes the SNAT path);
//! - HAProxy on node 1 ([`super::haproxy`], the seed's setup);
//! - nftables on node 1: `numgen inc mod 2` DNAT over both KeyDBs and
//!   masquerade of what goes to node 2, in node 1's namespace.
//!
//! For each concurrency (`-c 50`, `-c 500`) every front runs twice back to
//! back (the second run meets whatever the first left held: TIME_WAIT
//! sockets, conntrack entries, SNAT ports), fronts in turn. The client
//! namespace has `net.ipv4.tcp_tw_reuse=1` and `ip_local_port_range` 1024
//! to 65535, as a client tuned for churn would. Each run is bounded by
//! [`ChurnPlan::cap`]: a run that does not finish is killed and reported
//! as capped, with the rate of what it got through.
//!
//! Per run: connections the servers accepted (`total_connections_received`
//! of both KeyDBs, before and after) per second of the run, failed
//! connects and SYN retransmits of the client (`nstat` in its namespace:
//! `TcpAttemptFails`, `TcpExtTCPSynRetrans`), and for this balancer the
//! data plane's `drop_*` counters read from its pinned COUNTERS map.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs,
    io::Read as _,
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_user::stats::PinnedMaps;

use crate::{
    lab::{node_addr, node_keydb, vip_keydb, AgentConfig, Lab, VIP},
    netns::Netns,
    resp::{info_field, Connection},
};

use super::{
    haproxy::{CheckTiming, Haproxy},
    lab_run::{config_set_bind, haproxy_config, LabXdp},
    redis_benchmark::parse_csv,
};

/// Timeout of the harness's own connects, reads and writes.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// The nftables table the nftables front creates in node 1's namespace.
pub const NFT_TABLE: &str = "balancer_bench_churn";
/// The client's port range: every unprivileged port.
const CLIENT_PORT_RANGE: &str = "1024 65535";

/// How much to run.
#[derive(Clone, Debug)]
pub struct ChurnPlan {
    /// New connections per run.
    pub connections: u32,
    /// `-c` values, each a block of runs.
    pub concurrency: Vec<u32>,
    /// Back-to-back runs per front and concurrency.
    pub runs: usize,
    /// Longest a run may take before it is killed and reported capped.
    pub cap: Duration,
    pub fronts: Vec<Front>,
    pub xdp: LabXdp,
}

impl ChurnPlan {
    pub fn full(xdp: LabXdp) -> Self {
        ChurnPlan {
            connections: 200_000,
            concurrency: vec![50, 500],
            runs: 2,
            cap: Duration::from_secs(60),
            fronts: Front::ALL.to_vec(),
            xdp,
        }
    }

    /// A few hundred connections per run: every code path in seconds.
    pub fn quick(xdp: LabXdp) -> Self {
        ChurnPlan {
            connections: 400,
            cap: Duration::from_secs(20),
            ..ChurnPlan::full(xdp)
        }
    }
}

/// What the client's connections go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Front {
    Direct,
    Balancer,
    Haproxy,
    Nftables,
}

impl Front {
    pub const ALL: [Front; 4] = [
        Front::Direct,
        Front::Balancer,
        Front::Haproxy,
        Front::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Front::Direct => "direct",
            Front::Balancer => "this balancer",
            Front::Haproxy => "HAProxy",
            Front::Nftables => "nftables",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Front::Direct => "direct to node 2's KeyDB",
            Front::Balancer => "VIP through this balancer on node 1 (XDP, round robin over both KeyDBs)",
            Front::Haproxy => "VIP through HAProxy on node 1 (roundrobin over both KeyDBs)",
            Front::Nftables => {
                "VIP through nftables on node 1 (`numgen inc mod 2` DNAT over both KeyDBs, masquerade to node 2)"
            }
        }
    }

    fn target(self) -> SocketAddr {
        match self {
            Front::Direct => node_keydb(2),
            _ => vip_keydb(),
        }
    }

    fn serving_nodes(self) -> &'static [usize] {
        match self {
            Front::Direct => &[2],
            _ => &[1, 2],
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// redis-benchmark finished every request.
    Finished,
    /// Killed at the plan's cap.
    Capped,
    /// redis-benchmark exited with an error (first line of what it said).
    Failed(String),
}

impl Outcome {
    pub fn label(&self) -> String {
        match self {
            Outcome::Finished => "finished".into(),
            Outcome::Capped => "**unfinished** (capped)".into(),
            Outcome::Failed(e) => format!("**failed**: {e}"),
        }
    }
}

/// One `redis-benchmark` run.
#[derive(Clone, Debug)]
pub struct ChurnRun {
    pub front: Front,
    pub clients: u32,
    /// 1 or 2: which of the back-to-back runs.
    pub run: usize,
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// Connections both KeyDBs accepted during the run (a cross-check of
    /// [`ChurnRun::established`]; includes health checks).
    pub accepted: u64,
    /// redis-benchmark's own rps per test, when it finished.
    pub bench_rps: Vec<(String, f64)>,
    /// Client `TcpAttemptFails` during the run.
    pub failed_connects: u64,
    /// Client `TcpExtTCPSynRetrans` during the run.
    pub syn_retransmits: u64,
    /// Client `TcpActiveOpens` during the run (connects attempted).
    pub active_opens: u64,
    /// This balancer's `drop_*` counters during the run (non-zero ones);
    /// empty for the other fronts.
    pub drops: Vec<(String, u64)>,
}

impl ChurnRun {
    /// Connections the client established: connects attempted minus those
    /// that failed (a connect still pending when a capped run is killed
    /// counts as neither, at most one per client).
    pub fn established(&self) -> u64 {
        self.active_opens.saturating_sub(self.failed_connects)
    }

    /// Established connections per second of the run. Counted at the
    /// client: the servers' accept count also holds the agent's health
    /// checks (about 20 a second).
    pub fn rate(&self) -> f64 {
        self.established() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum()
    }

    fn drop_count(&self, name: &str) -> u64 {
        self.drops
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }
}

/// Everything the churn part produced.
#[derive(Clone, Debug)]
pub struct ChurnResults {
    pub plan: ChurnPlan,
    pub runs: Vec<ChurnRun>,
    /// Fronts that could not be measured, with the reason.
    pub errors: Vec<(Front, String)>,
    pub loadavg: (String, String),
    pub elapsed: Duration,
    pub nft_ruleset: String,
    pub haproxy_config: String,
}

impl ChurnResults {
    /// The run of `front` at `clients`, number `run`.
    pub fn find(&self, front: Front, clients: u32, run: usize) -> Option<&ChurnRun> {
        self.runs
            .iter()
            .find(|r| r.front == front && r.clients == clients && r.run == run)
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The nftables ruleset of the nftables front.
pub fn nft_ruleset() -> String {
    format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr {VIP} tcp dport {port} dnat to numgen inc mod 2 map {{ 0 : {n1}, 1 : {n2} }}\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tct status dnat ip daddr {n2} tcp dport {port} masquerade\n\
         \t}}\n\
         }}\n",
        port = crate::lab::KEYDB_PORT,
        n1 = node_addr(1),
        n2 = node_addr(2),
    )
}

/// Runs the plan in a lab of its own. A front that cannot be set up is
/// recorded in [`ChurnResults::errors`] and the others still run; fails
/// only when the lab itself cannot be built or when interrupted.
pub fn measure(plan: ChurnPlan, interrupted: &dyn Fn() -> bool) -> Result<ChurnResults> {
    let started = Instant::now();
    let before = loadavg();
    let mut lab = plan.xdp.lab("Ch")?;
    let client = lab.client();
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.sysctl("net.ipv4.ip_local_port_range", CLIENT_PORT_RANGE)?;
    lab.start_servers()?;
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
    let haproxy = haproxy_config(CheckTiming::default(), None);
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for &clients in &plan.concurrency {
        for &front in &plan.fronts {
            if interrupted() {
                bail!("interrupted");
            }
            let mut serving = match start(&mut lab, front, &haproxy, &plan) {
                Ok(s) => s,
                Err(e) => {
                    let e = format!("{e:#}");
                    eprintln!("  churn: {} could not start: {e}", front.name());
                    errors.push((front, e));
                    continue;
                }
            };
            let result = (|| -> Result<()> {
                wait_serving(&lab, &mut serving, &run_ids, front)?;
                for run in 1..=plan.runs {
                    if interrupted() {
                        bail!("interrupted");
                    }
                    let r = run_one(&lab, &mut serving, front, clients, run, &plan)
                        .with_context(|| format!("{}, -c {clients}, run {run}", front.name()))?;
                    println!(
                        "  churn -c {clients:<3} {:<14} run {run}: {:>7.0} new conn/s ({} established in {:.1} s, {}); failed connects {}, SYN retransmits {}{}",
                        front.name(),
                        r.rate(),
                        r.established(),
                        r.elapsed.as_secs_f64(),
                        r.outcome.label(),
                        r.failed_connects,
                        r.syn_retransmits,
                        if front == Front::Balancer {
                            format!(", drops {}", r.total_drops())
                        } else {
                            String::new()
                        }
                    );
                    runs.push(r);
                }
                Ok(())
            })();
            let stopped = stop(&mut lab, serving);
            if interrupted() {
                bail!("interrupted");
            }
            if let Err(e) = result.and(stopped) {
                let e = format!("{e:#}");
                eprintln!("  churn: {} stopped: {e}", front.name());
                errors.push((front, e.clone()));
                // A front that failed half-way may have left node 1 in a
                // state the next front cannot use: give up on this lab's
                // remaining fronts rather than measure a broken set-up.
                if !node1_clean(&lab) {
                    bail!(
                        "node 1 not back to its initial state after {}: {e}",
                        front.name()
                    );
                }
            }
        }
    }
    drop(lab);
    Ok(ChurnResults {
        plan,
        runs,
        errors,
        loadavg: (before, loadavg()),
        elapsed: started.elapsed(),
        nft_ruleset: nft_ruleset(),
        haproxy_config: haproxy.to_config(),
    })
}

/// Node 1 holds no VIP and no nftables table.
fn node1_clean(lab: &Lab) -> bool {
    let ns = lab.node(1).ns();
    let no_vip = lab.holds_vip(1).map(|h| !h).unwrap_or(false);
    let no_table = ns
        .exec(&["nft", "list", "tables"])
        .map(|t| !t.contains(NFT_TABLE))
        .unwrap_or(true);
    no_vip && no_table
}

/// The front being measured, running.
enum Serving {
    Direct,
    Balancer,
    Haproxy(Haproxy),
    Nftables(NftTable),
}

/// The nftables front's table and sysctls in node 1's namespace; removed
/// on drop, also when a run fails.
struct NftTable {
    ns: String,
}

impl NftTable {
    fn install(ns: &Netns, dir: &Path) -> Result<Self> {
        // Forwarding for the half DNATed to node 2, which leaves by the
        // interface it came in on: no ICMP redirects to the client.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        ns.sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;
        let file = dir.join("churn.nft");
        fs::write(&file, nft_ruleset()).with_context(|| format!("write {}", file.display()))?;
        let guard = NftTable {
            ns: ns.name().to_string(),
        };
        ns.exec(&["nft", "-f", &file.display().to_string()])
            .context("load the nftables ruleset (nft -f)")?;
        Ok(guard)
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &self.ns];
            all.extend_from_slice(args);
            crate::netns::run("ip", &all)
        };
        let _ = exec(&["nft", "delete", "table", "ip", NFT_TABLE]);
        let _ = exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"]);
    }
}

fn add_vip(lab: &Lab) -> Result<()> {
    lab.node(1)
        .ns()
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])?;
    Ok(())
}

fn del_vip(lab: &Lab) -> Result<()> {
    lab.node(1)
        .ns()
        .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "eth0"])?;
    Ok(())
}

fn start(
    lab: &mut Lab,
    front: Front,
    haproxy: &super::haproxy::HaproxyConfig,
    plan: &ChurnPlan,
) -> Result<Serving> {
    match front {
        Front::Direct => Ok(Serving::Direct),
        Front::Balancer => {
            let mut config = AgentConfig::for_lab(lab, true);
            config.xdp_mode = plan.xdp.agent_mode().into();
            lab.start_agent(1, &config)?;
            Ok(Serving::Balancer)
        }
        Front::Haproxy => {
            config_set_bind(lab, 1, &node_addr(1).to_string())?;
            add_vip(lab)?;
            match Haproxy::start(lab.node(1), haproxy, lab.dir(), None) {
                Ok(h) => Ok(Serving::Haproxy(h)),
                Err(e) => {
                    let _ = del_vip(lab);
                    let _ = config_set_bind(lab, 1, "0.0.0.0");
                    Err(e)
                }
            }
        }
        Front::Nftables => {
            add_vip(lab)?;
            match NftTable::install(lab.node(1).ns(), lab.dir()) {
                Ok(t) => Ok(Serving::Nftables(t)),
                Err(e) => {
                    let _ = del_vip(lab);
                    Err(e)
                }
            }
        }
    }
}

fn stop(lab: &mut Lab, serving: Serving) -> Result<()> {
    match serving {
        Serving::Direct => Ok(()),
        Serving::Balancer => {
            let status = lab.stop_agent(1)?;
            ensure!(
                status.success(),
                "agent exited with {status}:\n{}",
                lab.agent_log_tail(1, 30)
            );
            Ok(())
        }
        Serving::Haproxy(h) => {
            let stopped = h.stop();
            del_vip(lab)?;
            config_set_bind(lab, 1, "0.0.0.0")?;
            stopped
        }
        Serving::Nftables(table) => {
            drop(table);
            del_vip(lab)?;
            let tables = lab.node(1).ns().exec(&["nft", "list", "tables"])?;
            ensure!(
                !tables.contains(NFT_TABLE),
                "table {NFT_TABLE} still in node 1: {tables}"
            );
            Ok(())
        }
    }
}

/// Waits until new connections to the front reach exactly its servers.
fn wait_serving(
    lab: &Lab,
    serving: &mut Serving,
    run_ids: &HashMap<String, usize>,
    front: Front,
) -> Result<()> {
    let expected: HashSet<usize> = front.serving_nodes().iter().copied().collect();
    super::lab_run::wait_reaching(lab, front.target(), run_ids, &expected, || {
        if let Serving::Haproxy(h) = serving {
            h.ensure_running()?;
        }
        Ok(())
    })
}

/// `total_connections_received` of both servers, each minus the
/// connection that asked.
fn accepted_so_far(lab: &Lab) -> Result<u64> {
    lab.in_client(|| -> Result<u64> {
        let mut total = 0;
        for node in 1..=2 {
            let info = Connection::connect(node_keydb(node), IO_TIMEOUT)?.info("stats")?;
            let n: u64 = info_field(&info, "total_connections_received")
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no total_connections_received in node {node}'s INFO"))?;
            total += n.saturating_sub(1);
        }
        Ok(total)
    })?
}

/// The nstat counters read in the client's namespace.
const NSTAT: [&str; 3] = ["TcpActiveOpens", "TcpAttemptFails", "TcpExtTCPSynRetrans"];

/// Absolute values of [`NSTAT`] in namespace `ns` (`nstat -asz`: no
/// history file is read or written).
fn nstat(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let mut args = vec!["nstat", "-asz"];
    args.extend_from_slice(&NSTAT);
    let out = ns.exec(&args)?;
    Ok(parse_nstat(&out))
}

/// `name value rate` lines of nstat; the `#kernel` header is skipped.
pub fn parse_nstat(out: &str) -> BTreeMap<String, u64> {
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// The data plane's `drop_*` counters on node 1, from its pins.
fn drop_counters(lab: &Lab) -> Result<BTreeMap<String, u64>> {
    let maps = PinnedMaps::open(lab.node(1).pin_dir()).context("open node 1's pinned maps")?;
    let snap = maps.traffic().context("read node 1's counters")?;
    Ok(snap
        .counters
        .into_iter()
        .filter(|(n, _)| n.starts_with("drop_"))
        .map(|(n, v)| (n.to_string(), v))
        .collect())
}

fn run_one(
    lab: &Lab,
    serving: &mut Serving,
    front: Front,
    clients: u32,
    run: usize,
    plan: &ChurnPlan,
) -> Result<ChurnRun> {
    let target = front.target();
    let per_test = (plan.connections / 2).max(1);
    let mut cmd = lab.client().command("redis-benchmark");
    cmd.args([
        "-h",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-c",
        &clients.to_string(),
        "-n",
        &per_test.to_string(),
        "-k",
        "0",
        "-t",
        "ping",
        "--csv",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());

    let drops_before = if front == Front::Balancer {
        Some(drop_counters(lab)?)
    } else {
        None
    };
    // The harness's own INFO connections stay outside the nstat window.
    let accepted_before = accepted_so_far(lab)?;
    let nstat_before = nstat(lab.client())?;
    let started = Instant::now();
    let mut child = cmd.spawn().context("spawn redis-benchmark")?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = started + plan.cap;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let nstat_after = nstat(lab.client())?;
    let accepted = accepted_so_far(lab)?.saturating_sub(accepted_before);
    let delta = |name: &str| {
        nstat_after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(nstat_before.get(name).copied().unwrap_or(0))
    };
    let drops = match drops_before {
        Some(before) => drop_counters(lab)?
            .into_iter()
            .map(|(n, v)| {
                let d = v.saturating_sub(before.get(&n).copied().unwrap_or(0));
                (n, d)
            })
            .filter(|(_, d)| *d > 0)
            .collect(),
        None => Vec::new(),
    };
    if let Serving::Haproxy(h) = serving {
        h.ensure_running()?;
    }
    let (outcome, bench_rps) = match status {
        None => (Outcome::Capped, Vec::new()),
        Some(s) if s.success() => match parse_csv(&stdout) {
            Ok(tests) => (
                Outcome::Finished,
                tests.into_iter().map(|t| (t.test, t.rps)).collect(),
            ),
            Err(e) => (Outcome::Failed(e.to_string()), Vec::new()),
        },
        Some(s) => (
            Outcome::Failed(format!("{s}: {}", last_words(&stderr, &stdout))),
            Vec::new(),
        ),
    };
    Ok(ChurnRun {
        front,
        clients,
        run,
        outcome,
        elapsed,
        accepted,
        bench_rps,
        failed_connects: delta("TcpAttemptFails"),
        syn_retransmits: delta("TcpExtTCPSynRetrans"),
        active_opens: delta("TcpActiveOpens"),
        drops,
    })
}

/// What redis-benchmark said last before it gave up: its last line that
/// is not a warning (with `-k 0` it always warns first about
/// `tcp_tw_reuse`, whatever the sysctl says), stderr before stdout.
pub fn last_words(stderr: &str, stdout: &str) -> String {
    let said = |text: &str| {
        text.lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty() && !l.starts_with("WARNING"))
            .map(str::to_string)
    };
    said(stderr)
        .or_else(|| said(stdout))
        .unwrap_or_else(|| "(nothing but warnings)".into())
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

/// Every run (Markdown; also printed).
pub fn runs_table(r: &ChurnResults) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| front | clients | run | new conn/s | ÷ direct | ÷ nftables | established | seconds | outcome | failed connects | SYN retransmits | accepted by the KeyDBs | balancer drops by reason |"
    );
    let _ = writeln!(
        t,
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    );
    for run in &r.runs {
        let direct = r
            .find(Front::Direct, run.clients, run.run)
            .map(|d| d.rate());
        let nft = r
            .find(Front::Nftables, run.clients, run.run)
            .map(|d| d.rate());
        let drops: String = if run.front != Front::Balancer {
            "–".into()
        } else if run.drops.is_empty() {
            "0".into()
        } else {
            run.drops
                .iter()
                .map(|(n, v)| format!("{n} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            run.front.name(),
            run.clients,
            run.run,
            run.rate(),
            ratio(run.rate(), direct.unwrap_or(f64::NAN)),
            ratio(run.rate(), nft.unwrap_or(f64::NAN)),
            run.established(),
            run.elapsed.as_secs_f64(),
            run.outcome.label(),
            run.failed_connects,
            run.syn_retransmits,
            run.accepted,
            drops
        );
    }
    t
}

/// The issue's targets against the runs (Markdown).
pub fn targets_table(r: &ChurnResults) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "| target (issue 9) | measured | met |");
    let _ = writeln!(t, "|---|---|---|");
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    let ours: Vec<&ChurnRun> = r
        .runs
        .iter()
        .filter(|x| x.front == Front::Balancer)
        .collect();
    if ours.is_empty() {
        let _ = writeln!(t, "| (this balancer not measured) | – | – |");
        return t;
    }
    let worst = |other: Front| -> Option<(f64, String)> {
        ours.iter()
            .filter_map(|o| {
                let p = r.find(other, o.clients, o.run)?;
                Some((
                    o.rate() / p.rate(),
                    format!("-c {} run {}", o.clients, o.run),
                ))
            })
            .filter(|(v, _)| v.is_finite())
            .reduce(|a, b| if b.0 < a.0 { b } else { a })
    };
    if let Some((v, at)) = worst(Front::Nftables) {
        let _ = writeln!(
            t,
            "| this balancer ≥ 1.2 × nftables, every run | lowest {v:.2} ({at}) | {} |",
            yes(v >= 1.2)
        );
    }
    if let Some((v, at)) = worst(Front::Direct) {
        let _ = writeln!(
            t,
            "| this balancer ≥ 0.5 × direct, every run | lowest {v:.2} ({at}) | {} |",
            yes(v >= 0.5)
        );
    }
    let dropped: u64 = ours
        .iter()
        .map(|o| o.drop_count("drop_snat_exhausted"))
        .sum();
    let _ = writeln!(
        t,
        "| 0 SYNs dropped (`drop_snat_exhausted`) | {dropped} over {} runs | {} |",
        ours.len(),
        yes(dropped == 0)
    );
    let failed: u64 = ours.iter().map(|o| o.failed_connects).sum();
    let unfinished = ours
        .iter()
        .filter(|o| o.outcome != Outcome::Finished)
        .count();
    let _ = writeln!(
        t,
        "| 0 failed connects | {failed} (client `TcpAttemptFails`); {unfinished} run(s) not finished | {} |",
        yes(failed == 0 && unfinished == 0)
    );
    let mut worst_drift: Option<(f64, u32)> = None;
    for &c in &r.plan.concurrency {
        if let (Some(a), Some(b)) = (r.find(Front::Balancer, c, 1), r.find(Front::Balancer, c, 2)) {
            let d = (b.rate() / a.rate() - 1.0).abs();
            if d.is_finite() && worst_drift.is_none_or(|(w, _)| d > w) {
                worst_drift = Some((d, c));
            }
        }
    }
    if let Some((d, c)) = worst_drift {
        let _ = writeln!(
            t,
            "| run 2 within 10% of run 1 | largest difference {:.0}% (-c {c}) | {} |",
            d * 100.0,
            yes(d <= 0.10)
        );
    }
    t
}

/// The churn section of a report (Markdown), headed at level `##`.
pub fn render(m: &mut String, r: &ChurnResults) {
    let _ = writeln!(m, "## Connection churn (issue 9)\n");
    let _ = writeln!(
        m,
        "`redis-benchmark -k 0 -t ping -n {} -c C` from the client namespace: a new TCP \
         connection for every request, {} connections per run (PING_INLINE then PING_MBULK), \
         two runs back to back per front and concurrency, fronts in turn: {}. Client namespace: \
         `net.ipv4.tcp_tw_reuse=1`, `ip_local_port_range` {CLIENT_PORT_RANGE}. Each run is capped at \
         {} s; a capped run is reported with the rate of the connections it got through. \
         \"new conn/s\" is the connections the client established (`TcpActiveOpens` minus \
         `TcpAttemptFails` of the client namespace, `nstat`) over the run's wall time; failed \
         connects and SYN retransmits are its `TcpAttemptFails` and `TcpExtTCPSynRetrans`; \
         \"accepted by the KeyDBs\" (`total_connections_received` of both) cross-checks the \
         count and also holds the agent's health checks; drops are this balancer's `drop_*` counters (pinned COUNTERS map). \
         Load average before / after: {} / {}. Measured in {:.0} s.\n",
        (r.plan.connections / 2).max(1),
        r.plan.connections,
        r.plan
            .fronts
            .iter()
            .map(|f| format!("{} ({})", f.name(), f.describe()))
            .collect::<Vec<_>>()
            .join(", "),
        r.plan.cap.as_secs(),
        r.loadavg.0,
        r.loadavg.1,
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(m, "{}", targets_table(r));
    let _ = writeln!(m, "{}", runs_table(r));
    for (front, e) in &r.errors {
        let _ = writeln!(
            m,
            "- **{} not measured**: `{}`",
            front.name(),
            e.lines().next().unwrap_or("")
        );
    }
    if !r.errors.is_empty() {
        let _ = writeln!(m);
    }
    let finished_rps: Vec<String> = r
        .runs
        .iter()
        .filter(|x| !x.bench_rps.is_empty())
        .map(|x| {
            format!(
                "{} -c {} run {}: {}",
                x.front.name(),
                x.clients,
                x.run,
                x.bench_rps
                    .iter()
                    .map(|(t, v)| format!("{t} {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    if !finished_rps.is_empty() {
        let _ = writeln!(
            m,
            "redis-benchmark's own requests/s per test of the runs that finished: {}.\n",
            finished_rps.join("; ")
        );
    }
    let _ = writeln!(
        m,
        "nftables ruleset (node 1):\n\n```\n{}```\n",
        r.nft_ruleset
    );
}

/// Raw figures as JSON.
pub fn to_json(r: &ChurnResults) -> serde_json::Value {
    use serde_json::json;
    json!({
        "connections_per_run": r.plan.connections,
        "concurrency": r.plan.concurrency,
        "runs_per_front": r.plan.runs,
        "cap_s": r.plan.cap.as_secs_f64(),
        "xdp": r.plan.xdp.agent_mode(),
        "elapsed_s": r.elapsed.as_secs_f64(),
        "loadavg": [r.loadavg.0, r.loadavg.1],
        "errors": r.errors.iter().map(|(f, e)| json!([f.name(), e])).collect::<Vec<_>>(),
        "runs": r.runs.iter().map(|x| json!({
            "front": x.front.name(),
            "clients": x.clients,
            "run": x.run,
            "outcome": match &x.outcome {
                Outcome::Finished => "finished".to_string(),
                Outcome::Capped => "capped".to_string(),
                Outcome::Failed(e) => format!("failed: {e}"),
            },
            "elapsed_s": x.elapsed.as_secs_f64(),
            "established": x.established(),
            "accepted_by_servers": x.accepted,
            "new_connections_per_s": x.rate(),
            "redis_benchmark_rps": x.bench_rps.iter().map(|(t, v)| json!([t, v])).collect::<Vec<_>>(),
            "failed_connects": x.failed_connects,
            "syn_retransmits": x.syn_retransmits,
            "active_opens": x.active_opens,
            "drops": x.drops.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(front: Front, clients: u32, run: usize, accepted: u64, secs: u64) -> ChurnRun {
        ChurnRun {
            front,
            clients,
            run,
            outcome: Outcome::Finished,
            elapsed: Duration::from_secs(secs),
            accepted,
            bench_rps: vec![("PING_INLINE".into(), 1.0)],
            failed_connects: 0,
            syn_retransmits: 3,
            active_opens: accepted,
            drops: if front == Front::Balancer {
                vec![("drop_snat_exhausted".into(), 7)]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn nstat_lines_parse() {
        let out = "#kernel\nTcpActiveOpens                  1234               0.0\nTcpExtTCPSynRetrans             5                  0.0\n";
        let m = parse_nstat(out);
        assert_eq!(m["TcpActiveOpens"], 1234);
        assert_eq!(m["TcpExtTCPSynRetrans"], 5);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn failure_message_skips_the_keepalive_warning() {
        let stderr = "WARNING: Keepalive disabled. You probably need 'echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse'\n\
                      Error: Server closed the connection\n";
        assert_eq!(
            last_words(stderr, ""),
            "Error: Server closed the connection"
        );
        assert_eq!(last_words("WARNING: x\n", "\n"), "(nothing but warnings)");
        assert_eq!(last_words("", "Could not connect\n"), "Could not connect");
    }

    #[test]
    fn ruleset_balances_over_both_nodes() {
        let r = nft_ruleset();
        assert!(
            r.contains("numgen inc mod 2 map { 0 : 198.18.0.1, 1 : 198.18.0.2 }"),
            "{r}"
        );
        assert!(r.contains("ip daddr 198.18.0.100 tcp dport 6380"), "{r}");
        assert!(r.contains("masquerade"), "{r}");
        assert!(r.contains(&format!("table ip {NFT_TABLE}")), "{r}");
    }

    #[test]
    fn tables_and_ratios() {
        let mut runs = Vec::new();
        for n in 1..=2 {
            runs.push(run(Front::Direct, 50, n, 30_000, 1));
            runs.push(run(Front::Balancer, 50, n, 600 * n as u64, 1));
            runs.push(run(Front::Nftables, 50, n, 15_000, 1));
        }
        runs[4].outcome = Outcome::Capped;
        let r = ChurnResults {
            plan: ChurnPlan::quick(LabXdp::Generic),
            runs,
            errors: vec![(Front::Haproxy, "boom".into())],
            loadavg: (String::new(), String::new()),
            elapsed: Duration::from_secs(1),
            nft_ruleset: nft_ruleset(),
            haproxy_config: String::new(),
        };
        let t = runs_table(&r);
        assert!(
            t.contains("| this balancer | 50 | 1 | 600 | 0.02 | 0.04 | 600 |"),
            "{t}"
        );
        assert!(t.contains("**unfinished** (capped)"), "{t}");
        assert!(t.contains("| drop_snat_exhausted 7 |"), "{t}");
        assert!(t.contains("| 30000 | – |"), "{t}");
        let targets = targets_table(&r);
        assert!(
            targets.contains("lowest 0.04 (-c 50 run 1) | **no**"),
            "{targets}"
        );
        assert!(targets.contains("| 14 over 2 runs | **no** |"), "{targets}");
        assert!(
            targets.contains("largest difference 100% (-c 50)"),
            "{targets}"
        );
        let mut md = String::new();
        render(&mut md, &r);
        assert!(md.contains("**HAProxy not measured**: `boom`"), "{md}");
        let json = to_json(&r);
        assert_eq!(json["runs"][1]["established"], 600);
        assert_eq!(json["runs"][4]["outcome"], "capped");
    }
}
