//! KeyDB-aware health checks: is each backend fit to take new connections?
//!
//! The pieces, from the wire up:
//!
//! - [`Checker`] (a [`HealthCheck`]) checks one backend once: TCP connect,
//!   optional `AUTH`, `PING`, `INFO persistence`, `INFO replication`, all
//!   within one timeout, and returns a [`Probe`]: READY, or [`NotReady`]
//!   with the reason. KeyDB answers PING while loading its dataset, so the
//!   INFO fields (`loading`, `role`, `master_link_status`,
//!   `master_sync_in_progress`) decide, not PING.
//! - [`catchup`] turns a READY probe of a replica into NOT READY
//!   ("catching up") until it has applied its peers' streams up to an
//!   offset sampled after its link came up (docs/readiness.md).
//! - [`BackendHealth`] damps a backend's probes with rise/fall counters
//!   ([`Damping`]) into a [`Badness`].
//! - [`select_serving`] turns the badness of every backend of a service
//!   into the set that gets new connections: the READY ones, or, when none
//!   is, the single least bad one that can still answer, so a replication
//!   link alone never takes the last serving node out.
//! - [`HealthConfig`] holds interval, timeout, rise, fall, initial state
//!   and the password file, with a pure `validate()`.
//! - [`fake`] is a RESP-speaking fake KeyDB for tests.
//! - [`monitor`] runs it all: one check loop per backend, the sets written
//!   to the data plane, backends that left a set handed to the flow reset,
//!   the node's readiness published for the election, and a [`report`] of
//!   every backend for the admin interface.
//!
//! Checks run in the agent's tokio runtime; everything after the probe is
//! pure. Not here: the election priority penalty (the election reads the
//! monitor's readiness signal).

pub mod catchup;
mod check;
mod config;
mod damping;
pub mod fake;
pub mod info;
pub mod monitor;
mod policy;
pub mod report;
pub mod resp;

#[cfg(test)]
mod redis_tests;
#[cfg(test)]
mod tests;

pub use check::{
    Checker, HealthCheck, NotReady, Password, PasswordError, Probe, ProbeInfo, Readiness, Stage,
    MAX_PASSWORD_LEN,
};
pub use config::{
    HealthConfig, HealthConfigError, DEFAULT_FALL, DEFAULT_INTERVAL_MS, DEFAULT_RISE,
    DEFAULT_TIMEOUT_MS, MAX_INTERVAL_MS, MAX_RISE_FALL, MIN_INTERVAL_MS,
};
pub use damping::{BackendHealth, BadnessChange, Damping, Health, InitialHealth};
pub use info::{LinkState, Role};
pub use policy::{select_serving, Badness, Candidate};
pub use report::{BackendReport, FailedCheck, HealthReport};
