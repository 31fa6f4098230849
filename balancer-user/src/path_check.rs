//! Whether the frames the data plane sends to each remote backend arrive.
//!
//! A frame the XDP program rewrites and sends with `XDP_TX` or a redirect
//! is counted as forwarded before the driver takes it; a driver that then
//! drops it (a veth whose peer runs no XDP program, a NIC out of TX ring
//! space) says so only in its own statistics, if at all. So the agent
//! watches the outcome instead: every new connection to a remote backend
//! is a SYN whose SYN-ACK comes back through the data plane as a reply
//! (`TrafficStats::replies`). New connections that get no reply at all,
//! while the health checks (which connect to the backend directly, not
//! through XDP) find it READY, mean the path through the data plane is
//! broken.
//!
//! [`PathCheck`] is pure: counters and a time in, [`PathState`] per remote
//! backend out. [`run`] polls the pinned maps once a second and publishes
//! the states for `balancer status` and `/metrics`.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{error_chain, stats::PinnedMaps};

/// New connections without a single reply before the path counts as
/// failing: one lost SYN-ACK is not a broken path.
pub const UNANSWERED_FLOWS: u64 = 3;
/// How long the oldest unanswered connection waits for a reply first: a
/// SYN-ACK takes a round trip, and a client's SYN retransmits follow the
/// flow its first SYN created.
pub const REPLY_GRACE: Duration = Duration::from_secs(3);
/// How often [`run`] reads the counters.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What is known of the path to one remote backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PathState {
    /// No connection has been sent to it yet.
    Unconfirmed,
    /// It answered a connection forwarded to it.
    Answered,
    /// `unanswered` connections were forwarded to it and none was answered
    /// for `seconds`.
    Failing { unanswered: u64, seconds: u64 },
}

impl PathState {
    pub fn is_failing(&self) -> bool {
        matches!(self, PathState::Failing { .. })
    }
}

impl fmt::Display for PathState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathState::Unconfirmed => f.write_str("unconfirmed (no connection forwarded yet)"),
            PathState::Answered => f.write_str("answered"),
            PathState::Failing {
                unanswered,
                seconds,
            } => write!(
                f,
                "FAILING: {unanswered} connections forwarded, none answered for {seconds} s"
            ),
        }
    }
}

/// Key of one remote backend of one service.
pub type PathKey = (u32, SocketAddrV4);

/// The published states, by (service id, backend).
pub type PathReport = BTreeMap<PathKey, PathState>;

#[derive(Debug, Clone, Copy)]
struct Track {
    /// Counters at the last poll.
    new_flows: u64,
    replies: u64,
    /// New connections since the last reply.
    unanswered: u64,
    /// When the oldest of those was first seen.
    unanswered_since: Option<Instant>,
    answered_once: bool,
}

/// The pure core: feed it each remote backend's counters.
#[derive(Debug, Default)]
pub struct PathCheck {
    tracks: BTreeMap<PathKey, Track>,
}

impl PathCheck {
    /// Takes `new_flows` and `replies` of backend `key` as read at `now`,
    /// and returns its state.
    pub fn observe(
        &mut self,
        key: PathKey,
        new_flows: u64,
        replies: u64,
        now: Instant,
    ) -> PathState {
        let track = self.tracks.entry(key).or_insert(Track {
            new_flows,
            replies,
            unanswered: 0,
            unanswered_since: None,
            answered_once: replies > 0,
        });
        // Counters that went backwards belong to a data plane loaded anew:
        // start over from them.
        if new_flows < track.new_flows || replies < track.replies {
            *track = Track {
                new_flows,
                replies,
                unanswered: 0,
                unanswered_since: None,
                answered_once: replies > 0,
            };
        }
        let added = new_flows - track.new_flows;
        if replies > track.replies {
            track.answered_once = true;
            track.unanswered = 0;
            track.unanswered_since = None;
        } else if added > 0 {
            track.unanswered += added;
            track.unanswered_since.get_or_insert(now);
        }
        track.new_flows = new_flows;
        track.replies = replies;
        match track.unanswered_since {
            Some(since)
                if track.unanswered >= UNANSWERED_FLOWS
                    && now.duration_since(since) >= REPLY_GRACE =>
            {
                PathState::Failing {
                    unanswered: track.unanswered,
                    seconds: now.duration_since(since).as_secs(),
                }
            }
            _ if track.answered_once => PathState::Answered,
            _ => PathState::Unconfirmed,
        }
    }
}

/// Polls `maps` every [`POLL_INTERVAL`] and publishes the path state of
/// every remote backend in `report`; logs when a path starts or stops
/// failing. Runs until the task is dropped.
pub async fn run(maps: PinnedMaps, report: watch::Sender<PathReport>) {
    let mut check = PathCheck::default();
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    let mut read_failed = false;
    loop {
        interval.tick().await;
        let snapshot = match maps.traffic() {
            Ok(snapshot) => {
                read_failed = false;
                snapshot
            }
            Err(error) => {
                if !read_failed {
                    warn!(error = %error_chain(&error), "path check cannot read the data plane's counters");
                    read_failed = true;
                }
                continue;
            }
        };
        let now = Instant::now();
        let mut states = PathReport::new();
        for service in &snapshot.services {
            for backend in service.backends.iter().filter(|b| !b.local) {
                let key = (service.id, backend.addr);
                let state =
                    check.observe(key, backend.traffic.new_flows, backend.traffic.replies, now);
                states.insert(key, state);
            }
        }
        let before = report.borrow().clone();
        for (&(service, backend), state) in &states {
            let was_failing = before
                .get(&(service, backend))
                .is_some_and(|s| s.is_failing());
            if state.is_failing() && !was_failing {
                warn!(
                    %backend,
                    service,
                    %state,
                    "frames the data plane sends to this backend get no replies: the path \
                     through XDP is broken (driver drops XDP_TX frames? route or neighbour?)"
                );
            } else if was_failing && !state.is_failing() {
                info!(%backend, service, "the path to this backend answers again");
            }
        }
        report.send_replace(states);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PathKey {
        (0, "198.18.0.2:6380".parse().unwrap())
    }

    #[test]
    fn replies_confirm_the_path() {
        let t0 = Instant::now();
        let mut check = PathCheck::default();
        assert_eq!(check.observe(key(), 0, 0, t0), PathState::Unconfirmed);
        assert_eq!(
            check.observe(key(), 5, 9, t0 + Duration::from_secs(1)),
            PathState::Answered
        );
    }

    #[test]
    fn unanswered_connections_fail_after_the_grace() {
        let t0 = Instant::now();
        let mut check = PathCheck::default();
        check.observe(key(), 0, 0, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(check.observe(key(), 10, 0, t1), PathState::Unconfirmed);
        // Within the grace: not yet.
        assert_eq!(
            check.observe(key(), 12, 0, t1 + REPLY_GRACE - Duration::from_millis(1)),
            PathState::Unconfirmed
        );
        assert_eq!(
            check.observe(key(), 12, 0, t1 + REPLY_GRACE),
            PathState::Failing {
                unanswered: 12,
                seconds: REPLY_GRACE.as_secs()
            }
        );
        // One reply clears it.
        assert_eq!(
            check.observe(key(), 13, 1, t1 + REPLY_GRACE * 2),
            PathState::Answered
        );
    }

    #[test]
    fn a_path_that_answered_can_fail_later() {
        let t0 = Instant::now();
        let mut check = PathCheck::default();
        check.observe(key(), 4, 8, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(check.observe(key(), 9, 8, t1), PathState::Answered);
        assert!(check.observe(key(), 9, 8, t1 + REPLY_GRACE).is_failing());
    }

    #[test]
    fn too_few_connections_are_no_verdict() {
        let t0 = Instant::now();
        let mut check = PathCheck::default();
        check.observe(key(), 0, 0, t0);
        let state = check.observe(key(), UNANSWERED_FLOWS - 1, 0, t0 + Duration::from_secs(60));
        assert_eq!(state, PathState::Unconfirmed);
    }

    #[test]
    fn counters_going_back_start_over() {
        let t0 = Instant::now();
        let mut check = PathCheck::default();
        check.observe(key(), 100, 0, t0);
        check.observe(key(), 110, 0, t0 + Duration::from_secs(1));
        assert_eq!(
            check.observe(key(), 2, 0, t0 + Duration::from_secs(10)),
            PathState::Unconfirmed
        );
    }
}
