//! The VRRP advert socket: a raw IPv4 socket for IP protocol 112 on the
//! VRRP interface, and the counters of what it sent, received and dropped.
//!
//! Sending (RFC 5798 section 5.1.1): the kernel builds the IPv4 header with
//! TTL 255. Multicast mode sends to 224.0.0.18 out of the interface with
//! `node.address` as source (`IP_MULTICAST_IF`) and without looping back;
//! unicast mode sends one copy to each configured peer from `node.address`.
//! Receiving: a raw socket hands over the whole IPv4 packet, so
//! [`parse_ipv4`] reads the source, destination, TTL and protocol the
//! receive checks of [`crate::vrrp::packet::receive`] need.
//!
//! Not here: the receive checks themselves and what to do with an advert
//! (that is [`crate::election`]).

use std::{
    io::{self, Read as _},
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicU64, Ordering},
};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::{unix::AsyncFd, Interest};

use crate::vrrp::{
    packet::{IPPROTO_VRRP, VRRP_MULTICAST_V4, VRRP_TTL},
    Advert, DecodeError, IpHeaderFields, V3Checksum,
};

/// IP precedence "internetwork control" (0xc0), as keepalived marks adverts.
const TOS_INTERNETWORK_CONTROL: u32 = 0xc0;
/// Largest IPv4 packet.
const MAX_PACKET: usize = 65_535;

#[derive(Debug, thiserror::Error)]
pub enum VrrpSocketError {
    #[error("cannot open a raw IP socket for VRRP (protocol 112)")]
    Open(#[source] io::Error),
    #[error("cannot set {option} on the VRRP socket")]
    Option {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot send multicast adverts from node.address {addr} (is it configured on the interface?)")]
    MulticastSource {
        addr: Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("cannot join 224.0.0.18 on interface {ifindex}")]
    JoinGroup {
        ifindex: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot send adverts from node.address {addr} (is it configured on this node?)")]
    Bind {
        addr: Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("cannot register the VRRP socket with the runtime")]
    Register(#[source] io::Error),
    #[error("cannot send an advert to {dst}")]
    Send {
        dst: Ipv4Addr,
        #[source]
        source: io::Error,
    },
}

/// Label of adverts dropped before VRRP decoding: the IPv4 header itself
/// is malformed.
pub const MALFORMED_IP_REASON: &str = "ip_header";

const DROP_REASON_COUNT: usize = DecodeError::REASONS.len() + 1;

/// What the VRRP socket did, for `balancer stats` and logs. Shared between
/// the election (the only writer) and readers.
#[derive(Debug)]
pub struct AdvertCounters {
    /// Adverts that passed every receive check.
    pub received: AtomicU64,
    /// Our own adverts seen again (source = node address), ignored.
    pub own: AtomicU64,
    /// Adverts sent (one per destination).
    pub sent: AtomicU64,
    /// Sends that failed.
    pub send_errors: AtomicU64,
    /// Errors reading the socket.
    pub receive_errors: AtomicU64,
    /// Dropped adverts by reason: [`DecodeError::REASONS`], then
    /// [`MALFORMED_IP_REASON`].
    dropped: [AtomicU64; DROP_REASON_COUNT],
    /// The senders of accepted adverts, at most [`MAX_PEERS`].
    peers: std::sync::Mutex<std::collections::BTreeMap<Ipv4Addr, PeerSeen>>,
}

/// Distinct advert senders remembered; past it the one heard from least
/// recently is forgotten (a LAN may hold more routers than a VRRP group).
pub const MAX_PEERS: usize = 16;

/// The last accepted advert from one sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSeen {
    pub priority: u8,
    /// Advertised interval, centiseconds.
    pub interval_cs: u16,
    pub last: std::time::SystemTime,
    pub adverts: u64,
}

impl Default for AdvertCounters {
    fn default() -> Self {
        AdvertCounters {
            received: AtomicU64::new(0),
            own: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            receive_errors: AtomicU64::new(0),
            dropped: std::array::from_fn(|_| AtomicU64::new(0)),
            peers: std::sync::Mutex::default(),
        }
    }
}

impl AdvertCounters {
    /// Every drop reason label, in [`dropped`](Self::dropped) order.
    pub fn reasons() -> impl Iterator<Item = &'static str> {
        DecodeError::REASONS
            .iter()
            .copied()
            .chain(std::iter::once(MALFORMED_IP_REASON))
    }

    /// Remember an accepted advert from `src`.
    pub fn saw_peer(&self, src: Ipv4Addr, priority: u8, interval_cs: u16) {
        let last = std::time::SystemTime::now();
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let adverts = peers.get(&src).map_or(0, |p| p.adverts) + 1;
        peers.insert(
            src,
            PeerSeen {
                priority,
                interval_cs,
                last,
                adverts,
            },
        );
        if peers.len() > MAX_PEERS {
            if let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.last).map(|(a, _)| *a) {
                peers.remove(&oldest);
            }
        }
    }

    /// Every remembered sender, by address.
    pub fn peers(&self) -> Vec<(Ipv4Addr, PeerSeen)> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.iter().map(|(a, p)| (*a, *p)).collect()
    }

    /// Count one dropped advert; an unknown label counts as
    /// [`MALFORMED_IP_REASON`].
    pub fn count_dropped(&self, reason: &str) {
        let index = DecodeError::REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(DROP_REASON_COUNT - 1);
        self.dropped[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Dropped adverts for `reason` (0 for an unknown label).
    pub fn dropped_for(&self, reason: &str) -> u64 {
        Self::reasons()
            .position(|r| r == reason)
            .map_or(0, |i| self.dropped[i].load(Ordering::Relaxed))
    }

    /// Every reason with its count, zeros included.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        Self::reasons()
            .zip(&self.dropped)
            .map(|(reason, count)| (reason, count.load(Ordering::Relaxed)))
            .collect()
    }

    /// Sum over every reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// The IPv4 header of a received packet is not one the kernel would have
/// delivered intact: too short, not version 4, or lengths that disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed IPv4 header ({0})")]
pub struct MalformedIp(pub &'static str);

/// Splits a packet as a raw socket returns it into the header fields the
/// VRRP receive checks need and the IPv4 payload (up to the header's total
/// length; trailing padding is cut off).
pub fn parse_ipv4(packet: &[u8]) -> Result<(IpHeaderFields, &[u8]), MalformedIp> {
    if packet.len() < 20 {
        return Err(MalformedIp("shorter than 20 bytes"));
    }
    if packet[0] >> 4 != 4 {
        return Err(MalformedIp("not version 4"));
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < 20 || header_len > packet.len() {
        return Err(MalformedIp("bad header length"));
    }
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total_len < header_len || total_len > packet.len() {
        return Err(MalformedIp("bad total length"));
    }
    let octets =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let fields = IpHeaderFields {
        src: octets(12),
        dst: octets(16),
        ttl: packet[8],
        protocol: packet[9],
    };
    Ok((fields, &packet[header_len..total_len]))
}

/// The raw VRRP socket of one interface.
#[derive(Debug)]
pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    node_address: Ipv4Addr,
    destinations: Vec<Ipv4Addr>,
}

fn option(option: &'static str) -> impl FnOnce(io::Error) -> VrrpSocketError {
    move |source| VrrpSocketError::Option { option, source }
}

impl VrrpSocket {
    /// Opens the socket on `interface` (index `ifindex`): multicast when
    /// `unicast_peers` is empty, else unicast to them. Needs a tokio runtime.
    pub fn open(
        interface: &str,
        ifindex: u32,
        node_address: Ipv4Addr,
        unicast_peers: &[Ipv4Addr],
    ) -> Result<VrrpSocket, VrrpSocketError> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(IPPROTO_VRRP))),
        )
        .map_err(VrrpSocketError::Open)?;
        socket
            .bind_device(Some(interface.as_bytes()))
            .map_err(option("SO_BINDTODEVICE"))?;
        socket
            .set_ttl_v4(u32::from(VRRP_TTL))
            .map_err(option("IP_TTL"))?;
        // Best effort: only QoS depends on it.
        let _ = socket.set_tos_v4(TOS_INTERNETWORK_CONTROL);
        let destinations = if unicast_peers.is_empty() {
            socket
                .set_multicast_if_v4(&node_address)
                .map_err(|source| VrrpSocketError::MulticastSource {
                    addr: node_address,
                    source,
                })?;
            socket
                .set_multicast_ttl_v4(u32::from(VRRP_TTL))
                .map_err(option("IP_MULTICAST_TTL"))?;
            socket
                .set_multicast_loop_v4(false)
                .map_err(option("IP_MULTICAST_LOOP"))?;
            // Only the groups this socket joined, not every socket's.
            socket
                .set_multicast_all_v4(false)
                .map_err(option("IP_MULTICAST_ALL"))?;
            socket
                .join_multicast_v4_n(&VRRP_MULTICAST_V4, &InterfaceIndexOrAddress::Index(ifindex))
                .map_err(|source| VrrpSocketError::JoinGroup { ifindex, source })?;
            vec![VRRP_MULTICAST_V4]
        } else {
            // Binding a raw socket sets the source of what it sends and
            // limits what it receives to packets for node.address: peers'
            // unicast adverts. (Multicast mode must not bind: it would not
            // receive 224.0.0.18.)
            socket
                .bind(&SockAddr::from(SocketAddrV4::new(node_address, 0)))
                .map_err(|source| VrrpSocketError::Bind {
                    addr: node_address,
                    source,
                })?;
            unicast_peers.to_vec()
        };
        socket.set_nonblocking(true).map_err(option("O_NONBLOCK"))?;
        // SAFETY: the Socket owns its descriptor, keeps it open until it
        // drops and always returns that same one from `as_raw_fd`.
        let fd = unsafe {
            AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| VrrpSocketError::Register(e.into_parts().1))?;
        Ok(VrrpSocket {
            fd,
            node_address,
            destinations,
        })
    }

    /// Where adverts go: 224.0.0.18, or the unicast peers.
    pub fn destinations(&self) -> &[Ipv4Addr] {
        &self.destinations
    }

    /// Sends `advert` to every destination (VRRPv3 checksum per
    /// destination: the pseudo-header form covers it). Tries all of them;
    /// returns the first error. Counts into `counters`.
    pub async fn send(
        &self,
        advert: &Advert,
        v3_checksum: V3Checksum,
        counters: &AdvertCounters,
    ) -> Result<(), VrrpSocketError> {
        let mut first_error = None;
        for &dst in &self.destinations {
            let bytes = advert.encode(self.node_address, dst, v3_checksum);
            let to = SockAddr::from(SocketAddrV4::new(dst, 0));
            let sent = self
                .fd
                .async_io(Interest::WRITABLE, |socket| socket.send_to(&bytes, &to))
                .await;
            match sent {
                Ok(_) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(source) => {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(VrrpSocketError::Send { dst, source });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Waits for the next packet and copies it (IPv4 header included) into
    /// `buf`; returns its length. Use a buffer of [`Self::BUFFER_LEN`]
    /// bytes: a longer packet is cut to the buffer.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |socket| {
                let mut reader: &Socket = socket;
                reader.read(buf)
            })
            .await
    }

    /// A receive buffer that holds any IPv4 packet.
    pub const BUFFER_LEN: usize = MAX_PACKET;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(total_len: u16, ihl: u8) -> Vec<u8> {
        let mut p = vec![0u8; usize::from(total_len.max(20))];
        p[0] = 0x40 | ihl;
        p[2..4].copy_from_slice(&total_len.to_be_bytes());
        p[8] = 255;
        p[9] = 112;
        p[12..16].copy_from_slice(&[198, 18, 0, 2]);
        p[16..20].copy_from_slice(&[224, 0, 0, 18]);
        p
    }

    #[test]
    fn ipv4_header_fields_and_payload() {
        let mut p = header(28, 5);
        p[20..28].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        // Ethernet padding after the packet is not payload.
        p.extend_from_slice(&[0xee; 10]);
        let (ip, payload) = parse_ipv4(&p).unwrap();
        assert_eq!(
            ip,
            IpHeaderFields {
                src: Ipv4Addr::new(198, 18, 0, 2),
                dst: Ipv4Addr::new(224, 0, 0, 18),
                ttl: 255,
                protocol: 112,
            }
        );
        assert_eq!(payload, &[1, 2, 3, 4, 5, 6, 7, 8]);

        // IP options are skipped.
        let mut p = header(32, 6);
        p[24..32].copy_from_slice(&[9; 8]);
        assert_eq!(parse_ipv4(&p).unwrap().1, &[9; 8]);
    }

    #[test]
    fn malformed_ipv4_headers_are_rejected() {
        assert!(parse_ipv4(&[]).is_err());
        assert!(parse_ipv4(&[0x45; 19]).is_err());
        let mut v6 = header(28, 5);
        v6[0] = 0x65;
        assert!(parse_ipv4(&v6).is_err());
        assert!(parse_ipv4(&header(28, 4)).is_err(), "ihl below 5");
        let mut long_ihl = header(28, 15);
        long_ihl.truncate(28);
        assert!(parse_ipv4(&long_ihl).is_err(), "header longer than packet");
        let mut short_total = header(28, 5);
        short_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert!(parse_ipv4(&short_total).is_err());
        let mut long_total = header(28, 5);
        long_total[2..4].copy_from_slice(&29u16.to_be_bytes());
        assert!(parse_ipv4(&long_total).is_err());
        // Every prefix of a good packet is rejected or parsed, never a panic.
        let good = header(40, 5);
        for len in 0..good.len() {
            let _ = parse_ipv4(&good[..len]);
        }
    }

    #[test]
    fn counters_by_reason() {
        let c = AdvertCounters::default();
        c.count_dropped("ttl");
        c.count_dropped("ttl");
        c.count_dropped(MALFORMED_IP_REASON);
        c.count_dropped("no such reason");
        assert_eq!(c.dropped_for("ttl"), 2);
        assert_eq!(c.dropped_for(MALFORMED_IP_REASON), 2);
        assert_eq!(c.dropped_for("checksum"), 0);
        assert_eq!(c.dropped_total(), 4);
        let all = c.dropped();
        assert_eq!(all.len(), DecodeError::REASONS.len() + 1);
        assert!(all.contains(&("ttl", 2)));
        assert_eq!(all.last(), Some(&(MALFORMED_IP_REASON, 2)));
    }
}
