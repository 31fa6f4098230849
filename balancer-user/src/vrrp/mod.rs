//! VRRP election, the protocol part: which node holds a virtual IP.
//!
//! This module is pure. It does no I/O and reads no clock:
//!
//! - [`packet`]: VRRP advertisements as plain types (VRRPv3 per RFC 5798 /
//!   RFC 9568 and VRRPv2 per RFC 3768 with keepalived's `auth_type PASS`),
//!   `encode` to the IPv4 payload, `decode` plus the receive checks of
//!   RFC 5798 section 7.1, each rejection with a counter label.
//! - [`instance`]: the RFC 5798 section 6.4 state machine of one virtual
//!   router. Inputs and the current [`instance::Time`] go in, a list of
//!   [`instance::Action`]s comes out, and
//!   [`instance::Instance::poll_timeout`] says when to call it again.
//!
//! What it is not: no sockets (raw IP protocol 112, multicast membership,
//! TTL), no netlink (adding or removing the VIP), no gratuitous ARP frames,
//! no data-plane map updates, no config file parsing, no timers or tasks.
//! The agent's runtime owns those and drives this module: it feeds received
//! packets through [`packet::receive`] into
//! [`instance::Instance::handle`] and carries out the returned actions in
//! order. Because time is passed in, the tests run a simulated LAN on a
//! virtual clock.

pub mod instance;
pub mod packet;

pub use instance::{
    effective_priority, Action, ConfigError, GarpBurst, Input, Instance, InstanceConfig, State,
    Time,
};
pub use packet::{
    check_advert, check_ip_header, receive, Advert, Auth, ChecksumMatch, DecodeError, Decoded,
    Format, IpHeaderFields, PasswordTooLong, ReceiveRules, V3Checksum, Version,
};
