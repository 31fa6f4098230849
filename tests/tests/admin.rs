//! The admin interface of real agents in a two-node namespace lab:
//! `balancer status` (the binary, over each node's admin socket) and the
//! Prometheus endpoint (scraped from the client's namespace on each node's
//! lab address) agree with what the lab sees: one master, which holds the
//! VIP, one backup, both KeyDBs READY; a killed KeyDB shows up as not READY
//! with the reason of its failed checks, and lowers its node's priority;
//! SIGHUP leaves the agent running; bad requests get error replies and
//! change nothing; a second agent on the
//! same socket is refused; stopping the agents removes their sockets.
//!
//! Waits poll a condition with a deadline. Needs root, the `balancer`
//! binary (target/debug/balancer or $BALANCER_BIN), redis-server, bpftool
//! and ethtool.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::lab::{
    balancer_bin, exclusive, http_get, node_addr, run_with_timeout, AgentConfig, Lab, KEYDB_PORT,
    VIP,
};
use serde_json::Value;

/// How long the first election may take.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the holder must stay alone to count as elected.
const STABLE_FOR: Duration = Duration::from_secs(1);
/// How long a status may take to show a change.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Priorities of node 1 and node 2.
const PRIORITIES: [u8; 2] = [150, 100];
/// `[vrrp] no_ready_backend_weight`'s default.
const WEIGHT: u8 = 50;

fn backend(index: usize) -> String {
    format!("{}:{KEYDB_PORT}", node_addr(index))
}

/// Polls `check` every 50 ms until it returns `Some`; fails after
/// `timeout` with the last thing it saw.
fn poll<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(Option<T>, String)>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let (found, seen) = check()?;
        if let Some(found) = found {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}; last seen: {seen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status's entry for `addr` in the lab's one service.
fn backend_of<'a>(status: &'a Value, addr: &str) -> Result<&'a Value> {
    status["services"][0]["backends"]
        .as_array()
        .context("services[0].backends")?
        .iter()
        .find(|b| b["address"] == addr)
        .with_context(|| format!("backend {addr} in {status}"))
}

/// The value of the sample `name{labels…}` in a Prometheus text body.
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let line = body
        .lines()
        .find(|l| {
            (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .with_context(|| format!("no sample {name} {labels:?} in\n{body}"))?;
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no value in {line:?}"))
}

/// Sends `request` raw on node `index`'s admin socket; the reply.
fn raw_request(lab: &Lab, index: usize, request: &[u8]) -> Result<Value> {
    let mut stream = UnixStream::connect(lab.admin_socket(index))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // An oversized request is answered before it is all read: the agent
    // may close while we still write.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8(reply)?;
    ensure!(
        text.ends_with('\n') && text.lines().count() == 1,
        "one line: {text:?}"
    );
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn status_and_metrics_follow_the_cluster() -> Result<()> {
    let _serial = exclusive();
    let mut lab = Lab::new("A", 2)?;
    lab.start_servers()?;
    for (i, &priority) in PRIORITIES.iter().enumerate() {
        lab.start_agent(i + 1, &AgentConfig::for_cluster(&lab, priority))?;
    }
    lab.wait_for_sole_holder(1, ELECTION_TIMEOUT, STABLE_FOR)
        .context("node 1 has the highest priority")?;
    let result = check_the_cluster(&mut lab);
    if result.is_err() {
        eprintln!("{}", lab.diagnostics());
    }
    result
}

fn check_the_cluster(lab: &mut Lab) -> Result<()> {
    // --- `balancer status --json` on both nodes ---------------------------
    let statuses = poll(
        "both nodes report both backends READY",
        STATUS_TIMEOUT,
        || {
            let statuses = [lab.status_json(1)?, lab.status_json(2)?];
            let ready = statuses.iter().all(|s| {
                (1..=2).all(|b| backend_of(s, &backend(b)).is_ok_and(|b| b["ready"] == true))
            });
            let seen = format!("{} / {}", statuses[0], statuses[1]);
            Ok((ready.then_some(statuses), seen))
        },
    )?;
    let holders = lab.vip_holders()?;
    ensure!(holders == [1], "VIP holders {holders:?}");
    let masters: Vec<usize> = (1..=2)
        .filter(|&i| statuses[i - 1]["election"]["state"] == "master")
        .collect();
    ensure!(
        masters == holders,
        "masters by status {masters:?}, VIP holders {holders:?}"
    );
    for (i, s) in (1..=2).zip(&statuses) {
        let holder = i == 1;
        let e = &s["election"];
        ensure!(
            s["node"]["address"] == node_addr(i).to_string(),
            "node {i}: {s}"
        );
        ensure!(
            s["node"]["interface"] == "eth0" && s["node"]["xdp_mode"] == "native",
            "{s}"
        );
        ensure!(e["mode"] == "vrrp", "{e}");
        ensure!(
            e["state"] == if holder { "master" } else { "backup" },
            "node {i}: {e}"
        );
        ensure!(e["holds_vips"] == holder, "node {i}: {e}");
        ensure!(
            e["vips"][0]["address"] == VIP.to_string() && e["vips"][0]["held"] == holder,
            "{e}"
        );
        ensure!(e["configured_priority"] == PRIORITIES[i - 1], "{e}");
        ensure!(e["effective_priority"] == PRIORITIES[i - 1], "{e}");
        ensure!(e["node_ready"] == true, "{e}");
        ensure!(e["state_since"].as_f64().is_some_and(|t| t > 0.0), "{e}");
        ensure!(
            e["adverts"]["sent"].as_u64().is_some_and(|n| n > 0) || !holder,
            "{e}"
        );
        ensure!(
            e["adverts"]["received"].as_u64().is_some_and(|n| n > 0) || holder,
            "{e}"
        );
        let service = &s["services"][0];
        ensure!(service["vip"] == format!("{VIP}:{KEYDB_PORT}"), "{service}");
        ensure!(service["active"] == holder, "node {i}: {service}");
        ensure!(
            service["ready_set"] == serde_json::json!([backend(1), backend(2)]),
            "node {i}: {service}"
        );
        for b in 1..=2 {
            let entry = backend_of(s, &backend(b))?;
            ensure!(
                entry["health"] == "ready" && entry["in_ready_set"] == true,
                "{entry}"
            );
            ensure!(entry["local"] == (b == i), "node {i}, backend {b}: {entry}");
            ensure!(entry["checks"].as_u64().is_some_and(|n| n > 0), "{entry}");
        }
        ensure!(
            s["agent"]["uptime_seconds"]
                .as_f64()
                .is_some_and(|t| t > 0.0),
            "{s}"
        );
    }

    // --- the readable form ------------------------------------------------
    let text = lab.balancer_status(1, false)?;
    println!("balancer status, node 1:\n{text}");
    ensure!(text.contains(": MASTER for "), "{text}");
    ensure!(text.contains(&format!("VIP {VIP}: held")), "{text}");
    ensure!(text.contains(&backend(2)), "{text}");
    let text = lab.balancer_status(2, false)?;
    ensure!(text.contains(": BACKUP for "), "{text}");
    ensure!(text.contains(&format!("VIP {VIP}: not held")), "{text}");

    // --- GET /metrics from the client -------------------------------------
    let (code, body) = lab.scrape_metrics(1)?;
    ensure!(code == 200, "GET /metrics on node 1: {code}\n{body}");
    ensure!(body.contains("# TYPE balancer_vrrp_state gauge"), "{body}");
    ensure!(body.contains("# HELP balancer_backend_ready "), "{body}");
    ensure!(metric(&body, "balancer_vrrp_state", &[("state", "master")])? == 1.0);
    ensure!(metric(&body, "balancer_vrrp_state", &[("state", "backup")])? == 0.0);
    ensure!(metric(&body, "balancer_vip_held", &[("vip", "198.18.0.100")])? == 1.0);
    ensure!(metric(&body, "balancer_vrrp_effective_priority", &[])? == 150.0);
    ensure!(metric(&body, "balancer_node_ready", &[])? == 1.0);
    ensure!(metric(&body, "balancer_service_active", &[("vip", "198.18.0.100")])? == 1.0);
    for b in 1..=2 {
        let labels = [
            ("vip", "198.18.0.100"),
            ("port", "6380"),
            ("backend", &*backend(b)),
        ];
        ensure!(
            metric(&body, "balancer_backend_ready", &labels)? == 1.0,
            "backend {b}"
        );
        ensure!(metric(&body, "balancer_backend_in_ready_set", &labels)? == 1.0);
    }
    ensure!(metric(&body, "balancer_vrrp_adverts_sent_total", &[])? > 0.0);
    let (code, body) = lab.scrape_metrics(2)?;
    ensure!(code == 200, "GET /metrics on node 2: {code}");
    ensure!(metric(&body, "balancer_vrrp_state", &[("state", "backup")])? == 1.0);
    ensure!(metric(&body, "balancer_vip_held", &[("vip", "198.18.0.100")])? == 0.0);
    let addr = SocketAddr::V4(lab.metrics_addr(1));
    let (code, page) = lab.in_client(move || http_get(addr, "/", Duration::from_secs(5)))??;
    ensure!(
        code == 200 && page.contains("MASTER"),
        "GET / (the status page) answered {code}: {page}"
    );
    let (code, _) =
        lab.in_client(move || http_get(addr, "/metrics/x", Duration::from_secs(5)))??;
    ensure!(code == 404, "GET /metrics/x answered {code}");

    // --- SIGHUP (an operator's reload reflex) stops nothing -----------------
    let pid = lab.agent_pid(1).context("node 1's agent pid")?;
    // SAFETY: a plain kill(2) of the lab's own child.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGHUP) } == 0);
    poll("node 1's agent logs the SIGHUP", STATUS_TIMEOUT, || {
        let log = lab.agent_log(1);
        Ok((
            log.contains("SIGHUP").then_some(()),
            "no SIGHUP line yet".into(),
        ))
    })?;
    ensure!(lab.agent_running(1), "SIGHUP ended node 1's agent");
    ensure!(lab.status_json(1)?["election"]["state"] == "master");

    // --- node 2's KeyDB dies ------------------------------------------------
    lab.kill_server(2)?;
    let killed = Instant::now();
    let n2 = backend(2);
    for node in 1..=2 {
        let status = poll(
            &format!("node {node} reports {n2} not READY, refused"),
            STATUS_TIMEOUT,
            || {
                let s = lab.status_json(node)?;
                let b = backend_of(&s, &n2)?;
                let down = b["ready"] == false && b["last_failure"]["kind"] == "refused";
                let seen = b.to_string();
                Ok((down.then_some(s), seen))
            },
        )?;
        let b = backend_of(&status, &n2)?;
        println!(
            "node {node}: {n2} not READY {:.0} ms after the kill: {}",
            killed.elapsed().as_secs_f64() * 1000.0,
            b["last_failure"]
        );
        ensure!(
            b["health"] == "unavailable" && b["in_ready_set"] == false,
            "{b}"
        );
        ensure!(b["last_failure"]["reason"] == "connection refused", "{b}");
        ensure!(
            b["failures"]["refused"].as_u64().is_some_and(|n| n >= 3),
            "{b}"
        );
        ensure!(
            status["services"][0]["ready_set"] == serde_json::json!([backend(1)]),
            "{status}"
        );
    }
    // Node 2's own KeyDB is down: it is not ready and advertises less.
    let node2 = poll("node 2's priority is lowered", STATUS_TIMEOUT, || {
        let s = lab.status_json(2)?;
        let e = s["election"].clone();
        Ok((
            (e["effective_priority"] == PRIORITIES[1] - WEIGHT).then_some(e.clone()),
            e.to_string(),
        ))
    })?;
    ensure!(
        node2["node_ready"] == false && node2["state"] == "backup",
        "{node2}"
    );
    let node1 = lab.status_json(1)?;
    ensure!(
        node1["election"]["state"] == "master" && node1["election"]["node_ready"] == true,
        "node 1 keeps the VIP with its own KeyDB READY: {}",
        node1["election"]
    );
    let text = lab.balancer_status(2, false)?;
    println!("balancer status, node 2 after its KeyDB was killed:\n{text}");
    ensure!(
        text.contains("DOWN") && text.contains("connection refused"),
        "{text}"
    );
    ensure!(
        text.contains("lowered by no_ready_backend_weight 50"),
        "{text}"
    );
    let (code, body) = lab.scrape_metrics(1)?;
    ensure!(code == 200);
    let labels = [("vip", "198.18.0.100"), ("port", "6380"), ("backend", &*n2)];
    ensure!(
        metric(&body, "balancer_backend_ready", &labels)? == 0.0,
        "{body}"
    );
    ensure!(metric(&body, "balancer_backend_in_ready_set", &labels)? == 0.0);
    ensure!(
        metric(
            &body,
            "balancer_health_check_failures_total",
            &[("backend", &*n2), ("reason", "refused")]
        )? >= 3.0
    );
    let (_, body) = lab.scrape_metrics(2)?;
    ensure!(
        metric(&body, "balancer_vrrp_effective_priority", &[])? == 50.0,
        "{body}"
    );
    ensure!(metric(&body, "balancer_node_ready", &[])? == 0.0);

    // --- bad requests --------------------------------------------------------
    for request in [
        b"bogus\n".to_vec(),
        b"status please\n".to_vec(),
        b"\n".to_vec(),
        vec![0xff; 10],
        vec![b'x'; 64 * 1024],
    ] {
        let reply = raw_request(lab, 1, &request)?;
        ensure!(
            reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            "an error reply to {:?}: {reply}",
            String::from_utf8_lossy(&request[..request.len().min(20)])
        );
    }
    let pong = raw_request(lab, 1, b"ping\n")?;
    ensure!(pong["pong"] == true, "{pong}");
    ensure!(lab.agent_running(1), "node 1's agent died");
    ensure!(lab.status_json(1)?["election"]["state"] == "master");

    // --- a second agent on the same socket is refused -----------------------
    let mut second = lab
        .node(1)
        .ns()
        .command(&balancer_bin().display().to_string());
    second
        .arg("run")
        .arg("--config")
        .arg(lab.agent_config_path(1));
    let refused = run_with_timeout(&mut second, Duration::from_secs(20));
    match refused {
        Ok(out) => bail!("a second agent on node 1 started: {out}"),
        Err(e) => {
            let message = format!("{e:#}");
            ensure!(
                message.contains("another balancer agent answers on the admin socket"),
                "{message}"
            );
        }
    }
    ensure!(lab.agent_running(1), "node 1's agent died");
    ensure!(
        lab.admin_socket(1).exists(),
        "the live agent's socket was removed"
    );
    ensure!(lab.status_json(1)?["election"]["state"] == "master");
    ensure!(lab.holds_vip(1)?, "node 1 lost the VIP");

    // --- stopping removes the sockets ---------------------------------------
    for node in 1..=2 {
        let status = lab.stop_agent(node)?;
        ensure!(status.success(), "node {node}'s agent: {status}");
        ensure!(
            !lab.admin_socket(node).exists(),
            "node {node}'s socket is left behind"
        );
    }
    let mut cmd = Command::new(balancer_bin());
    cmd.arg("status").arg("--socket").arg(lab.admin_socket(1));
    let message = format!(
        "{:#}",
        run_with_timeout(&mut cmd, Duration::from_secs(15)).unwrap_err()
    );
    ensure!(
        message.contains(&format!(
            "no agent answers on {}: is `balancer run` running?",
            lab.admin_socket(1).display()
        )),
        "{message}"
    );
    Ok(())
}
