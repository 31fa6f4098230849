//! The kernel settings the data plane needs, changed for the agent's
//! lifetime and restored afterwards:
//!
//! - `net.ipv4.ip_local_reserved_ports` gets the SNAT range, so the node's
//!   own sockets never pick a port the XDP program uses for NAT;
//! - `net.ipv4.conf.<iface>.forwarding = 1`, without which
//!   `bpf_fib_lookup` answers "forwarding disabled".
//!
//! Both live under `/proc/sys/net`, which shows the settings of the calling
//! process's network namespace.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::{config::SnatPortRange, error_chain};

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {value:?}, which is not a port list")]
    BadPortList { path: PathBuf, value: String },
}

/// Settings changed by the agent. Dropping it writes the old values back,
/// in reverse order of change.
#[derive(Debug, Default)]
pub struct SysctlGuard {
    /// (file, value before the agent changed it)
    changed: Vec<(PathBuf, String)>,
}

impl SysctlGuard {
    /// Adds `range` to `ip_local_reserved_ports` (merged with what is
    /// already reserved) and turns on forwarding on `interface`.
    pub fn apply(range: SnatPortRange, interface: &str) -> Result<SysctlGuard, SysctlError> {
        let mut guard = SysctlGuard::default();

        let path = Path::new(RESERVED_PORTS);
        let old = read(path)?;
        let merged = merge_reserved_ports(&old, range).ok_or_else(|| SysctlError::BadPortList {
            path: path.to_path_buf(),
            value: old.clone(),
        })?;
        guard.set(path, &old, &merged)?;
        info!(reserved = %merged, snat_ports = %range, "reserved the SNAT ports");

        let path = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/forwarding"));
        let old = read(&path)?;
        guard.set(&path, &old, "1")?;
        info!(interface, old = %old, "enabled IPv4 forwarding on the interface");

        Ok(guard)
    }

    fn set(&mut self, path: &Path, old: &str, new: &str) -> Result<(), SysctlError> {
        if old == new {
            return Ok(());
        }
        write(path, new)?;
        self.changed.push((path.to_path_buf(), old.to_string()));
        Ok(())
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        while let Some((path, old)) = self.changed.pop() {
            match write(&path, &old) {
                Ok(()) => info!(path = %path.display(), value = %old, "restored sysctl"),
                Err(error) => warn!(error = %error_chain(&error), "could not restore sysctl"),
            }
        }
    }
}

fn read(path: &Path) -> Result<String, SysctlError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysctlError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn write(path: &Path, value: &str) -> Result<(), SysctlError> {
    // An empty port list must be written as a newline, not zero bytes.
    fs::write(path, format!("{value}\n")).map_err(|source| SysctlError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Parses a port list as the kernel prints it (`"1000-2000,3000"`, empty
/// for none) into sorted, non-overlapping inclusive ranges. `None` if the
/// text is not such a list.
pub fn parse_port_list(text: &str) -> Option<Vec<(u16, u16)>> {
    let text = text.trim();
    let mut ranges = Vec::new();
    if text.is_empty() {
        return Some(ranges);
    }
    for item in text.split(',') {
        let item = item.trim();
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (lo.trim().parse().ok()?, hi.trim().parse().ok()?),
            None => {
                let p = item.parse().ok()?;
                (p, p)
            }
        };
        if lo > hi {
            return None;
        }
        ranges.push((lo, hi));
    }
    Some(normalise(ranges))
}

/// Sorts ranges and merges overlapping or adjacent ones.
fn normalise(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Formats ranges the way the kernel does (`"1000-2000,3000"`).
pub fn format_port_list(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The reserved-ports list `existing` with `range` added. `None` if
/// `existing` cannot be parsed.
pub fn merge_reserved_ports(existing: &str, range: SnatPortRange) -> Option<String> {
    let mut ranges = parse_port_list(existing)?;
    ranges.push((range.min, range.max));
    Some(format_port_list(&normalise(ranges)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(min: u16, max: u16) -> SnatPortRange {
        SnatPortRange { min, max }
    }

    #[test]
    fn merge_into_empty_list() {
        assert_eq!(
            merge_reserved_ports("", range(61000, 65535)).unwrap(),
            "61000-65535"
        );
        assert_eq!(
            merge_reserved_ports("\n", range(2000, 2000)).unwrap(),
            "2000"
        );
    }

    #[test]
    fn merge_keeps_other_ranges_sorted() {
        assert_eq!(
            merge_reserved_ports("8080,9000-9100", range(61000, 65535)).unwrap(),
            "8080,9000-9100,61000-65535"
        );
        assert_eq!(
            merge_reserved_ports("62000-63000", range(3000, 3999)).unwrap(),
            "3000-3999,62000-63000"
        );
    }

    #[test]
    fn merge_joins_overlapping_and_adjacent_ranges() {
        assert_eq!(
            merge_reserved_ports("60000-61500", range(61000, 65535)).unwrap(),
            "60000-65535"
        );
        assert_eq!(
            merge_reserved_ports("60999", range(61000, 65535)).unwrap(),
            "60999-65535"
        );
        assert_eq!(
            merge_reserved_ports("62000,63000-63010", range(61000, 65535)).unwrap(),
            "61000-65535"
        );
    }

    #[test]
    fn merge_is_idempotent() {
        let once = merge_reserved_ports("8080", range(61000, 65535)).unwrap();
        let twice = merge_reserved_ports(&once, range(61000, 65535)).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn garbage_is_refused() {
        for bad in ["abc", "5-", "70000", "10-5", "1,,2"] {
            assert_eq!(
                merge_reserved_ports(bad, range(61000, 65535)),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn port_list_round_trips() {
        let ranges = parse_port_list("1, 3-5,65535").unwrap();
        assert_eq!(ranges, vec![(1, 1), (3, 5), (65535, 65535)]);
        assert_eq!(format_port_list(&ranges), "1,3-5,65535");
    }
}
