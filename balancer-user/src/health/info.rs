//! Reading the `INFO persistence` and `INFO replication` texts of KeyDB and
//! Redis: the few fields that decide whether a backend may take clients.
//!
//! The text is `field:value` lines separated by CRLF, with `# Section`
//! headers and blank lines. Three shapes of the replication section exist:
//!
//! - Redis, and KeyDB with one master: `master_link_status:up`,
//!   `master_sync_in_progress:0`, `master_link_down_since_seconds:12`.
//! - KeyDB 6.3+ with several masters (multi-master): the first master's
//!   fields as above, the next ones prefixed `master_1_`, `master_2_`, ...
//!   plus a summary `master_global_link_status`, which we do not use.
//! - KeyDB 6.0 with several masters: a `Master 0: ` line before each
//!   master's block and the unprefixed field names repeated per block.
//!
//! Each `…link_status` line therefore starts one upstream link, and the
//! `…sync_in_progress` and `…link_down_since_seconds` lines that follow it
//! describe that link. Pure functions, no I/O: the checker feeds them the
//! bulk strings it read.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

/// Most upstream links accepted in one `INFO replication`.
pub const MAX_LINKS: usize = 64;

/// What a backend says about itself in `INFO replication`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `role:master`: replicates from no one.
    Master,
    /// `role:slave` (Redis and KeyDB; `role:replica` is accepted too):
    /// a read-only replica.
    Replica,
    /// `role:active-replica`: a KeyDB replica that also accepts writes
    /// (active-active replication, `active-replica yes`).
    ActiveReplica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Replica => "replica",
            Role::ActiveReplica => "active-replica",
        })
    }
}

/// The fields of `INFO persistence` the health check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persistence {
    /// `loading:1`: the dataset is still being loaded from disk.
    pub loading: bool,
}

/// One replication link from the backend to one of its masters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// `master_link_status:up`.
    pub up: bool,
    /// `master_sync_in_progress:1`: a full synchronisation is under way.
    pub syncing: bool,
    /// `master_link_down_since_seconds`, when reported and a number.
    pub down_since_secs: Option<i64>,
    /// `master_host` and `master_port`, when the host is an IPv4 address:
    /// which peer this link replicates from.
    pub master: Option<SocketAddrV4>,
    /// `master_last_io_seconds_ago`, when reported and a number (-1 while
    /// the link is down).
    pub last_io_secs: Option<i64>,
    /// `slave_repl_offset`: how far into the master's replication stream
    /// this backend has applied, when reported and a number.
    pub applied_offset: Option<i64>,
}

impl Link {
    /// A link with only its status known.
    pub fn new(up: bool) -> Link {
        Link {
            up,
            syncing: false,
            down_since_secs: None,
            master: None,
            last_io_secs: None,
            applied_offset: None,
        }
    }
}

/// The fields of `INFO replication` the health check reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// `role:`.
    pub role: Role,
    /// The links to its masters, in the order reported (empty for a master).
    pub links: Vec<Link>,
    /// `master_replid`: the id of the replication stream this backend
    /// sends to its own replicas (a new one after a restart).
    pub replid: Option<String>,
    /// `master_repl_offset`: how long that stream is, when a number.
    pub stream_offset: Option<i64>,
}

/// How current a backend's dataset is, judged from its replication links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// A master, or a replica with at least one link up and none syncing.
    InSync,
    /// A replica none of whose links is up (and none syncing): it serves
    /// data that may be stale.
    Down,
    /// A replica with a full synchronisation under way on some link: it is
    /// about to replace (or merge) its dataset.
    Syncing,
}

impl Replication {
    /// The state of the links.
    ///
    /// With several masters (KeyDB multi-master) one link up is enough:
    /// when one node of three dies, the two others keep a link to each
    /// other and each still gets every write through it, so they stay
    /// READY instead of both being demoted. Any link mid-sync makes the
    /// whole backend [`LinkState::Syncing`].
    pub fn link_state(&self) -> LinkState {
        if self.role == Role::Master {
            LinkState::InSync
        } else if self.links.iter().any(|l| l.syncing) {
            LinkState::Syncing
        } else if self.links.iter().any(|l| l.up) {
            LinkState::InSync
        } else {
            LinkState::Down
        }
    }
}

/// Why an `INFO` text could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    /// A field the check needs is absent.
    #[error("field {0} missing")]
    Missing(&'static str),
    /// A field the check needs has a value it does not understand.
    #[error("field {field} has unexpected value {value:?}")]
    BadValue {
        /// The field name.
        field: String,
        /// Its value, made printable and cut short.
        value: String,
    },
    /// A field that must appear once appears again.
    #[error("field {0} appears more than once")]
    Duplicate(&'static str),
    /// A per-link field before any `master_link_status`.
    #[error("field {0} before any master_link_status")]
    Orphan(String),
    /// More upstream links than [`MAX_LINKS`].
    #[error("more than {MAX_LINKS} master links")]
    TooManyLinks,
}

/// Parses the text of `INFO persistence`.
pub fn parse_persistence(text: &[u8]) -> Result<Persistence, InfoError> {
    let mut loading = None;
    for (field, value) in fields(text) {
        if field == b"loading" {
            if loading.is_some() {
                return Err(InfoError::Duplicate("loading"));
            }
            loading = Some(flag(field, value)?);
        }
    }
    Ok(Persistence {
        loading: loading.ok_or(InfoError::Missing("loading"))?,
    })
}

/// Parses the text of `INFO replication`.
pub fn parse_replication(text: &[u8]) -> Result<Replication, InfoError> {
    let mut role = None;
    let mut links: Vec<Link> = Vec::new();
    let mut replid = None;
    let mut stream_offset = None;
    // master_host and master_port come before the master_link_status that
    // opens their link.
    let mut host: Option<Ipv4Addr> = None;
    let mut port: Option<u16> = None;
    for (field, value) in fields(text) {
        match field {
            b"master_replid" => {
                if replid.is_some() {
                    return Err(InfoError::Duplicate("master_replid"));
                }
                replid = Some(resp_text(value));
                continue;
            }
            b"master_repl_offset" => {
                if stream_offset.is_some() {
                    return Err(InfoError::Duplicate("master_repl_offset"));
                }
                stream_offset = Some(number(value));
                continue;
            }
            b"slave_repl_offset" => {
                // Reported once per link, after that link's fields.
                if let Some(link) = links.last_mut() {
                    link.applied_offset = number(value);
                }
                continue;
            }
            _ => {}
        }
        if field == b"role" {
            if role.is_some() {
                return Err(InfoError::Duplicate("role"));
            }
            role = Some(match value {
                b"master" => Role::Master,
                b"slave" | b"replica" => Role::Replica,
                b"active-replica" => Role::ActiveReplica,
                _ => return Err(bad_value(field, value)),
            });
            continue;
        }
        let Some(suffix) = link_field(field) else {
            continue;
        };
        match suffix {
            b"link_status" => {
                if links.len() == MAX_LINKS {
                    return Err(InfoError::TooManyLinks);
                }
                let up = match value {
                    b"up" => true,
                    b"down" => false,
                    _ => return Err(bad_value(field, value)),
                };
                let mut link = Link::new(up);
                link.master = host
                    .take()
                    .zip(port.take())
                    .map(|(h, p)| SocketAddrV4::new(h, p));
                links.push(link);
            }
            b"host" => {
                host = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
            b"port" => {
                port = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
            b"last_io_seconds_ago" => {
                links.last_mut().ok_or_else(|| orphan(field))?.last_io_secs = number(value);
            }
            b"sync_in_progress" => {
                let syncing = flag(field, value)?;
                links.last_mut().ok_or_else(|| orphan(field))?.syncing = syncing;
            }
            b"link_down_since_seconds" => {
                let secs = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                links
                    .last_mut()
                    .ok_or_else(|| orphan(field))?
                    .down_since_secs = secs;
            }
            _ => {}
        }
    }
    let role = role.ok_or(InfoError::Missing("role"))?;
    if role == Role::Master {
        links.clear();
    } else if links.is_empty() {
        return Err(InfoError::Missing("master_link_status"));
    }
    Ok(Replication {
        role,
        links,
        replid: replid.flatten(),
        stream_offset: stream_offset.flatten(),
    })
}

/// A replication id: 40 hex digits; anything else is not one.
fn resp_text(value: &[u8]) -> Option<String> {
    (value.len() == 40 && value.iter().all(u8::is_ascii_hexdigit))
        .then(|| String::from_utf8_lossy(value).into_owned())
}

/// A decimal integer, or `None`.
fn number(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok().and_then(|v| v.parse().ok())
}

/// The `field:value` pairs of an INFO text; headers, blank lines and lines
/// without a colon are skipped. Values are trimmed of surrounding spaces.
fn fields(text: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    text.split(|&b| b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"#") {
            return None;
        }
        let colon = line.iter().position(|&b| b == b':')?;
        Some((&line[..colon], line[colon + 1..].trim_ascii()))
    })
}

/// For `master_<rest>` or `master_<digits>_<rest>`, the `<rest>`.
fn link_field(field: &[u8]) -> Option<&[u8]> {
    let rest = field.strip_prefix(b"master_")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Some(rest);
    }
    rest[digits..].strip_prefix(b"_")
}

fn flag(field: &[u8], value: &[u8]) -> Result<bool, InfoError> {
    match value {
        b"0" => Ok(false),
        b"1" => Ok(true),
        _ => Err(bad_value(field, value)),
    }
}

fn bad_value(field: &[u8], value: &[u8]) -> InfoError {
    InfoError::BadValue {
        field: super::resp::printable(&String::from_utf8_lossy(field), 64),
        value: super::resp::printable(&String::from_utf8_lossy(value), 64),
    }
}

fn orphan(field: &[u8]) -> InfoError {
    InfoError::Orphan(super::resp::printable(&String::from_utf8_lossy(field), 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `redis-server` 7.0 as a master.
    const REDIS_MASTER: &str = "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n\
        master_failover_state:no-failover\r\n\
        master_replid:8c5c0b9d2c1ac7f7b5a5cbd1e6e1c1b66e2c1a0b\r\n\
        master_replid2:0000000000000000000000000000000000000000\r\n\
        master_repl_offset:0\r\nsecond_repl_offset:-1\r\nrepl_backlog_active:0\r\n\
        repl_backlog_size:1048576\r\nrepl_backlog_first_byte_offset:0\r\nrepl_backlog_histlen:0\r\n";

    /// `redis-server` 7.0 after `REPLICAOF` towards a port nobody answers.
    const REDIS_REPLICA_DOWN: &str = "# Replication\r\nrole:slave\r\nmaster_host:127.0.0.1\r\n\
        master_port:1\r\nmaster_link_status:down\r\nmaster_last_io_seconds_ago:-1\r\n\
        master_sync_in_progress:0\r\nslave_read_repl_offset:1\r\nslave_repl_offset:1\r\n\
        master_link_down_since_seconds:-1\r\nslave_priority:100\r\nslave_read_only:1\r\n\
        replica_announced:1\r\nconnected_slaves:0\r\nmaster_failover_state:no-failover\r\n";

    /// KeyDB 6.3, active replica of two masters; the second is mid-sync.
    const KEYDB_MULTI_SYNCING: &str = "# Replication\r\nrole:active-replica\r\n\
        master_global_link_status:down\r\nconnected_masters:1\r\n\
        master_host:198.18.0.2\r\nmaster_port:6380\r\nmaster_link_status:up\r\n\
        master_last_io_seconds_ago:0\r\nmaster_sync_in_progress:0\r\n\
        slave_read_repl_offset:100\r\nslave_repl_offset:100\r\n\
        master_1_host:198.18.0.3\r\nmaster_1_port:6380\r\nmaster_1_link_status:down\r\n\
        master_1_last_io_seconds_ago:-1\r\nmaster_1_sync_in_progress:1\r\n\
        slave_read_repl_offset:1\r\nslave_repl_offset:1\r\n\
        master_1_sync_total_bytes:1000\r\nmaster_1_sync_read_bytes:10\r\n\
        master_1_sync_left_bytes:990\r\nmaster_1_sync_perc:1.00\r\n\
        master_1_sync_last_io_seconds_ago:0\r\nmaster_1_link_down_since_seconds:3\r\n\
        slave_priority:100\r\nslave_read_only:0\r\nreplica_announced:1\r\nconnected_slaves:0\r\n";

    /// KeyDB 6.0, active replica of two masters, both links down.
    const KEYDB_60_MULTI_DOWN: &str = "# Replication\r\nrole:active-replica\r\nMaster 0: \r\n\
        master_host:198.18.0.2\r\nmaster_port:6380\r\nmaster_link_status:down\r\n\
        master_last_io_seconds_ago:-1\r\nmaster_sync_in_progress:0\r\nslave_repl_offset:1\r\n\
        master_link_down_since_seconds:7\r\nMaster 1: \r\n\
        master_host:198.18.0.3\r\nmaster_port:6380\r\nmaster_link_status:down\r\n\
        master_last_io_seconds_ago:-1\r\nmaster_sync_in_progress:0\r\nslave_repl_offset:1\r\n\
        master_link_down_since_seconds:9\r\nslave_priority:100\r\nslave_read_only:0\r\n\
        connected_slaves:0\r\n";

    #[test]
    fn persistence_loading_flag() {
        let p = parse_persistence(b"# Persistence\r\nloading:0\r\nasync_loading:0\r\n").unwrap();
        assert!(!p.loading);
        let p =
            parse_persistence(b"# Persistence\r\nloading:1\r\nloading_start_time:1\r\n").unwrap();
        assert!(p.loading);
    }

    #[test]
    fn persistence_rejects_missing_or_odd_loading() {
        assert_eq!(
            parse_persistence(b"# Persistence\r\nrdb_bgsave_in_progress:0\r\n"),
            Err(InfoError::Missing("loading"))
        );
        assert!(matches!(
            parse_persistence(b"loading:yes\r\n"),
            Err(InfoError::BadValue { .. })
        ));
        assert_eq!(
            parse_persistence(b"loading:0\r\nloading:1\r\n"),
            Err(InfoError::Duplicate("loading"))
        );
        assert_eq!(parse_persistence(b""), Err(InfoError::Missing("loading")));
    }

    #[test]
    fn redis_master_is_in_sync() {
        let r = parse_replication(REDIS_MASTER.as_bytes()).unwrap();
        assert_eq!(r.role, Role::Master);
        assert!(r.links.is_empty());
        assert_eq!(r.link_state(), LinkState::InSync);
    }

    #[test]
    fn redis_replica_with_link_down() {
        let r = parse_replication(REDIS_REPLICA_DOWN.as_bytes()).unwrap();
        assert_eq!(r.role, Role::Replica);
        assert_eq!(
            r.links,
            vec![Link {
                down_since_secs: Some(-1),
                master: Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1)),
                last_io_secs: Some(-1),
                applied_offset: Some(1),
                ..Link::new(false)
            }]
        );
        assert_eq!(r.link_state(), LinkState::Down);
        let up = REDIS_REPLICA_DOWN.replace("link_status:down", "link_status:up");
        assert_eq!(
            parse_replication(up.as_bytes()).unwrap().link_state(),
            LinkState::InSync
        );
    }

    #[test]
    fn keydb_multi_master_prefixed_fields() {
        let r = parse_replication(KEYDB_MULTI_SYNCING.as_bytes()).unwrap();
        assert_eq!(r.role, Role::ActiveReplica);
        assert_eq!(r.links.len(), 2);
        assert!(r.links[0].up && !r.links[0].syncing);
        assert!(!r.links[1].up && r.links[1].syncing);
        assert_eq!(r.links[1].down_since_secs, Some(3));
        assert_eq!(r.link_state(), LinkState::Syncing);
        // Once the second link finished its sync and is up, or is merely down
        // while the first is up, the backend is in sync.
        let done = KEYDB_MULTI_SYNCING
            .replace("master_1_sync_in_progress:1", "master_1_sync_in_progress:0");
        assert_eq!(
            parse_replication(done.as_bytes()).unwrap().link_state(),
            LinkState::InSync
        );
    }

    #[test]
    fn keydb_60_repeated_blocks() {
        let r = parse_replication(KEYDB_60_MULTI_DOWN.as_bytes()).unwrap();
        assert_eq!(r.role, Role::ActiveReplica);
        assert_eq!(r.links.len(), 2);
        assert_eq!(r.links[0].down_since_secs, Some(7));
        assert_eq!(r.links[1].down_since_secs, Some(9));
        assert_eq!(r.link_state(), LinkState::Down);
        let one_up =
            KEYDB_60_MULTI_DOWN.replacen("master_link_status:down", "master_link_status:up", 1);
        assert_eq!(
            parse_replication(one_up.as_bytes()).unwrap().link_state(),
            LinkState::InSync
        );
    }

    #[test]
    fn global_link_status_is_not_a_link() {
        let text =
            "role:active-replica\r\nmaster_global_link_status:down\r\nmaster_link_status:up\r\n";
        let r = parse_replication(text.as_bytes()).unwrap();
        assert_eq!(r.links.len(), 1);
        assert_eq!(r.link_state(), LinkState::InSync);
    }

    #[test]
    fn replication_rejects_what_it_cannot_judge() {
        assert_eq!(
            parse_replication(b"connected_slaves:0\r\n"),
            Err(InfoError::Missing("role"))
        );
        assert!(matches!(
            parse_replication(b"role:sentinel\r\n"),
            Err(InfoError::BadValue { .. })
        ));
        assert_eq!(
            parse_replication(b"role:slave\r\nmaster_host:x\r\n"),
            Err(InfoError::Missing("master_link_status"))
        );
        assert!(matches!(
            parse_replication(b"role:slave\r\nmaster_link_status:flapping\r\n"),
            Err(InfoError::BadValue { .. })
        ));
        assert!(matches!(
            parse_replication(
                b"role:slave\r\nmaster_link_status:up\r\nmaster_sync_in_progress:2\r\n"
            ),
            Err(InfoError::BadValue { .. })
        ));
        assert!(matches!(
            parse_replication(
                b"role:slave\r\nmaster_sync_in_progress:0\r\nmaster_link_status:up\r\n"
            ),
            Err(InfoError::Orphan(_))
        ));
        assert_eq!(
            parse_replication(b"role:master\r\nrole:slave\r\n"),
            Err(InfoError::Duplicate("role"))
        );
        let many = format!(
            "role:slave\r\n{}",
            "master_link_status:up\r\n".repeat(MAX_LINKS + 1)
        );
        assert_eq!(
            parse_replication(many.as_bytes()),
            Err(InfoError::TooManyLinks)
        );
    }

    #[test]
    fn tolerates_lf_only_and_spaces() {
        let r = parse_replication(b"role:slave\nmaster_link_status: up \n").unwrap();
        assert_eq!(r.link_state(), LinkState::InSync);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let words: &[&[u8]] = &[
            b"role",
            b":",
            b"\r\n",
            b"\n",
            b"master_",
            b"1_",
            b"link_status",
            b"sync_in_progress",
            b"link_down_since_seconds",
            b"up",
            b"down",
            b"0",
            b"1",
            b"slave",
            b"loading",
            b"#",
            b"\xff",
        ];
        for _ in 0..5000 {
            let mut text = Vec::new();
            for _ in 0..(next() % 24) {
                text.extend_from_slice(words[(next() % words.len() as u64) as usize]);
            }
            let _ = parse_replication(&text);
            let _ = parse_persistence(&text);
        }
    }
}
