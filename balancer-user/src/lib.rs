//! The balancer agent as a library: the binary `balancer` and the
//! integration tests share it.
//!
//! Data-plane half: [`config`] (the TOML file), [`agent`] (`balancer run`),
//! [`dataplane`] (the loaded XDP object), [`pins`] (bpffs layout),
//! [`netlink`] (addresses, neighbours), [`sysctl`], [`neighbour`] (keeping
//! backends' ARP entries resolved), [`conntrack`] (expiry sweep) and
//! [`stats`] (`balancer stats`).
//!
//! Election: [`vrrp`] (the pure protocol: packets and state machine),
//! [`election`] (its runtime: timers, interface, VIPs, active flag),
//! [`vrrp_socket`] (adverts on the wire), [`garp`] (gratuitous ARP) and
//! [`notify`] (the notify command). Health: [`health`]. Operators:
//! [`admin`] (`balancer status` over a unix socket, Prometheus metrics),
//! [`service_manager`] (systemd's notify protocol and watchdog), [`import`]
//! (`balancer import`: keepalived.conf and haproxy.cfg to `balancer.toml`).

pub mod admin;
pub mod agent;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod election;
pub mod flow_reset;
pub mod garp;
pub mod health;
pub mod import;
pub mod neighbour;
pub mod netlink;
pub mod notify;
pub mod path_check;
pub mod pins;
pub mod service_manager;
pub mod stats;
pub mod sysctl;
pub mod vrrp;
pub mod vrrp_socket;
pub mod xdp_mode;

/// `error` followed by its sources, joined with ": ": for log fields,
/// where only the outermost message would otherwise be shown.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The XDP object (`balancer-ebpf`), embedded at build time.
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer.bpf.o"));
