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
//!   --only PART          `packet`, `lab` or `failover`: run one part only
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
        failover::{self, FailoverPlan, FailoverStatus},
        lab_run::{run_lab, LabPlan, LabXdp, Placement},
        packet_cost::{measure, PacketCostPlan},
        report::{self, ReportInput},
    },
    lab::workspace_dir,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Args {
    quick: bool,
    rounds: usize,
    failover_trials: Option<usize>,
    out: Option<PathBuf>,
    packet: bool,
    lab: bool,
    failover: bool,
    xdp: LabXdp,
    placement: Placement,
}

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
        rounds: 3,
        failover_trials: None,
        out: None,
        packet: true,
        lab: true,
        failover: true,
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
                let part = it.next();
                a.packet = part.as_deref() == Some("packet");
                a.lab = part.as_deref() == Some("lab");
                a.failover = part.as_deref() == Some("failover");
                if !(a.packet || a.lab || a.failover) {
                    bail!("--only packet|lab|failover, not {part:?}");
                }
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
                     [--only packet|lab|failover] [--xdp-mode generic|native] [--client-cpu N] \
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
    let command = if args.quick {
        "cargo xtask bench --quick".to_string()
    } else {
        "cargo xtask bench".to_string()
    };
    let date = date();
    let interrupted = || INTERRUPTED.load(Ordering::SeqCst);

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

    let input = ReportInput {
        quick: args.quick,
        command,
        date,
        packet: packet.as_ref(),
        lab: lab.as_ref(),
        summary: summary.as_ref(),
        failover: &failover,
        chart_file: "chart.svg",
    };
    let json = report::to_json(packet.as_ref(), lab.as_ref(), &failover);
    report::write_all(&out, &input, &json)?;

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
    println!(
        "\nReport: {}\nChart:  {}",
        out.join("REPORT.md").display(),
        out.join("chart.svg").display()
    );
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
