//! rtnetlink: the one place where the agent reads or changes interfaces,
//! addresses and the neighbour table.
//!
//! [`VipGuard`] adds the VIPs this node holds and removes exactly the ones it
//! added when dropped. Nothing else in the agent touches addresses.

use std::net::{IpAddr, Ipv4Addr};

use crate::error_chain;
use futures_util::stream::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        AddressFamily,
    },
    AddressMessageBuilder, Handle,
};
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

    async fn add_address(&self, ifindex: u32, addr: Ipv4Addr) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(ifindex, IpAddr::V4(addr), 32)
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
            netlink.add_address(ifindex, vip).await?;
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
