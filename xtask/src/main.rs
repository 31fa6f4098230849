//! Project tasks: `cargo xtask <command>`. Every command that needs system
//! packages or the eBPF toolchain runs `scripts/setup.sh` first (idempotent).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo the balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, rust-src, bpf-linker, bpffs).
    Setup,
    /// Build the XDP object into target/bpf/balancer.bpf.o.
    BuildEbpf {
        /// Accepted for symmetry; the object is always optimised (the
        /// verifier needs it).
        #[arg(long)]
        release: bool,
    },
    /// Build the XDP object, the agent and the test support binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Install what is missing, build, and run every test.
    Test {
        /// Extra arguments passed to `cargo test` after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install what is missing, build, and run the namespace lab demo.
    Demo,
    /// Build the Debian package target/debian/balancer_<version>_<arch>.deb
    /// (release binary with the XDP object embedded, systemd unit, example
    /// config as a conffile, shell completions).
    Deb,
    /// Run every fuzz target under fuzz/ (cargo fuzz, libFuzzer) for a
    /// bounded time; fails on any crash. `cargo xtask test` runs it too.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = FUZZ_SECONDS)]
        seconds: u64,
    },
    /// Install what is missing, build, and benchmark: per-packet cost,
    /// redis-benchmark direct / through XDP / through HAProxy, CPU, failover
    /// against keepalived + HAProxy, connection churn against HAProxy and
    /// nftables, a reconnect storm. Writes
    /// bench/results/ (release build); --quick: target/bench-quick/ (debug).
    Bench {
        /// Tiny counts and one round: a smoke run of every code path.
        #[arg(long)]
        quick: bool,
        /// Run only these parts, comma-separated: packet, lab, failover,
        /// churn, storm (passed to the bench binary's `--only`).
        #[arg(long, value_name = "PART[,PART]")]
        only: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.cmd {
        Cmd::Setup => setup(&root),
        Cmd::BuildEbpf { release: _ } => build_ebpf(&root),
        Cmd::Build { release } => {
            setup(&root)?;
            build(&root, release)
        }
        Cmd::Test { args } => {
            setup(&root)?;
            build(&root, false)?;
            lint(&root)?;
            // tests/tests/deb.rs checks the package, built as `cargo xtask
            // deb` builds it.
            deb(&root)?;
            let mut test = cargo(&root);
            // Unit, integration and binary tests; no doc tests (none exist,
            // and their empty runs would close the output).
            test.args([
                "test",
                "--workspace",
                "--no-fail-fast",
                "--lib",
                "--bins",
                "--tests",
            ]);
            if !args.is_empty() {
                test.arg("--").args(args);
            }
            let keydb = keydb(&root)?;
            let path = test_path(keydb.as_deref())?;
            test.env("PATH", path);
            if let Some(server) = &keydb {
                test.env("BALANCER_KEYDB_SERVER", server);
            }
            // Tests that need something missing (KeyDB) append a line
            // here and return; they are counted as skipped, not passed.
            let skips = root.join("target/test-skips");
            std::fs::create_dir_all(root.join("target"))?;
            std::fs::write(&skips, "")?;
            test.env("BALANCER_TEST_SKIPS", &skips);
            let mut tests = run_tests(test)?;
            let skipped = std::fs::read_to_string(&skips).unwrap_or_default();
            let skipped: Vec<&str> = skipped.lines().filter(|l| !l.is_empty()).collect();
            for line in &skipped {
                println!("xtask test: {line}");
            }
            tests.passed = tests.passed.saturating_sub(skipped.len() as u64);
            let fuzz = fuzz(&root, FUZZ_SECONDS)?;
            // A smoke run of the benchmark harness, so it cannot rot; its
            // figures are not judged here.
            let bin = root.join("target/debug");
            let mut bench = Command::new(bin.join("bench"));
            bench
                .env("BALANCER_BIN", bin.join("balancer"))
                .arg("--quick");
            let smoke = run(bench).context("benchmark smoke run (`cargo xtask bench --quick`)");
            // The closing line counts every test binary, and each fuzz
            // target as one test.
            println!(
                "{}",
                summary(
                    tests.passed + fuzz.passed,
                    tests.failed + fuzz.failed,
                    skipped.len() as u64
                )
            );
            tests.result.and(fuzz.result).and(smoke)
        }
        Cmd::Fuzz { seconds } => {
            setup(&root)?;
            build_ebpf(&root)?;
            let fuzz = fuzz(&root, seconds)?;
            println!("xtask fuzz: {} passed, {} failed", fuzz.passed, fuzz.failed);
            fuzz.result
        }
        Cmd::Deb => {
            setup(&root)?;
            build_ebpf(&root)?;
            deb(&root)
        }
        Cmd::Demo => {
            setup(&root)?;
            build(&root, false)?;
            let mut demo = Command::new(root.join("target/debug/demo"));
            demo.env("BALANCER_BIN", root.join("target/debug/balancer"));
            // The demo runs keydb-server when it is on PATH.
            let keydb = keydb(&root)?;
            demo.env("PATH", test_path(keydb.as_deref())?);
            run(demo)
        }
        Cmd::Bench { quick, only } => {
            setup(&root)?;
            // The quick smoke run reuses the debug build `test` makes; the
            // measured run uses release binaries (the figures come from the
            // kernel and external programs either way).
            let profile = if quick { "debug" } else { "release" };
            build(&root, !quick)?;
            let bin = root.join("target").join(profile);
            let mut bench = Command::new(bin.join("bench"));
            bench.env("BALANCER_BIN", bin.join("balancer"));
            if quick {
                bench.arg("--quick");
            }
            if let Some(parts) = only {
                bench.arg("--only").arg(parts);
            }
            run(bench)
        }
    }
}

/// The fuzz targets of fuzz/Cargo.toml.
const FUZZ_TARGETS: [&str; 4] = ["vrrp_advert", "resp_reply", "info", "config"];
/// Default seconds per fuzz target.
const FUZZ_SECONDS: u64 = 60;

/// Builds the fuzz targets once, then runs each for `seconds` from its seed
/// corpus (fuzz/corpus/<target>, read only; new inputs go to
/// target/fuzz-corpus/), as many at once as there are CPUs.
fn fuzz(root: &Path, seconds: u64) -> Result<TestRun> {
    let mut build = cargo(root);
    build.args(["+nightly", "fuzz", "build", "--fuzz-dir", "fuzz"]);
    run(build).context("building the fuzz targets (cargo fuzz, installed by scripts/setup.sh)")?;
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut crashed = Vec::new();
    for batch in FUZZ_TARGETS.chunks(parallel) {
        let mut children = Vec::new();
        for target in batch {
            let work = root.join("target/fuzz-corpus").join(target);
            let artifacts = root.join("target/fuzz-artifacts").join(target);
            std::fs::create_dir_all(&work)?;
            std::fs::create_dir_all(&artifacts)?;
            let mut c = cargo(root);
            c.args(["+nightly", "fuzz", "run", "--fuzz-dir", "fuzz", target])
                .arg(&work)
                .arg(root.join("fuzz/corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .arg("-print_final_stats=1");
            // libFuzzer reports every new coverage point: keep its chatter
            // in a log, shown when the target crashes.
            let log_path = artifacts.join("fuzz.log");
            let log = std::fs::File::create(&log_path)?;
            c.stdout(log.try_clone()?).stderr(log);
            let shown = format!("{c:?}");
            let child = c.spawn().with_context(|| format!("spawn {shown}"))?;
            children.push((*target, child, log_path));
        }
        for (target, mut child, log_path) in children {
            if child.wait()?.success() {
                println!("xtask fuzz: {target}: no crash in {seconds} s");
                passed += 1;
            } else {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                for line in tail.iter().rev() {
                    println!("  {line}");
                }
                println!(
                    "xtask fuzz: {target}: CRASH, input saved under target/fuzz-artifacts/{target}/"
                );
                failed += 1;
                crashed.push(target);
            }
        }
    }
    let result = if crashed.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "fuzz targets crashed: {}",
            crashed.join(", ")
        ))
    };
    Ok(TestRun {
        passed,
        failed,
        result,
    })
}

/// Builds real KeyDB with `../shared/keydb/build.sh` (beside the
/// repository, as CI has it; the script builds outside that folder, which
/// may be read-only) and returns the `keydb-server` it printed on its last
/// line. `None` without that folder; an error when the build fails.
fn keydb(root: &Path) -> Result<Option<PathBuf>> {
    let script = root.join("../shared/keydb/build.sh");
    if !script.is_file() {
        println!(
            "xtask: no {}: tests that need KeyDB will be skipped",
            script.display()
        );
        return Ok(None);
    }
    let shown = script.display().to_string();
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("spawn {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let server = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .with_context(|| format!("{shown} printed no path"))?;
    if !server.is_file() {
        bail!("{shown} printed {}, which is not a file", server.display());
    }
    println!("xtask: KeyDB at {}", server.display());
    Ok(Some(server))
}

/// `PATH` with the directory of `keydb_server` first, when there is one
/// (keydb-cli sits beside it).
fn test_path(keydb_server: Option<&Path>) -> Result<std::ffi::OsString> {
    let mut dirs: Vec<PathBuf> = keydb_server
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    Ok(std::env::join_paths(dirs)?)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo` for the host workspace, without variables an outer cargo set.
fn cargo(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        c.env_remove(var);
    }
    c
}

fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("spawn {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// What `cargo test` reported over every test binary.
struct TestRun {
    passed: u64,
    failed: u64,
    result: Result<()>,
}

/// Runs `cargo test`, echoing its output and adding up the libtest
/// summary lines of every test binary.
fn run_tests(mut cmd: Command) -> Result<TestRun> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {shown}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    let result = if !status.success() {
        Err(anyhow::anyhow!("{shown} failed: {status}"))
    } else if passed == 0 {
        Err(anyhow::anyhow!("no test ran"))
    } else {
        Ok(())
    };
    Ok(TestRun {
        passed,
        failed,
        result,
    })
}

/// The closing line of `cargo xtask test`; skips are named only when some
/// test was skipped.
fn summary(passed: u64, failed: u64, skipped: u64) -> String {
    let mut line = format!("xtask test: {passed} passed, {failed} failed");
    if skipped > 0 {
        line.push_str(&format!(", {skipped} skipped"));
    }
    line
}

/// `(passed, failed)` from a libtest line such as
/// `test result: ok. 18 passed; 0 failed; 0 ignored; ...`.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut passed = None;
    let mut failed = None;
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(what)) = (words.next(), words.next()) {
            match what {
                "passed" => passed = n.parse().ok(),
                "failed" => failed = n.parse().ok(),
                _ => {}
            }
        }
    }
    Some((passed?, failed?))
}

/// `cargo fmt --check` and clippy with warnings as errors over the host
/// workspace: a test run fails on either.
fn lint(root: &Path) -> Result<()> {
    let mut fmt = cargo(root);
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt).context("formatting (run `cargo fmt --all`)")?;
    let mut clippy = cargo(root);
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy).context("clippy")
}

fn setup(root: &Path) -> Result<()> {
    let mut c = Command::new("bash");
    c.arg(root.join("scripts/setup.sh"));
    run(c).context("scripts/setup.sh (run as root on Debian)")
}

fn build_ebpf(root: &Path) -> Result<()> {
    let dir = root.join("balancer-ebpf");
    let mut c = cargo(&dir);
    // The toolchain comes from balancer-ebpf/rust-toolchain.toml (nightly);
    // target, build-std and BTF flags from balancer-ebpf/.cargo/config.toml.
    c.args(["+nightly", "build", "--release"]);
    run(c).context("building the XDP program (needs `cargo xtask setup`)")?;
    let built = dir.join("target/bpfel-unknown-none/release/balancer-ebpf");
    let out_dir = root.join("target/bpf");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("balancer.bpf.o");
    // Copy only when changed, so cargo does not rebuild the agent for nothing.
    let new = std::fs::read(&built).with_context(|| format!("read {}", built.display()))?;
    if std::fs::read(&out).ok().as_deref() != Some(&new[..]) {
        std::fs::write(&out, &new)?;
    }
    println!("xtask: XDP object at {}", out.display());
    Ok(())
}

/// Builds the release agent, its shell completions into
/// target/release/completions/, and the package with cargo-deb (binary
/// stripped); the XDP object must be built already.
fn deb(root: &Path) -> Result<()> {
    let mut c = cargo(root);
    c.args([
        "build",
        "--release",
        "-p",
        "balancer-user",
        "--bin",
        "balancer",
    ]);
    run(c)?;
    let out = root.join("target/release");
    let bin = out.join("balancer");
    let dir = out.join("completions");
    std::fs::create_dir_all(&dir)?;
    for (shell, file) in [
        ("bash", "balancer.bash"),
        ("zsh", "_balancer"),
        ("fish", "balancer.fish"),
    ] {
        let out = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("run {}", bin.display()))?;
        if !out.status.success() {
            bail!("{} completions {shell}: {}", bin.display(), out.status);
        }
        std::fs::write(dir.join(file), out.stdout)?;
    }
    let mut c = cargo(root);
    c.args(["deb", "-p", "balancer-user", "--no-build", "--strip"]);
    run(c).context("cargo deb (installed by scripts/setup.sh)")
}

fn build(root: &Path, release: bool) -> Result<()> {
    build_ebpf(root)?;
    let mut c = cargo(root);
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(c)
}

#[cfg(test)]
mod tests {
    use super::{parse_test_result, summary};

    #[test]
    fn summary_line_names_skips_only_when_there_are_some() {
        assert_eq!(summary(10, 0, 0), "xtask test: 10 passed, 0 failed");
        assert_eq!(
            summary(9, 1, 2),
            "xtask test: 9 passed, 1 failed, 2 skipped"
        );
    }

    #[test]
    fn reads_libtest_summary_lines() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 18 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.66s"
            ),
            Some((18, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
