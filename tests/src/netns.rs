//! Network namespaces for tests: created by the test, deleted on drop (also
//! when an assertion fails), and helpers to run commands or code inside.
//!
//! Only ever give interfaces in these namespaces addresses from
//! 198.18.0.0/15 (RFC 2544 benchmarking range).

use std::{
    fs::File,
    os::fd::AsFd,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A short name prefix unique to this process and call, so labs of tests
/// running in parallel threads never collide (`ip netns` names and the
/// interface names derived from them must stay short).
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("bl{tag}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out: Output = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace that exists while this value lives.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME` and brings its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        // A leftover of a crashed earlier run with the same name goes first.
        let _ = run("ip", &["netns", "del", name]);
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `ARGS...` inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c.stdin(Stdio::null());
        c
    }

    /// Starts `ARGS...` inside the namespace; killed when the guard drops.
    pub fn spawn(&self, args: &[&str]) -> Result<ChildGuard> {
        let mut c = self.command(args[0]);
        c.args(&args[1..]);
        let child = c
            .spawn()
            .with_context(|| format!("spawn {:?} in {}", args, self.name))?;
        Ok(ChildGuard::new(child))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Runs `f` on a new thread that has entered this namespace (setns moves
    /// only the calling thread, so never the caller's own thread).
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        std::thread::spawn(move || -> Result<R> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs in there, then delete it.
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard { child: Some(child) }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// Sends `signal` and waits for the process to exit; returns its status.
    pub fn stop(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        unsafe { libc::kill(child.id() as i32, signal) };
        Ok(child.wait()?)
    }

    /// Sends `signal` and waits up to `timeout` for the process to exit;
    /// past the deadline it is killed (SIGKILL) and this fails.
    pub fn stop_within(&mut self, signal: i32, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "pid {} still running {timeout:?} after signal {signal}; killed",
                    child.id()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process has exited (never blocks).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("already stopped"),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
