//! rtnetlink: the one place where the agent reads or changes interfaces,
//! addresses and the neighbour table.
//!
//! [`VipGuard`] adds the VIPs this node holds (static mode) and removes
//! exactly the ones it added when dropped. With an election, the election
//! adds and removes them through [`Netlink::add_vip`] and
//! [`Netlink::remove_vip`], and follows the interface through
//! [`InterfaceEvents`]. Nothing else in the agent touches addresses.

use std::net::{IpAddr, Ipv4Addr};

use crate::error_chain;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use rtnetlink::{
    packet_core::{DefaultNla, NetlinkMessage, NetlinkPayload},
    packet_route::{
        address::{AddressAttribute, AddressMessage, CacheInfo},
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::SocketAddr,
    AddressMessageBuilder, Handle, MulticastGroup,
};

use crate::xdp_mode::{InterfaceKind, VethPeer};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("interface {name:?} does not exist")]
    NoSuchInterface { name: String },
    #[error("cannot list addresses")]
    ListAddresses(#[source] rtnetlink::Error),
    #[error("cannot add {addr}/32 to interface {ifindex}")]
    AddAddress {
        addr: Ipv4Addr,
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot remove {addr}/32 from interface {ifindex}")]
    DelAddress {
        addr: Ipv4Addr,
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot list neighbours")]
    ListNeighbours(#[source] rtnetlink::Error),
    #[error("cannot read interface {ifindex}")]
    GetLink {
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {ifindex} has no Ethernet address")]
    NoHardwareAddress { ifindex: u32 },
    #[error("cannot subscribe to interface events")]
    Subscribe(#[source] std::io::Error),
    #[error("cannot start a runtime for netlink clean-up")]
    Runtime(#[source] std::io::Error),
}

/// Index of interface `name` (in the caller's network namespace).
pub fn interface_index(name: &str) -> Result<u32, NetlinkError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| NetlinkError::NoSuchInterface {
        name: name.to_string(),
    })
}

/// A route-netlink connection. Needs a running tokio runtime.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Every IPv4 address configured on any interface, with the index of
    /// its interface.
    pub async fn ipv4_addresses(&self) -> Result<Vec<(u32, Ipv4Addr)>, NetlinkError> {
        let mut stream = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(NetlinkError::ListAddresses)?
        {
            if let Some(addr) = ipv4_of(&msg) {
                out.push((msg.header.index, addr));
            }
        }
        Ok(out)
    }

    /// The IPv4 addresses on interface `ifindex`.
    pub async fn ipv4_addresses_on(&self, ifindex: u32) -> Result<Vec<Ipv4Addr>, NetlinkError> {
        Ok(self
            .ipv4_addresses()
            .await?
            .into_iter()
            .filter(|(index, _)| *index == ifindex)
            .map(|(_, addr)| addr)
            .collect())
    }

    /// Adds `vip`/32 to interface `ifindex`, valid for `lifetime` seconds
    /// (forever with `None`); `Ok(false)` when it was already there.
    pub async fn add_vip(
        &self,
        ifindex: u32,
        vip: Ipv4Addr,
        lifetime: Option<u32>,
    ) -> Result<bool, NetlinkError> {
        match self.add_address(ifindex, vip, lifetime, false).await {
            Ok(()) => Ok(true),
            Err(NetlinkError::AddAddress { source, .. })
                if errno(&source) == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Renews `vip`/32 on interface `ifindex` for `lifetime` more seconds
    /// (adding it if it is gone).
    pub async fn renew_vip(
        &self,
        ifindex: u32,
        vip: Ipv4Addr,
        lifetime: u32,
    ) -> Result<(), NetlinkError> {
        self.add_address(ifindex, vip, Some(lifetime), true).await
    }

    /// Removes `vip`/32 from interface `ifindex`; `Ok(false)` when it was
    /// not there.
    pub async fn remove_vip(&self, ifindex: u32, vip: Ipv4Addr) -> Result<bool, NetlinkError> {
        match self.del_address(ifindex, vip).await {
            Ok(()) => Ok(true),
            Err(NetlinkError::DelAddress { source, .. })
                if errno(&source) == Some(libc::EADDRNOTAVAIL) =>
            {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    async fn link(&self, ifindex: u32) -> Result<LinkMessage, NetlinkError> {
        let mut stream = self.handle.link().get().match_index(ifindex).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(NetlinkError::GetLink {
                ifindex,
                source: rtnetlink::Error::RequestFailed,
            }),
            Err(source) => Err(NetlinkError::GetLink { ifindex, source }),
        }
    }

    /// What kind of interface `ifindex` is, as far as XDP cares: a veth
    /// (and whether its peer, possibly in another namespace, runs an XDP
    /// program) or anything else.
    pub async fn interface_kind(&self, ifindex: u32) -> Result<InterfaceKind, NetlinkError> {
        let msg = self.link(ifindex).await?;
        let is_veth = msg.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
            _ => false,
        });
        if !is_veth {
            return Ok(InterfaceKind::Other);
        }
        let peer_ifindex = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(index) => Some(*index),
            _ => None,
        });
        let netns_id = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkNetNsId(id) => Some(*id),
            _ => None,
        });
        let xdp_attached = match peer_ifindex {
            Some(peer) => self.peer_runs_xdp(peer, netns_id).await,
            None => None,
        };
        Ok(InterfaceKind::Veth(VethPeer {
            ifindex: peer_ifindex,
            netns_id,
            xdp_attached,
        }))
    }

    /// Whether interface `ifindex` of the namespace with id `netns_id` (as
    /// this namespace numbers it; `None`: this namespace) has an XDP
    /// program attached in driver mode; `None` when the kernel does not say.
    async fn peer_runs_xdp(&self, ifindex: u32, netns_id: Option<i32>) -> Option<bool> {
        // IFLA_TARGET_NETNSID: ask about a link of another namespace
        // without entering it (the peer of a container's veth lives in the
        // host's namespace, which the agent cannot otherwise see).
        const IFLA_TARGET_NETNSID: u16 = 46;
        let mut request = self.handle.link().get().match_index(ifindex);
        if let Some(id) = netns_id {
            request
                .message_mut()
                .attributes
                .push(LinkAttribute::Other(DefaultNla::new(
                    IFLA_TARGET_NETNSID,
                    id.to_ne_bytes().to_vec(),
                )));
        }
        let msg = request.execute().try_next().await.ok()??;
        let xdp = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })?;
        // Only a driver-mode program makes the peer take XDP frames: a
        // generic one runs after the frame would already have been dropped.
        // The kernel names the per-mode programs only when several modes
        // are attached at once.
        let attached = xdp.iter().find_map(|x| match x {
            LinkXdp::Attached(mode) => Some(*mode),
            _ => None,
        })?;
        Some(match attached {
            XdpAttached::Driver => true,
            XdpAttached::Multiple => xdp
                .iter()
                .any(|x| matches!(x, LinkXdp::DrvProgId(id) if *id != 0)),
            _ => false,
        })
    }

    /// Whether interface `ifindex` is up and running (administratively up
    /// with carrier): what VRRP needs to send and receive.
    pub async fn link_up(&self, ifindex: u32) -> Result<bool, NetlinkError> {
        Ok(link_is_up(&self.link(ifindex).await?))
    }

    /// The Ethernet address of interface `ifindex`.
    pub async fn hardware_address(&self, ifindex: u32) -> Result<[u8; 6], NetlinkError> {
        let msg = self.link(ifindex).await?;
        msg.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .ok_or(NetlinkError::NoHardwareAddress { ifindex })
    }

    async fn add_address(
        &self,
        ifindex: u32,
        addr: Ipv4Addr,
        lifetime: Option<u32>,
        replace: bool,
    ) -> Result<(), NetlinkError> {
        let mut request = self.handle.address().add(ifindex, IpAddr::V4(addr), 32);
        if let Some(secs) = lifetime {
            // The kernel removes the address itself when `secs` pass
            // without a renewal (`ip addr … valid_lft`).
            let mut lifetimes = CacheInfo::default();
            lifetimes.ifa_preferred = secs;
            lifetimes.ifa_valid = secs;
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::CacheInfo(lifetimes));
        }
        if replace {
            request = request.replace();
        }
        request
            .execute()
            .await
            .map_err(|source| NetlinkError::AddAddress {
                addr,
                ifindex,
                source,
            })
    }

    async fn del_address(&self, ifindex: u32, addr: Ipv4Addr) -> Result<(), NetlinkError> {
        let msg = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(ifindex)
            .address(addr, 32)
            .build();
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::DelAddress {
                addr,
                ifindex,
                source,
            })
    }

    /// Whether the neighbour table has a usable (`NUD_VALID`: reachable,
    /// stale, delay, probe, permanent or noarp) entry for `addr`: the states
    /// in which `bpf_fib_lookup` finds a MAC address.
    pub async fn neighbour_resolved(&self, addr: Ipv4Addr) -> Result<bool, NetlinkError> {
        let mut stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(NetlinkError::ListNeighbours)?
        {
            let is_addr = msg.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == addr)
            });
            if is_addr
                && matches!(
                    msg.header.state,
                    NeighbourState::Reachable
                        | NeighbourState::Stale
                        | NeighbourState::Delay
                        | NeighbourState::Probe
                        | NeighbourState::Permanent
                        | NeighbourState::Noarp
                )
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The errno of a netlink error reply.
fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

/// Up and running: `IFF_UP` and `IFF_RUNNING` (operationally up, which on
/// Ethernet means carrier), as keepalived decides.
fn link_is_up(msg: &LinkMessage) -> bool {
    msg.header.flags.contains(LinkFlags::Up) && msg.header.flags.contains(LinkFlags::Running)
}

/// A change of an interface seen on the route-netlink multicast groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterfaceEvent {
    /// The interface's state was (re)announced.
    Link { ifindex: u32, up: bool },
    /// The interface was deleted.
    LinkRemoved { ifindex: u32 },
    /// An IPv4 address was removed from the interface.
    AddressRemoved { ifindex: u32, addr: Ipv4Addr },
}

/// Link and IPv4 address notifications (what `ip monitor link address`
/// shows), from a netlink socket of their own. Needs a running tokio
/// runtime, like [`Netlink::connect`].
pub struct InterfaceEvents {
    messages: BoxStream<'static, (NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl std::fmt::Debug for InterfaceEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InterfaceEvents")
    }
}

impl InterfaceEvents {
    pub fn subscribe() -> Result<InterfaceEvents, NetlinkError> {
        let (connection, _handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
        ])
        .map_err(NetlinkError::Subscribe)?;
        tokio::spawn(connection);
        Ok(InterfaceEvents {
            messages: messages.boxed(),
        })
    }

    /// The next event, or `None` when the subscription ended (the socket
    /// failed, e.g. after the kernel dropped notifications on overflow:
    /// poll the state instead).
    pub async fn next(&mut self) -> Option<InterfaceEvent> {
        loop {
            let (msg, _) = self.messages.next().await?;
            let NetlinkPayload::InnerMessage(msg) = msg.payload else {
                continue;
            };
            let event = match msg {
                RouteNetlinkMessage::NewLink(link) => InterfaceEvent::Link {
                    ifindex: link.header.index,
                    up: link_is_up(&link),
                },
                RouteNetlinkMessage::DelLink(link) => InterfaceEvent::LinkRemoved {
                    ifindex: link.header.index,
                },
                RouteNetlinkMessage::DelAddress(address) => match ipv4_of(&address) {
                    Some(addr) => InterfaceEvent::AddressRemoved {
                        ifindex: address.header.index,
                        addr,
                    },
                    None => continue,
                },
                _ => continue,
            };
            return Some(event);
        }
    }
}

fn ipv4_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's
    // on point-to-point links, and equal to IFA_LOCAL elsewhere.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
            _ => None,
        })
    })
}

/// VIPs this agent added to the interface; dropping the guard removes them
/// (and only them: a VIP that was already present is left alone).
#[derive(Debug)]
pub struct VipGuard {
    ifindex: u32,
    interface: String,
    added: Vec<Ipv4Addr>,
}

impl VipGuard {
    /// Adds each of `vips` as a /32 on interface `ifindex` unless it is
    /// already there. On failure the VIPs added so far are removed again.
    pub async fn add(
        netlink: &Netlink,
        ifindex: u32,
        interface: &str,
        vips: &[Ipv4Addr],
    ) -> Result<VipGuard, NetlinkError> {
        let present: Vec<Ipv4Addr> = netlink
            .ipv4_addresses()
            .await?
            .into_iter()
            .filter(|(index, _)| *index == ifindex)
            .map(|(_, addr)| addr)
            .collect();
        let mut guard = VipGuard {
            ifindex,
            interface: interface.to_string(),
            added: Vec::new(),
        };
        for &vip in vips {
            if present.contains(&vip) || guard.added.contains(&vip) {
                info!(%vip, interface, "VIP already on the interface, leaving it as is");
                continue;
            }
            netlink.add_address(ifindex, vip, None, false).await?;
            info!(%vip, interface, "added VIP");
            guard.added.push(vip);
        }
        Ok(guard)
    }

    /// The VIPs this guard added.
    pub fn added(&self) -> &[Ipv4Addr] {
        &self.added
    }
}

impl Drop for VipGuard {
    fn drop(&mut self) {
        if self.added.is_empty() {
            return;
        }
        let ifindex = self.ifindex;
        let interface = self.interface.clone();
        let added = std::mem::take(&mut self.added);
        // Drop cannot await, and may run inside (or outside) a runtime: do
        // the removal on a thread of its own with a private runtime.
        let result = std::thread::spawn(move || -> Result<(), NetlinkError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(NetlinkError::Runtime)?;
            runtime.block_on(async move {
                let netlink = Netlink::connect()?;
                for vip in added {
                    match netlink.del_address(ifindex, vip).await {
                        Ok(()) => info!(%vip, interface, "removed VIP"),
                        Err(error) => warn!(error = %error_chain(&error), "could not remove VIP"),
                    }
                }
                Ok(())
            })
        })
        .join();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(error = %error_chain(&error), "could not remove VIPs"),
            Err(_) => warn!("VIP removal thread panicked"),
        }
    }
}
