//! Gratuitous ARP: tells the LAN that a VIP now lives at this node's
//! Ethernet address, so clients and switches move their traffic at once
//! instead of waiting for their ARP entries to expire.
//!
//! Each announcement is an ARP request (RFC 5227 section 3 "ARP
//! Announcement", as keepalived and `arping -U` send it) broadcast from the
//! interface's address with sender and target protocol address both the
//! VIP. Frames are built by the pure [`announcement`] and sent on an
//! `AF_PACKET` socket. When and how often is [`crate::election`]'s business.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Ethernet broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// Length of an announcement frame: the Ethernet minimum (without FCS).
pub const FRAME_LEN: usize = 60;

/// The ARP announcement of `vip` from Ethernet address `mac`: broadcast,
/// ARP request, sender = target protocol address = `vip`, target hardware
/// address zero, padded to the Ethernet minimum.
pub fn announcement(mac: [u8; 6], vip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    frame[0..6].copy_from_slice(&BROADCAST);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let arp = &mut frame[14..42];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    arp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    arp[4] = 6; // hardware address length
    arp[5] = 4; // protocol address length
    arp[6..8].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    arp[8..14].copy_from_slice(&mac);
    arp[14..18].copy_from_slice(&vip.octets());
    // Target hardware address stays zero (RFC 5227: ignored).
    arp[24..28].copy_from_slice(&vip.octets());
    frame
}

/// An `AF_PACKET` socket that sends frames out of one interface. It
/// receives nothing (protocol 0).
#[derive(Debug)]
pub struct GarpSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl GarpSocket {
    /// Opens the socket for interface `ifindex`.
    pub fn open(ifindex: u32) -> io::Result<GarpSocket> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(GarpSocket { fd, ifindex })
    }

    /// Broadcasts the announcement of `vip` from `mac`. Non-blocking: a
    /// full transmit queue is an error, not a wait.
    pub fn announce(&self, mac: [u8; 6], vip: Ipv4Addr) -> io::Result<()> {
        let frame = announcement(mac, vip);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = self.ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&BROADCAST);
        // SAFETY: `frame` and `to` outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_layout() {
        let mac = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
        let vip = Ipv4Addr::new(198, 18, 0, 100);
        let f = announcement(mac, vip);
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(
            &f[14..22],
            &[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01],
            "Ethernet/IPv4 request"
        );
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[28..32], &[198, 18, 0, 100], "sender protocol address");
        assert_eq!(&f[32..38], &[0; 6], "target hardware address");
        assert_eq!(&f[38..42], &[198, 18, 0, 100], "target protocol address");
        assert_eq!(&f[42..], &[0; 18], "padding");
    }
}
