//! Header layouts and bounds-checked parsing of Ethernet (+ one 802.1Q tag),
//! IPv4 and TCP. Every access is checked against `data_end` in a form the
//! verifier can follow; a frame that is too short for what it announces is
//! reported as [`Verdict::Pass`] with the reason `PASS_TRUNCATED`.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use balancer_common::{counter, IPPROTO_TCP};

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// EtherType, network byte order.
    pub proto: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    /// Inner EtherType, network byte order.
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct TcpHdr {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (high 4 bits of the first byte) and flags (second byte).
    pub doff_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
/// More-fragments flag and fragment offset, network byte order.
const IP_MF_OFFSET: u16 = 0x3fffu16.to_be();

/// Pointers to the headers of an IPv4/TCP frame, all within bounds.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub tcp: *mut TcpHdr,
    /// The frame carries an 802.1Q tag.
    pub tagged: bool,
    /// Frame length in bytes.
    pub len: u64,
}

/// Why a frame is not ours: the `counter::PASS_*` slot to count it under.
pub struct NotOurs(pub u32);

/// `ctx.data() + offset` as a `*mut T` if `size_of::<T>()` bytes fit.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, NotOurs> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(NotOurs(counter::PASS_TRUNCATED));
    }
    Ok((start + offset) as *mut T)
}

/// Parses an IPv4/TCP frame without IP options or fragmentation whose
/// lengths are consistent with the frame.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, NotOurs> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let mut l3 = size_of::<EthHdr>();
    let mut proto = unsafe { (*eth).proto };
    let mut tagged = false;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let vlan: *mut VlanHdr = ptr_at(ctx, l3)?;
        proto = unsafe { (*vlan).proto };
        l3 += size_of::<VlanHdr>();
        tagged = true;
    }
    if proto != ETH_P_IP {
        return Err(NotOurs(counter::PASS_NOT_IPV4));
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3)?;
    let ver_ihl = unsafe { (*ip).ver_ihl };
    if ver_ihl >> 4 != 4 {
        return Err(NotOurs(counter::PASS_NOT_IPV4));
    }
    if ver_ihl & 0x0f != 5 {
        // Options (ihl > 5) or a malformed header (ihl < 5): the stack decides.
        return Err(NotOurs(counter::PASS_IP_OPTIONS));
    }
    if unsafe { (*ip).frag_off } & IP_MF_OFFSET != 0 {
        return Err(NotOurs(counter::PASS_FRAGMENT));
    }
    if unsafe { (*ip).proto } != IPPROTO_TCP {
        return Err(NotOurs(counter::PASS_NOT_TCP));
    }
    let l4 = l3 + size_of::<Ipv4Hdr>();
    let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;

    // The IP total length must cover the whole TCP header (with options) and
    // fit in the frame; frames longer than that carry padding, which is fine.
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let tot_len = u16::from_be(unsafe { (*ip).tot_len }) as u64;
    let tcp_hdr_len = ((unsafe { (*tcp).doff_res } >> 4) as u64) * 4;
    if tcp_hdr_len < size_of::<TcpHdr>() as u64
        || tot_len < (size_of::<Ipv4Hdr>() as u64) + tcp_hdr_len
        || (l3 as u64) + tot_len > frame_len
    {
        return Err(NotOurs(counter::PASS_TRUNCATED));
    }
    Ok(Packet {
        eth,
        ip,
        tcp,
        tagged,
        len: frame_len,
    })
}
