//! `cargo xtask bench [--quick]`: per-packet cost of the XDP data plane,
//! redis-benchmark through it, through HAProxy and direct, the CPU each
//! balancer spends, and the client's gap when the VIP holder is lost (our
//! agents against keepalived + HAProxy); writes REPORT.md, chart.svg and
//! results.json and prints the tables. See tests/src/bench/ for what each
//! part measures.
//!
//! Run as root. Options:
//!   --quick              tiny counts, one round, one failover trial per
//!                        setup (a smoke run of every code path); writes to
//!                        target/bench-quick/ unless --out is given
//!   --rounds N           rounds of the end-to-end part (default 5)
//!   --failover-trials N  hard node losses per failover setup (default 5)
//!   --out DIR            where to write the report (default bench/results/)
//!   --only PART[,PART]   run only these parts: `packet`, `lab`,
//!                        `failover`, `churn`, `storm` (comma-separated)
//!   --xdp-mode MODE      `generic` (default): the agent attaches in skb
//!                        mode and the lab's bridge ports run no XDP
//!                        (faster for every path on this lab, see
//!                        bench/ANALYSIS.md); `native`: driver mode,
//!                        `xdp_pass` on every bridge port (the lab of
//!                        `cargo xtask test`)
//!   --client-cpu N       run redis-benchmark under `taskset -c N`
//!   --pin                redis-benchmark on the last CPU, the nodes'
//!                        servers and HAProxy on the others
//!   --no-pin             leave placement to the scheduler (default)
//!
//! Exits non-zero only if a measurement could not be taken (the report is
//! still written); missed targets are reported, not failed.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};
use balancer_tests::{
    bench::{
        churn::{self, ChurnPlan},
        failover::{self, FailoverPlan, FailoverStatus},
        lab_run::{run_lab, LabPlan, LabXdp, Placement},
        packet_cost::{measure, PacketCostPlan},
        report::{self, ReportInput},
        storm::{self, StormPlan},
    },
    lab::workspace_dir,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Args {
    quick: bool,
    /// `--only` as given, for the report's command line.
    only: Option<String>,
    rounds: usize,
    failover_trials: Option<usize>,
    out: Option<PathBuf>,
    packet: bool,
    lab: bool,
    failover: bool,
    churn: bool,
    storm: bool,
    xdp: LabXdp,
    placement: Placement,
}

/// The parts `--only` selects from.
const PARTS: [&str; 5] = ["packet", "lab", "failover", "churn", "storm"];
const ONLY_USAGE: &str = "--only PART[,PART...] with parts packet, lab, failover, churn, storm";

/// The lab's XDP set-up when `--xdp-mode` is not given (see ANALYSIS.md).
const DEFAULT_XDP: LabXdp = LabXdp::Generic;

fn parse_count(flag: &str, v: Option<String>) -> Result<usize> {
    let v = v.with_context(|| format!("{flag} needs a number"))?;
    let n: usize = v.parse().with_context(|| format!("{flag} {v}"))?;
    if n == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(n)
}

fn parse_args() -> Result<Args> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut a = Args {
        quick: false,
        only: None,
        rounds: 3,
        failover_trials: None,
        out: None,
        packet: true,
        lab: true,
        failover: true,
        churn: true,
        storm: true,
        xdp: DEFAULT_XDP,
        placement: Placement::default(),
    };
    let mut rounds = None;
    let mut pin = false;
    let mut client_cpu = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--rounds" => rounds = Some(parse_count("--rounds", it.next())?),
            "--failover-trials" => {
                a.failover_trials = Some(parse_count("--failover-trials", it.next())?)
            }
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--only" => {
                let list = it.next().context(ONLY_USAGE)?;
                let parts: Vec<&str> = list.split(',').map(str::trim).collect();
                for part in &parts {
                    if !PARTS.contains(part) {
                        bail!("{ONLY_USAGE}, not {part:?}");
                    }
                }
                let has = |p: &str| parts.contains(&p);
                a.packet = has("packet");
                a.lab = has("lab");
                a.failover = has("failover");
                a.churn = has("churn");
                a.storm = has("storm");
                a.only = Some(parts.join(","));
            }
            "--xdp-mode" => {
                let v = it.next();
                a.xdp = v
                    .as_deref()
                    .and_then(LabXdp::parse)
                    .with_context(|| format!("--xdp-mode native|generic, not {v:?}"))?;
            }
            "--client-cpu" => {
                let v = it.next().context("--client-cpu needs a CPU number")?;
                let n: usize = v.parse().with_context(|| format!("--client-cpu {v}"))?;
                if n >= cpus {
                    bail!("--client-cpu {n}: this machine has CPUs 0 to {}", cpus - 1);
                }
                client_cpu = Some(n);
            }
            "--pin" => pin = true,
            "--no-pin" => pin = false,
            "-h" | "--help" => {
                println!(
                    "usage: bench [--quick] [--rounds N] [--failover-trials N] [--out DIR] \
                     [--only packet,lab,failover,churn,storm] [--xdp-mode generic|native] [--client-cpu N] \
                     [--pin|--no-pin]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    a.rounds = rounds.unwrap_or(if a.quick { 1 } else { 5 });
    if pin {
        a.placement = Placement::split(cpus).context("--pin needs at least 2 CPUs")?;
    }
    if let Some(n) = client_cpu {
        a.placement.client = Some(n.to_string());
    }
    Ok(a)
}

fn main() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { signal(sig, SigHandler::Handler(on_interrupt)) };
    }
    if let Err(e) = bench() {
        eprintln!("\nbench failed: {e:#}");
        std::process::exit(1);
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: the storm's clients
/// hold thousands of sockets in this process, and redis-benchmark and the
/// servers inherit the limit.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                eprintln!("bench: cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
            }
        }
    }
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn bench() -> Result<()> {
    let args = parse_args()?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark builds network namespaces and loads XDP: run it as root");
    }
    let root = workspace_dir();
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            root.join("target/bench-quick")
        } else {
            root.join("bench/results")
        }
    });
    let mut command = if args.quick {
        "cargo xtask bench --quick".to_string()
    } else {
        "cargo xtask bench".to_string()
    };
    if let Some(parts) = &args.only {
        command.push_str(&format!(" --only {parts}"));
    }
    let date = date();
    let interrupted = || INTERRUPTED.load(Ordering::SeqCst);
    raise_nofile_limit();

    let packet = if args.packet {
        let plan = if args.quick {
            PacketCostPlan::quick()
        } else {
            PacketCostPlan::full()
        };
        println!(
            "== Per-packet cost (BPF_PROG_TEST_RUN, repeat {}, {} trials; {} single runs) ==",
            plan.repeat, plan.trials, plan.single_runs
        );
        let p = measure(plan)?;
        print!("{}", report::packet_table(&p));
        Some(p)
    } else {
        None
    };
    if interrupted() {
        bail!("interrupted");
    }

    let lab = if args.lab {
        println!(
            "\n== End to end (redis-benchmark, {} round(s), a / b / b′ / c in turn) ==",
            args.rounds
        );
        Some(run_lab(
            LabPlan {
                rounds: args.rounds,
                quick: args.quick,
                xdp: args.xdp,
                placement: args.placement.clone(),
            },
            &interrupted,
        )?)
    } else {
        None
    };
    let summary = lab.as_ref().map(report::summarize);
    if interrupted() {
        bail!("interrupted");
    }

    let failover = if args.failover {
        let mut plan = if args.quick {
            FailoverPlan::quick(args.xdp)
        } else {
            FailoverPlan::full(args.xdp)
        };
        if let Some(n) = args.failover_trials {
            plan.trials = n;
        }
        println!(
            "\n== Failover ({} hard node loss(es) per setup, client writing through the VIP every 2 ms) ==",
            plan.trials
        );
        FailoverStatus::Measured(failover::measure(plan, &interrupted)?)
    } else {
        FailoverStatus::NotRun
    };

    // Measurements that could not be taken; reported after the files
    // are written.
    let mut incomplete = Vec::new();
    let churn = if args.churn {
        let plan = if args.quick {
            ChurnPlan::quick(args.xdp)
        } else {
            ChurnPlan::full(args.xdp)
        };
        println!(
            "\n== Connection churn (redis-benchmark -k 0 -t ping, {} connections per run, -c {:?}, {} runs per front, cap {} s) ==",
            plan.connections,
            plan.concurrency,
            plan.runs,
            plan.cap.as_secs()
        );
        match churn::measure(plan, &interrupted) {
            Ok(r) => {
                for (front, e) in &r.errors {
                    incomplete.push(format!("churn, {}: {e}", front.name()));
                }
                Some(r)
            }
            Err(e) if interrupted() => return Err(e),
            Err(e) => {
                eprintln!("  churn failed: {e:#}");
                incomplete.push(format!("churn: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    if interrupted() {
        bail!("interrupted");
    }
    let storm = if args.storm {
        let plan = if args.quick {
            StormPlan::quick(args.xdp)
        } else {
            StormPlan::full(args.xdp)
        };
        println!(
            "\n== Reconnect storm ({} clients through the VIP, the master's link cut) ==",
            plan.clients
        );
        match storm::measure(plan, &interrupted) {
            Ok(r) => {
                print!("{}", storm::summary_table(&r));
                Some(r)
            }
            Err(e) if interrupted() => return Err(e),
            Err(e) => {
                eprintln!("  storm failed: {e:#}");
                incomplete.push(format!("storm: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    if interrupted() {
        bail!("interrupted");
    }

    let input = ReportInput {
        quick: args.quick,
        command,
        date,
        packet: packet.as_ref(),
        lab: lab.as_ref(),
        summary: summary.as_ref(),
        failover: &failover,
        churn: churn.as_ref(),
        storm: storm.as_ref(),
        chart_file: "chart.svg",
    };
    // REPORT.md, chart.svg and results.json hold the parts of one
    // invocation: a run of only churn and storm leaves them alone and
    // writes churn.{md,svg,json} only.
    let main_parts = args.packet || args.lab || args.failover;
    if main_parts {
        let mut json = report::to_json(packet.as_ref(), lab.as_ref(), &failover);
        json["churn"] = churn
            .as_ref()
            .map_or(serde_json::Value::Null, churn::to_json);
        json["storm"] = storm
            .as_ref()
            .map_or(serde_json::Value::Null, storm::to_json);
        report::write_all(&out, &input, &json)?;
    }
    if args.churn || args.storm {
        report::write_churn(&out, &input, churn.as_ref(), storm.as_ref())?;
    }

    if let Some(s) = &summary {
        println!("\n== Results (medians over {} round(s)) ==\n", args.rounds);
        print!("{}", report::throughput_table(s));
        println!();
        print!("{}", report::diagnostic_table(s));
        println!();
        print!("{}", report::cpu_table(s));
        println!();
        print!("{}", report::machine_table(s));
        println!();
        print!("{}", report::targets_table(s, packet.as_ref()));
    }
    if args.failover {
        println!("\n== Failover: client-observed longest gap per hard node loss ==\n");
    }
    print!("{}", failover.summary());
    if let Some(c) = &churn {
        println!("\n== Connection churn: every run ==\n");
        print!("{}", churn::runs_table(c));
        println!();
        print!("{}", churn::targets_table(c));
    }
    if main_parts {
        println!(
            "\nReport: {}\nChart:  {}",
            out.join("REPORT.md").display(),
            out.join("chart.svg").display()
        );
    }
    if args.churn || args.storm {
        println!(
            "\nChurn report: {}\nChurn chart:  {}",
            out.join("churn.md").display(),
            out.join(report::CHURN_CHART).display()
        );
    }
    if !incomplete.is_empty() {
        bail!(
            "measurements incomplete (report written):\n{}",
            incomplete.join("\n")
        );
    }
    if let FailoverStatus::Measured(r) = &failover {
        if !r.complete() {
            let errors: Vec<String> = r
                .setups
                .iter()
                .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.setup.name())))
                .collect();
            bail!(
                "failover measurement incomplete (report written):\n{}",
                errors.join("\n")
            );
        }
    }
    Ok(())
}
