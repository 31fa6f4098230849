//! `cargo xtask bench [--quick]`: per-packet cost of the XDP data plane,
//! redis-benchmark through it, through HAProxy and direct, and the CPU each
//! balancer spends; writes REPORT.md, chart.svg and results.json and prints
//! the tables. See tests/src/bench/ for what each part measures.
//!
//! Run as root. Options:
//!   --quick        tiny counts, one round (a smoke run of every code path);
//!                  writes to target/bench-quick/ unless --out is given
//!   --rounds N     rounds of the end-to-end part (default 5)
//!   --out DIR      where to write the report (default bench/results/)
//!   --only PART    `packet` or `lab`: run one part only
//!   --pin          CPU placement: redis-benchmark on the last CPU, the
//!                  nodes' servers and HAProxy on the others
//!   --no-pin       leave placement to the scheduler
//!
//! Exits non-zero only if a measurement could not be taken; missed targets
//! are reported, not failed.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context, Result};
use balancer_tests::{
    bench::{
        failover,
        lab_run::{run_lab, LabPlan},
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
    out: Option<PathBuf>,
    packet: bool,
    lab: bool,
    pin: Option<bool>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        rounds: 3,
        out: None,
        packet: true,
        lab: true,
        pin: None,
    };
    let mut rounds = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--rounds" => {
                let v = it.next().context("--rounds needs a number")?;
                let n: usize = v.parse().with_context(|| format!("--rounds {v}"))?;
                if n == 0 {
                    bail!("--rounds must be at least 1");
                }
                rounds = Some(n);
            }
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--only" => match it.next().as_deref() {
                Some("packet") => a.lab = false,
                Some("lab") => a.packet = false,
                other => bail!("--only packet|lab, not {other:?}"),
            },
            "--pin" => a.pin = Some(true),
            "--no-pin" => a.pin = Some(false),
            "-h" | "--help" => {
                println!(
                    "usage: bench [--quick] [--rounds N] [--out DIR] [--only packet|lab] [--pin|--no-pin]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    a.rounds = rounds.unwrap_or(if a.quick { 1 } else { 5 });
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
                pin: args.pin.unwrap_or(false),
            },
            &interrupted,
        )?)
    } else {
        None
    };
    let summary = lab.as_ref().map(report::summarize);
    let failover = failover::measure(args.quick);

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
    let json = report::to_json(packet.as_ref(), lab.as_ref());
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
    println!("\n{}", failover.summary());
    println!(
        "\nReport: {}\nChart:  {}",
        out.join("REPORT.md").display(),
        out.join("chart.svg").display()
    );
    Ok(())
}
