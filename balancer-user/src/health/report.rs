//! What the health monitor knows, published for the admin interface
//! (`balancer status`, the metrics endpoint): per distinct backend its
//! damped state and since when, how many checks ran and failed (by reason),
//! and what the last failed check found.
//!
//! The monitor ([`super::monitor::run`]) updates a [`HealthReport`] in a
//! `watch` channel after every check; subscribers are woken only when a
//! damped state or the node's readiness changes, the counters move
//! silently. Not here: the READY sets (the data plane's `SERVICES` map is
//! the truth for those) or any decision.

use std::{net::SocketAddrV4, time::SystemTime};

use super::{Badness, NotReady, Probe};

/// Every backend the monitor checks, and the node's readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// One per distinct backend address, in the order the monitor checks
    /// them.
    pub backends: Vec<BackendReport>,
    /// What the election's priority follows ([`super::monitor::node_ready`]);
    /// false until the first checks are done.
    pub node_ready: bool,
    /// Every backend has had its first check and the first READY sets were
    /// written.
    pub started: bool,
}

impl HealthReport {
    /// The report of the backend at `addr`.
    pub fn backend(&self, addr: SocketAddrV4) -> Option<&BackendReport> {
        self.backends.iter().find(|b| b.addr == addr)
    }
}

/// A check that did not find the backend READY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedCheck {
    /// When the check ended.
    pub at: SystemTime,
    /// [`NotReady::kind`].
    pub kind: &'static str,
    /// [`NotReady`]'s message, e.g. "connection refused".
    pub reason: String,
}

/// One backend's health as the monitor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendReport {
    pub addr: SocketAddrV4,
    /// On this node.
    pub local: bool,
    /// The damped state (before the first check: the configured initial
    /// state).
    pub badness: Badness,
    /// When `badness` last changed (the first check counts as a change).
    pub since: Option<SystemTime>,
    /// Checks run.
    pub checks: u64,
    /// Failed checks, by [`NotReady::kind_index`].
    pub failures: [u64; NotReady::KINDS.len()],
    /// When the last check ended.
    pub last_check: Option<SystemTime>,
    /// The last check failed.
    pub last_check_failed: bool,
    /// The last failed check, however long ago.
    pub last_failure: Option<FailedCheck>,
    /// Drained by the operator (`balancer drain`): in no READY set,
    /// whatever its health; its established flows stay.
    pub drained: bool,
    /// Bytes of a peer's replication stream still to apply, when the last
    /// check found it catching up and the bytes were known.
    pub behind_bytes: Option<u64>,
}

impl BackendReport {
    /// A backend not checked yet, in its initial damped state.
    pub fn new(addr: SocketAddrV4, local: bool, badness: Badness) -> BackendReport {
        BackendReport {
            addr,
            local,
            badness,
            since: None,
            checks: 0,
            failures: [0; NotReady::KINDS.len()],
            last_check: None,
            last_check_failed: false,
            last_failure: None,
            drained: false,
            behind_bytes: None,
        }
    }

    /// Records one check ending at `at`, after which the damped state is
    /// `badness`. True when the damped state changed (or this was the
    /// first check).
    pub fn record(&mut self, probe: &Probe, badness: Badness, at: SystemTime) -> bool {
        let first = self.checks == 0;
        self.checks += 1;
        self.last_check = Some(at);
        self.last_check_failed = !probe.is_ready();
        self.behind_bytes = match probe.reason() {
            Some(NotReady::CatchingUp { bytes, .. }) => *bytes,
            _ => None,
        };
        if let Some(reason) = probe.reason() {
            if let Some(count) = self.failures.get_mut(reason.kind_index()) {
                *count += 1;
            }
            self.last_failure = Some(FailedCheck {
                at,
                kind: reason.kind(),
                reason: reason.to_string(),
            });
        }
        let changed = first || badness != self.badness;
        if changed {
            self.badness = badness;
            self.since = Some(at);
        }
        changed
    }

    /// Checked at least once and READY (damped).
    pub fn is_ready(&self) -> bool {
        self.checks > 0 && self.badness == Badness::Ready
    }

    /// Failed checks, all reasons.
    pub fn failed_checks(&self) -> u64 {
        self.failures.iter().sum()
    }

    /// `(kind, count)` for every reason, zeros included, in
    /// [`NotReady::KINDS`] order.
    pub fn failures_by_kind(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        NotReady::KINDS
            .iter()
            .copied()
            .zip(self.failures.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::health::Readiness;

    fn probe(readiness: Readiness) -> Probe {
        Probe {
            readiness,
            role: None,
            elapsed: Duration::from_millis(1),
            info: None,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn counts_checks_and_failures_and_keeps_the_last_failure() {
        let mut b = BackendReport::new(
            "198.18.0.2:6380".parse().unwrap(),
            false,
            Badness::Unavailable,
        );
        assert!(!b.is_ready());
        assert!(
            b.record(&probe(Readiness::Ready), Badness::Ready, at(1)),
            "first check"
        );
        assert!(b.is_ready());
        assert_eq!(b.since, Some(at(1)));
        let refused = probe(Readiness::NotReady(NotReady::Refused));
        assert!(
            !b.record(&refused, Badness::Ready, at(2)),
            "damped: still READY"
        );
        assert!(b.last_check_failed);
        assert!(b.record(&refused, Badness::Unavailable, at(3)));
        assert_eq!(b.since, Some(at(3)));
        assert!(!b.is_ready());
        let loading = probe(Readiness::NotReady(NotReady::LoadingFlag));
        assert!(!b.record(&loading, Badness::Unavailable, at(4)));
        assert_eq!(b.checks, 4);
        assert_eq!(b.failed_checks(), 3);
        let by_kind: Vec<_> = b.failures_by_kind().filter(|(_, n)| *n > 0).collect();
        assert_eq!(by_kind, vec![("refused", 2), ("loading", 1)]);
        let last = b.last_failure.clone().unwrap();
        assert_eq!((last.at, last.kind), (at(4), "loading"));
        assert_eq!(last.reason, "dataset loading (loading:1)");
        assert!(!b.record(&probe(Readiness::Ready), Badness::Unavailable, at(5)));
        assert!(!b.last_check_failed);
        assert_eq!(b.last_failure.unwrap().at, at(4), "kept after a good check");
    }

    #[test]
    fn bytes_behind_follow_the_last_check() {
        let mut b = BackendReport::new(
            "198.18.0.2:6380".parse().unwrap(),
            false,
            Badness::Unavailable,
        );
        assert_eq!(b.behind_bytes, None);
        let behind = probe(Readiness::NotReady(NotReady::CatchingUp {
            peer: "198.18.0.1:6380".parse().unwrap(),
            bytes: Some(1_234_567),
            why: crate::health::catchup::Behind::Offsets,
        }));
        b.record(&behind, Badness::CatchingUp, at(1));
        assert_eq!(b.behind_bytes, Some(1_234_567));
        b.record(&probe(Readiness::Ready), Badness::CatchingUp, at(2));
        assert_eq!(
            b.behind_bytes, None,
            "only while the last check found it behind"
        );
    }
}
