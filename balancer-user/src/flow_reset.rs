//! Resetting the connections of a backend taken out of service, so that
//! their clients reconnect at once instead of hanging.
//!
//! When a backend leaves a service's READY set (after that set was written
//! to the data plane, so no new flow can reach it), this module:
//!
//! 1. **Purges** the backend's NAT flows from `CONNTRACK`, both directions
//!    ([`crate::conntrack::purge_backends`]). The client's next packet then
//!    finds no flow; XDP passes it to the local stack, which has no socket
//!    for it (KeyDB's listener on `0.0.0.0:6380` answers a stray ACK with a
//!    reset, RFC 793 §3.4 "Reset Generation", case 2; with no listener the
//!    answer is a reset too) and sends an RST whose sequence number is the
//!    ACK number of the client's packet: exactly what the client accepts.
//!    A client that is sending is reset by its next segment.
//! 2. **Pokes** idle clients, which send nothing and would otherwise wait
//!    for a reply that never comes: it sends each purged flow's client a
//!    bare ACK from `VIP:port` whose sequence number is outside the
//!    client's receive window. The client must answer an unacceptable
//!    segment with an ACK carrying its real sequence numbers (RFC 793
//!    §3.9, "SEGMENT ARRIVES", first check; RFC 5961 §4 and §5 for the
//!    challenge ACKs of modern stacks). That ACK goes to the VIP, finds no
//!    flow, and is reset as in 1. The backend's leg (`node:snat_port ->
//!    backend`) is poked the same way, so a backend that is alive but out
//!    of service (loading, replication link down) drops its end too: its
//!    ACK to the SNAT port finds no flow and no socket (the SNAT range is a
//!    reserved port range) and is reset.
//!
//! The receive window is unknown, so each leg gets two ACKs whose sequence
//! numbers are 2^31 apart: a window is at most 2^30 bytes (RFC 7323 §2.3),
//! so at least one of them is outside it. They carry no timestamp option,
//! so PAWS (RFC 7323 §5) cannot drop them first. The packets leave through
//! a raw IPv4 socket (`IPPROTO_RAW`, which implies `IP_HDRINCL`) built here
//! with their checksums, never through XDP.
//!
//! 3. **Destroys local sockets.** Flows to this node's own KeyDB have no
//!    conntrack entry: XDP passes them to the local stack, where KeyDB
//!    accepted them on `VIP:port`. A KeyDB that stopped closes them itself,
//!    but one that hangs (or is loading, or lost its replication link) would
//!    keep its clients waiting, so the sockets whose local address is the
//!    service's `VIP:port` are destroyed with `SOCK_DESTROY` (`ss -K`, which
//!    sends the client an RST). Connections to the node's own address are
//!    left alone: they did not come through the VIP.
//!
//! Clients on this node's own addresses are not poked (their packets do not
//! cross XDP).

use std::{
    collections::HashSet,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Instant,
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::conntrack::{self, ConntrackMap, NatFlow, ServiceBackend};

/// Most flows poked per reset; the others are reset by their next packet.
pub const MAX_POKED_FLOWS: usize = 4096;
/// Length of a poke: IPv4 header and TCP header, no options, no payload.
pub const POKE_LEN: usize = 40;
/// TTL of a poke.
const POKE_TTL: u8 = 64;
/// TCP flag ACK.
const TCP_ACK: u8 = 0x10;

/// Why flow resets cannot run.
#[derive(Debug, thiserror::Error)]
pub enum FlowResetError {
    /// The raw socket for pokes could not be opened (needs CAP_NET_RAW).
    #[error("cannot open a raw IPv4 socket for TCP pokes")]
    RawSocket(#[source] io::Error),
}

/// The Internet checksum (RFC 1071) of `chunks` taken as one byte string,
/// each chunk of even length except possibly the last.
fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut words = chunk.chunks_exact(2);
        for w in &mut words {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A bare TCP ACK from `src` to `dst` with sequence number `seq` and
/// acknowledgement number `ack`, IPv4 header included, both checksums set.
///
/// ```text
///  IPv4 (RFC 791 §3.1)          TCP (RFC 9293 §3.1)
///  0x45 tos=0 len=40            sport dport
///  id=0 DF ttl=64 proto=6 csum  seq ack
///  saddr daddr                  doff=5 ACK win=65535 csum urg=0
/// ```
pub fn tcp_ack_segment(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, ack: u32) -> [u8; POKE_LEN] {
    let mut p = [0u8; POKE_LEN];
    let (ip, tcp) = p.split_at_mut(20);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(POKE_LEN as u16).to_be_bytes());
    // Identification 0 (the kernel picks one), DF set, no fragment offset.
    ip[6] = 0x40;
    ip[8] = POKE_TTL;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = internet_checksum(&[ip]);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_ACK;
    // A full window: should this copy land inside the window, it must not
    // shrink what the peer may send.
    tcp[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let pseudo = pseudo_header(*src.ip(), *dst.ip(), tcp.len() as u16);
    let tcp_sum = internet_checksum(&[&pseudo, tcp]);
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// The TCP pseudo-header (RFC 9293 §3.1) for a segment of `len` bytes.
fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, len: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&src.octets());
    h[4..8].copy_from_slice(&dst.octets());
    h[9] = libc::IPPROTO_TCP as u8;
    h[10..12].copy_from_slice(&len.to_be_bytes());
    h
}

/// A raw IPv4 socket that sends packets built with their IP header
/// (`IPPROTO_RAW`). Send-only: such a socket receives nothing.
#[derive(Debug)]
pub struct RawSocket(OwnedFd);

impl RawSocket {
    /// Opens the socket (needs CAP_NET_RAW).
    pub fn open() -> io::Result<RawSocket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(RawSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `packet` (IPv4 header included) to `dst`.
    pub fn send(&self, packet: &[u8], dst: Ipv4Addr) -> io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `packet` and `addr` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Pokes the TCP endpoint `dst` as if from its peer `src`: two bare ACKs
    /// whose sequence numbers are 2^31 apart, so that at least one is
    /// outside `dst`'s receive window and makes it answer with an ACK.
    pub fn poke(&self, src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<()> {
        let seq = random_u32();
        let ack = random_u32();
        for s in [seq, seq ^ 0x8000_0000] {
            self.send(&tcp_ack_segment(src, dst, s, ack), *dst.ip())?;
        }
        Ok(())
    }
}

/// How long `ss -K` may take before it is killed.
const SS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Destroys (RST to the peer) every connected TCP socket of this network
/// namespace whose local address is `local`, with `SOCK_DESTROY` through
/// `ss -K` (iproute2; needs `CONFIG_INET_DIAG_DESTROY`). Returns how many.
pub fn destroy_sockets_on(local: SocketAddrV4) -> io::Result<usize> {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("ss");
    for var in crate::service_manager::CHILD_ENV_REMOVE {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .args(["-K", "-t", "-n", "-H", "state", "connected", "src"])
        .arg(local.ip().to_string())
        .args(["sport", "=", &format!(":{}", local.port())])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + SS_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(io::ErrorKind::TimedOut, "ss -K timed out"));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ss -K failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: `bytes` is valid for 4 bytes of writes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(bytes)
    } else {
        // Unpredictability is not needed, only spread.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        nanos ^ std::process::id().rotate_left(16)
    }
}

/// What one reset did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResetReport {
    /// Conntrack entries seen.
    pub entries: usize,
    /// Flows purged.
    pub flows: usize,
    /// Conntrack entries deleted.
    pub deleted: usize,
    /// Legs poked (a flow has up to two: client and backend).
    pub poked: usize,
    /// Legs not poked: an endpoint on this node, or over the bound.
    pub not_poked: usize,
    /// Pokes the socket refused to send.
    pub send_errors: usize,
    /// Local sockets on a VIP destroyed (flows to this node's own KeyDB).
    pub destroyed: usize,
}

/// Purges and pokes the flows of backends taken out of service.
#[derive(Debug)]
pub struct FlowReset {
    conntrack: ConntrackMap,
    socket: RawSocket,
    own_addrs: HashSet<Ipv4Addr>,
    max_entries: usize,
    services: Vec<SocketAddrV4>,
}

impl FlowReset {
    /// A resetter over `conntrack` (a handle of its own, see
    /// [`conntrack::another_handle`]) holding at most `max_entries`
    /// entries; `own_addrs` are this node's addresses, whose endpoints are
    /// never poked (loopback addresses never are either).
    pub fn new(
        conntrack: ConntrackMap,
        own_addrs: impl IntoIterator<Item = Ipv4Addr>,
        max_entries: usize,
    ) -> Result<FlowReset, FlowResetError> {
        Ok(FlowReset {
            conntrack,
            socket: RawSocket::open().map_err(FlowResetError::RawSocket)?,
            own_addrs: own_addrs.into_iter().collect(),
            max_entries,
            services: Vec::new(),
        })
    }

    fn is_own(&self, addr: &Ipv4Addr) -> bool {
        addr.is_loopback() || addr.is_unspecified() || self.own_addrs.contains(addr)
    }

    /// The `VIP:port` of each service, indexed by service id: needed to
    /// reset flows to a local backend. Without it they are left alone.
    pub fn with_services(mut self, services: Vec<SocketAddrV4>) -> FlowReset {
        self.services = services;
        self
    }

    /// Purges every flow of `targets` and pokes their endpoints. Blocking:
    /// one syscall per conntrack entry, run it off the async threads.
    pub fn reset(&mut self, targets: &HashSet<ServiceBackend>) -> ResetReport {
        let mut destroyed = 0;
        for target in targets {
            if !self.is_own(target.backend.ip()) {
                continue;
            }
            let Some(service) = self.services.get(target.service_id as usize) else {
                continue;
            };
            match destroy_sockets_on(*service) {
                Ok(n) => destroyed += n,
                Err(error) => {
                    warn!(%service, %error, "could not reset the local backend's connections")
                }
            }
        }
        let purge = conntrack::purge_backends(&mut self.conntrack, targets, self.max_entries);
        let mut report = ResetReport {
            entries: purge.entries,
            flows: purge.flows.len(),
            deleted: purge.deleted,
            destroyed,
            ..ResetReport::default()
        };
        for (i, flow) in purge.flows.iter().enumerate() {
            for (src, dst) in legs(flow) {
                if i >= MAX_POKED_FLOWS || self.is_own(dst.ip()) {
                    report.not_poked += 1;
                    continue;
                }
                match self.socket.poke(src, dst) {
                    Ok(()) => report.poked += 1,
                    Err(error) => {
                        if report.send_errors == 0 {
                            debug!(%dst, %error, "could not send a TCP poke");
                        }
                        report.send_errors += 1;
                    }
                }
            }
        }
        report
    }
}

/// The two legs of a flow as (peer the endpoint knows, endpoint).
fn legs(flow: &NatFlow) -> [(SocketAddrV4, SocketAddrV4); 2] {
    [(flow.vip, flow.client), (flow.snat, flow.backend)]
}

/// Where the health monitor sends its requests (cheap to clone; never
/// blocks).
#[derive(Debug, Clone)]
pub struct FlowResetHandle(mpsc::UnboundedSender<ServiceBackend>);

impl FlowResetHandle {
    /// Asks for the flows of `backend` in service `service_id` to be reset.
    /// Does nothing once [`run`] has ended.
    pub fn request(&self, service_id: u32, backend: SocketAddrV4) {
        let _ = self.0.send(ServiceBackend {
            service_id,
            backend,
        });
    }
}

/// The receiving end of a [`FlowResetHandle`], for [`run`].
#[derive(Debug)]
pub struct FlowResetRequests(mpsc::UnboundedReceiver<ServiceBackend>);

/// A handle and its requests.
pub fn channel() -> (FlowResetHandle, FlowResetRequests) {
    let (tx, rx) = mpsc::unbounded_channel();
    (FlowResetHandle(tx), FlowResetRequests(rx))
}

/// Serves requests until every handle is dropped or the task is aborted.
/// Requests that queue up while a reset runs are served by one walk of
/// the table.
pub fn run(reset: FlowReset, requests: FlowResetRequests) -> impl Future<Output = ()> + Send {
    serve(reset, requests)
}

async fn serve(reset: FlowReset, mut requests: FlowResetRequests) {
    let mut reset = Some(reset);
    while let Some(first) = requests.0.recv().await {
        let mut targets = HashSet::from([first]);
        while let Ok(more) = requests.0.try_recv() {
            targets.insert(more);
        }
        let Some(mut r) = reset.take() else { return };
        let started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let report = r.reset(&targets);
            (r, targets, report)
        })
        .await;
        match joined {
            Ok((r, targets, report)) => {
                reset = Some(r);
                let backends: Vec<String> = targets
                    .iter()
                    .map(|t| format!("{}@{}", t.backend, t.service_id))
                    .collect();
                info!(
                    backends = ?backends,
                    flows = report.flows,
                    deleted = report.deleted,
                    poked = report.poked,
                    not_poked = report.not_poked,
                    send_errors = report.send_errors,
                    destroyed = report.destroyed,
                    entries = report.entries,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "reset the flows of backends out of service"
                );
            }
            Err(error) => {
                warn!(%error, "flow reset failed; no more flows will be reset");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{ErrorKind, Read, Write},
        net::{TcpListener, TcpStream},
        time::Duration,
    };

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// Independent check: the one's-complement sum over a header with its
    /// checksum in place is 0xffff.
    fn sums_to_ones(chunks: &[&[u8]]) -> bool {
        let mut sum: u64 = 0;
        for chunk in chunks {
            for w in chunk.chunks(2) {
                let hi = u64::from(w[0]) << 8;
                let lo = w.get(1).map_or(0, |&b| u64::from(b));
                sum += hi | lo;
            }
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 §3: the sum of these bytes is 0xddf2, checksum 0x220d.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&[&bytes]), !0xddf2);
        // Odd length: the last byte is padded with zero.
        assert_eq!(internet_checksum(&[&[0x01]]), !0x0100);
    }

    #[test]
    fn poke_packet_fields_and_checksums() {
        let src = addr("198.18.0.100:6380");
        let dst = addr("198.18.0.10:40000");
        let p = tcp_ack_segment(src, dst, 0x8765_4321, 0x0102_0304);
        let (ip, tcp) = p.split_at(20);
        assert_eq!(ip[0], 0x45, "IPv4, no options");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40, "total length");
        assert_eq!(ip[6] & 0x40, 0x40, "DF");
        assert_eq!(ip[6] & 0x1f, 0);
        assert_eq!(ip[7], 0, "no fragment offset");
        assert_eq!(ip[8], 64, "TTL");
        assert_eq!(ip[9], 6, "TCP");
        assert_eq!(&ip[12..16], &[198, 18, 0, 100]);
        assert_eq!(&ip[16..20], &[198, 18, 0, 10]);
        assert!(sums_to_ones(&[ip]), "IPv4 header checksum");

        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 6380);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(
            u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            0x8765_4321
        );
        assert_eq!(
            u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            0x0102_0304
        );
        assert_eq!(tcp[12] >> 4, 5, "no TCP options");
        assert_eq!(tcp[13], TCP_ACK, "ACK only: no SYN, RST, FIN or PSH");
        assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), 65535);
        assert_eq!(&tcp[18..20], &[0, 0], "no urgent pointer");
        let pseudo = [198, 18, 0, 100, 198, 18, 0, 10, 0, 6, 0, 20];
        assert!(sums_to_ones(&[&pseudo, tcp]), "TCP checksum");

        // A corrupted byte is caught by the same check.
        let mut bad = p;
        bad[30] ^= 1;
        assert!(!sums_to_ones(&[&pseudo, &bad[20..]]));
    }

    #[test]
    fn checksums_hold_for_many_tuples() {
        let mut seed = 0x9e37_79b9_u32;
        for _ in 0..500 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let a = Ipv4Addr::from(seed);
            let b = Ipv4Addr::from(seed.rotate_left(7) ^ 0x5555_aaaa);
            let src = SocketAddrV4::new(a, (seed >> 16) as u16);
            let dst = SocketAddrV4::new(b, seed as u16);
            let p = tcp_ack_segment(src, dst, seed, !seed);
            assert!(sums_to_ones(&[&p[..20]]));
            let pseudo = pseudo_header(*src.ip(), *dst.ip(), 20);
            assert!(sums_to_ones(&[&pseudo, &p[20..]]));
        }
    }

    fn flow(client: &str, backend: &str) -> NatFlow {
        NatFlow {
            service_id: 0,
            client: addr(client),
            vip: addr("198.18.0.100:6380"),
            snat: addr("198.18.0.1:61000"),
            backend: addr(backend),
        }
    }

    #[test]
    fn legs_pair_each_endpoint_with_the_peer_it_knows() {
        let f = flow("198.18.0.10:40000", "198.18.0.2:6380");
        assert_eq!(
            legs(&f),
            [
                (addr("198.18.0.100:6380"), addr("198.18.0.10:40000")),
                (addr("198.18.0.1:61000"), addr("198.18.0.2:6380")),
            ]
        );
    }

    /// Root (raw socket, TCP_REPAIR), loopback only. The mechanism of a
    /// poke, without XDP: a client whose server forgot the connection
    /// without a word (the socket is closed in repair mode, which sends
    /// nothing) hangs; a poke from the server's address makes it send an
    /// ACK, which the listener answers with an RST.
    #[test]
    fn a_poke_resets_an_idle_client_whose_server_forgot_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let mut client = TcpStream::connect(server_addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"PING\r\n").unwrap();
        let mut got = [0u8; 6];
        let mut server_read = &server;
        server_read.read_exact(&mut got).unwrap();
        let one: libc::c_int = 1;
        // SAFETY: valid socket and option buffer.
        let rc = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_TCP,
                libc::TCP_REPAIR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            0,
            "TCP_REPAIR needs CAP_NET_ADMIN: {}",
            io::Error::last_os_error()
        );
        drop(server);

        // Without a poke the client hears nothing.
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 16];
        let err = client.read(&mut buf).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );

        let client_addr = match client.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let socket = RawSocket::open().expect("raw sockets need CAP_NET_RAW");
        socket.poke(server_addr, client_addr).unwrap();

        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let err = client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    }
}
