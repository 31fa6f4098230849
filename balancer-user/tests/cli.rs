//! The operator commands that need no running agent: `balancer check`,
//! `balancer import`, and `balancer status` / `balancer stats` finding
//! their paths in the configuration file. Runs the real binary; touches nothing on the node.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("balancer-cli-{tag}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn balancer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_balancer"))
        .args(args)
        .output()
        .expect("run balancer")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn config(socket: &Path, priority: u32) -> String {
    format!(
        r#"
[node]
interface = "eth0"
address = "198.18.0.1"

[vrrp]
vrid = 101
priority = {priority}
version = 2
advert_interval_ms = 1000
auth_pass = "s3cret"

[[service]]
vip = "198.18.0.100"
port = 6380
backends = ["198.18.0.1:6380", "198.18.0.2:6380"]

[admin]
socket = "{}"
metrics_listen = "off"
"#,
        socket.display()
    )
}

#[test]
fn check_accepts_a_valid_file_and_summarises_it() {
    let dir = Scratch::new("ok");
    let socket = dir.0.join("agent.sock");
    let file = dir.write("balancer.toml", &config(&socket, 150));
    let out = balancer(&["check", "--config", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains(": valid"), "{stdout}");
    for line in [
        "node: 198.18.0.1 on eth0",
        "election: VRRPv2 vrid 101, priority 150 (minus 50 while no backend of this node is READY), adverts every 1000 ms, preempt, auth_type PASS, multicast 224.0.0.18",
        "service 198.18.0.100:6380 -> 198.18.0.1:6380 (local), 198.18.0.2:6380",
        &format!("admin: socket {}, metrics off", socket.display()),
    ] {
        assert!(stdout.lines().any(|l| l == line), "no line {line:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains("s3cret"),
        "the password was printed:\n{stdout}"
    );
}

#[test]
fn check_rejects_a_bad_file_naming_the_field() {
    let dir = Scratch::new("bad");
    let file = dir.write("balancer.toml", &config(&dir.0.join("s"), 300));
    let out = balancer(&["check", "--config", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("vrrp.priority"), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn status_takes_the_socket_from_the_config() {
    let dir = Scratch::new("status");
    let socket = dir.0.join("agent.sock");
    let file = dir.write("balancer.toml", &config(&socket, 150));
    // No agent runs there: the error names the configured socket.
    let out = balancer(&["status", "--config", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains(&socket.display().to_string()), "{stderr}");
    // --socket and --config together are refused.
    let out = balancer(&[
        "status",
        "--config",
        file.to_str().unwrap(),
        "--socket",
        "/run/other.sock",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn stats_takes_the_pin_dir_from_the_config() {
    let dir = Scratch::new("stats");
    let pins = dir.0.join("pins");
    let text_config = config(&dir.0.join("s"), 150).replace(
        "[admin]",
        &format!("[dataplane]\npin_dir = \"{}\"\n\n[admin]", pins.display()),
    );
    let file = dir.write("balancer.toml", &text_config);
    let out = balancer(&["stats", "--config", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains(&pins.display().to_string()), "{stderr}");
}

fn fixture(name: &str) -> String {
    format!("{}/tests/import/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn import_writes_a_file_that_check_accepts() {
    let dir = Scratch::new("import");
    let out_file = dir.0.join("balancer.toml");
    let out_path = out_file.to_str().unwrap();
    let keepalived = fixture("seed-keepalived.conf");
    let haproxy = fixture("keydb-haproxy.cfg");
    let args = [
        "import",
        "--keepalived",
        &keepalived,
        "--haproxy",
        &haproxy,
        "--address",
        "192.168.174.11",
        "-o",
        out_path,
    ];
    let out = balancer(&args);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    // Warnings name the file and line, on stderr and in the file.
    let strict_auth =
        format!("balancer import: warning: {keepalived}:22: authentication: not converted");
    assert!(stderr.contains(&strict_auth), "{stderr}");
    let written = fs::read_to_string(&out_file).unwrap();
    assert!(
        written.contains(&format!("# WARNING {keepalived}:22: authentication")),
        "{written}"
    );
    assert!(
        written.contains(&format!(
            "# from {keepalived}:20 priority 101\npriority = 101\n"
        )),
        "{written}"
    );

    let out = balancer(&["check", "--config", out_path]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for line in [
        "node: 192.168.174.11 on ens33",
        "election: VRRPv2 vrid 101, priority 101 (minus 50 while no backend of this node is READY), adverts every 1000 ms, preempt, multicast 224.0.0.18",
        "service 192.168.174.99:6380 -> 192.168.174.11:6380 (local), 192.168.174.19:6380",
    ] {
        assert!(stdout.lines().any(|l| l == line), "no line {line:?} in:\n{stdout}");
    }

    // An existing output file is kept unless --force.
    fs::write(&out_file, "kept").unwrap();
    let out = balancer(&args);
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("--force"), "{out:?}");
    assert_eq!(fs::read_to_string(&out_file).unwrap(), "kept");
    let forced: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    let out = balancer(&forced);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read_to_string(&out_file).unwrap(), written);
}

#[test]
fn import_without_haproxy_cfg_or_with_bad_input_writes_nothing() {
    let dir = Scratch::new("import-bad");
    let out_file = dir.0.join("balancer.toml");
    let keepalived = fixture("seed-keepalived.conf");
    let unbalanced = dir.write(
        "keepalived.conf",
        &fs::read_to_string(&keepalived)
            .unwrap()
            .replacen("  }\n}\n", "  }\n", 1),
    );
    let haproxy = fixture("keydb-haproxy.cfg");
    let cases: [(Vec<&str>, String); 3] = [
        (vec!["--keepalived", &keepalived], "--haproxy".to_string()),
        (
            vec![
                "--keepalived",
                &keepalived,
                "--haproxy",
                "/nonexistent/haproxy.cfg",
            ],
            "/nonexistent/haproxy.cfg: cannot read".to_string(),
        ),
        (
            vec![
                "--keepalived",
                unbalanced.to_str().unwrap(),
                "--haproxy",
                &haproxy,
            ],
            format!(
                "{}:16: the block of `vrrp_instance VI_1` is never closed",
                unbalanced.display()
            ),
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec![
            "import",
            "--address",
            "192.168.174.11",
            "-o",
            out_file.to_str().unwrap(),
        ];
        all.extend(args);
        let out = balancer(&all);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(stderr.contains(&expected), "{expected:?} not in {stderr}");
        assert!(!out_file.exists(), "{all:?} wrote a file");
    }
}
