//! HAProxy as the seed setup runs it (../shared/seed/): a TCP proxy on the
//! VIP, round-robin over every KeyDB, each checked with PING. Config text,
//! and the process in a lab node's namespace.
//!
//! The seed stops before its HAProxy section, so the config follows the
//! usual KeyDB/Redis HAProxy recipe it points to: `mode tcp`, `balance
//! roundrobin`, `option tcp-check` sending PING and expecting +PONG (then
//! QUIT/+OK), HAProxy's default check timing (`inter 2s fall 3 rise 2`),
//! and HAProxy's default threading (one thread per CPU).

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    lab::{run_with_timeout, Node},
    netns::ChildGuard,
};

use super::cpu::ProcessCpu;

/// What the HAProxy config says.
#[derive(Clone, Debug)]
pub struct HaproxyConfig {
    pub bind: SocketAddrV4,
    pub backends: Vec<SocketAddrV4>,
}

impl HaproxyConfig {
    pub fn to_config(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# HAProxy in front of the KeyDBs, as in the seed setup");
        let _ = writeln!(s, "global");
        let _ = writeln!(s, "    maxconn 4096");
        let _ = writeln!(s, "\ndefaults");
        let _ = writeln!(s, "    mode tcp");
        let _ = writeln!(s, "    timeout connect 3s");
        let _ = writeln!(s, "    timeout client 30s");
        let _ = writeln!(s, "    timeout server 30s");
        let _ = writeln!(s, "\nfrontend keydb");
        let _ = writeln!(s, "    bind {}", self.bind);
        let _ = writeln!(s, "    default_backend keydb_servers");
        let _ = writeln!(s, "\nbackend keydb_servers");
        let _ = writeln!(s, "    balance roundrobin");
        let _ = writeln!(s, "    option tcp-check");
        let _ = writeln!(s, "    tcp-check connect");
        let _ = writeln!(s, "    tcp-check send PING\\r\\n");
        let _ = writeln!(s, "    tcp-check expect string +PONG");
        let _ = writeln!(s, "    tcp-check send QUIT\\r\\n");
        let _ = writeln!(s, "    tcp-check expect string +OK");
        for (i, b) in self.backends.iter().enumerate() {
            let _ = writeln!(
                s,
                "    server keydb{} {b} check inter 2s fall 3 rise 2",
                i + 1
            );
        }
        s
    }
}

/// A running HAProxy (`haproxy -db`, one process) in a node's namespace;
/// killed when dropped.
pub struct Haproxy {
    child: ChildGuard,
    log: PathBuf,
}

const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Haproxy {
    /// Writes the config under `dir`, checks it (`haproxy -c`) and starts
    /// HAProxy in `node`'s namespace. Readiness is the caller's to check
    /// (traffic through the bind address).
    /// `cpus`: run it under `taskset -c CPUS` (its default thread count
    /// follows the CPUs it may use).
    pub fn start(
        node: &Node,
        config: &HaproxyConfig,
        dir: &Path,
        cpus: Option<&str>,
    ) -> Result<Self> {
        let cfg = dir.join("haproxy.cfg");
        fs::write(&cfg, config.to_config()).with_context(|| format!("write {}", cfg.display()))?;
        let cfg_arg = cfg.display().to_string();
        let mut check = node.ns().command("haproxy");
        check.args(["-c", "-q", "-f", &cfg_arg]);
        run_with_timeout(&mut check, Duration::from_secs(10)).context("haproxy -c")?;
        let log = dir.join("haproxy.log");
        let out = fs::File::create(&log)?;
        // -db: foreground, no daemon; `ip netns exec` (and taskset) exec
        // it, so the child's pid is HAProxy's.
        let mut cmd = match cpus {
            Some(cpus) => {
                let mut c = node.ns().command("taskset");
                c.args(["-c", cpus, "haproxy"]);
                c
            }
            None => node.ns().command("haproxy"),
        };
        cmd.args(["-db", "-f", &cfg_arg])
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().context("start haproxy")?;
        Ok(Haproxy {
            child: ChildGuard::new(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log if HAProxy has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("haproxy exited ({status}):\n{}", self.log_text());
        }
        Ok(())
    }

    pub fn cpu(&self) -> Result<ProcessCpu> {
        ProcessCpu::of(self.pid())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (HAProxy's hard stop) and wait.
    pub fn stop(mut self) -> Result<()> {
        let started = Instant::now();
        self.child
            .stop_within(libc::SIGTERM, STOP_TIMEOUT)
            .with_context(|| format!("stop haproxy ({:?})", started.elapsed()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_tcp_roundrobin_with_ping_checks() {
        let c = HaproxyConfig {
            bind: "198.18.0.100:6380".parse().unwrap(),
            backends: vec![
                "198.18.0.1:6380".parse().unwrap(),
                "198.18.0.2:6380".parse().unwrap(),
            ],
        };
        let text = c.to_config();
        for needle in [
            "mode tcp",
            "bind 198.18.0.100:6380",
            "balance roundrobin",
            "option tcp-check",
            "tcp-check send PING\\r\\n",
            "tcp-check expect string +PONG",
            "server keydb1 198.18.0.1:6380 check inter 2s fall 3 rise 2",
            "server keydb2 198.18.0.2:6380 check",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }
}
