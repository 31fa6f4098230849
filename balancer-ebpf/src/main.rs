//! The XDP data plane: round-robin full NAT of `VIP:port` TCP traffic.
//!
//! Only IPv4/TCP packets to a configured service whose VIP this node holds,
//! and replies from remote backends to this node's SNAT ports, are touched.
//! Everything else is `XDP_PASS`, byte for byte. See `balancer-common` for the
//! map layouts and the counters, and docs/ARCHITECTURE.md for the design.
//!
//! Not here: anything that needs state beyond the maps (health, election),
//! logging on the per-packet path.
#![no_std]
#![no_main]

mod csum;
mod flow;
mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Entry point of the balancer: dispatches, never fails closed.
#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    flow::handle(&ctx)
}

/// Returns `XDP_PASS` and nothing else. Native XDP_TX on a veth needs an XDP
/// program on the receiving peer, so the lab attaches this one to the bridge
/// side of every veth; the benchmark uses it as the zero-cost baseline.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// `bpf_fib_lookup` is GPL-only; the program is offered under MIT or GPL.
#[unsafe(link_section = "license")]
#[used]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
