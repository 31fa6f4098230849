//! `cargo xtask demo`: the data plane at work in a namespace lab, told as it
//! happens. One client, two nodes running KeyDB (or redis-server), the
//! `balancer` agent on node 1 holding the VIP: traffic through the VIP, where
//! it went (client's view and the data plane's own counters), then what
//! clients see when node 2's server dies. Everything is torn down at the end
//! (and on Ctrl-C at the next step).
//!
//! Run as root; exits non-zero if something that should work did not.

use std::{
    collections::HashMap,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use balancer_common::{
    backend_stats_index, counter, names, Service, ServiceKey, TrafficStats, IPPROTO_TCP,
};
use balancer_tests::{
    lab::{
        balancer_bin, keydb_server_program, node_keydb, run_with_timeout, vip_keydb, AgentConfig,
        Lab, CLIENT_ADDR, KEYDB_PORT, VIP,
    },
    resp::{encode_command, Connection, RespError, Value},
};

/// Timeout of every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// New connections through the VIP in the traffic step.
const CONNECTIONS: usize = 200;
/// Commands of each pipelined burst.
const BURST: usize = 1000;
/// New connections after node 2's server died.
const FAILURE_CONNECTIONS: usize = 20;

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

/// Runs the demo; returns the list of things that did not work as they
/// should. The lab drops (and is torn down) before this returns.
fn demo() -> Result<Vec<String>> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo builds network namespaces and attaches XDP: run it as root");
    }
    let mut problems = Vec::new();
    let server = keydb_server_program();

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
            "    node {i}  {:<13} namespace {}",
            node.addr(),
            node.ns().name()
        );
    }
    println!(
        "  VIP {VIP}:{KEYDB_PORT}, held by node 1; backends node 1 (local) and node 2 (remote)"
    );
    println!("  (XDP_PASS on the bridge ports and tx checksum offload off, as native XDP_TX on veth needs)");

    section(&format!(
        "Starting {server} on both nodes and the agent on node 1"
    ))?;
    lab.start_servers()?;
    let run_ids = lab.in_client(|| -> Result<HashMap<String, usize>> {
        let mut ids = HashMap::new();
        for node in 1..=2 {
            let id = Connection::connect(node_keydb(node), IO_TIMEOUT)?.run_id()?;
            ids.insert(id, node);
        }
        Ok(ids)
    })??;
    for (id, node) in sorted(&run_ids) {
        println!(
            "  node {node}: {server} on 0.0.0.0:{KEYDB_PORT} ready, run_id {}…",
            &id[..8.min(id.len())]
        );
    }
    let config = AgentConfig::for_lab(&lab, true);
    lab.start_agent(1, &config)?;
    let pins = lab.node(1).versioned_pin_dir();
    println!(
        "  node 1: `{} run` attached XDP (native) to eth0; maps pinned in {}",
        balancer_bin().display(),
        pins.display()
    );
    println!(
        "  agent config:\n{}",
        indent(&config.to_toml(1, lab.node(1).pin_dir()), 4)
    );

    section(&format!(
        "{CONNECTIONS} new connections to {VIP}:{KEYDB_PORT}, each running INFO server"
    ))?;
    let ids = run_ids.clone();
    let started = Instant::now();
    let outcomes = lab.in_client(move || {
        (0..CONNECTIONS)
            .map(|_| serving_node(&ids))
            .collect::<Vec<_>>()
    })?;
    let tally = Tally::of(&outcomes);
    println!(
        "  took {:.0} ms; the client saw:",
        started.elapsed().as_secs_f64() * 1000.0
    );
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

    section(&format!(
        "A pipelined burst: {BURST} SETs then {BURST} GETs in one write each"
    ))?;
    let ids = run_ids.clone();
    match lab.in_client(move || burst(&ids))? {
        Ok((node, elapsed)) => println!(
            "  one VIP connection, served by node {node}: {} commands answered correctly in {:.1} ms",
            2 * BURST,
            elapsed.as_secs_f64() * 1000.0
        ),
        Err(e) => {
            println!("  burst failed: {e:#}");
            problems.push(format!("pipelined burst failed: {e:#}"));
        }
    }

    section("What the data plane counted (node 1)")?;
    show_dataplane_stats(lab.node(1).pin_dir(), &pins, &mut problems);

    section(&format!("Node failure: {server} on node 2 is killed"))?;
    lab.kill_server(2)?;
    let ids = run_ids.clone();
    let outcomes = lab.in_client(move || {
        (0..FAILURE_CONNECTIONS)
            .map(|_| serving_node(&ids))
            .collect::<Vec<_>>()
    })?;
    let tally = Tally::of(&outcomes);
    println!("  {FAILURE_CONNECTIONS} new connections to the VIP:");
    tally.print(&["node 1", "node 2"]);
    for (reason, n) in sorted(&tally.errors) {
        println!("    {n:>4} × {reason}");
    }
    println!("  Nothing checks backend health yet: round-robin keeps sending every other new");
    println!("  connection to node 2, and those fail at once (node 2 answers RST). Health");
    println!("  checks that take node 2 out of rotation, and VIP failover between nodes,");
    println!("  arrive with the election / health-check issue.");
    if tally.served[0] == 0 {
        problems.push("after node 2 failed, node 1 served no connection".into());
    }
    if tally.served[1] > 0 {
        problems.push("node 2 served connections after its server was killed".into());
    }

    section("Teardown")?;
    let status = lab.stop_agent(1)?;
    let link = lab.node(1).ns().ip(&["link", "show", "eth0"])?;
    let xdp_gone = !link.contains("xdp");
    let pins_gone = !pins.exists();
    println!(
        "  agent stopped by SIGTERM: {status}; XDP on eth0 {}; pins {}",
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
    );
    if !status.success() || !xdp_gone || !pins_gone {
        problems.push("the agent did not stop cleanly".into());
        println!("  agent log:\n{}", indent(&lab.agent_log_tail(1, 30), 4));
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

/// Connects to the VIP and tells which node answered `INFO server`.
fn serving_node(run_ids: &HashMap<String, usize>) -> Result<usize, String> {
    let id = Connection::connect(vip_keydb(), IO_TIMEOUT)
        .and_then(|mut c| c.run_id())
        .map_err(|e| describe(&e))?;
    run_ids
        .get(&id)
        .copied()
        .ok_or_else(|| format!("unknown run_id {id}"))
}

fn describe(e: &RespError) -> String {
    let io = match e {
        RespError::Connect { source, .. } | RespError::Io(source) => source,
        other => return other.to_string(),
    };
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timed out".into(),
        _ => io.to_string(),
    }
}

/// Connection outcomes, per serving node and per error.
struct Tally {
    served: [usize; 2],
    failed: usize,
    errors: HashMap<String, usize>,
}

impl Tally {
    fn of(outcomes: &[Result<usize, String>]) -> Self {
        let mut t = Tally {
            served: [0; 2],
            failed: 0,
            errors: HashMap::new(),
        };
        for o in outcomes {
            match o {
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
fn burst(run_ids: &HashMap<String, usize>) -> Result<(usize, Duration)> {
    let mut conn = Connection::connect(vip_keydb(), IO_TIMEOUT)?;
    let id = conn.run_id()?;
    let node = *run_ids.get(&id).context("unknown run_id")?;
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
    let services: BpfHashMap<MapData, ServiceKey, Service> =
        BpfHashMap::try_from(pinned(pins, names::SERVICES)?)?;
    let key = ServiceKey {
        vip: u32::from_ne_bytes(VIP.octets()),
        port: KEYDB_PORT.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let service = services
        .get(&key, 0)
        .with_context(|| format!("service {VIP}:{KEYDB_PORT} in SERVICES"))?;
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
