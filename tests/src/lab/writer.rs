//! The client "writer loop" of the failover tests and the demo: a thread in
//! the client's namespace that writes through the VIP every few
//! milliseconds, reconnecting at once after any error, and keeps the
//! timestamp of every successful write, failed command and connect.
//!
//! What a client of the cluster experiences during a failover is then
//! measured from those timestamps ([`WriterLoop::report`]): the longest gap
//! between two successful writes, how many commands failed and how many
//! times it had to reconnect. Nothing here sleeps to synchronise with the
//! lab: the loop paces itself, the test reads the record.

use std::{
    fmt,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{spawn_in_netns, vip_keydb};
use crate::{
    netns::Netns,
    resp::{Connection, RespError},
};

/// How the writer loop writes.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Where it connects: the VIP's service address by default.
    pub target: SocketAddr,
    /// Time between the starts of two writes (2 ms).
    pub interval: Duration,
    /// Timeout of each connect, write and read (100 ms): a command that is
    /// not answered within it counts as failed and the connection is
    /// dropped and made anew, as a client with a short timeout would.
    pub timeout: Duration,
    /// The key it `SET`s (to an increasing counter).
    pub key: String,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            target: vip_keydb(),
            interval: Duration::from_millis(2),
            timeout: Duration::from_millis(100),
            key: format!("writer:{}", std::process::id()),
        }
    }
}

/// One failed command or one connect attempt.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: Instant,
    pub ok: bool,
    /// The error, or the local address of a new connection.
    pub detail: String,
}

#[derive(Debug, Default)]
struct Record {
    writes: Vec<Instant>,
    failures: Vec<Event>,
    connects: Vec<Event>,
}

/// A running writer loop; stopped (and its thread joined) by
/// [`WriterLoop::stop`] or on drop.
#[derive(Debug)]
pub struct WriterLoop {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    thread: Option<JoinHandle<Result<()>>>,
    started: Instant,
}

impl WriterLoop {
    /// Starts the loop on a thread inside `client`'s namespace.
    pub fn start(client: &Netns, config: WriterConfig) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Record::default()));
        let started = Instant::now();
        let thread = {
            let stop = stop.clone();
            let record = record.clone();
            spawn_in_netns(client, "writer-loop", move || {
                write_until(&config, &stop, &record);
            })?
        };
        Ok(WriterLoop {
            stop,
            record,
            thread: Some(thread),
            started,
        })
    }

    /// When the loop started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits until `count` writes have succeeded after this call (proves
    /// the path through the VIP works right now).
    pub fn wait_for_writes(&self, count: usize, timeout: Duration) -> Result<()> {
        let from = Instant::now();
        let deadline = from + timeout;
        loop {
            let report = self.report(from, Instant::now());
            if report.writes >= count {
                return Ok(());
            }
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                bail!("the writer loop thread ended: {report}");
            }
            if Instant::now() >= deadline {
                bail!("the writer loop did not make {count} writes within {timeout:?}: {report}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What happened between `from` and `to`.
    pub fn report(&self, from: Instant, to: Instant) -> WriterReport {
        let record = self.lock();
        WriterReport::of(&record, from, to, self.started)
    }

    /// What happened from `from` until now.
    pub fn report_since(&self, from: Instant) -> WriterReport {
        self.report(from, Instant::now())
    }

    /// Stops the loop; the report of its whole run.
    pub fn stop(mut self) -> Result<WriterReport> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("writer loop thread panicked"))?
                .context("writer loop thread")?;
        }
        let record = self.lock();
        Ok(WriterReport::of(
            &record,
            self.started,
            Instant::now(),
            self.started,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for WriterLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_until(config: &WriterConfig, stop: &AtomicBool, record: &Mutex<Record>) {
    let log = |f: &mut dyn FnMut(&mut Record)| {
        let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
    };
    let mut conn: Option<Connection> = None;
    let mut counter: u64 = 0;
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match Connection::connect(config.target, config.timeout) {
                Ok(c) => {
                    let detail = c.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    let at = Instant::now();
                    log(&mut |r| {
                        r.connects.push(Event {
                            at,
                            ok: true,
                            detail: detail.clone(),
                        })
                    });
                    conn = Some(c);
                }
                Err(e) => {
                    let at = Instant::now();
                    let detail = describe(&e);
                    log(&mut |r| {
                        r.connects.push(Event {
                            at,
                            ok: false,
                            detail: detail.clone(),
                        })
                    });
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            counter += 1;
            match c.set(&config.key, &counter.to_string()) {
                Ok(()) => {
                    let at = Instant::now();
                    log(&mut |r| r.writes.push(at));
                }
                Err(e) => {
                    let at = Instant::now();
                    let detail = describe(&e);
                    log(&mut |r| {
                        r.failures.push(Event {
                            at,
                            ok: false,
                            detail: detail.clone(),
                        })
                    });
                    conn = None;
                }
            }
        }
        next += config.interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// A short name for a client-side error.
pub fn describe(e: &RespError) -> String {
    let io = match e {
        RespError::Connect { source, .. } | RespError::Io(source) => source,
        other => return other.to_string(),
    };
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timed out".into(),
        std::io::ErrorKind::BrokenPipe => "broken pipe".into(),
        _ => io.to_string(),
    }
}

/// What the writer loop saw in a time window.
#[derive(Clone, Debug)]
pub struct WriterReport {
    /// The window's length.
    pub window: Duration,
    /// Successful writes in the window.
    pub writes: usize,
    /// Commands that failed (error reply, reset, end of stream, timeout).
    pub failed_commands: usize,
    /// New connections made in the window (each after a failure, except
    /// the very first of the run).
    pub connects: usize,
    /// Connect attempts that failed in the window.
    pub failed_connects: usize,
    /// The longest time between two successful writes that overlaps the
    /// window (an outage still going on at its end counts up to the end).
    pub longest_gap: Duration,
    /// Where that gap lies, as offsets from the loop's start.
    pub longest_gap_span: (Duration, Duration),
    /// Failed commands and connects in the window, in order, with their
    /// offset from the loop's start (at most 20).
    pub errors: Vec<(Duration, String)>,
}

impl WriterReport {
    fn of(record: &Record, from: Instant, to: Instant, started: Instant) -> Self {
        let in_window = |t: &Instant| *t >= from && *t <= to;
        // The last success at or before `from` (or `from` itself), every
        // success inside, and `to`.
        let before = record
            .writes
            .iter()
            .rev()
            .find(|t| **t <= from)
            .copied()
            .unwrap_or(from);
        let mut points = vec![before];
        points.extend(record.writes.iter().filter(|t| **t > from && **t <= to));
        points.push(to);
        let (longest_gap, span) = points
            .windows(2)
            .map(|w| (w[1].saturating_duration_since(w[0]), (w[0], w[1])))
            .max_by_key(|(gap, _)| *gap)
            .unwrap_or((Duration::ZERO, (from, to)));
        let offset = |t: Instant| t.saturating_duration_since(started);
        let mut errors: Vec<(Duration, String)> = record
            .failures
            .iter()
            .filter(|e| in_window(&e.at))
            .map(|e| (offset(e.at), format!("command: {}", e.detail)))
            .chain(
                record
                    .connects
                    .iter()
                    .filter(|e| !e.ok && in_window(&e.at))
                    .map(|e| (offset(e.at), format!("connect: {}", e.detail))),
            )
            .collect();
        errors.sort_by_key(|(t, _)| *t);
        errors.truncate(20);
        WriterReport {
            window: to.saturating_duration_since(from),
            writes: record.writes.iter().filter(|t| in_window(t)).count(),
            failed_commands: record.failures.iter().filter(|e| in_window(&e.at)).count(),
            connects: record
                .connects
                .iter()
                .filter(|e| e.ok && in_window(&e.at))
                .count(),
            failed_connects: record
                .connects
                .iter()
                .filter(|e| !e.ok && in_window(&e.at))
                .count(),
            longest_gap,
            longest_gap_span: (offset(span.0), offset(span.1)),
            errors,
        }
    }
}

impl fmt::Display for WriterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} writes in {:.2} s, longest gap {:.1} ms (from +{:.3} s to +{:.3} s), \
             {} failed commands, {} new connections, {} failed connects",
            self.writes,
            self.window.as_secs_f64(),
            self.longest_gap.as_secs_f64() * 1000.0,
            self.longest_gap_span.0.as_secs_f64(),
            self.longest_gap_span.1.as_secs_f64(),
            self.failed_commands,
            self.connects,
            self.failed_connects,
        )?;
        if !self.errors.is_empty() {
            let shown: Vec<String> = self
                .errors
                .iter()
                .map(|(t, e)| format!("+{:.3} s {e}", t.as_secs_f64()))
                .collect();
            write!(f, "; errors: {}", shown.join(", "))?;
        }
        Ok(())
    }
}
