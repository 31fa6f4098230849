//! CPU accounting for the benchmark: a process's CPU time
//! (`/proc/<pid>/stat`), the whole machine's (`/proc/stat`), and the
//! kernel's run-time statistics of a BPF program (`BPF_ENABLE_STATS`, the
//! same switch as `kernel.bpf_stats_enabled`).

use std::{fs, os::fd::OwnedFd, time::Duration};

use anyhow::{bail, Context, Result};
use aya::programs::loaded_programs;

/// Clock ticks per second of `/proc` CPU times.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn ticks(t: u64) -> Duration {
    Duration::from_nanos(t * 1_000_000_000 / ticks_per_second())
}

/// User + system CPU time of a process (all its threads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessCpu {
    pub user: Duration,
    pub system: Duration,
}

impl ProcessCpu {
    pub fn of(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/stat");
        let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        Self::parse(&text).with_context(|| format!("parse {path}"))
    }

    /// Fields 14 and 15 (utime, stime) of a `/proc/<pid>/stat` line; the
    /// command name (field 2) may contain spaces and parentheses.
    pub fn parse(stat: &str) -> Result<Self> {
        let after = stat.rfind(')').context("no ')' after the command name")?;
        let rest: Vec<&str> = stat[after + 1..].split_whitespace().collect();
        // rest[0] is field 3 (state): utime is field 14 -> rest[11].
        if rest.len() < 13 {
            bail!("only {} fields after the command name", rest.len());
        }
        let utime: u64 = rest[11].parse().context("utime")?;
        let stime: u64 = rest[12].parse().context("stime")?;
        Ok(ProcessCpu {
            user: ticks(utime),
            system: ticks(stime),
        })
    }

    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

/// Busy (non-idle, non-iowait) CPU time of the whole machine, all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCpu {
    pub busy: Duration,
    pub softirq: Duration,
}

impl MachineCpu {
    pub fn now() -> Result<Self> {
        let text = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        Self::parse(&text)
    }

    /// The aggregate `cpu` line: user nice system idle iowait irq softirq
    /// steal (guest time is already inside user).
    pub fn parse(text: &str) -> Result<Self> {
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no aggregate cpu line")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<u64>())
            .collect::<Result<_, _>>()
            .context("cpu line")?;
        if v.len() < 8 {
            bail!("cpu line has {} fields", v.len());
        }
        let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        Ok(MachineCpu {
            busy: ticks(busy),
            softirq: ticks(v[6]),
        })
    }

    pub fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: self.busy.saturating_sub(earlier.busy),
            softirq: self.softirq.saturating_sub(earlier.softirq),
        }
    }
}

/// BPF run-time statistics switched on while this lives (the kernel
/// counts per program `run_time_ns` and `run_cnt`). Held as the
/// `BPF_ENABLE_STATS` file descriptor, so the previous state of
/// `kernel.bpf_stats_enabled` comes back when it drops, even if this
/// process dies.
pub struct BpfStats {
    _fd: OwnedFd,
}

/// `/proc/sys/kernel/bpf_stats_enabled` as the kernel shows it.
pub fn bpf_stats_sysctl() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .ok()
        .map(|s| s.trim().to_string())
}

impl BpfStats {
    pub fn enable() -> Result<Self> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)")?;
        Ok(BpfStats { _fd: fd })
    }
}

/// Run time and run count of one loaded BPF program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRunTime {
    pub run_time: Duration,
    pub run_count: u64,
}

impl ProgramRunTime {
    pub fn of(id: u32) -> Result<Self> {
        for info in loaded_programs() {
            let info = info.context("list loaded BPF programs")?;
            if info.id() == id {
                return Ok(ProgramRunTime {
                    run_time: info.run_time(),
                    run_count: info.run_count(),
                });
            }
        }
        bail!("no loaded BPF program with id {id}")
    }

    pub fn since(&self, earlier: &ProgramRunTime) -> ProgramRunTime {
        ProgramRunTime {
            run_time: self.run_time.saturating_sub(earlier.run_time),
            run_count: self.run_count.saturating_sub(earlier.run_count),
        }
    }
}

/// The id of the XDP program attached to `iface`, from `ip -j -d link
/// show` output.
pub fn xdp_prog_id(ip_json: &str) -> Result<u32> {
    let v: serde_json::Value = serde_json::from_str(ip_json).context("parse `ip -j link show`")?;
    let link = v
        .as_array()
        .and_then(|a| a.first())
        .context("`ip -j link show` listed no link")?;
    let xdp = link.get("xdp").context("no XDP program on the link")?;
    let id = xdp
        .pointer("/prog/id")
        .or_else(|| xdp.pointer("/attached/0/prog/id"))
        .and_then(|i| i.as_u64())
        .with_context(|| format!("no program id in {xdp}"))?;
    Ok(id as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_from_stat_with_odd_command_name() {
        let stat =
            "4242 (ha proxy) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 2 0 123 0 0";
        let cpu = ProcessCpu::parse(stat).unwrap();
        let hz = ticks_per_second();
        assert_eq!(cpu.user, Duration::from_nanos(250 * 1_000_000_000 / hz));
        assert_eq!(cpu.system, Duration::from_nanos(75 * 1_000_000_000 / hz));
        assert!(ProcessCpu::parse("12 (x) S 1 2").is_err());
    }

    #[test]
    fn machine_cpu_counts_busy_not_idle() {
        let text = "cpu  100 0 50 1000 10 5 20 3 0 0\ncpu0 50 0 25 500 5 2 10 1 0 0\n";
        let m = MachineCpu::parse(text).unwrap();
        assert_eq!(m.busy, ticks(100 + 50 + 5 + 20 + 3));
        assert_eq!(m.softirq, ticks(20));
    }

    #[test]
    fn xdp_prog_id_from_ip_json() {
        let j = r#"[{"ifindex":2,"ifname":"eth0","xdp":{"mode":1,"prog":{"id":77,"name":"balancer"}}}]"#;
        assert_eq!(xdp_prog_id(j).unwrap(), 77);
        let multi =
            r#"[{"ifname":"eth0","xdp":{"mode":4,"attached":[{"mode":1,"prog":{"id":9}}]}}]"#;
        assert_eq!(xdp_prog_id(multi).unwrap(), 9);
        assert!(xdp_prog_id(r#"[{"ifname":"eth0"}]"#).is_err());
    }
}
