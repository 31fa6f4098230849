//! Reconnect storm (issue 9, item 3): many clients connected through the
//! VIP, the master's link is cut, and every client reconnects at once to
//! the new master.
//!
//! A 2-node lab with our agents in cluster mode (VRRP priorities 150 / 100,
//! defaults otherwise, as in [`super::failover`]) and a KeyDB on each node.
//! From the client namespace, one tokio task per client connects to
//! VIP:6380 and checks the connection with PING (at most
//! [`CONNECT_PARALLEL`] connects in flight while they are set up). Then
//! node 1's bridge port goes down; as soon as node 2 is seen holding the
//! VIP (polled every ~10 ms) every task drops its connection and
//! reconnects, all at once: connect and PING, each attempt bounded by
//! [`ATTEMPT_TIMEOUT`], retried after [`RETRY_PAUSE`] until
//! [`StormPlan::deadline`] after the move. Reported: how many reconnected,
//! and the time from the VIP move to each client's successful PING
//! (median, p99, last), with the client's SYN retransmits and node 2's
//! data-plane drop counters over the storm.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_user::stats::PinnedMaps;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{watch, Semaphore},
};

use crate::lab::{node_addr, spawn_in_netns, vip_keydb, AgentConfig, Lab, KEYDB_PORT};

use super::lab_run::LabXdp;

/// Priorities of node 1 (the master at the start) and node 2.
const PRIORITIES: [u8; 2] = [150, 100];
/// Connects in flight while the clients first connect: the servers'
/// accept backlog (511) is not what this scenario measures.
const CONNECT_PARALLEL: usize = 100;
/// Bound of each connect and of each PING's reply.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed reconnect attempt before the next.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// How long the cluster may take to settle, and the clients to connect.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long node 2 may take to hold the VIP after the cut.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// How much to run.
#[derive(Clone, Debug)]
pub struct StormPlan {
    pub clients: usize,
    /// How long after the VIP move a client may keep trying.
    pub deadline: Duration,
    pub xdp: LabXdp,
}

impl StormPlan {
    pub fn full(xdp: LabXdp) -> Self {
        StormPlan {
            clients: 2_000,
            deadline: Duration::from_secs(30),
            xdp,
        }
    }

    pub fn quick(xdp: LabXdp) -> Self {
        StormPlan {
            clients: 50,
            deadline: Duration::from_secs(15),
            xdp,
        }
    }
}

/// What one client saw after the move.
#[derive(Clone, Debug)]
struct ClientOutcome {
    /// From the VIP move to its successful PING; `None`: never within the
    /// deadline.
    reconnected: Option<Duration>,
    attempts: u32,
    last_error: Option<String>,
}

/// The storm's figures.
#[derive(Clone, Debug)]
pub struct StormResults {
    pub plan: StormPlan,
    /// Clients connected (PING answered) before the cut.
    pub connected_before: usize,
    /// From the cut to node 2 seen holding the VIP.
    pub takeover: Duration,
    /// Per client that reconnected: time from the VIP move, sorted.
    pub reconnect_times: Vec<Duration>,
    pub failed: usize,
    /// Connect attempts of every client after the move.
    pub attempts: u64,
    /// Up to 5 distinct errors the clients saw, with counts.
    pub errors: Vec<(String, usize)>,
    /// Client `TcpExtTCPSynRetrans` over the storm.
    pub syn_retransmits: u64,
    /// Node 2's `drop_*` counters over the storm (non-zero ones).
    pub drops: Vec<(String, u64)>,
    pub elapsed: Duration,
}

impl StormResults {
    pub fn succeeded(&self) -> usize {
        self.reconnect_times.len()
    }

    /// The `q` quantile (nearest rank) of the reconnect times.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.reconnect_times.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.reconnect_times[rank - 1])
    }

    pub fn last(&self) -> Option<Duration> {
        self.reconnect_times.last().copied()
    }
}

fn drop_counters(pin_dir: &std::path::Path) -> Result<BTreeMap<String, u64>> {
    let maps = PinnedMaps::open(pin_dir).context("open the pinned maps")?;
    let snap = maps.traffic().context("read the counters")?;
    Ok(snap
        .counters
        .into_iter()
        .filter(|(n, _)| n.starts_with("drop_"))
        .map(|(n, v)| (n.to_string(), v))
        .collect())
}

fn syn_retransmits(lab: &Lab) -> Result<u64> {
    let out = lab
        .client()
        .exec(&["nstat", "-asz", "TcpExtTCPSynRetrans"])?;
    Ok(super::churn::parse_nstat(&out)
        .get("TcpExtTCPSynRetrans")
        .copied()
        .unwrap_or(0))
}

/// One connect + PING within [`ATTEMPT_TIMEOUT`] each.
async fn connect_and_ping(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut s = tokio::time::timeout(ATTEMPT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect: timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.write_all(b"PING\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 7];
    tokio::time::timeout(ATTEMPT_TIMEOUT, s.read_exact(&mut buf))
        .await
        .map_err(|_| "PING: timed out".to_string())?
        .map_err(|e| format!("PING: {e}"))?;
    if &buf != b"+PONG\r\n" {
        return Err(format!(
            "PING: answered {:?}",
            String::from_utf8_lossy(&buf)
        ));
    }
    Ok(s)
}

/// The client side, on its own thread in the client's namespace: connects
/// every client, reports how many made it, waits for the move, reconnects
/// them all.
fn clients(
    count: usize,
    deadline: Duration,
    connected: std::sync::mpsc::Sender<usize>,
    moved: watch::Receiver<Option<Instant>>,
) -> Result<Vec<ClientOutcome>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build a tokio runtime")?;
    rt.block_on(async move {
        let addr = vip_keydb();
        let gate = Arc::new(Semaphore::new(CONNECT_PARALLEL));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let mut tasks = Vec::with_capacity(count);
        for _ in 0..count {
            let gate = gate.clone();
            let ready = ready_tx.clone();
            let mut moved = moved.clone();
            tasks.push(tokio::spawn(async move {
                let first = {
                    let _permit = gate.acquire().await;
                    connect_and_ping(addr).await
                };
                let _ = ready.send(first.is_ok());
                // Held until the move, then dropped: the storm opens new ones.
                let held = first.ok();
                let at = loop {
                    if let Some(at) = *moved.borrow_and_update() {
                        break at;
                    }
                    if moved.changed().await.is_err() {
                        return ClientOutcome {
                            reconnected: None,
                            attempts: 0,
                            last_error: Some("the harness went away".into()),
                        };
                    }
                };
                drop(held);
                let mut attempts = 0;
                let mut last_error = None;
                while at.elapsed() < deadline {
                    attempts += 1;
                    match connect_and_ping(addr).await {
                        Ok(_) => {
                            return ClientOutcome {
                                reconnected: Some(at.elapsed()),
                                attempts,
                                last_error,
                            }
                        }
                        Err(e) => {
                            last_error = Some(e);
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                    }
                }
                ClientOutcome {
                    reconnected: None,
                    attempts,
                    last_error,
                }
            }));
        }
        drop(ready_tx);
        let mut ok = 0;
        let mut seen = 0;
        while let Some(r) = ready_rx.recv().await {
            seen += 1;
            ok += usize::from(r);
            if seen == count {
                break;
            }
        }
        let _ = connected.send(ok);
        let mut outcomes = Vec::with_capacity(count);
        for t in tasks {
            outcomes.push(t.await.context("client task")?);
        }
        Ok(outcomes)
    })
}

/// Runs the storm once.
pub fn measure(plan: StormPlan, interrupted: &dyn Fn() -> bool) -> Result<StormResults> {
    let started = Instant::now();
    let mut lab = plan.xdp.lab("St")?;
    lab.start_servers()?;
    for (i, &priority) in PRIORITIES.iter().enumerate() {
        let mut config = AgentConfig::for_cluster(&lab, priority);
        config.xdp_mode = plan.xdp.agent_mode().into();
        lab.start_agent(i + 1, &config)?;
    }
    lab.wait_for_sole_holder(1, SETTLE_TIMEOUT, Duration::from_secs(1))?;
    let both: Vec<std::net::SocketAddrV4> = (1..=2)
        .map(|n| std::net::SocketAddrV4::new(node_addr(n), KEYDB_PORT))
        .collect();
    for node in 1..=2 {
        lab.wait_for_service(
            node,
            &format!("node {node}'s agent sees both KeyDBs READY"),
            SETTLE_TIMEOUT,
            |v| both.iter().all(|b| v.ready.contains(b)) && (node != 1 || v.active),
        )?;
    }
    if interrupted() {
        bail!("interrupted");
    }

    let (moved_tx, moved_rx) = watch::channel(None);
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    let (count, deadline) = (plan.clients, plan.deadline);
    let client = spawn_in_netns(lab.client(), "storm-clients", move || {
        clients(count, deadline, connected_tx, moved_rx)
    })?;
    let connected_before = connected_rx
        .recv_timeout(SETTLE_TIMEOUT)
        .context("the clients did not connect")?;
    ensure!(
        connected_before == plan.clients,
        "only {connected_before} of {} clients connected through the VIP before the cut",
        plan.clients
    );

    let retrans_before = syn_retransmits(&lab)?;
    let drops_before = drop_counters(lab.node(2).pin_dir())?;
    lab.cut_link(1)?;
    let cut = Instant::now();
    let (_, moved) = lab.wait_for_holders(
        "node 2 takes the VIP after node 1's link is cut",
        TAKEOVER_TIMEOUT,
        |h| h.contains(&2),
    )?;
    let _ = moved_tx.send(Some(moved));
    let outcomes = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))???;
    let syn_retransmits = syn_retransmits(&lab)?.saturating_sub(retrans_before);
    let drops = drop_counters(lab.node(2).pin_dir())?
        .into_iter()
        .map(|(n, v)| {
            let d = v.saturating_sub(drops_before.get(&n).copied().unwrap_or(0));
            (n, d)
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    drop(lab);

    let mut reconnect_times: Vec<Duration> =
        outcomes.iter().filter_map(|o| o.reconnected).collect();
    reconnect_times.sort();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outcomes {
        if let Some(e) = &o.last_error {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    let mut errors: Vec<(String, usize)> = errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    errors.truncate(5);
    Ok(StormResults {
        failed: outcomes.len() - reconnect_times.len(),
        reconnect_times,
        attempts: outcomes.iter().map(|o| u64::from(o.attempts)).sum(),
        connected_before,
        takeover: moved - cut,
        errors,
        syn_retransmits,
        drops,
        plan,
        elapsed: started.elapsed(),
    })
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "–".into())
}

/// The summary table (Markdown; also printed).
pub fn summary_table(r: &StormResults) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| clients | reconnected | failed | VIP on node 2 after cut, ms | reconnect after VIP move: median ms | p99 ms | last ms | connect attempts | client SYN retransmits | node 2 drops |"
    );
    let _ = writeln!(t, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let drops = if r.drops.is_empty() {
        "0".to_string()
    } else {
        r.drops
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        t,
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        r.plan.clients,
        r.succeeded(),
        r.failed,
        ms(Some(r.takeover)),
        ms(r.quantile(0.5)),
        ms(r.quantile(0.99)),
        ms(r.last()),
        r.attempts,
        r.syn_retransmits,
        drops
    );
    t
}

/// The storm section of a report (Markdown).
pub fn render(m: &mut String, r: &StormResults) {
    let _ = writeln!(m, "## Reconnect storm (issue 9)\n");
    let _ = writeln!(
        m,
        "{} clients connected through VIP:6380 (our agents on both nodes, VRRP priorities 150 / 100, \
         defaults otherwise; each client's connection checked with PING). Node 1's bridge port goes \
         down; the moment node 2 is seen holding the VIP every client drops its connection and \
         reconnects at once (connect + PING, {} ms bound per attempt, retried after {} ms, for up to \
         {} s). Target: all {} reconnect. Measured in {:.0} s.\n",
        r.plan.clients,
        ATTEMPT_TIMEOUT.as_millis(),
        RETRY_PAUSE.as_millis(),
        r.plan.deadline.as_secs(),
        r.plan.clients,
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(m, "{}", summary_table(r));
    if !r.errors.is_empty() {
        let _ = writeln!(
            m,
            "Last error of clients that needed more than one attempt (count): {}.\n",
            r.errors
                .iter()
                .map(|(e, n)| format!("`{e}` ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// Raw figures as JSON.
pub fn to_json(r: &StormResults) -> serde_json::Value {
    use serde_json::json;
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    json!({
        "clients": r.plan.clients,
        "deadline_s": r.plan.deadline.as_secs_f64(),
        "xdp": r.plan.xdp.agent_mode(),
        "connected_before": r.connected_before,
        "reconnected": r.succeeded(),
        "failed": r.failed,
        "takeover_s": r.takeover.as_secs_f64(),
        "reconnect_median_s": secs(r.quantile(0.5)),
        "reconnect_p99_s": secs(r.quantile(0.99)),
        "reconnect_last_s": secs(r.last()),
        "attempts": r.attempts,
        "syn_retransmits": r.syn_retransmits,
        "drops": r.drops.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(),
        "errors": r.errors.iter().map(|(e, n)| json!([e, n])).collect::<Vec<_>>(),
        "elapsed_s": r.elapsed.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let r = StormResults {
            plan: StormPlan::quick(LabXdp::Generic),
            connected_before: 50,
            takeover: Duration::from_millis(350),
            reconnect_times: (1..=100).map(Duration::from_millis).collect(),
            failed: 0,
            attempts: 120,
            errors: vec![("connect: timed out".into(), 3)],
            syn_retransmits: 4,
            drops: Vec::new(),
            elapsed: Duration::from_secs(9),
        };
        assert_eq!(r.quantile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(r.quantile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(r.last(), Some(Duration::from_millis(100)));
        let t = summary_table(&r);
        assert!(
            t.contains("| 50 | 100 | 0 | 350 | 50 | 99 | 100 | 120 | 4 | 0 |"),
            "{t}"
        );
        let mut md = String::new();
        render(&mut md, &r);
        assert!(md.contains("`connect: timed out` (3)"), "{md}");
        assert_eq!(to_json(&r)["reconnect_p99_s"], 0.099);
    }
}
