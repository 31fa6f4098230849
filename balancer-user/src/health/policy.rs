//! Which backends of a service get new connections, given how each one
//! fared in its health checks: the replication rule of the health design.
//!
//! A replica whose replication link is down or mid-sync is NOT READY, but
//! taking the last serving node out because of its replication link would
//! turn a degraded service into no service. So: when at least one backend
//! is [`Badness::Ready`], exactly the ready ones serve; otherwise the least
//! bad backend that can still answer clients serves alone; a backend that
//! cannot answer at all (refused, timed out, ...) never serves. A loading
//! backend keeps serving alone only if it is serving already (the survivor
//! of a pair that full-syncs from its rejoining peer, KeyDB #365: reads go
//! on, writes get `-LOADING`); it is never added.
//!
//! Pure: no I/O, no clock. The caller feeds it damped states (see
//! [`super::BackendHealth`]) and writes the result to the data plane.

use std::fmt;

/// How unfit a backend is to take new connections. The order of the
/// variants is the policy's order, best first (`Ready < ReplicaLinkDown <
/// ReplicaSyncing < Unavailable`):
///
/// | rank | badness | serves |
/// |---|---|---|
/// | 0 | `Ready` | always |
/// | 1 | `ReplicaLinkDown` | only as the last resort |
/// | 2 | `ReplicaSyncing` | only as the last resort |
/// | 3 | `Loading` | only as the last resort, and only if already serving |
/// | 4 | `CatchingUp` | never (some peer that answers has more) |
/// | 5 | `Unavailable` | never |
///
/// A backend is `CatchingUp` only while a peer answers that has data it
/// lacks; should every peer stop answering, it falls back to the link
/// rule's rank and may serve again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Badness {
    /// Answers PING, `loading:0`, and is a master or a replica with a
    /// replication link up and none mid-sync.
    Ready,
    /// A replica (or active replica) with every link to its master(s)
    /// down. It answers clients from a dataset that stops at the moment
    /// the link went down. When its peer died this is the survivor, whose
    /// data is the most recent there is.
    ReplicaLinkDown,
    /// A replica in the middle of a full synchronisation. Worse than a
    /// link that is merely down: its data is just as old, and it is about
    /// to replace its dataset (a disk-based sync ends with a blocking load
    /// during which it answers `-LOADING`).
    ReplicaSyncing,
    /// Answers, but its dataset is loading (`loading:1` or `-LOADING`).
    Loading,
    /// Answers, but has not applied what its peer had written when its
    /// replication link came up, or came back (from being unavailable)
    /// and has not caught up with its answering peer since
    /// ([`super::catchup`]).
    CatchingUp,
    /// Cannot serve at all: connection refused or timed out, AUTH failed,
    /// an error or garbled reply.
    Unavailable,
}

impl Badness {
    /// May take clients when nothing better exists.
    pub fn can_serve(self) -> bool {
        self != Badness::Unavailable
    }

    /// May take clients as the last resort, given whether it is serving
    /// now.
    pub fn last_resort(self, serving: bool) -> bool {
        match self {
            // A node catching up has less than some peer that answers
            // (when no peer answers, the catch-up rule falls back to the
            // link rule and the node is not `CatchingUp`).
            Badness::Unavailable | Badness::CatchingUp => false,
            Badness::Loading => serving,
            _ => true,
        }
    }
}

impl fmt::Display for Badness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Badness::Ready => "ready",
            Badness::ReplicaLinkDown => "replica link down",
            Badness::ReplicaSyncing => "replica syncing",
            Badness::Loading => "loading",
            Badness::CatchingUp => "catching up",
            Badness::Unavailable => "unavailable",
        })
    }
}

/// One backend as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its damped badness.
    pub badness: Badness,
    /// It is in the service's backend set right now. Among equally bad
    /// last-resort backends the one already serving keeps serving, so the
    /// choice does not hop between them (each hop would reset clients).
    pub serving: bool,
}

/// The indexes (ascending) into `candidates` of the backends that get new
/// connections.
///
/// - Some backend is `Ready`: all `Ready` backends, and only them.
/// - None is `Ready`: the single least bad backend that may serve as the
///   [`last_resort`](Badness::last_resort); ties go to one already serving,
///   then to the lowest index, so the choice is deterministic.
/// - None can serve: nothing.
pub fn select_serving(candidates: &[Candidate]) -> Vec<usize> {
    let ready: Vec<usize> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.badness == Badness::Ready)
        .map(|(i, _)| i)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.badness.last_resort(c.serving))
        .min_by_key(|&(i, c)| (c.badness, !c.serving, i))
        .map(|(i, _)| vec![i])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::Badness::*;
    use super::*;

    fn c(badness: Badness) -> Candidate {
        Candidate {
            badness,
            serving: false,
        }
    }

    fn serving(badness: Badness) -> Candidate {
        Candidate {
            badness,
            serving: true,
        }
    }

    #[test]
    fn badness_order_is_explicit() {
        let mut all = [
            Unavailable,
            CatchingUp,
            ReplicaSyncing,
            Loading,
            Ready,
            ReplicaLinkDown,
        ];
        all.sort();
        assert_eq!(
            all,
            [
                Ready,
                ReplicaLinkDown,
                ReplicaSyncing,
                Loading,
                CatchingUp,
                Unavailable
            ]
        );
        assert!(Ready.can_serve() && ReplicaLinkDown.can_serve() && ReplicaSyncing.can_serve());
        assert!(!Unavailable.can_serve());
    }

    #[test]
    fn selection_table() {
        let cases: &[(&str, Vec<Candidate>, Vec<usize>)] = &[
            ("no backends", vec![], vec![]),
            (
                "all ready",
                vec![c(Ready), c(Ready), c(Ready)],
                vec![0, 1, 2],
            ),
            (
                "ready ones only, a lagging replica is left out",
                vec![c(Ready), c(ReplicaLinkDown), c(Ready)],
                vec![0, 2],
            ),
            (
                "a syncing replica is left out while one is ready",
                vec![serving(ReplicaSyncing), c(Ready)],
                vec![1],
            ),
            (
                "the survivor of a pair keeps serving although its link is down",
                vec![c(ReplicaLinkDown), c(Unavailable)],
                vec![0],
            ),
            (
                "a lone replica with its link down serves",
                vec![c(ReplicaLinkDown)],
                vec![0],
            ),
            (
                "link down beats syncing",
                vec![c(ReplicaSyncing), c(ReplicaLinkDown), c(Unavailable)],
                vec![1],
            ),
            (
                "syncing still beats nothing",
                vec![c(Unavailable), c(ReplicaSyncing)],
                vec![1],
            ),
            (
                "only one of several equally bad backends serves, lowest index first",
                vec![c(Unavailable), c(ReplicaLinkDown), c(ReplicaLinkDown)],
                vec![1],
            ),
            (
                "among equals the one already serving stays",
                vec![c(ReplicaLinkDown), serving(ReplicaLinkDown)],
                vec![1],
            ),
            (
                "serving does not outweigh badness",
                vec![serving(ReplicaSyncing), c(ReplicaLinkDown)],
                vec![1],
            ),
            (
                "a loading survivor keeps serving rather than a peer catching up",
                vec![serving(Loading), c(CatchingUp)],
                vec![0],
            ),
            (
                "a loading backend is never added",
                vec![c(Loading), c(Unavailable)],
                vec![],
            ),
            (
                "a node catching up never serves, not even alone",
                vec![serving(CatchingUp), c(Unavailable)],
                vec![],
            ),
            (
                "a survivor syncing from the rejoiner beats the rejoiner",
                vec![c(CatchingUp), serving(ReplicaSyncing)],
                vec![1],
            ),
            (
                "unavailable never serves, even as the last one",
                vec![serving(Unavailable), c(Unavailable)],
                vec![],
            ),
        ];
        for (name, candidates, expected) in cases {
            assert_eq!(&select_serving(candidates), expected, "{name}");
        }
    }

    /// Exhaustive over every combination of three backends: the invariants
    /// hold whatever the states.
    #[test]
    fn invariants_over_all_states() {
        let states = [
            Ready,
            ReplicaLinkDown,
            ReplicaSyncing,
            Loading,
            CatchingUp,
            Unavailable,
        ];
        let mut all = Vec::new();
        for b in states {
            all.push(c(b));
            all.push(serving(b));
        }
        for a in &all {
            for b in &all {
                for d in &all {
                    let cands = [*a, *b, *d];
                    let chosen = select_serving(&cands);
                    let any_ready = cands.iter().any(|x| x.badness == Ready);
                    let any_can = cands
                        .iter()
                        .any(|x| x.badness == Ready || x.badness.last_resort(x.serving));
                    // Never empty while something can serve.
                    assert_eq!(chosen.is_empty(), !any_can, "{cands:?}");
                    // Nothing unavailable, and no loading backend that was
                    // not serving, is ever chosen.
                    assert!(chosen
                        .iter()
                        .all(|&i| cands[i].badness.last_resort(cands[i].serving)));
                    if any_ready {
                        assert!(chosen.iter().all(|&i| cands[i].badness == Ready));
                        assert_eq!(
                            chosen.len(),
                            cands.iter().filter(|x| x.badness == Ready).count()
                        );
                    } else {
                        assert!(chosen.len() <= 1);
                        if let Some(&i) = chosen.first() {
                            assert!(cands.iter().all(|x| !x.badness.last_resort(x.serving)
                                || x.badness >= cands[i].badness));
                        }
                    }
                }
            }
        }
    }
}
