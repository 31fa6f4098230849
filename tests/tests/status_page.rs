//! The status page (`GET /` on each agent's metrics listener) in a real
//! browser: headless Chromium, run in the lab's client namespace, loads
//! node 1's and node 2's pages; the rendered text shows the master and the
//! backup (which lists the master as its peer: backups do not advertise),
//! the VIP, both backends READY. Then node 1's link is cut: node
//! 2's page shows it as MASTER holding the VIP, and node 1's KeyDB as not
//! READY. A screenshot of each page is kept under target/status-page/.
//!
//! Waits poll a condition with a deadline. Needs root, the `balancer`
//! binary, redis-server and chromium (scripts/setup.sh installs them).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use balancer_tests::lab::{
    exclusive, node_addr, run_with_timeout, workspace_dir, AgentConfig, Lab, KEYDB_PORT, VIP,
};

const ELECTION_TIMEOUT: Duration = Duration::from_secs(15);
const STABLE_FOR: Duration = Duration::from_secs(1);
/// How long a page may take to show a change.
const PAGE_TIMEOUT: Duration = Duration::from_secs(20);
/// One Chromium run.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs headless Chromium in the client's namespace with `args` (a fresh
/// profile each time, nothing fetched in the background); its stdout.
fn chromium(lab: &Lab, args: &[String]) -> Result<String> {
    let profile = lab.dir().join("chromium-profile");
    let _ = fs::remove_dir_all(&profile);
    let mut cmd = lab.client().command("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args);
    run_with_timeout(&mut cmd, BROWSER_TIMEOUT)
        .context("run chromium (scripts/setup.sh installs it)")
}

fn page_url(lab: &Lab, index: usize) -> String {
    format!("http://{}/", lab.metrics_addr(index))
}

/// The page of node `index` as Chromium rendered it: its DOM's text, tags
/// removed, whitespace collapsed.
fn rendered_text(lab: &Lab, index: usize) -> Result<String> {
    let dom = chromium(lab, &["--dump-dom".into(), page_url(lab, index)])?;
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn screenshot(lab: &Lab, index: usize, name: &str) -> Result<PathBuf> {
    let dir = workspace_dir().join("target/status-page");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.png"));
    chromium(
        lab,
        &[
            format!("--screenshot={}", path.display()),
            "--window-size=1100,900".into(),
            "--hide-scrollbars".into(),
            page_url(lab, index),
        ],
    )?;
    ensure_png(&path)?;
    Ok(path)
}

fn ensure_png(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if !bytes.starts_with(b"\x89PNG") {
        bail!("{} is not a PNG", path.display());
    }
    Ok(())
}

/// Waits until node `index`'s rendered page contains every one of `want`.
fn wait_for_page(lab: &Lab, index: usize, want: &[String]) -> Result<String> {
    let deadline = Instant::now() + PAGE_TIMEOUT;
    loop {
        let text = rendered_text(lab, index)?;
        if want.iter().all(|w| text.contains(w.as_str())) {
            return Ok(text);
        }
        if Instant::now() >= deadline {
            let missing: Vec<&String> =
                want.iter().filter(|w| !text.contains(w.as_str())).collect();
            bail!("node {index}'s page lacks {missing:?} after {PAGE_TIMEOUT:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn backend(index: usize) -> String {
    format!("{}:{KEYDB_PORT}", node_addr(index))
}

#[test]
fn status_page_follows_a_failover_in_a_browser() -> Result<()> {
    let _serial = exclusive();
    let mut lab = Lab::new("W", 2)?;
    lab.start_servers()?;
    for (index, priority) in [(1, 150), (2, 100)] {
        lab.start_agent(index, &AgentConfig::for_cluster(&lab, priority))?;
    }
    lab.wait_for_sole_holder(1, ELECTION_TIMEOUT, STABLE_FOR)
        .context("node 1 has the highest priority")?;
    let result = check_pages(&mut lab);
    if result.is_err() {
        eprintln!("{}", lab.diagnostics());
    }
    result
}

fn check_pages(lab: &mut Lab) -> Result<()> {
    let ready = |index: usize, local: bool| {
        format!(
            "{} {} READY yes",
            backend(index),
            if local { "local" } else { "remote" }
        )
    };
    wait_for_page(
        lab,
        1,
        &[
            "state MASTER".into(),
            format!("VIP {VIP} held"),
            ready(1, true),
            ready(2, false),
            format!("remote backend SNAT ports in use free {}", backend(2)),
        ],
    )?;
    wait_for_page(
        lab,
        2,
        &[
            "state BACKUP".into(),
            format!("VIP {VIP} not held"),
            format!("peer {} priority 150", node_addr(1)),
            ready(1, false),
            ready(2, true),
        ],
    )?;
    let before = screenshot(lab, 1, "master-before-failover")?;
    println!("node 1's page before the failover: {}", before.display());

    lab.cut_link(1)?;
    lab.wait_for_sole_holder(2, ELECTION_TIMEOUT, STABLE_FOR)
        .context("node 2 takes the VIP when node 1's link is cut")?;
    let text = wait_for_page(
        lab,
        2,
        &[
            "state MASTER".into(),
            format!("VIP {VIP} held"),
            format!("{} remote DOWN no", backend(1)),
            ready(2, true),
            "election: became MASTER".into(),
        ],
    )?;
    let after = screenshot(lab, 2, "new-master-after-failover")?;
    println!(
        "node 2's page after the failover: {}\n{text}",
        after.display()
    );
    lab.restore_link(1)?;
    Ok(())
}
