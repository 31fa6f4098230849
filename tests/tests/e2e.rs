//! End to end across network namespaces: a client, two nodes running
//! redis-server (or KeyDB) on 0.0.0.0:6380 and the `balancer` agent on node
//! 1 holding the VIP in native XDP mode. Clients talk to VIP:6380 and must
//! be balanced over both servers, with NAT state visible in the pinned
//! conntrack map and nothing left behind when the agent stops.
//!
//! Needs root, the `balancer` binary (target/debug/balancer or
//! $BALANCER_BIN), redis-server or keydb-server, bpftool and ethtool.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_common::names;
use balancer_tests::{
    lab::{node_keydb, vip_keydb, AgentConfig, Lab, CLIENT_ADDR, KEYDB_PORT, VIP},
    resp::Connection,
};

/// Timeout of every connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// New connections through the VIP for the balance check.
const BALANCE_CONNECTIONS: usize = 1000;
/// Commands on the long-lived connection through the remote backend.
const LONG_LIVED_COMMANDS: usize = 20_000;

/// The lab itself, without any agent: the client reaches both servers
/// directly, and dropping the lab removes its namespaces and bpffs mount.
#[test]
fn lab_reaches_servers_directly_and_cleans_up() -> Result<()> {
    let (prefix, bpffs) = {
        let mut lab = Lab::new("L", 2)?;
        for port in ["p-c", "p-n1", "p-n2"] {
            let link = lab.switch().ip(&["-d", "link", "show", port])?;
            ensure!(
                link.contains("xdp") && !link.contains("xdpgeneric") && link.contains("master br0"),
                "bridge port {port} lacks native XDP or br0:\n{link}"
            );
        }
        for ns in [lab.client(), lab.node(1).ns(), lab.node(2).ns()] {
            let features = ns.exec(&["ethtool", "-k", "eth0"])?;
            ensure!(
                features.contains("tx-checksumming: off"),
                "tx checksum offload still on in {}",
                ns.name()
            );
        }
        lab.start_servers()?;
        let ids = lab.in_client(|| -> Result<Vec<String>> {
            (1..=2)
                .map(|i| Ok(Connection::connect(node_keydb(i), IO_TIMEOUT)?.run_id()?))
                .collect()
        })??;
        ensure!(ids[0] != ids[1], "both nodes report run_id {}", ids[0]);
        // Nobody holds the VIP yet: connecting to it fails.
        let vip = lab.in_client(|| Connection::connect(vip_keydb(), Duration::from_secs(1)))?;
        ensure!(vip.is_err(), "VIP reachable without an agent");
        (lab.prefix().to_string(), lab.bpffs_dir().to_path_buf())
    };
    let left = balancer_tests::netns::run("ip", &["netns", "list"])?;
    ensure!(
        !left.contains(&prefix),
        "namespaces left after the lab dropped:\n{left}"
    );
    ensure!(
        !bpffs.exists(),
        "{} left after the lab dropped",
        bpffs.display()
    );
    Ok(())
}

#[test]
fn vip_balances_over_local_and_remote_backend() -> Result<()> {
    let mut lab = Lab::new("E", 2)?;
    lab.start_servers()?;
    let config = AgentConfig::for_lab(&lab, true);
    lab.start_agent(1, &config)?;
    let result = exercise_vip(&lab);
    if result.is_err() {
        eprintln!("--- agent log (node 1) ---\n{}", lab.agent_log_tail(1, 60));
    }
    result?;

    // Stopping the agent detaches XDP and unpins everything.
    let status = lab.stop_agent(1)?;
    ensure!(
        status.success(),
        "agent exited with {status} on SIGTERM:\n{}",
        lab.agent_log_tail(1, 40)
    );
    let link = lab.node(1).ns().ip(&["link", "show", "eth0"])?;
    ensure!(
        !link.contains("xdp"),
        "eth0 of node 1 still has an XDP program after the agent stopped:\n{link}"
    );
    let pins = lab.node(1).versioned_pin_dir();
    ensure!(
        !pins.exists(),
        "{} still exists after the agent stopped: {:?}",
        pins.display(),
        list_dir(&pins)
    );
    Ok(())
}

/// Everything the client checks while the agent runs on node 1.
fn exercise_vip(lab: &Lab) -> Result<()> {
    // Which server is which: their run_ids, by direct connection.
    let run_ids = lab.in_client(|| -> Result<HashMap<String, usize>> {
        let mut ids = HashMap::new();
        for node in 1..=2 {
            let id = Connection::connect(node_keydb(node), IO_TIMEOUT)?.run_id()?;
            ensure!(
                ids.insert(id.clone(), node).is_none(),
                "two servers share run_id {id}"
            );
        }
        Ok(ids)
    })??;

    // 1000 new connections, each running INFO server.
    let ids = run_ids.clone();
    let served = lab.in_client(move || -> Result<[usize; 2]> {
        let mut served = [0usize; 2];
        for i in 0..BALANCE_CONNECTIONS {
            let node = vip_backend(&ids, &mut connect_vip()?)
                .with_context(|| format!("VIP connection {i}"))?;
            served[node - 1] += 1;
        }
        Ok(served)
    })??;
    println!(
        "{BALANCE_CONNECTIONS} VIP connections: node 1 served {}, node 2 served {}",
        served[0], served[1]
    );
    for (i, &n) in served.iter().enumerate() {
        let share = n as f64 / BALANCE_CONNECTIONS as f64;
        ensure!(
            (0.45..=0.55).contains(&share),
            "node {} served {n} of {BALANCE_CONNECTIONS} connections ({:.1}%), outside 45–55%",
            i + 1,
            share * 100.0
        );
    }

    // A key SET through the VIP lands on the backend that connection went
    // to, and only there (the servers are not replicas here).
    let ids = run_ids.clone();
    lab.in_client(move || -> Result<()> {
        let mut seen = [false; 2];
        for i in 0..10 {
            let mut vip = connect_vip()?;
            let node = vip_backend(&ids, &mut vip)?;
            seen[node - 1] = true;
            let key = format!("e2e:key:{}:{i}", std::process::id());
            let value = format!("value-{i}-via-vip");
            vip.set(&key, &value)?;
            let on_backend = Connection::connect(node_keydb(node), IO_TIMEOUT)?.get(&key)?;
            ensure!(
                on_backend.as_deref() == Some(value.as_str()),
                "key {key} SET via the VIP on node {node}: direct GET there gives {on_backend:?}"
            );
            let other = 3 - node;
            let elsewhere = Connection::connect(node_keydb(other), IO_TIMEOUT)?.get(&key)?;
            ensure!(
                elsewhere.is_none(),
                "key {key} SET via the VIP on node {node} also found on node {other}: {elsewhere:?}"
            );
        }
        ensure!(
            seen == [true, true],
            "10 VIP connections did not reach both backends: {seen:?}"
        );
        Ok(())
    })??;

    // One long-lived connection through the remote backend (node 2): 20,000
    // commands, its flow visible in the pinned conntrack map meanwhile.
    let conntrack = lab.node(1).versioned_pin_dir().join(names::CONNTRACK);
    let ids = run_ids;
    let (port, flows) = lab.in_client(move || -> Result<(u16, FlowCheck)> {
        let mut conn = (0..20)
            .map(|_| -> Result<Option<Connection>> {
                let mut c = connect_vip()?;
                Ok((vip_backend(&ids, &mut c)? == 2).then_some(c))
            })
            .find_map(|c| c.transpose())
            .context("no VIP connection out of 20 landed on node 2")??;
        let port = conn.local_addr()?.port();
        let key = format!("e2e:counter:{}", std::process::id());
        run_commands(&mut conn, &key, 0, LONG_LIVED_COMMANDS / 2)?;
        let flows = conntrack_flows(&conntrack, port)?;
        run_commands(
            &mut conn,
            &key,
            LONG_LIVED_COMMANDS / 2,
            LONG_LIVED_COMMANDS,
        )?;
        Ok((port, flows))
    })??;
    println!(
        "long-lived connection from port {port}: {LONG_LIVED_COMMANDS} commands via node 2; \
         conntrack forward entry {:?}, reverse entry {:?}",
        flows.forward, flows.reverse
    );
    ensure!(
        flows.forward.is_some(),
        "no forward conntrack entry {CLIENT_ADDR}:{port} -> {VIP}:{KEYDB_PORT} in the dump"
    );
    ensure!(
        flows.reverse.is_some(),
        "no reverse conntrack entry translating back to {CLIENT_ADDR}:{port} in the dump"
    );
    Ok(())
}

fn connect_vip() -> Result<Connection> {
    Ok(Connection::connect(vip_keydb(), IO_TIMEOUT)?)
}

/// Which node (1 or 2) answered `INFO server` on `conn`.
fn vip_backend(run_ids: &HashMap<String, usize>, conn: &mut Connection) -> Result<usize> {
    let id = conn.run_id()?;
    run_ids
        .get(&id)
        .copied()
        .with_context(|| format!("run_id {id} is neither server's"))
}

/// Commands `from..to` of the long-lived check: mostly INCR of `key`
/// (each must return the count so far), every 10th a SET+GET round trip.
fn run_commands(conn: &mut Connection, key: &str, from: usize, to: usize) -> Result<()> {
    let mut i = from;
    while i < to {
        if i % 10 == 9 && i + 1 < to {
            let k = format!("{key}:{i}");
            conn.set(&k, &i.to_string())
                .with_context(|| format!("command {i}"))?;
            let got = conn.get(&k).with_context(|| format!("command {}", i + 1))?;
            ensure!(got == Some(i.to_string()), "GET {k} gave {got:?}");
            i += 2;
        } else {
            let n = conn.incr(key).with_context(|| format!("command {i}"))?;
            ensure!(n > 0, "INCR {key} gave {n}");
            i += 1;
        }
    }
    Ok(())
}

/// The conntrack entries of one client flow: (key, value) bytes.
#[derive(Debug)]
struct FlowCheck {
    forward: Option<String>,
    reverse: Option<String>,
}

/// Dumps the pinned conntrack map with bpftool and finds the forward entry
/// `client:port -> VIP:6380` and the reverse entry whose rewrite leads back
/// to `client:port` from `VIP:6380`.
fn conntrack_flows(map: &Path, client_port: u16) -> Result<FlowCheck> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["-j", "map", "dump", "pinned"]).arg(map);
    let out = balancer_tests::lab::run_with_timeout(&mut cmd, deadline - Instant::now())?;
    let dump: serde_json::Value =
        serde_json::from_str(&out).context("parse `bpftool -j map dump`")?;
    let entries = dump
        .as_array()
        .context("bpftool dump is not a JSON array")?;
    let mut check = FlowCheck {
        forward: None,
        reverse: None,
    };
    for entry in entries {
        let (Some(key), Some(value)) = (hex_bytes(&entry["key"]), hex_bytes(&entry["value"]))
        else {
            bail!("conntrack entry without hex key/value: {entry}");
        };
        ensure!(
            key.len() == 16 && value.len() == 48,
            "conntrack key/value of {}/{} bytes, expected 16/48",
            key.len(),
            value.len()
        );
        let tuple = |b: &[u8]| {
            (
                Ipv4Addr::new(b[0], b[1], b[2], b[3]),
                Ipv4Addr::new(b[4], b[5], b[6], b[7]),
                u16::from_be_bytes([b[8], b[9]]),
                u16::from_be_bytes([b[10], b[11]]),
            )
        };
        let (saddr, daddr, sport, dport) = tuple(&key);
        // FlowEntry starts with nat_saddr, nat_daddr, nat_sport, nat_dport.
        let (nsaddr, ndaddr, nsport, ndport) = tuple(&value);
        let text =
            format!("{saddr}:{sport} -> {daddr}:{dport} => {nsaddr}:{nsport} -> {ndaddr}:{ndport}");
        if key[12] != 6 {
            continue;
        }
        if (saddr, sport, daddr, dport) == (CLIENT_ADDR, client_port, VIP, KEYDB_PORT) {
            check.forward = Some(text);
        } else if (nsaddr, nsport, ndaddr, ndport) == (VIP, KEYDB_PORT, CLIENT_ADDR, client_port) {
            check.reverse = Some(text);
        }
    }
    Ok(check)
}

/// bpftool's JSON hex byte arrays (`["0xc6", "0x12", ...]`).
fn hex_bytes(v: &serde_json::Value) -> Option<Vec<u8>> {
    v.as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect()
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
