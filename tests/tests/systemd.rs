//! Running under systemd (scripts/balancer.service): the agent speaks the
//! notify protocol (`Type=notify`, `WatchdogSec=`) to a `NOTIFY_SOCKET`
//! this test binds, the way systemd does, and the shipped unit file passes
//! `systemd-analyze verify`.
//!
//! Needs root, the `balancer` binary, redis-server and systemd-analyze
//! (scripts/setup.sh installs them).

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::lab::{
    balancer_bin, exclusive, workspace_dir, AgentConfig, Lab, CLUSTER_VRID, XDP_LINK_PIN,
};

/// The watchdog interval the test asks for (`WATCHDOG_USEC`): the agent
/// must ping every 100 ms.
const WATCHDOG: Duration = Duration::from_millis(200);
/// Pings that must arrive after READY=1.
const PINGS: usize = 5;
/// How long anything the test waits for may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// One datagram the agent sent, and whether the XDP link was pinned when
/// it arrived.
#[derive(Debug)]
struct Message {
    text: String,
    link_pinned: bool,
}

/// Receives datagrams on `socket` until `stop`, each with whether `link`
/// existed on arrival.
fn record(
    socket: UnixDatagram,
    link: PathBuf,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Message>,
) -> Result<()> {
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = Message {
                    text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                    link_pinned: link.exists(),
                };
                if tx.send(message).is_err() {
                    return Ok(());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The next message, within the deadline.
fn next(rx: &mpsc::Receiver<Message>, deadline: Instant, waiting_for: &str) -> Result<Message> {
    let left = deadline.saturating_duration_since(Instant::now());
    rx.recv_timeout(left)
        .with_context(|| format!("no notify message ({waiting_for}) within {TIMEOUT:?}"))
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn agent_speaks_the_notify_protocol() -> Result<()> {
    let _serial = exclusive();
    let mut lab = Lab::new("Y", 2)?;
    lab.start_servers()?;

    // The notify command records whether it inherited systemd's variables.
    let inherited = lab.dir().join("notify-env.log");
    let script = lab.dir().join("notify-env.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 ${{NOTIFY_SOCKET:-unset}} ${{WATCHDOG_USEC:-unset}}\" >> '{}'\n",
            inherited.display()
        ),
    )?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    let mut config = AgentConfig::for_cluster(&lab, 150);
    config
        .vrrp
        .as_mut()
        .context("a cluster config has [vrrp]")?
        .notify = Some(script);

    let socket_path = lab.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)?;
    let link = lab.node(1).versioned_pin_dir().join(XDP_LINK_PIN);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let recorder = {
        let stop = stop.clone();
        thread::spawn(move || record(socket, link, stop, tx))
    };
    let result = (|| -> Result<()> {
        let socket = socket_path.display().to_string();
        let watchdog_usec = WATCHDOG.as_micros().to_string();
        lab.start_agent_with_env(
            1,
            &config,
            &[
                ("NOTIFY_SOCKET", socket.as_str()),
                ("WATCHDOG_USEC", watchdog_usec.as_str()),
            ],
        )?;
        let deadline = Instant::now() + TIMEOUT;

        // READY=1 first, and only once the data plane is pinned.
        let ready = next(&rx, deadline, "READY=1")?;
        ensure!(
            lines(&ready.text).contains(&"READY=1"),
            "the first message is not READY=1: {ready:?}"
        );
        ensure!(
            ready.link_pinned,
            "READY=1 arrived before the XDP link was pinned"
        );
        let status =
            format!("STATUS=serving 1 service(s) on eth0 (native XDP), VRRP vrid {CLUSTER_VRID}");
        ensure!(
            lines(&ready.text).contains(&status.as_str()),
            "{ready:?} lacks {status}"
        );

        // Then watchdog pings.
        let mut pings = 0;
        while pings < PINGS {
            let m = next(&rx, deadline, "WATCHDOG=1")?;
            ensure!(
                lines(&m.text) == ["WATCHDOG=1"],
                "unexpected message after READY=1: {m:?}"
            );
            pings += 1;
        }

        // The notify command ran without systemd's variables.
        lab.wait_for_sole_holder(1, TIMEOUT, Duration::ZERO)?;
        let recorded = loop {
            let text = fs::read_to_string(&inherited).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("master ")) {
                break text;
            }
            if Instant::now() >= deadline {
                bail!("the notify command did not record \"master\": {text:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        for line in recorded.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            ensure!(
                fields[1..] == ["unset", "unset"],
                "the notify command inherited systemd's variables: {line}"
            );
        }

        // SIGTERM: STOPPING=1, then a clean exit.
        let status = lab.stop_agent(1)?;
        ensure!(status.success(), "the agent exited with {status}");
        loop {
            let m = next(&rx, deadline, "STOPPING=1")?;
            if lines(&m.text).contains(&"STOPPING=1") {
                break;
            }
            ensure!(
                lines(&m.text) == ["WATCHDOG=1"],
                "unexpected message while stopping: {m:?}"
            );
        }
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    let recorded = recorder.join().expect("the recorder thread panicked");
    if result.is_err() {
        eprintln!("{}", lab.diagnostics());
    }
    result.and(recorded)
}

#[test]
fn unit_file_passes_systemd_analyze_verify() -> Result<()> {
    let shipped = workspace_dir().join("scripts/balancer.service");
    let unit =
        fs::read_to_string(&shipped).with_context(|| format!("read {}", shipped.display()))?;
    const EXEC: &str = "ExecStart=/usr/sbin/balancer run --config /etc/balancer/balancer.toml";
    ensure!(unit.contains(EXEC), "{} lacks {EXEC}", shipped.display());
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "KillMode=mixed",
    ] {
        ensure!(unit.contains(line), "{} lacks {line}", shipped.display());
    }
    // verify checks that ExecStart's program exists: point it at the
    // binary the tests use.
    let dir = std::env::temp_dir().join(format!("balancer-unit-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let copy = dir.join("balancer.service");
    let exec = format!(
        "ExecStart={} run --config /etc/balancer/balancer.toml",
        balancer_bin().display()
    );
    fs::write(&copy, unit.replace(EXEC, &exec))?;
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("run systemd-analyze (scripts/setup.sh installs systemd)");
    let _ = fs::remove_dir_all(&dir);
    let output = output?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("balancer.service"))
        .collect();
    ensure!(
        output.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        output.status
    );
    Ok(())
}
