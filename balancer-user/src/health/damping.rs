//! Rise/fall damping of check results, so that one lost SYN or one slow
//! reply does not move a backend in or out of service.
//!
//! [`Damping`] is the classic counter (HAProxy's `rise`/`fall`, pingora's
//! `observe_health`): a backend that is up goes down after `fall`
//! consecutive failed checks, one that is down comes up after `rise`
//! consecutive passed checks. [`BackendHealth`] runs two of them per
//! backend to damp the three-level outcome the replication policy needs.
//! Pure state machines: results in, flips out; no clock, no I/O.

use serde::Deserialize;

use super::policy::Badness;

/// A backend's damped state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// In service.
    Up,
    /// Out of service.
    Down,
}

/// The state a backend starts in, before its checks have said anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitialHealth {
    /// Up: serves until `fall` checks fail.
    Up,
    /// Down: serves once `rise` checks pass.
    Down,
    /// Down, but the first check's result is taken as is: one pass brings
    /// the backend up at once. An agent (re)start then neither routes to a
    /// backend it has not checked nor waits `rise` intervals to serve.
    #[default]
    FirstCheck,
}

/// Rise/fall counter for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damping {
    rise: u32,
    fall: u32,
    health: Health,
    /// Consecutive results contradicting `health`.
    streak: u32,
    /// [`InitialHealth::FirstCheck`] and nothing observed yet.
    first: bool,
}

impl Damping {
    /// A counter with the given thresholds (0 is taken as 1).
    pub fn new(rise: u32, fall: u32, initial: InitialHealth) -> Self {
        Damping {
            rise: rise.max(1),
            fall: fall.max(1),
            health: match initial {
                InitialHealth::Up => Health::Up,
                InitialHealth::Down | InitialHealth::FirstCheck => Health::Down,
            },
            streak: 0,
            first: initial == InitialHealth::FirstCheck,
        }
    }

    /// Feeds one check result; returns the new state when it flipped.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        let first = std::mem::take(&mut self.first);
        let agrees = (self.health == Health::Up) == ok;
        if agrees {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let threshold = match self.health {
            Health::Up => self.fall,
            Health::Down if first => 1,
            Health::Down => self.rise,
        };
        if self.streak < threshold {
            return None;
        }
        self.streak = 0;
        self.health = if ok { Health::Up } else { Health::Down };
        Some(self.health)
    }

    /// The current state.
    pub fn health(&self) -> Health {
        self.health
    }

    /// The current state is [`Health::Up`].
    pub fn is_up(&self) -> bool {
        self.health == Health::Up
    }
}

/// A change of a backend's damped [`Badness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadnessChange {
    /// Before the check.
    pub old: Badness,
    /// After it.
    pub new: Badness,
}

/// The damped health of one backend, as the replication policy needs it.
///
/// Two counters with the same rise/fall: `ready` counts checks that found
/// the backend [`Badness::Ready`], `usable` those that found it able to
/// answer clients at all (ready, or a replica whose link is down or
/// syncing). The damped badness is `Ready` while `ready` is up, else the
/// replication state last seen while `usable` is up, else `Unavailable`.
/// Since every ready check is also a usable one, `ready` up implies
/// `usable` up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    ready: Damping,
    usable: Damping,
    /// The replication state of the last check that found the backend
    /// usable but not ready.
    lagging: Badness,
}

impl BackendHealth {
    /// A backend in `initial` state with the given thresholds.
    pub fn new(rise: u32, fall: u32, initial: InitialHealth) -> Self {
        BackendHealth {
            ready: Damping::new(rise, fall, initial),
            usable: Damping::new(rise, fall, initial),
            lagging: Badness::ReplicaLinkDown,
        }
    }

    /// Feeds the badness one check found (`Probe::badness`); returns the
    /// change of the damped badness, if any.
    pub fn observe(&mut self, found: Badness) -> Option<BadnessChange> {
        let old = self.badness();
        self.ready.observe(found == Badness::Ready);
        self.usable.observe(found.can_serve());
        if found.can_serve() && found != Badness::Ready {
            self.lagging = found;
        }
        let new = self.badness();
        (new != old).then_some(BadnessChange { old, new })
    }

    /// The damped badness.
    pub fn badness(&self) -> Badness {
        if self.ready.is_up() {
            Badness::Ready
        } else if self.usable.is_up() {
            self.lagging
        } else {
            Badness::Unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Badness::*;
    use super::*;

    fn run(d: &mut Damping, results: &str) -> String {
        results
            .chars()
            .map(|c| match d.observe(c == '+') {
                Some(Health::Up) => 'U',
                Some(Health::Down) => 'D',
                None => '.',
            })
            .collect()
    }

    #[test]
    fn falls_after_fall_consecutive_failures() {
        let mut d = Damping::new(2, 3, InitialHealth::Up);
        assert_eq!(run(&mut d, "--+--+---"), "........D");
        assert_eq!(d.health(), Health::Down);
    }

    #[test]
    fn rises_after_rise_consecutive_passes() {
        let mut d = Damping::new(2, 3, InitialHealth::Down);
        assert_eq!(run(&mut d, "+-+-++"), ".....U");
        assert!(d.is_up());
    }

    #[test]
    fn flaps_are_absorbed() {
        let mut d = Damping::new(2, 3, InitialHealth::Up);
        assert_eq!(run(&mut d, "-+-+--+-+-"), "..........");
        assert!(d.is_up());
    }

    #[test]
    fn full_cycle() {
        let mut d = Damping::new(2, 3, InitialHealth::Up);
        assert_eq!(run(&mut d, "+++---++--++---"), ".....D.U......D");
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut d = Damping::new(1, 1, InitialHealth::Down);
        assert_eq!(run(&mut d, "+-+--++"), "UDUD.U.");
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut d = Damping::new(0, 0, InitialHealth::Up);
        assert_eq!(run(&mut d, "-+"), "DU");
    }

    #[test]
    fn first_check_decides_at_once_then_damps() {
        let mut d = Damping::new(3, 3, InitialHealth::FirstCheck);
        assert!(!d.is_up());
        assert_eq!(run(&mut d, "+"), "U");
        assert_eq!(run(&mut d, "--+---"), ".....D");
        assert_eq!(
            run(&mut d, "++"),
            "..",
            "rise applies after the first check"
        );

        let mut d = Damping::new(3, 3, InitialHealth::FirstCheck);
        assert_eq!(run(&mut d, "-"), ".", "a failed first check leaves it down");
        assert_eq!(run(&mut d, "+++"), "..U", "and rise applies from then on");
    }

    #[test]
    fn initial_down_needs_rise() {
        let mut d = Damping::new(3, 3, InitialHealth::Down);
        assert_eq!(run(&mut d, "+++"), "..U");
    }

    fn feed(h: &mut BackendHealth, found: &[Badness]) -> Vec<Badness> {
        found
            .iter()
            .map(|&b| {
                h.observe(b);
                h.badness()
            })
            .collect()
    }

    #[test]
    fn backend_ready_then_dead() {
        let mut h = BackendHealth::new(2, 3, InitialHealth::FirstCheck);
        assert_eq!(h.badness(), Unavailable);
        assert_eq!(
            h.observe(Ready),
            Some(BadnessChange {
                old: Unavailable,
                new: Ready
            })
        );
        assert_eq!(
            feed(&mut h, &[Unavailable, Unavailable, Unavailable]),
            [Ready, Ready, Unavailable]
        );
    }

    #[test]
    fn backend_link_goes_down_then_dies() {
        let mut h = BackendHealth::new(2, 3, InitialHealth::Up);
        // Link down: after `fall` checks it is no longer ready, but usable.
        assert_eq!(
            feed(&mut h, &[ReplicaLinkDown, ReplicaLinkDown, ReplicaLinkDown]),
            [Ready, Ready, ReplicaLinkDown]
        );
        // Then it stops answering: usable falls `fall` checks later.
        assert_eq!(
            feed(&mut h, &[Unavailable, Unavailable, Unavailable]),
            [ReplicaLinkDown, ReplicaLinkDown, Unavailable]
        );
    }

    #[test]
    fn backend_rejoins_through_sync() {
        let mut h = BackendHealth::new(2, 3, InitialHealth::FirstCheck);
        assert_eq!(
            feed(
                &mut h,
                &[
                    Unavailable,
                    ReplicaSyncing,
                    ReplicaSyncing,
                    ReplicaLinkDown,
                    Ready,
                    Ready
                ]
            ),
            [
                Unavailable,
                Unavailable,
                ReplicaSyncing,
                ReplicaLinkDown,
                ReplicaLinkDown,
                Ready
            ]
        );
    }

    #[test]
    fn first_check_lagging_is_usable_at_once() {
        let mut h = BackendHealth::new(2, 3, InitialHealth::FirstCheck);
        assert_eq!(
            h.observe(ReplicaLinkDown),
            Some(BadnessChange {
                old: Unavailable,
                new: ReplicaLinkDown
            })
        );
    }

    #[test]
    fn a_single_bad_check_changes_nothing() {
        let mut h = BackendHealth::new(2, 3, InitialHealth::Up);
        for b in [Unavailable, ReplicaSyncing, ReplicaLinkDown] {
            assert_eq!(h.observe(b), None);
            assert_eq!(h.observe(Ready), None);
        }
        assert_eq!(h.badness(), Ready);
    }

    /// `ready` up implies `usable` up, whatever the sequence.
    #[test]
    fn ready_implies_usable() {
        let all = [Ready, ReplicaLinkDown, ReplicaSyncing, Unavailable];
        let mut seed = 0x853c_49e6_748f_ea9b_u64;
        for initial in [
            InitialHealth::Up,
            InitialHealth::Down,
            InitialHealth::FirstCheck,
        ] {
            for (rise, fall) in [(1, 1), (2, 3), (3, 2)] {
                let mut h = BackendHealth::new(rise, fall, initial);
                for _ in 0..2000 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    h.observe(all[(seed % 4) as usize]);
                    assert!(!h.ready.is_up() || h.usable.is_up());
                }
            }
        }
    }
}
