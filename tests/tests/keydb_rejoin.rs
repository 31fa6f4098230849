//! A KeyDB node that rejoins empty never serves stale data (issue 10).
//!
//! Two nodes, real KeyDB 6.3.4 active-active and our agents. Node 2 holds
//! a dataset large enough that a full resync takes over a second. A
//! client through the VIP SETs new keys and GETs keys whose writes were
//! acknowledged (its own, and the dataset's), with a new connection per
//! command, and checks every read against what was acknowledged. Node 1's
//! link is cut, its KeyDB killed -9 and restarted empty, the link
//! restored; the trial ends once both nodes are READY in the agents'
//! status and the client has done more work after that. Then every
//! acknowledged write is read back from both nodes.
//!
//! Pass: 0 stale reads and 0 lost writes in each of [`TRIALS`] trials.
//! Failed commands (refused connections, `-LOADING`, timeouts while the
//! VIP moves) are counted and printed, not judged: they are not wrong
//! answers. No timing assertions; every wait awaits an event.
//!
//! Needs root, the `balancer` binary and KeyDB (`cargo xtask test`).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::{
    lab::{
        exclusive, node_addr, require_keydb, spawn_in_netns, vip_keydb, AgentConfig, KeydbOptions,
        Lab,
    },
    resp::{info_field, Connection, Value},
};

/// Independent rejoins.
const TRIALS: usize = 3;
/// Keys both nodes hold before the trial (`DEBUG POPULATE`): what node 1
/// has to fetch again in a full sync.
const DATASET_KEYS: u64 = 400_000;
/// Node 1's priority; node 2 has [`LOW`].
const HIGH: u8 = 150;
const LOW: u8 = 100;
/// Bounds on waits for events (never slept for).
const LINKS_TIMEOUT: Duration = Duration::from_secs(90);
const ELECTION_TIMEOUT: Duration = Duration::from_secs(20);
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Client commands that must succeed after both nodes are READY again.
const OPS_AFTER: u64 = 600;
/// Timeout of each client connection and command.
const OP_TIMEOUT: Duration = Duration::from_millis(500);
/// How old an acknowledged write must be before the client reads it back
/// (see `client`): a bound on the replication lag between two healthy
/// nodes, far below the seconds a rejoin takes.
const REPLICATION_GRACE: Duration = Duration::from_millis(200);
/// Poll interval of the waits.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct Counts {
    writes_acked: u64,
    reads_checked: u64,
    stale_reads: u64,
    failed: u64,
    lost_writes: u64,
    /// First few wrong answers, for the failure message.
    examples: Vec<String>,
}

/// What the client shares with the test thread.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// The test asks the client to stop writing (reads go on) ...
    pause_writes: AtomicBool,
    /// ... and the client says it has.
    writes_paused: AtomicBool,
    ok_ops: AtomicU64,
    counts: Mutex<Counts>,
    /// Acknowledged writes: key, value, when acknowledged (in order).
    acked: Mutex<Vec<(String, String, Instant)>>,
    /// When each failed command happened, relative to the client's start.
    failures: Mutex<Vec<(f64, String)>>,
    /// Every command: when (relative to the client's start), a write or
    /// not, answered or not.
    ops: Mutex<Vec<(f64, bool, bool)>>,
}

/// What the test saw of the rejoin, besides the client's counts.
#[derive(Debug, Default)]
struct Observed {
    /// From restoring the link to node 1's KeyDB reporting its link up
    /// and `loading:0` (the full resync, load included).
    resync: Option<Duration>,
    /// From restoring the link to both nodes READY in both agents.
    both_ready: Duration,
    /// The survivor reported `loading:1` (KeyDB #365) from .. to (client
    /// clock, seconds).
    survivor_loading: Option<(f64, f64)>,
    /// The survivor was in the VIP holder's READY set while loading.
    survivor_served_while_loading: bool,
    /// Direct GETs of a dataset key / SETs on the survivor while it was
    /// loading: GETs answered right, answered wrong, refused with an error
    /// (`-LOADING`); SETs answered, refused.
    loading_gets: [u64; 3],
    loading_sets: [u64; 2],
    /// A line of `balancer status` naming how far node 1 was behind.
    status_line: Option<String>,
}

/// One command on a new connection through the VIP.
fn once(args: &[&str]) -> Result<Value, String> {
    let mut c = Connection::connect(vip_keydb(), OP_TIMEOUT).map_err(|e| e.to_string())?;
    c.send(args).map_err(|e| e.to_string())?;
    match c.read_reply().map_err(|e| e.to_string())? {
        Value::Error(e) => Err(e),
        v => Ok(v),
    }
}

/// The client: SET a new key, GET one of its own acknowledged keys, GET a
/// key of the dataset; repeat until told to stop.
fn client(shared: Arc<Shared>, trial: usize, started: Instant) {
    let record = |write: bool, ok: bool| {
        let at = started.elapsed().as_secs_f64();
        shared.ops.lock().unwrap().push((at, write, ok));
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ trial as u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut n = 0u64;
    let fail = |what: String| {
        shared.counts.lock().unwrap().failed += 1;
        shared
            .failures
            .lock()
            .unwrap()
            .push((started.elapsed().as_secs_f64(), what));
    };
    let check = |key: &str, expected: &str, got: Result<Value, String>| match got {
        Ok(v) => {
            let mut counts = shared.counts.lock().unwrap();
            counts.reads_checked += 1;
            let text = v.as_text();
            if text.as_deref() != Some(expected) {
                counts.stale_reads += 1;
                if counts.examples.len() < 10 {
                    let at = started.elapsed().as_secs_f64();
                    counts.examples.push(format!(
                        "{at:.2} s: GET {key} = {text:?}, acknowledged {expected:?}"
                    ));
                }
            }
            drop(counts);
            shared.ok_ops.fetch_add(1, Ordering::Relaxed);
            record(false, true);
        }
        Err(e) => {
            record(false, false);
            fail(format!("GET {key}: {e}"))
        }
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let paused = shared.pause_writes.load(Ordering::SeqCst);
        shared.writes_paused.store(paused, Ordering::SeqCst);
        if paused {
            let i = next() % DATASET_KEYS;
            let key = format!("key:{i}");
            check(&key, &format!("value:{i}"), once(&["GET", &key]));
            continue;
        }
        let key = format!("t{trial}:w:{n}");
        let value = format!("v{n}");
        n += 1;
        match once(&["SET", &key, &value]) {
            Ok(Value::Status(s)) if s == "OK" => {
                shared.counts.lock().unwrap().writes_acked += 1;
                shared
                    .acked
                    .lock()
                    .unwrap()
                    .push((key, value, Instant::now()));
                shared.ok_ops.fetch_add(1, Ordering::Relaxed);
                record(true, true);
            }
            Ok(other) => {
                record(true, false);
                fail(format!("SET {key}: {other:?}"))
            }
            Err(e) => {
                record(true, false);
                fail(format!("SET {key}: {e}"))
            }
        }
        let pick = {
            // Replication is asynchronous: a write acknowledged by one
            // node reaches the other a moment later, and round robin may
            // send the next connection there. Only writes older than
            // REPLICATION_GRACE are read back.
            let acked = shared.acked.lock().unwrap();
            let old = acked.partition_point(|(_, _, at)| at.elapsed() >= REPLICATION_GRACE);
            (old > 0).then(|| {
                let (k, v, _) = &acked[(next() % old as u64) as usize];
                (k.clone(), v.clone())
            })
        };
        if let Some((key, value)) = pick {
            check(&key, &value, once(&["GET", &key]));
        }
        let i = next() % DATASET_KEYS;
        let key = format!("key:{i}");
        check(&key, &format!("value:{i}"), once(&["GET", &key]));
    }
}

/// Node `node`'s entry for `backend` in node `on`'s status: (health, in
/// the READY set).
fn backend_state(lab: &Lab, on: usize, backend: usize) -> Option<(String, bool)> {
    let status = lab.status_json(on).ok()?;
    let addr = format!("{}:6380", node_addr(backend));
    let b = status["services"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr.as_str())?
        .clone();
    Some((b["health"].as_str()?.to_string(), b["in_ready_set"] == true))
}

/// Waits for `cond`, polling every [`POLL`]; `what` names it on timeout.
fn await_event(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() >= timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(POLL);
    }
    Ok(started.elapsed())
}

fn trial(server: &std::path::Path, number: usize) -> Result<Counts> {
    let mut lab = Lab::new("kdbrj", 2)?;
    lab.start_keydb_group(server, LINKS_TIMEOUT)?;
    // DEBUG POPULATE is not replicated: the same keys (key:N = value:N)
    // are made on each node, as if both had received them.
    for node in 1..=2 {
        lab.keydb_command(node, &["DEBUG", "POPULATE", &DATASET_KEYS.to_string()])?;
        let dbsize = lab.keydb_command(node, &["DBSIZE"])?;
        ensure!(
            matches!(dbsize, Value::Int(n) if n as u64 >= DATASET_KEYS),
            "node {node} holds {dbsize:?} keys"
        );
    }
    lab.start_agent(1, &AgentConfig::for_cluster(&lab, HIGH))?;
    lab.start_agent(2, &AgentConfig::for_cluster(&lab, LOW))?;
    lab.wait_for_sole_holder(1, ELECTION_TIMEOUT, Duration::from_millis(500))?;
    for b in 1..=2 {
        await_event(
            &format!("backend {b} READY on node 1"),
            READY_TIMEOUT,
            || backend_state(&lab, 1, b).is_some_and(|(h, s)| h == "ready" && s),
        )?;
    }

    let shared = Arc::new(Shared::default());
    let t0 = Instant::now();
    let worker = spawn_in_netns(lab.client(), "rejoin-client", {
        let shared = Arc::clone(&shared);
        move || client(shared, number, t0)
    })?;
    let result = (|| -> Result<Observed> {
        let ok = |n: u64| {
            let from = shared.ok_ops.load(Ordering::Relaxed);
            move |s: &Shared| s.ok_ops.load(Ordering::Relaxed) >= from + n
        };
        let warm = ok(200);
        await_event("client warm-up", READY_TIMEOUT, || warm(&shared))?;

        // Node 1 leaves the LAN; node 2 takes the VIP and serves alone.
        // A write node 1 acknowledged a moment before the cut may not have
        // reached node 2 yet: asynchronous replication delays or loses
        // such writes whatever the balancer does, and this test is about
        // the rejoin. So writes pause until node 2 has the last one.
        shared.pause_writes.store(true, Ordering::SeqCst);
        await_event("client writes paused", READY_TIMEOUT, || {
            shared.writes_paused.load(Ordering::SeqCst)
        })?;
        let last = shared.acked.lock().unwrap().last().cloned();
        if let Some((key, value, _)) = last {
            lab.wait_for_value(2, &key, &value, LINKS_TIMEOUT)?;
        }
        lab.cut_link(1)?;
        lab.wait_for_holders("node 2 holds the VIP", ELECTION_TIMEOUT, |h| h.contains(&2))?;
        shared.pause_writes.store(false, Ordering::SeqCst);
        let during = ok(200);
        await_event("client served by node 2 alone", READY_TIMEOUT, || {
            during(&shared)
        })?;

        // Its KeyDB dies and comes back empty, still cut off.
        lab.kill_server(1)?;
        let options = KeydbOptions::active_active(server.to_path_buf(), 1, 2);
        lab.start_keydb(1, &options)?;
        let dbsize = lab.keydb_command(1, &["DBSIZE"])?;
        ensure!(
            dbsize == Value::Int(0),
            "node 1 restarted with {dbsize:?} keys"
        );
        lab.restore_link(1)?;
        let restored = Instant::now();

        // Both nodes READY in both agents' views, and both KeyDBs' links
        // up. Meanwhile: when node 1's resync ends, and whether the
        // survivor loads (#365) and serves while it does.
        let mut seen = Observed::default();
        seen.both_ready = await_event("both nodes READY again", READY_TIMEOUT, || {
            if seen.resync.is_none() {
                if let (Ok(p), Ok(r)) = (
                    lab.keydb_info(1, "persistence"),
                    lab.keydb_info(1, "replication"),
                ) {
                    if balancer_tests::lab::keydb::links_up(&p, &r) {
                        seen.resync = Some(restored.elapsed());
                    }
                }
            }
            if seen.status_line.is_none() {
                if let Ok(text) = lab.balancer_status(2, false) {
                    seen.status_line = text
                        .lines()
                        .find(|l| l.contains("catching up:") && l.contains(" behind "))
                        .map(|l| l.trim().to_string());
                }
            }
            if let Ok(p) = lab.keydb_info(2, "persistence") {
                if info_field(&p, "loading") == Some("1") {
                    let at = t0.elapsed().as_secs_f64();
                    let from = seen.survivor_loading.map_or(at, |(f, _)| f);
                    seen.survivor_loading = Some((from, at));
                    // What clients would get from it right now.
                    let get = lab.keydb_command(2, &["GET", "key:1"]);
                    let outcome = match get {
                        Ok(v) if v.as_text().as_deref() == Some("value:1") => 0,
                        Ok(_) => 1,
                        Err(_) => 2,
                    };
                    seen.loading_gets[outcome] += 1;
                    let set = lab.keydb_command(2, &["SET", "loading-probe", "1"]);
                    seen.loading_sets[usize::from(set.is_err())] += 1;
                    if let Ok(Some(holder)) = lab.vip_holder() {
                        seen.survivor_served_while_loading |=
                            backend_state(&lab, holder, 2).is_some_and(|(_, s)| s);
                    }
                }
            }
            (1..=2).all(|on| {
                (1..=2).all(|b| backend_state(&lab, on, b).is_some_and(|(h, _)| h == "ready"))
            })
        })?;
        lab.wait_for_links_up(1, LINKS_TIMEOUT)?;
        lab.wait_for_links_up(2, LINKS_TIMEOUT)?;
        let after = ok(OPS_AFTER);
        await_event("client work after the rejoin", READY_TIMEOUT, || {
            after(&shared)
        })?;
        Ok(seen)
    })();
    shared.stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let seen = result.with_context(|| lab.diagnostics())?;

    // Every acknowledged write, read back from both nodes directly.
    let acked = std::mem::take(&mut *shared.acked.lock().unwrap());
    let mut counts = std::mem::take(&mut *shared.counts.lock().unwrap());
    for node in 1..=2 {
        for chunk in acked.chunks(500) {
            let mut args = vec!["MGET"];
            args.extend(chunk.iter().map(|(k, _, _)| k.as_str()));
            let Value::Array(Some(values)) = lab.keydb_command(node, &args)? else {
                bail!("MGET on node {node}: not an array");
            };
            for ((key, value, _), got) in chunk.iter().zip(values) {
                if got.as_text().as_deref() != Some(value) {
                    counts.lost_writes += 1;
                    if counts.examples.len() < 10 {
                        counts.examples.push(format!(
                            "node {node}: {key} = {:?}, acknowledged {value:?}",
                            got.as_text()
                        ));
                    }
                }
            }
        }
    }
    if counts.stale_reads > 0 || counts.lost_writes > 0 {
        for node in 1..=2 {
            let log = lab.agent_log(node);
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("READY set changed")
                        || l.contains("health changed")
                        || l.contains("state")
                        || l.contains("priority")
                })
                .collect();
            println!("agent {node}:\n{}", lines.join("\n"));
        }
    }
    let failures = shared.failures.lock().unwrap();
    let mut kinds: HashMap<String, u64> = HashMap::new();
    for (_, what) in failures.iter() {
        let kind = what.split_once(": ").map_or(what.as_str(), |(_, k)| k);
        let kind: String = kind.chars().take(40).collect();
        *kinds.entry(kind).or_default() += 1;
    }
    let span = match (failures.first(), failures.last()) {
        (Some(a), Some(b)) => format!(" between {:.2} s and {:.2} s", a.0, b.0),
        _ => String::new(),
    };
    let while_loading = seen.survivor_loading.map(|(from, to)| {
        let ops = shared.ops.lock().unwrap();
        let mut n = [0u64; 4];
        for &(_, write, ok) in ops.iter().filter(|(at, _, _)| (from..=to).contains(at)) {
            n[usize::from(write) * 2 + usize::from(!ok)] += 1;
        }
        format!(
            "survivor loading {:.2}–{:.2} s (client clock), in the holder's set: {}; meanwhile client reads {} ok / {} failed, writes {} ok / {} failed; direct to the loading survivor: GET {} right / {} wrong / {} refused, SET {} answered / {} refused",
            from, to, seen.survivor_served_while_loading, n[0], n[1], n[2], n[3],
            seen.loading_gets[0], seen.loading_gets[1], seen.loading_gets[2],
            seen.loading_sets[0], seen.loading_sets[1]
        )
    });
    println!(
        "trial {number}: {} writes acknowledged, {} reads checked, {} stale, {} lost, {} failed commands{span} {kinds:?}; node 1 resynced (link up, loaded) {} after the link was restored, both READY after {:.1} s; {}",
        counts.writes_acked,
        counts.reads_checked,
        counts.stale_reads,
        counts.lost_writes,
        counts.failed,
        seen.resync
            .map_or("?".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        seen.both_ready.as_secs_f64(),
        while_loading.unwrap_or_else(|| "survivor not seen loading".into()),
    );
    if let Some(line) = &seen.status_line {
        println!("trial {number}: node 2's `balancer status` said: {line}");
    }
    Ok(counts)
}

#[test]
fn rejoin_after_restart_empty_serves_no_stale_reads_and_loses_no_writes() -> Result<()> {
    let Some(server) = require_keydb("rejoin_after_restart_empty_serves_no_stale_reads") else {
        return Ok(());
    };
    let _one = exclusive();
    let mut bad = Vec::new();
    for number in 1..=TRIALS {
        let counts = trial(&server, number)?;
        ensure!(
            counts.reads_checked > 0 && counts.writes_acked > 0,
            "trial {number} checked nothing"
        );
        if counts.stale_reads > 0 || counts.lost_writes > 0 {
            bad.push(format!(
                "trial {number}: {} stale reads, {} lost writes: {:#?}",
                counts.stale_reads, counts.lost_writes, counts.examples
            ));
        }
    }
    ensure!(bad.is_empty(), "{}", bad.join("\n"));
    Ok(())
}
