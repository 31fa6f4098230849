//! Packet fixtures of the XDP program through BPF_PROG_TEST_RUN: each case
//! is {description, input frame, expected verdict, expected output frame},
//! frames built with `balancer_tests::packet`. Needs root (loads BPF,
//! creates a namespace per test).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{ensure, Context, Result};
use balancer_common::{
    counter, DIR_TO_BACKEND, DIR_TO_CLIENT, FLOW_BACKEND_FIRST, FLOW_BOTH_FIN, FLOW_CLIENT_FIN,
    FLOW_LAST_ACK, FLOW_REPLIED, FLOW_RESET, SERVICE_SCHEDULER_FIRST,
};
use balancer_tests::{
    fixture::{
        active_service, backend, host_addr, mac_of, with_dataplane, Case, Dataplane, Expected,
        Ingress, NatFlow, Verdict, BACKEND_PORT, CLIENT, FAR_BACKEND, FX0_MAC, FY0_MAC, NODE,
        SNAT_MAX, SNAT_MIN, UNRESOLVED_BACKEND, VIP, VIP_PORT,
    },
    packet::{
        field_diff, ArpPacket, Frame, FrameView, IcmpEcho, Ipv4Packet, TcpFlags, TcpSegment,
        Transport, UdpDatagram, VrrpAdvert, ETH_LEN,
    },
};

const CLIENT_MAC: [u8; 6] = [0x02, 0xbe, 198, 18, 0, 10];
const VIP_SOCK: (Ipv4Addr, u16) = (VIP, VIP_PORT);

fn client(port: u16) -> (Ipv4Addr, u16) {
    (CLIENT, port)
}

/// A SYN from the client's `port` to the VIP service, as it arrives on fx0.
fn syn(port: u16) -> Frame {
    Frame::tcp(CLIENT_MAC, FX0_MAC, client(port), VIP_SOCK, TcpFlags::SYN)
}

/// A client segment of flow `port` with `flags` (seq/ack after the handshake).
fn from_client(port: u16, flags: TcpFlags) -> Frame {
    Frame::tcp(CLIENT_MAC, FX0_MAC, client(port), VIP_SOCK, flags)
        .map_tcp(|t| t.with_seq(1001).with_ack(5001))
}

/// A segment of the backend of `flow` to this node's SNAT port.
fn from_backend(flow: &NatFlow, flags: TcpFlags) -> Frame {
    Frame::tcp(
        mac_of(flow.backend.0),
        FX0_MAC,
        flow.backend,
        flow.node(),
        flags,
    )
    .map_tcp(|t| t.with_seq(5001).with_ack(1001))
}

/// `f` as the program must send it to the backend of `flow`.
fn to_backend(f: &Frame, flow: &NatFlow) -> Frame {
    f.translated(FX0_MAC, mac_of(flow.backend.0), flow.node(), flow.backend)
}

/// `f` (from the backend) as the program must send it to the client.
fn to_client(f: &Frame, flow: &NatFlow) -> Frame {
    f.translated(FX0_MAC, CLIENT_MAC, VIP_SOCK, flow.client)
}

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
const PONG: &[u8] = b"+PONG\r\n";

#[test]
fn syn_to_vip_is_nated_to_a_remote_backend() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(3, &[backend(0)]))?;
        let syn = syn(40001);
        let flow = dp.open_flow(&syn)?;
        ensure!(flow.backend == (backend(0), BACKEND_PORT), "{flow:?}");
        ensure!((SNAT_MIN..=SNAT_MAX).contains(&flow.snat), "{flow:?}");
        // Exactly the SYN with node:snat -> backend:6380 and the MACs of
        // fx0 and the backend's neighbour entry; TTL, id, seq, options kept.
        let expected = to_backend(&syn, &flow).build();
        let observed = &flow.output;
        ensure!(
            observed.verdict == Verdict::Tx,
            "verdict {:?}",
            observed.verdict
        );
        let diff = field_diff(&observed.frame, &expected);
        ensure!(diff.is_empty(), "SYN rewrite differs:\n{}", diff.join("\n"));
        let errs = FrameView::checksum_errors(&observed.frame);
        ensure!(errs.is_empty(), "checksums: {errs:?}");

        // Both conntrack entries, as the contract describes them.
        let fwd = dp.flow(flow.client, VIP_SOCK)?.context("forward entry")?;
        ensure!(host_addr(fwd.nat_saddr) == NODE && host_addr(fwd.nat_daddr) == backend(0));
        ensure!(u16::from_be(fwd.nat_dport) == BACKEND_PORT);
        ensure!(fwd.ifindex == dp.fx0 && fwd.direction == DIR_TO_BACKEND);
        ensure!(
            fwd.eth_src == FX0_MAC && fwd.eth_dst == mac_of(backend(0)),
            "{fwd:?}"
        );
        ensure!(
            fwd.service_id == 3 && fwd.backend_slot == 0 && fwd.flags == 0,
            "{fwd:?}"
        );
        let rev = dp
            .flow(flow.backend, flow.node())?
            .context("reverse entry")?;
        ensure!(host_addr(rev.nat_saddr) == VIP && u16::from_be(rev.nat_sport) == VIP_PORT);
        ensure!(host_addr(rev.nat_daddr) == CLIENT && u16::from_be(rev.nat_dport) == 40001);
        ensure!(
            rev.ifindex == dp.fx0 && rev.direction == DIR_TO_CLIENT,
            "{rev:?}"
        );
        ensure!(
            rev.eth_src == FX0_MAC && rev.eth_dst == CLIENT_MAC,
            "{rev:?}"
        );
        ensure!(dp.flow_count()? == 2, "flows: {}", dp.flow_count()?);

        ensure!(dp.counter(counter::FLOWS_CREATED)? == 1);
        ensure!(dp.counter(counter::FORWARDED)? == 1);
        ensure!(dp.backend_stats(3, 0)?.new_flows == 1);
        Ok(())
    })
}

#[test]
fn a_flow_keeps_its_backend_and_replies_are_reverse_translated() -> Result<()> {
    with_dataplane(|dp| {
        // Two backends: round-robin would alternate, the flow must not.
        dp.set_vip_service(&active_service(0, &[backend(0), backend(1)]))?;
        let flow = dp.open_flow(&syn(40002))?;
        let other = if flow.backend.0 == backend(0) {
            backend(1)
        } else {
            backend(0)
        };

        let syn_ack = from_backend(&flow, TcpFlags::SYN_ACK);
        let ack = from_client(40002, TcpFlags::ACK);
        let data = from_client(40002, TcpFlags::PSH_ACK).map_tcp(|t| t.with_payload(PING));
        let padded_ack = from_client(40002, TcpFlags::ACK).padded_to(60);
        let tagged_ack = from_client(40002, TcpFlags::ACK).with_vlan(0);
        let pong = from_backend(&flow, TcpFlags::PSH_ACK).map_tcp(|t| t.with_payload(PONG));
        let retransmit = syn(40002);
        dp.check_table(&[
            Case::rewritten(
                "backend SYN-ACK to the client",
                &syn_ack,
                Verdict::Tx,
                &to_client(&syn_ack, &flow),
            )
            .counting(counter::REVERSED),
            Case::rewritten(
                "client ACK to the same backend and port",
                &ack,
                Verdict::Tx,
                &to_backend(&ack, &flow),
            )
            .counting(counter::FORWARDED),
            Case::rewritten(
                "client data to the same backend",
                &data,
                Verdict::Tx,
                &to_backend(&data, &flow),
            )
            .counting(counter::FORWARDED),
            Case::rewritten(
                "backend data back to the client",
                &pong,
                Verdict::Tx,
                &to_client(&pong, &flow),
            )
            .counting(counter::REVERSED),
            Case::rewritten(
                "ACK padded to 60 bytes keeps its padding",
                &padded_ack,
                Verdict::Tx,
                &to_backend(&padded_ack, &flow),
            ),
            Case::rewritten(
                "ACK with a VLAN 0 tag keeps it",
                &tagged_ack,
                Verdict::Tx,
                &to_backend(&tagged_ack, &flow),
            ),
            Case::rewritten(
                "retransmitted SYN reuses the flow",
                &retransmit,
                Verdict::Tx,
                &to_backend(&retransmit, &flow),
            )
            .counting(counter::FORWARDED),
        ])?;
        ensure!(dp.counter(counter::FLOWS_CREATED)? == 1);
        ensure!(dp.flow_count()? == 2);
        let stats = dp.backend_stats(0, u32::from(flow.slot))?;
        ensure!(stats.new_flows == 1);
        // Every packet reverse-NATed for this flow counts as a reply of its
        // backend (the path check's proof that frames to it arrive).
        let reversed = dp.counter(counter::REVERSED)?;
        ensure!(
            reversed > 0 && stats.replies == reversed,
            "backend replies {} for {reversed} reversed packets",
            stats.replies
        );

        // The next connection takes the other backend.
        let next = dp.open_flow(&syn(40003))?;
        ensure!(
            next.backend.0 == other,
            "second flow to {:?}, expected {other}",
            next.backend
        );
        Ok(())
    })
}

#[test]
fn syn_retransmission_reuses_the_snat_port() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0), backend(1), backend(2)]))?;
        let first = dp.open_flow(&syn(40010))?;
        for i in 0..3 {
            let again = dp.open_flow(&syn(40010))?;
            ensure!(
                (again.snat, again.backend) == (first.snat, first.backend),
                "retransmission {i}: {again:?}, first {first:?}"
            );
            ensure!(
                again.output == first.output,
                "retransmission {i}: different bytes"
            );
        }
        ensure!(dp.counter(counter::FLOWS_CREATED)? == 1);
        ensure!(dp.flow_count()? == 2);
        Ok(())
    })
}

/// After an RST: the forward entry is gone and the reverse entry, the SNAT
/// port's claim, is marked reset (free at once, for the CPU owning it to
/// take over).
fn expect_reset(dp: &Dataplane, flow: &NatFlow) -> Result<()> {
    ensure!(
        dp.flow(flow.client, VIP_SOCK)?.is_none(),
        "forward entry kept after RST"
    );
    let rev = dp
        .flow(flow.backend, flow.node())?
        .context("reverse entry after RST")?;
    ensure!(
        rev.flags & FLOW_RESET != 0,
        "reverse entry not reset: {rev:?}"
    );
    ensure!(
        dp.flow_count()? == 1,
        "entries left after RST: {}",
        dp.flow_count()?
    );
    Ok(())
}

#[test]
fn rst_from_the_client_forwards_then_forgets_the_flow() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let flow = dp.open_flow(&syn(40020))?;
        let rst = from_client(40020, TcpFlags::RST_ACK);
        let ack = from_client(40020, TcpFlags::ACK);
        let reply = from_backend(&flow, TcpFlags::ACK);
        dp.check_table(&[Case::rewritten(
            "client RST forwarded",
            &rst,
            Verdict::Tx,
            &to_backend(&rst, &flow),
        )
        .counting(counter::FLOWS_RESET)])?;
        expect_reset(dp, &flow)?;
        dp.check_table(&[
            Case::passes("ACK after RST passes unchanged", &ack).counting(counter::PASS_NO_FLOW),
            Case::passes("backend reply after RST passes unchanged", &reply)
                .counting(counter::PASS_NO_FLOW),
        ])?;
        Ok(())
    })
}

#[test]
fn rst_from_the_backend_forwards_then_forgets_the_flow() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let flow = dp.open_flow(&syn(40021))?;
        let rst = from_backend(&flow, TcpFlags::RST);
        dp.check_table(&[Case::rewritten(
            "backend RST reverse-translated",
            &rst,
            Verdict::Tx,
            &to_client(&rst, &flow),
        )
        .counting(counter::FLOWS_RESET)])?;
        expect_reset(dp, &flow)?;
        dp.check_table(&[Case::passes(
            "client ACK after RST passes",
            &from_client(40021, TcpFlags::ACK),
        )])
    })
}

#[test]
fn fin_both_ways_closes_the_flow_after_the_closing_timeout() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let flow = dp.open_flow(&syn(40030))?;
        let fin = from_client(40030, TcpFlags::FIN_ACK);
        dp.check(&Case::rewritten(
            "client FIN forwarded",
            &fin,
            Verdict::Tx,
            &to_backend(&fin, &flow),
        ))?;
        for (name, e) in [
            ("forward", dp.flow(flow.client, VIP_SOCK)?),
            ("reverse", dp.flow(flow.backend, flow.node())?),
        ] {
            let e = e.with_context(|| format!("{name} entry after one FIN"))?;
            ensure!(
                e.flags & FLOW_BOTH_FIN == FLOW_CLIENT_FIN,
                "{name} entry after the client's FIN: {e:?}"
            );
        }

        let bfin = from_backend(&flow, TcpFlags::FIN_ACK);
        dp.check(&Case::rewritten(
            "backend FIN reversed",
            &bfin,
            Verdict::Tx,
            &to_client(&bfin, &flow),
        ))?;
        for (name, e) in [
            ("forward", dp.flow(flow.client, VIP_SOCK)?),
            ("reverse", dp.flow(flow.backend, flow.node())?),
        ] {
            let e = e.with_context(|| format!("{name} entry after both FINs"))?;
            ensure!(
                e.flags & (FLOW_BOTH_FIN | FLOW_BACKEND_FIRST | FLOW_REPLIED)
                    == FLOW_BOTH_FIN | FLOW_REPLIED,
                "{name} entry not closing, client first: {e:?}"
            );
        }
        // Within the closing timeout the last ACK still goes through.
        let last_ack =
            from_client(40030, TcpFlags::ACK).map_tcp(|t| t.with_seq(1002).with_ack(5002));
        dp.check(&Case::rewritten(
            "last ACK within the closing timeout",
            &last_ack,
            Verdict::Tx,
            &to_backend(&last_ack, &flow),
        ))?;

        let fwd = dp.flow(flow.client, VIP_SOCK)?.context("forward entry")?;
        ensure!(fwd.flags & FLOW_LAST_ACK != 0, "last ACK not seen: {fwd:?}");
        // Grace after the last ACK 0: the next packet finds the flow expired.
        let mut s = dp.settings()?;
        s.holds.close_grace_ns = 0;
        dp.set_settings(s)?;
        let expired_before = dp.counter(counter::FLOWS_EXPIRED)?;
        dp.check(
            &Case::passes("ACK after the closing timeout passes unchanged", &last_ack)
                .counting(counter::PASS_NO_FLOW),
        )?;
        ensure!(dp.counter(counter::FLOWS_EXPIRED)? == expired_before + 1);
        // The reverse entry stays for its owning CPU to take over.
        ensure!(dp.flow_count()? == 1, "entries left: {}", dp.flow_count()?);
        dp.check(&Case::passes(
            "backend segment after expiry passes",
            &from_backend(&flow, TcpFlags::ACK),
        ))?;
        Ok(())
    })
}

#[test]
fn a_new_syn_on_a_closing_tuple_opens_a_fresh_flow() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let old = dp.open_flow(&syn(40035))?;
        for (name, frame) in [
            ("client FIN", from_client(40035, TcpFlags::FIN_ACK)),
            ("backend FIN", from_backend(&old, TcpFlags::FIN_ACK)),
        ] {
            let out = dp.run(&frame)?;
            ensure!(out.verdict == Verdict::Tx, "{name}: {:?}", out.verdict);
        }
        // The client reuses its port (TIME-WAIT reuse): not a retransmission.
        let new = dp.open_flow(&syn(40035))?;
        let fwd = dp
            .flow(new.client, VIP_SOCK)?
            .context("new forward entry")?;
        ensure!(fwd.flags == 0, "new flow inherited flags {:#x}", fwd.flags);
        ensure!(dp.counter(counter::FLOWS_CREATED)? == 2);
        ensure!(new.snat != old.snat, "the closing flow's port was reused");
        // The old reverse entry keeps its port for its closing hold.
        ensure!(
            dp.flow_count()? == 3,
            "entries: {} (new forward and reverse, old reverse)",
            dp.flow_count()?
        );
        ensure!(dp.flow(old.backend, old.node())?.is_some());
        Ok(())
    })
}

/// The agent's sweeper on the real table: a flow closed in both directions
/// loses its forward entry after the closing hold, a live flow stays until
/// its own hold, and reverse entries (SNAT port claims) are never deleted.
#[test]
fn the_agents_sweep_deletes_expired_flows_and_keeps_live_ones() -> Result<()> {
    use balancer_user::conntrack::FlowTimeouts;
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let live = dp.open_flow(&syn(40060))?;
        let closing = dp.open_flow(&syn(40061))?;
        for (name, frame) in [
            ("client FIN", from_client(40061, TcpFlags::FIN_ACK)),
            ("backend FIN", from_backend(&closing, TcpFlags::FIN_ACK)),
        ] {
            let out = dp.run(&frame)?;
            ensure!(out.verdict == Verdict::Tx, "{name}: {:?}", out.verdict);
        }
        let hour = 3600 * 1_000_000_000;
        let holds = |closing_ns, embryonic_ns| FlowTimeouts {
            idle_ns: hour,
            closing_ns,
            close_grace_ns: hour,
            time_wait_ns: hour,
            embryonic_ns,
        };
        let report = dp.sweep(holds(0, hour));
        ensure!(
            report.entries == 4 && report.deleted == 1,
            "closing hold 0: {report:?}"
        );
        ensure!(
            dp.flow(closing.client, VIP_SOCK)?.is_none(),
            "closed flow kept"
        );
        ensure!(
            dp.flow(closing.backend, closing.node())?.is_some(),
            "closed flow's reverse entry deleted by the sweep"
        );
        ensure!(dp.flow(live.client, VIP_SOCK)?.is_some(), "live flow swept");
        // The live flow's port counts as held, the closed one's not.
        let held: u32 = report.snat_in_use.values().sum();
        ensure!(held == 1, "ports held: {:?}", report.snat_in_use);
        let report = dp.sweep(holds(hour, hour));
        ensure!(report.deleted == 0, "nothing expired: {report:?}");
        // The live flow's SYN was never answered: the embryonic hold. Its
        // port is free then; the closed flow's is held again (closing hold
        // back to an hour).
        let report = dp.sweep(holds(hour, 0));
        ensure!(report.deleted == 1, "embryonic hold 0: {report:?}");
        let held: u32 = report.snat_in_use.values().sum();
        ensure!(held == 1, "ports held: {:?}", report.snat_in_use);
        let report = dp.sweep(holds(0, 0));
        ensure!(report.snat_in_use.is_empty(), "{:?}", report.snat_in_use);
        ensure!(dp.flow_count()? == 2, "entries: {}", dp.flow_count()?);
        Ok(())
    })
}

#[test]
fn an_idle_flow_is_forgotten() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let flow = dp.open_flow(&syn(40040))?;
        let synack = from_backend(&flow, TcpFlags::SYN_ACK);
        ensure!(dp.run(&synack)?.verdict == Verdict::Tx, "SYN-ACK");
        let ack = from_client(40040, TcpFlags::ACK);
        dp.check(&Case::rewritten(
            "ACK within the idle timeout",
            &ack,
            Verdict::Tx,
            &to_backend(&ack, &flow),
        ))?;
        // The data plane's clock has tick resolution (bpf_ktime_get_coarse_ns),
        // so a timeout of zero is the only one sure to have passed already.
        let mut s = dp.settings()?;
        s.holds.idle_ns = 0;
        dp.set_settings(s)?;
        dp.check(
            &Case::passes("ACK after the idle timeout passes unchanged", &ack)
                .counting(counter::FLOWS_EXPIRED),
        )?;
        ensure!(dp.flow_count()? == 1, "entries left: {}", dp.flow_count()?);
        dp.check(&Case::passes(
            "backend reply after expiry passes",
            &from_backend(&flow, TcpFlags::ACK),
        ))?;
        Ok(())
    })
}

#[test]
fn syn_choosing_the_local_backend_passes_unchanged() -> Result<()> {
    with_dataplane(|dp| {
        // Slot 0 is this node, slot 1 remote: the first SYN (whatever the
        // cursor) of two consecutive ones is local.
        dp.set_vip_service(&active_service(2, &[NODE, backend(1)]))?;
        let mut local = None;
        for port in [40050, 40051] {
            let out = dp.run(&syn(port))?;
            match out.verdict {
                Verdict::Pass => {
                    ensure!(out.frame == syn(port).build(), "local SYN was modified");
                    local = Some(port);
                }
                Verdict::Tx => {}
                v => anyhow::bail!("SYN {port}: verdict {v:?}"),
            }
        }
        let port = local.context("no SYN of two went to the local backend")?;
        ensure!(
            dp.flow(client(port), VIP_SOCK)?.is_none(),
            "local flow has a conntrack entry"
        );
        ensure!(dp.flow_count()? == 2, "only the remote flow has entries");
        ensure!(dp.counter(counter::PASS_LOCAL_BACKEND)? == 1);
        ensure!(dp.backend_stats(2, 0)?.new_flows == 1);
        ensure!(dp.backend_stats(2, 1)?.new_flows == 1);
        // Only the local backend: every SYN passes unchanged.
        dp.set_vip_service(&active_service(2, &[NODE]))?;
        dp.check_table(&[
            Case::passes("SYN to the only (local) backend", &syn(40052))
                .counting(counter::PASS_LOCAL_BACKEND),
            Case::passes("ACK of a local flow", &from_client(40052, TcpFlags::ACK))
                .counting(counter::PASS_NO_FLOW),
        ])?;
        ensure!(dp.flow_count()? == 2);
        Ok(())
    })
}

/// Sends `rounds * ready.len()` SYNs to `vip_port` and checks the shares
/// and the order: strictly following `ready`, from wherever the cursor is.
fn round_robin(
    dp: &mut Dataplane,
    id: u32,
    vip_port: u16,
    n: usize,
    ready: &[u8],
    rounds: usize,
) -> Result<()> {
    let addrs: Vec<Ipv4Addr> = (0..n).map(backend).collect();
    let mut svc = active_service(id, &addrs);
    svc.ready = [0; 16];
    svc.ready[..ready.len()].copy_from_slice(ready);
    svc.ready_count = ready.len() as u32;
    dp.set_service(VIP, vip_port, &svc)?;
    let mut chosen = Vec::new();
    for i in 0..rounds * ready.len() {
        let sport = 30000 + (id as u16) * 1000 + i as u16;
        let f = Frame::tcp(
            CLIENT_MAC,
            FX0_MAC,
            client(sport),
            (VIP, vip_port),
            TcpFlags::SYN,
        );
        let out = dp.run(&f)?;
        ensure!(
            out.verdict == Verdict::Tx,
            "SYN {i}: verdict {:?}",
            out.verdict
        );
        let view = FrameView::parse(&out.frame)?;
        let dst = view.ipv4.context("IPv4 output")?.dst;
        let slot = addrs
            .iter()
            .position(|a| *a == dst)
            .with_context(|| format!("SYN {i} to {dst}"))?;
        chosen.push(slot as u8);
    }
    let start = ready
        .iter()
        .position(|s| *s == chosen[0])
        .context("first choice not READY")?;
    for (i, slot) in chosen.iter().enumerate() {
        let want = ready[(start + i) % ready.len()];
        ensure!(*slot == want, "{n} backends: SYN {i} went to slot {slot}, round-robin says {want}; sequence {chosen:?}");
    }
    let mut shares: BTreeMap<u8, usize> = BTreeMap::new();
    for s in &chosen {
        *shares.entry(*s).or_default() += 1;
    }
    for slot in 0..n as u8 {
        let want = if ready.contains(&slot) { rounds } else { 0 };
        ensure!(
            shares.get(&slot).copied().unwrap_or(0) == want,
            "{n} backends: shares {shares:?}"
        );
        let stats = dp.backend_stats(id, u32::from(slot))?;
        ensure!(
            stats.new_flows == want as u64,
            "{n} backends: slot {slot} new_flows {} expected {want}",
            stats.new_flows
        );
    }
    Ok(())
}

#[test]
fn round_robin_gives_exact_equal_shares() -> Result<()> {
    with_dataplane(|dp| {
        round_robin(dp, 1, 6381, 2, &[0, 1], 8)?;
        round_robin(dp, 2, 6382, 3, &[2, 0, 1], 8)?;
        round_robin(dp, 3, 6383, 16, &(0..16).collect::<Vec<u8>>(), 4)?;
        // Only READY slots are chosen, in the order of `ready`.
        round_robin(dp, 4, 6384, 3, &[2, 0], 5)?;
        Ok(())
    })
}

#[test]
fn no_ready_backend_drops_the_syn() -> Result<()> {
    with_dataplane(|dp| {
        let mut svc = active_service(0, &[backend(0), backend(1)]);
        svc.ready_count = 0;
        dp.set_vip_service(&svc)?;
        dp.check_table(&[
            Case::new(
                "SYN with no READY backend",
                &syn(40060),
                Verdict::Drop,
                Expected::Unchanged,
            )
            .counting(counter::DROP_NO_BACKEND),
            Case::new("again", &syn(40061), Verdict::Drop, Expected::Unchanged)
                .counting(counter::DROP_NO_BACKEND),
        ])?;
        ensure!(dp.flow_count()? == 0);
        Ok(())
    })
}

#[test]
fn unresolved_backend_drops_before_any_rewrite() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[UNRESOLVED_BACKEND]))?;
        dp.check(
            &Case::new(
                "SYN to a backend without neighbour entry",
                &syn(40070),
                Verdict::Drop,
                Expected::Unchanged,
            )
            .counting(counter::DROP_FIB),
        )?;
        ensure!(dp.flow_count()? == 0, "entries left: {}", dp.flow_count()?);
        Ok(())
    })
}

#[test]
fn traffic_not_for_the_service_passes_unchanged() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let other_ip = Ipv4Addr::new(198, 18, 0, 101);
        let tcp_to = |dst: (Ipv4Addr, u16)| {
            Frame::tcp(CLIENT_MAC, FX0_MAC, client(41000), dst, TcpFlags::SYN)
        };
        let ip_to_vip =
            |t: Transport| Frame::ipv4(CLIENT_MAC, FX0_MAC, Ipv4Packet::new(CLIENT, VIP, t));
        let arp = Frame::arp(
            CLIENT_MAC,
            [0xff; 6],
            ArpPacket {
                operation: 1,
                sender_mac: CLIENT_MAC,
                sender_ip: CLIENT,
                target_mac: [0; 6],
                target_ip: VIP,
            },
        );
        let vrrp = Frame::ipv4(
            mac_of(backend(0)),
            [0x01, 0x00, 0x5e, 0x00, 0x00, 0x12],
            Ipv4Packet::vrrp(
                backend(0),
                VrrpAdvert {
                    vrid: 51,
                    priority: 100,
                    max_advert_int: 100,
                    addresses: vec![VIP],
                },
            ),
        );
        let icmp = ip_to_vip(Transport::IcmpEcho(IcmpEcho {
            id: 1,
            seq: 1,
            payload: vec![0x5a; 56],
        }));
        let udp = ip_to_vip(Transport::Udp(UdpDatagram {
            sport: 41000,
            dport: VIP_PORT,
            payload: PING.to_vec(),
        }));
        let first_fragment = syn(41001).map_ip(|p| p.with_fragment(true, 0));
        let later_fragment = syn(41002).map_ip(|p| p.with_fragment(false, 185));
        let middle_fragment = syn(41003).map_ip(|p| p.with_fragment(true, 3));
        // Router alert (RFC 2113), then a NOP-padded timestamp-less filler.
        let with_options = syn(41004).map_ip(|p| p.with_options(&[0x94, 0x04, 0x00, 0x00]));
        let with_nop_options = syn(41005).map_ip(|p| p.with_options(&[0x01, 0x01, 0x01, 0x00]));
        let tagged_other = tcp_to((other_ip, VIP_PORT)).with_vlan(100);
        let tagged_arp = arp.clone().with_vlan(100);
        dp.check_table(&[
            Case::passes("SYN to another address", &tcp_to((other_ip, VIP_PORT)))
                .counting(counter::PASS_NOT_SERVICE),
            Case::passes("SYN to the VIP, another port", &tcp_to((VIP, 6381)))
                .counting(counter::PASS_NOT_SERVICE),
            Case::passes("SYN to the node itself", &tcp_to((NODE, 22)))
                .counting(counter::PASS_NOT_SERVICE),
            Case::passes("ARP request for the VIP", &arp).counting(counter::PASS_NOT_IPV4),
            Case::passes("VRRP advertisement", &vrrp).counting(counter::PASS_NOT_TCP),
            Case::passes("ICMP echo to the VIP", &icmp).counting(counter::PASS_NOT_TCP),
            Case::passes("UDP to VIP:6380", &udp).counting(counter::PASS_NOT_TCP),
            Case::passes("first fragment (MF) of a SYN to the VIP", &first_fragment)
                .counting(counter::PASS_FRAGMENT),
            Case::passes("last fragment (offset 185) to the VIP", &later_fragment)
                .counting(counter::PASS_FRAGMENT),
            Case::passes(
                "middle fragment (MF, offset 3) to the VIP",
                &middle_fragment,
            )
            .counting(counter::PASS_FRAGMENT),
            Case::passes("SYN to the VIP with IP options", &with_options)
                .counting(counter::PASS_IP_OPTIONS),
            Case::passes("SYN to the VIP with NOP IP options", &with_nop_options)
                .counting(counter::PASS_IP_OPTIONS),
            Case::passes("VLAN-tagged SYN to another address", &tagged_other)
                .counting(counter::PASS_NOT_SERVICE),
            Case::passes("VLAN-tagged ARP", &tagged_arp).counting(counter::PASS_NOT_IPV4),
            Case::passes(
                "ACK to the VIP without a flow",
                &from_client(41006, TcpFlags::ACK),
            )
            .counting(counter::PASS_NO_FLOW),
            Case::passes(
                "segment to an SNAT port without a flow",
                &Frame::tcp(
                    mac_of(backend(0)),
                    FX0_MAC,
                    (backend(0), BACKEND_PORT),
                    (NODE, SNAT_MIN),
                    TcpFlags::ACK,
                ),
            )
            .counting(counter::PASS_NO_FLOW),
        ])?;
        ensure!(
            dp.flow_count()? == 0,
            "entries created: {}",
            dp.flow_count()?
        );
        Ok(())
    })
}

#[test]
fn vlan_tagged_syn_to_the_vip_is_nated_with_its_tag() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let tagged = syn(41100).with_vlan(100);
        let flow = dp.open_flow(&tagged)?;
        dp.check(&Case::rewritten(
            "tagged SYN (retransmission) NATed, tag kept",
            &tagged,
            Verdict::Tx,
            &to_backend(&tagged, &flow),
        ))?;
        ensure!(
            FrameView::parse(&flow.output.frame)?.vlan == Some(100),
            "tag lost"
        );
        let reply = from_backend(&flow, TcpFlags::SYN_ACK).with_vlan(100);
        dp.check(&Case::rewritten(
            "tagged reply reverse-translated, tag kept",
            &reply,
            Verdict::Tx,
            &to_client(&reply, &flow),
        ))?;
        Ok(())
    })
}

/// Every truncation of `frame` (1..len-1 bytes) passes or drops, unchanged.
/// Below 14 bytes the kernel refuses the run itself (EINVAL): the program
/// never sees such a frame.
fn check_truncations(dp: &Dataplane, name: &str, frame: &[u8], ingress: Ingress) -> Result<()> {
    for len in 1..frame.len() {
        let cut = &frame[..len];
        match dp.try_run(cut, ingress) {
            Ok(out) => {
                ensure!(
                    matches!(out.verdict, Verdict::Pass | Verdict::Drop),
                    "{name} cut to {len} bytes: verdict {:?}",
                    out.verdict
                );
                ensure!(
                    out.frame == cut,
                    "{name} cut to {len} bytes was rewritten:\n{}",
                    field_diff(&out.frame, cut).join("\n")
                );
            }
            Err(e) if len < ETH_LEN => {
                let einval = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .and_then(|io| io.raw_os_error())
                    == Some(libc::EINVAL);
                ensure!(einval, "{name} cut to {len} bytes: {e:#}");
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("{name} cut to {len} bytes")))
            }
        }
    }
    Ok(())
}

#[test]
fn every_truncation_passes_or_drops_without_rewriting() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let flow = dp.open_flow(&syn(41200))?;
        let created = dp.counter(counter::FLOWS_CREATED)?;
        let entries = dp.flow_count()?;
        let data = from_client(41200, TcpFlags::PSH_ACK).map_tcp(|t| t.with_payload(PING));
        let reply = from_backend(&flow, TcpFlags::PSH_ACK).map_tcp(|t| t.with_payload(PONG));
        let reply_syn_ack = from_backend(&flow, TcpFlags::SYN_ACK)
            .map_tcp(|t| t.with_options(TcpSegment::syn(0, 0).options));
        check_truncations(dp, "new SYN", &syn(41201).build(), Ingress::Fx0)?;
        check_truncations(
            dp,
            "tagged new SYN",
            &syn(41202).with_vlan(7).build(),
            Ingress::Fx0,
        )?;
        check_truncations(dp, "data of the flow", &data.build(), Ingress::Fx0)?;
        check_truncations(dp, "reply", &reply.build(), Ingress::Fx0)?;
        check_truncations(
            dp,
            "reply SYN-ACK with options",
            &reply_syn_ack.build(),
            Ingress::Fx0,
        )?;
        ensure!(
            dp.counter(counter::FLOWS_CREATED)? == created,
            "a truncated SYN created a flow"
        );
        ensure!(dp.flow_count()? == entries, "conntrack changed");
        // The whole frames still work afterwards.
        dp.check(&Case::rewritten(
            "untruncated reply",
            &reply,
            Verdict::Tx,
            &to_client(&reply, &flow),
        ))?;
        Ok(())
    })
}

#[test]
fn inactive_holder_passes_vip_traffic_unchanged() -> Result<()> {
    with_dataplane(|dp| {
        let mut svc = active_service(0, &[backend(0)]);
        dp.set_vip_service(&svc)?;
        let flow = dp.open_flow(&syn(41300))?;
        svc.flags = 0;
        dp.set_vip_service(&svc)?;
        dp.check_table(&[
            Case::passes("SYN to the VIP while not holder", &syn(41301))
                .counting(counter::PASS_INACTIVE),
            Case::passes(
                "ACK of an existing flow while not holder",
                &from_client(41300, TcpFlags::ACK),
            )
            .counting(counter::PASS_INACTIVE),
        ])?;
        ensure!(
            dp.flow(client(41301), VIP_SOCK)?.is_none(),
            "inactive SYN created a flow"
        );
        ensure!(
            dp.flow(flow.client, VIP_SOCK)?.is_some(),
            "existing flow dropped"
        );
        Ok(())
    })
}

/// Sets an SNAT range in which this CPU's partition holds exactly `per_cpu`
/// ports, and returns them in cursor order.
fn partition_of_size(dp: &mut Dataplane, per_cpu: u16) -> Result<Vec<u16>> {
    let mut s = dp.settings()?;
    let parts = s.snat_partitions.max(1) as u16;
    s.snat_port_min = 40000;
    s.snat_port_max = 40000 + parts * per_cpu - 1;
    dp.set_settings(s)?;
    let cpu = dp.cpu as u16;
    Ok((0..per_cpu).map(|k| 40000 + cpu + k * parts).collect())
}

#[test]
fn snat_exhaustion_is_counted_and_never_reuses_a_port_in_use() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let mine = partition_of_size(dp, 4)?;
        let mut in_use: BTreeMap<u16, u16> = BTreeMap::new(); // snat -> client port
        for cport in 50001..=50004 {
            let f = dp.open_flow(&syn(cport))?;
            ensure!(
                in_use.insert(f.snat, cport).is_none(),
                "port {} given twice: {in_use:?}",
                f.snat
            );
        }
        // Only this CPU's partition, in cursor order.
        ensure!(
            in_use.keys().copied().eq(mine.iter().copied()),
            "ports {in_use:?}, partition {mine:?}"
        );
        dp.check(
            &Case::new(
                "5th SYN with the 4 ports of this CPU in use",
                &syn(50005),
                Verdict::Drop,
                Expected::Unchanged,
            )
            .counting(counter::DROP_SNAT_EXHAUSTED),
        )?;
        ensure!(
            dp.flow(client(50005), VIP_SOCK)?.is_none(),
            "dropped SYN left a forward entry"
        );
        ensure!(dp.flow_count()? == 8, "entries: {}", dp.flow_count()?);

        // Free ports one at a time by RST; each next SYN gets exactly it.
        let mut next_client = 50010;
        for round in 0..6 {
            let (&freed, &cport) = in_use.iter().nth(round % 4).context("a flow")?;
            let rst = from_client(cport, TcpFlags::RST);
            let out = dp.run(&rst)?;
            ensure!(
                out.verdict == Verdict::Tx,
                "RST of {cport}: {:?}",
                out.verdict
            );
            in_use.remove(&freed);
            let reclaimed = dp.counter(counter::SNAT_RECLAIMED)?;
            let f = dp.open_flow(&syn(next_client))?;
            ensure!(
                f.snat == freed,
                "round {round}: freed {freed}, new flow got {}",
                f.snat
            );
            ensure!(dp.counter(counter::SNAT_RECLAIMED)? == reclaimed + 1);
            in_use.insert(f.snat, next_client);
            next_client += 1;
            dp.check(
                &Case::new(
                    "SYN while exhausted again",
                    &syn(next_client),
                    Verdict::Drop,
                    Expected::Unchanged,
                )
                .counting(counter::DROP_SNAT_EXHAUSTED),
            )?;
            next_client += 1;
        }
        ensure!(dp.flow_count()? == 8, "entries: {}", dp.flow_count()?);
        Ok(())
    })
}

/// Which hold of [`balancer_common::HoldTimes`] a state is under.
type HoldField = fn(&mut balancer_common::HoldTimes) -> &mut u64;

/// One SNAT port for this CPU and one flow holding it, driven through
/// `close` (frames run in order, each must be forwarded) into a state with
/// reverse-entry flags `expect_flags`. With every other hold 0 and this
/// state's (`hold`) an hour, a new SYN is dropped for want of a port: the
/// port is held by exactly this state's rule. With `hold` 0 too, the next
/// SYN gets the port, taken over from the old flow. `hold: None`: the state
/// frees the port at once, whatever the holds.
fn port_held_by(
    name: &'static str,
    close: fn(&NatFlow) -> Vec<Frame>,
    expect_flags: u32,
    hold: Option<HoldField>,
) -> Result<()> {
    const HOUR: u64 = 3_600_000_000_000;
    with_dataplane(move |dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let mine = partition_of_size(dp, 1)?;
        let flow = dp.open_flow(&syn(42001))?;
        ensure!(
            flow.snat == mine[0],
            "{name}: got {}, partition {mine:?}",
            flow.snat
        );
        for frame in close(&flow) {
            let out = dp.run(&frame)?;
            ensure!(
                out.verdict == Verdict::Tx,
                "{name}: {:?} for {frame:?}",
                out.verdict
            );
        }
        let rev = dp
            .flow(flow.backend, flow.node())?
            .with_context(|| format!("{name}: reverse entry"))?;
        ensure!(
            rev.flags == expect_flags,
            "{name}: flags {:#x}, expected {expect_flags:#x}",
            rev.flags
        );
        let mut s = dp.settings()?;
        s.holds = balancer_common::HoldTimes::default();
        if let Some(field) = hold {
            *field(&mut s.holds) = HOUR;
            dp.set_settings(s)?;
            dp.check(
                &Case::new(
                    format!("{name}: SYN while the port is held"),
                    &syn(42002),
                    Verdict::Drop,
                    Expected::Unchanged,
                )
                .counting(counter::DROP_SNAT_EXHAUSTED),
            )?;
            *field(&mut s.holds) = 0;
        }
        // Idle 0 as well would not show which rule freed the port; an
        // hour keeps it out of the reset case.
        if hold.is_none() {
            s.holds = balancer_common::HoldTimes {
                idle_ns: HOUR,
                closing_ns: HOUR,
                close_grace_ns: HOUR,
                time_wait_ns: HOUR,
                embryonic_ns: HOUR,
            };
        }
        dp.set_settings(s)?;
        let reclaimed = dp.counter(counter::SNAT_RECLAIMED)?;
        let next = dp.open_flow(&syn(42003))?;
        ensure!(next.snat == flow.snat, "{name}: new flow got {}", next.snat);
        ensure!(dp.counter(counter::SNAT_RECLAIMED)? == reclaimed + 1);
        let fresh = dp
            .flow(next.backend, next.node())?
            .with_context(|| format!("{name}: new reverse entry"))?;
        ensure!(
            fresh.flags == 0 && fresh.nat_dport == 42003u16.to_be(),
            "{name}: new reverse entry {fresh:?}"
        );
        Ok(())
    })
}

fn handshake(flow: &NatFlow) -> Vec<Frame> {
    vec![
        from_backend(flow, TcpFlags::SYN_ACK),
        from_client(flow.client.1, TcpFlags::ACK),
    ]
}

#[test]
fn an_unanswered_syn_holds_its_port_for_the_embryonic_timeout() -> Result<()> {
    port_held_by(
        "unanswered SYN",
        |_| vec![],
        0,
        Some(|h| &mut h.embryonic_ns),
    )
}

#[test]
fn an_answered_flow_holds_its_port_for_the_idle_timeout() -> Result<()> {
    port_held_by(
        "answered, idle",
        handshake,
        FLOW_REPLIED,
        Some(|h| &mut h.idle_ns),
    )
}

#[test]
fn client_closing_first_holds_until_the_final_ack_then_a_short_grace() -> Result<()> {
    port_held_by(
        "client FIN, backend FIN, no final ACK",
        |f| {
            let mut v = handshake(f);
            v.push(from_client(f.client.1, TcpFlags::FIN_ACK));
            v.push(from_backend(f, TcpFlags::FIN_ACK));
            v
        },
        FLOW_REPLIED | FLOW_BOTH_FIN,
        Some(|h| &mut h.closing_ns),
    )?;
    port_held_by(
        "client FIN, backend FIN, final ACK",
        |f| {
            let mut v = handshake(f);
            v.push(from_client(f.client.1, TcpFlags::FIN_ACK));
            v.push(from_backend(f, TcpFlags::FIN_ACK));
            v.push(from_client(f.client.1, TcpFlags::ACK));
            v
        },
        FLOW_REPLIED | FLOW_BOTH_FIN | FLOW_LAST_ACK,
        Some(|h| &mut h.close_grace_ns),
    )
}

#[test]
fn backend_closing_first_holds_its_port_for_the_backends_time_wait() -> Result<()> {
    port_held_by(
        "backend FIN, client FIN, backend ACK",
        |f| {
            let mut v = handshake(f);
            v.push(from_backend(f, TcpFlags::FIN_ACK));
            v.push(from_client(f.client.1, TcpFlags::FIN_ACK));
            v.push(from_backend(f, TcpFlags::ACK));
            v
        },
        FLOW_REPLIED | FLOW_BOTH_FIN | FLOW_BACKEND_FIRST,
        Some(|h| &mut h.time_wait_ns),
    )
}

#[test]
fn rst_either_way_frees_the_port_at_once() -> Result<()> {
    port_held_by(
        "client RST",
        |f| {
            let mut v = handshake(f);
            v.push(from_client(f.client.1, TcpFlags::RST_ACK));
            v
        },
        FLOW_REPLIED | FLOW_RESET,
        None,
    )?;
    port_held_by(
        "backend RST",
        |f| {
            let mut v = handshake(f);
            v.push(from_backend(f, TcpFlags::RST));
            v
        },
        FLOW_REPLIED | FLOW_RESET,
        None,
    )
}

#[test]
fn backend_on_another_interface_is_reached_by_redirect() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[FAR_BACKEND]))?;
        let syn = syn(41400);
        let out = dp.run(&syn)?;
        ensure!(
            out.verdict == Verdict::Redirect,
            "verdict {:?}",
            out.verdict
        );
        let fwd = dp.flow(client(41400), VIP_SOCK)?.context("forward entry")?;
        ensure!(
            fwd.ifindex == dp.fy0,
            "forward ifindex {} (fy0 is {})",
            fwd.ifindex,
            dp.fy0
        );
        let snat = u16::from_be(fwd.nat_sport);
        let flow = NatFlow {
            client: client(41400),
            vip: VIP_SOCK,
            snat,
            backend: (FAR_BACKEND, BACKEND_PORT),
            slot: 0,
            output: out.clone(),
        };
        // On fy0 the node's address is 198.18.1.1, but NAT uses node_addr.
        let expected = syn.translated(FY0_MAC, mac_of(FAR_BACKEND), flow.node(), flow.backend);
        let diff = field_diff(&out.frame, &expected.build());
        ensure!(
            diff.is_empty(),
            "redirected SYN differs:\n{}",
            diff.join("\n")
        );
        ensure!(FrameView::checksum_errors(&out.frame).is_empty());
        let ack = from_client(41400, TcpFlags::ACK);
        let reply = Frame::tcp(
            mac_of(FAR_BACKEND),
            FY0_MAC,
            flow.backend,
            flow.node(),
            TcpFlags::SYN_ACK,
        );
        dp.check_table(&[
            Case::rewritten(
                "ACK redirected to fy0",
                &ack,
                Verdict::Redirect,
                &ack.translated(FY0_MAC, mac_of(FAR_BACKEND), flow.node(), flow.backend),
            ),
            Case::rewritten(
                "reply from fy0 redirected to the client on fx0",
                &reply,
                Verdict::Redirect,
                &reply.translated(FX0_MAC, CLIENT_MAC, VIP_SOCK, flow.client),
            )
            .on(Ingress::Fy0),
        ])
    })
}

#[test]
fn scheduler_first_sends_every_new_connection_to_the_first_ready_backend() -> Result<()> {
    with_dataplane(|dp| {
        let backends = [backend(1), backend(2), backend(3)];
        let mut svc = active_service(4, &backends);
        svc.flags |= SERVICE_SCHEDULER_FIRST;
        dp.set_vip_service(&svc)?;
        for port in 40200..40206 {
            let flow = dp.open_flow(&syn(port))?;
            ensure!(
                flow.slot == 0 && flow.backend.0 == backends[0],
                "SYN {port} went to slot {} ({:?}), not the first backend",
                flow.slot,
                flow.backend
            );
        }
        // The first backend leaves the READY set: the next one in
        // configured order takes every new connection.
        svc.ready[..2].copy_from_slice(&[1, 2]);
        svc.ready_count = 2;
        dp.set_vip_service(&svc)?;
        for port in 40210..40214 {
            let flow = dp.open_flow(&syn(port))?;
            ensure!(
                flow.slot == 1,
                "SYN {port} went to slot {}, not slot 1",
                flow.slot
            );
        }
        ensure!(dp.backend_stats(4, 0)?.new_flows == 6);
        ensure!(dp.backend_stats(4, 1)?.new_flows == 4);
        ensure!(dp.backend_stats(4, 2)?.new_flows == 0);
        Ok(())
    })
}

/// Every online CPU creates flows at once, each from its own thread pinned
/// there, and resets each flow once `WINDOW` newer ones exist, so ports are
/// freed and taken over on every CPU at the same time. No port may ever be
/// handed to two live flows: each CPU gets only ports of its own partition,
/// within a CPU a port goes to a new flow only after its holder was reset,
/// and at the end the table holds one live flow per (backend, port).
#[test]
fn concurrent_cpus_never_hand_one_port_to_two_live_flows() -> Result<()> {
    const WINDOW: usize = 24;
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0), backend(1)]))?;
        // 16 ports per CPU and backend; at most 13 live per CPU and backend.
        partition_of_size(dp, 16)?;
        let s = dp.settings()?;
        let parts = s.snat_partitions as usize;
        let cpus: Vec<usize> = aya::util::online_cpus()
            .map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?
            .into_iter()
            .map(|c| c as usize)
            .filter(|c| *c < parts)
            .collect();
        ensure!(!cpus.is_empty(), "no online CPU");
        // Client ports: a block per CPU.
        let block = 60_000 / (cpus.iter().max().unwrap() + 1);
        let syns = block.min(3000);
        let cport = |cpu: usize, i: usize| (2000 + cpu * block + i) as u16;
        // Frame `idx` of a CPU: SYN 0..WINDOW, then SYN i and RST of flow
        // i - WINDOW alternately.
        let step = |idx: usize| -> (bool, usize) {
            if idx < WINDOW {
                (true, idx)
            } else {
                let j = idx - WINDOW;
                if j.is_multiple_of(2) {
                    (true, WINDOW + j / 2)
                } else {
                    (false, j / 2)
                }
            }
        };
        let total = WINDOW + 2 * (syns - WINDOW);
        let reclaimed = dp.counter(counter::SNAT_RECLAIMED)?;
        let results = dp.run_concurrently(&cpus, |cpu, idx, _| {
            if idx >= total {
                return None;
            }
            Some(match step(idx) {
                (true, i) => syn(cport(cpu, i)).build(),
                (false, i) => from_client(cport(cpu, i), TcpFlags::RST).build(),
            })
        })?;

        let mut live_total = BTreeMap::new(); // (backend, port) -> client port
        for (cpu, outcomes) in cpus.iter().zip(&results) {
            ensure!(
                outcomes.len() == total,
                "CPU {cpu}: {} runs",
                outcomes.len()
            );
            let mut live: BTreeMap<(Ipv4Addr, u16), u16> = BTreeMap::new();
            let mut by_flow: BTreeMap<usize, (Ipv4Addr, u16)> = BTreeMap::new();
            for (idx, out) in outcomes.iter().enumerate() {
                let (is_syn, i) = step(idx);
                if !is_syn {
                    if let Some(held) = by_flow.remove(&i) {
                        ensure!(
                            out.verdict == Verdict::Tx,
                            "CPU {cpu}: RST {i}: {:?}",
                            out.verdict
                        );
                        live.remove(&held);
                    }
                    continue;
                }
                ensure!(
                    out.verdict == Verdict::Tx,
                    "CPU {cpu}: SYN {i}: {:?} (with at most 13 live flows per backend)",
                    out.verdict
                );
                let view = FrameView::parse(&out.frame)?;
                let ip = view.ipv4.context("IPv4")?;
                let port = ip.tcp.context("TCP")?.sport;
                ensure!(
                    (port - s.snat_port_min) as usize % parts == *cpu,
                    "CPU {cpu} got port {port}, of another CPU's partition"
                );
                let held = (ip.dst, port);
                if let Some(other) = live.insert(held, cport(*cpu, i)) {
                    anyhow::bail!(
                        "CPU {cpu}: {held:?} given to {} while {other} holds it",
                        cport(*cpu, i)
                    );
                }
                by_flow.insert(i, held);
            }
            for (held, client) in live {
                ensure!(
                    live_total.insert(held, client).is_none(),
                    "{held:?} live on two CPUs"
                );
            }
        }
        // The table agrees: one forward entry per live flow, each pointing
        // at its own port, whose reverse entry points back.
        for (&(backend_addr, port), &client_port) in &live_total {
            let fwd = dp
                .flow(client(client_port), VIP_SOCK)?
                .with_context(|| format!("no forward entry for {client_port}"))?;
            ensure!(
                (host_addr(fwd.nat_daddr), u16::from_be(fwd.nat_sport)) == (backend_addr, port),
                "forward entry of {client_port}: {fwd:?}"
            );
            let rev = dp
                .flow((backend_addr, BACKEND_PORT), (NODE, port))?
                .with_context(|| format!("no reverse entry for {port}"))?;
            ensure!(
                u16::from_be(rev.nat_dport) == client_port && rev.flags & FLOW_RESET == 0,
                "reverse entry of {port}: {rev:?}"
            );
        }
        let created = dp.counter(counter::FLOWS_CREATED)?;
        ensure!(
            created == (syns * cpus.len()) as u64,
            "{created} flows created"
        );
        ensure!(
            dp.counter(counter::SNAT_RECLAIMED)? > reclaimed,
            "no port was taken over: the test did not exercise reclaim"
        );
        ensure!(live_total.len() == WINDOW * cpus.len());
        Ok(())
    })
}

/// The node's own outgoing connection to a backend's KeyDB port (KeyDB's
/// replication link to its peer) uses a port of the node's
/// `ip_local_port_range`, which the SNAT range never overlaps (the config
/// refuses it): its replies pass to the stack untouched while NATed flows to
/// the same backend:port run beside it.
#[test]
fn the_nodes_own_connection_to_a_backend_coexists_with_snat_flows() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let nated = dp.open_flow(&syn(43001))?;
        // Linux's default ip_local_port_range is 32768-60999; the fixtures'
        // SNAT range 20000-29999 is outside it.
        let own = (NODE, 45000);
        let s = dp.settings()?;
        ensure!(!(s.snat_port_min..=s.snat_port_max).contains(&own.1));
        let own_reply = |flags| {
            Frame::tcp(mac_of(backend(0)), FX0_MAC, nated.backend, own, flags)
                .map_tcp(|t| t.with_seq(9001).with_ack(7001))
        };
        dp.check_table(&[
            Case::passes(
                "SYN-ACK to the node's own connection",
                &own_reply(TcpFlags::SYN_ACK),
            )
            .counting(counter::PASS_NOT_SERVICE),
            Case::passes(
                "data to the node's own connection",
                &own_reply(TcpFlags::PSH_ACK),
            )
            .counting(counter::PASS_NOT_SERVICE),
            Case::passes(
                "FIN to the node's own connection",
                &own_reply(TcpFlags::FIN_ACK),
            )
            .counting(counter::PASS_NOT_SERVICE),
        ])?;
        // The NATed flow beside it is untouched and still translated.
        let reply = from_backend(&nated, TcpFlags::SYN_ACK);
        dp.check(&Case::rewritten(
            "reply of the NATed flow to the same backend",
            &reply,
            Verdict::Tx,
            &to_client(&reply, &nated),
        ))?;
        ensure!(dp.flow_count()? == 2, "entries: {}", dp.flow_count()?);
        Ok(())
    })
}

/// With an extra SNAT address, new flows take the node's address and it in
/// turn, each with the whole port range per backend: one port of this
/// CPU's partition serves two flows to the same backend at once, and the
/// replies to either address are translated back.
#[test]
fn a_second_snat_address_doubles_the_ports_per_backend() -> Result<()> {
    const EXTRA: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[backend(0)]))?;
        let mine = partition_of_size(dp, 1)?;
        let mut s = dp.settings()?;
        s.snat_addrs[0] = balancer_tests::fixture::net_addr(EXTRA);
        s.snat_addr_count = 1;
        dp.set_settings(s)?;
        let first = dp.open_flow(&syn(44001))?;
        let second = dp.open_flow(&syn(44002))?;
        ensure!(
            first.snat == mine[0] && second.snat == mine[0],
            "{first:?} {second:?}"
        );
        let src = |f: &NatFlow| -> Result<Ipv4Addr> {
            Ok(FrameView::parse(&f.output.frame)?.ipv4.context("IPv4")?.src)
        };
        ensure!(src(&first)? == NODE, "first from {}", src(&first)?);
        ensure!(src(&second)? == EXTRA, "second from {}", src(&second)?);
        dp.check(
            &Case::new(
                "third SYN: the node's address has no port left",
                &syn(44003),
                Verdict::Drop,
                Expected::Unchanged,
            )
            .counting(counter::DROP_SNAT_EXHAUSTED),
        )?;
        // The reply to the extra address goes back to the second client.
        let reply = Frame::tcp(
            mac_of(backend(0)),
            FX0_MAC,
            second.backend,
            (EXTRA, second.snat),
            TcpFlags::SYN_ACK,
        );
        dp.check(
            &Case::rewritten(
                "reply to the extra SNAT address",
                &reply,
                Verdict::Tx,
                &reply.translated(FX0_MAC, CLIENT_MAC, VIP_SOCK, second.client),
            )
            .counting(counter::REVERSED),
        )?;
        Ok(())
    })
}
