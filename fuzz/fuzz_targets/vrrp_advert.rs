//! A raw IPv4 packet from the VRRP socket, through the whole receive path:
//! header parse, header checks, advert decode and the per-instance checks.
//! Invariants: never a panic; an accepted advert encodes back to a message
//! that decodes to the same advert.
//!
//! Input: byte 0 picks the receive rules (bit 0 version, bit 1 VRRPv3
//! checksum computation, bit 2 accept the other one, bit 3 check
//! addresses, bit 4 VRRPv2 PASS authentication, bit 5 address owner),
//! byte 1 the VRID; the rest is the packet.
#![no_main]

use std::net::Ipv4Addr;

use balancer_user::{
    vrrp::{receive, Advert, Auth, ChecksumMatch, ReceiveRules, V3Checksum, Version},
    vrrp_socket::parse_ipv4,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [flags, vrid, packet @ ..] = data else {
        return;
    };
    let version = if flags & 1 == 0 {
        Version::V3
    } else {
        Version::V2
    };
    let v3_checksum = if flags & 2 == 0 {
        V3Checksum::WithPseudoHeader
    } else {
        V3Checksum::WithoutPseudoHeader
    };
    let rules = ReceiveRules {
        version,
        vrid: *vrid,
        auth: if flags & 16 != 0 {
            Auth::Pass(*b"1111\0\0\0\0")
        } else {
            Auth::None
        },
        v3_checksum,
        accept_other_v3_checksum: flags & 4 != 0,
        adver_int_cs: 100,
        addresses: vec![Ipv4Addr::new(198, 18, 0, 100)],
        check_addresses: flags & 8 != 0,
        allowed_sources: None,
        local_is_owner: flags & 32 != 0,
    };
    let Ok((ip, payload)) = parse_ipv4(packet) else {
        return;
    };
    let Ok(decoded) = receive(&ip, payload, &rules) else {
        return;
    };
    let mode = match decoded.checksum {
        ChecksumMatch::V3(mode) => mode,
        ChecksumMatch::V2 => v3_checksum,
    };
    let again = decoded.advert.encode(ip.src, ip.dst, mode);
    let rules_for_mode = ReceiveRules {
        v3_checksum: mode,
        ..rules
    };
    let back = Advert::decode(&again, ip.src, ip.dst, &rules_for_mode)
        .expect("an accepted advert re-encodes to one that decodes");
    assert_eq!(back.advert, decoded.advert, "round trip changed the advert");
});
