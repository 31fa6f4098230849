//! The election runtime on a real (namespaced) LAN, without the data plane:
//! two [`Election`]s in two network namespaces joined by a bridge in a
//! third, each with a recording active flag instead of the XDP map.
//!
//! Checks the wire format of what is sent (raw capture, decoded), that
//! exactly one node holds the VIP, that cutting the holder's bridge port
//! moves it and healing it moves it back (preemption), that the health
//! input lowers the priority, and that a graceful stop hands over within
//! Skew_Time. Needs root and `ip`. Addresses only from 198.18.0.0/15;
//! the namespaces are deleted also when an assertion fails.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsFd,
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_user::{
    config::Vrrp,
    dataplane::DataPlaneError,
    election::{ActiveFlag, Election, ElectionSetup, ElectionStatus},
    vrrp::{packet, Auth, State, V3Checksum, Version},
    vrrp_socket::{parse_ipv4, AdvertCounters},
};
use tokio::sync::{oneshot, watch};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 100);
const DEADLINE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(5);

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawn {cmd}"))?;
    ensure!(
        out.status.success(),
        "`{cmd} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: String) -> Result<Netns> {
        let _ = run("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.0,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        )?;
        Ok(())
    }

    /// Runs `f` on a new thread that entered this namespace.
    fn spawn<F, R>(&self, f: F) -> Result<thread::JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = File::open(format!("/run/netns/{}", self.0))?;
        Ok(thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        }))
    }

    fn has_vip(&self) -> Result<bool> {
        Ok(self
            .ip(&["-4", "addr", "show", "dev", "eth0"])?
            .contains(&format!("{VIP}/32")))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// The active flag as a history of values.
#[derive(Default)]
struct Recorder(Vec<bool>);

impl ActiveFlag for Recorder {
    fn set_active(&mut self, active: bool) -> Result<(), DataPlaneError> {
        self.0.push(active);
        Ok(())
    }
}

impl Recorder {
    fn active(&self) -> bool {
        self.0.last().copied().unwrap_or(false)
    }
}

/// A switch namespace with br0 and `nodes` member namespaces, each with
/// eth0 = 198.18.5.<i>/24 on bridge port `p<i>`.
struct Lan {
    nodes: Vec<Netns>,
    switch: Netns,
}

impl Lan {
    fn new(nodes: usize) -> Result<Lan> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "bue{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let switch = Netns::create(format!("{prefix}s"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut lan = Lan {
            nodes: Vec::new(),
            switch,
        };
        for i in 1..=nodes {
            let ns = Netns::create(format!("{prefix}n{i}"))?;
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            let port = format!("p{i}");
            ns.ip(&[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &lan.switch.0,
            ])?;
            ns.ip(&["addr", "add", &format!("198.18.5.{i}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            lan.switch.ip(&["link", "set", &port, "master", "br0"])?;
            lan.switch.ip(&["link", "set", &port, "up"])?;
            lan.nodes.push(ns);
        }
        Ok(lan)
    }

    fn node(&self, i: usize) -> &Netns {
        &self.nodes[i - 1]
    }

    fn ifindex(&self, i: usize) -> Result<u32> {
        let out = self.node(i).ip(&["-o", "link", "show", "eth0"])?;
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .context("ifindex of eth0")
    }
}

/// One running election in a namespace.
struct Node {
    state: watch::Receiver<State>,
    status: watch::Receiver<ElectionStatus>,
    flag: Arc<Mutex<Recorder>>,
    counters: Arc<AdvertCounters>,
    health: watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Node {
    fn start(ns: &Netns, setup: ElectionSetup) -> Result<Node> {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread = ns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let (health, health_rx) = watch::channel(true);
                let flag = Arc::new(Mutex::new(Recorder::default()));
                match Election::start(setup, flag.clone(), health_rx).await {
                    Ok(election) => {
                        let _ = started_tx.send(Ok((
                            election.state(),
                            election.status(),
                            flag,
                            election.counters(),
                            health,
                        )));
                        let _ = stop_rx.await;
                        election.shutdown().await;
                    }
                    Err(error) => {
                        let _ = started_tx.send(Err(balancer_user::error_chain(&error)));
                    }
                }
            });
        })?;
        let (state, status, flag, counters, health) = started_rx
            .recv_timeout(DEADLINE)
            .context("election did not start")?
            .map_err(anyhow::Error::msg)?;
        Ok(Node {
            state,
            status,
            flag,
            counters,
            health,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn state(&self) -> State {
        *self.state.borrow()
    }

    /// The admin interface's view: state and the priority in effect.
    fn status(&self) -> ElectionStatus {
        *self.status.borrow()
    }

    fn active(&self) -> bool {
        self.flag.lock().unwrap().active()
    }

    /// Graceful stop; returns once the election released everything.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn setup(lan: &Lan, i: usize, priority: u8, peers: &[usize]) -> Result<ElectionSetup> {
    Ok(ElectionSetup {
        vrrp: Vrrp {
            vrid: 42,
            priority,
            version: Version::V3,
            advert_interval_cs: 10,
            preempt: true,
            preempt_delay: Duration::ZERO,
            auth: Auth::None,
            v3_checksum: V3Checksum::WithPseudoHeader,
            unicast_peers: peers
                .iter()
                .map(|p| Ipv4Addr::new(198, 18, 5, *p as u8))
                .collect(),
            garp_count: 3,
            garp_repeat_delay: Some(Duration::from_secs(1)),
            notify: None,
            no_ready_backend_weight: 150,
        },
        interface: "eth0".into(),
        ifindex: lan.ifindex(i)?,
        node_address: Ipv4Addr::new(198, 18, 5, i as u8),
        vips: vec![VIP],
    })
}

fn wait_for(what: &str, mut condition: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if condition()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > DEADLINE {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

/// Exactly `holder` is master, holds the VIP and has the flag set.
fn only_holder(lan: &Lan, nodes: &[&Node], holder: usize) -> Result<bool> {
    for (i, node) in nodes.iter().enumerate() {
        let is_holder = i + 1 == holder;
        if (node.state() == State::Master) != is_holder
            || lan.node(i + 1).has_vip()? != is_holder
            || node.active() != is_holder
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The next VRRP packet seen in `ns`, as a raw IP socket receives it.
fn capture_advert(ns: &Netns) -> Result<Vec<u8>> {
    ns.spawn(|| -> Result<Vec<u8>> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(112)),
        )?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = vec![0u8; 2048];
        let n = std::io::Read::read(&mut &socket, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("capture thread panicked"))?
}

fn check_advert(packet: &[u8], src: Ipv4Addr, dst: Ipv4Addr, priority: u8) -> Result<()> {
    let (ip, payload) = parse_ipv4(packet)?;
    ensure!(ip.protocol == 112, "protocol {}", ip.protocol);
    ensure!(ip.ttl == 255, "TTL {}", ip.ttl);
    ensure!(ip.src == src, "source {}", ip.src);
    ensure!(ip.dst == dst, "destination {}", ip.dst);
    let rules = packet::ReceiveRules {
        version: Version::V3,
        vrid: 42,
        auth: Auth::None,
        v3_checksum: V3Checksum::WithPseudoHeader,
        accept_other_v3_checksum: false,
        adver_int_cs: 10,
        addresses: vec![VIP],
        check_addresses: true,
        allowed_sources: None,
        local_is_owner: false,
    };
    let decoded = packet::receive(&ip, payload, &rules)?;
    ensure!(
        decoded.advert.priority == priority,
        "priority {}",
        decoded.advert.priority
    );
    ensure!(decoded.advert.addresses == vec![VIP]);
    Ok(())
}

#[test]
fn two_nodes_elect_fail_over_and_hand_over() -> Result<()> {
    let lan = Lan::new(2)?;
    let mut n1 = Node::start(lan.node(1), setup(&lan, 1, 200, &[])?)?;
    let mut n2 = Node::start(lan.node(2), setup(&lan, 2, 100, &[])?)?;
    wait_for("node 1 to hold the VIP alone", || {
        only_holder(&lan, &[&n1, &n2], 1)
    })?;

    // What node 1 sends, seen from node 2's namespace.
    let advert = capture_advert(lan.node(2))?;
    check_advert(
        &advert,
        Ipv4Addr::new(198, 18, 5, 1),
        packet::VRRP_MULTICAST_V4,
        200,
    )?;

    // The health input: without a READY backend node 1 advertises
    // 200 - 150 = 50 and node 2 (100) preempts; READY again, node 1 is back.
    let master_since = n1.status();
    ensure!(
        (master_since.state, master_since.priority) == (State::Master, 200),
        "{master_since:?}"
    );
    n1.health.send(false)?;
    wait_for("node 2 to take over from the unhealthy node 1", || {
        only_holder(&lan, &[&n1, &n2], 2)
    })?;
    let lowered = n1.status();
    ensure!(
        (lowered.state, lowered.priority) == (State::Backup, 50),
        "the status shows the lowered priority: {lowered:?}"
    );
    ensure!(lowered.since > master_since.since, "{lowered:?}");
    n1.health.send(true)?;
    wait_for("node 1 to preempt back", || {
        only_holder(&lan, &[&n1, &n2], 1)
    })?;
    let back = n1.status();
    ensure!(
        (back.state, back.priority) == (State::Master, 200),
        "{back:?}"
    );

    // Cut node 1's bridge port: node 1 goes to Fault and releases the VIP,
    // node 2 takes over after Master_Down_Interval.
    lan.switch.ip(&["link", "set", "p1", "down"])?;
    let took = wait_for("node 2 to take over from the cut node 1", || {
        Ok(n1.state() == State::Fault
            && !lan.node(1).has_vip()?
            && !n1.active()
            && n2.state() == State::Master
            && lan.node(2).has_vip()?
            && n2.active())
    })?;
    ensure!(took < Duration::from_secs(1), "failover took {took:?}");
    lan.switch.ip(&["link", "set", "p1", "up"])?;
    wait_for("node 1 to come back and preempt", || {
        only_holder(&lan, &[&n1, &n2], 1)
    })?;

    // A VIP removed behind the election's back comes back.
    lan.node(1)
        .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "eth0"])?;
    wait_for("node 1 to re-add its VIP", || lan.node(1).has_vip())?;

    // Graceful stop of the master: priority 0, node 2 takes over after
    // Skew_Time (about 61 ms for priority 100), not Master_Down_Interval.
    let start = Instant::now();
    n1.stop();
    ensure!(
        !lan.node(1).has_vip()?,
        "node 1 kept the VIP after stopping"
    );
    ensure!(!n1.active(), "node 1 kept the active flag after stopping");
    wait_for("node 2 to take over from the stopped node 1", || {
        Ok(n2.state() == State::Master && lan.node(2).has_vip()? && n2.active())
    })?;
    let handover = start.elapsed();
    ensure!(
        handover < Duration::from_millis(250),
        "graceful handover took {handover:?}"
    );

    n2.stop();
    ensure!(
        !lan.node(2).has_vip()?,
        "node 2 kept the VIP after stopping"
    );
    for node in [&n1, &n2] {
        ensure!(node.counters.received.load(Ordering::Relaxed) > 0);
        ensure!(node.counters.sent.load(Ordering::Relaxed) > 0);
        ensure!(
            node.counters.dropped_total() == 0,
            "dropped adverts: {:?}",
            node.counters.dropped()
        );
    }
    Ok(())
}

#[test]
fn unicast_peers_elect_and_ignore_strangers() -> Result<()> {
    let lan = Lan::new(3)?;
    // Nodes 1 and 2 are peers; node 3 runs the same VRID but is not listed:
    // its adverts are dropped as from an unknown source, and it never hears
    // the others (they do not send to it).
    let n1 = Node::start(lan.node(1), setup(&lan, 1, 100, &[2])?)?;
    let n2 = Node::start(lan.node(2), setup(&lan, 2, 150, &[1])?)?;
    let n3 = Node::start(lan.node(3), setup(&lan, 3, 250, &[1, 2])?)?;
    wait_for("node 2 to be the master of the peer pair", || {
        Ok(n2.state() == State::Master
            && lan.node(2).has_vip()?
            && n1.state() == State::Backup
            && !lan.node(1).has_vip()?)
    })?;
    wait_for("node 1 and 2 to drop node 3's adverts", || {
        Ok(n1.counters.dropped_for("source") > 0 && n2.counters.dropped_for("source") > 0)
    })?;
    ensure!(n3.state() == State::Master, "node 3 hears nobody");

    let advert = capture_advert(lan.node(1))?;
    let (ip, _) = parse_ipv4(&advert)?;
    // Node 1 sees both peers' adverts; check the one from node 2.
    if ip.src == Ipv4Addr::new(198, 18, 5, 2) {
        check_advert(
            &advert,
            Ipv4Addr::new(198, 18, 5, 2),
            Ipv4Addr::new(198, 18, 5, 1),
            150,
        )?;
    } else {
        ensure!(ip.src == Ipv4Addr::new(198, 18, 5, 3), "source {}", ip.src);
        ensure!(ip.dst == Ipv4Addr::new(198, 18, 5, 1) && ip.ttl == 255);
    }
    Ok(())
}

/// Sends `count` copies of `payload` to 224.0.0.18 from `ns` with `ttl`,
/// paced at 50 per 10 ms (5000/s, well inside the election's receive
/// budget, so the kernel drops none).
fn send_junk(ns: &Netns, src: Ipv4Addr, ttl: u32, payload: Vec<u8>, count: usize) -> Result<()> {
    ns.spawn(move || -> Result<()> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(112)),
        )?;
        socket.bind_device(Some(b"eth0"))?;
        socket.set_multicast_if_v4(&src)?;
        socket.set_multicast_ttl_v4(ttl)?;
        let to = socket2::SockAddr::from(std::net::SocketAddrV4::new(packet::VRRP_MULTICAST_V4, 0));
        for chunk in 0..count.div_ceil(50) {
            for _ in 0..50.min(count - chunk * 50) {
                socket.send_to(&payload, &to)?;
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))?
}

#[test]
fn bad_adverts_are_counted_by_reason_and_change_nothing() -> Result<()> {
    let lan = Lan::new(3)?;
    let n1 = Node::start(lan.node(1), setup(&lan, 1, 200, &[])?)?;
    let n2 = Node::start(lan.node(2), setup(&lan, 2, 100, &[])?)?;
    wait_for("node 1 to hold the VIP alone", || {
        only_holder(&lan, &[&n1, &n2], 1)
    })?;
    let src = Ipv4Addr::new(198, 18, 5, 3);
    let good = |vrid: u8, priority: u8| {
        packet::Advert {
            vrid,
            priority,
            format: packet::Format::V3 {
                max_adver_int_cs: 10,
            },
            addresses: vec![VIP],
        }
        .encode(src, packet::VRRP_MULTICAST_V4, V3Checksum::WithPseudoHeader)
    };
    let mut bad_checksum = good(42, 255);
    bad_checksum[6] ^= 0xff;
    // A priority-255 advert that would win if it were accepted.
    let cases: Vec<(&str, u32, Vec<u8>)> = vec![
        ("too_short", 255, vec![0x31, 42, 255]),
        ("checksum", 255, bad_checksum),
        ("ttl", 64, good(42, 255)),
        ("version", 255, {
            let mut v = good(42, 255);
            v[0] = 0x21;
            v
        }),
        ("vrid", 255, good(7, 255)),
    ];
    let per_case = 500;
    for (_, ttl, payload) in &cases {
        send_junk(lan.node(3), src, *ttl, payload.clone(), per_case)?;
    }
    for (reason, _, _) in &cases {
        for (i, node) in [&n1, &n2].into_iter().enumerate() {
            wait_for(
                &format!("node {} to count {per_case} {reason}", i + 1),
                || Ok(node.counters.dropped_for(reason) == per_case as u64),
            )
            .with_context(|| format!("{:?}", node.counters.dropped()))?;
        }
    }
    ensure!(
        only_holder(&lan, &[&n1, &n2], 1)?,
        "the junk changed the election"
    );
    ensure!(n2.state() == State::Backup);
    for node in [&n1, &n2] {
        ensure!(node.counters.dropped_total() == (per_case * cases.len()) as u64);
    }
    Ok(())
}
