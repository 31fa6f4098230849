//! Connection churn through a remote backend, by counts: 40,000 short
//! connections (`redis-benchmark -k 0`, a new connection per request)
//! through the VIP on node 1 to node 2's KeyDB only, so each one takes a
//! SNAT port. Every connection must be established (`TcpAttemptFails` 0 in
//! the client's namespace) and every request answered: freed ports come
//! back by TCP state, not by a timer sweep (with the sweep, this run lost
//! thousands of SYNs and took minutes). SYNs dropped for want of a port
//! (`drop_snat_exhausted`) are printed, not asserted: in this lab one CPU
//! receives every SYN and so has only its partition of the range, half
//! the ports, which a rate above about 7,900 new connections/s (the
//! README's sizing rule) runs dry for a moment; the client's SYN retry
//! then gets a port. How fast is for `cargo xtask bench`.
//!
//! Needs root, the `balancer` binary, redis-server (or KeyDB),
//! redis-benchmark and nstat.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{ensure, Context, Result};
use balancer_tests::lab::{node_addr, run_with_timeout, AgentConfig, Lab, KEYDB_PORT, VIP};

/// Requests per redis-benchmark test; `-t ping` runs two tests, each
/// request on its own connection.
const REQUESTS: u32 = 20_000;
/// The whole run's bound (it is not the measurement).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// `nstat -az NAME` in the client's namespace: the absolute value.
fn client_counter(lab: &Lab, name: &str) -> Result<u64> {
    let out = lab.client().exec(&["nstat", "-az", name])?;
    out.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name))
                .then(|| words.next()?.parse().ok())
                .flatten()
        })
        .with_context(|| format!("no {name} in nstat output:\n{out}"))
}

#[test]
fn short_connections_through_a_remote_backend_all_succeed_with_no_snat_drop() -> Result<()> {
    let mut lab = Lab::new("H", 2)?;
    lab.start_servers()?;
    let mut config = AgentConfig::for_lab(&lab, true);
    config.backends = vec![SocketAddrV4::new(node_addr(2), KEYDB_PORT)];
    config.conntrack_flows = 262_144;
    lab.start_agent(1, &config)?;
    let result = churn(&lab);
    if result.is_err() {
        eprintln!("--- agent log (node 1) ---\n{}", lab.agent_log_tail(1, 60));
    }
    result
}

fn churn(lab: &Lab) -> Result<()> {
    // The client reuses its own TIME_WAIT ports, as a busy client host is
    // set up to.
    lab.client().sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    lab.client()
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let opens_before = client_counter(lab, "TcpActiveOpens")?;
    let fails_before = client_counter(lab, "TcpAttemptFails")?;
    let mut cmd = lab.client().command("redis-benchmark");
    cmd.args([
        "-h",
        &VIP.to_string(),
        "-p",
        &KEYDB_PORT.to_string(),
        "-k",
        "0",
        "-c",
        "50",
        "-n",
        &REQUESTS.to_string(),
        "-t",
        "ping",
        "--csv",
    ]);
    let out = run_with_timeout(&mut cmd, RUN_TIMEOUT).context("redis-benchmark -k 0")?;
    let opens = client_counter(lab, "TcpActiveOpens")? - opens_before;
    let fails = client_counter(lab, "TcpAttemptFails")? - fails_before;
    let status = lab.status_json(1)?;
    let counters = &status["dataplane"]["counters"];
    let exhausted = counters["drop_snat_exhausted"]
        .as_u64()
        .context("drop_snat_exhausted in the status")?;
    let new_flows = status["services"][0]["backends"][0]["traffic"]["connections"]
        .as_u64()
        .context("the remote backend's connection count")?;
    println!(
        "redis-benchmark -k 0 -c 50 -n {REQUESTS} -t ping through the VIP to the remote backend: \
         {opens} connects, {fails} failed; the data plane forwarded {new_flows} new flows, \
         drop_snat_exhausted {exhausted}; redis-benchmark: {}",
        out.trim().replace('\n', " | ")
    );
    let expected = u64::from(REQUESTS) * 2;
    ensure!(fails == 0, "{fails} connects failed");
    ensure!(
        new_flows >= expected,
        "the remote backend got {new_flows} new flows, fewer than the {expected} connections"
    );
    ensure!(
        out.lines().filter(|l| l.contains("PING")).count() == 2,
        "redis-benchmark did not finish both tests:\n{out}"
    );
    Ok(())
}
