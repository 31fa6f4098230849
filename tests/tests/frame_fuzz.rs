//! A million random and mutated frames through the XDP program
//! (`BPF_PROG_TEST_RUN`), each checked with the independent packet reader:
//!
//! - the verdict is one of PASS, TX, DROP, REDIRECT (never ABORTED);
//! - a frame the program passes leaves byte for byte as it came;
//! - a frame not addressed to a service VIP:port nor to this node's SNAT
//!   range is passed, untouched;
//! - a rewritten frame (TX or REDIRECT) is IPv4/TCP with valid IP and TCP
//!   checksums whenever its input had them, and carries the tuple its flow's
//!   conntrack entry says.
//!
//! The generator is a seeded xorshift, so a failure names a seed and frame
//! number that reproduce it.

use std::net::Ipv4Addr;

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::{
    fixture::{
        active_service, backend, host_addr, with_dataplane, Dataplane, Ingress, Verdict, CLIENT,
        FX0_MAC, NODE, SNAT_MAX, SNAT_MIN, VIP, VIP_PORT,
    },
    packet::{
        internet_checksum, pseudo_header_checksum, ArpPacket, Frame, FrameView, IcmpEcho,
        Ipv4Packet, TcpFlags, TcpSegment, Transport, UdpDatagram,
    },
};

const FRAMES: u64 = 1_000_000;
const SEED: u64 = 0x6261_6c61_6e63_6572;
const CLIENT_MAC: [u8; 6] = [0x02, 0xbe, 198, 18, 0, 10];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A NATed flow the program opened: client port, backend, SNAT port.
type Opened = (u16, (Ipv4Addr, u16), u16);

/// Valid frames the mutations start from: traffic to the VIP (new, or of a
/// flow already open), replies to SNAT ports (of open flows, or any), and
/// things the program must not touch.
fn templates(rng: &mut Rng, opened: &[Opened]) -> Vec<Vec<u8>> {
    let (cport, (baddr, bport), snat) = if !opened.is_empty() && rng.below(2) == 0 {
        *rng.pick(opened)
    } else {
        (
            1024 + rng.below(60_000) as u16,
            (backend(1), 6380),
            SNAT_MIN + rng.below(u64::from(SNAT_MAX - SNAT_MIN)) as u16,
        )
    };
    let all_flags = [
        TcpFlags::SYN,
        TcpFlags::ACK,
        TcpFlags(TcpFlags::ACK.0 | TcpFlags::FIN.0),
        TcpFlags::RST,
        TcpFlags(TcpFlags::SYN.0 | TcpFlags::ACK.0),
    ];
    let flags = *rng.pick(&all_flags);
    let vip = (VIP, VIP_PORT);
    let to_vip = Frame::tcp(CLIENT_MAC, FX0_MAC, (CLIENT, cport), vip, flags).map_tcp(|t| {
        t.with_seq(rng.next() as u32)
            .with_payload(b"*1\r\n$4\r\nPING\r\n")
    });
    let reply = Frame::tcp(
        [0x02, 0xbe, 198, 18, 0, 3],
        FX0_MAC,
        (baddr, bport),
        (NODE, snat),
        flags,
    );
    let other_port = Frame::tcp(
        CLIENT_MAC,
        FX0_MAC,
        (CLIENT, cport),
        (VIP, 22),
        TcpFlags::SYN,
    );
    let to_node = Frame::tcp(
        CLIENT_MAC,
        FX0_MAC,
        (CLIENT, cport),
        (NODE, 6380),
        TcpFlags::SYN,
    );
    let udp = Frame::ipv4(
        CLIENT_MAC,
        FX0_MAC,
        Ipv4Packet::new(
            CLIENT,
            VIP,
            Transport::Udp(UdpDatagram {
                sport: cport,
                dport: VIP_PORT,
                payload: vec![0; 8],
            }),
        ),
    );
    let icmp = Frame::ipv4(
        CLIENT_MAC,
        FX0_MAC,
        Ipv4Packet::new(
            CLIENT,
            VIP,
            Transport::IcmpEcho(IcmpEcho {
                id: 1,
                seq: 1,
                payload: vec![0; 16],
            }),
        ),
    );
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
    let fragment = Frame::ipv4(
        CLIENT_MAC,
        FX0_MAC,
        Ipv4Packet::tcp(CLIENT, VIP, TcpSegment::syn(cport, VIP_PORT)).with_fragment(true, 0),
    );
    let tagged = to_vip.clone().with_vlan(0);
    [
        to_vip, reply, other_port, to_node, udp, icmp, arp, fragment, tagged,
    ]
    .iter()
    .map(Frame::build)
    .collect()
}

/// Shortest input `BPF_PROG_TEST_RUN` takes (an Ethernet header); no
/// driver hands XDP less.
const MIN_FRAME: usize = 14;

/// One input: random bytes, or a template with bytes flipped, cut or
/// added, its checksums made right again half of the time.
fn frame(rng: &mut Rng, opened: &[Opened]) -> Vec<u8> {
    if rng.below(4) == 0 {
        let len = MIN_FRAME + rng.below(160) as usize;
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let all = templates(rng, opened);
    let mut f = rng.pick(&all).clone();
    match rng.below(4) {
        0 => {}
        1 => f.truncate(MIN_FRAME + rng.below((f.len() - MIN_FRAME) as u64 + 1) as usize),
        2 => f.extend((0..rng.below(32)).map(|_| rng.next() as u8)),
        _ => {
            for _ in 0..=rng.below(4) {
                if !f.is_empty() {
                    let at = rng.below(f.len() as u64) as usize;
                    f[at] ^= 1 << rng.below(8);
                }
            }
        }
    }
    if rng.below(2) == 0 {
        fix_checksums(&mut f);
    }
    f
}

/// Offset of the IPv4 header in an Ethernet frame (one optional 802.1Q tag).
fn ip_offset(f: &[u8]) -> Option<usize> {
    match f.get(12..14)? {
        [0x08, 0x00] => Some(14),
        [0x81, 0x00] if f.get(16..18)? == [0x08, 0x00] => Some(18),
        _ => None,
    }
}

/// Recomputes the IPv4 header checksum and, for a whole TCP segment, the
/// TCP checksum, where the headers are long enough to have them.
fn fix_checksums(f: &mut [u8]) {
    let Some(ip) = ip_offset(f) else { return };
    let Some(&vihl) = f.get(ip) else { return };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || f.len() < ip + ihl {
        return;
    }
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&f[ip..ip + ihl]);
    f[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    let total = usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
    let fragmented = u16::from_be_bytes([f[ip + 6], f[ip + 7]]) & 0x3fff != 0;
    if f[ip + 9] != 6 || fragmented || total < ihl + 20 || f.len() < ip + total {
        return;
    }
    let src = Ipv4Addr::new(f[ip + 12], f[ip + 13], f[ip + 14], f[ip + 15]);
    let dst = Ipv4Addr::new(f[ip + 16], f[ip + 17], f[ip + 18], f[ip + 19]);
    let seg = ip + ihl..ip + total;
    f[seg.start + 16..seg.start + 18].copy_from_slice(&[0, 0]);
    let sum = pseudo_header_checksum(src, dst, 6, &f[seg.clone()]);
    f[seg.start + 16..seg.start + 18].copy_from_slice(&sum.to_be_bytes());
}

/// The (src, dst) endpoints of an IPv4/TCP frame the program could act on,
/// as the independent reader sees it.
fn tcp_tuple(view: &FrameView) -> Option<((Ipv4Addr, u16), (Ipv4Addr, u16))> {
    let ip = view.ipv4.as_ref()?;
    let tcp = ip.tcp.as_ref()?;
    Some(((ip.src, tcp.sport), (ip.dst, tcp.dport)))
}

/// Whether the data plane may rewrite or drop this frame: IPv4/TCP to the
/// service's VIP:port or to this node's SNAT range, or a frame the reader
/// cannot take apart (no claim either way). Everything else must pass.
fn may_touch(input: &[u8]) -> bool {
    let Ok(view) = FrameView::parse(input) else {
        return true;
    };
    let Some(ip) = &view.ipv4 else {
        return false;
    };
    if ip.protocol != 6 {
        return false;
    }
    let Some(tcp) = &ip.tcp else {
        return true;
    };
    (ip.dst, tcp.dport) == (VIP, VIP_PORT)
        || (ip.dst == NODE && (SNAT_MIN..=SNAT_MAX).contains(&tcp.dport))
}

/// Checks one frame; returns its verdict and, for a SYN that opened a NATed
/// flow, the flow.
fn check_one(dp: &Dataplane, n: u64, input: &[u8]) -> Result<(Verdict, Option<Opened>)> {
    let mut opened = None;
    let out = dp
        .try_run(input, Ingress::Fx0)
        .with_context(|| format!("frame {n}: test run failed"))?;
    match out.verdict {
        Verdict::Pass => {
            ensure!(out.frame == input, "frame {n}: passed but changed");
        }
        Verdict::Drop => {}
        Verdict::Tx | Verdict::Redirect => {
            ensure!(
                may_touch(input),
                "frame {n}: not for a VIP nor an SNAT port, yet rewritten ({:?})",
                out.verdict
            );
            let view = FrameView::parse(&out.frame)
                .with_context(|| format!("frame {n}: rewritten frame unreadable"))?;
            let (src, dst) = tcp_tuple(&view)
                .with_context(|| format!("frame {n}: rewritten frame is not IPv4/TCP"))?;
            if FrameView::checksum_errors(input).is_empty() {
                let errors = FrameView::checksum_errors(&out.frame);
                ensure!(
                    errors.is_empty(),
                    "frame {n}: good checksums in, bad out: {errors:?}"
                );
            }
            let in_view = FrameView::parse(input)?;
            let (in_src, in_dst) = tcp_tuple(&in_view).context("input was TCP")?;
            // A RST ends the flow in the same run: nothing left to compare.
            if let Some(e) = dp.flow(in_src, in_dst)? {
                let want = (
                    (host_addr(e.nat_saddr), u16::from_be(e.nat_sport)),
                    (host_addr(e.nat_daddr), u16::from_be(e.nat_dport)),
                );
                ensure!(
                    (src, dst) == want,
                    "frame {n}: rewritten to {src:?} -> {dst:?}, its flow says {want:?}"
                );
                if in_dst == (VIP, VIP_PORT) {
                    opened = Some((in_src.1, dst, src.1));
                }
            }
        }
        other => bail!("frame {n}: verdict {other:?}"),
    }
    if !may_touch(input) {
        ensure!(
            out.verdict == Verdict::Pass,
            "frame {n}: not for a VIP nor an SNAT port, verdict {:?}",
            out.verdict
        );
    }
    Ok((out.verdict, opened))
}

#[test]
fn a_million_random_and_mutated_frames_keep_the_invariants() -> Result<()> {
    with_dataplane(|dp| {
        dp.set_vip_service(&active_service(0, &[NODE, backend(1), backend(2)]))?;
        let mut rng = Rng(SEED);
        let mut verdicts = [0u64; 4];
        let mut opened: Vec<Opened> = Vec::new();
        let mut replies = 0u64;
        for n in 0..FRAMES {
            let input = frame(&mut rng, &opened);
            let (verdict, flow) = check_one(dp, n, &input)
                .with_context(|| format!("seed {SEED:#x}, input {input:02x?}"))?;
            if let Some(flow) = flow {
                if opened.len() < 256 {
                    opened.push(flow);
                } else {
                    opened[(n % 256) as usize] = flow;
                }
            }
            if verdict == Verdict::Tx
                && FrameView::parse(&input)
                    .ok()
                    .and_then(|v| tcp_tuple(&v))
                    .is_some_and(|(_, (dst, _))| dst == NODE)
            {
                replies += 1;
            }
            let slot = match verdict {
                Verdict::Pass => 0,
                Verdict::Tx => 1,
                Verdict::Redirect => 2,
                _ => 3,
            };
            verdicts[slot] += 1;
        }
        println!(
            "{FRAMES} frames: {} passed, {} TX ({replies} of them replies reverse-NATed), {} redirected, {} dropped",
            verdicts[0], verdicts[1], verdicts[2], verdicts[3]
        );
        // The mix must exercise the rewriting paths, or the invariants
        // above were checked on nothing.
        ensure!(
            verdicts[1] > FRAMES / 100,
            "only {} of {FRAMES} frames rewritten",
            verdicts[1]
        );
        ensure!(
            replies > FRAMES / 1000,
            "only {replies} replies reverse-NATed"
        );
        Ok(())
    })
}
