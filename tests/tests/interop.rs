//! Interop with a real keepalived (Debian's, 2.2.x): our agent and
//! keepalived in one VRRP group, configured as users configure keepalived
//! today (the seed: `virtual_router_id 101`, `auth_type PASS`,
//! `auth_pass 1111`, VRRPv2, 1 s adverts), and in VRRPv3 with 100 ms
//! adverts. In both directions (our agent master / keepalived backup and
//! the reverse, by priorities) exactly one node holds the VIP, and it moves
//! when the holder's link is cut, and comes back when it returns.
//!
//! Also: adverts captured from a real keepalived on the lab's LAN decode
//! with our codec, and the saved captures in tests/fixtures/ still do
//! (run with `BALANCER_SAVE_FIXTURES=1` to refresh those files).
//!
//! Needs root, the `balancer` binary, redis-server, keepalived, tcpdump.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::lab::{
    exclusive, node_addr, AgentConfig, KeepalivedConfig, Lab, VipAttempt, CLUSTER_VRID, VIP,
};
use balancer_user::vrrp::packet::{
    receive, Auth, ChecksumMatch, Format, IpHeaderFields, ReceiveRules, V3Checksum, Version,
    IPPROTO_VRRP, VRRP_MULTICAST_V4, VRRP_TTL,
};

/// Connections through the VIP per traffic check.
const SAMPLE: usize = 20;
/// Timeout of each client connect and command.
const IO_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    /// The seed: VRRPv2, advert_int 1, auth_type PASS, auth_pass 1111.
    V2Pass,
    /// VRRPv3, advert_int 0.1 (100 ms), keepalived's default checksum.
    V3,
    /// The seed's keepalived.conf verbatim, `vrrp_strict` included: strict
    /// keepalived ignores its `auth_pass` and sends VRRPv2 adverts without
    /// authentication, so the agent that joins it has no `auth_pass`
    /// (README, "Migrating from keepalived + HAProxy").
    SeedStrict,
}

impl Flavour {
    fn keepalived(self, priority: u8) -> KeepalivedConfig {
        match self {
            Flavour::V2Pass => KeepalivedConfig::seed_v2(priority),
            Flavour::V3 => KeepalivedConfig::v3(priority),
            Flavour::SeedStrict => KeepalivedConfig::seed_strict(priority),
        }
    }

    fn agent(self, lab: &Lab, priority: u8) -> AgentConfig {
        let mut config = AgentConfig::for_cluster(lab, priority);
        let vrrp = config.vrrp.as_mut().expect("cluster config has [vrrp]");
        match self {
            Flavour::V2Pass => {
                vrrp.version = Some(2);
                vrrp.advert_interval_ms = Some(1000);
                vrrp.auth_pass = Some("1111".into());
            }
            Flavour::V3 => {
                vrrp.version = Some(3);
                vrrp.advert_interval_ms = Some(100);
            }
            Flavour::SeedStrict => {
                vrrp.version = Some(2);
                vrrp.advert_interval_ms = Some(1000);
            }
        }
        config
    }

    fn advert_interval(self) -> Duration {
        match self {
            Flavour::V2Pass | Flavour::SeedStrict => Duration::from_secs(1),
            Flavour::V3 => Duration::from_millis(100),
        }
    }

    /// Master_Down_Interval for the lowest priority we use, plus room for
    /// process start-up and a loaded machine.
    fn takeover_timeout(self) -> Duration {
        self.advert_interval() * 4 + Duration::from_secs(4)
    }

    /// How long the holder must stay alone to count as stable: a few
    /// adverts.
    fn stable_for(self) -> Duration {
        match self {
            Flavour::V2Pass | Flavour::SeedStrict => Duration::from_millis(2500),
            Flavour::V3 => Duration::from_secs(1),
        }
    }

    /// Whether keepalived's node answers on the VIP while keepalived holds
    /// it. Strict mode sets `no_accept`: keepalived's node drops traffic to
    /// the VIP (that is keepalived's behaviour, not ours to test).
    fn keepalived_serves_the_vip(self) -> bool {
        self != Flavour::SeedStrict
    }

    fn receive_rules(self) -> ReceiveRules {
        let (version, auth, adver_int_cs) = match self {
            Flavour::V2Pass => (Version::V2, Auth::pass("1111").expect("short"), 100),
            Flavour::V3 => (Version::V3, Auth::None, 10),
            Flavour::SeedStrict => (Version::V2, Auth::None, 100),
        };
        ReceiveRules {
            version,
            vrid: CLUSTER_VRID,
            auth,
            v3_checksum: V3Checksum::WithPseudoHeader,
            // keepalived 2.2's default is the pseudo-header form: accept
            // only that, so a change of default shows.
            accept_other_v3_checksum: false,
            adver_int_cs,
            addresses: vec![VIP],
            check_addresses: true,
            allowed_sources: None,
            local_is_owner: false,
        }
    }
}

/// `balancer import` of each flavour's keepalived.conf gives the agent
/// what keepalived puts on the wire (version, interval, authentication, as
/// [`Flavour::receive_rules`] has it from real captures): for the seed's
/// strict file, no `auth_pass`; with the benchmark's haproxy.cfg, its
/// service and HAProxy's check timing. Needs no root.
#[test]
fn import_of_each_flavour_matches_what_keepalived_sends() -> Result<()> {
    use std::net::SocketAddrV4;

    use balancer_tests::{
        bench::haproxy::{CheckTiming, HaproxyConfig},
        lab::KEYDB_PORT,
    };
    use balancer_user::import::{convert, Input, Options};
    let backends = vec![
        SocketAddrV4::new(node_addr(1), KEYDB_PORT),
        SocketAddrV4::new(node_addr(2), KEYDB_PORT),
    ];
    // The HAProxy the benchmark runs in front of the lab's KeyDBs.
    let haproxy = HaproxyConfig {
        bind: SocketAddrV4::new(VIP, KEYDB_PORT),
        backends: backends.clone(),
        check: CheckTiming::default(),
        stats_socket: None,
    }
    .to_config();
    for flavour in [Flavour::V2Pass, Flavour::V3, Flavour::SeedStrict] {
        let keepalived = flavour.keepalived(150).to_conf(1);
        let imported = convert(
            Input {
                name: "keepalived.conf",
                text: &keepalived,
            },
            Some(Input {
                name: "haproxy.cfg",
                text: &haproxy,
            }),
            &Options {
                address: Some(node_addr(1)),
                instance: None,
            },
        )
        .with_context(|| format!("{flavour:?}:\n{keepalived}"))?;
        let config = balancer_user::config::parse(&imported.config, "imported")
            .with_context(|| imported.config.clone())?;
        let vrrp = config.vrrp.clone().context("[vrrp]")?;
        let wire = flavour.receive_rules();
        ensure!(
            (vrrp.version, vrrp.advert_interval_cs, &vrrp.auth)
                == (wire.version, wire.adver_int_cs, &wire.auth),
            "{flavour:?}: imported {:?}, keepalived sends {:?}",
            (vrrp.version, vrrp.advert_interval_cs, &vrrp.auth),
            (wire.version, wire.adver_int_cs, &wire.auth)
        );
        ensure!(
            (vrrp.vrid, vrrp.priority, vrrp.preempt) == (CLUSTER_VRID, 150, true),
            "{flavour:?}: {vrrp:?}"
        );
        ensure!(
            config.vips() == vec![VIP],
            "{flavour:?}: {:?}",
            config.vips()
        );
        let service = &config.services[0];
        let health = &config.health;
        ensure!(
            service.port == KEYDB_PORT
                && service.backends == backends
                && (health.interval_ms, health.rise, health.fall) == (2000, 2, 3),
            "{flavour:?}: {service:?} {health:?}"
        );
    }
    Ok(())
}

#[test]
fn v2_pass_agent_master_keepalived_backup() -> Result<()> {
    interop("I2a", Flavour::V2Pass, true)
}

#[test]
fn v2_pass_keepalived_master_agent_backup() -> Result<()> {
    interop("I2k", Flavour::V2Pass, false)
}

#[test]
fn seed_strict_agent_master_keepalived_backup() -> Result<()> {
    interop("ISa", Flavour::SeedStrict, true)
}

#[test]
fn seed_strict_keepalived_master_agent_backup() -> Result<()> {
    interop("ISk", Flavour::SeedStrict, false)
}

/// The migration mistake the seed invites: copying its `auth_pass 1111`
/// into the agent next to its strict keepalived (which sends no
/// authentication). The two cannot form one group; the agent's log must
/// say why and what to change.
#[test]
fn seed_strict_with_copied_auth_pass_is_explained_in_the_log() -> Result<()> {
    let _serial = exclusive();
    let mut lab = Lab::new("ISp", 2)?;
    lab.start_servers()?;
    let mut agent = Flavour::SeedStrict.agent(&lab, 100);
    agent.vrrp.as_mut().expect("[vrrp]").auth_pass = Some("1111".into());
    lab.start_agent(1, &agent)?;
    lab.start_keepalived(2, &KeepalivedConfig::seed_strict(150))?;
    let hint = "remove auth_pass from [vrrp]";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.agent_log(1).contains(hint) {
        if Instant::now() >= deadline {
            eprintln!("{}", lab.diagnostics());
            bail!("the agent did not log {hint:?} within 10 s of keepalived's first adverts");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn v3_agent_master_keepalived_backup() -> Result<()> {
    interop("I3a", Flavour::V3, true)
}

#[test]
fn v3_keepalived_master_agent_backup() -> Result<()> {
    interop("I3k", Flavour::V3, false)
}

/// Node 1 runs our agent, node 2 keepalived; both run redis-server, and the
/// agent's service has both as backends. The higher priority (150 against
/// 100) goes to the agent when `agent_master`.
fn interop(tag: &str, flavour: Flavour, agent_master: bool) -> Result<()> {
    let _serial = exclusive();
    let mut lab = Lab::new(tag, 2)?;
    lab.start_servers()?;
    let run_ids = lab.server_run_ids()?;
    let (ours, theirs) = if agent_master { (150, 100) } else { (100, 150) };
    lab.start_agent(1, &flavour.agent(&lab, ours))?;
    lab.start_keepalived(2, &flavour.keepalived(theirs))?;
    let result = interop_steps(&mut lab, &run_ids, flavour, agent_master);
    if result.is_err() {
        eprintln!("{}", lab.diagnostics());
    }
    result
}

fn interop_steps(
    lab: &mut Lab,
    run_ids: &std::collections::HashMap<String, usize>,
    flavour: Flavour,
    agent_master: bool,
) -> Result<()> {
    let (master, backup) = if agent_master { (1, 2) } else { (2, 1) };
    let who = |node: usize| if node == 1 { "our agent" } else { "keepalived" };

    // Election: exactly one holder, the higher priority, for a while.
    let started = Instant::now();
    let elected = lab
        .wait_for_sole_holder(master, flavour.takeover_timeout() * 2, flavour.stable_for())
        .with_context(|| {
            format!(
                "{} (node {master}, the higher priority) is not elected",
                who(master)
            )
        })?;
    println!(
        "{flavour:?}: {} (node {master}) holds the VIP alone {:.1} s after start, and for {:?} more",
        who(master),
        (elected - started).as_secs_f64(),
        flavour.stable_for()
    );
    expect_traffic(lab, run_ids, flavour, master, &[1, 2])?;

    // Cut the holder off: the other takes over.
    lab.cut_link(master)?;
    let cut = Instant::now();
    let (_, moved) = lab.wait_for_holders(
        &format!(
            "{} (node {backup}) takes the VIP after node {master}'s link is cut",
            who(backup)
        ),
        flavour.takeover_timeout(),
        |h| h.contains(&backup),
    )?;
    println!(
        "{flavour:?}: link of node {master} cut; {} (node {backup}) holds the VIP {:.0} ms later",
        who(backup),
        (moved - cut).as_secs_f64() * 1000.0
    );
    // Only the backup's server is reachable now.
    expect_traffic(lab, run_ids, flavour, backup, &[backup])?;

    // The master comes back and (preempt) takes the VIP back; one holder.
    lab.restore_link(master)?;
    let restored = Instant::now();
    let back = lab
        .wait_for_sole_holder(master, flavour.takeover_timeout() * 2, flavour.stable_for())
        .with_context(|| format!("{} (node {master}) does not take the VIP back", who(master)))?;
    println!(
        "{flavour:?}: link of node {master} restored; {} (node {master}) holds the VIP alone {:.0} ms later, and for {:?} more",
        who(master),
        (back - restored).as_secs_f64() * 1000.0,
        flavour.stable_for()
    );
    expect_traffic(lab, run_ids, flavour, master, &[1, 2])?;
    Ok(())
}

/// New connections through the VIP while `holder` holds it: they must
/// succeed (after at most a few seconds of settling: the health checks of
/// a node that just became master, ARP) and be served by exactly the
/// servers in `served_by`. Our agent balances over both backends; with
/// keepalived, the kernel of its node answers, so only its own server.
fn expect_traffic(
    lab: &Lab,
    run_ids: &std::collections::HashMap<String, usize>,
    flavour: Flavour,
    holder: usize,
    served_by: &[usize],
) -> Result<()> {
    if holder == 2 && !flavour.keepalived_serves_the_vip() {
        println!(
            "  keepalived (strict mode) holds the VIP: its node does not accept traffic to it"
        );
        return Ok(());
    }
    let served_by: Vec<usize> = if holder == 2 {
        vec![2] // keepalived's node: no balancing, its own server answers
    } else {
        served_by.to_vec()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempts = lab.sample_vip(run_ids, SAMPLE, IO_TIMEOUT)?;
        let mut seen: Vec<usize> = attempts
            .iter()
            .filter_map(|a| a.outcome.as_ref().ok().copied())
            .collect();
        seen.sort_unstable();
        seen.dedup();
        let failures: Vec<&VipAttempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
        if failures.is_empty() && seen == served_by {
            println!("  {SAMPLE} connections through the VIP served by nodes {seen:?}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "connections through the VIP (held by node {holder}) are not served by exactly {served_by:?}: \
                 served by {seen:?}, {} failed: {:?}",
                failures.len(),
                failures.iter().map(|a| &a.outcome).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// --- Captured adverts ----------------------------------------------------

/// A VRRPv2 advert keepalived 2.2.7 sent for the seed's instance
/// (priority 100, source 198.18.0.2): the IPv4 packet as captured.
const SAVED_V2: &[u8] = include_bytes!("../fixtures/keepalived-v2-pass.ipv4");
/// A VRRPv3 advert keepalived 2.2.7 sent (advert_int 0.1, priority 100,
/// source 198.18.0.2).
const SAVED_V3: &[u8] = include_bytes!("../fixtures/keepalived-v3.ipv4");

#[test]
fn captured_keepalived_v2_pass_advert_decodes() -> Result<()> {
    capture_and_decode("C2", Flavour::V2Pass, "keepalived-v2-pass.ipv4")
}

#[test]
fn captured_keepalived_v3_advert_decodes() -> Result<()> {
    capture_and_decode("C3", Flavour::V3, "keepalived-v3.ipv4")
}

#[test]
fn saved_keepalived_adverts_decode() -> Result<()> {
    for (flavour, bytes) in [(Flavour::V2Pass, SAVED_V2), (Flavour::V3, SAVED_V3)] {
        let advert =
            decode_ipv4(flavour, bytes).with_context(|| format!("saved {flavour:?} fixture"))?;
        println!("saved {flavour:?} advert: {advert}");
    }
    Ok(())
}

/// Runs keepalived alone on node 2 (it becomes master after its
/// Master_Down_Interval and advertises), captures its adverts on the
/// client's interface with tcpdump, and decodes the first one.
fn capture_and_decode(tag: &str, flavour: Flavour, fixture: &str) -> Result<()> {
    let _serial = exclusive();
    let mut lab = Lab::new(tag, 2)?;
    let pcap = lab.dir().join("adverts.pcap");
    let mut tcpdump = lab.client().spawn(&[
        "tcpdump",
        "-i",
        "eth0",
        "-n",
        "-U",
        "-c",
        "2",
        "-w",
        &pcap.display().to_string(),
        "ip proto 112",
    ])?;
    // tcpdump prints "listening on" to stderr once the capture runs; not
    // captured here, so wait for the file it creates at that point.
    wait_for(
        Duration::from_secs(10),
        "tcpdump to start capturing",
        || pcap.exists(),
    )?;
    lab.start_keepalived(2, &flavour.keepalived(100))?;
    let deadline = Instant::now() + flavour.takeover_timeout() * 2;
    loop {
        if tcpdump.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "no 2 VRRP packets captured within {:?}\n{}",
                flavour.takeover_timeout() * 2,
                lab.keepalived_log(2)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let frames = pcap_frames(&std::fs::read(&pcap)?)?;
    let frame = frames.first().context("the capture has no packet")?;
    let ip = ethernet_payload(frame)?;
    let advert = decode_ipv4(flavour, ip)?;
    println!("captured {flavour:?} advert from keepalived: {advert}");
    if std::env::var_os("BALANCER_SAVE_FIXTURES").is_some() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(fixture);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        std::fs::write(&path, ip)?;
        println!("saved {} ({} bytes)", path.display(), ip.len());
    }
    Ok(())
}

/// Checks the IPv4 header of a captured advert and decodes its payload
/// with the receive rules of a peer configured like the sender.
fn decode_ipv4(flavour: Flavour, ip: &[u8]) -> Result<String> {
    ensure!(ip.len() >= 20, "{} bytes: no IPv4 header", ip.len());
    ensure!(ip[0] >> 4 == 4, "not IPv4 (version {})", ip[0] >> 4);
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    ensure!(
        ihl >= 20 && total >= ihl && total <= ip.len(),
        "bad IPv4 lengths: ihl {ihl}, total {total}, captured {}",
        ip.len()
    );
    let header = IpHeaderFields {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ttl: ip[8],
        protocol: ip[9],
    };
    ensure!(
        header.protocol == IPPROTO_VRRP,
        "IP protocol {}",
        header.protocol
    );
    ensure!(header.ttl == VRRP_TTL, "TTL {}", header.ttl);
    ensure!(header.dst == VRRP_MULTICAST_V4, "sent to {}", header.dst);
    ensure!(header.src == node_addr(2), "sent from {}", header.src);
    let decoded = receive(&header, &ip[ihl..total], &flavour.receive_rules())
        .map_err(|e| anyhow::anyhow!("rejected ({}): {e}", e.reason()))?;
    let advert = &decoded.advert;
    ensure!(advert.vrid == CLUSTER_VRID, "VRID {}", advert.vrid);
    ensure!(advert.priority == 100, "priority {}", advert.priority);
    ensure!(
        advert.addresses == [VIP],
        "addresses {:?}",
        advert.addresses
    );
    match (&advert.format, flavour) {
        (Format::V2 { adver_int_s, auth }, Flavour::V2Pass) => {
            ensure!(*adver_int_s == 1, "v2 interval {adver_int_s} s");
            ensure!(
                *auth == Auth::pass("1111").expect("short"),
                "v2 authentication {auth:?}"
            );
            ensure!(
                decoded.checksum == ChecksumMatch::V2,
                "{:?}",
                decoded.checksum
            );
        }
        (Format::V3 { max_adver_int_cs }, Flavour::V3) => {
            ensure!(*max_adver_int_cs == 10, "v3 interval {max_adver_int_cs} cs");
            ensure!(
                decoded.checksum == ChecksumMatch::V3(V3Checksum::WithPseudoHeader),
                "v3 checksum verified as {:?}",
                decoded.checksum
            );
        }
        (format, _) => bail!("{flavour:?} capture decoded as {format:?}"),
    }
    Ok(format!(
        "{} bytes from {}, VRID {}, priority {}, {:?}, addresses {:?}, checksum {:?}",
        total - ihl,
        header.src,
        advert.vrid,
        advert.priority,
        advert.format,
        advert.addresses,
        decoded.checksum
    ))
}

/// The frames of a classic pcap file (either byte order, µs or ns
/// timestamps).
fn pcap_frames(file: &[u8]) -> Result<Vec<Vec<u8>>> {
    ensure!(file.len() >= 24, "pcap file of {} bytes", file.len());
    let magic = [file[0], file[1], file[2], file[3]];
    let little = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => bail!("not a pcap file (magic {magic:02x?})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if little {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    ensure!(
        u32_at(file, 20) == 1,
        "link type {} is not Ethernet",
        u32_at(file, 20)
    );
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let len = u32_at(file, at + 8) as usize;
        let start = at + 16;
        ensure!(start + len <= file.len(), "truncated pcap record");
        frames.push(file[start..start + len].to_vec());
        at = start + len;
    }
    Ok(frames)
}

/// The IPv4 packet of an Ethernet frame (untagged or one 802.1Q tag).
fn ethernet_payload(frame: &[u8]) -> Result<&[u8]> {
    ensure!(frame.len() >= 14, "frame of {} bytes", frame.len());
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let mut at = 14;
    if ethertype == 0x8100 {
        ensure!(frame.len() >= 18, "tagged frame of {} bytes", frame.len());
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        at = 18;
    }
    ensure!(
        ethertype == 0x0800,
        "ethertype 0x{ethertype:04x} is not IPv4"
    );
    Ok(&frame[at..])
}

fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
