//! Which XDP mode the data plane attaches in, decided from what the
//! interface is.
//!
//! Native (driver) mode is the fast one, but on some drivers the frames a
//! program sends back out with `XDP_TX` (or to another interface with
//! `bpf_redirect`) need more than the program: a veth delivers them into
//! its peer's XDP receive path, and when the peer has no driver-mode XDP
//! program it drops every one of them, counted only in the peer's
//! `xdp_tx_errors`. For this data plane that is every frame to a remote
//! backend: half the connections of a two-node round robin, while the
//! counters say "forwarded". Generic (skb) mode hands such frames to the
//! stack's transmit path and works on any interface.
//!
//! [`choose`] is pure: it takes the requested mode and the interface's
//! [`InterfaceKind`] (read by [`crate::netlink::Netlink::interface_kind`])
//! and says which mode to try, or why the requested one cannot work.
//! Attaching itself is [`crate::dataplane`]'s.

use std::fmt;

use crate::config::XdpMode;

/// What the interface is, as far as XDP's transmit paths care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterfaceKind {
    /// A veth: native `XDP_TX` and redirect work only while its peer runs a
    /// driver-mode XDP program.
    Veth(VethPeer),
    /// Any other driver: native mode works wherever the driver accepts it.
    Other,
}

/// The other end of a veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VethPeer {
    /// Its interface index, in its own namespace (`None`: not reported).
    pub ifindex: Option<u32>,
    /// The id of its namespace as this namespace numbers it (`None`: this
    /// namespace, or not reported).
    pub netns_id: Option<i32>,
    /// Whether a driver-mode XDP program is attached to it (`None`: the
    /// kernel did not say).
    pub xdp_attached: Option<bool>,
}

impl VethPeer {
    /// Whether native `XDP_TX` from this side reaches the wire.
    pub fn takes_xdp_frames(&self) -> bool {
        self.xdp_attached == Some(true)
    }
}

impl fmt::Display for VethPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ifindex {
            Some(index) => write!(f, "peer ifindex {index}")?,
            None => f.write_str("peer")?,
        }
        if let Some(id) = self.netns_id {
            write!(f, " in netns id {id}")?;
        }
        match self.xdp_attached {
            Some(true) => f.write_str(", with a driver-mode XDP program"),
            Some(false) => f.write_str(", without a driver-mode XDP program"),
            None => f.write_str(", XDP attachment unknown"),
        }
    }
}

/// What to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Native mode; under `auto`, fall back to generic if the driver
    /// refuses it.
    Native { fallback: bool },
    /// Generic mode; `reason` says why `auto` chose it (`None`: asked for).
    Generic { reason: Option<String> },
}

/// Why the requested mode cannot work on this interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "[dataplane] xdp_mode = \"native\" on {interface}: it is a veth ({peer}), and native XDP_TX \
     on a veth drops every frame unless its peer runs a driver-mode XDP program, so every \
     connection to a remote backend would be lost. Set xdp_mode = \"generic\" (or \"auto\"), \
     or attach an XDP program (one that returns XDP_PASS is enough) to the peer in driver mode"
)]
pub struct NativeRefused {
    pub interface: String,
    pub peer: VethPeer,
}

/// Decides the mode for `requested` on `interface` of `kind`.
pub fn choose(
    requested: XdpMode,
    interface: &str,
    kind: InterfaceKind,
) -> Result<Plan, NativeRefused> {
    let blocked = match kind {
        InterfaceKind::Veth(peer) if !peer.takes_xdp_frames() => Some(peer),
        _ => None,
    };
    match (requested, blocked) {
        (XdpMode::Generic, _) => Ok(Plan::Generic { reason: None }),
        (XdpMode::Native, None) => Ok(Plan::Native { fallback: false }),
        (XdpMode::Native, Some(peer)) => Err(NativeRefused {
            interface: interface.to_string(),
            peer,
        }),
        (XdpMode::Auto, None) => Ok(Plan::Native { fallback: true }),
        (XdpMode::Auto, Some(peer)) => Ok(Plan::Generic {
            reason: Some(format!(
                "{interface} is a veth ({peer}); native XDP_TX would drop every frame to a \
                 remote backend"
            )),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth(xdp_attached: Option<bool>) -> InterfaceKind {
        InterfaceKind::Veth(VethPeer {
            ifindex: Some(7),
            netns_id: Some(0),
            xdp_attached,
        })
    }

    #[test]
    fn other_drivers_get_what_they_ask_for() {
        for (mode, plan) in [
            (XdpMode::Native, Plan::Native { fallback: false }),
            (XdpMode::Auto, Plan::Native { fallback: true }),
            (XdpMode::Generic, Plan::Generic { reason: None }),
        ] {
            assert_eq!(choose(mode, "eth0", InterfaceKind::Other), Ok(plan));
        }
    }

    #[test]
    fn auto_on_a_veth_without_peer_program_is_generic_and_says_why() {
        for peer in [Some(false), None] {
            let Ok(Plan::Generic { reason: Some(why) }) = choose(XdpMode::Auto, "eth0", veth(peer))
            else {
                panic!("auto on a bare veth must be generic with a reason");
            };
            assert!(why.contains("eth0 is a veth"), "{why}");
            assert!(why.contains("peer ifindex 7 in netns id 0"), "{why}");
        }
    }

    #[test]
    fn native_on_a_veth_without_peer_program_is_refused_with_the_fix() {
        let err = choose(XdpMode::Native, "eth0", veth(Some(false))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("on eth0"), "{text}");
        assert!(text.contains("xdp_mode = \"generic\""), "{text}");
        assert!(text.contains("attach an XDP program"), "{text}");
        // Unknown counts as absent: better a clear refusal than lost frames.
        assert!(choose(XdpMode::Native, "eth0", veth(None)).is_err());
    }

    #[test]
    fn a_veth_whose_peer_runs_xdp_takes_native() {
        assert_eq!(
            choose(XdpMode::Native, "eth0", veth(Some(true))),
            Ok(Plan::Native { fallback: false })
        );
        assert_eq!(
            choose(XdpMode::Auto, "eth0", veth(Some(true))),
            Ok(Plan::Native { fallback: true })
        );
        assert_eq!(
            choose(XdpMode::Generic, "eth0", veth(Some(true))),
            Ok(Plan::Generic { reason: None })
        );
    }
}
