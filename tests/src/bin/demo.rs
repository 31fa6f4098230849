//! `cargo xtask demo`: the cluster at work in a namespace lab, told as it
//! happens. One client, two nodes each running KeyDB (or redis-server) and
//! the `balancer` agent with a VRRP election (priorities 150 and 100) and
//! KeyDB-aware health checks:
//!
//! 1. the election: who became master and holds the VIP, and what
//!    `balancer status` says on each node;
//! 2. traffic through the VIP, balanced over both KeyDBs (the client's view
//!    and the data plane's own counters);
//! 3. a node failure: the master's link is cut while a client writes through
//!    the VIP every 2 ms; the backup takes over and the client's longest gap
//!    is measured;
//! 4. the node rejoining: node 1's link comes back while its KeyDB is
//!    still down, and it stays backup; its KeyDB starts, turns READY, and
//!    node 1 takes the VIP back (preemption).
//!
//! Everything is torn down at the end (and on Ctrl-C at the next step).
//! Run as root; exits non-zero if something that should work did not.

use std::{
    collections::HashMap,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use balancer_common::{backend_stats_index, counter, names, TrafficStats};
use balancer_tests::{
    lab::{
        balancer_bin, keydb_server_program, pinned_lab_service, run_with_timeout, vip_keydb,
        AgentConfig, Lab, Transition, VipAttempt, WriterConfig, WriterLoop, CLIENT_ADDR,
        KEYDB_PORT, VIP,
    },
    resp::{encode_command, Connection, Value},
};

/// Timeout of every connect, read and write of the traffic steps.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// New connections through the VIP in the traffic step.
const CONNECTIONS: usize = 200;
/// Commands of the pipelined burst.
const BURST: usize = 1000;
/// Priorities of node 1 and node 2.
const PRIORITIES: [u8; 2] = [150, 100];
/// The bound on the client's gap when the master dies.
const MAX_GAP: Duration = Duration::from_secs(1);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    // Ctrl-C stops the demo at the next step, so the lab is still torn down.
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { signal(sig, SigHandler::Handler(on_interrupt)) };
    }
    let code = match demo() {
        Ok(problems) if problems.is_empty() => {
            println!("\nDemo finished: everything behaved as expected.");
            0
        }
        Ok(problems) => {
            println!("\nDemo finished with problems:");
            for p in problems {
                println!("  - {p}");
            }
            1
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn section(title: &str) -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n== {title} ==");
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the demo; returns the list of things that did not work as they
/// should. The lab drops (and is torn down) before this returns.
fn demo() -> Result<Vec<String>> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo builds network namespaces and attaches XDP: run it as root");
    }
    let mut problems = Vec::new();
    let server = keydb_server_program();
    let demo_start = SystemTime::now();

    section("Lab")?;
    let mut lab = Lab::new("D", 2)?;
    println!(
        "  bridge br0 in namespace {} joins, each by a veth pair:",
        lab.switch().name()
    );
    println!(
        "    client  {CLIENT_ADDR:<13} namespace {}",
        lab.client().name()
    );
    for i in 1..=2 {
        let node = lab.node(i);
        println!(
            "    node {i}  {:<13} namespace {}, bridge port p-n{i}",
            node.addr(),
            node.ns().name()
        );
    }
    println!("  VIP {VIP}:{KEYDB_PORT}: whoever wins the VRRP election holds it");
    println!("  (XDP_PASS on the bridge ports and tx checksum offload off, as native XDP_TX on veth needs)");

    section(&format!("Starting {server} and the agent on both nodes"))?;
    lab.start_servers()?;
    let run_ids = lab.server_run_ids()?;
    for (id, node) in sorted(&run_ids) {
        println!(
            "  node {node}: {server} on 0.0.0.0:{KEYDB_PORT} ready, run_id {}…",
            &id[..8.min(id.len())]
        );
    }
    let configs: Vec<AgentConfig> = PRIORITIES
        .iter()
        .map(|&p| AgentConfig::for_cluster(&lab, p))
        .collect();
    println!(
        "  agent config of node 1 (node 2's differs in address and priority {}):\n{}",
        PRIORITIES[1],
        indent(
            &lab.agent_config(1, &configs[0])
                .to_toml(1, lab.node(1).pin_dir()),
            4
        )
    );
    println!("  ([vrrp] notify is the lab's recorder script; [health] empty = defaults:");
    println!("   check every 100 ms, timeout 100 ms, out after 3 failures, in after 2 passes)");
    let mut agents_started = Instant::now();
    for (i, config) in configs.iter().enumerate() {
        lab.start_agent(i + 1, config)?;
        if i == 0 {
            agents_started = Instant::now();
        }
    }
    println!(
        "  `{} run` started on both nodes: XDP attached (native), maps pinned",
        balancer_bin().display()
    );

    section("Election")?;
    match lab.wait_for_sole_holder(1, Duration::from_secs(15), Duration::from_secs(1)) {
        Ok(at) => println!(
            "  node 1 (priority {}) holds the VIP alone {} after its agent started (checked for 1 s more)",
            PRIORITIES[0],
            ms(at - agents_started)
        ),
        Err(e) => {
            println!("  no stable master: {e:#}");
            problems.push("node 1 (the highest priority) was not elected".into());
        }
    }
    print_transitions(&lab, demo_start);
    println!("  Both start as backup; after Master_Down_Interval (3 × 100 ms + skew) without");
    println!("  adverts node 1 becomes master, and node 2 (lower priority) stays backup.");
    for node in 1..=2 {
        match lab.balancer_status(node, false) {
            Ok(text) => println!(
                "  `balancer status --socket {}` on node {node}:\n{}",
                lab.admin_socket(node).display(),
                indent(text.trim_end(), 4)
            ),
            Err(e) => {
                println!("  `balancer status` on node {node} failed: {e:#}");
                problems.push(format!("`balancer status` failed on node {node}"));
            }
        }
    }

    section(&format!(
        "{CONNECTIONS} new connections to {VIP}:{KEYDB_PORT}, each running INFO server"
    ))?;
    let started = Instant::now();
    let attempts = lab.sample_vip(&run_ids, CONNECTIONS, IO_TIMEOUT)?;
    let tally = Tally::of(&attempts);
    println!("  took {}; the client saw:", ms(started.elapsed()));
    tally.print(&[
        "node 1 (local backend: XDP_PASS)",
        "node 2 (remote backend: full NAT via node 1)",
    ]);
    if tally.failed > 0 {
        problems.push(format!(
            "{} of {CONNECTIONS} VIP connections failed",
            tally.failed
        ));
    }
    if tally.served.contains(&0) {
        problems.push("a backend served no connection".into());
    }
    let ids = run_ids.clone();
    match lab.in_client(move || burst(&ids))? {
        Ok((node, elapsed)) => println!(
            "  a pipelined burst on one connection ({node}): {} SETs and GETs answered correctly in {}",
            2 * BURST,
            ms(elapsed)
        ),
        Err(e) => {
            println!("  burst failed: {e:#}");
            problems.push(format!("pipelined burst failed: {e:#}"));
        }
    }
    let pins = lab.node(1).versioned_pin_dir();
    println!("  what node 1's data plane counted:");
    show_dataplane_stats(lab.node(1).pin_dir(), &pins, &mut problems);

    section("Node failure: node 1's link is cut while a client writes every 2 ms")?;
    let writer = WriterLoop::start(lab.client(), WriterConfig::default())?;
    writer.wait_for_writes(200, Duration::from_secs(5))?;
    println!(
        "  writer loop: SET through the VIP every 2 ms, 100 ms timeout, reconnect at once on error"
    );
    lab.cut_link(1)?;
    let cut = Instant::now();
    println!("  `ip link set p-n1 down` in the switch namespace: node 1 is off the LAN");
    match lab.wait_for_holders("node 2 takes the VIP", Duration::from_secs(5), |h| {
        h.contains(&2)
    }) {
        Ok((_, at)) => println!("  node 2 holds the VIP {} after the cut", ms(at - cut)),
        Err(e) => {
            println!("  {e:#}");
            problems.push("node 2 did not take the VIP over".into());
        }
    }
    match writer.wait_for_writes(500, Duration::from_secs(10)) {
        Ok(()) => {
            let report = writer.report_since(cut);
            println!(
                "  the client's longest gap between two successful writes: {} \
                 ({} failed command(s), {} new connection(s), {} failed connect(s))",
                ms(report.longest_gap),
                report.failed_commands,
                report.connects,
                report.failed_connects
            );
            for (at, e) in report.errors.iter().take(8) {
                println!(
                    "    +{} after the cut: {e}",
                    ms(at.saturating_sub(cut - writer.started()))
                );
            }
            if report.longest_gap > MAX_GAP {
                problems.push(format!(
                    "the client's gap was {} (> {MAX_GAP:?}) when node 1 failed",
                    ms(report.longest_gap)
                ));
            }
        }
        Err(e) => {
            println!("  the writer did not recover: {e:#}");
            problems.push("client writes did not resume after node 1 failed".into());
        }
    }
    print_transitions(&lab, demo_start);
    println!("  Node 1 saw its link go down (fault: it dropped the VIP); node 2 heard no adverts");
    println!("  for Master_Down_Interval, became master, added the VIP and sent gratuitous ARPs,");
    println!("  so the client's next SYN went to node 2.");
    // Node 1's KeyDB is unreachable for node 2: its health checks take it out.
    let deadline = Instant::now() + Duration::from_secs(3);
    let attempts = loop {
        let attempts = lab.sample_vip(&run_ids, 20, Duration::from_millis(300))?;
        if attempts.iter().all(|a| a.outcome == Ok(2)) || Instant::now() >= deadline {
            break attempts;
        }
    };
    let tally = Tally::of(&attempts);
    println!("  20 new connections now (node 2's health checks took node 1's KeyDB out):");
    tally.print(&["node 1", "node 2"]);
    if tally.served[1] != attempts.len() {
        problems.push("after node 1 failed, not every new connection went to node 2".into());
    }
    print_log_lines(&lab, 2, &["backend health changed", "READY set changed"], 4);

    section("Node 1 rejoins while its own KeyDB is still down")?;
    lab.kill_server(1)?;
    let own = std::net::SocketAddrV4::new(lab.node(1).addr(), KEYDB_PORT);
    lab.wait_for_service(
        1,
        "node 1's health checks take its KeyDB out",
        Duration::from_secs(3),
        |s| !s.ready.contains(&own),
    )?;
    println!("  while node 1 was off the LAN its {server} crashed too (killed);");
    let log_mark = lab.agent_log(1).len();
    lab.restore_link(1)?;
    println!(
        "  its link is restored (`ip link set p-n1 up`): its agent sees the interface come back"
    );
    match lab.wait_for_holders("node 1 stays backup", Duration::from_secs(3), |h| h == [2]) {
        Ok(_) => match lab.expect_holders_for(&[2], Duration::from_millis(1500)) {
            Ok(()) => println!(
                "  node 2 still holds the VIP alone 1.5 s later: node 1 does not take it back\n  \
                 while its own {server} is not READY (its priority is lowered by\n  \
                 no_ready_backend_weight, 150 - 50 = 100, not above node 2's 100)"
            ),
            Err(e) => {
                println!("  {e:#}");
                problems.push("node 1 took the VIP back while its KeyDB was down".into());
            }
        },
        Err(e) => {
            println!("  {e:#}");
            problems.push("the VIP did not stay on node 2 when node 1 came back".into());
        }
    }
    println!("  now {server} on node 1 starts again…");
    lab.start_server(1)?;
    let server_up = Instant::now();
    let run_ids = lab.server_run_ids()?;
    match lab.wait_for_sole_holder(1, Duration::from_secs(5), Duration::from_millis(500)) {
        Ok(at) => println!(
            "  …it answers PING, and {} later node 1 holds the VIP alone again",
            ms(at - server_up)
        ),
        Err(e) => {
            println!("  {e:#}");
            problems.push("node 1 did not take the VIP back once its KeyDB was READY".into());
        }
    }
    let log = lab.agent_log(1);
    let lines: Vec<&str> = log
        .get(log_mark..)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("VRRP state change")
                || l.contains("node readiness")
                || (l.contains("backend health changed") && l.contains(&own.to_string()))
        })
        .collect();
    println!("  node 1's agent log since the link came back:");
    for l in &lines {
        println!("    {l}");
    }
    // What the agent logged, in order: its KeyDB READY, then master.
    let ready = lines
        .iter()
        .position(|l| l.contains("node readiness") && l.contains("has_ready_backend=true"));
    let master = lines
        .iter()
        .position(|l| l.contains("VRRP state change") && l.contains("new=master"));
    match (ready, master) {
        (Some(r), Some(m)) if r < m => println!(
            "  Its own KeyDB turned READY (after `rise` = 2 checks), the priority went back to\n  \
             150, and node 1 preempted node 2 one Master_Down_Interval later."
        ),
        _ => {
            println!("  (the agent's log does not show its backend READY before becoming master)");
            problems.push("node 1's log does not show READY before master".into());
        }
    }
    let report = writer.report_since(server_up);
    println!(
        "  the client during the handback: longest gap {}, {} failed command(s), {} new connection(s)",
        ms(report.longest_gap),
        report.failed_commands,
        report.connects
    );
    if report.longest_gap > MAX_GAP {
        problems.push(format!(
            "the client's gap was {} when node 1 took the VIP back",
            ms(report.longest_gap)
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let attempts = loop {
        let attempts = lab.sample_vip(&run_ids, 40, IO_TIMEOUT)?;
        let t = Tally::of(&attempts);
        if (t.failed == 0 && !t.served.contains(&0)) || Instant::now() >= deadline {
            break attempts;
        }
    };
    let tally = Tally::of(&attempts);
    println!("  40 new connections through the VIP:");
    tally.print(&["node 1", "node 2"]);
    if tally.failed > 0 || tally.served.contains(&0) {
        problems.push("after node 1 rejoined, traffic was not balanced over both nodes".into());
    }
    let total = writer.stop()?;
    println!("  writer loop, whole run: {total}");

    section("Teardown")?;
    let mut clean = true;
    for node in 1..=2 {
        let status = lab.stop_agent(node)?;
        let link = lab.node(node).ns().ip(&["link", "show", "eth0"])?;
        let xdp_gone = !link.contains("xdp");
        let pins_gone = !lab.node(node).versioned_pin_dir().exists();
        let vip_gone = !lab.holds_vip(node)?;
        println!(
            "  node {node}: agent stopped by SIGTERM: {status}; XDP {}; pins {}; VIP {}",
            if xdp_gone {
                "detached"
            } else {
                "STILL ATTACHED"
            },
            if pins_gone {
                "removed"
            } else {
                "STILL PRESENT"
            },
            if vip_gone { "released" } else { "STILL HELD" },
        );
        if !status.success() || !xdp_gone || !pins_gone || !vip_gone {
            clean = false;
            println!("  agent log:\n{}", indent(&lab.agent_log_tail(node, 30), 4));
        }
    }
    if !clean {
        problems.push("an agent did not stop cleanly".into());
    }
    let prefix = lab.prefix().to_string();
    drop(lab);
    let left = balancer_tests::netns::run("ip", &["netns", "list"])?;
    if left.contains(&prefix) {
        problems.push(format!("namespaces left behind:\n{left}"));
    }
    println!("  servers stopped, namespaces {prefix}-* deleted, bpffs unmounted");
    Ok(problems)
}

/// Prints every node's recorded state changes, as seconds since the demo
/// started.
fn print_transitions(lab: &Lab, since: SystemTime) {
    for node in 1..=lab.node_count() {
        let changes: Vec<String> = lab
            .transitions(node)
            .iter()
            .map(|t: &Transition| {
                let at = t.at.duration_since(since).unwrap_or_default();
                format!("{} at {:.2} s", t.state, at.as_secs_f64())
            })
            .collect();
        println!(
            "  node {node} (priority {}) states: {}",
            PRIORITIES[node - 1],
            if changes.is_empty() {
                "none".to_string()
            } else {
                changes.join(" → ")
            }
        );
    }
}

/// Prints (and returns) the last `max` lines of node `node`'s agent log
/// containing any of `needles`.
fn print_log_lines(lab: &Lab, node: usize, needles: &[&str], max: usize) -> Vec<String> {
    let log = lab.agent_log(node);
    let lines: Vec<String> = log
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .map(str::to_string)
        .collect();
    let shown = &lines[lines.len().saturating_sub(max)..];
    println!("  node {node}'s agent log:");
    for l in shown {
        println!("    {l}");
    }
    shown.to_vec()
}

/// Connection outcomes, per serving node and per error.
struct Tally {
    served: [usize; 2],
    failed: usize,
    errors: HashMap<String, usize>,
}

impl Tally {
    fn of(attempts: &[VipAttempt]) -> Self {
        let mut t = Tally {
            served: [0; 2],
            failed: 0,
            errors: HashMap::new(),
        };
        for a in attempts {
            match &a.outcome {
                Ok(node) => t.served[node - 1] += 1,
                Err(e) => {
                    t.failed += 1;
                    *t.errors.entry(e.clone()).or_default() += 1;
                }
            }
        }
        t
    }

    fn print(&self, labels: &[&str; 2]) {
        let total = self.served.iter().sum::<usize>() + self.failed;
        for (label, &n) in labels.iter().zip(&self.served) {
            println!("    {n:>4}  {:>5.1}%  served by {label}", pct(n, total));
        }
        println!(
            "    {:>4}  {:>5.1}%  failed",
            self.failed,
            pct(self.failed, total)
        );
        for (reason, n) in sorted(&self.errors) {
            println!("          {n:>4} × {reason}");
        }
    }
}

fn pct(n: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        n as f64 * 100.0 / total as f64
    }
}

/// `BURST` SETs pipelined in one write, then `BURST` GETs; every reply
/// checked. Returns the serving node and the time taken.
fn burst(run_ids: &HashMap<String, usize>) -> Result<(String, Duration)> {
    let mut conn = Connection::connect(vip_keydb(), IO_TIMEOUT)?;
    let id = conn.run_id()?;
    let node = format!("node {}", run_ids.get(&id).context("unknown run_id")?);
    let started = Instant::now();
    let key = |i: usize| format!("demo:burst:{i}");
    let mut sets = Vec::new();
    let mut gets = Vec::new();
    for i in 0..BURST {
        sets.extend(encode_command(&["SET", &key(i), &i.to_string()]));
        gets.extend(encode_command(&["GET", &key(i)]));
    }
    conn.send_all(&sets)?;
    for i in 0..BURST {
        match conn.read_reply()? {
            Value::Status(s) if s == "OK" => {}
            other => bail!("SET {} answered {other:?}", key(i)),
        }
    }
    conn.send_all(&gets)?;
    for i in 0..BURST {
        let reply = conn.read_reply()?;
        if reply.as_text() != Some(i.to_string()) {
            bail!("GET {} answered {reply:?}", key(i));
        }
    }
    Ok((node, started.elapsed()))
}

/// Prints the agent's counters: `balancer stats --pin-dir` when the agent
/// has that subcommand, else read from the pinned maps directly.
fn show_dataplane_stats(pin_dir: &Path, pins: &Path, problems: &mut Vec<String>) {
    let mut cmd = Command::new(balancer_bin());
    cmd.arg("stats").arg("--pin-dir").arg(pin_dir);
    match run_with_timeout(&mut cmd, Duration::from_secs(10)) {
        Ok(out) if !out.trim().is_empty() => {
            println!("  `balancer stats --pin-dir {}`:", pin_dir.display());
            println!("{}", indent(out.trim_end(), 4));
            return;
        }
        Ok(_) | Err(_) => {}
    }
    println!("  (read from the maps pinned in {})", pins.display());
    if let Err(e) = print_pinned_stats(pins) {
        println!("  could not read the pinned maps: {e:#}");
        problems.push(format!("reading the data plane's counters failed: {e:#}"));
    }
}

fn pinned(pins: &Path, name: &str) -> Result<Map> {
    let path = pins.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn print_pinned_stats(pins: &Path) -> Result<()> {
    let service = pinned_lab_service(pins)?;
    let backend_stats: PerCpuArray<MapData, TrafficStats> =
        PerCpuArray::try_from(pinned(pins, names::BACKEND_STATS)?)?;
    println!(
        "  service {VIP}:{KEYDB_PORT} (id {}, {} of {} backends READY):",
        service.id, service.ready_count, service.backend_count
    );
    println!(
        "    {:<24} {:>9} {:>9} {:>11}",
        "backend", "new conns", "packets", "bytes"
    );
    for slot in 0..service.backend_count.min(service.backends.len() as u32) {
        let b = service.backends[slot as usize];
        let addr = std::net::Ipv4Addr::from(b.addr.to_ne_bytes());
        let per_cpu = backend_stats.get(&backend_stats_index(service.id, slot), 0)?;
        let (flows, packets, bytes) = per_cpu.iter().fold((0, 0, 0), |acc, s| {
            (acc.0 + s.new_flows, acc.1 + s.packets, acc.2 + s.bytes)
        });
        let local = if b.flags & balancer_common::BACKEND_LOCAL != 0 {
            " (local)"
        } else {
            ""
        };
        println!(
            "    {:<24} {flows:>9} {packets:>9} {bytes:>11}",
            format!("{addr}:{}{local}", u16::from_be(b.port))
        );
    }
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(pinned(pins, names::COUNTERS)?)?;
    println!("  verdicts by reason (non-zero):");
    for (slot, name) in counter::NAMES.iter().enumerate() {
        let n: u64 = counters.get(&(slot as u32), 0)?.iter().sum();
        if n > 0 {
            println!("    {name:<24} {n:>9}");
        }
    }
    Ok(())
}

fn sorted<K: Clone + Ord, V: Clone + Ord>(m: &HashMap<K, V>) -> Vec<(K, V)> {
    let mut v: Vec<(K, V)> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    v
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|l| {
            if l.trim().is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
