//! systemd's notify protocol (`Type=notify`, `WatchdogSec=`), through the
//! `sd-notify` crate. Outside systemd (no `NOTIFY_SOCKET`) every call does
//! nothing.
//!
//! - [`ready`] once the data plane is attached, the election runs and the
//!   first health checks have set the READY sets (the moment the agent pins
//!   its XDP link): `systemctl start` returns then, and units ordered
//!   after `balancer.service` start against a serving node.
//! - [`Watchdog`]: with `WatchdogSec=` set, `WATCHDOG=1` at half the
//!   interval from a task on the agent's runtime. If the runtime stops
//!   making progress, the pings stop and systemd kills and restarts the
//!   agent; the new agent clears what the old one left (pins, VIPs).
//! - [`stopping`] when a stop begins.
//!
//! Child processes (the notify command, `ss`) must not inherit the
//! protocol's variables: [`CHILD_ENV_REMOVE`].

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The variables children must not inherit: with them, a notify script
/// that happens to call `systemd-notify` would speak for the agent.
pub const CHILD_ENV_REMOVE: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Never ping more often than this, whatever `WatchdogSec=` says.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(50);

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        // Not fatal: systemd notices a missing READY (start timeout) or
        // missing pings (watchdog) on its own.
        warn!(%error, "cannot notify the service manager");
    }
}

/// Tells systemd the agent serves; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the agent is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// How often to ping for a watchdog interval of `watchdog`: half of it (as
/// sd_watchdog_enabled(3) advises), but not more often than
/// [`MIN_PING_INTERVAL`].
pub fn ping_interval(watchdog: Duration) -> Duration {
    (watchdog / 2).max(MIN_PING_INTERVAL)
}

/// The watchdog pinger; pings stop when it is dropped.
#[derive(Debug)]
pub struct Watchdog(JoinHandle<()>);

impl Watchdog {
    /// Starts pinging if systemd asked for it (`WATCHDOG_USEC`, and
    /// `WATCHDOG_PID` unset or this process). Needs a tokio runtime.
    pub fn start() -> Option<Watchdog> {
        let interval = ping_interval(sd_notify::watchdog_enabled()?);
        debug!(?interval, "pinging the systemd watchdog");
        Some(Watchdog(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                send(&[NotifyState::Watchdog]);
            }
        })))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_interval_but_not_too_often() {
        assert_eq!(
            ping_interval(Duration::from_secs(5)),
            Duration::from_millis(2500)
        );
        assert_eq!(
            ping_interval(Duration::from_millis(300)),
            Duration::from_millis(150)
        );
        assert_eq!(ping_interval(Duration::from_micros(1)), MIN_PING_INTERVAL);
        assert_eq!(ping_interval(Duration::ZERO), MIN_PING_INTERVAL);
    }
}
