//! VRRP advertisements on the wire: VRRPv3 (RFC 5798 / RFC 9568 section 5)
//! and VRRPv2 (RFC 3768 section 5, with the RFC 2338 simple-password
//! authentication keepalived still speaks), IPv4 only.
//!
//! [`Advert::encode`] produces the VRRP payload (what follows the IPv4
//! header); [`Advert::decode`] parses one. [`check_ip_header`] and
//! [`check_advert`] apply the receive-side rules of RFC 5798 section 7.1
//! that need the IP header or the local configuration; [`receive`] runs all
//! three in order. Every rejection is a [`DecodeError`] whose
//! [`reason`](DecodeError::reason) is a stable counter label.
//!
//! Not here: building or parsing the IPv4 header, sockets, and what to do
//! with a valid advert (that is [`super::instance`]).

use std::fmt;
use std::net::Ipv4Addr;

/// IP protocol number of VRRP (RFC 5798 section 5.1.1.4).
pub const IPPROTO_VRRP: u8 = 112;
/// The only TTL a VRRP packet may be sent or received with (RFC 5798 section 5.1.1.3).
pub const VRRP_TTL: u8 = 255;
/// IPv4 multicast group of VRRP (RFC 5798 section 5.1.1.2).
pub const VRRP_MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// The only VRRP packet type: ADVERTISEMENT (RFC 5798 section 5.2.2).
pub const TYPE_ADVERTISEMENT: u8 = 1;
/// Fixed part of every VRRP message, before the addresses.
pub const HEADER_LEN: usize = 8;
/// VRRPv2 authentication data after the addresses (RFC 3768 section 5.3.10).
pub const AUTH_DATA_LEN: usize = 8;
/// Largest VRRPv3 Max Adver Int: a 12-bit field of centiseconds.
pub const MAX_ADVER_INT_CS: u16 = 0x0fff;

/// VRRPv2 Auth Type 0: no authentication.
pub const AUTH_TYPE_NONE: u8 = 0;
/// VRRPv2 Auth Type 1: simple text password (RFC 2338 section 5.3.6.2,
/// keepalived `auth_type PASS`).
pub const AUTH_TYPE_PASS: u8 = 1;

/// Protocol version of an advert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// RFC 3768: interval in seconds, authentication data, checksum over
    /// the VRRP message only.
    V2,
    /// RFC 5798 / RFC 9568: interval in centiseconds, no authentication.
    V3,
}

impl Version {
    /// The value of the 4-bit Version field.
    pub fn number(self) -> u8 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.number())
    }
}

/// How the VRRPv3 checksum of an IPv4 advert is computed.
///
/// RFC 5798 section 5.2.8 refers to the IPv6 pseudo-header of RFC 2460 and
/// implementations disagreed on IPv4. keepalived (2.x, by default) prepends
/// the IPv4 pseudo-header {source, destination, zero, protocol 112, VRRP
/// length}; RFC 9568 section 5.2.8 clarified that IPv4 uses none (keepalived's
/// `v3_checksum_as_v2`, FRR's default). VRRPv2 never uses a pseudo-header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum V3Checksum {
    /// keepalived's default; what a stock keepalived in `vrrp_version 3`
    /// sends and requires. Our default, for interop with the seed setup.
    #[default]
    WithPseudoHeader,
    /// RFC 9568; keepalived with `v3_checksum_as_v2`.
    WithoutPseudoHeader,
}

/// What to change when a peer's VRRPv2 Auth Type differs from ours.
fn auth_type_hint(got: u8, expected: u8) -> &'static str {
    match (got, expected) {
        (AUTH_TYPE_NONE, AUTH_TYPE_PASS) => {
            " (a keepalived with vrrp_strict ignores its authentication block and sends none: \
             remove auth_pass from [vrrp] to join it)"
        }
        (AUTH_TYPE_PASS, AUTH_TYPE_NONE) => {
            " (the peer uses auth_type PASS: set the same auth_pass in [vrrp])"
        }
        _ => "",
    }
}

/// VRRPv2 authentication (RFC 3768 section 5.3.6, RFC 2338 section 5.3.6).
///
/// `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub enum Auth {
    /// Auth Type 0; the 8 authentication bytes are sent as zero and ignored.
    #[default]
    None,
    /// Auth Type 1: the password NUL-padded to 8 bytes, as keepalived's
    /// `auth_type PASS` / `auth_pass` sends it.
    Pass([u8; AUTH_DATA_LEN]),
}

/// A VRRPv2 password longer than the 8 bytes the packet carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth_pass is {len} bytes; VRRPv2 simple password authentication carries at most 8")]
pub struct PasswordTooLong {
    /// Length of the rejected password in bytes.
    pub len: usize,
}

impl Auth {
    /// `auth_type PASS` with `password` (at most 8 bytes; keepalived
    /// truncates longer ones with a warning, we refuse them).
    pub fn pass(password: &str) -> Result<Auth, PasswordTooLong> {
        let bytes = password.as_bytes();
        if bytes.len() > AUTH_DATA_LEN {
            return Err(PasswordTooLong { len: bytes.len() });
        }
        let mut data = [0u8; AUTH_DATA_LEN];
        data[..bytes.len()].copy_from_slice(bytes);
        Ok(Auth::Pass(data))
    }

    /// The Auth Type field value.
    pub fn auth_type(&self) -> u8 {
        match self {
            Auth::None => AUTH_TYPE_NONE,
            Auth::Pass(_) => AUTH_TYPE_PASS,
        }
    }

    /// The 8 Authentication Data bytes.
    fn data(&self) -> [u8; AUTH_DATA_LEN] {
        match self {
            Auth::None => [0; AUTH_DATA_LEN],
            Auth::Pass(data) => *data,
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Pass(_) => f.write_str("Pass(<redacted>)"),
        }
    }
}

/// The version-specific fields of an advert.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Format {
    /// RFC 3768 section 5.1.
    V2 {
        /// Adver Int: seconds between adverts (RFC 3768 section 5.3.7).
        adver_int_s: u8,
        /// Auth Type and Authentication Data.
        auth: Auth,
    },
    /// RFC 5798 section 5.1.
    V3 {
        /// Max Adver Int: centiseconds between adverts, 12 bits
        /// (RFC 5798 section 5.2.7).
        max_adver_int_cs: u16,
    },
}

/// One VRRP ADVERTISEMENT for IPv4.
///
/// VRRPv3, RFC 5798 section 5.1 (the IPv4 header precedes it):
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |(rsvd) |     Max Adver Int     |          Checksum             |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                                                               |
/// +                                                               +
/// |                       IPvX Address(es)                        |
/// +                                                               +
/// |                                                               |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
///
/// VRRPv2, RFC 3768 section 5.1:
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |Version| Type  | Virtual Rtr ID|   Priority    | Count IP Addrs|
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |   Auth Type   |   Adver Int   |          Checksum             |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                         IP Address (1)                        |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                            .                                  |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                         IP Address (n)                        |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                     Authentication Data (1)                   |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |                     Authentication Data (2)                   |
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Advert {
    /// Virtual Rtr ID, 1-255.
    pub vrid: u8,
    /// 255 = address owner, 1-254 = backup routers, 0 = the master stops.
    pub priority: u8,
    /// Version-specific fields.
    pub format: Format,
    /// The virtual addresses. At most 255 are encoded (the count is 8 bits).
    pub addresses: Vec<Ipv4Addr>,
}

/// Which checksum computation a received advert passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumMatch {
    /// VRRPv2: over the VRRP message only.
    V2,
    /// VRRPv3 with this computation. When both computations happen to give
    /// the same value, this is the configured one.
    V3(V3Checksum),
}

/// A successfully decoded advert and how its checksum was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The advert.
    pub advert: Advert,
    /// Lets the caller count (or log once) peers using the other VRRPv3
    /// checksum computation.
    pub checksum: ChecksumMatch,
}

/// The IPv4 header fields the receive checks need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeaderFields {
    /// Source address: the sender's primary address (tie-break key).
    pub src: Ipv4Addr,
    /// Destination: the VRRP group or, with unicast peers, our address.
    pub dst: Ipv4Addr,
    /// Time to live; must be 255.
    pub ttl: u8,
    /// IP protocol; must be 112.
    pub protocol: u8,
}

/// What a received advert is checked against: the local instance's
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveRules {
    /// The version this instance speaks; adverts of the other are rejected.
    pub version: Version,
    /// Our VRID.
    pub vrid: u8,
    /// VRRPv2 authentication that must match exactly (type and data).
    pub auth: Auth,
    /// The VRRPv3 checksum computation we send with and check first.
    pub v3_checksum: V3Checksum,
    /// Also accept the other VRRPv3 computation (reported in
    /// [`Decoded::checksum`]). Interop with a peer configured differently.
    pub accept_other_v3_checksum: bool,
    /// Our advertisement interval in centiseconds. VRRPv2 adverts must carry
    /// the same (RFC 3768 section 7.1); VRRPv3 backups learn the master's.
    pub adver_int_cs: u16,
    /// Our virtual addresses.
    pub addresses: Vec<Ipv4Addr>,
    /// Drop adverts whose address list differs from ours unless they come
    /// from the address owner (RFC 3768 section 7.1). Off is keepalived's
    /// `vrrp_skip_check_adv_addr`; RFC 5798 only asks to log.
    pub check_addresses: bool,
    /// With unicast peers: the only sources accepted. `None` = any source.
    pub allowed_sources: Option<Vec<Ipv4Addr>>,
    /// We are the address owner (priority 255): RFC 5798 section 7.1 says
    /// to discard every advert for the VRID.
    pub local_is_owner: bool,
}

/// Why a received advert was dropped. One variant per reason; each has a
/// stable counter label, [`DecodeError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed part (8 bytes, VRRPv2 16 with authentication).
    #[error("VRRP advert of {len} bytes is shorter than the {needed}-byte fixed part")]
    TooShort {
        /// Bytes received.
        len: usize,
        /// Fixed part of this version.
        needed: usize,
    },
    /// Version field is not the configured version.
    #[error("VRRP advert has version {got}, expected {expected}")]
    BadVersion {
        /// Version field received.
        got: u8,
        /// Configured version.
        expected: Version,
    },
    /// Type field is not ADVERTISEMENT (1).
    #[error("VRRP packet type {got} is not ADVERTISEMENT (1)")]
    BadType {
        /// Type field received.
        got: u8,
    },
    /// Count IPvX Addr is zero (RFC 5798 section 5.2.5: the minimum is 1).
    #[error("VRRP advert carries no address")]
    NoAddresses,
    /// The length does not match the address count.
    #[error("VRRP advert of {len} bytes does not hold its {count} addresses ({expected} bytes)")]
    AddressCountMismatch {
        /// Count IPvX Addr field.
        count: u8,
        /// Bytes received.
        len: usize,
        /// Length implied by the count.
        expected: usize,
    },
    /// Checksum wrong (under every computation allowed).
    #[error("VRRP advert checksum {got:#06x} is wrong, expected {expected:#06x}")]
    BadChecksum {
        /// Checksum field received.
        got: u16,
        /// What the configured computation gives.
        expected: u16,
    },
    /// Advertisement interval 0.
    #[error("VRRP advert has a zero advertisement interval")]
    ZeroInterval,
    /// VRRPv2 interval differs from ours (RFC 3768 section 7.1).
    #[error("VRRPv2 advert interval {got_cs} cs differs from the configured {expected_cs} cs")]
    IntervalMismatch {
        /// Received, in centiseconds.
        got_cs: u16,
        /// Configured, in centiseconds.
        expected_cs: u16,
    },
    /// VRRPv2 Auth Type differs from ours.
    #[error(
        "VRRPv2 auth type {got} differs from the configured {expected}{}",
        auth_type_hint(*got, *expected)
    )]
    AuthTypeMismatch {
        /// Auth Type received.
        got: u8,
        /// Configured Auth Type.
        expected: u8,
    },
    /// VRRPv2 password differs from ours (neither is shown).
    #[error("VRRPv2 authentication data does not match auth_pass")]
    AuthMismatch,
    /// TTL not 255: the advert crossed a router (RFC 5798 section 7.1).
    #[error("VRRP advert with TTL {got}, must be 255")]
    BadTtl {
        /// TTL received.
        got: u8,
    },
    /// Not IP protocol 112.
    #[error("IP protocol {got} is not VRRP (112)")]
    BadProtocol {
        /// Protocol received.
        got: u8,
    },
    /// Advert for another virtual router.
    #[error("VRRP advert for VRID {got}, ours is {expected}")]
    VridMismatch {
        /// VRID received.
        got: u8,
        /// Our VRID.
        expected: u8,
    },
    /// Address list differs from ours and the sender is not the owner.
    #[error("VRRP advert address list differs from the configured virtual addresses")]
    AddressListMismatch,
    /// Source not among the configured unicast peers.
    #[error("VRRP advert from {src}, which is not a configured peer")]
    UnknownSource {
        /// Source address received.
        src: Ipv4Addr,
    },
    /// We own the addresses (priority 255); nobody else may advertise them.
    #[error("VRRP advert received while we are the address owner")]
    LocalIsOwner,
}

impl DecodeError {
    /// Every label [`reason`](Self::reason) can return, to register counters
    /// up front.
    pub const REASONS: &'static [&'static str] = &[
        "too_short",
        "version",
        "type",
        "no_addresses",
        "address_count",
        "checksum",
        "interval",
        "interval_mismatch",
        "auth_type",
        "auth",
        "ttl",
        "protocol",
        "vrid",
        "address_list",
        "source",
        "local_owner",
    ];

    /// A short stable label for counters (`vrrp_adverts_dropped{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooShort { .. } => "too_short",
            DecodeError::BadVersion { .. } => "version",
            DecodeError::BadType { .. } => "type",
            DecodeError::NoAddresses => "no_addresses",
            DecodeError::AddressCountMismatch { .. } => "address_count",
            DecodeError::BadChecksum { .. } => "checksum",
            DecodeError::ZeroInterval => "interval",
            DecodeError::IntervalMismatch { .. } => "interval_mismatch",
            DecodeError::AuthTypeMismatch { .. } => "auth_type",
            DecodeError::AuthMismatch => "auth",
            DecodeError::BadTtl { .. } => "ttl",
            DecodeError::BadProtocol { .. } => "protocol",
            DecodeError::VridMismatch { .. } => "vrid",
            DecodeError::AddressListMismatch => "address_list",
            DecodeError::UnknownSource { .. } => "source",
            DecodeError::LocalIsOwner => "local_owner",
        }
    }
}

/// Offset of the checksum field.
const CHECKSUM_OFFSET: usize = 6;

impl Advert {
    /// The version of this advert.
    pub fn version(&self) -> Version {
        match self.format {
            Format::V2 { .. } => Version::V2,
            Format::V3 { .. } => Version::V3,
        }
    }

    /// The advertisement interval in centiseconds, whatever the version.
    pub fn interval_cs(&self) -> u16 {
        match self.format {
            Format::V2 { adver_int_s, .. } => u16::from(adver_int_s) * 100,
            Format::V3 { max_adver_int_cs } => max_adver_int_cs,
        }
    }

    /// Length of the encoded message.
    fn encoded_len(&self) -> usize {
        let count = self.addresses.len().min(usize::from(u8::MAX));
        let auth = match self.format {
            Format::V2 { .. } => AUTH_DATA_LEN,
            Format::V3 { .. } => 0,
        };
        HEADER_LEN + 4 * count + auth
    }

    /// The VRRP message (the IPv4 payload) with its checksum.
    ///
    /// `src` and `dst` are the IPv4 addresses it will be sent with; they
    /// only matter for VRRPv3 with [`V3Checksum::WithPseudoHeader`]. Never
    /// fails: at most 255 addresses are written (the count is 8 bits) and a
    /// VRRPv3 interval above 4095 cs is written as 4095, so the output always
    /// decodes; config validation keeps values in range.
    pub fn encode(&self, src: Ipv4Addr, dst: Ipv4Addr, v3_checksum: V3Checksum) -> Vec<u8> {
        let count = self.addresses.len().min(usize::from(u8::MAX));
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push((self.version().number() << 4) | TYPE_ADVERTISEMENT);
        out.push(self.vrid);
        out.push(self.priority);
        out.push(count as u8);
        match &self.format {
            Format::V2 { adver_int_s, auth } => {
                out.push(auth.auth_type());
                out.push(*adver_int_s);
            }
            Format::V3 { max_adver_int_cs } => {
                out.extend_from_slice(&(*max_adver_int_cs).min(MAX_ADVER_INT_CS).to_be_bytes());
            }
        }
        out.extend_from_slice(&[0, 0]);
        for address in &self.addresses[..count] {
            out.extend_from_slice(&address.octets());
        }
        if let Format::V2 { auth, .. } = &self.format {
            out.extend_from_slice(&auth.data());
        }
        let checksum = match self.format {
            Format::V2 { .. } => checksum(&out, 0),
            Format::V3 { .. } => v3_checksum_of(&out, src, dst, v3_checksum),
        };
        out[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 2].copy_from_slice(&checksum.to_be_bytes());
        out
    }

    /// Parse and verify one VRRP message (RFC 5798 section 7.1, RFC 3768
    /// section 7.1, the checks that need only the payload, the addresses it
    /// was sent with and our version/authentication/checksum settings).
    /// Checks in order: length of the fixed part, version, type, address
    /// count against the length, checksum, interval, authentication.
    pub fn decode(
        bytes: &[u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        rules: &ReceiveRules,
    ) -> Result<Decoded, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::TooShort {
                len: bytes.len(),
                needed: HEADER_LEN,
            });
        }
        let version = bytes[0] >> 4;
        if version != rules.version.number() {
            return Err(DecodeError::BadVersion {
                got: version,
                expected: rules.version,
            });
        }
        let kind = bytes[0] & 0x0f;
        if kind != TYPE_ADVERTISEMENT {
            return Err(DecodeError::BadType { got: kind });
        }
        let auth_len = match rules.version {
            Version::V2 => AUTH_DATA_LEN,
            Version::V3 => 0,
        };
        if bytes.len() < HEADER_LEN + auth_len {
            return Err(DecodeError::TooShort {
                len: bytes.len(),
                needed: HEADER_LEN + auth_len,
            });
        }
        let count = bytes[3];
        if count == 0 {
            return Err(DecodeError::NoAddresses);
        }
        let expected = HEADER_LEN + 4 * usize::from(count) + auth_len;
        if bytes.len() != expected {
            return Err(DecodeError::AddressCountMismatch {
                count,
                len: bytes.len(),
                expected,
            });
        }
        let got = u16::from_be_bytes([bytes[CHECKSUM_OFFSET], bytes[CHECKSUM_OFFSET + 1]]);
        let checksum_match = match rules.version {
            Version::V2 => {
                let expected = checksum_ignoring_field(bytes, 0);
                if got != expected {
                    return Err(DecodeError::BadChecksum { got, expected });
                }
                ChecksumMatch::V2
            }
            Version::V3 => {
                let configured = rules.v3_checksum;
                let other = match configured {
                    V3Checksum::WithPseudoHeader => V3Checksum::WithoutPseudoHeader,
                    V3Checksum::WithoutPseudoHeader => V3Checksum::WithPseudoHeader,
                };
                let expected = v3_checksum_ignoring_field(bytes, src, dst, configured);
                if got == expected {
                    ChecksumMatch::V3(configured)
                } else if rules.accept_other_v3_checksum
                    && got == v3_checksum_ignoring_field(bytes, src, dst, other)
                {
                    ChecksumMatch::V3(other)
                } else {
                    return Err(DecodeError::BadChecksum { got, expected });
                }
            }
        };
        let addresses = bytes[HEADER_LEN..HEADER_LEN + 4 * usize::from(count)]
            .chunks_exact(4)
            .map(|o| Ipv4Addr::new(o[0], o[1], o[2], o[3]))
            .collect();
        let format = match rules.version {
            Version::V2 => {
                let adver_int_s = bytes[5];
                if adver_int_s == 0 {
                    return Err(DecodeError::ZeroInterval);
                }
                let auth_type = bytes[4];
                if auth_type != rules.auth.auth_type() {
                    return Err(DecodeError::AuthTypeMismatch {
                        got: auth_type,
                        expected: rules.auth.auth_type(),
                    });
                }
                let mut data = [0u8; AUTH_DATA_LEN];
                data.copy_from_slice(&bytes[expected - AUTH_DATA_LEN..]);
                let auth = match rules.auth {
                    // RFC 3768: ignored on reception with no authentication.
                    Auth::None => Auth::None,
                    Auth::Pass(ours) => {
                        if data != ours {
                            return Err(DecodeError::AuthMismatch);
                        }
                        Auth::Pass(data)
                    }
                };
                Format::V2 { adver_int_s, auth }
            }
            Version::V3 => {
                // The 4 reserved bits are ignored on reception.
                let max_adver_int_cs = u16::from_be_bytes([bytes[4], bytes[5]]) & MAX_ADVER_INT_CS;
                if max_adver_int_cs == 0 {
                    return Err(DecodeError::ZeroInterval);
                }
                Format::V3 { max_adver_int_cs }
            }
        };
        Ok(Decoded {
            advert: Advert {
                vrid: bytes[1],
                priority: bytes[2],
                format,
                addresses,
            },
            checksum: checksum_match,
        })
    }
}

/// IP-level receive rules (RFC 5798 section 7.1): protocol 112, TTL 255,
/// and with unicast peers a known source.
pub fn check_ip_header(ip: &IpHeaderFields, rules: &ReceiveRules) -> Result<(), DecodeError> {
    if ip.protocol != IPPROTO_VRRP {
        return Err(DecodeError::BadProtocol { got: ip.protocol });
    }
    if ip.ttl != VRRP_TTL {
        return Err(DecodeError::BadTtl { got: ip.ttl });
    }
    if let Some(allowed) = &rules.allowed_sources {
        if !allowed.contains(&ip.src) {
            return Err(DecodeError::UnknownSource { src: ip.src });
        }
    }
    Ok(())
}

/// Rules on a decoded advert that need our configuration (RFC 5798 section
/// 7.1, RFC 3768 section 7.1): VRID, not being the owner ourselves, the
/// VRRPv2 interval, and optionally the address list (order does not matter;
/// an advert from the owner, priority 255, is accepted regardless).
pub fn check_advert(advert: &Advert, rules: &ReceiveRules) -> Result<(), DecodeError> {
    if advert.vrid != rules.vrid {
        return Err(DecodeError::VridMismatch {
            got: advert.vrid,
            expected: rules.vrid,
        });
    }
    if rules.local_is_owner {
        return Err(DecodeError::LocalIsOwner);
    }
    if advert.version() == Version::V2 && advert.interval_cs() != rules.adver_int_cs {
        return Err(DecodeError::IntervalMismatch {
            got_cs: advert.interval_cs(),
            expected_cs: rules.adver_int_cs,
        });
    }
    if rules.check_addresses && advert.priority != 255 {
        let mut theirs = advert.addresses.clone();
        let mut ours = rules.addresses.clone();
        theirs.sort_unstable();
        ours.sort_unstable();
        if theirs != ours {
            return Err(DecodeError::AddressListMismatch);
        }
    }
    Ok(())
}

/// All receive checks in RFC order: IP header, payload, configuration.
pub fn receive(
    ip: &IpHeaderFields,
    payload: &[u8],
    rules: &ReceiveRules,
) -> Result<Decoded, DecodeError> {
    check_ip_header(ip, rules)?;
    let decoded = Advert::decode(payload, ip.src, ip.dst, rules)?;
    check_advert(&decoded.advert, rules)?;
    Ok(decoded)
}

/// One's complement sum of `data` as big-endian 16-bit words (odd length
/// padded with a zero byte), added to `initial`, not yet folded.
fn ones_complement_sum(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial;
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The Internet checksum (RFC 1071) of `data` with `initial` prepended.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = ones_complement_sum(data, initial);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum of a received message, computed as if its checksum field
/// were zero.
fn checksum_ignoring_field(bytes: &[u8], initial: u32) -> u16 {
    let sum = ones_complement_sum(&bytes[..CHECKSUM_OFFSET], initial);
    checksum(&bytes[CHECKSUM_OFFSET + 2..], sum)
}

/// Sum of the IPv4 pseudo-header (RFC 768 layout) for a VRRP message of `len` bytes.
fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> u32 {
    let mut header = [0u8; 12];
    header[0..4].copy_from_slice(&src.octets());
    header[4..8].copy_from_slice(&dst.octets());
    header[9] = IPPROTO_VRRP;
    // A VRRP message is at most 8 + 255 * 4 + 8 bytes.
    header[10..12].copy_from_slice(&(len.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    ones_complement_sum(&header, 0)
}

fn v3_initial(src: Ipv4Addr, dst: Ipv4Addr, len: usize, how: V3Checksum) -> u32 {
    match how {
        V3Checksum::WithPseudoHeader => pseudo_header_sum(src, dst, len),
        V3Checksum::WithoutPseudoHeader => 0,
    }
}

fn v3_checksum_of(message: &[u8], src: Ipv4Addr, dst: Ipv4Addr, how: V3Checksum) -> u16 {
    checksum(message, v3_initial(src, dst, message.len(), how))
}

fn v3_checksum_ignoring_field(
    message: &[u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    how: V3Checksum,
) -> u16 {
    checksum_ignoring_field(message, v3_initial(src, dst, message.len(), how))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
    const VIP: Ipv4Addr = Ipv4Addr::new(192, 168, 174, 99);

    fn v2_rules() -> ReceiveRules {
        ReceiveRules {
            version: Version::V2,
            vrid: 101,
            auth: Auth::pass("1111").unwrap(),
            v3_checksum: V3Checksum::WithPseudoHeader,
            accept_other_v3_checksum: true,
            adver_int_cs: 100,
            addresses: vec![VIP],
            check_addresses: true,
            allowed_sources: None,
            local_is_owner: false,
        }
    }

    fn v3_rules() -> ReceiveRules {
        ReceiveRules {
            version: Version::V3,
            auth: Auth::None,
            adver_int_cs: 10,
            ..v2_rules()
        }
    }

    fn v2_advert() -> Advert {
        Advert {
            vrid: 101,
            priority: 101,
            format: Format::V2 {
                adver_int_s: 1,
                auth: Auth::pass("1111").unwrap(),
            },
            addresses: vec![VIP],
        }
    }

    fn v3_advert() -> Advert {
        Advert {
            vrid: 101,
            priority: 150,
            format: Format::V3 {
                max_adver_int_cs: 10,
            },
            addresses: vec![VIP, Ipv4Addr::new(198, 18, 0, 100)],
        }
    }

    /// What keepalived sends for the seed config (`virtual_router_id 101`,
    /// `priority 101`, `advert_int 1`, `auth_type PASS`, `auth_pass 1111`,
    /// VIP 192.168.174.99), written out byte by byte.
    ///
    /// Checksum by hand, 16-bit words with the checksum field zero:
    ///
    /// ```text
    /// 0x2165 + 0x6501 + 0x0101 + 0x0000 + 0xc0a8 + 0xae63
    ///        + 0x3131 + 0x3131 + 0x0000 + 0x0000 = 0x258d4
    /// fold: 0x58d4 + 0x2 = 0x58d6; complement: 0xffff - 0x58d6 = 0xa729
    /// ```
    const KEEPALIVED_V2_PASS: [u8; 20] = [
        0x21, 0x65, 0x65, 0x01, // version 2, type 1, VRID 101, priority 101, 1 address
        0x01, 0x01, 0xa7, 0x29, // auth type 1 (PASS), adver_int 1 s, checksum
        0xc0, 0xa8, 0xae, 0x63, // 192.168.174.99
        0x31, 0x31, 0x31, 0x31, // "1111"
        0x00, 0x00, 0x00, 0x00, // NUL padding to 8 bytes
    ];

    #[test]
    fn keepalived_v2_pass_fixture_decodes_and_reencodes() {
        let decoded = Advert::decode(&KEEPALIVED_V2_PASS, SRC, VRRP_MULTICAST_V4, &v2_rules())
            .expect("fixture decodes");
        assert_eq!(decoded.advert, v2_advert());
        assert_eq!(decoded.checksum, ChecksumMatch::V2);
        assert_eq!(decoded.advert.interval_cs(), 100);
        // v2 ignores the addresses the packet travels with.
        let encoded = v2_advert().encode(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(5, 6, 7, 8),
            V3Checksum::WithPseudoHeader,
        );
        assert_eq!(encoded, KEEPALIVED_V2_PASS);
    }

    /// VRRPv3, VRID 101, priority 100, 1 address (198.18.0.100), 100 cs,
    /// from 198.18.0.1 to 224.0.0.18.
    ///
    /// ```text
    /// without pseudo-header: 0x3165 + 0x6401 + 0x0064 + 0xc612 + 0x0064
    ///   = 0x15c40; fold 0x5c41; complement 0xa3be
    /// with pseudo-header, add 0xc612 + 0x0001 (source) + 0xe000 + 0x0012
    ///   (destination) + 0x0070 (zero, protocol 112) + 0x000c (length 12)
    ///   = 0x1a6a1; 0x15c40 + 0x1a6a1 = 0x302e1; fold 0x02e1 + 0x3 = 0x02e4;
    ///   complement 0xfd1b
    /// ```
    const V3_NO_PSEUDO: [u8; 12] = [
        0x31, 0x65, 0x64, 0x01, // version 3, type 1, VRID 101, priority 100, 1 address
        0x00, 0x64, 0xa3, 0xbe, // max adver int 100 cs, checksum
        0xc6, 0x12, 0x00, 0x64, // 198.18.0.100
    ];
    const V3_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    fn v3_fixture_advert() -> Advert {
        Advert {
            vrid: 101,
            priority: 100,
            format: Format::V3 {
                max_adver_int_cs: 100,
            },
            addresses: vec![Ipv4Addr::new(198, 18, 0, 100)],
        }
    }

    fn with_checksum(mut bytes: Vec<u8>, checksum: u16) -> Vec<u8> {
        bytes[6..8].copy_from_slice(&checksum.to_be_bytes());
        bytes
    }

    #[test]
    fn v3_fixture_both_checksum_computations() {
        let advert = v3_fixture_advert();
        let without = advert.encode(V3_SRC, VRRP_MULTICAST_V4, V3Checksum::WithoutPseudoHeader);
        assert_eq!(without, V3_NO_PSEUDO);
        let with = advert.encode(V3_SRC, VRRP_MULTICAST_V4, V3Checksum::WithPseudoHeader);
        assert_eq!(with, with_checksum(V3_NO_PSEUDO.to_vec(), 0xfd1b));

        let rules = ReceiveRules {
            adver_int_cs: 100,
            ..v3_rules()
        };
        for (bytes, how) in [
            (with.clone(), V3Checksum::WithPseudoHeader),
            (without.clone(), V3Checksum::WithoutPseudoHeader),
        ] {
            let decoded = Advert::decode(&bytes, V3_SRC, VRRP_MULTICAST_V4, &rules).unwrap();
            assert_eq!(decoded.advert, advert);
            assert_eq!(decoded.checksum, ChecksumMatch::V3(how));
        }

        // Strict: only the configured computation.
        let strict = ReceiveRules {
            accept_other_v3_checksum: false,
            ..rules.clone()
        };
        assert_eq!(
            Advert::decode(&without, V3_SRC, VRRP_MULTICAST_V4, &strict),
            Err(DecodeError::BadChecksum {
                got: 0xa3be,
                expected: 0xfd1b
            })
        );
        // The pseudo-header binds the addresses: another source fails both.
        let err = Advert::decode(
            &with,
            Ipv4Addr::new(198, 18, 0, 2),
            VRRP_MULTICAST_V4,
            &rules,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "checksum");
    }

    #[test]
    fn v3_checksum_valid_under_both_reports_the_configured_one() {
        // A pseudo-header summing to 0xffff changes nothing: pick addresses
        // whose words (with protocol and length) add up to that.
        let advert = v3_fixture_advert();
        let len = 12u32;
        let partial = pseudo_header_sum(
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(0, 0, 0, 0),
            len as usize,
        );
        let missing = 0xffff - partial;
        let src = Ipv4Addr::from(missing << 16);
        assert_eq!(
            pseudo_header_sum(src, Ipv4Addr::UNSPECIFIED, 12),
            0xffff,
            "test setup"
        );
        let bytes = advert.encode(src, Ipv4Addr::UNSPECIFIED, V3Checksum::WithPseudoHeader);
        for configured in [
            V3Checksum::WithPseudoHeader,
            V3Checksum::WithoutPseudoHeader,
        ] {
            let rules = ReceiveRules {
                adver_int_cs: 100,
                v3_checksum: configured,
                ..v3_rules()
            };
            let decoded = Advert::decode(&bytes, src, Ipv4Addr::UNSPECIFIED, &rules).unwrap();
            assert_eq!(decoded.checksum, ChecksumMatch::V3(configured));
        }
    }

    #[test]
    fn round_trips() {
        let dst = VRRP_MULTICAST_V4;
        for how in [
            V3Checksum::WithPseudoHeader,
            V3Checksum::WithoutPseudoHeader,
        ] {
            let advert = v3_advert();
            let bytes = advert.encode(SRC, dst, how);
            assert_eq!(bytes.len(), 8 + 2 * 4);
            let rules = ReceiveRules {
                v3_checksum: how,
                accept_other_v3_checksum: false,
                addresses: advert.addresses.clone(),
                ..v3_rules()
            };
            let decoded = Advert::decode(&bytes, SRC, dst, &rules).unwrap();
            assert_eq!(decoded.advert, advert);
            assert_eq!(decoded.checksum, ChecksumMatch::V3(how));
        }
        // v2 with PASS, several addresses, a short and a full 8-byte password.
        for password in ["", "1111", "12345678"] {
            let advert = Advert {
                vrid: 7,
                priority: 254,
                format: Format::V2 {
                    adver_int_s: 3,
                    auth: Auth::pass(password).unwrap(),
                },
                addresses: vec![
                    VIP,
                    Ipv4Addr::new(198, 18, 0, 1),
                    Ipv4Addr::new(198, 18, 0, 2),
                ],
            };
            let bytes = advert.encode(SRC, dst, V3Checksum::WithPseudoHeader);
            assert_eq!(bytes.len(), 8 + 3 * 4 + 8);
            let rules = ReceiveRules {
                vrid: 7,
                auth: Auth::pass(password).unwrap(),
                ..v2_rules()
            };
            let decoded = Advert::decode(&bytes, SRC, dst, &rules).unwrap();
            assert_eq!(decoded.advert, advert);
        }
        // v2 without authentication.
        let advert = Advert {
            format: Format::V2 {
                adver_int_s: 1,
                auth: Auth::None,
            },
            ..v2_advert()
        };
        let bytes = advert.encode(SRC, dst, V3Checksum::WithPseudoHeader);
        assert_eq!(bytes[4], AUTH_TYPE_NONE);
        assert_eq!(&bytes[12..], &[0; 8]);
        let rules = ReceiveRules {
            auth: Auth::None,
            ..v2_rules()
        };
        assert_eq!(
            Advert::decode(&bytes, SRC, dst, &rules).unwrap().advert,
            advert
        );
    }

    #[test]
    fn password_rules_and_redaction() {
        assert_eq!(Auth::pass("123456789"), Err(PasswordTooLong { len: 9 }));
        let auth = Auth::pass("1111").unwrap();
        assert_eq!(auth, Auth::Pass(*b"1111\0\0\0\0"));
        assert!(!format!("{auth:?}").contains("1111"));
        assert!(!format!("{:?}", v2_advert()).contains("1111"));
    }

    #[test]
    fn encode_clamps_out_of_range_fields_to_something_decodable() {
        let advert = Advert {
            format: Format::V3 {
                max_adver_int_cs: 5000,
            },
            addresses: (0..300u32).map(Ipv4Addr::from).collect(),
            ..v3_advert()
        };
        let bytes = advert.encode(SRC, VRRP_MULTICAST_V4, V3Checksum::WithPseudoHeader);
        assert_eq!(bytes.len(), 8 + 255 * 4);
        let rules = ReceiveRules {
            check_addresses: false,
            ..v3_rules()
        };
        let decoded = Advert::decode(&bytes, SRC, VRRP_MULTICAST_V4, &rules).unwrap();
        assert_eq!(decoded.advert.addresses.len(), 255);
        assert_eq!(decoded.advert.interval_cs(), MAX_ADVER_INT_CS);
    }

    /// Re-checksum a (v2) message after editing it, so a test reaches the
    /// check after the checksum.
    fn fix_v2_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
        bytes[6] = 0;
        bytes[7] = 0;
        let sum = checksum(&bytes, 0);
        bytes[6..8].copy_from_slice(&sum.to_be_bytes());
        bytes
    }

    fn fix_v3_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
        bytes[6] = 0;
        bytes[7] = 0;
        let sum = v3_checksum_of(&bytes, SRC, VRRP_MULTICAST_V4, V3Checksum::WithPseudoHeader);
        bytes[6..8].copy_from_slice(&sum.to_be_bytes());
        bytes
    }

    #[test]
    fn every_malformed_variant_is_rejected_with_its_reason() {
        let v2 = KEEPALIVED_V2_PASS.to_vec();
        let v3 = v3_advert().encode(SRC, VRRP_MULTICAST_V4, V3Checksum::WithPseudoHeader);
        let v3_rules = ReceiveRules {
            addresses: v3_advert().addresses,
            ..v3_rules()
        };
        let dec2 = |b: &[u8]| Advert::decode(b, SRC, VRRP_MULTICAST_V4, &v2_rules());
        let dec3 = |b: &[u8]| Advert::decode(b, SRC, VRRP_MULTICAST_V4, &v3_rules);
        let edit = |b: &[u8], at: usize, value: u8| {
            let mut b = b.to_vec();
            b[at] = value;
            b
        };

        let cases: Vec<(&str, Result<Decoded, DecodeError>, &str)> = vec![
            ("empty", dec2(&[]), "too_short"),
            ("7 bytes", dec3(&v3[..7]), "too_short"),
            ("v2 header without auth data", dec2(&v2[..12]), "too_short"),
            ("v3 packet to a v2 instance", dec2(&v3), "version"),
            ("v2 packet to a v3 instance", dec3(&v2), "version"),
            ("version 4", dec3(&edit(&v3, 0, 0x41)), "version"),
            ("version 0", dec3(&edit(&v3, 0, 0x01)), "version"),
            ("type 0", dec3(&edit(&v3, 0, 0x30)), "type"),
            ("type 2", dec2(&edit(&v2, 0, 0x22)), "type"),
            ("count 0", dec3(&edit(&v3, 3, 0)), "no_addresses"),
            ("count 3 for 2", dec3(&edit(&v3, 3, 3)), "address_count"),
            ("count 1 for 2", dec3(&edit(&v3, 3, 1)), "address_count"),
            ("v2 missing an auth byte", dec2(&v2[..19]), "address_count"),
            (
                "trailing byte",
                dec3(&[v3.as_slice(), &[0]].concat()),
                "address_count",
            ),
            ("checksum flipped", dec2(&edit(&v2, 7, 0x28)), "checksum"),
            ("priority changed", dec2(&edit(&v2, 2, 0x66)), "checksum"),
            ("v3 payload changed", dec3(&edit(&v3, 2, 0x01)), "checksum"),
            (
                "v2 adver_int 0",
                dec2(&fix_v2_checksum(edit(&v2, 5, 0))),
                "interval",
            ),
            (
                "v3 max adver int 0",
                dec3(&fix_v3_checksum(edit(&edit(&v3, 4, 0), 5, 0))),
                "interval",
            ),
            (
                "v3 interval 0 with reserved bits set",
                dec3(&fix_v3_checksum(edit(&edit(&v3, 4, 0xf0), 5, 0))),
                "interval",
            ),
            (
                "auth type none",
                dec2(&fix_v2_checksum(edit(&v2, 4, 0))),
                "auth_type",
            ),
            (
                "auth type AH",
                dec2(&fix_v2_checksum(edit(&v2, 4, 2))),
                "auth_type",
            ),
            (
                "wrong password",
                dec2(&fix_v2_checksum(edit(&v2, 15, b'2'))),
                "auth",
            ),
            (
                "garbage after the NUL",
                dec2(&fix_v2_checksum(edit(&v2, 19, b'x'))),
                "auth",
            ),
        ];
        for (name, result, reason) in cases {
            match result {
                Ok(decoded) => panic!("{name}: accepted {decoded:?}"),
                Err(err) => assert_eq!(err.reason(), reason, "{name}: {err}"),
            }
        }

        // Reserved bits in v3 are ignored, not rejected.
        let reserved = fix_v3_checksum(edit(&v3, 4, 0xa0));
        assert_eq!(dec3(&reserved).unwrap().advert, v3_advert());

        // PASS received while configured without authentication.
        let rules = ReceiveRules {
            auth: Auth::None,
            ..v2_rules()
        };
        let err = Advert::decode(&v2, SRC, VRRP_MULTICAST_V4, &rules).unwrap_err();
        assert_eq!(
            err,
            DecodeError::AuthTypeMismatch {
                got: 1,
                expected: 0
            }
        );
        assert!(err.to_string().contains("set the same auth_pass"), "{err}");
        // The message says what to change, the seed's strict keepalived
        // case included.
        let strict = DecodeError::AuthTypeMismatch {
            got: AUTH_TYPE_NONE,
            expected: AUTH_TYPE_PASS,
        };
        assert!(
            strict.to_string().contains("vrrp_strict")
                && strict.to_string().contains("remove auth_pass"),
            "{strict}"
        );
    }

    #[test]
    fn ip_and_configuration_checks() {
        let rules = v2_rules();
        let ip = IpHeaderFields {
            src: SRC,
            dst: VRRP_MULTICAST_V4,
            ttl: 255,
            protocol: 112,
        };
        assert!(receive(&ip, &KEEPALIVED_V2_PASS, &rules).is_ok());

        let reason = |ip: IpHeaderFields, rules: &ReceiveRules, advert: &Advert| {
            let bytes = advert.encode(ip.src, ip.dst, rules.v3_checksum);
            receive(&ip, &bytes, rules).unwrap_err().reason()
        };
        let good = v2_advert();
        assert_eq!(
            reason(IpHeaderFields { ttl: 254, ..ip }, &rules, &good),
            "ttl"
        );
        assert_eq!(
            reason(IpHeaderFields { ttl: 1, ..ip }, &rules, &good),
            "ttl"
        );
        assert_eq!(
            reason(IpHeaderFields { protocol: 17, ..ip }, &rules, &good),
            "protocol"
        );
        let peers = ReceiveRules {
            allowed_sources: Some(vec![Ipv4Addr::new(198, 18, 0, 12)]),
            ..rules.clone()
        };
        assert_eq!(reason(ip, &peers, &good), "source");
        let from_peer = IpHeaderFields {
            src: Ipv4Addr::new(198, 18, 0, 12),
            ..ip
        };
        let bytes = good.encode(from_peer.src, from_peer.dst, V3Checksum::WithPseudoHeader);
        assert!(receive(&from_peer, &bytes, &peers).is_ok());

        let other_vrid = Advert {
            vrid: 102,
            ..good.clone()
        };
        assert_eq!(reason(ip, &rules, &other_vrid), "vrid");
        let owner = ReceiveRules {
            local_is_owner: true,
            ..rules.clone()
        };
        assert_eq!(reason(ip, &owner, &good), "local_owner");
        let slow = Advert {
            format: Format::V2 {
                adver_int_s: 2,
                auth: Auth::pass("1111").unwrap(),
            },
            ..good.clone()
        };
        assert_eq!(reason(ip, &rules, &slow), "interval_mismatch");

        // Address list: compared as a set, skipped when disabled, and the
        // owner's adverts pass regardless.
        let other_vip = Advert {
            addresses: vec![Ipv4Addr::new(198, 18, 0, 99)],
            ..good.clone()
        };
        assert_eq!(reason(ip, &rules, &other_vip), "address_list");
        let extra_vip = Advert {
            addresses: vec![VIP, Ipv4Addr::new(198, 18, 0, 99)],
            ..good.clone()
        };
        assert_eq!(reason(ip, &rules, &extra_vip), "address_list");
        let skip = ReceiveRules {
            check_addresses: false,
            ..rules.clone()
        };
        let bytes = other_vip.encode(ip.src, ip.dst, V3Checksum::WithPseudoHeader);
        assert!(receive(&ip, &bytes, &skip).is_ok());
        let from_owner = Advert {
            priority: 255,
            ..other_vip.clone()
        };
        let bytes = from_owner.encode(ip.src, ip.dst, V3Checksum::WithPseudoHeader);
        assert!(receive(&ip, &bytes, &rules).is_ok());
        let two = ReceiveRules {
            addresses: vec![Ipv4Addr::new(198, 18, 0, 99), VIP],
            ..rules.clone()
        };
        let bytes = extra_vip.encode(ip.src, ip.dst, V3Checksum::WithPseudoHeader);
        assert!(receive(&ip, &bytes, &two).is_ok());
        let reversed = Advert {
            addresses: vec![Ipv4Addr::new(198, 18, 0, 99), VIP],
            ..good.clone()
        };
        let bytes = reversed.encode(ip.src, ip.dst, V3Checksum::WithPseudoHeader);
        let two_sorted = ReceiveRules {
            addresses: vec![VIP, Ipv4Addr::new(198, 18, 0, 99)],
            ..rules.clone()
        };
        assert!(receive(&ip, &bytes, &two_sorted).is_ok());

        // VRRPv3 backups learn the interval: no mismatch check.
        let v3 = ReceiveRules {
            addresses: v3_advert().addresses,
            ..v3_rules()
        };
        let slower = Advert {
            format: Format::V3 {
                max_adver_int_cs: 100,
            },
            ..v3_advert()
        };
        let bytes = slower.encode(ip.src, ip.dst, V3Checksum::WithPseudoHeader);
        assert!(receive(&ip, &bytes, &v3).is_ok());
    }

    #[test]
    fn reasons_are_listed_and_distinct() {
        let mut seen = DecodeError::REASONS.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), DecodeError::REASONS.len());
        let samples = [
            DecodeError::TooShort { len: 0, needed: 8 },
            DecodeError::BadVersion {
                got: 1,
                expected: Version::V3,
            },
            DecodeError::BadType { got: 0 },
            DecodeError::NoAddresses,
            DecodeError::AddressCountMismatch {
                count: 1,
                len: 0,
                expected: 0,
            },
            DecodeError::BadChecksum {
                got: 0,
                expected: 1,
            },
            DecodeError::ZeroInterval,
            DecodeError::IntervalMismatch {
                got_cs: 1,
                expected_cs: 2,
            },
            DecodeError::AuthTypeMismatch {
                got: 0,
                expected: 1,
            },
            DecodeError::AuthMismatch,
            DecodeError::BadTtl { got: 1 },
            DecodeError::BadProtocol { got: 6 },
            DecodeError::VridMismatch {
                got: 1,
                expected: 2,
            },
            DecodeError::AddressListMismatch,
            DecodeError::UnknownSource { src: SRC },
            DecodeError::LocalIsOwner,
        ];
        assert_eq!(samples.len(), DecodeError::REASONS.len());
        for error in &samples {
            assert!(DecodeError::REASONS.contains(&error.reason()), "{error}");
        }
    }

    /// xorshift64*: enough randomness for a mutation loop, no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn truncations_and_byte_flips_never_panic() {
        let valid = [
            (KEEPALIVED_V2_PASS.to_vec(), v2_rules()),
            (
                v3_advert().encode(SRC, VRRP_MULTICAST_V4, V3Checksum::WithPseudoHeader),
                ReceiveRules {
                    addresses: v3_advert().addresses,
                    ..v3_rules()
                },
            ),
            (
                v3_advert().encode(SRC, VRRP_MULTICAST_V4, V3Checksum::WithoutPseudoHeader),
                ReceiveRules {
                    addresses: v3_advert().addresses,
                    ..v3_rules()
                },
            ),
        ];
        let ip = IpHeaderFields {
            src: SRC,
            dst: VRRP_MULTICAST_V4,
            ttl: 255,
            protocol: 112,
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (bytes, rules) in &valid {
            assert!(receive(&ip, bytes, rules).is_ok());
            for len in 0..bytes.len() {
                assert!(
                    receive(&ip, &bytes[..len], rules).is_err(),
                    "truncated to {len}"
                );
            }
            let mut accepted = 0;
            for _ in 0..20_000 {
                let mut mutated = bytes.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(mutated.len());
                    mutated[at] ^= 1 << rng.below(8);
                }
                if rng.below(4) == 0 {
                    let len = rng.below(mutated.len() + 1);
                    mutated.truncate(len);
                }
                if rng.below(8) == 0 {
                    mutated.extend((0..rng.below(16)).map(|_| rng.next() as u8));
                }
                if let Ok(decoded) = receive(&ip, &mutated, rules) {
                    // Anything accepted must survive re-encoding unchanged
                    // (except ignored reserved bits).
                    accepted += 1;
                    let how = match decoded.checksum {
                        ChecksumMatch::V3(how) => how,
                        ChecksumMatch::V2 => V3Checksum::WithPseudoHeader,
                    };
                    let again = decoded.advert.encode(ip.src, ip.dst, how);
                    let decoded_again = Advert::decode(&again, ip.src, ip.dst, rules).unwrap();
                    assert_eq!(decoded_again.advert, decoded.advert);
                }
            }
            // A single flipped bit always breaks the checksum; only flips
            // that cancel out in the one's complement sum get through.
            assert!(accepted < 1_000, "accepted {accepted} mutants");
        }
        // Pure noise.
        for _ in 0..20_000 {
            let len = rng.below(64);
            let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = receive(&ip, &noise, &valid[0].1);
            let _ = receive(&ip, &noise, &valid[1].1);
        }
    }
}
