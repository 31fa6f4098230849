//! The cluster acceptance tests (issue 3): two or three nodes in network
//! namespaces, redis-server (or KeyDB) and the `balancer` agent with a
//! `[vrrp]` and a `[health]` section on each, a client writing through the
//! VIP. Exactly one node holds the VIP; cutting the holder's link moves it
//! within the client's 1 s budget; a node that comes back takes the VIP
//! back only once it has a READY backend; a stopped or frozen KeyDB gets no
//! new connections after `fall × interval` and its flows are reset, not
//! hung; a KeyDB that is loading is never READY; SIGTERM hands the VIP over
//! with a client gap under 200 ms; a crashed (SIGKILLed) holder agent
//! fails over like a lost node and a restarted one takes over cleanly; a
//! saturated CPU (redis-benchmark through the VIP and stress-ng on both
//! nodes) causes no failover.
//!
//! Every gap and delay is measured from timestamps (the writer loop keeps
//! one per write); waits poll a condition with a deadline. The tests of
//! this binary run one at a time ([`exclusive`]): timing on a 2-core
//! machine is what they measure.
//!
//! Needs root, the `balancer` binary (target/debug/balancer or
//! $BALANCER_BIN), redis-server, redis-benchmark, bpftool and ethtool.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::{
    lab::{
        balancer_bin, exclusive, node_addr, node_keydb, run_with_timeout, vip_keydb, AgentConfig,
        HealthSection, Lab, VipAttempt, WriterConfig, WriterLoop, CLIENT_ADDR, KEYDB_PORT,
    },
    netns::ChildGuard,
    resp::{Connection, RespError},
};

/// How long the first election may take (agents start one after the other).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one holder must stay alone to count as elected.
const STABLE_FOR: Duration = Duration::from_secs(1);
/// How long a failover may take before the test gives up waiting (the
/// client-gap assertion is the real bound).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// The acceptance bound on the client's longest gap when the holder's link
/// is cut.
const MAX_FAILOVER_GAP: Duration = Duration::from_secs(1);
/// The acceptance bound on the client's gap for a planned handover.
const MAX_HANDOVER_GAP: Duration = Duration::from_millis(200);
/// Writes that must succeed after a failover before its gap is measured
/// (a second of traffic at one write per 2 ms).
const WRITES_AFTER: usize = 500;
/// Extra time allowed on top of the health detection bound
/// (`fall × interval + timeout`) for the map update and scheduling.
const DETECTION_MARGIN: Duration = Duration::from_millis(100);
/// Timeout of each probing connection through the VIP.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a crashed holder's VIP may stay on its interface: the VIP's
/// lifetime (`VIP_LIFETIME_SECS`, 3 s) plus up to one renewal interval
/// before the crash and a second for the kernel's expiry timer.
const DUAL_HOLDING_BOUND: Duration = Duration::from_secs(5);
/// Node 1's priority in every cluster here; the others are lower.
const HIGH: u8 = 150;

/// Starts servers and agents (`priorities[i]` for node i+1) and waits for
/// one stable VIP holder, which must be node 1 (the highest priority).
fn cluster(tag: &str, priorities: &[u8]) -> Result<Lab> {
    let mut lab = Lab::new(tag, priorities.len())?;
    lab.start_servers()?;
    for (i, &priority) in priorities.iter().enumerate() {
        let config = AgentConfig::for_cluster(&lab, priority);
        lab.start_agent(i + 1, &config)?;
    }
    let started = Instant::now();
    let elected = lab
        .wait_for_sole_holder(1, ELECTION_TIMEOUT, STABLE_FOR)
        .with_context(|| format!("node 1 has the highest priority ({priorities:?})"))?;
    println!(
        "election (priorities {priorities:?}): node 1 holds the VIP alone {:.0} ms after the last agent started, and for {STABLE_FOR:?} more",
        (elected - started).as_secs_f64() * 1000.0
    );
    Ok(lab)
}

/// Runs `body` on `lab`; on failure prints the agents' logs first.
fn with_diagnostics(lab: &mut Lab, body: impl FnOnce(&mut Lab) -> Result<()>) -> Result<()> {
    let result = body(lab);
    if result.is_err() {
        eprintln!("{}", lab.diagnostics());
    }
    result
}

/// Starts the writer loop in the client and waits for it to write.
fn start_writer(lab: &Lab) -> Result<WriterLoop> {
    let writer = WriterLoop::start(lab.client(), WriterConfig::default())?;
    writer.wait_for_writes(200, Duration::from_secs(5))?;
    Ok(writer)
}

/// Waits until the writer has made `WRITES_AFTER` more writes and returns
/// its report since `from`.
fn writer_report_after(
    writer: &WriterLoop,
    from: Instant,
) -> Result<balancer_tests::lab::WriterReport> {
    writer.wait_for_writes(WRITES_AFTER, Duration::from_secs(10))?;
    Ok(writer.report_since(from))
}

// --- Election and failover ------------------------------------------------

/// Two nodes: node 1 (150) is elected; its link is cut and node 2 takes
/// over within the client's 1 s budget; node 1 comes back while its own
/// KeyDB is down and must stay backup (its priority is lowered by
/// `no_ready_backend_weight` while its own backend is not READY, even
/// though node 2's is); once its KeyDB is READY it takes the VIP back
/// (preempt).
#[test]
fn two_nodes_fail_over_on_link_cut_and_take_back_only_when_ready() -> Result<()> {
    let _serial = exclusive();
    let mut lab = cluster("F", &[HIGH, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let writer = start_writer(lab)?;

        // Failure: node 1's cable is pulled.
        lab.cut_link(1)?;
        let cut = Instant::now();
        let (_, moved) = lab.wait_for_holders(
            "node 2 takes the VIP after node 1's link is cut",
            FAILOVER_TIMEOUT,
            |h| h.contains(&2),
        )?;
        let report = writer_report_after(&writer, cut)?;
        println!(
            "link of node 1 cut: node 2 holds the VIP {:.0} ms later; client: {report}",
            (moved - cut).as_secs_f64() * 1000.0
        );
        ensure!(
            report.longest_gap <= MAX_FAILOVER_GAP,
            "client gap {:.0} ms > {MAX_FAILOVER_GAP:?} after the holder's link was cut: {report}",
            report.longest_gap.as_secs_f64() * 1000.0
        );

        // While node 1 is away, its KeyDB dies: when node 1 returns, node
        // 2's KeyDB is READY for it but its own is not.
        lab.kill_server(1)?;
        let own = SocketAddrV4::new(node_addr(1), KEYDB_PORT);
        lab.wait_for_service(
            1,
            "node 1's health checks take its own KeyDB out",
            Duration::from_secs(3),
            |s| !s.ready.contains(&own),
        )?;
        lab.restore_link(1)?;
        let restored = Instant::now();
        let (_, settled) = lab.wait_for_holders(
            "node 1 (no READY backend) releases the VIP to node 2 after its link returns",
            FAILOVER_TIMEOUT,
            |h| h == [2],
        )?;
        println!(
            "link of node 1 restored (its own KeyDB down): VIP on node 2 alone {:.0} ms later",
            (settled - restored).as_secs_f64() * 1000.0
        );
        // rise × interval (200 ms) + Master_Down (~360 ms), several times.
        lab.expect_holders_for(&[2], Duration::from_secs(2))
            .context("node 1 took the VIP back while its own KeyDB was not READY")?;
        let view = lab.service_view(1)?;
        println!(
            "node 1 stayed backup for 2 s with its own KeyDB down (READY for it: {:?})",
            view.ready
        );

        // Node 1's KeyDB comes back: READY after `rise` checks, then node 1
        // preempts with its full priority.
        let before_start = Instant::now();
        lab.start_server(1)?;
        let server_up = Instant::now();
        let (_, back) = lab.wait_for_holders(
            "node 1 takes the VIP back once its KeyDB is READY",
            FAILOVER_TIMEOUT,
            |h| h == [1],
        )?;
        let report = writer_report_after(&writer, server_up)?;
        println!(
            "KeyDB on node 1 answering {:.0} ms after its start; node 1 holds the VIP alone {:.0} ms after that; client: {report}",
            (server_up - before_start).as_secs_f64() * 1000.0,
            (back - server_up).as_secs_f64() * 1000.0
        );
        ensure!(
            report.longest_gap <= MAX_FAILOVER_GAP,
            "client gap {:.0} ms when node 1 took the VIP back: {report}",
            report.longest_gap.as_secs_f64() * 1000.0
        );
        lab.expect_holders_for(&[1], STABLE_FOR)?;
        let total = writer.stop()?;
        println!("writer loop, whole run: {total}");
        Ok(())
    })
}

/// Three nodes, priorities 150/120/100: cutting the holder hands the VIP
/// to the second-highest, cutting that one to the third, never skipping.
#[test]
fn three_nodes_fail_over_in_priority_order() -> Result<()> {
    let _serial = exclusive();
    let mut lab = cluster("T", &[HIGH, 120, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let writer = start_writer(lab)?;
        for (cut_node, next, other) in [(1, 2, 3), (2, 3, 1)] {
            lab.cut_link(cut_node)?;
            let cut = Instant::now();
            let deadline = cut + FAILOVER_TIMEOUT;
            let moved = loop {
                let holders = lab.vip_holders()?;
                ensure!(
                    !holders.contains(&other) || other == 1,
                    "node {other} took the VIP after node {cut_node}'s link was cut, \
                     but node {next} has the higher priority (holders {holders:?})"
                );
                if holders.contains(&next) {
                    break Instant::now();
                }
                if Instant::now() >= deadline {
                    bail!("node {next} did not take the VIP within {FAILOVER_TIMEOUT:?} (holders {holders:?})");
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            let report = writer_report_after(&writer, cut)?;
            println!(
                "link of node {cut_node} cut: node {next} holds the VIP {:.0} ms later; client: {report}",
                (moved - cut).as_secs_f64() * 1000.0
            );
            ensure!(
                report.longest_gap <= MAX_FAILOVER_GAP,
                "client gap {:.0} ms > {MAX_FAILOVER_GAP:?} after node {cut_node}'s link was cut: {report}",
                report.longest_gap.as_secs_f64() * 1000.0
            );
            // The reachable lower-priority node stays backup.
            let reachable_others: Vec<usize> =
                (1..=3).filter(|&n| n != next && n > cut_node).collect();
            for n in reachable_others {
                ensure!(!lab.holds_vip(n)?, "node {n} holds the VIP too");
            }
        }
        writer.stop()?;
        Ok(())
    })
}

/// SIGTERM to the holder's agent: it sends priority 0 and releases the
/// VIP, the backup takes over after Skew_Time; the client sees a gap under
/// 200 ms and at most one reconnect.
#[test]
fn planned_handover_on_sigterm() -> Result<()> {
    let _serial = exclusive();
    let mut lab = cluster("H", &[HIGH, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let writer = start_writer(lab)?;
        let term = Instant::now();
        let status = lab.stop_agent(1)?;
        let exited = Instant::now();
        let (_, moved) = lab.wait_for_holders(
            "node 2 alone holds the VIP after SIGTERM to node 1's agent",
            FAILOVER_TIMEOUT,
            |h| h == [2],
        )?;
        let report = writer_report_after(&writer, term)?;
        println!(
            "SIGTERM to node 1's agent: exited ({status}) after {:.0} ms; node 2 alone holds the VIP {:.0} ms after the signal; client: {report}",
            (exited - term).as_secs_f64() * 1000.0,
            (moved - term).as_secs_f64() * 1000.0,
        );
        ensure!(status.success(), "node 1's agent exited with {status}");
        ensure!(
            report.longest_gap < MAX_HANDOVER_GAP,
            "client gap {:.0} ms >= {MAX_HANDOVER_GAP:?} in a planned handover: {report}",
            report.longest_gap.as_secs_f64() * 1000.0
        );
        ensure!(
            report.failed_commands <= 1 && report.connects <= 1 && report.failed_connects == 0,
            "more than one failed command / reconnect in a planned handover: {report}"
        );
        writer.stop()?;
        Ok(())
    })
}

/// The holder's agent is killed with SIGKILL (a crash: no priority-0
/// advert, its XDP link and VIP stay behind). Node 2 takes over within the
/// client's 1 s budget (until then the dead agent's XDP program keeps
/// serving). A new agent on node 1 (what systemd's `Restart=on-failure`
/// does) replaces the dead one's pins and XDP program, becomes ready, and
/// takes the VIP back (preempt) within the same budget.
#[test]
fn crashed_holder_agent_is_replaced_and_restart_takes_back() -> Result<()> {
    let _serial = exclusive();
    let mut lab = cluster("K", &[HIGH, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let writer = start_writer(lab)?;
        let old_prog = xdp_prog_id(lab, 1)?;

        lab.kill_agent(1)?;
        let crash = Instant::now();
        let (holders, moved) = lab.wait_for_holders(
            "node 2 takes the VIP after node 1's agent is killed",
            FAILOVER_TIMEOUT,
            |h| h.contains(&2),
        )?;
        let report = writer_report_after(&writer, crash)?;
        println!(
            "SIGKILL to node 1's agent: node 2 holds the VIP {:.0} ms later (holders {holders:?}); client: {report}",
            (moved - crash).as_secs_f64() * 1000.0
        );
        ensure!(
            report.longest_gap <= MAX_FAILOVER_GAP,
            "client gap {:.0} ms > {MAX_FAILOVER_GAP:?} after the holder's agent crashed: {report}",
            report.longest_gap.as_secs_f64() * 1000.0
        );
        // Nobody removes the dead agent's VIP: its lifetime runs out.
        let (_, alone) = lab.wait_for_holders(
            "the crashed agent's VIP expires on node 1",
            DUAL_HOLDING_BOUND + FAILOVER_TIMEOUT,
            |h| h == [2],
        )?;
        let both = alone - crash;
        println!(
            "both nodes held the VIP for at most {:.0} ms after the crash (bound {DUAL_HOLDING_BOUND:?})",
            both.as_secs_f64() * 1000.0
        );
        ensure!(
            both <= DUAL_HOLDING_BOUND,
            "node 1 kept the dead agent's VIP for {both:?} (bound {DUAL_HOLDING_BOUND:?})"
        );

        let restart = Instant::now();
        lab.start_agent(1, &AgentConfig::for_cluster(lab, HIGH))?;
        let ready = Instant::now();
        let (_, back) = lab.wait_for_holders(
            "the restarted agent on node 1 takes the VIP back alone",
            FAILOVER_TIMEOUT,
            |h| h == [1],
        )?;
        let report = writer_report_after(&writer, restart)?;
        println!(
            "restarted agent on node 1: ready after {:.0} ms, holds the VIP alone {:.0} ms after the restart; client: {report}",
            (ready - restart).as_secs_f64() * 1000.0,
            (back - restart).as_secs_f64() * 1000.0
        );
        ensure!(
            report.longest_gap <= MAX_FAILOVER_GAP,
            "client gap {:.0} ms > {MAX_FAILOVER_GAP:?} when the restarted agent took the VIP back: {report}",
            report.longest_gap.as_secs_f64() * 1000.0
        );
        lab.expect_holders_for(&[1], STABLE_FOR)?;
        let new_prog = xdp_prog_id(lab, 1)?;
        ensure!(
            new_prog != old_prog,
            "node 1 still runs the crashed agent's XDP program {old_prog}"
        );
        writer.stop()?;
        Ok(())
    })
}

/// The id of the one XDP program attached to node `index`'s eth0 (fails if
/// there is none).
fn xdp_prog_id(lab: &Lab, index: usize) -> Result<u64> {
    let out = lab
        .node(index)
        .ns()
        .exec(&["ip", "-j", "link", "show", "dev", "eth0"])?;
    let links: serde_json::Value = serde_json::from_str(&out).context("ip -j link show")?;
    links[0]["xdp"]["prog"]["id"]
        .as_u64()
        .with_context(|| format!("no XDP program on node {index}'s eth0: {out}"))
}

// --- Health: stopped, frozen and loading backends ------------------------

/// Node 2's KeyDB is killed (node 1 holds the VIP, node 2 is its remote
/// backend): new connections through the VIP may fail only until the
/// health checks take it out, `fall × interval + timeout` (+ margin) after
/// the kill; every one after that is served by node 1. A connection that
/// was on it fails at once when used (reset or end of stream), not hung.
#[test]
fn killed_backend_gets_no_new_connections_after_fall_times_interval() -> Result<()> {
    let _serial = exclusive();
    let mut lab = cluster("K", &[HIGH, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let run_ids = lab.server_run_ids()?;
        expect_served_by(lab, &run_ids, &[1, 2])?;
        let ids = run_ids.clone();
        let mut idle = lab.in_client(move || connection_to(&ids, 2, Duration::from_secs(3)))??;
        let bound = HealthSection::default().detection_bound() + DETECTION_MARGIN;
        lab.kill_server(2)?;
        let killed = Instant::now();
        let attempts = probe_until(lab, &run_ids, killed + bound + Duration::from_secs(1))?;
        // A connection that was on it, idle meanwhile, fails when used.
        let used = Instant::now();
        let outcome = idle.ping();
        let took = used.elapsed();
        println!(
            "an idle flow to node 2, used {:.0} ms after the kill: {} after {:.0} ms",
            (used - killed).as_secs_f64() * 1000.0,
            outcome_text(&outcome),
            took.as_secs_f64() * 1000.0
        );
        check_out_of_service(&attempts, killed, bound, 2, 1)?;
        ensure!(
            is_reset_or_eof(&outcome) && took <= Duration::from_secs(1),
            "an idle flow to the killed backend did not fail at once when used: {} after {:.0} ms",
            outcome_text(&outcome),
            took.as_secs_f64() * 1000.0
        );
        Ok(())
    })
}

/// Node 2's KeyDB freezes (SIGSTOP: the kernel still accepts connections,
/// nothing answers). Its flows through the holder must be reset within
/// about 1 s instead of hanging: a read blocked on one gets RST or EOF, an
/// idle one fails at once when used; new connections stop going to it
/// after `fall × interval + timeout`; when it thaws it serves again.
#[test]
fn frozen_remote_backend_flows_are_reset_not_hung() -> Result<()> {
    frozen_backend("R", 2)
}

/// As [`frozen_remote_backend_flows_are_reset_not_hung`] for the holder's
/// own KeyDB (its connections are not NATed: the data plane passes them
/// to the local stack).
#[test]
fn frozen_local_backend_flows_are_reset_not_hung() -> Result<()> {
    frozen_backend("L", 1)
}

fn frozen_backend(tag: &str, frozen: usize) -> Result<()> {
    let _serial = exclusive();
    let mut lab = cluster(tag, &[HIGH, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let run_ids = lab.server_run_ids()?;
        let healthy = 3 - frozen;
        expect_served_by(lab, &run_ids, &[1, 2])?;
        // Two connections through the VIP on the backend that will freeze.
        let ids = run_ids.clone();
        let (mut blocked, mut idle) =
            lab.in_client(move || -> Result<(Connection, Connection)> {
                Ok((
                    connection_to(&ids, frozen, Duration::from_secs(3))?,
                    connection_to(&ids, frozen, Duration::from_secs(3))?,
                ))
            })??;
        let bound = HealthSection::default().detection_bound() + DETECTION_MARGIN;

        lab.signal_server(frozen, libc::SIGSTOP)?;
        let frozen_at = Instant::now();
        // A command sent now is never answered: the read blocks until the
        // flow is reset (or 3 s, the connection's timeout).
        blocked.send(&["PING"])?;
        let reader = std::thread::spawn(move || {
            let outcome = blocked.read_reply();
            (Instant::now(), outcome)
        });
        let attempts = probe_until(
            lab,
            &run_ids,
            frozen_at + bound + Duration::from_millis(1500),
        )?;
        let (read_done, read) = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
        let read_after = read_done - frozen_at;
        println!(
            "KeyDB on node {frozen} frozen: a read blocked on one of its flows returned after {:.0} ms with {}",
            read_after.as_secs_f64() * 1000.0,
            outcome_text(&read)
        );
        // An idle flow, used after the detection bound.
        let used = Instant::now();
        let idle_outcome = idle.ping();
        let idle_after = used.elapsed();
        println!(
            "an idle flow to node {frozen}, used {:.0} ms after the freeze: {} after {:.0} ms",
            (used - frozen_at).as_secs_f64() * 1000.0,
            match &idle_outcome {
                Ok(()) => "PONG (!)".to_string(),
                Err(e) => balancer_tests::lab::writer::describe(e),
            },
            idle_after.as_secs_f64() * 1000.0
        );
        check_out_of_service(&attempts, frozen_at, bound, frozen, healthy)?;
        ensure!(
            is_reset_or_eof(&read) && read_after <= Duration::from_secs(1),
            "a read blocked on a flow to the frozen backend was not reset within 1 s: {} after {:.0} ms",
            outcome_text(&read),
            read_after.as_secs_f64() * 1000.0
        );
        ensure!(
            matches!(&idle_outcome, Err(e) if is_reset_or_eof_error(e))
                && idle_after <= Duration::from_secs(1),
            "an idle flow to the frozen backend did not fail at once when used: {} after {:.0} ms",
            match &idle_outcome {
                Ok(()) => "PONG".to_string(),
                Err(e) => e.to_string(),
            },
            idle_after.as_secs_f64() * 1000.0
        );

        // It thaws: READY again after `rise` checks, and serves.
        lab.signal_server(frozen, libc::SIGCONT)?;
        let thawed = Instant::now();
        let deadline = thawed + Duration::from_secs(5);
        loop {
            let attempts = lab.sample_vip(&run_ids, 10, PROBE_TIMEOUT)?;
            if attempts.iter().any(|a| a.outcome == Ok(frozen)) {
                println!(
                    "node {frozen}'s KeyDB thawed: serving through the VIP again after {:.0} ms",
                    thawed.elapsed().as_secs_f64() * 1000.0
                );
                break;
            }
            if Instant::now() >= deadline {
                bail!("node {frozen}'s KeyDB did not serve through the VIP within 5 s of thawing");
            }
        }
        Ok(())
    })
}

/// Three nodes: node 1 (the holder) and node 3 run a fake KeyDB that is
/// loading (`+PONG` to PING, `-LOADING` to INFO), node 2 a real one. The
/// fakes are never READY: every connection through the VIP lands on node
/// 2, neither fake ever sees a client (node 1's is the holder's local
/// backend, node 3's a remote one), and both were health-checked.
#[test]
fn loading_keydb_is_never_ready() -> Result<()> {
    let _serial = exclusive();
    let mut lab = Lab::new("G", 3)?;
    lab.start_loading_fake(1)?;
    lab.start_server(2)?;
    lab.start_loading_fake(3)?;
    for (node, priority) in [(1, HIGH), (2, 120), (3, 100)] {
        let mut config = AgentConfig::for_cluster(&lab, priority);
        if node == 1 {
            // Keep node 1 the holder although its own KeyDB is not READY
            // (by default its priority would drop below node 2's), so its
            // data plane has a loading KeyDB as the local backend.
            config
                .vrrp
                .as_mut()
                .expect("[vrrp]")
                .no_ready_backend_weight = Some(0);
        }
        lab.start_agent(node, &config)?;
    }
    with_diagnostics(&mut lab, |lab| {
        lab.wait_for_sole_holder(1, ELECTION_TIMEOUT, STABLE_FOR)
            .context("node 1 (150, weight 0) is not elected")?;
        let run_ids = lab.server_run_ids()?;
        let attempts = lab.sample_vip(&run_ids, 200, Duration::from_secs(1))?;
        let mut tally: HashMap<String, usize> = HashMap::new();
        for a in &attempts {
            let key = match &a.outcome {
                Ok(n) => format!("served by node {n}"),
                Err(e) => e.clone(),
            };
            *tally.entry(key).or_default() += 1;
        }
        println!("200 connections through the VIP: {tally:?}");
        let fake1 = lab.loading_fake(1).context("fake on node 1")?;
        let fake3 = lab.loading_fake(3).context("fake on node 3")?;
        let from_clients = |peers: Vec<SocketAddr>| -> Vec<SocketAddr> {
            peers
                .into_iter()
                .filter(|p| match p {
                    // Direct from the client (local backend: passed to the
                    // stack), or NATed by the holder from its SNAT range,
                    // which lies outside the node's ephemeral ports (Linux's
                    // default ip_local_port_range in the lab's namespaces,
                    // where the health checks come from).
                    SocketAddr::V4(v4) => {
                        *v4.ip() == CLIENT_ADDR
                            || (*v4.ip() == node_addr(1) && !(32768..=60999).contains(&v4.port()))
                    }
                    SocketAddr::V6(_) => true,
                })
                .collect()
        };
        let reached1 = from_clients(fake1.peers());
        let reached3 = from_clients(fake3.peers());
        println!(
            "loading fakes: node 1 saw {} health checks (PING answered +PONG, then -LOADING), node 3 {}; client connections reaching them: {} and {}",
            fake1.health_checks(),
            fake3.health_checks(),
            reached1.len(),
            reached3.len()
        );
        ensure!(
            fake1.health_checks() > 0 && fake3.health_checks() > 0,
            "a fake was never health-checked (PING then INFO): the test proves nothing"
        );
        ensure!(
            attempts.iter().all(|a| a.outcome == Ok(2)),
            "connections through the VIP not all served by node 2's READY KeyDB: {tally:?}"
        );
        ensure!(
            reached1.is_empty() && reached3.is_empty(),
            "client connections reached a loading KeyDB: node 1 {reached1:?}, node 3 {reached3:?}"
        );
        Ok(())
    })
}

// --- No false failover under load ------------------------------------------

/// 60 s of redis-benchmark through the VIP, two processes with 50 pipelined
/// clients each, and `stress-ng --cpu 2` on the master's and on the
/// backup's namespace, saturating both cores (checked from /proc/stat):
/// with default timers and priorities the VIP never leaves node 1 and no
/// agent changes state.
#[test]
fn no_false_failover_under_full_cpu_load() -> Result<()> {
    const LOAD: Duration = Duration::from_secs(60);
    let _serial = exclusive();
    let mut lab = cluster("P", &[HIGH, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let before: Vec<usize> = (1..=2).map(|n| lab.transitions(n).len()).collect();
        let health_changes = |lab: &Lab| -> Vec<usize> {
            (1..=2)
                .map(|n| lab.agent_log(n).matches("backend health changed").count())
                .collect()
        };
        let health_before = health_changes(lab);
        let commands_before = commands_processed(lab)?;
        let redis_benchmark = |lab: &Lab| -> Result<ChildGuard> {
            let mut cmd = lab.client().command("redis-benchmark");
            cmd.args([
                "-h",
                &vip_keydb().ip().to_string(),
                "-p",
                &KEYDB_PORT.to_string(),
                "-c",
                "50",
                "-P",
                "16",
                "-n",
                "1000000000",
                "-t",
                "set,get",
                "-q",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            Ok(ChildGuard::new(
                cmd.spawn().context("start redis-benchmark")?,
            ))
        };
        let mut benchmarks: Vec<ChildGuard> = Vec::new();
        for _ in 0..2 {
            benchmarks.push(redis_benchmark(lab)?);
        }
        // A starved KeyDB can miss `fall` health checks in a row; its
        // flows are then reset and redis-benchmark exits. That is the
        // health check's verdict, not the election's: restart it, count it.
        let mut restarts = 0usize;
        for node in 1..=2 {
            let mut cmd = lab.node(node).ns().command("stress-ng");
            cmd.args([
                "--cpu",
                "2",
                "--timeout",
                &format!("{}s", LOAD.as_secs() + 5),
            ]);
            let log = std::fs::File::create(stress_log(lab, node))?;
            cmd.stdout(log.try_clone()?).stderr(log);
            benchmarks.push(ChildGuard::new(
                cmd.spawn()
                    .context("start stress-ng (scripts/setup.sh installs it)")?,
            ));
        }
        let cpu_start = cpu_times()?;
        let start = Instant::now();
        let mut polls = 0usize;
        while start.elapsed() < LOAD {
            let holders = lab.vip_holders()?;
            polls += 1;
            ensure!(
                holders == [1],
                "VIP holders became {holders:?} after {:.1} s of load",
                start.elapsed().as_secs_f64()
            );
            for (i, process) in benchmarks.iter_mut().enumerate() {
                if let Some(status) = process.try_wait()? {
                    // Two redis-benchmarks, then stress-ng on node 1 and 2.
                    if i < 2 {
                        *process = redis_benchmark(lab)?;
                        restarts += 1;
                        continue;
                    }
                    let node = i - 1;
                    let log = std::fs::read_to_string(stress_log(lab, node)).unwrap_or_default();
                    bail!("stress-ng on node {node} exited early ({status}): {log}");
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let cpu_end = cpu_times()?;
        drop(benchmarks);
        let busy = cpu_end.busy_share_since(&cpu_start);
        let commands = commands_processed(lab)?.saturating_sub(commands_before);
        let after: Vec<usize> = (1..=2).map(|n| lab.transitions(n).len()).collect();
        let health_after = health_changes(lab);
        println!(
            "{LOAD:?} of redis-benchmark through the VIP and stress-ng --cpu 2 on both nodes: CPU {:.1}% busy, {commands} commands served \
             ({:.0}/s); VIP on node 1 at all {polls} polls; state changes during the load: node 1 {}, node 2 {}",
            busy * 100.0,
            commands as f64 / LOAD.as_secs_f64(),
            after[0] - before[0],
            after[1] - before[1]
        );
        println!(
            "backend health changes logged during the load (informational): node 1 {}, node 2 {}; \
             redis-benchmark restarted {restarts} times after its connections were reset",
            health_after[0] - health_before[0],
            health_after[1] - health_before[1]
        );
        ensure!(
            busy >= 0.9,
            "the load kept the CPUs only {:.1}% busy: not a saturated machine",
            busy * 100.0
        );
        ensure!(
            after == before,
            "agents changed state under load: {:?} / {:?}",
            &lab.transitions(1)[before[0]..],
            &lab.transitions(2)[before[1]..]
        );
        lab.expect_holders_for(&[1], Duration::from_millis(500))?;
        Ok(())
    })
}

/// `balancer drain` on the VIP holder: new connections through the VIP go
/// to node 1 only, a connection already on node 2 keeps working, the
/// status shows the drain; draining node 1 as well is refused (it would
/// leave the service without a READY backend); `balancer ready` brings
/// node 2 back into the round robin, the old connection still open.
#[test]
fn drained_backend_gets_no_new_connections_and_keeps_its_established_ones() -> Result<()> {
    let _serial = exclusive();
    let mut lab = cluster("D", &[HIGH, 100])?;
    with_diagnostics(&mut lab, |lab| {
        let run_ids = lab.server_run_ids()?;
        expect_served_by(lab, &run_ids, &[1, 2])?;
        let ids = run_ids.clone();
        let mut held = lab.in_client(move || connection_to(&ids, 2, PROBE_TIMEOUT))??;
        held.set("drain:held", "before")?;

        let node2 = node_keydb(2).to_string();
        let drained = balancer_cli(lab, 1, &["drain", &node2])?;
        ensure!(
            drained.contains("drained"),
            "balancer drain said: {drained}"
        );
        expect_served_by(lab, &run_ids, &[1])?;
        held.ping()?;
        ensure!(held.get("drain:held")?.as_deref() == Some("before"));
        let status = lab.status_json(1)?;
        let b2 = status["services"][0]["backends"]
            .as_array()
            .context("backends")?
            .iter()
            .find(|b| b["address"] == node2.as_str())
            .context("node 2's backend in the status")?;
        ensure!(
            b2["drained"] == true && b2["in_ready_set"] == false && b2["ready"] == true,
            "status of the drained backend: {b2}"
        );
        ensure!(lab.balancer_status(1, false)?.contains("DRAINED"));

        let node1 = node_keydb(1).to_string();
        let refused = balancer_cli(lab, 1, &["drain", &node1]);
        ensure!(
            refused
                .as_ref()
                .is_err_and(|e| format!("{e:#}").contains("without a READY backend")),
            "draining the last undrained backend: {refused:?}"
        );
        expect_served_by(lab, &run_ids, &[1])?;

        let back = balancer_cli(lab, 1, &["ready", &node2])?;
        ensure!(
            back.contains("no longer drained"),
            "balancer ready said: {back}"
        );
        expect_served_by(lab, &run_ids, &[1, 2])?;
        held.set("drain:held", "after")?;
        ensure!(held.get("drain:held")?.as_deref() == Some("after"));
        println!("drain / ready of node 2's backend on node 1: {drained} / {back}");
        Ok(())
    })
}

/// Runs `balancer ARGS --socket <node index's admin socket>`; its stdout,
/// or an error with its stderr.
fn balancer_cli(lab: &Lab, index: usize, args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new(balancer_bin());
    cmd.args(args).arg("--socket").arg(lab.admin_socket(index));
    run_with_timeout(&mut cmd, Duration::from_secs(15))
}

// --- Helpers ---------------------------------------------------------------

fn stress_log(lab: &Lab, node: usize) -> std::path::PathBuf {
    lab.dir().join(format!("n{node}-stress-ng.log"))
}

/// Checks (for up to 5 s) that new connections through the VIP are served
/// by exactly the nodes in `nodes`.
fn expect_served_by(lab: &Lab, run_ids: &HashMap<String, usize>, nodes: &[usize]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempts = lab.sample_vip(run_ids, 20, Duration::from_secs(1))?;
        let mut seen: Vec<usize> = attempts
            .iter()
            .filter_map(|a| a.outcome.as_ref().ok().copied())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        if seen == nodes && attempts.iter().all(|a| a.outcome.is_ok()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "connections through the VIP not served by {nodes:?}: {:?}",
                attempts.iter().map(|a| &a.outcome).collect::<Vec<_>>()
            );
        }
    }
}

/// New connections through the VIP, one after the other, until `until`.
fn probe_until(
    lab: &Lab,
    run_ids: &HashMap<String, usize>,
    until: Instant,
) -> Result<Vec<VipAttempt>> {
    let ids = run_ids.clone();
    lab.in_client(move || {
        let mut attempts = Vec::new();
        while Instant::now() < until {
            attempts.push(VipAttempt::make(&ids, PROBE_TIMEOUT));
            std::thread::sleep(Duration::from_millis(5));
        }
        attempts
    })
}

/// Every attempt that started `bound` or later after `since` was served by
/// `healthy`; before, attempts may have failed (but none served by
/// `down`, which cannot answer).
fn check_out_of_service(
    attempts: &[VipAttempt],
    since: Instant,
    bound: Duration,
    down: usize,
    healthy: usize,
) -> Result<()> {
    let late: Vec<&VipAttempt> = attempts.iter().filter(|a| a.at >= since + bound).collect();
    let last_failure = attempts
        .iter()
        .filter(|a| a.outcome != Ok(healthy))
        .map(|a| a.at - since)
        .max();
    let failures = attempts.iter().filter(|a| a.outcome.is_err()).count();
    println!(
        "KeyDB on node {down} out: {} new connections probed over {:.1} s, {failures} failed, the last one started {} after it went down (bound {:.0} ms)",
        attempts.len(),
        attempts
            .last()
            .map(|a| (a.at - since).as_secs_f64())
            .unwrap_or(0.0),
        last_failure
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "never".into()),
        bound.as_secs_f64() * 1000.0
    );
    ensure!(
        late.len() >= 5,
        "only {} connections probed after the detection bound",
        late.len()
    );
    let bad: Vec<String> = late
        .iter()
        .filter(|a| a.outcome != Ok(healthy))
        .map(|a| {
            format!(
                "+{:.0} ms: {:?}",
                (a.at - since).as_secs_f64() * 1000.0,
                a.outcome
            )
        })
        .collect();
    ensure!(
        bad.is_empty(),
        "new connections still not served by node {healthy} more than {bound:?} after node {down}'s KeyDB went down: {bad:?}"
    );
    Ok(())
}

/// A connection through the VIP that landed on `node` (tries up to 50).
fn connection_to(
    run_ids: &HashMap<String, usize>,
    node: usize,
    timeout: Duration,
) -> Result<Connection> {
    for _ in 0..50 {
        let mut c = Connection::connect(vip_keydb(), timeout)?;
        let id = c.run_id()?;
        if run_ids.get(&id) == Some(&node) {
            return Ok(c);
        }
    }
    bail!("no connection out of 50 through the VIP landed on node {node}")
}

fn is_reset_or_eof_error(e: &RespError) -> bool {
    match e {
        RespError::Closed => true,
        RespError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

fn is_reset_or_eof<T>(r: &Result<T, RespError>) -> bool {
    matches!(r, Err(e) if is_reset_or_eof_error(e))
}

fn outcome_text<T: std::fmt::Debug>(r: &Result<T, RespError>) -> String {
    match r {
        Ok(v) => format!("a reply ({v:?})"),
        Err(e) => balancer_tests::lab::writer::describe(e),
    }
}

/// Sum of `total_commands_processed` of the nodes' servers (direct).
fn commands_processed(lab: &Lab) -> Result<u64> {
    lab.in_client(|| -> Result<u64> {
        let mut total = 0;
        for node in 1..=2 {
            let info =
                Connection::connect(node_keydb(node), Duration::from_secs(5))?.info("stats")?;
            total += balancer_tests::resp::info_field(&info, "total_commands_processed")
                .and_then(|v| v.parse::<u64>().ok())
                .context("INFO stats without total_commands_processed")?;
        }
        Ok(total)
    })?
}

/// The aggregate `cpu` line of /proc/stat.
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    fn busy_share_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

fn cpu_times() -> Result<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    ensure!(fields.len() >= 5, "short cpu line: {line}");
    // user nice system idle iowait irq softirq steal ...
    let idle = fields[3] + fields[4];
    let total: u64 = fields.iter().take(8).sum();
    Ok(CpuTimes {
        busy: total - idle,
        total,
    })
}
