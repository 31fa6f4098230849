//! Real KeyDB 6.3.4 in the lab (issue 10): an active-active pair
//! replicates both ways, and the INFO texts it gives in each phase of a
//! rejoin (sync in progress, loading, link up but behind, caught up, peer
//! unreachable) are what the readiness rule's fixtures hold.
//!
//! Needs root and KeyDB (`cargo xtask test` builds it and sets
//! `$BALANCER_KEYDB_SERVER`); without KeyDB each test records a skip.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use balancer_tests::{
    lab::{exclusive, require_keydb, KeydbOptions, Lab},
    resp::info_field,
};

/// How long links may take to come up in a fresh pair.
const LINKS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a phase of a rejoin may take to show up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn active_active_pair_replicates_both_ways() -> Result<()> {
    let Some(server) = require_keydb("active_active_pair_replicates_both_ways") else {
        return Ok(());
    };
    let _one = exclusive();
    let mut lab = Lab::new("kdbpair", 2)?;
    lab.start_keydb_group(&server, LINKS_TIMEOUT)?;
    let version = lab.keydb_info(1, "server")?;
    println!(
        "keydb_version {}",
        info_field(&version, "redis_version").unwrap_or("?")
    );
    for index in 1..=2 {
        let info = lab.keydb_info(index, "replication")?;
        let role = info_field(&info, "role");
        if role != Some("active-replica") {
            bail!("node {index} reports role {role:?}:\n{info}");
        }
    }
    lab.keydb_command(1, &["SET", "from-1", "a"])?;
    lab.keydb_command(2, &["SET", "from-2", "b"])?;
    lab.wait_for_value(2, "from-1", "a", LINKS_TIMEOUT)?;
    lab.wait_for_value(1, "from-2", "b", LINKS_TIMEOUT)?;
    Ok(())
}

/// Where the readiness rule's fixtures live.
fn fixture_dir() -> PathBuf {
    balancer_tests::lab::workspace_dir().join("balancer-user/src/health/fixtures/keydb-6.3.4")
}

/// `INFO persistence` and `INFO replication` of node `index`, as one text.
fn both_sections(lab: &Lab, index: usize) -> Result<String> {
    Ok(format!(
        "{}\r\n{}",
        lab.keydb_info(index, "persistence")?,
        lab.keydb_info(index, "replication")?
    ))
}

fn save(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    println!("captured {}", path.display());
    Ok(())
}

/// Polls `capture` until `done` holds for what it returned.
fn await_phase(
    what: &str,
    mut capture: impl FnMut() -> Result<String>,
    done: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut last = String::new();
    loop {
        if let Ok(text) = capture() {
            if done(&text) {
                return Ok(text);
            }
            last = text;
        }
        if Instant::now() >= deadline {
            bail!("no {what} within {PHASE_TIMEOUT:?}; last:\n{last}");
        }
    }
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    info_field(text, name)
}

fn offset(text: &str, name: &str) -> i64 {
    field(text, name).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

/// Regenerates `balancer-user/src/health/fixtures/keydb-6.3.4/`: node 1 of
/// a pair restarted empty while node 2 holds a dataset and takes writes;
/// `rdb-key-save-delay` on node 2 and `key-load-delay` on node 1 stretch
/// the sync and the load so that each phase is seen. Each phase is a pair
/// of files, `<phase>.node.txt` (node 1) and `<phase>.peer.txt` (node 2,
/// polled after node 1), each `INFO persistence` then `INFO replication`.
#[test]
#[ignore = "regenerates fixture files: cargo test -p balancer-tests --test keydb -- --ignored capture"]
fn capture_rejoin_phases() -> Result<()> {
    let Some(server) = require_keydb("capture_rejoin_phases") else {
        return Ok(());
    };
    let _one = exclusive();
    let dir = fixture_dir();
    std::fs::create_dir_all(&dir)?;
    let mut lab = Lab::new("kdbcap", 2)?;
    lab.start_keydb_group(&server, LINKS_TIMEOUT)?;
    lab.keydb_command(2, &["DEBUG", "POPULATE", "20000", "key", "100"])?;
    lab.wait_for_links_up(1, LINKS_TIMEOUT)?;
    lab.keydb_command(2, &["SET", "probe", "1"])?;
    lab.wait_for_value(1, "probe", "1", LINKS_TIMEOUT)?;
    let node = both_sections(&lab, 1)?;
    let peer = both_sections(&lab, 2)?;
    save(&dir, "caught-up.node.txt", &node)?;
    save(&dir, "caught-up.peer.txt", &peer)?;

    // Node 1 dies and comes back empty; node 2 sends its RDB slowly
    // (100 µs per key: 2 s) and node 1 loads it slowly (50 µs per key).
    lab.keydb_command(2, &["CONFIG", "SET", "rdb-key-save-delay", "100"])?;
    lab.kill_server(1)?;
    let peer_down = await_phase(
        "peer link down on node 2",
        || both_sections(&lab, 2),
        |t| field(t, "master_link_status") == Some("down"),
    )?;
    let mut options = KeydbOptions::active_active(server.clone(), 1, 2);
    options.extra.push("key-load-delay 50".into());
    lab.start_keydb(1, &options)?;
    let node = await_phase(
        "sync in progress on node 1",
        || both_sections(&lab, 1),
        |t| field(t, "master_sync_in_progress") == Some("1"),
    )?;
    let peer = both_sections(&lab, 2)?;
    save(&dir, "sync-in-progress.node.txt", &node)?;
    save(&dir, "sync-in-progress.peer.txt", &peer)?;
    // Writes during the sync are buffered on node 2 for node 1: what node
    // 1 has to apply after its link comes up.
    let mut big = Vec::new();
    for i in 0..20000 {
        big.push(format!("late:{i}"));
    }
    lab.node(2).ns().run_in({
        let target = lab.keydb_addr(2);
        move || -> Result<()> {
            let mut c = balancer_tests::resp::Connection::connect(target, Duration::from_secs(5))?;
            let value = "v".repeat(1000);
            let mut batch = Vec::new();
            for key in &big {
                batch.extend(balancer_tests::resp::encode_command(&["SET", key, &value]));
            }
            c.send_all(&batch)?;
            for _ in &big {
                c.read_reply()?;
            }
            Ok(())
        }
    })??;
    let node = await_phase(
        "loading on node 1",
        || both_sections(&lab, 1),
        |t| field(t, "loading") == Some("1"),
    )?;
    let peer = both_sections(&lab, 2)?;
    save(&dir, "loading.node.txt", &node)?;
    save(&dir, "loading.peer.txt", &peer)?;
    // The first poll with the link up; node 2 polled right after it.
    let node = await_phase(
        "link up on node 1",
        || both_sections(&lab, 1),
        |t| field(t, "master_link_status") == Some("up") && field(t, "loading") == Some("0"),
    )?;
    let peer = both_sections(&lab, 2)?;
    let behind = offset(&peer, "master_repl_offset") - offset(&node, "slave_repl_offset");
    println!("link up on node 1: {behind} bytes behind node 2");
    save(&dir, "link-up-behind.node.txt", &node)?;
    save(&dir, "link-up-behind.peer.txt", &peer)?;
    lab.keydb_command(2, &["CONFIG", "SET", "rdb-key-save-delay", "0"])?;
    lab.keydb_command(2, &["SET", "probe", "2"])?;
    lab.wait_for_value(1, "probe", "2", PHASE_TIMEOUT)?;
    lab.wait_for_links_up(2, PHASE_TIMEOUT)?;
    // Node 1 has applied all of node 2's stream (polled until so).
    let (node, peer) = {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        loop {
            let node = both_sections(&lab, 1)?;
            let peer = both_sections(&lab, 2)?;
            if offset(&node, "slave_repl_offset") >= offset(&peer, "master_repl_offset") {
                break (node, peer);
            }
            if Instant::now() >= deadline {
                bail!("node 1 did not catch up with node 2 within {PHASE_TIMEOUT:?}");
            }
        }
    };
    save(&dir, "rejoined-caught-up.node.txt", &node)?;
    save(&dir, "rejoined-caught-up.peer.txt", &peer)?;
    // The survivor while its peer is dead: its own link down.
    save(&dir, "survivor-link-down.node.txt", &peer_down)?;

    // Node 2 becomes unreachable: node 1's view of it.
    lab.kill_server(2)?;
    let node = await_phase(
        "link down on node 1",
        || both_sections(&lab, 1),
        |t| field(t, "master_link_status") == Some("down"),
    )?;
    save(&dir, "peer-unreachable.node.txt", &node)?;
    if behind <= 0 {
        bail!("node 1 was not behind when its link came up ({behind} bytes); run again");
    }
    Ok(())
}
