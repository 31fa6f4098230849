//! Failover (issue 4, item 4): what a client sees when the node holding
//! the VIP is lost, for our agents and for the keepalived + HAProxy setup
//! they replace.
//!
//! Each [`Setup`] gets its own 2-node lab ([`crate::lab`]) with a KeyDB
//! (redis-server) on both nodes and a client [`WriterLoop`] that `SET`s
//! through VIP:6380 every 2 ms with a 100 ms timeout per command,
//! reconnecting at once after any error. A trial:
//!
//! 1. the VIP is on node 1 (priority 150, preemption on) and every
//!    balancer sees both KeyDBs up; the writer is writing; trial k of n
//!    waits another (k - 1)/n s ([`cut_offset`]) so the cuts fall at
//!    different points of the advert interval;
//! 2. **hard node loss**: node 1's bridge port goes down
//!    ([`Lab::cut_link`]), as if its cable were pulled;
//! 3. node 2 takes the VIP; once the writer has made 500 more writes (1 s
//!    of traffic) the trial's figures are read from its record: the
//!    longest time between two successful writes around the cut and the
//!    commands that failed;
//! 4. the link comes back ([`Lab::restore_link`]); node 1 takes the VIP
//!    back (preemption; its gap is recorded too) and the trial ends when
//!    node 1 alone has held it for a few adverts, every balancer sees both
//!    KeyDBs up again and the writer writes.
//!
//! Setups:
//!
//! - (i) our agents, `[vrrp]` priorities 150 / 100 with everything else
//!   at its default (VRRPv3, 100 ms adverts) and a default `[health]`;
//! - (ii) keepalived + HAProxy as users run them: keepalived VRRPv2,
//!   `advert_int 1`, `auth_type PASS` / `auth_pass 1111` (the seed), and on
//!   each node an HAProxy bound to VIP:6380 (`net.ipv4.ip_nonlocal_bind=1`,
//!   so the backup's HAProxy is bound before it holds the VIP) balancing
//!   round-robin over both KeyDBs with a PING check `inter 2s fall 3 rise
//!   2`; each KeyDB is bound to its node's own address so VIP:6380 is
//!   free for HAProxy;
//! - (iii) the same tuned: VRRPv3 `advert_int 0.1`, `check inter 100ms
//!   fall 3 rise 2`.
//!
//! Waits poll a condition with a deadline (VIP holders with `ip addr`,
//! our agents' SERVICES maps, HAProxy's `show stat`); nothing sleeps to
//! synchronise. Everything runs in the lab's namespaces and is removed when
//! the lab drops, also on error or interruption.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab::{
    node_addr, AgentConfig, KeepalivedConfig, Lab, WriterConfig, WriterLoop, WriterReport,
    KEYDB_PORT,
};

use super::{
    haproxy::{CheckTiming, Haproxy},
    lab_run::{config_set_bind, haproxy_config, LabXdp},
};

/// Writes that must succeed after the VIP moved before a trial's figures
/// are read (1 s of traffic at one write per 2 ms).
const WRITES_AFTER: usize = 500;
/// Writes that prove the path through the VIP works before a cut.
const WRITES_BEFORE: usize = 200;
/// How long the writer may take to make [`WRITES_AFTER`] writes.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the backup may take to hold the VIP after the cut.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the first election, the take-back after a trial and the
/// balancers' view of the backends may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval of the settle checks.
const POLL: Duration = Duration::from_millis(50);
/// Priorities of node 1 (the holder) and node 2.
const PRIORITIES: [u8; 2] = [150, 100];
/// The cut of trial k of n comes `(k - 1) / n` of this after the cluster
/// settled (see [`cut_offset`]): the longest advert interval of the setups.
const PHASE_SPAN: Duration = Duration::from_secs(1);

/// How long after the cluster settled trial `number` of `count` cuts the
/// link. A backup takes over `Master_Down_Interval` after the *last advert
/// it received*, so the client's gap depends on where in the advert
/// interval the cut falls (up to a whole interval: 1 s with keepalived's
/// default). Settling ends at a moment tied to the adverts (the holder's
/// take-back), so cutting right away would sample the same phase every
/// trial; spreading the cuts evenly over [`PHASE_SPAN`] samples the whole
/// interval instead. A deliberate delay, not a synchronisation.
pub fn cut_offset(number: usize, count: usize) -> Duration {
    let count = count.max(1) as u32;
    let k = (number.max(1) - 1) as u32 % count;
    PHASE_SPAN * k / count
}

/// One failover configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// (i) our agents with default `[vrrp]` (but the priorities) and
    /// `[health]`.
    Agents,
    /// (ii) keepalived VRRPv2 `advert_int 1` + HAProxy `inter 2s fall 3
    /// rise 2`.
    KeepalivedDefault,
    /// (iii) keepalived VRRPv3 `advert_int 0.1` + HAProxy `inter 100ms
    /// fall 3 rise 2`.
    KeepalivedTuned,
}

impl Setup {
    pub const ALL: [Setup; 3] = [
        Setup::Agents,
        Setup::KeepalivedDefault,
        Setup::KeepalivedTuned,
    ];

    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Setup::Agents => "(i) our agents, defaults",
            Setup::KeepalivedDefault => "(ii) keepalived + HAProxy, defaults",
            Setup::KeepalivedTuned => "(iii) keepalived + HAProxy, tuned",
        }
    }

    /// The settings, for the report.
    pub fn settings(self) -> &'static str {
        match self {
            Setup::Agents => {
                "`balancer run` on both nodes: `[vrrp]` vrid 101, priority 150 / 100, every other key \
                 at its default (VRRPv3, advert 100 ms, preempt); `[health]` at its defaults \
                 (interval 100 ms, timeout 100 ms, fall 3, rise 2)"
            }
            Setup::KeepalivedDefault => {
                "keepalived VRRPv2, advert_int 1, auth_type PASS / auth_pass 1111, vrid 101, \
                 priority 150 / 100 (preempt); HAProxy on both nodes bound to VIP:6380 \
                 (ip_nonlocal_bind=1), roundrobin over both KeyDBs, PING check inter 2s fall 3 rise 2"
            }
            Setup::KeepalivedTuned => {
                "keepalived VRRPv3, advert_int 0.1, vrid 101, priority 150 / 100 (preempt); HAProxy \
                 as in (ii) with check inter 100ms fall 3 rise 2"
            }
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Setup::Agents => "Fa",
            Setup::KeepalivedDefault => "Fk",
            Setup::KeepalivedTuned => "Ft",
        }
    }

    fn keepalived(self, priority: u8) -> Option<KeepalivedConfig> {
        match self {
            Setup::Agents => None,
            Setup::KeepalivedDefault => Some(KeepalivedConfig::seed_v2(priority)),
            Setup::KeepalivedTuned => Some(KeepalivedConfig::v3(priority)),
        }
    }

    fn checks(self) -> CheckTiming {
        match self {
            Setup::KeepalivedTuned => CheckTiming::fast(),
            _ => CheckTiming::default(),
        }
    }

    /// How long the holder must stay alone to count as settled: three
    /// adverts, at least 1 s.
    fn stable_for(self) -> Duration {
        match self {
            Setup::KeepalivedDefault => Duration::from_secs(3),
            Setup::Agents | Setup::KeepalivedTuned => Duration::from_secs(1),
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct FailoverPlan {
    /// Trials per setup (at least 5 for the report).
    pub trials: usize,
    pub setups: Vec<Setup>,
    /// How the agents run XDP (and whether the bridge ports carry
    /// `xdp_pass`), as in the end-to-end part.
    pub xdp: LabXdp,
}

impl FailoverPlan {
    pub fn full(xdp: LabXdp) -> Self {
        FailoverPlan {
            trials: 5,
            setups: Setup::ALL.to_vec(),
            xdp,
        }
    }

    /// One trial of each setup (about 40 s in all).
    pub fn quick(xdp: LabXdp) -> Self {
        FailoverPlan {
            trials: 1,
            ..FailoverPlan::full(xdp)
        }
    }
}

/// One hard node loss.
#[derive(Clone, Debug)]
pub struct Trial {
    pub number: usize,
    /// The node whose link was cut (the holder).
    pub cut: usize,
    /// When the other node was first seen holding the VIP, after the cut
    /// (polled every ~10 ms).
    pub takeover: Duration,
    /// The client's view from the cut until 500 writes after the takeover.
    pub client: WriterReport,
    /// The client's longest gap from the link's return until the cluster
    /// settled again (node 1 takes the VIP back).
    pub rejoin_gap: Duration,
}

/// The trials of one setup; `error` if it stopped early.
#[derive(Clone, Debug)]
pub struct SetupResult {
    pub setup: Setup,
    pub trials: Vec<Trial>,
    pub error: Option<String>,
    pub elapsed: Duration,
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2),
    }
}

impl SetupResult {
    pub fn median_gap(&self) -> Option<Duration> {
        median(self.trials.iter().map(|t| t.client.longest_gap).collect())
    }

    pub fn max_gap(&self) -> Option<Duration> {
        self.trials.iter().map(|t| t.client.longest_gap).max()
    }

    pub fn median_takeover(&self) -> Option<Duration> {
        median(self.trials.iter().map(|t| t.takeover).collect())
    }

    pub fn median_rejoin_gap(&self) -> Option<Duration> {
        median(self.trials.iter().map(|t| t.rejoin_gap).collect())
    }

    pub fn failed_commands(&self) -> usize {
        self.trials.iter().map(|t| t.client.failed_commands).sum()
    }

    pub fn failed_connects(&self) -> usize {
        self.trials.iter().map(|t| t.client.failed_connects).sum()
    }
}

/// Everything the failover part produced.
#[derive(Clone, Debug)]
pub struct FailoverResults {
    pub plan: FailoverPlan,
    pub setups: Vec<SetupResult>,
    /// `/proc/loadavg` before and after.
    pub loadavg: (String, String),
    pub elapsed: Duration,
    /// The HAProxy config of (ii) and the keepalived.conf of node 1 in
    /// (ii) and (iii), for the report.
    pub configs: Vec<(String, String)>,
}

impl FailoverResults {
    /// Whether every setup ran all its trials.
    pub fn complete(&self) -> bool {
        self.setups
            .iter()
            .all(|s| s.error.is_none() && s.trials.len() == self.plan.trials)
    }
}

/// What the failover part of the benchmark reports.
#[derive(Clone, Debug)]
pub enum FailoverStatus {
    /// Not run (`--only` another part).
    NotRun,
    Measured(FailoverResults),
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn ms_opt(d: Option<Duration>) -> String {
    d.map(ms).unwrap_or_else(|| "–".into())
}

impl FailoverStatus {
    /// The summary table (Markdown; also printed), or one line.
    pub fn summary(&self) -> String {
        match self {
            FailoverStatus::NotRun => "Failover: not run in this invocation.\n".into(),
            FailoverStatus::Measured(r) => summary_table(r),
        }
    }
}

/// Per setup: median and max longest gap, failed commands, every trial's
/// gap.
pub fn summary_table(r: &FailoverResults) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| setup | trials | longest client gap, median ms | longest client gap, max ms | failed commands (all trials) | failed connects (all trials) | each trial's longest gap, ms | VIP on node 2 after, median ms | gap when node 1 returns, median ms |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---|---:|---:|");
    for s in &r.setups {
        let _ = writeln!(
            t,
            "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} |",
            s.setup.name(),
            s.trials.len(),
            if s.error.is_some() { " (stopped)" } else { "" },
            ms_opt(s.median_gap()),
            ms_opt(s.max_gap()),
            s.failed_commands(),
            s.failed_connects(),
            s.trials
                .iter()
                .map(|t| ms(t.client.longest_gap))
                .collect::<Vec<_>>()
                .join(", "),
            ms_opt(s.median_takeover()),
            ms_opt(s.median_rejoin_gap()),
        );
    }
    t
}

/// Every trial (Markdown).
pub fn trials_table(r: &FailoverResults) -> String {
    use std::fmt::Write as _;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| setup | trial | VIP on the other node after ms | longest client gap ms | failed commands | failed connects | new connections | gap when node 1 returns ms | first errors the client saw |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for s in &r.setups {
        for tr in &s.trials {
            let errors: Vec<String> = tr
                .client
                .errors
                .iter()
                .take(4)
                .map(|(_, e)| e.clone())
                .collect();
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.setup.name(),
                tr.number,
                ms(tr.takeover),
                ms(tr.client.longest_gap),
                tr.client.failed_commands,
                tr.client.failed_connects,
                tr.client.connects,
                ms(tr.rejoin_gap),
                if errors.is_empty() {
                    "–".into()
                } else {
                    errors.join("; ")
                }
            );
        }
    }
    t
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs every setup of `plan`. A setup that fails keeps the trials it
/// finished and records the error; the others still run. Fails only when
/// interrupted.
pub fn measure(plan: FailoverPlan, interrupted: &dyn Fn() -> bool) -> Result<FailoverResults> {
    let started = Instant::now();
    let before = loadavg();
    let mut setups = Vec::new();
    let mut configs = Vec::new();
    for &setup in &plan.setups {
        if interrupted() {
            bail!("interrupted");
        }
        println!("  {}: {}", setup.name(), setup.settings());
        let t0 = Instant::now();
        let mut trials = Vec::new();
        let outcome = run_setup(setup, &plan, &mut trials, &mut configs, interrupted);
        if interrupted() {
            bail!("interrupted");
        }
        let error = outcome.err().map(|e| format!("{e:#}"));
        if let Some(e) = &error {
            eprintln!(
                "  {}: stopped after {} trial(s): {e}",
                setup.name(),
                trials.len()
            );
        }
        setups.push(SetupResult {
            setup,
            trials,
            error,
            elapsed: t0.elapsed(),
        });
    }
    Ok(FailoverResults {
        plan,
        setups,
        loadavg: (before, loadavg()),
        elapsed: started.elapsed(),
        configs,
    })
}

/// The balancers of one setup, running in the lab.
enum Balancers {
    Agents,
    /// HAProxy on node 1 and node 2 (keepalived runs under the lab).
    Haproxy(Vec<Haproxy>),
}

fn run_setup(
    setup: Setup,
    plan: &FailoverPlan,
    trials: &mut Vec<Trial>,
    configs: &mut Vec<(String, String)>,
    interrupted: &dyn Fn() -> bool,
) -> Result<()> {
    // Declared first, dropped last: the HAProxies and the writer go
    // before the lab's namespaces.
    let mut lab = plan.xdp.lab(setup.tag())?;
    lab.start_servers()?;
    let balancers = start_balancers(&mut lab, setup, plan, configs)?;
    let result = trials_on(&lab, setup, &balancers, plan.trials, trials, interrupted);
    if result.is_err() {
        if let Balancers::Haproxy(hs) = &balancers {
            for (i, h) in hs.iter().enumerate() {
                eprintln!(
                    "--- haproxy log, node {} ---\n{}",
                    i + 1,
                    tail(&h.log_text(), 20)
                );
            }
        }
    }
    drop(balancers);
    result
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn start_balancers(
    lab: &mut Lab,
    setup: Setup,
    plan: &FailoverPlan,
    configs: &mut Vec<(String, String)>,
) -> Result<Balancers> {
    match setup {
        Setup::Agents => {
            for (i, &priority) in PRIORITIES.iter().enumerate() {
                let mut config = AgentConfig::for_cluster(lab, priority);
                config.xdp_mode = plan.xdp.agent_mode().into();
                lab.start_agent(i + 1, &config)?;
            }
            Ok(Balancers::Agents)
        }
        Setup::KeepalivedDefault | Setup::KeepalivedTuned => {
            let mut haproxies = Vec::new();
            for node in 1..=2 {
                lab.node(node)
                    .ns()
                    .sysctl("net.ipv4.ip_nonlocal_bind", "1")?;
                config_set_bind(lab, node, &node_addr(node).to_string())?;
                let dir = lab.dir().join(format!("n{node}-haproxy"));
                fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
                let config = haproxy_config(setup.checks(), Some(dir.join("stats.sock")));
                if node == 1 {
                    configs.push((
                        format!("HAProxy, {} (both nodes)", setup.name()),
                        config.to_config(),
                    ));
                }
                haproxies.push(Haproxy::start(lab.node(node), &config, &dir, None)?);
            }
            for (i, &priority) in PRIORITIES.iter().enumerate() {
                let conf = setup
                    .keepalived(priority)
                    .expect("keepalived setups have a keepalived config");
                if i == 0 {
                    configs.push((
                        format!("keepalived.conf, {} (node 1)", setup.name()),
                        conf.to_conf(1),
                    ));
                }
                lab.start_keepalived(i + 1, &conf)?;
            }
            Ok(Balancers::Haproxy(haproxies))
        }
    }
}

fn trials_on(
    lab: &Lab,
    setup: Setup,
    balancers: &Balancers,
    count: usize,
    trials: &mut Vec<Trial>,
    interrupted: &dyn Fn() -> bool,
) -> Result<()> {
    settle(lab, setup, balancers).context("the cluster did not settle after starting")?;
    let writer = WriterLoop::start(lab.client(), WriterConfig::default())?;
    writer.wait_for_writes(WRITES_BEFORE, Duration::from_secs(10))?;
    for number in 1..=count {
        if interrupted() {
            bail!("interrupted");
        }
        let trial = one_trial(lab, setup, balancers, &writer, number, count)
            .with_context(|| format!("{}, trial {number}", setup.name()))?;
        println!(
            "  {} trial {number}: VIP on node 2 after {} ms; client: {}; when node 1 returned: longest gap {} ms",
            setup.name(),
            ms(trial.takeover),
            trial.client,
            ms(trial.rejoin_gap)
        );
        trials.push(trial);
    }
    writer.stop()?;
    Ok(())
}

fn one_trial(
    lab: &Lab,
    setup: Setup,
    balancers: &Balancers,
    writer: &WriterLoop,
    number: usize,
    count: usize,
) -> Result<Trial> {
    let holder = lab.vip_holder()?.context("no single node holds the VIP")?;
    let other = 3 - holder;
    writer.wait_for_writes(WRITES_BEFORE, Duration::from_secs(10))?;
    std::thread::sleep(cut_offset(number, count));

    lab.cut_link(holder)?;
    let cut = Instant::now();
    let (_, moved) = lab.wait_for_holders(
        &format!("node {other} takes the VIP after node {holder}'s link is cut"),
        TAKEOVER_TIMEOUT,
        |h| h.contains(&other),
    )?;
    writer
        .wait_for_writes(WRITES_AFTER, RECOVERY_TIMEOUT)
        .context("the client did not recover after the failover")?;
    let client = writer.report_since(cut);

    lab.restore_link(holder)?;
    let restored = Instant::now();
    settle(lab, setup, balancers).context("the cluster did not settle after the link returned")?;
    writer.wait_for_writes(WRITES_BEFORE, Duration::from_secs(10))?;
    let rejoin_gap = writer.report_since(restored).longest_gap;
    Ok(Trial {
        number,
        cut: holder,
        takeover: moved - cut,
        client,
        rejoin_gap,
    })
}

/// Waits until node 1 (the highest priority; preemption is on) alone holds
/// the VIP for the setup's stable period and every balancer sees both
/// KeyDBs up.
fn settle(lab: &Lab, setup: Setup, balancers: &Balancers) -> Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    lab.wait_for_sole_holder(1, SETTLE_TIMEOUT, setup.stable_for())?;
    let both: Vec<std::net::SocketAddrV4> = (1..=2)
        .map(|n| std::net::SocketAddrV4::new(node_addr(n), KEYDB_PORT))
        .collect();
    match balancers {
        Balancers::Agents => {
            for node in 1..=2 {
                let remaining = deadline.saturating_duration_since(Instant::now());
                lab.wait_for_service(
                    node,
                    &format!("node {node}'s agent sees both KeyDBs READY"),
                    remaining,
                    |v| both.iter().all(|b| v.ready.contains(b)) && (node != 1 || v.active),
                )?;
            }
        }
        Balancers::Haproxy(hs) => {
            for (i, h) in hs.iter().enumerate() {
                loop {
                    let states = h.server_states();
                    if let Ok(s) = &states {
                        if s.len() == 2 && s.iter().all(|s| s.is_up()) {
                            break;
                        }
                    }
                    if Instant::now() >= deadline {
                        bail!(
                            "HAProxy on node {} does not see both KeyDBs UP within {SETTLE_TIMEOUT:?}: {states:?}",
                            i + 1
                        );
                    }
                    std::thread::sleep(POLL);
                }
            }
        }
    }
    // Still node 1 alone after the backends came up.
    lab.expect_holders_for(&[1], Duration::ZERO)?;
    Ok(())
}

/// Raw figures as JSON.
pub fn to_json(status: &FailoverStatus) -> serde_json::Value {
    use serde_json::json;
    let FailoverStatus::Measured(r) = status else {
        return json!(null);
    };
    let secs = |d: Duration| d.as_secs_f64();
    json!({
        "trials_per_setup": r.plan.trials,
        "xdp": r.plan.xdp.agent_mode(),
        "elapsed_s": secs(r.elapsed),
        "loadavg": [r.loadavg.0, r.loadavg.1],
        "setups": r.setups.iter().map(|s| json!({
            "setup": s.setup.name(),
            "settings": s.setup.settings(),
            "error": s.error,
            "elapsed_s": secs(s.elapsed),
            "median_longest_gap_s": s.median_gap().map(secs),
            "max_longest_gap_s": s.max_gap().map(secs),
            "failed_commands": s.failed_commands(),
            "failed_connects": s.failed_connects(),
            "trials": s.trials.iter().map(|t| json!({
                "trial": t.number,
                "cut_node": t.cut,
                "takeover_s": secs(t.takeover),
                "longest_gap_s": secs(t.client.longest_gap),
                "longest_gap_from_s": secs(t.client.longest_gap_span.0),
                "longest_gap_to_s": secs(t.client.longest_gap_span.1),
                "writes": t.client.writes,
                "failed_commands": t.client.failed_commands,
                "failed_connects": t.client.failed_connects,
                "connects": t.client.connects,
                "errors": t.client.errors.iter().map(|(at, e)| json!([secs(*at), e])).collect::<Vec<_>>(),
                "rejoin_longest_gap_s": secs(t.rejoin_gap),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(gap_ms: u64, failed: usize) -> WriterReport {
        WriterReport {
            window: Duration::from_secs(2),
            writes: 500,
            failed_commands: failed,
            connects: 1,
            failed_connects: 2,
            longest_gap: Duration::from_millis(gap_ms),
            longest_gap_span: (Duration::from_secs(1), Duration::from_secs(2)),
            errors: vec![(Duration::from_secs(1), "command: timed out".into())],
        }
    }

    fn trial(number: usize, gap_ms: u64, failed: usize) -> Trial {
        Trial {
            number,
            cut: 1,
            takeover: Duration::from_millis(gap_ms / 2),
            client: report(gap_ms, failed),
            rejoin_gap: Duration::from_millis(20),
        }
    }

    #[test]
    fn medians_maxima_and_tables() {
        let r = FailoverResults {
            plan: FailoverPlan::full(LabXdp::Native),
            setups: vec![
                SetupResult {
                    setup: Setup::Agents,
                    trials: vec![trial(1, 300, 1), trial(2, 100, 0), trial(3, 200, 1)],
                    error: None,
                    elapsed: Duration::from_secs(9),
                },
                SetupResult {
                    setup: Setup::KeepalivedDefault,
                    trials: vec![trial(1, 4000, 2), trial(2, 3000, 1)],
                    error: Some("boom".into()),
                    elapsed: Duration::from_secs(9),
                },
            ],
            loadavg: (String::new(), String::new()),
            elapsed: Duration::from_secs(18),
            configs: Vec::new(),
        };
        let a = &r.setups[0];
        assert_eq!(a.median_gap(), Some(Duration::from_millis(200)));
        assert_eq!(a.max_gap(), Some(Duration::from_millis(300)));
        assert_eq!(a.failed_commands(), 2);
        assert_eq!(a.failed_connects(), 6);
        assert_eq!(r.setups[1].median_gap(), Some(Duration::from_millis(3500)));
        assert!(!r.complete());
        let table = summary_table(&r);
        assert!(
            table.contains("| (i) our agents, defaults | 3 | 200 | 300 | 2 | 6 | 300, 100, 200 |"),
            "{table}"
        );
        assert!(table.contains("| 2 (stopped) | 3500 | 4000 |"), "{table}");
        let trials = trials_table(&r);
        assert_eq!(trials.lines().count(), 2 + 5, "{trials}");
        let json = to_json(&FailoverStatus::Measured(r));
        assert_eq!(json["setups"][0]["trials"][1]["longest_gap_s"], 0.1);
        assert_eq!(to_json(&FailoverStatus::NotRun), serde_json::Value::Null);
    }

    #[test]
    fn cuts_spread_over_one_advert_interval() {
        let offsets: Vec<u128> = (1..=5).map(|k| cut_offset(k, 5).as_millis()).collect();
        assert_eq!(offsets, [0, 200, 400, 600, 800]);
        assert_eq!(cut_offset(1, 1), Duration::ZERO);
        assert_eq!(cut_offset(0, 0), Duration::ZERO);
    }

    #[test]
    fn setups_differ_where_the_issue_says() {
        assert_eq!(
            Setup::KeepalivedDefault.keepalived(150).unwrap().advert_int,
            "1"
        );
        let tuned = Setup::KeepalivedTuned.keepalived(150).unwrap();
        assert_eq!((tuned.version, tuned.advert_int.as_str()), (3, "0.1"));
        assert_eq!(Setup::KeepalivedDefault.checks().inter, "2s");
        assert_eq!(Setup::KeepalivedTuned.checks().inter, "100ms");
        assert!(Setup::Agents.keepalived(150).is_none());
        assert_eq!(FailoverPlan::quick(LabXdp::Native).trials, 1);
        assert!(FailoverPlan::full(LabXdp::Native).trials >= 5);
    }
}
