//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN`, next to
//! the `xdp_pass` program measured in the same fixture namespace
//! ([`crate::fixture`]).
//!
//! What `BPF_PROG_TEST_RUN` can and cannot measure here:
//!
//! - With `repeat = R` the kernel runs the program R times on **one**
//!   buffer: a rewrite made by one run is the input of the next. A NATed
//!   packet would therefore be measured once and then R - 1 times as
//!   whatever it was rewritten into. The rewriting cases are built as
//!   *cycles* instead: a second, synthetic conntrack entry turns the
//!   rewritten packet back into the original, so every run takes the same
//!   path. Each case checks that its verdict counter grew by exactly R.
//! - A new flow cannot be repeated at all (the second run of the same SYN
//!   finds the flow the first created). New flows are measured as many
//!   single runs (`repeat = 1`) of distinct SYNs, each creating a flow in a
//!   table of the agent's default size, next to `xdp_pass` and an
//!   established packet measured the same way (the per-call timer overhead
//!   is then part of every figure of that method).
//!
//! Not measured: driver work after the verdict (XDP_TX/redirect
//! transmission), which test runs do not perform.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use balancer_common::{
    conntrack_entries, counter, names, FlowEntry, Settings, DEFAULT_CONNTRACK_FLOWS,
    DIR_TO_BACKEND, DIR_TO_CLIENT, MAX_BACKENDS,
};

use crate::{
    fixture::{
        active_service, backend, default_settings, flow_key, mac_of, net_addr,
        with_dataplane_sized, Dataplane, Ingress, Verdict, BACKEND_PORT, CLIENT, FX0_MAC, NODE,
        VIP, VIP_PORT,
    },
    packet::{Frame, TcpFlags},
};

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct PacketCostPlan {
    /// `repeat` of every looped test run (>= 1,000,000 for the report).
    pub repeat: u32,
    /// Looped trials per case, alternating with `xdp_pass`; medians reported.
    pub trials: usize,
    /// Single test runs per single-run case (distinct SYNs for new flows).
    pub single_runs: u32,
}

impl PacketCostPlan {
    pub fn full() -> Self {
        PacketCostPlan {
            repeat: 1_000_000,
            trials: 5,
            single_runs: 1_000_000,
        }
    }

    pub fn quick() -> Self {
        PacketCostPlan {
            repeat: 10_000,
            trials: 2,
            single_runs: 10_000,
        }
    }
}

/// How a case was timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// One test run with `repeat` = R; the kernel's mean per run.
    Looped,
    /// R test runs with `repeat` = 1; the mean of the kernel's figures.
    Single,
}

impl Method {
    pub fn describe(self) -> &'static str {
        match self {
            Method::Looped => "looped",
            Method::Single => "single runs",
        }
    }
}

/// The cost of one case and of `xdp_pass` timed the same way.
#[derive(Clone, Debug)]
pub struct CaseCost {
    pub name: &'static str,
    /// A few words for the chart's axis.
    pub short: &'static str,
    pub method: Method,
    /// Program runs behind each figure (per trial for looped cases).
    pub runs: u64,
    /// Kernel-reported ns per packet (median over trials). The kernel
    /// reports whole nanoseconds, truncated. (The wall time of a looped
    /// run is no substitute: with `repeat > 1` the kernel first switches
    /// the XDP dispatcher to the program, which alone takes milliseconds.)
    pub ns: f64,
    /// `xdp_pass` under the same method (median over trials).
    pub pass_ns: f64,
    /// What proved that every run took the intended path.
    pub check: String,
}

impl CaseCost {
    pub fn ratio(&self) -> f64 {
        self.ns / self.pass_ns.max(f64::MIN_POSITIVE)
    }
}

/// Everything the per-packet benchmark found.
#[derive(Clone, Debug)]
pub struct PacketCost {
    pub plan: PacketCostPlan,
    pub cases: Vec<CaseCost>,
    /// Size of the verified `balancer` program (translated BPF bytes).
    pub xlated_bytes: Option<u32>,
    /// Size of its JIT image, bytes.
    pub jited_bytes: Option<u32>,
    pub elapsed: Duration,
}

/// A TCP 4-tuple as it appears in a packet: (source, destination).
#[derive(Clone, Copy, Debug)]
struct Tuple {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
}

const CLIENT_MAC: [u8; 6] = [0x02, 0xbe, 198, 18, 0, 10];
/// A second VIP whose only backend is this node (local-backend case).
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
/// A third VIP with 16 remote backends (new flows).
const NEW_FLOW_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 102);
/// A VIP configured but not held by this node.
const INACTIVE_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 103);
/// The SNAT range of the benchmark: as wide as the agent allows, so new
/// flows rarely probe more than one port.
const SNAT_MIN: u16 = 1024;
const SNAT_MAX: u16 = 65535;
/// A redis `GET key:__rand_int__` request and a 3-byte bulk reply: the
/// payloads of the established-flow packets.
const GET_REQUEST: &[u8] = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n";
const GET_REPLY: &[u8] = b"$3\r\nxxx\r\n";

/// (source, destination) MACs of a frame of `t` arriving on fx0.
fn frame_macs(t: Tuple) -> ([u8; 6], [u8; 6]) {
    let src = if t.src.0 == CLIENT {
        CLIENT_MAC
    } else {
        mac_of(t.src.0)
    };
    (src, FX0_MAC)
}

fn frame(t: Tuple, flags: TcpFlags, payload: &[u8]) -> Frame {
    let (src_mac, dst_mac) = frame_macs(t);
    Frame::tcp(src_mac, dst_mac, t.src, t.dst, flags)
        .map_tcp(|s| s.with_seq(1001).with_ack(5001).with_payload(payload))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An entry that rewrites a packet into `to`, sent out of `ifindex`.
fn rewrite_entry(to: Tuple, direction: u8, ifindex: u32) -> FlowEntry {
    FlowEntry {
        nat_saddr: net_addr(to.src.0),
        nat_daddr: net_addr(to.dst.0),
        nat_sport: to.src.1.to_be(),
        nat_dport: to.dst.1.to_be(),
        ifindex,
        // The MACs the twin packet arrives with, so that two rewrites give
        // back the input byte for byte.
        eth_src: frame_macs(to).0,
        eth_dst: frame_macs(to).1,
        service_id: 0,
        backend_slot: 0,
        direction,
        flags: 0,
        _pad: 0,
        last_seen_ns: monotonic_ns(),
    }
}

/// Two conntrack entries that rewrite `a` into `b` and `b` into `a`.
fn install_cycle(dp: &mut Dataplane, a: Tuple, b: Tuple, direction: u8) -> Result<()> {
    let fx0 = dp.fx0;
    for (from, to) in [(a, b), (b, a)] {
        dp.insert_flow(
            flow_key(from.src, from.dst),
            rewrite_entry(to, direction, fx0),
        )?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One looped case: `plan.trials` alternations of `xdp_pass` and
/// `balancer` on `input`, each `plan.repeat` runs; the verdict counter
/// `slot` must grow by exactly `repeat` per trial and the buffer must come
/// back as it went in (the cycle closed).
fn looped(
    dp: &Dataplane,
    plan: &PacketCostPlan,
    (name, short): (&'static str, &'static str),
    input: &Frame,
    verdict: Verdict,
    slot: u32,
) -> Result<CaseCost> {
    let bytes = input.build();
    if verdict != Verdict::Pass {
        // The kernel reuses one buffer for all repetitions: one run leaves
        // the twin packet, two runs the input again.
        let once = dp.timed_run(names::PROG_BALANCER, &bytes, Ingress::Fx0, 1)?;
        let twice = dp.timed_run(names::PROG_BALANCER, &bytes, Ingress::Fx0, 2)?;
        ensure!(
            once.outcome.frame != bytes && twice.outcome.frame == bytes,
            "{name}: the rewrite cycle does not close (one run changed the packet: {}, two runs restored it: {})",
            once.outcome.frame != bytes,
            twice.outcome.frame == bytes
        );
    }
    let (mut ns, mut pass_ns) = (vec![], vec![]);
    for _ in 0..plan.trials {
        let pass = dp.timed_run(names::PROG_PASS, &bytes, Ingress::Fx0, plan.repeat)?;
        ensure!(
            pass.outcome.verdict == Verdict::Pass,
            "xdp_pass did not pass"
        );
        pass_ns.push(pass.kernel_ns_per_run as f64);

        let before = dp.counter(slot)?;
        let run = dp.timed_run(names::PROG_BALANCER, &bytes, Ingress::Fx0, plan.repeat)?;
        let after = dp.counter(slot)?;
        ensure!(
            run.outcome.verdict == verdict,
            "{name}: verdict {:?}, expected {verdict:?}",
            run.outcome.verdict
        );
        ensure!(
            after - before == u64::from(plan.repeat),
            "{name}: counter {} grew by {} over {} runs: not every run took the measured path",
            counter::NAMES[slot as usize],
            after - before,
            plan.repeat
        );
        ensure!(
            run.outcome.frame == bytes,
            "{name}: after an even number of runs the buffer differs from the input (the cycle did not close)"
        );
        ns.push(run.kernel_ns_per_run as f64);
    }
    Ok(CaseCost {
        name,
        short,
        method: Method::Looped,
        runs: u64::from(plan.repeat),
        ns: median(ns),
        pass_ns: median(pass_ns),
        check: format!(
            "{} +{} per trial, buffer restored",
            counter::NAMES[slot as usize],
            plan.repeat
        ),
    })
}

/// Mean kernel time of `runs` single test runs of `program`, input from
/// `input(i)`; `between(i)` runs untimed before run `i`.
fn single_mean(
    dp: &mut Dataplane,
    program: &str,
    runs: u32,
    mut input: impl FnMut(u32) -> Vec<u8>,
    mut between: impl FnMut(&mut Dataplane, u32) -> Result<()>,
    verdict: Verdict,
) -> Result<f64> {
    let mut total: u64 = 0;
    for i in 0..runs {
        between(dp, i)?;
        let bytes = input(i);
        let r = dp.timed_run(program, &bytes, Ingress::Fx0, 1)?;
        ensure!(
            r.outcome.verdict == verdict,
            "{program} run {i}: verdict {:?}, expected {verdict:?}",
            r.outcome.verdict
        );
        total += r.kernel_ns_per_run;
    }
    Ok(total as f64 / f64::from(runs.max(1)))
}

/// Runs the whole per-packet benchmark in a fixture namespace.
pub fn measure(plan: PacketCostPlan) -> Result<PacketCost> {
    let started = Instant::now();
    let entries = conntrack_entries(DEFAULT_CONNTRACK_FLOWS);
    let mut cost = with_dataplane_sized(entries, move |dp| measure_in(dp, plan))?;
    cost.elapsed = started.elapsed();
    Ok(cost)
}

fn measure_in(dp: &mut Dataplane, plan: PacketCostPlan) -> Result<PacketCost> {
    dp.set_settings(Settings {
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        ..default_settings()
    })?;
    let b = backend(0);
    // VIP:6380 -> one remote backend; backend:6380 is a service too, only
    // so that the rewritten forward packet is again a forward packet.
    dp.set_service(VIP, VIP_PORT, &active_service(0, &[b]))?;
    dp.set_service(b, BACKEND_PORT, &active_service(1, &[backend(1)]))?;
    dp.set_service(LOCAL_VIP, VIP_PORT, &active_service(2, &[NODE]))?;
    let all: Vec<Ipv4Addr> = (0..MAX_BACKENDS).map(backend).collect();
    dp.set_service(NEW_FLOW_VIP, VIP_PORT, &active_service(3, &all))?;

    // A genuine flow first: the SYN path works in this environment.
    let syn = frame(
        Tuple {
            src: (CLIENT, 40001),
            dst: (VIP, VIP_PORT),
        },
        TcpFlags::SYN,
        &[],
    );
    let flow = dp.open_flow(&syn)?;

    // Forward cycle: client -> VIP  <->  node:snat -> backend.
    let client_side = Tuple {
        src: flow.client,
        dst: flow.vip,
    };
    let backend_side = Tuple {
        src: flow.node(),
        dst: flow.backend,
    };
    install_cycle(dp, client_side, backend_side, DIR_TO_BACKEND)?;
    // Reverse cycle: backend -> node:s1  <->  VIP -> node:c1 (both are
    // replies to SNAT ports of this node).
    let reply = Tuple {
        src: (b, BACKEND_PORT),
        dst: (NODE, 30001),
    };
    let reply_twin = Tuple {
        src: (VIP, VIP_PORT),
        dst: (NODE, 40002),
    };
    install_cycle(dp, reply, reply_twin, DIR_TO_CLIENT)?;

    let forward = frame(client_side, TcpFlags::PSH_ACK, GET_REQUEST);
    let reverse = frame(reply, TcpFlags::PSH_ACK, GET_REPLY);
    let local = frame(
        Tuple {
            src: (CLIENT, 40003),
            dst: (LOCAL_VIP, VIP_PORT),
        },
        TcpFlags::SYN,
        &[],
    );
    // A service this node does not hold (the inactive flag): parse, the
    // SERVICES hit, nothing more.
    dp.set_service(INACTIVE_VIP, VIP_PORT, &{
        let mut svc = active_service(4, &[b]);
        svc.flags = 0;
        svc
    })?;
    let inactive = frame(
        Tuple {
            src: (CLIENT, 40005),
            dst: (INACTIVE_VIP, VIP_PORT),
        },
        TcpFlags::PSH_ACK,
        GET_REQUEST,
    );
    // A data packet to the VIP with no flow: SERVICES hit, CONNTRACK miss.
    let no_flow = frame(
        Tuple {
            src: (CLIENT, 40006),
            dst: (VIP, VIP_PORT),
        },
        TcpFlags::PSH_ACK,
        GET_REQUEST,
    );
    let ssh = frame(
        Tuple {
            src: (CLIENT, 40004),
            dst: (NODE, 22),
        },
        TcpFlags::SYN,
        &[],
    );

    // Cheapest first: each case adds a step of the path to the one before.
    let mut cases = vec![
        looped(
            dp,
            &plan,
            ("non-VIP TCP (pass)", "non-VIP"),
            &ssh,
            Verdict::Pass,
            counter::PASS_NOT_SERVICE,
        )?,
        looped(
            dp,
            &plan,
            ("to a VIP this node does not hold (pass)", "inactive VIP"),
            &inactive,
            Verdict::Pass,
            counter::PASS_INACTIVE,
        )?,
        looped(
            dp,
            &plan,
            ("data to the VIP without a flow (pass)", "no flow"),
            &no_flow,
            Verdict::Pass,
            counter::PASS_NO_FLOW,
        )?,
        looped(
            dp,
            &plan,
            ("SYN to the local backend (pass)", "SYN, local"),
            &local,
            Verdict::Pass,
            counter::PASS_LOCAL_BACKEND,
        )?,
        looped(
            dp,
            &plan,
            ("established flow, forward (client -> backend)", "forward"),
            &forward,
            Verdict::Tx,
            counter::FORWARDED,
        )?,
        looped(
            dp,
            &plan,
            ("reverse NAT of a reply (backend -> client)", "reverse NAT"),
            &reverse,
            Verdict::Tx,
            counter::REVERSED,
        )?,
        looped(
            dp,
            &plan,
            (
                "SYN of an existing flow (retransmission)",
                "SYN, flow exists",
            ),
            &syn,
            Verdict::Tx,
            counter::FORWARDED,
        )?,
    ];

    // Single runs: xdp_pass, an established packet, and new flows.
    let n = plan.single_runs;
    let syn_bytes = syn.build();
    let pass_ns = single_mean(
        dp,
        names::PROG_PASS,
        n,
        |_| syn_bytes.clone(),
        |_, _| Ok(()),
        Verdict::Pass,
    )?;
    let fwd_bytes = forward.build();
    let before = dp.counter(counter::FORWARDED)?;
    let est_ns = single_mean(
        dp,
        names::PROG_BALANCER,
        n,
        |_| fwd_bytes.clone(),
        |_, _| Ok(()),
        Verdict::Tx,
    )?;
    ensure!(
        dp.counter(counter::FORWARDED)? - before == u64::from(n),
        "established single runs did not all forward"
    );
    cases.push(CaseCost {
        name: "established flow, forward (client -> backend)",
        short: "forward",
        method: Method::Single,
        runs: u64::from(n),
        ns: est_ns,
        pass_ns,
        check: format!("forwarded +{n}"),
    });

    // New flows: client ports 1024..=65535 (64,512 distinct SYNs); the
    // table is emptied (untimed) before the ports come round again, so
    // every SYN creates a flow and the table never evicts.
    let ports = u32::from(u16::MAX) - 1024 + 1;
    dp.clear_flows()?;
    let created = dp.counter(counter::FLOWS_CREATED)?;
    let exhausted = dp.counter(counter::DROP_SNAT_EXHAUSTED)?;
    let new_ns = single_mean(
        dp,
        names::PROG_BALANCER,
        n,
        |i| {
            let port = (1024 + i % ports) as u16;
            frame(
                Tuple {
                    src: (CLIENT, port),
                    dst: (NEW_FLOW_VIP, VIP_PORT),
                },
                TcpFlags::SYN,
                &[],
            )
            .build()
        },
        |dp, i| {
            if i > 0 && i % ports == 0 {
                dp.clear_flows()?;
            }
            Ok(())
        },
        Verdict::Tx,
    )?;
    let created = dp.counter(counter::FLOWS_CREATED)? - created;
    ensure!(
        created == u64::from(n),
        "{n} distinct SYNs created {created} flows (SNAT exhausted: {})",
        dp.counter(counter::DROP_SNAT_EXHAUSTED)? - exhausted
    );
    cases.push(CaseCost {
        name: "new-flow SYN to a remote backend",
        short: "new flow",
        method: Method::Single,
        runs: u64::from(n),
        ns: new_ns,
        pass_ns,
        check: format!(
            "flows_created +{n}; 16 remote backends, SNAT {SNAT_MIN}-{SNAT_MAX}, table of {} entries",
            conntrack_entries(DEFAULT_CONNTRACK_FLOWS)
        ),
    });
    dp.clear_flows()?;

    // New flows once the range has wrapped, the common case under churn:
    // every port of this CPU's partition is held by a flow past its hold
    // (unanswered SYNs with an embryonic hold of 0), so each SYN takes one
    // over from the CPU's cursor. A partition of 64 ports per backend is
    // filled by the first 1,024 SYNs (untimed), then every timed SYN must
    // count one `snat_reclaimed`.
    let parts = dp.settings()?.snat_partitions.max(1) as u16;
    let mut wrapped = dp.settings()?;
    wrapped.snat_port_min = 1024;
    wrapped.snat_port_max = 1024 + 64 * parts - 1;
    wrapped.holds.embryonic_ns = 0;
    dp.set_settings(wrapped)?;
    let syn_from = |port: u32| {
        frame(
            Tuple {
                src: (CLIENT, (1024 + port % ports) as u16),
                dst: (NEW_FLOW_VIP, VIP_PORT),
            },
            TcpFlags::SYN,
            &[],
        )
        .build()
    };
    let fill = 64 * MAX_BACKENDS as u32;
    for i in 0..fill {
        let r = dp.timed_run(names::PROG_BALANCER, &syn_from(i), Ingress::Fx0, 1)?;
        ensure!(
            r.outcome.verdict == Verdict::Tx,
            "filling SYN {i}: {:?}",
            r.outcome.verdict
        );
    }
    let reclaimed = dp.counter(counter::SNAT_RECLAIMED)?;
    let created = dp.counter(counter::FLOWS_CREATED)?;
    let wrap_ns = single_mean(
        dp,
        names::PROG_BALANCER,
        n,
        |i| syn_from(fill + i),
        |_, _| Ok(()),
        Verdict::Tx,
    )?;
    let reclaimed = dp.counter(counter::SNAT_RECLAIMED)? - reclaimed;
    let created = dp.counter(counter::FLOWS_CREATED)? - created;
    ensure!(
        created == u64::from(n) && reclaimed == u64::from(n),
        "{n} SYNs on a wrapped range: {created} flows created, {reclaimed} ports taken over"
    );
    cases.push(CaseCost {
        name: "new-flow SYN taking over a port past its hold",
        short: "new flow, reclaim",
        method: Method::Single,
        runs: u64::from(n),
        ns: wrap_ns,
        pass_ns,
        check: format!(
            "flows_created +{n}, snat_reclaimed +{n}; 16 remote backends, 64 ports per CPU and backend"
        ),
    });
    dp.clear_flows()?;

    let (xlated_bytes, jited_bytes) = program_sizes(dp);
    Ok(PacketCost {
        plan,
        cases,
        xlated_bytes,
        jited_bytes,
        elapsed: Duration::ZERO,
    })
}

fn program_sizes(dp: &Dataplane) -> (Option<u32>, Option<u32>) {
    match dp.program_info(names::PROG_BALANCER) {
        Ok(info) => (info.size_translated(), Some(info.size_jitted())),
        Err(_) => (None, None),
    }
}
