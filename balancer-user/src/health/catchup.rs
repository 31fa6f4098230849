//! "READY means caught up": whether a backend has applied what its peers
//! had written by the time its replication link to them came up.
//!
//! KeyDB's active replica reports `master_link_status:up` as soon as the
//! RDB of a full sync is loaded, before it has applied the stream its peer
//! buffered during the sync (docs/readiness.md). So the link rule
//! (`loading:0`, link up, no sync in progress) is necessary but not
//! enough. For every link whose peer is one of the monitored backends and
//! answers, this module also requires:
//!
//! - `master_last_io_seconds_ago` between 0 and [`MAX_IO_AGE_SECS`];
//! - after the link was seen up, a poll of the peer (started after that)
//!   gave a *target*: the peer's `master_replid` and `master_repl_offset`;
//! - the backend's `slave_repl_offset` on that link has reached the
//!   target, and the peer still reports the same `master_replid`.
//!
//! The backend's offset on the link counts bytes of the peer's own stream
//! (it starts from the peer's `+FULLRESYNC` reply), so the comparison is
//! within one stream. Once caught up, a link stays so while it is seen up
//! and the peer's replid does not change. A link whose peer does not
//! answer (or is not monitored) falls back to the link rule. An offset
//! that goes backwards, or a field that is missing, is "not caught up":
//! logged once, and the next good poll starts over.
//!
//! Pure: polls come in with the instants they started and ended; no
//! clock, no I/O.

use std::{net::SocketAddrV4, time::Instant};

use super::{
    info::{Replication, Role},
    NotReady, Probe, Readiness,
};

/// Most seconds since the last replication I/O for a link to count as
/// live: above KeyDB's default `repl-ping-replica-period` (10 s), below
/// its `repl-timeout` (60 s).
pub const MAX_IO_AGE_SECS: i64 = 15;

/// Checks in a row without an answer after which a peer counts as
/// unreachable, and its replicas' links fall back to the link rule (the
/// default `fall`).
pub const UNREACHABLE_AFTER: u32 = 3;

/// What the latest poll of a peer said, as the catch-up rule needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerView {
    /// Not monitored, not polled yet, or its last poll did not get as far
    /// as `INFO replication`.
    Unreachable,
    /// Answers, but is loading its dataset: its offset means nothing yet.
    Loading,
    /// Answered `INFO replication` in a poll that started at `started`.
    Answered {
        /// When that poll started.
        started: Instant,
        /// Its `master_replid`.
        replid: Option<String>,
        /// Its `master_repl_offset`.
        offset: Option<i64>,
    },
}

/// The verdict on one poll of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// Every link to an answering peer has caught up (or there is none).
    /// `fallback` is true when some link was judged by the link rule alone
    /// because its peer did not answer.
    CaughtUp {
        /// Some link fell back to the link rule.
        fallback: bool,
    },
    /// Some link to an answering peer has not caught up yet.
    Behind {
        /// The peer.
        peer: SocketAddrV4,
        /// Bytes of the peer's stream still to apply, once known.
        bytes: Option<u64>,
        /// Why, when the bytes are not known.
        why: Behind,
    },
}

/// Why a link is not caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// Offsets known: `bytes` to go.
    Offsets,
    /// The link is down or mid-sync while the peer answers.
    LinkNotUp,
    /// The link just came up; waiting for a poll of the peer.
    AwaitingPeer,
    /// The peer is loading its dataset.
    PeerLoading,
    /// No replication I/O for more than [`MAX_IO_AGE_SECS`].
    StaleIo,
    /// A field was missing or not a number, or an offset went backwards,
    /// or the peer's replid changed: starting over.
    BadInfo,
}

impl std::fmt::Display for Behind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Behind::Offsets => "behind",
            Behind::LinkNotUp => "replication link not up",
            Behind::AwaitingPeer => "link up, waiting for the peer's offset",
            Behind::PeerLoading => "peer loading",
            Behind::StaleIo => "no replication I/O lately",
            Behind::BadInfo => "INFO unusable or offsets inconsistent",
        })
    }
}

/// Formats a byte count the way `balancer status` shows it ("1.2 MB").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Track {
    /// Not seen up (or starting over).
    Down,
    /// Seen up first by the poll that ended at `since`.
    Up {
        since: Instant,
        target: Option<(String, i64)>,
        applied: Option<i64>,
    },
    /// Caught up with the stream `replid`.
    CaughtUp { replid: String, applied: i64 },
}

/// The catch-up state of one backend, fed every poll.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    tracks: Vec<(Option<SocketAddrV4>, Track)>,
    /// Bad input was logged and no good poll came since.
    warned: bool,
}

impl Tracker {
    /// A tracker that has seen nothing.
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Forgets everything: the backend did not answer, so it may have
    /// restarted.
    pub fn reset(&mut self) {
        self.tracks.clear();
    }

    /// Judges one poll of the backend: `replication` from a poll that
    /// ended at `ended`, `peer(addr)` the latest view of each peer.
    /// Returns the verdict; logs bad input once until a good poll.
    pub fn judge(
        &mut self,
        replication: &Replication,
        ended: Instant,
        peer: impl Fn(SocketAddrV4) -> PeerView,
    ) -> CatchUp {
        if replication.role == Role::Master {
            self.tracks.clear();
            return CatchUp::CaughtUp { fallback: false };
        }
        let masters: Vec<Option<SocketAddrV4>> =
            replication.links.iter().map(|l| l.master).collect();
        if self
            .tracks
            .iter()
            .map(|(m, _)| *m)
            .ne(masters.iter().copied())
        {
            self.tracks = masters.iter().map(|&m| (m, Track::Down)).collect();
        }
        let mut fallback = false;
        let mut behind = None;
        let mut bad = None;
        for (link, (_, track)) in replication.links.iter().zip(self.tracks.iter_mut()) {
            let view = link.master.map_or(PeerView::Unreachable, &peer);
            let Some(addr) = link.master else {
                fallback = true;
                continue;
            };
            let verdict = match view {
                PeerView::Unreachable => {
                    fallback = true;
                    continue;
                }
                // A peer that is loading takes no writes (`-LOADING`): a link
                // caught up with its stream stays so; any other waits.
                PeerView::Loading
                    if matches!(track, Track::CaughtUp { .. }) && link.up && !link.syncing =>
                {
                    None
                }
                PeerView::Loading => Some((None, Behind::PeerLoading)),
                PeerView::Answered {
                    started,
                    replid,
                    offset,
                } => step(track, link, ended, started, replid, offset),
            };
            if let Some((bytes, why)) = verdict {
                if why == Behind::BadInfo {
                    bad = Some(addr);
                }
                // The link furthest behind is the one reported.
                let worse = match (&behind, bytes) {
                    (None, _) => true,
                    (Some((_, Some(b), _)), Some(n)) => n > *b,
                    (Some((_, Some(_), _)), None) => false,
                    (Some((_, None, _)), _) => false,
                };
                if worse {
                    behind = Some((addr, bytes, why));
                }
            }
        }
        match (bad, self.warned) {
            (Some(peer), false) => {
                self.warned = true;
                tracing::warn!(%peer, "INFO offsets unusable or inconsistent; not caught up until a good poll");
            }
            (None, true) if behind.is_none() => self.warned = false,
            _ => {}
        }
        match behind {
            None => CatchUp::CaughtUp { fallback },
            Some((peer, bytes, why)) => CatchUp::Behind { peer, bytes, why },
        }
    }
}

/// One link to an answering peer: `None` when caught up, else the bytes
/// to go (when known) and why.
fn step(
    track: &mut Track,
    link: &super::info::Link,
    ended: Instant,
    peer_started: Instant,
    peer_replid: Option<String>,
    peer_offset: Option<i64>,
) -> Option<(Option<u64>, Behind)> {
    if !link.up || link.syncing {
        *track = Track::Down;
        return Some((None, Behind::LinkNotUp));
    }
    let (Some(applied), Some(replid), Some(offset)) =
        (link.applied_offset, peer_replid, peer_offset)
    else {
        *track = Track::Down;
        return Some((None, Behind::BadInfo));
    };
    if applied < 0 || offset < 0 {
        *track = Track::Down;
        return Some((None, Behind::BadInfo));
    }
    let io_ok = link
        .last_io_secs
        .is_some_and(|s| (0..=MAX_IO_AGE_SECS).contains(&s));
    match track {
        Track::Down => {
            *track = Track::Up {
                since: ended,
                target: None,
                applied: Some(applied),
            };
            Some((None, Behind::AwaitingPeer))
        }
        Track::CaughtUp {
            replid: seen,
            applied: last,
        } => {
            if *seen != replid || applied < *last {
                *track = Track::Down;
                return Some((None, Behind::BadInfo));
            }
            *last = applied;
            if !io_ok {
                return Some((None, Behind::StaleIo));
            }
            None
        }
        Track::Up {
            since,
            target,
            applied: last,
        } => {
            if last.is_some_and(|l| applied < l) {
                *track = Track::Down;
                return Some((None, Behind::BadInfo));
            }
            *last = Some(applied);
            if let Some((seen, _)) = target {
                if *seen != replid {
                    *track = Track::Down;
                    return Some((None, Behind::BadInfo));
                }
            }
            // Only a poll of the peer that started after the previous poll
            // of this backend (the first one that saw the link up, or the
            // last one that fell short) can set the target.
            if target.is_none() && peer_started >= *since {
                *target = Some((replid.clone(), offset));
            }
            let Some((_, goal)) = target else {
                return Some((None, Behind::AwaitingPeer));
            };
            if applied >= *goal {
                if !io_ok {
                    return Some((None, Behind::StaleIo));
                }
                *track = Track::CaughtUp { replid, applied };
                return None;
            }
            // Short of it: the peer kept writing meanwhile, so the next
            // target is sampled after this poll. Reaching a target thus
            // means lagging the peer by less than one check interval, not
            // by however long the catching up took.
            let bytes = (*goal - applied) as u64;
            *since = ended;
            *target = None;
            Some((Some(bytes), Behind::Offsets))
        }
    }
}

/// The catch-up rule over every monitored backend: each one's tracker,
/// the latest view of it as a peer, and whether it has caught up since it
/// last failed to answer.
#[derive(Debug, Clone)]
pub struct Judge {
    addrs: Vec<SocketAddrV4>,
    states: Vec<State>,
}

#[derive(Debug, Clone)]
struct State {
    tracker: Tracker,
    view: PeerView,
    /// Checks in a row that got no answer.
    failures: u32,
    /// The backend's own `master_replid` at its last answer: a new one
    /// means it restarted, even if no check saw it down.
    replid: Option<String>,
    /// Has been READY and caught up since it last failed to answer. A
    /// backend that comes back (maybe restarted empty) without this ranks
    /// as catching up even while its link is down or syncing, so that it
    /// never serves in place of a peer that kept its data.
    caught_once: bool,
}

impl Judge {
    /// A judge of the backends at `addrs` (the monitor's order).
    pub fn new(addrs: Vec<SocketAddrV4>) -> Judge {
        let states = addrs
            .iter()
            .map(|_| State {
                tracker: Tracker::new(),
                view: PeerView::Unreachable,
                failures: 0,
                replid: None,
                caught_once: false,
            })
            .collect();
        Judge { addrs, states }
    }

    /// Applies the rule to one probe of backend `index`: a READY probe
    /// that has not caught up becomes [`NotReady::CatchingUp`], and so
    /// does a replica whose link is down or syncing while its peer
    /// answers, if it has not caught up since it last failed to answer.
    pub fn judge(&mut self, index: usize, mut probe: Probe) -> Probe {
        let Some(state) = self.states.get_mut(index) else {
            return probe;
        };
        let answered = probe.info.is_some() || probe.reason().is_some_and(NotReady::is_loading);
        state.failures = if answered { 0 } else { state.failures + 1 };
        state.view = match (&probe.info, probe.reason()) {
            (_, Some(reason)) if reason.is_loading() => PeerView::Loading,
            (Some(info), _) => PeerView::Answered {
                started: info.started,
                replid: info.replication.replid.clone(),
                offset: info.replication.stream_offset,
            },
            // One check timing out (a busy peer forking for a sync) must
            // not let its replicas fall back to the link rule: the last
            // answer stands until UNREACHABLE_AFTER checks in a row fail.
            // The target needs a check started after the link came up, so
            // an old answer cannot set it.
            (None, _) if state.failures < UNREACHABLE_AFTER => state.view.clone(),
            (None, _) => PeerView::Unreachable,
        };
        let Some(info) = probe.info.clone() else {
            if !probe.reason().is_some_and(NotReady::is_loading) {
                // It did not answer: it may come back restarted, empty.
                let state = &mut self.states[index];
                state.tracker.reset();
                state.caught_once = false;
            }
            return probe;
        };
        let state = &mut self.states[index];
        let replid = info.replication.replid.clone();
        if replid.is_some() && state.replid.is_some() && replid != state.replid {
            // Restarted between two checks (KeyDB draws a new replid at
            // start): whatever it had may be gone.
            tracing::info!(backend = %self.addrs[index], "new replication id: the backend restarted");
            state.tracker.reset();
            state.caught_once = false;
        }
        if replid.is_some() {
            state.replid = replid;
        }
        let own = self.addrs[index];
        let ended = info.started + probe.elapsed;
        let views: Vec<PeerView> = self.states.iter().map(|s| s.view.clone()).collect();
        let addrs = &self.addrs;
        let view_of = |addr: SocketAddrV4| {
            if addr == own {
                return PeerView::Unreachable;
            }
            addrs
                .iter()
                .position(|&a| a == addr)
                .map_or(PeerView::Unreachable, |i| views[i].clone())
        };
        let state = &mut self.states[index];
        let verdict = state.tracker.judge(&info.replication, ended, view_of);
        match verdict {
            CatchUp::CaughtUp { fallback } => {
                if probe.is_ready() && !fallback {
                    state.caught_once = true;
                }
            }
            CatchUp::Behind { peer, bytes, why } => {
                let replace = match probe.reason() {
                    None => true,
                    Some(NotReady::ReplicaLinkDown { .. } | NotReady::ReplicaSyncing { .. }) => {
                        !state.caught_once
                    }
                    Some(_) => false,
                };
                if replace {
                    probe.readiness =
                        Readiness::NotReady(NotReady::CatchingUp { peer, bytes, why });
                }
            }
        }
        probe
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::health::{
        info::{parse_persistence, parse_replication, LinkState},
        select_serving, Badness, Candidate,
    };

    /// `INFO persistence` + `INFO replication` of KeyDB 6.3.4 in each
    /// phase of a rejoin, captured in the lab by the ignored test
    /// `capture_rejoin_phases` (tests/tests/keydb.rs). Node 1 is
    /// 198.18.0.1, restarted empty; node 2 (198.18.0.2) kept its data.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("fixtures/keydb-6.3.4/", $name, ".txt"))
        };
    }
    const CAUGHT_UP_1: &str = fixture!("caught-up.node");
    const CAUGHT_UP_2: &str = fixture!("caught-up.peer");
    const SURVIVOR_2: &str = fixture!("survivor-link-down.node");
    const SYNCING_1: &str = fixture!("sync-in-progress.node");
    const SYNCING_PEER_2: &str = fixture!("sync-in-progress.peer");
    const LOADING_1: &str = fixture!("loading.node");
    const BEHIND_1: &str = fixture!("link-up-behind.node");
    const BEHIND_PEER_2: &str = fixture!("link-up-behind.peer");
    const APPLIED_1: &str = fixture!("rejoined-caught-up.node");
    const APPLIED_PEER_2: &str = fixture!("rejoined-caught-up.peer");
    const UNREACHABLE_1: &str = fixture!("peer-unreachable.node");

    fn n(i: u8) -> SocketAddrV4 {
        SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 0, i), 6380)
    }

    /// What the checker makes of an INFO text, started at `started`.
    fn probe(text: &str, started: Instant) -> Probe {
        let elapsed = Duration::from_millis(1);
        let Ok(persistence) = parse_persistence(text.as_bytes()) else {
            return Probe {
                readiness: Readiness::NotReady(NotReady::BadReply {
                    stage: crate::health::Stage::InfoPersistence,
                    detail: "unusable".into(),
                }),
                role: None,
                elapsed,
                info: None,
            };
        };
        if persistence.loading {
            return Probe {
                readiness: Readiness::NotReady(NotReady::LoadingFlag),
                role: None,
                elapsed,
                info: None,
            };
        }
        let replication = match parse_replication(text.as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                return Probe {
                    readiness: Readiness::NotReady(NotReady::BadReply {
                        stage: crate::health::Stage::InfoReplication,
                        detail: e.to_string(),
                    }),
                    role: None,
                    elapsed,
                    info: None,
                }
            }
        };
        let role = replication.role;
        let readiness = match replication.link_state() {
            LinkState::InSync => Readiness::Ready,
            LinkState::Down => Readiness::NotReady(NotReady::ReplicaLinkDown { role }),
            LinkState::Syncing => Readiness::NotReady(NotReady::ReplicaSyncing { role }),
        };
        Probe {
            readiness,
            role: Some(role),
            elapsed,
            info: Some(crate::health::ProbeInfo {
                started,
                replication,
            }),
        }
    }

    fn refused() -> Probe {
        Probe {
            readiness: Readiness::NotReady(NotReady::Refused),
            role: None,
            elapsed: Duration::from_millis(1),
            info: None,
        }
    }

    /// A judge of the pair and a clock that moves 10 ms per poll.
    struct Pair {
        judge: Judge,
        now: Instant,
    }

    impl Pair {
        fn new() -> Pair {
            Pair {
                judge: Judge::new(vec![n(1), n(2)]),
                now: Instant::now(),
            }
        }

        /// One poll of node `node` (1 or 2) that read `text`.
        fn poll(&mut self, node: usize, text: &str) -> Probe {
            self.now += Duration::from_millis(10);
            self.judge.judge(node - 1, probe(text, self.now))
        }

        fn fail(&mut self, node: usize) -> Probe {
            self.now += Duration::from_millis(10);
            self.judge.judge(node - 1, refused())
        }

        /// Both caught up, as after the first polls of a healthy pair.
        fn healthy() -> Pair {
            let mut p = Pair::new();
            for _ in 0..2 {
                p.poll(1, CAUGHT_UP_1);
                p.poll(2, CAUGHT_UP_2);
            }
            assert!(p.poll(1, CAUGHT_UP_1).is_ready());
            assert!(p.poll(2, CAUGHT_UP_2).is_ready());
            p
        }
    }

    fn badness(p: &Probe) -> Badness {
        p.badness()
    }

    #[test]
    fn fixtures_are_what_their_names_say() {
        let off = |t: &str| parse_replication(t.as_bytes()).unwrap();
        let r1 = off(CAUGHT_UP_1);
        let r2 = off(CAUGHT_UP_2);
        // The offsets that compare: node 1's applied offset in node 2's
        // stream against node 2's own stream length, and the other way.
        assert_eq!(r1.links[0].master, Some(n(2)));
        assert_eq!(r1.links[0].applied_offset, r2.stream_offset);
        assert_eq!(r2.links[0].applied_offset, r1.stream_offset);
        // The two streams are not the same (different replids).
        assert_ne!(r1.replid, r2.replid);
        let behind = off(BEHIND_1);
        let peer = off(BEHIND_PEER_2);
        assert!(behind.links[0].up && !behind.links[0].syncing);
        assert!(behind.links[0].applied_offset.unwrap() < peer.stream_offset.unwrap());
        assert!(parse_persistence(LOADING_1.as_bytes()).unwrap().loading);
        assert_eq!(off(SYNCING_1).link_state(), LinkState::Syncing);
        assert_eq!(off(UNREACHABLE_1).link_state(), LinkState::Down);
        assert_eq!(off(SURVIVOR_2).link_state(), LinkState::Down);
        // Node 1 restarted: a new stream id; node 2 kept its own.
        assert_ne!(behind.replid, r1.replid);
        assert_eq!(peer.replid, r2.replid);
        assert_eq!(off(SYNCING_PEER_2).replid, r2.replid);
    }

    #[test]
    fn a_healthy_pair_is_ready_after_the_peer_is_polled_once() {
        let mut p = Pair::new();
        // Node 2 polled before node 1 saw its link up: no target yet.
        p.poll(2, CAUGHT_UP_2);
        let first = p.poll(1, CAUGHT_UP_1);
        assert_eq!(badness(&first), Badness::CatchingUp, "{first:?}");
        assert!(first
            .reason()
            .unwrap()
            .to_string()
            .contains("waiting for the peer"));
        p.poll(2, CAUGHT_UP_2);
        let second = p.poll(1, CAUGHT_UP_1);
        assert!(second.is_ready(), "{second:?}");
    }

    #[test]
    fn link_up_but_behind_is_catching_up_until_the_offset_is_reached() {
        let mut p = Pair::healthy();
        // Node 1 dies and comes back empty: refused, syncing, loading.
        p.fail(1);
        let survivor = p.poll(2, SURVIVOR_2);
        assert_eq!(badness(&survivor), Badness::ReplicaLinkDown);
        let syncing = p.poll(1, SYNCING_1);
        assert_eq!(badness(&syncing), Badness::CatchingUp, "{syncing:?}");
        // The survivor's link is down while node 1 answers: it kept its
        // data, so it keeps its rank.
        let survivor = p.poll(2, SYNCING_PEER_2);
        assert_eq!(badness(&survivor), Badness::ReplicaLinkDown);
        let chosen = select_serving(&[
            Candidate {
                badness: badness(&syncing),
                serving: false,
            },
            Candidate {
                badness: badness(&survivor),
                serving: true,
            },
        ]);
        assert_eq!(chosen, vec![1], "the survivor serves alone");
        assert_eq!(badness(&p.poll(1, LOADING_1)), Badness::Loading);
        // The RDB is loaded and the link says up: 22.6 MB of node 2's
        // stream are still to be applied.
        let up = p.poll(1, BEHIND_1);
        assert_eq!(badness(&up), Badness::CatchingUp);
        p.poll(2, BEHIND_PEER_2);
        let behind = p.poll(1, BEHIND_1);
        assert_eq!(
            behind.reason().unwrap().to_string(),
            "catching up: 22.6 MB behind 198.18.0.2:6380"
        );
        assert_eq!(behind.reason().unwrap().kind(), "catching_up");
        p.poll(2, APPLIED_PEER_2);
        let applied = p.poll(1, APPLIED_1);
        assert!(applied.is_ready(), "{applied:?}");
        // And it stays so while the link stays up.
        assert!(p.poll(1, APPLIED_1).is_ready());
    }

    #[test]
    fn a_peer_that_does_not_answer_falls_back_to_the_link_rule() {
        let mut p = Pair::new();
        for _ in 0..UNREACHABLE_AFTER {
            p.fail(2);
        }
        assert!(p.poll(1, CAUGHT_UP_1).is_ready());
        assert_eq!(badness(&p.poll(1, UNREACHABLE_1)), Badness::ReplicaLinkDown);
        // A peer never polled is no peer either.
        let mut fresh = Pair::new();
        assert!(fresh.poll(1, CAUGHT_UP_1).is_ready());
    }

    #[test]
    fn a_loading_peer_gives_no_target() {
        let mut p = Pair::new();
        p.poll(2, &LOADING_1.replace("198.18.0.2", "198.18.0.1"));
        let probe = p.poll(1, CAUGHT_UP_1);
        assert_eq!(badness(&probe), Badness::CatchingUp);
        assert!(probe.reason().unwrap().to_string().contains("peer loading"));
    }

    #[test]
    fn one_peer_check_timing_out_does_not_make_a_lagging_node_ready() {
        let mut p = Pair::healthy();
        p.fail(1);
        p.poll(2, BEHIND_PEER_2);
        p.poll(1, BEHIND_1);
        p.poll(2, BEHIND_PEER_2);
        assert_eq!(badness(&p.poll(1, BEHIND_1)), Badness::CatchingUp);
        p.fail(2);
        let probe = p.poll(1, BEHIND_1);
        assert_eq!(badness(&probe), Badness::CatchingUp, "{probe:?}");
    }

    #[test]
    fn reaching_a_target_sampled_before_the_last_shortfall_is_not_enough() {
        let node = |applied: u64| {
            CAUGHT_UP_1.replace(
                "slave_repl_offset:131",
                &format!("slave_repl_offset:{applied}"),
            )
        };
        let peer = |offset: u64| {
            CAUGHT_UP_2.replace(
                "master_repl_offset:131",
                &format!("master_repl_offset:{offset}"),
            )
        };
        let mut p = Pair::new();
        p.poll(1, &node(100));
        p.poll(2, &peer(200));
        // Short of 200: the next target is sampled after this poll.
        assert_eq!(badness(&p.poll(1, &node(150))), Badness::CatchingUp);
        p.poll(2, &peer(300));
        // 250 is past the first target but not the second.
        let probe = p.poll(1, &node(250));
        assert_eq!(badness(&probe), Badness::CatchingUp);
        assert_eq!(
            probe.reason().unwrap().to_string(),
            "catching up: 50 B behind 198.18.0.2:6380"
        );
        p.poll(2, &peer(320));
        assert!(p.poll(1, &node(320)).is_ready());
    }

    #[test]
    fn a_caught_up_node_stays_ready_while_its_peer_loads() {
        // KeyDB #365: the survivor full-syncs from the rejoiner and loads.
        let mut p = Pair::healthy();
        p.poll(2, &LOADING_1.replace("198.18.0.2", "198.18.0.1"));
        assert!(p.poll(1, CAUGHT_UP_1).is_ready());
    }

    #[test]
    fn a_restart_between_two_checks_is_seen_by_the_new_replid() {
        let mut p = Pair::healthy();
        // No failed check; node 1 answers with a new replid, mid-sync.
        let syncing = p.poll(1, SYNCING_1);
        assert_eq!(badness(&syncing), Badness::CatchingUp, "{syncing:?}");
        // Without a restart, a link that is merely down keeps its rank.
        let mut q = Pair::healthy();
        let down = CAUGHT_UP_1.replace("master_link_status:up", "master_link_status:down");
        assert_eq!(badness(&q.poll(1, &down)), Badness::ReplicaLinkDown);
    }

    #[test]
    fn truncated_or_missing_fields_are_not_caught_up_and_recover() {
        let mut p = Pair::healthy();
        // INFO cut before slave_repl_offset.
        let cut = &CAUGHT_UP_1[..CAUGHT_UP_1.find("slave_read_repl_offset").unwrap()];
        let probe = p.poll(1, cut);
        assert_eq!(badness(&probe), Badness::CatchingUp, "{probe:?}");
        assert!(probe
            .reason()
            .unwrap()
            .to_string()
            .contains("INFO unusable"));
        let garbled = CAUGHT_UP_1.replace("slave_repl_offset:131", "slave_repl_offset:13x");
        assert_eq!(badness(&p.poll(1, &garbled)), Badness::CatchingUp);
        // No replication I/O for a long time.
        let stale = CAUGHT_UP_1.replace(
            "master_last_io_seconds_ago:0",
            "master_last_io_seconds_ago:40",
        );
        p.poll(2, CAUGHT_UP_2);
        p.poll(1, CAUGHT_UP_1);
        p.poll(2, CAUGHT_UP_2);
        assert!(p.poll(1, CAUGHT_UP_1).is_ready());
        assert_eq!(badness(&p.poll(1, &stale)), Badness::CatchingUp);
        // Good polls again: waiting for the peer, then caught up.
        assert!(p.poll(1, CAUGHT_UP_1).is_ready());
        // Lost on truncation: a text without the link at all is a bad
        // reply, not READY.
        let no_link = &CAUGHT_UP_1[..CAUGHT_UP_1.find("master_link_status").unwrap()];
        assert!(!p.poll(1, no_link).is_ready());
    }

    #[test]
    fn offsets_going_backwards_or_a_new_peer_stream_start_over() {
        let mut p = Pair::healthy();
        let back = CAUGHT_UP_1.replace("slave_repl_offset:131", "slave_repl_offset:100");
        assert_eq!(badness(&p.poll(1, &back)), Badness::CatchingUp);
        // Starting over: link up seen, the peer polled after, reached.
        p.poll(1, CAUGHT_UP_1);
        p.poll(2, CAUGHT_UP_2);
        assert!(p.poll(1, CAUGHT_UP_1).is_ready());
        // The peer restarted between two polls (new replid) while node 1's
        // link looked up all along.
        let restarted = CAUGHT_UP_2.replace(
            "a236cd8c94d4569140bc79b33410d9f0eedca8b1",
            "0123456789abcdef0123456789abcdef01234567",
        );
        p.poll(2, &restarted);
        assert_eq!(badness(&p.poll(1, CAUGHT_UP_1)), Badness::CatchingUp);
        // Then as after any start over: link seen up, peer polled, reached.
        assert_eq!(badness(&p.poll(1, CAUGHT_UP_1)), Badness::CatchingUp);
        p.poll(2, &restarted);
        assert!(p.poll(1, CAUGHT_UP_1).is_ready());
    }

    #[test]
    fn a_node_that_failed_to_answer_ranks_as_catching_up_until_caught_up() {
        let mut p = Pair::healthy();
        p.fail(1);
        // Back, link down, the peer answering: not the survivor's rank.
        let down = SYNCING_1.replace("master_sync_in_progress:1", "master_sync_in_progress:0");
        assert_eq!(badness(&p.poll(1, &down)), Badness::CatchingUp);
        // One check of the survivor timing out changes nothing ...
        p.fail(2);
        assert_eq!(badness(&p.poll(1, &down)), Badness::CatchingUp);
        // ... but a survivor that stops answering is unreachable: node 1
        // falls back to the link rule.
        p.fail(2);
        p.fail(2);
        assert_eq!(badness(&p.poll(1, &down)), Badness::ReplicaLinkDown);
    }

    /// Mangled captures (lines dropped, cut short, numbers changed) in
    /// random order: never a panic, and a replica judged READY while its
    /// peer answers always reported its applied offset.
    #[test]
    fn mangled_info_never_panics_nor_is_ready_without_an_offset() {
        let texts = [
            CAUGHT_UP_1,
            CAUGHT_UP_2,
            SURVIVOR_2,
            SYNCING_1,
            SYNCING_PEER_2,
            LOADING_1,
            BEHIND_1,
            BEHIND_PEER_2,
            APPLIED_1,
            APPLIED_PEER_2,
            UNREACHABLE_1,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut p = Pair::new();
        for _ in 0..20_000 {
            let base = texts[(next() % texts.len() as u64) as usize];
            let mut lines: Vec<String> = base.split("\r\n").map(str::to_string).collect();
            match next() % 4 {
                0 => {
                    let i = (next() % lines.len() as u64) as usize;
                    lines.remove(i);
                }
                1 => {
                    let keep = (next() % lines.len() as u64) as usize;
                    lines.truncate(keep);
                }
                2 => {
                    let i = (next() % lines.len() as u64) as usize;
                    if let Some((k, _)) = lines[i].split_once(':') {
                        lines[i] = format!("{k}:{}", next() as i64 % 1_000_000);
                    }
                }
                _ => {}
            }
            let text = lines.join("\r\n");
            let node = 1 + (next() % 2) as usize;
            if next() % 10 == 0 {
                p.fail(node);
                continue;
            }
            let probe = p.poll(node, &text);
            if probe.is_ready() {
                if let Some(info) = &probe.info {
                    for link in &info.replication.links {
                        if link.master == Some(n(3 - node as u8)) && link.up {
                            let answering =
                                matches!(p.judge.states[2 - node].view, PeerView::Answered { .. });
                            assert!(!answering || link.applied_offset.is_some(), "{text}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn human_bytes_rounds_to_one_decimal() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_234_567), "1.2 MB");
        assert_eq!(human_bytes(20_424_046), "20.4 MB");
        assert_eq!(human_bytes(3_000_000_000), "3.0 GB");
    }
}
