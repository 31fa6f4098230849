//! The health-check settings (a `[health]` table in the agent's TOML file)
//! and their validation. Pure: reading the password file is the checker's
//! job ([`super::Checker::from_config`]), not validation's.
//!
//! Why the defaults (100 ms interval, 100 ms timeout, fall 3, rise 2):
//!
//! - A failed backend is out of service at most `fall × interval + timeout`
//!   after it failed ([`HealthConfig::max_detection_time`]): 400 ms, well
//!   inside the 1 s failover budget, which also has to cover the VRRP
//!   master-down time (about 3 × 100 ms + skew) when a whole node dies.
//!   A stopped KeyDB refuses connections at once, so it is out after
//!   `fall × interval` = 300 ms.
//! - A KeyDB on the LAN answers PING and INFO in well under a millisecond,
//!   and in a few milliseconds when saturated; 100 ms is two orders of
//!   magnitude of headroom, and `fall = 3` needs three such stalls in a
//!   row before anything moves, so a busy CPU does not demote backends.
//!   A lost SYN (retransmitted after 1 s, longer than any useful timeout)
//!   costs one failed check, which `fall` absorbs.
//! - `timeout ≤ interval` keeps one check per backend in flight at a time,
//!   which keeps the detection bound above simple and true.
//! - `rise = 2`: a backend returning from a restart serves after two good
//!   checks (200 ms), not after the first PING that happens to pass.
//! - Load: one TCP connection per backend per interval, 10/s per backend
//!   per agent, each leaving a TIME_WAIT socket on the agent's node for a
//!   minute (about 600 per backend): harmless.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::damping::InitialHealth;

/// Default [`HealthConfig::interval_ms`].
pub const DEFAULT_INTERVAL_MS: u64 = 100;
/// Default [`HealthConfig::timeout_ms`].
pub const DEFAULT_TIMEOUT_MS: u64 = 100;
/// Default [`HealthConfig::rise`].
pub const DEFAULT_RISE: u32 = 2;
/// Default [`HealthConfig::fall`].
pub const DEFAULT_FALL: u32 = 3;
/// Shortest interval accepted, milliseconds.
pub const MIN_INTERVAL_MS: u64 = 10;
/// Longest interval accepted, milliseconds (one minute).
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// Largest rise or fall accepted.
pub const MAX_RISE_FALL: u32 = 100;

/// How backends are checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between the starts of two checks of one backend, milliseconds.
    /// 10 to 60000. Default 100.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// A check (connect, AUTH, PING, both INFOs) not finished after this
    /// long fails, milliseconds. 1 to `interval_ms`. Default 100.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive passed checks that bring a backend that is out of
    /// service back in. 1 to 100. Default 2.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failed checks that take a backend out of service.
    /// 1 to 100. Default 3.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// State of a backend before its first check: `"up"`, `"down"` or
    /// `"first-check"` (out of service, and the first check decides without
    /// waiting for `rise`). Default `"first-check"`.
    #[serde(default)]
    pub initial: InitialHealth,
    /// Absolute path of a file holding the password sent with `AUTH`
    /// (KeyDB's `requirepass`); trailing CR/LF are ignored. The password is
    /// never logged. Default: none, no `AUTH` is sent.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_interval_ms() -> u64 {
    DEFAULT_INTERVAL_MS
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_rise() -> u32 {
    DEFAULT_RISE
}
fn default_fall() -> u32 {
    DEFAULT_FALL
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            initial: InitialHealth::default(),
            password_file: None,
        }
    }
}

/// A health setting that is out of range; `field` is the key inside the
/// health table (the caller prefixes the table's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct HealthConfigError {
    /// The field, e.g. `timeout_ms`.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> HealthConfigError {
    HealthConfigError {
        field,
        message: message.into(),
    }
}

impl HealthConfig {
    /// Checks every field's range and their relations.
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(invalid(
                "interval_ms",
                format!(
                    "{} is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS}",
                    self.interval_ms
                ),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(invalid("timeout_ms", "must be at least 1"));
        }
        if self.timeout_ms > self.interval_ms {
            return Err(invalid(
                "timeout_ms",
                format!(
                    "{} exceeds interval_ms ({}): a check must end before the next one starts",
                    self.timeout_ms, self.interval_ms
                ),
            ));
        }
        for (field, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=MAX_RISE_FALL).contains(&value) {
                return Err(invalid(
                    field,
                    format!("{value} is outside 1..={MAX_RISE_FALL}"),
                ));
            }
        }
        if let Some(path) = &self.password_file {
            if !path.is_absolute() {
                return Err(invalid(
                    "password_file",
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        Ok(())
    }

    /// [`interval_ms`](Self::interval_ms) as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// [`timeout_ms`](Self::timeout_ms) as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Longest time from a backend failing to its removal, when checks
    /// start every `interval` and each ends within `timeout`: the failure
    /// may come just after a check passed; the `fall`-th failed check after
    /// it starts `fall` intervals later and ends within `timeout`.
    pub fn max_detection_time(&self) -> Duration {
        self.interval() * self.fall + self.timeout()
    }

    /// Longest time from a backend becoming ready to its return to
    /// service (after it has been out): `rise` intervals plus a timeout.
    pub fn max_recovery_time(&self) -> Duration {
        self.interval() * self.rise + self.timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HealthConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, HealthConfig::default());
        assert_eq!(c.interval(), Duration::from_millis(100));
        assert_eq!(c.timeout(), Duration::from_millis(100));
        assert_eq!((c.rise, c.fall), (2, 3));
        assert_eq!(c.initial, InitialHealth::FirstCheck);
        assert_eq!(c.password_file, None);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn default_failover_fits_the_budget() {
        let c = HealthConfig::default();
        assert_eq!(c.max_detection_time(), Duration::from_millis(400));
        assert!(c.max_detection_time() < Duration::from_millis(500));
        assert_eq!(c.max_recovery_time(), Duration::from_millis(300));
    }

    #[test]
    fn parses_every_field() {
        let c = parse(
            "interval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 5\n\
             initial = \"down\"\npassword_file = \"/etc/balancer/keydb.pass\"\n",
        )
        .unwrap();
        assert_eq!(c.interval_ms, 200);
        assert_eq!(c.timeout_ms, 150);
        assert_eq!((c.rise, c.fall), (1, 5));
        assert_eq!(c.initial, InitialHealth::Down);
        assert_eq!(
            c.password_file.as_deref(),
            Some(std::path::Path::new("/etc/balancer/keydb.pass"))
        );
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            parse("initial = \"up\"").unwrap().initial,
            InitialHealth::Up
        );
        assert_eq!(
            parse("initial = \"first-check\"").unwrap().initial,
            InitialHealth::FirstCheck
        );
    }

    #[test]
    fn rejects_unknown_fields_and_values() {
        let e = parse("intervall_ms = 100").unwrap_err().to_string();
        assert!(e.contains("intervall_ms"), "{e}");
        assert!(parse("initial = \"maybe\"").is_err());
        assert!(parse("rise = -1").is_err());
        assert!(parse("password = \"secret\"").is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let cases: &[(&str, &str)] = &[
            ("interval_ms = 9", "interval_ms"),
            ("interval_ms = 60001", "interval_ms"),
            ("timeout_ms = 0", "timeout_ms"),
            ("timeout_ms = 101", "timeout_ms"),
            ("interval_ms = 50", "timeout_ms"),
            ("rise = 0", "rise"),
            ("rise = 101", "rise"),
            ("fall = 0", "fall"),
            ("fall = 1000", "fall"),
            ("password_file = \"keydb.pass\"", "password_file"),
            ("password_file = \"\"", "password_file"),
        ];
        for (text, field) in cases {
            let err = parse(text).unwrap().validate().unwrap_err();
            assert_eq!(err.field, *field, "{text}: {err}");
        }
    }

    #[test]
    fn validate_accepts_the_edges() {
        for text in [
            "interval_ms = 10\ntimeout_ms = 10",
            "interval_ms = 60000\ntimeout_ms = 60000",
            "timeout_ms = 1",
            "rise = 1\nfall = 1",
            "rise = 100\nfall = 100",
        ] {
            assert_eq!(parse(text).unwrap().validate(), Ok(()), "{text}");
        }
    }
}
