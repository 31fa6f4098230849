//! XDP attach modes on veth interfaces, the way containers and many VMs are
//! wired: native `XDP_TX` on a veth drops every frame unless the peer runs
//! a driver-mode XDP program, so the agent must not attach natively there
//! without one, and must notice when the path to a remote backend stops
//! delivering.
//!
//! Every lab here is two nodes behind the lab's bridge; the bridge-side
//! veth ends (the nodes' peers) carry an `xdp_pass` program unless the test
//! detaches it.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::{
    lab::{node_keydb, vip_keydb, AgentConfig, Lab},
    resp::Connection,
};

/// New connections through the VIP per check: round robin sends half of
/// them to the remote backend.
const CONNECTIONS: usize = 20;
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the path check may take to reach a verdict (it polls once a
/// second and waits three seconds for a reply).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(15);

fn static_agent(lab: &Lab, xdp_mode: &str) -> AgentConfig {
    AgentConfig {
        xdp_mode: xdp_mode.into(),
        ..AgentConfig::for_lab(lab, true)
    }
}

/// The run_id of each node's server, by direct connection.
fn run_ids(lab: &Lab) -> Result<HashMap<String, usize>> {
    lab.in_client(|| -> Result<HashMap<String, usize>> {
        let mut ids = HashMap::new();
        for node in 1..=2 {
            ids.insert(
                Connection::connect(node_keydb(node), IO_TIMEOUT)?.run_id()?,
                node,
            );
        }
        Ok(ids)
    })?
}

/// Opens `n` new connections through the VIP, each asking the server's
/// run_id with `timeout`; returns how many each node answered and the
/// errors of the others.
fn connect_through_vip(
    lab: &Lab,
    n: usize,
    timeout: Duration,
) -> Result<(HashMap<usize, usize>, Vec<String>)> {
    let ids = run_ids(lab)?;
    let outcomes = lab.in_client(move || {
        (0..n)
            .map(|_| {
                Connection::connect(vip_keydb(), timeout)
                    .and_then(|mut c| c.run_id())
                    .map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    })?;
    let mut served = HashMap::new();
    let mut failed = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(id) => {
                let node = *ids
                    .get(&id)
                    .with_context(|| format!("unknown run_id {id}"))?;
                *served.entry(node).or_insert(0) += 1;
            }
            Err(e) => failed.push(e),
        }
    }
    Ok((served, failed))
}

/// The path state of node 2's backend as node 1's agent reports it.
fn remote_path_state(lab: &Lab) -> Result<String> {
    let status = lab.status_json(1)?;
    let backend = status["services"][0]["backends"]
        .as_array()
        .context("no backends in the status")?
        .iter()
        .find(|b| b["local"] == false)
        .context("no remote backend in the status")?;
    Ok(backend["path"]["state"]
        .as_str()
        .unwrap_or("none")
        .to_string())
}

/// Polls node 1's status until the remote backend's path is `want`.
fn await_path_state(lab: &Lab, want: &str) -> Result<()> {
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    loop {
        let state = remote_path_state(lab)?;
        if state == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the remote backend's path is {state:?}, not {want:?}, after {VERDICT_TIMEOUT:?}:\n{}",
                lab.balancer_status(1, false)?
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn with_log<T>(lab: &Lab, result: Result<T>) -> Result<T> {
    if result.is_err() {
        eprintln!("--- agent log (node 1) ---\n{}", lab.agent_log_tail(1, 60));
    }
    result
}

#[test]
fn auto_on_a_bare_veth_attaches_generic_and_every_remote_connection_succeeds() -> Result<()> {
    let mut lab = Lab::new("Xa", 2)?;
    lab.detach_port_xdp();
    lab.start_servers()?;
    lab.start_agent(1, &static_agent(&lab, "auto"))?;
    let result = (|| {
        let status = lab.status_json(1)?;
        ensure!(
            status["node"]["xdp_mode"] == "generic",
            "auto on a veth whose peer has no XDP program attached {}",
            status["node"]["xdp_mode"]
        );
        let log = lab.agent_log(1);
        ensure!(
            log.contains("chose generic mode") && log.contains("is a veth"),
            "the agent does not say why it chose generic mode:\n{log}"
        );
        let (served, failed) = connect_through_vip(&lab, CONNECTIONS, IO_TIMEOUT)?;
        ensure!(
            failed.is_empty(),
            "{} of {CONNECTIONS} connections failed: {failed:?}",
            failed.len()
        );
        ensure!(
            served.get(&2).copied().unwrap_or(0) >= CONNECTIONS / 2 - 1,
            "the remote backend served too few connections: {served:?}"
        );
        await_path_state(&lab, "answered")
    })();
    with_log(&lab, result)
}

#[test]
fn native_on_a_bare_veth_is_refused_with_the_fix() -> Result<()> {
    let mut lab = Lab::new("Xn", 2)?;
    lab.detach_port_xdp();
    let refused = match lab.start_agent(1, &static_agent(&lab, "native")) {
        Ok(()) => bail!(
            "the agent attached natively to a veth whose peer runs no XDP program:\n{}",
            lab.agent_log(1)
        ),
        Err(e) => format!("{e:#}"),
    };
    for needle in [
        "xdp_mode = \"native\" on eth0",
        "is a veth",
        "xdp_mode = \"generic\"",
        "attach an XDP program",
    ] {
        ensure!(
            refused.contains(needle),
            "the refusal lacks {needle:?}:\n{refused}"
        );
    }
    let link = lab.node(1).ns().ip(&["link", "show", "eth0"])?;
    ensure!(
        !link.contains("xdp"),
        "the refused agent left an XDP program on eth0:\n{link}"
    );
    Ok(())
}

#[test]
fn native_on_a_veth_whose_peer_runs_xdp_serves_and_a_lost_path_is_reported() -> Result<()> {
    let mut lab = Lab::new("Xp", 2)?;
    lab.start_servers()?;
    lab.start_agent(1, &static_agent(&lab, "native"))?;
    let result = (|| {
        let status = lab.status_json(1)?;
        ensure!(
            status["node"]["xdp_mode"] == "native",
            "native with an XDP program on the peer attached {}",
            status["node"]["xdp_mode"]
        );
        let (served, failed) = connect_through_vip(&lab, CONNECTIONS, IO_TIMEOUT)?;
        ensure!(
            failed.is_empty() && served.contains_key(&2),
            "native with the peer's program: served {served:?}, failed {failed:?}"
        );
        await_path_state(&lab, "answered")?;

        // Without the peer's program every native XDP_TX frame is dropped:
        // the connections that go to the remote backend now fail, and the
        // agent must say so instead of counting them as forwarded.
        lab.detach_port_xdp();
        let (served, failed) = connect_through_vip(&lab, CONNECTIONS, Duration::from_millis(500))?;
        ensure!(
            !served.contains_key(&2) && !failed.is_empty(),
            "the lost path still delivered: served {served:?}, {} failed",
            failed.len()
        );
        await_path_state(&lab, "failing")?;
        let (code, metrics) = lab.scrape_metrics(1)?;
        ensure!(code == 200, "metrics answered {code}");
        let line = metrics
            .lines()
            .find(|l| l.starts_with("balancer_backend_path_failing{") && l.contains("198.18.0.2"))
            .with_context(|| format!("no path metric for the remote backend:\n{metrics}"))?;
        ensure!(line.ends_with(" 1"), "{line}");
        let text = lab.balancer_status(1, false)?;
        ensure!(
            text.contains("data path: FAILING"),
            "balancer status does not show the failing path:\n{text}"
        );
        Ok(())
    })();
    with_log(&lab, result)
}
