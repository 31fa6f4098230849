//! The write-up's keepalived.conf (node 1 verbatim, node 2 with its lower
//! priority) with an haproxy.cfg for its KeyDBs, and variants of both.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::*;
use crate::{config, vrrp::Auth, vrrp::Version};

const SEED_NODE1: &str = include_str!("../../tests/import/seed-keepalived.conf");
const SEED_NODE2: &str = include_str!("../../tests/import/seed-keepalived-node2.conf");
const HAPROXY: &str = include_str!("../../tests/import/keydb-haproxy.cfg");

const NODE1: Ipv4Addr = Ipv4Addr::new(192, 168, 174, 11);
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 174, 19);
const VIP: Ipv4Addr = Ipv4Addr::new(192, 168, 174, 99);

fn at(address: Ipv4Addr) -> Options {
    Options {
        address: Some(address),
        instance: None,
    }
}

fn run(keepalived: &str, haproxy: &str, options: &Options) -> Result<Imported, ImportError> {
    convert(
        Input {
            name: "keepalived.conf",
            text: keepalived,
        },
        Some(Input {
            name: "haproxy.cfg",
            text: haproxy,
        }),
        options,
    )
}

/// Converts, and loads the result the way `balancer check` does.
fn import(keepalived: &str, haproxy: &str, options: &Options) -> (config::Config, Imported) {
    let imported = run(keepalived, haproxy, options).unwrap_or_else(|e| panic!("{e}"));
    let config = config::parse(&imported.config, "out.toml")
        .unwrap_or_else(|e| panic!("{}\n{}", crate::error_chain(&e), imported.config));
    (config, imported)
}

fn error(keepalived: &str, haproxy: &str, options: &Options) -> String {
    match run(keepalived, haproxy, options) {
        Ok(imported) => panic!("converted:\n{}", imported.config),
        Err(e) => e.to_string(),
    }
}

/// The warning at `file:line` containing `text`.
fn warned(imported: &Imported, file: &str, line: usize, text: &str) {
    assert!(
        imported
            .warnings
            .iter()
            .any(|w| w.origin.file == file && w.origin.line == line && w.message.contains(text)),
        "no warning at {file}:{line} with {text:?} in:\n{}",
        list(imported)
    );
}

fn list(imported: &Imported) -> String {
    imported
        .warnings
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn not_warned(imported: &Imported, text: &str) {
    assert!(
        !imported.warnings.iter().any(|w| w.message.contains(text)),
        "unexpected warning with {text:?}:\n{}",
        list(imported)
    );
}

/// The comment line above `key = ...` in the output.
fn comment_above(imported: &Imported, key_line: &str) -> String {
    let lines: Vec<&str> = imported.config.lines().collect();
    let index = lines
        .iter()
        .position(|l| l.trim() == key_line)
        .unwrap_or_else(|| panic!("no line {key_line:?} in\n{}", imported.config));
    lines[index - 1].trim().to_string()
}

#[test]
fn seed_node1_converts_and_loads() {
    let (c, imported) = import(SEED_NODE1, HAPROXY, &at(NODE1));
    assert_eq!(c.node.interface, "ens33");
    assert_eq!(c.node.address, NODE1);
    let v = c.vrrp.as_ref().expect("[vrrp]");
    assert_eq!(v.vrid, 101);
    assert_eq!(v.priority, 101);
    assert_eq!(v.version, Version::V2);
    assert_eq!(v.advert_interval_cs, 100);
    assert!(v.preempt);
    // vrrp_strict: keepalived sends no authentication, neither does the agent.
    assert_eq!(v.auth, Auth::None);
    assert!(v.unicast_peers.is_empty());
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!((s.vip, s.port), (VIP, 6380));
    assert_eq!(
        s.backends,
        vec![
            SocketAddrV4::new(NODE1, 6380),
            SocketAddrV4::new(NODE2, 6380)
        ]
    );
    assert_eq!(s.scheduler, config::Scheduler::RoundRobin);
    assert_eq!(
        (
            c.health.interval_ms,
            c.health.timeout_ms,
            c.health.rise,
            c.health.fall
        ),
        (2000, 2000, 2, 3)
    );
    assert_eq!(c.dataplane.idle_timeout.as_secs(), 60);
    warned(
        &imported,
        "haproxy.cfg",
        20,
        "taken from haproxy.cfg:19 (timeout client 1m)",
    );

    assert_eq!(
        comment_above(&imported, "priority = 101"),
        "# from keepalived.conf:20 priority 101"
    );
    assert_eq!(
        comment_above(&imported, "vrid = 101"),
        "# from keepalived.conf:19 virtual_router_id 101"
    );
    assert_eq!(
        comment_above(&imported, "interface = \"ens33\""),
        "# from keepalived.conf:18 interface ens33"
    );
    assert_eq!(
        comment_above(&imported, "\"192.168.174.19:6380\","),
        "# from haproxy.cfg:36 server keydb2 192.168.174.19:6380 check inter 2s fall 3 rise 2"
    );
    assert!(
        comment_above(&imported, "version = 2").contains("keepalived's default"),
        "{}",
        imported.config
    );
    warned(
        &imported,
        "keepalived.conf",
        22,
        "Strict mode does not support authentication",
    );
    warned(&imported, "keepalived.conf", 11, "firewall");
    warned(&imported, "keepalived.conf", 17, "state MASTER");
    warned(&imported, "keepalived.conf", 31, "IPVS");
    warned(&imported, "keepalived.conf", 10, "vrrp_skip_check_adv_addr");
    warned(&imported, "keepalived.conf", 9, "router_id");
    warned(&imported, "keepalived.conf", 4 - 1, "notification_email");
    warned(&imported, "keepalived.conf", 16, "no track_script");
    warned(&imported, "haproxy.cfg", 16, "option redispatch");
    warned(&imported, "haproxy.cfg", 17, "retries 3");
    warned(&imported, "haproxy.cfg", 18, "timeout connect");
    warned(&imported, "haproxy.cfg", 5, "global section");
    warned(&imported, "haproxy.cfg", 35, "PING");
    // keepalived's default, and what the agent does: nothing to warn.
    not_warned(&imported, "vrrp_garp_interval");
    // Each warning is in the file too.
    for w in &imported.warnings {
        assert!(
            imported.config.contains(&format!("# WARNING {w}")),
            "{w} missing from\n{}",
            imported.config
        );
    }
    // The password is in neither.
    assert!(!imported.config.contains("1111"), "{}", imported.config);
    assert!(!list(&imported).contains("1111"));
}

#[test]
fn seed_node2_converts_with_its_own_priority_and_address() {
    let (c, imported) = import(SEED_NODE2, HAPROXY, &at(NODE2));
    assert_eq!(c.node.address, NODE2);
    assert_eq!(c.vrrp.as_ref().unwrap().priority, 100);
    assert_eq!(c.services[0].backends[1], SocketAddrV4::new(NODE2, 6380));
    warned(&imported, "keepalived.conf", 17, "state BACKUP");
    let summary = config::summary(&c);
    assert!(
        summary.contains(
            "service 192.168.174.99:6380 -> 192.168.174.11:6380, 192.168.174.19:6380 (local)"
        ),
        "{summary}"
    );
}

#[test]
fn auth_pass_is_kept_without_vrrp_strict() {
    let conf = SEED_NODE1.replace("  vrrp_strict\n", "");
    let (c, imported) = import(&conf, HAPROXY, &at(NODE1));
    let v = c.vrrp.unwrap();
    assert_eq!(v.auth, Auth::pass("1111").unwrap());
    not_warned(&imported, "Strict mode");
    not_warned(&imported, "firewall");
    // The comment names the line, not the password.
    assert_eq!(
        comment_above(&imported, "auth_pass = \"1111\""),
        "# from keepalived.conf:23 auth_pass (auth_type PASS)"
    );
}

#[test]
fn a_long_auth_pass_is_cut_as_keepalived_sends_it() {
    let conf = SEED_NODE1
        .replace("  vrrp_strict\n", "")
        .replace("auth_pass 1111", "auth_pass 0123456789");
    let (c, imported) = import(&conf, HAPROXY, &at(NODE1));
    assert_eq!(c.vrrp.unwrap().auth, Auth::pass("01234567").unwrap());
    warned(&imported, "keepalived.conf", 23, "first 8");
}

#[test]
fn vrrpv3_drops_authentication_and_keeps_fine_intervals() {
    let conf = SEED_NODE1
        .replace("  vrrp_strict\n", "  vrrp_version 3\n")
        .replace("advert_int 1", "advert_int 0.1");
    let (c, imported) = import(&conf, HAPROXY, &at(NODE1));
    let v = c.vrrp.unwrap();
    assert_eq!(v.version, Version::V3);
    assert_eq!(v.advert_interval_cs, 10);
    assert_eq!(v.auth, Auth::None);
    warned(
        &imported,
        "keepalived.conf",
        22,
        "VRRPv3 has no authentication",
    );
    assert_eq!(
        comment_above(&imported, "version = 3"),
        "# from keepalived.conf:11 vrrp_version 3"
    );
}

#[test]
fn vrrpv2_rounds_sub_second_adverts_with_a_warning() {
    let conf = SEED_NODE1.replace("advert_int 1", "advert_int 1.5");
    let (c, imported) = import(&conf, HAPROXY, &at(NODE1));
    assert_eq!(c.vrrp.unwrap().advert_interval_cs, 200);
    warned(&imported, "keepalived.conf", 21, "whole seconds");
}

const UNICAST: &str = "\
vrrp_instance KEYDB {
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority 90
    advert_int 2
    nopreempt
    unicast_src_ip 192.168.174.19
    unicast_peer {
        192.168.174.11
        192.168.174.19
        192.168.174.20
    }
    authentication {
        auth_type PASS
        auth_pass s3cret
    }
    virtual_ipaddress {
        192.168.174.99/24 dev eth0 label eth0:vip
    }
    track_interface {
        eth0
        eth1
    }
    notify_master /etc/keepalived/to_master.sh
    notify \"/usr/local/bin/keepalived-notify\"
    notify_fault /etc/keepalived/fault.sh VI_1
}
";

#[test]
fn unicast_peers_nopreempt_and_the_source_address() {
    let (c, imported) = import(UNICAST, HAPROXY, &Options::default());
    assert_eq!(c.node.address, NODE2);
    assert_eq!(c.node.interface, "eth0");
    let v = c.vrrp.unwrap();
    assert_eq!(v.vrid, 51);
    assert_eq!(v.priority, 90);
    assert_eq!(v.advert_interval_cs, 200);
    assert!(!v.preempt);
    assert_eq!(v.auth, Auth::pass("s3cret").unwrap());
    // This node's own address in the list is left out, with a warning.
    assert_eq!(
        v.unicast_peers,
        vec![NODE1, Ipv4Addr::new(192, 168, 174, 20)]
    );
    warned(&imported, "keepalived.conf", 1, "own address");
    assert_eq!(
        v.notify,
        Some(std::path::PathBuf::from("/usr/local/bin/keepalived-notify"))
    );
    warned(&imported, "keepalived.conf", 26, "keepalived's arguments");
    warned(&imported, "keepalived.conf", 25, "notify_master");
    warned(
        &imported,
        "keepalived.conf",
        27,
        "notify_fault /etc/keepalived/fault.sh VI_1",
    );
    // With arguments, notify cannot be [vrrp] notify.
    let with_args = UNICAST.replace(
        "notify \"/usr/local/bin/keepalived-notify\"",
        "notify /usr/local/bin/keepalived-notify --log",
    );
    let (c, imported) = import(&with_args, HAPROXY, &Options::default());
    assert_eq!(c.vrrp.unwrap().notify, None);
    warned(&imported, "keepalived.conf", 26, "without arguments");
    warned(&imported, "keepalived.conf", 19, "/32");
    warned(&imported, "keepalived.conf", 19, "label eth0:vip");
    warned(&imported, "keepalived.conf", 23, "track_interface eth1");
    not_warned(&imported, "track_interface eth0");
    assert_eq!(
        comment_above(&imported, "address = \"192.168.174.19\""),
        "# from keepalived.conf:8 unicast_src_ip 192.168.174.19"
    );
    // --address agreeing with unicast_src_ip is fine; another is refused.
    import(UNICAST, HAPROXY, &at(NODE2));
    let e = error(UNICAST, HAPROXY, &at(NODE1));
    assert!(e.contains("--address 192.168.174.11 differs"), "{e}");
}

/// As keepalived 2.2.7 reads them (`keepalived -t`): strict mode keeps
/// `nopreempt` and resets `preempt_delay`, and `nopreempt` resets
/// `preempt_delay` too.
#[test]
fn preempt_delay_is_dropped_where_keepalived_resets_it() {
    let conf = SEED_NODE1.replace(
        "  advert_int 1\n",
        "  advert_int 1\n  nopreempt\n  preempt_delay 5\n",
    );
    let (c, imported) = import(&conf, HAPROXY, &at(NODE1));
    let v = c.vrrp.unwrap();
    assert!(!v.preempt);
    assert_eq!(v.preempt_delay, std::time::Duration::ZERO);
    warned(
        &imported,
        "keepalived.conf",
        23,
        "incompatible with strict mode",
    );

    let without_strict = conf.replace("  vrrp_strict\n", "");
    let (_, imported) = import(&without_strict, HAPROXY, &at(NODE1));
    warned(
        &imported,
        "keepalived.conf",
        22,
        "incompatible with nopreempt mode",
    );

    let strict_preempting = conf.replace("  nopreempt\n", "");
    let (c, imported) = import(&strict_preempting, HAPROXY, &at(NODE1));
    assert_eq!(c.vrrp.unwrap().preempt_delay, std::time::Duration::ZERO);
    warned(
        &imported,
        "keepalived.conf",
        22,
        "incompatible with strict mode",
    );

    let plain = strict_preempting.replace("  vrrp_strict\n", "");
    let (c, imported) = import(&plain, HAPROXY, &at(NODE1));
    let v = c.vrrp.unwrap();
    assert!(v.preempt);
    assert_eq!(v.preempt_delay, std::time::Duration::from_secs(5));
    assert_eq!(
        comment_above(&imported, "preempt_delay_ms = 5000"),
        "# from keepalived.conf:21 preempt_delay 5"
    );
}

#[test]
fn several_instances_need_a_choice() {
    let second = "vrrp_instance VI_2 {\n  interface ens33\n  virtual_router_id 102\n  virtual_ipaddress {\n    192.168.174.98\n  }\n}\n";
    let conf = format!("{SEED_NODE1}{second}");
    let e = error(&conf, HAPROXY, &at(NODE1));
    assert!(e.contains("2 vrrp_instance blocks"), "{e}");
    assert!(e.contains("VI_1 (keepalived.conf:16)"), "{e}");
    assert!(e.contains("--instance"), "{e}");

    let options = Options {
        instance: Some("VI_1".into()),
        ..at(NODE1)
    };
    let (c, imported) = import(&conf, HAPROXY, &options);
    assert_eq!(c.vrrp.unwrap().vrid, 101);
    warned(
        &imported,
        "keepalived.conf",
        60,
        "vrrp_instance VI_2: not converted",
    );

    let options = Options {
        instance: Some("VI_3".into()),
        ..at(NODE1)
    };
    assert!(error(&conf, HAPROXY, &options).contains("no vrrp_instance named \"VI_3\""));
}

#[test]
fn track_script_weights_become_the_no_ready_backend_weight() {
    let script = "vrrp_script chk_keydb {\n  script \"/usr/bin/redis-cli -p 6380 ping\"\n  interval 2\n  weight -30\n}\n";
    let conf = format!(
        "{script}{}",
        SEED_NODE1.replace(
            "  advert_int 1\n",
            "  advert_int 1\n  track_script {\n    chk_keydb\n  }\n"
        )
    );
    let (c, imported) = import(&conf, HAPROXY, &at(NODE1));
    let v = c.vrrp.unwrap();
    assert_eq!((v.priority, v.no_ready_backend_weight), (101, 30));
    warned(&imported, "keepalived.conf", 28, "the script is not run");
    assert_eq!(
        comment_above(&imported, "no_ready_backend_weight = 30"),
        "# from keepalived.conf:28 track_script chk_keydb (weight -30)"
    );
    let untracked = format!("vrrp_script unused {{\n  script /bin/true\n}}\n{conf}");
    let (_, imported) = import(&untracked, HAPROXY, &at(NODE1));
    warned(
        &imported,
        "keepalived.conf",
        1,
        "vrrp_script unused: tracked by no",
    );
    not_warned(&imported, "no track_script");

    // +W while the script succeeds: priority + W, minus W while not ready.
    let conf = conf.replace("weight -30", "weight 20");
    let (c, _) = import(&conf, HAPROXY, &at(NODE1));
    let v = c.vrrp.unwrap();
    assert_eq!((v.priority, v.no_ready_backend_weight), (121, 20));

    let reversed = conf.replace("weight 20", "weight 20 reverse");
    let e = error(&reversed, HAPROXY, &at(NODE1));
    assert!(e.contains("keepalived.conf:4: weight ... reverse"), "{e}");

    let conf = conf.replace("chk_keydb\n  }", "chk_other\n  }");
    let e = error(&conf, HAPROXY, &at(NODE1));
    assert!(
        e.contains("keepalived.conf:28: track_script chk_other: no vrrp_script"),
        "{e}"
    );
}

#[test]
fn balance_first_and_servers_on_another_port() {
    let cfg = HAPROXY
        .replace("balance roundrobin", "balance first")
        .replace(":6380 check", ":6379 check");
    let (c, imported) = import(SEED_NODE1, &cfg, &at(NODE1));
    let s = &c.services[0];
    assert_eq!(s.port, 6380);
    assert_eq!(s.scheduler, config::Scheduler::First);
    assert_eq!(
        s.backends,
        vec![
            SocketAddrV4::new(NODE1, 6379),
            SocketAddrV4::new(NODE2, 6379)
        ]
    );
    assert_eq!(
        comment_above(&imported, "scheduler = \"first\""),
        "# from haproxy.cfg:28 balance first"
    );
}

#[test]
fn a_listen_section_on_every_address_with_redis_check() {
    let cfg = "\
listen keydb
    bind *:6380
    mode tcp
    balance leastconn
    option redis-check
    timeout client 30s
    timeout server 30s
    server a 192.168.174.11:6380 check
    server b 192.168.174.19:6380 check inter 1s backup
    server c 192.168.174.20:6380
";
    let (c, imported) = import(SEED_NODE1, cfg, &at(NODE1));
    let s = &c.services[0];
    assert_eq!((s.vip, s.port), (VIP, 6380));
    assert_eq!(s.backends.len(), 3);
    assert_eq!(s.scheduler, config::Scheduler::RoundRobin);
    // HAProxy's defaults for the first checked server.
    assert_eq!(
        (c.health.interval_ms, c.health.rise, c.health.fall),
        (2000, 2, 3)
    );
    assert_eq!(c.dataplane.idle_timeout.as_secs(), 30);
    warned(&imported, "haproxy.cfg", 2, "every address");
    warned(&imported, "haproxy.cfg", 4, "leastconn");
    warned(&imported, "haproxy.cfg", 8, "sent PING (haproxy.cfg:5)");
    warned(&imported, "haproxy.cfg", 9, "differ");
    warned(&imported, "haproxy.cfg", 9, "backup");
    warned(&imported, "haproxy.cfg", 10, "no `check`");

    // IPv6 binds are left out; the IPv4 one converts.
    let cfg = cfg.replace(
        "    bind *:6380\n",
        "    bind 192.168.174.99:6380,[fd00::99]:6380\n    bind /run/keydb.sock\n",
    );
    let (c, imported) = import(SEED_NODE1, &cfg, &at(NODE1));
    assert_eq!(c.services.len(), 1);
    warned(
        &imported,
        "haproxy.cfg",
        2,
        "[fd00::99]:6380: not an IPv4 address",
    );
    warned(
        &imported,
        "haproxy.cfg",
        3,
        "/run/keydb.sock: not an IPv4 address",
    );
}

#[test]
fn binds_off_the_vips_and_vips_without_binds_are_warned() {
    let cfg = HAPROXY.replace(
        "    bind 192.168.174.99:6380\n",
        "    bind 192.168.174.99:6380\n    bind 10.0.0.1:6380\n",
    );
    let conf = SEED_NODE1.replace(
        "    192.168.174.99\n",
        "    192.168.174.99\n    192.168.174.98\n",
    );
    let (c, imported) = import(&conf, &cfg, &at(NODE1));
    assert_eq!(c.services.len(), 1);
    warned(
        &imported,
        "haproxy.cfg",
        25,
        "not a keepalived virtual_ipaddress",
    );
    warned(
        &imported,
        "keepalived.conf",
        28,
        "192.168.174.98 has no HAProxy frontend",
    );
}

#[test]
fn without_haproxy_cfg_there_are_no_backends() {
    let e = convert(
        Input {
            name: "keepalived.conf",
            text: SEED_NODE1,
        },
        None,
        &at(NODE1),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--haproxy"), "{e}");
}

#[test]
fn without_the_node_address_the_servers_are_suggested() {
    let e = error(SEED_NODE1, HAPROXY, &Options::default());
    assert!(e.contains("--address"), "{e}");
    assert!(e.contains("192.168.174.11, 192.168.174.19"), "{e}");
}

/// As keepalived ignores a keyword it does not know, with a warning.
#[test]
fn an_unknown_keyword_is_a_warning() {
    let conf = SEED_NODE1.replace("  priority 101\n", "  priorty 101\n");
    let (c, imported) = import(&conf, HAPROXY, &at(NODE1));
    assert_eq!(c.vrrp.unwrap().priority, 100);
    warned(
        &imported,
        "keepalived.conf",
        20,
        "priorty 101: not converted",
    );
}

#[test]
fn include_is_a_warning() {
    let conf = format!("include /etc/keepalived/conf.d/*.conf\n{SEED_NODE1}");
    let (_, imported) = import(&conf, HAPROXY, &at(NODE1));
    warned(&imported, "keepalived.conf", 1, "is not followed");
}

#[test]
fn bad_keepalived_input_names_the_line() {
    let cases: Vec<(String, &str)> = vec![
        (
            SEED_NODE1.replacen("  }\n}\n", "  }\n", 1),
            "keepalived.conf:16: the block of `vrrp_instance VI_1`",
        ),
        (
            format!("{SEED_NODE1}}}\n"),
            "keepalived.conf:60: `}` closes no block",
        ),
        (
            format!("{{\n{SEED_NODE1}"),
            "keepalived.conf:1: `{` with no keyword",
        ),
        (
            SEED_NODE1.replace("priority 101", "priority high"),
            "keepalived.conf:20: priority: \"high\" is not",
        ),
        (
            SEED_NODE1.replace("priority 101", "priority 300"),
            "keepalived.conf:20: priority",
        ),
        (
            SEED_NODE1.replace("virtual_router_id 101", "virtual_router_id 0"),
            "keepalived.conf:19:",
        ),
        (
            SEED_NODE1.replace("advert_int 1", "advert_int soon"),
            "keepalived.conf:21:",
        ),
        (
            SEED_NODE1.replace("vrrp_instance", "vrrp_instanse"),
            "keepalived.conf:16: unknown keyword `vrrp_instanse`",
        ),
        (
            SEED_NODE1.replace("    192.168.174.99\n", "    192.168.174.999\n"),
            "keepalived.conf:27:",
        ),
        (
            SEED_NODE1.replace("interface ens33", "interface \"ens33"),
            "keepalived.conf:18: a quoted string",
        ),
        (
            SEED_NODE1.replace("auth_type PASS", "auth_type AH"),
            "keepalived.conf:23: auth_type AH",
        ),
        (
            SEED_NODE1.replace("  interface ens33\n", ""),
            "keepalived.conf:16: vrrp_instance VI_1 has no interface",
        ),
        ("global_defs {\n}\n".to_string(), "no vrrp_instance"),
        (
            SEED_NODE1.replace("virtual_ipaddress {", "virtual_ipadress {"),
            "keepalived.conf:26: unknown block `virtual_ipadress {` in vrrp_instance",
        ),
        (
            SEED_NODE1.replace("  notification_email {", "  notification {"),
            "keepalived.conf:3: unknown block `notification {` in global_defs",
        ),
        (
            SEED_NODE1.replace("advert_int 1", "advert_int 300"),
            "keepalived.conf:21: advert_int 300: VRRPv2 allows at most 255 s",
        ),
    ];
    for (conf, expected) in cases {
        // auth_type AH is an error only where keepalived uses it.
        let conf = if expected.contains("AH") {
            conf.replace("  vrrp_strict\n", "  \n")
        } else {
            conf
        };
        let e = error(&conf, HAPROXY, &at(NODE1));
        assert!(e.contains(expected), "{e:?} does not contain {expected:?}");
    }
}

#[test]
fn bad_haproxy_input_names_the_line() {
    let cases: Vec<(String, &str)> = vec![
        (
            HAPROXY.replace("192.168.174.19:6380", "keydb2:6380"),
            "haproxy.cfg:36: server keydb2 keydb2:6380: not an IPv4",
        ),
        (
            HAPROXY.replace("inter 2s fall 3", "inter soon fall 3"),
            "haproxy.cfg:35: \"soon\" is not an HAProxy time",
        ),
        (
            HAPROXY.replace("rise 2\n", "rise x\n"),
            "haproxy.cfg:35: rise",
        ),
        (
            HAPROXY.replace("default_backend keydb_servers", "default_backend nothing"),
            "haproxy.cfg:25: default_backend nothing",
        ),
        (
            HAPROXY.replace("bind 192.168.174.99:6380", "bind 192.168.174.99:6380-6390"),
            "haproxy.cfg:24:",
        ),
        (
            format!("maxconn 10\n{HAPROXY}"),
            "haproxy.cfg:1: `maxconn` before any section",
        ),
        (
            HAPROXY.replace("bind 192.168.174.99:6380", "bind 192.168.174.98:6380"),
            "no frontend or listen section binds",
        ),
        (
            HAPROXY.replace(":6380 check inter 2s fall 3 rise 2", ":6380 check disabled"),
            "haproxy.cfg:35: disabled",
        ),
    ];
    for (cfg, expected) in cases {
        let e = error(SEED_NODE1, &cfg, &at(NODE1));
        assert!(e.contains(expected), "{e:?} does not contain {expected:?}");
    }
}

#[test]
fn tokenizer_reads_comments_quotes_and_braces() {
    let text = "a b # c\n! whole line\nd \"e f\" {g\n h } i\n{\n}\n";
    let statements = keepalived::statements(Input { name: "k", text }).unwrap();
    let words: Vec<&Vec<String>> = statements.iter().map(|s| &s.words).collect();
    assert_eq!(
        words,
        [
            &vec!["a".to_string(), "b".into()],
            &vec!["d".to_string(), "e f".into()],
            &vec!["i".to_string()]
        ]
    );
    let block = statements[1].block.as_ref().unwrap();
    assert_eq!(block.len(), 2);
    assert_eq!(block[1].words, ["h"]);
    assert_eq!(block[1].origin.line, 4);
    // `{` on the line after its keyword opens that keyword's block.
    assert!(statements[2].block.as_ref().unwrap().is_empty());
}

/// Every cut of the files gives a configuration or an error, never a panic,
/// and every configuration given loads.
#[test]
fn truncated_files_never_panic() {
    for (i, _) in SEED_NODE1.char_indices() {
        if let Ok(imported) = run(&SEED_NODE1[..i], HAPROXY, &at(NODE1)) {
            config::parse(&imported.config, "cut").unwrap();
        }
    }
    for (i, _) in HAPROXY.char_indices() {
        if let Ok(imported) = run(SEED_NODE1, &HAPROXY[..i], &at(NODE1)) {
            config::parse(&imported.config, "cut").unwrap();
        }
    }
}

#[test]
fn two_frontends_share_one_idle_timeout_and_one_health() {
    let cfg = format!(
        "{HAPROXY}
frontend keydb_other
    bind 192.168.174.99:6381
    timeout client 10s
    default_backend keydb_other_servers

backend keydb_other_servers
    timeout server 10s
    server k1 192.168.174.11:6381 check inter 500ms
"
    );
    let (c, imported) = import(SEED_NODE1, &cfg, &at(NODE1));
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.services[1].port, 6381);
    assert_eq!(c.services[1].backends, vec![SocketAddrV4::new(NODE1, 6381)]);
    assert_eq!(c.dataplane.idle_timeout.as_secs(), 60);
    assert_eq!(c.health.interval_ms, 2000);
    warned(&imported, "haproxy.cfg", 40, "the longest (60 s)");
    warned(
        &imported,
        "haproxy.cfg",
        45,
        "differ from the first checked server's",
    );
}

/// Every file with one line left out gives a configuration that loads or
/// an error, never a panic.
#[test]
fn files_with_a_line_missing_never_panic() {
    let without = |text: &str, skip: usize| -> String {
        text.lines()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    };
    for (keepalived, haproxy) in [(SEED_NODE1, HAPROXY), (UNICAST, HAPROXY)] {
        for skip in 0..keepalived.lines().count() {
            let cut = without(keepalived, skip);
            if let Ok(imported) = run(&cut, haproxy, &at(NODE2)) {
                config::parse(&imported.config, "cut").unwrap();
            }
        }
        for skip in 0..haproxy.lines().count() {
            let cut = without(haproxy, skip);
            if let Ok(imported) = run(keepalived, &cut, &at(NODE2)) {
                config::parse(&imported.config, "cut").unwrap();
            }
        }
    }
}

#[test]
fn a_byte_order_mark_and_crlf_line_ends_are_read() {
    let dos = |text: &str| format!("\u{feff}{}", text.replace('\n', "\r\n"));
    let (c, imported) = import(&dos(SEED_NODE1), &dos(HAPROXY), &at(NODE1));
    assert_eq!(c.vrrp.unwrap().priority, 101);
    assert_eq!(c.services[0].backends.len(), 2);
    warned(&imported, "keepalived.conf", 22, "Strict mode");
}
