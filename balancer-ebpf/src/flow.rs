//! Per-packet decisions: new connections (backend choice, SNAT port,
//! conntrack entries), established flows, replies, and flow teardown.
//!
//! Nothing is written into the packet until every lookup and insert that can
//! fail has succeeded, so a packet handed to the stack or dropped is never
//! half rewritten.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_EXIST, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns, bpf_redirect,
    },
    programs::XdpContext,
    EbpfContext,
};
use balancer_common::{
    counter, FlowEntry, FlowKey, Service, ServiceKey, Settings,
    BACKEND_LOCAL, DIR_TO_BACKEND, DIR_TO_CLIENT, FLOW_BACKEND_FIN, FLOW_BACKEND_FIRST,
    FLOW_BOTH_FIN, FLOW_CLIENT_FIN, FLOW_LAST_ACK, FLOW_REPLIED, FLOW_RESET, IPPROTO_TCP,
    MAX_BACKENDS, SERVICE_ACTIVE, SERVICE_SCHEDULER_FIRST, SNAT_ADDR_TURN, SNAT_CURSORS,
};

use crate::{
    csum::Delta,
    maps::{account, count, CONNTRACK, RR_CURSOR, SERVICES, SETTINGS, SNAT_CURSOR},
    parse::{parse, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// How many ports of its partition a new flow tries before giving up. A
/// partition of at most this many ports is searched exhaustively.
const SNAT_PROBES: u32 = 16; // keep in step with the `probe!` list below
/// `last_seen_ns` is refreshed at most this often, to keep established
/// packets from writing to the shared entry every time.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;
const AF_INET: u8 = 2;

/// CLOCK_MONOTONIC at tick resolution. Flow timeouts are seconds long, and
/// the coarse clock skips the TSC read that `bpf_ktime_get_ns` pays on every
/// packet (a fifth of an established packet's cost when profiled).
#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let pkt = match parse(ctx) {
        Ok(p) => p,
        Err(why) => {
            count(why.0);
            return xdp_action::XDP_PASS;
        }
    };
    let (saddr, daddr, sport, dport, flags) = unsafe {
        (
            (*pkt.ip).saddr,
            (*pkt.ip).daddr,
            (*pkt.tcp).source,
            (*pkt.tcp).dest,
            (*pkt.tcp).flags,
        )
    };
    let key = FlowKey {
        saddr,
        daddr,
        sport,
        dport,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let skey = ServiceKey {
        vip: daddr,
        port: dport,
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let Some(settings) = SETTINGS.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // A reply from a remote backend comes to this node's address, at a port
    // of the SNAT range. Tested first: it costs a few compares, and a reply
    // then needs one hash lookup (its flow), not two. No service can match
    // such a packet: the agent refuses a VIP equal to the node's address.
    let port = u16::from_be(dport);
    if port >= settings.snat_port_min
        && port <= settings.snat_port_max
        && is_snat_addr(settings, daddr)
    {
        return established(ctx, &pkt, &key, flags, settings, counter::REVERSED);
    }
    if let Some(svc) = unsafe { SERVICES.get(skey) } {
        if svc.flags & SERVICE_ACTIVE == 0 {
            count(counter::PASS_INACTIVE);
            return xdp_action::XDP_PASS;
        }
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            return new_connection(ctx, &pkt, &key, svc, settings);
        }
        return established(ctx, &pkt, &key, flags, settings, counter::FORWARDED);
    }
    count(counter::PASS_NOT_SERVICE);
    xdp_action::XDP_PASS
}

/// Whether `addr` is one of this node's SNAT source addresses.
#[inline(always)]
fn is_snat_addr(settings: &Settings, addr: u32) -> bool {
    if addr == settings.node_addr {
        return true;
    }
    let n = settings.snat_addr_count as usize;
    let a = &settings.snat_addrs;
    (n > 0 && addr == a[0]) || (n > 1 && addr == a[1]) || (n > 2 && addr == a[2]) || (n > 3 && addr == a[3])
}

/// The SNAT source address of the next new flow on this CPU: `node_addr`
/// and the extra addresses in turn.
#[inline(always)]
fn next_snat_addr(settings: &Settings) -> u32 {
    let n = settings.snat_addr_count;
    if n == 0 {
        return settings.node_addr;
    }
    let Some(turn) = SNAT_CURSOR.get_ptr_mut(SNAT_ADDR_TURN) else {
        return settings.node_addr;
    };
    let t = unsafe { *turn };
    let next = if t >= n { 0 } else { t + 1 };
    unsafe { *turn = next };
    match t {
        1 => settings.snat_addrs[0],
        2 if n >= 2 => settings.snat_addrs[1],
        3 if n >= 3 => settings.snat_addrs[2],
        4 if n >= 4 => settings.snat_addrs[3],
        _ => settings.node_addr,
    }
}

/// The partner entry's key: the rewritten tuple seen from the other side.
#[inline(always)]
fn partner_key(e: &FlowEntry) -> FlowKey {
    FlowKey {
        saddr: e.nat_daddr,
        daddr: e.nat_saddr,
        sport: e.nat_dport,
        dport: e.nat_sport,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn expired(e: &FlowEntry, now: u64, settings: &Settings) -> bool {
    settings.holds.expired(e.flags, e.last_seen_ns, now)
}

/// The partner of the entry `e` found under `key`, if it still points back
/// at `key`: a client reusing its port, or an SNAT port handed to a new
/// flow, leaves an old entry whose partner key now belongs to someone else.
#[inline(always)]
fn partner_of(key: &FlowKey, e: &FlowEntry) -> Option<*mut FlowEntry> {
    let pp = CONNTRACK.get_ptr_mut(partner_key(e))?;
    let p = unsafe { &*pp };
    if p.nat_daddr == key.saddr
        && p.nat_saddr == key.daddr
        && p.nat_dport == key.sport
        && p.nat_sport == key.dport
    {
        Some(pp)
    } else {
        None
    }
}

/// A packet of a known flow, in either direction.
#[inline(always)]
fn established(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    flags: u8,
    settings: &Settings,
    what: u32,
) -> u32 {
    let Some(ep) = CONNTRACK.get_ptr_mut(key) else {
        count(counter::PASS_NO_FLOW);
        return xdp_action::XDP_PASS;
    };
    let now = now_ns();
    let e = unsafe { *ep };
    let to_client = e.direction == DIR_TO_CLIENT;
    if expired(&e, now, settings) {
        // A forward entry is keyed by the client's tuple and nothing else
        // claims it: it can go. A reverse entry is the claim on its SNAT
        // port and only the CPU owning the port may delete it (see
        // `claim_snat_port`); an expired one is free already.
        if !to_client {
            let _ = CONNTRACK.remove(key);
        }
        if e.flags & FLOW_RESET == 0 {
            count(counter::FLOWS_EXPIRED);
        }
        count(counter::PASS_NO_FLOW);
        return xdp_action::XDP_PASS;
    }
    if flags & TCP_RST != 0 {
        // Forward entry deleted, reverse entry marked: the port is free at
        // once, reclaimed by its owning CPU.
        let partner = partner_of(key, &e);
        if to_client {
            if partner.is_some() {
                let _ = CONNTRACK.remove(partner_key(&e));
            }
            unsafe {
                (*ep).flags = e.flags | FLOW_RESET;
                (*ep).last_seen_ns = now;
            }
        } else {
            if let Some(pp) = partner {
                unsafe {
                    (*pp).flags |= FLOW_RESET;
                    (*pp).last_seen_ns = now;
                }
            }
            let _ = CONNTRACK.remove(key);
        }
        count(counter::FLOWS_RESET);
    } else {
        let f = next_flags(e.flags, flags, to_client);
        if f != e.flags {
            // A state change: both entries get it, stamped now, so that the
            // hold it implies runs from this packet.
            if let Some(pp) = partner_of(key, &e) {
                unsafe {
                    (*pp).flags = f;
                    (*pp).last_seen_ns = now;
                }
            }
            unsafe {
                (*ep).flags = f;
                (*ep).last_seen_ns = now;
            }
        } else if now.wrapping_sub(e.last_seen_ns) > TOUCH_INTERVAL_NS {
            unsafe { (*ep).last_seen_ns = now };
        }
    }
    account(
        e.service_id as u32,
        e.backend_slot as u32,
        pkt.len,
        false,
        to_client,
    );
    count(what);
    rewrite(pkt, &e);
    transmit(ctx, pkt, e.ifindex)
}

/// The `FLOW_*` flags after a non-RST segment with TCP `tcp` flags, sent by
/// the backend (`from_backend`) or the client.
#[inline(always)]
fn next_flags(f: u32, tcp: u8, from_backend: bool) -> u32 {
    let mut f = f;
    if from_backend {
        f |= FLOW_REPLIED;
        if tcp & TCP_FIN != 0 && f & FLOW_BACKEND_FIN == 0 {
            f |= FLOW_BACKEND_FIN;
            if f & FLOW_CLIENT_FIN == 0 {
                f |= FLOW_BACKEND_FIRST;
            }
        }
    } else if tcp & TCP_FIN != 0 {
        f |= FLOW_CLIENT_FIN;
    } else if tcp & TCP_ACK != 0
        && f & (FLOW_BOTH_FIN | FLOW_BACKEND_FIRST | FLOW_LAST_ACK) == FLOW_BOTH_FIN
    {
        // Client closed first; an ACK after the backend's FIN is the final
        // one: the backend's socket closes without TIME_WAIT.
        f |= FLOW_LAST_ACK;
    }
    f
}

/// A SYN to an active service: choose a backend, and for a remote one set
/// up the NAT.
#[inline(always)]
fn new_connection(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    svc: &Service,
    settings: &Settings,
) -> u32 {
    let now = now_ns();
    // A retransmitted SYN follows the flow its first copy created.
    if let Some(ep) = CONNTRACK.get_ptr(key) {
        let e = unsafe { *ep };
        if !expired(&e, now, settings) && e.flags & (FLOW_BOTH_FIN | FLOW_RESET) == 0 {
            account(e.service_id as u32, e.backend_slot as u32, pkt.len, false, false);
            count(counter::FORWARDED);
            rewrite(pkt, &e);
            return transmit(ctx, pkt, e.ifindex);
        }
        // A new connection reusing the tuple of a dead or closing one. Only
        // the forward entry goes: the old reverse entry keeps holding its
        // SNAT port for as long as its state says (the backend may sit in
        // TIME_WAIT on it).
        let _ = CONNTRACK.remove(key);
    }

    let n = svc.ready_count;
    if n == 0 {
        count(counter::DROP_NO_BACKEND);
        return xdp_action::XDP_DROP;
    }
    let Some(slot) = choose_slot(svc, n) else {
        return xdp_action::XDP_PASS;
    };
    if slot >= MAX_BACKENDS {
        return xdp_action::XDP_PASS;
    }
    let backend = svc.backends[slot];
    if backend.flags & BACKEND_LOCAL != 0 {
        account(svc.id, slot as u32, pkt.len, true, false);
        count(counter::PASS_LOCAL_BACKEND);
        return xdp_action::XDP_PASS;
    }

    // Next hops both ways, before anything is written.
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(to_backend) = fib(ctx, ingress, settings.node_addr, backend.addr) else {
        count(counter::DROP_FIB);
        return xdp_action::XDP_DROP;
    };
    let Some(to_client) = fib(ctx, ingress, key.daddr, key.saddr) else {
        count(counter::DROP_FIB);
        return xdp_action::XDP_DROP;
    };

    let reverse = FlowEntry {
        nat_saddr: key.daddr,
        nat_daddr: key.saddr,
        nat_sport: key.dport,
        nat_dport: key.sport,
        ifindex: to_client.ifindex,
        eth_src: to_client.smac,
        eth_dst: to_client.dmac,
        service_id: svc.id as u16,
        backend_slot: slot as u8,
        direction: DIR_TO_CLIENT,
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    let snat_addr = next_snat_addr(settings);
    let template = backend_key(backend.addr, backend.port, snat_addr);
    let cursor = cursor_index(backend.addr, backend.port, snat_addr);
    let Some((rkey, snat_port)) = claim_snat_port(settings, &template, &reverse, cursor, now)
    else {
        count(counter::DROP_SNAT_EXHAUSTED);
        return xdp_action::XDP_DROP;
    };
    let forward = FlowEntry {
        nat_saddr: snat_addr,
        nat_daddr: backend.addr,
        nat_sport: snat_port,
        nat_dport: backend.port,
        ifindex: to_backend.ifindex,
        eth_src: to_backend.smac,
        eth_dst: to_backend.dmac,
        service_id: svc.id as u16,
        backend_slot: slot as u8,
        direction: DIR_TO_BACKEND,
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    if CONNTRACK.insert(key, forward, BPF_NOEXIST as u64).is_err() {
        let _ = CONNTRACK.remove(rkey);
        count(counter::DROP_CONNTRACK_INSERT);
        return xdp_action::XDP_DROP;
    }
    count(counter::FLOWS_CREATED);
    count(counter::FORWARDED);
    account(svc.id, slot as u32, pkt.len, true, false);
    rewrite(pkt, &forward);
    transmit(ctx, pkt, forward.ifindex)
}

/// The backend slot of a new connection to `svc`, whose READY set holds
/// `n > 0` slots in configured order: the first of them
/// ([`SERVICE_SCHEDULER_FIRST`]), or the next in round robin.
#[inline(always)]
fn choose_slot(svc: &Service, n: u32) -> Option<usize> {
    if svc.flags & SERVICE_SCHEDULER_FIRST != 0 {
        return Some(svc.ready[0] as usize);
    }
    let cursor = RR_CURSOR.get_ptr_mut(svc.id)?;
    let turn = unsafe {
        let c = *cursor;
        *cursor = c.wrapping_add(1);
        c
    };
    // The verifier does not bound the result of `%`, so mask the index. The
    // agent never writes ready_count > MAX_BACKENDS; no bounds test on `n`
    // here, or LLVM would prove the mask redundant and drop it.
    Some(svc.ready[((turn % n) as usize) & (MAX_BACKENDS - 1)] as usize)
}

/// The reverse key template for replies from `backend` to this node; the
/// destination port is filled in per SNAT candidate.
#[inline(always)]
fn backend_key(addr: u32, port: u16, node_addr: u32) -> FlowKey {
    FlowKey {
        saddr: addr,
        daddr: node_addr,
        sport: port,
        dport: 0,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// The `SNAT_CURSOR` slot of a backend and SNAT address. The port space is
/// per (SNAT address, backend address and port), whichever services share
/// the backend, so the cursor is keyed by them: a hash, since the array
/// cannot be keyed by address. Two keys sharing a slot stay correct (the
/// insert is the check); they only walk one cursor between them.
#[inline(always)]
fn cursor_index(addr: u32, port: u16, snat_addr: u32) -> u32 {
    let h = addr.wrapping_mul(0x9e37_79b1)
        ^ (port as u32).wrapping_mul(0x85eb_ca6b)
        ^ snat_addr.wrapping_mul(0xc2b2_ae35);
    (h >> 16) & (SNAT_CURSORS - 1)
}

/// Whether the SNAT port of reverse key `rkey`, found taken, may be handed
/// to a new flow: its entry is gone, or past its hold and its forward
/// partner (if it still points here) past its own hold too, so that a flow
/// quiet in one direction only is not cut.
#[inline(always)]
fn reclaimable(rkey: &FlowKey, now: u64, settings: &Settings) -> bool {
    let Some(rp) = CONNTRACK.get_ptr(rkey) else {
        return true;
    };
    let r = unsafe { *rp };
    if !expired(&r, now, settings) {
        return false;
    }
    match partner_of(rkey, &r) {
        Some(fp) => expired(unsafe { &*fp }, now, settings),
        None => true,
    }
}

/// Finds a free SNAT port towards one backend in this CPU's partition of
/// the range (ports `p` with `(p - min) % partitions == cpu`, as DPVS's
/// `sa_pool` splits its ports), starting at this CPU's cursor for the
/// backend, and claims it by inserting the reverse entry with
/// `BPF_NOEXIST`. The insert is the collision check; the partition makes
/// taking over an expired entry safe: no other CPU probes (or reclaims) the
/// port, so the entry replaced here is the expired one just read, never a
/// fresh claim. The cursor walks the partition in order, so the port a new
/// flow gets is the one released longest ago (a backend's TIME_WAIT on it
/// has the longest time to pass). Returns the key and the port (network
/// order).
#[inline(always)]
fn claim_snat_port(
    settings: &Settings,
    template: &FlowKey,
    reverse: &FlowEntry,
    cursor: u32,
    now: u64,
) -> Option<(FlowKey, u16)> {
    let min = settings.snat_port_min as u32;
    let max = settings.snat_port_max as u32;
    if max < min {
        return None;
    }
    let range = max - min + 1;
    let parts = if settings.snat_partitions == 0 {
        1
    } else {
        settings.snat_partitions
    };
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if cpu >= parts || cpu >= range {
        return None;
    }
    // Ports of this partition: min + cpu + k * parts for k < size.
    let size = (range - cpu).div_ceil(parts);
    let probes = if size < SNAT_PROBES { size } else { SNAT_PROBES };
    let cur = SNAT_CURSOR.get_ptr_mut(cursor)?;
    let mut k = unsafe { *cur };
    if k >= size {
        k = 0;
    }
    let base = min + cpu;
    let mut rkey = *template;
    // Unrolled by hand: as a loop, LLVM rewrites the counter into `start + i`
    // with an equality exit test, and the verifier can no longer prove the
    // loop ends ("sequence of jumps is too complex").
    macro_rules! probe {
        ($($i:literal)*) => {$(
            if $i < probes {
                let port = (base + k * parts) as u16;
                rkey.dport = port.to_be();
                k += 1;
                if k >= size {
                    k = 0;
                }
                if CONNTRACK.insert(&rkey, reverse, BPF_NOEXIST as u64).is_ok() {
                    unsafe { *cur = k };
                    return Some((rkey, port.to_be()));
                }
                // Taken over in one atomic replace: a reader on another CPU
                // sees the old flow's entry or the new one, never a mix. It
                // fails only if the entry went meanwhile (LRU eviction, the
                // agent's purge); then the port is free for a plain claim.
                if reclaimable(&rkey, now, settings)
                    && (CONNTRACK.insert(&rkey, reverse, BPF_EXIST as u64).is_ok()
                        || CONNTRACK.insert(&rkey, reverse, BPF_NOEXIST as u64).is_ok())
                {
                    count(counter::SNAT_RECLAIMED);
                    unsafe { *cur = k };
                    return Some((rkey, port.to_be()));
                }
            }
        )*};
    }
    probe!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    unsafe { *cur = k };
    None
}

/// Rewrites addresses, ports and MACs from `e`, updating both checksums.
#[inline(always)]
fn rewrite(pkt: &Packet, e: &FlowEntry) {
    unsafe {
        let ip = pkt.ip;
        let tcp = pkt.tcp;
        let addrs = Delta::new()
            .u32((*ip).saddr, e.nat_saddr)
            .u32((*ip).daddr, e.nat_daddr);
        (*ip).check = addrs.apply((*ip).check);
        let ports = addrs
            .u16((*tcp).source, e.nat_sport)
            .u16((*tcp).dest, e.nat_dport);
        (*tcp).check = ports.apply((*tcp).check);
        (*ip).saddr = e.nat_saddr;
        (*ip).daddr = e.nat_daddr;
        (*tcp).source = e.nat_sport;
        (*tcp).dest = e.nat_dport;
        (*pkt.eth).src = e.eth_src;
        (*pkt.eth).dst = e.eth_dst;
    }
}

/// Sends the rewritten frame: back out of the ingress interface, or to
/// another one. A VLAN-tagged frame keeps its tag and goes back out where it
/// came from (its backends must be on the same VLAN).
#[inline(always)]
fn transmit(ctx: &XdpContext, pkt: &Packet, ifindex: u32) -> u32 {
    if pkt.tagged || ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

struct NextHop {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// `bpf_fib_lookup` from `src` to `dst`; `None` unless it found a route and
/// a resolved neighbour.
#[inline(always)]
fn fib(ctx: &XdpContext, ifindex: u32, src: u32, dst: u32) -> Option<NextHop> {
    use aya_ebpf::bindings::{
        bpf_fib_lookup__bindgen_ty_1 as Len, bpf_fib_lookup__bindgen_ty_2 as Tos,
        bpf_fib_lookup__bindgen_ty_3 as Src, bpf_fib_lookup__bindgen_ty_4 as Dst,
        bpf_fib_lookup__bindgen_ty_5 as Tbid,
    };
    // Every byte set explicitly: a zeroed() of this struct becomes a memset
    // loop the verifier may reject, and the helper reads all 64 bytes.
    let mut p = FibParams {
        family: AF_INET,
        l4_protocol: IPPROTO_TCP,
        sport: 0,
        dport: 0,
        __bindgen_anon_1: Len { tot_len: 0 },
        ifindex,
        __bindgen_anon_2: Tos { flowinfo: 0 },
        __bindgen_anon_3: Src { ipv6_src: [src, 0, 0, 0] },
        __bindgen_anon_4: Dst { ipv6_dst: [dst, 0, 0, 0] },
        __bindgen_anon_5: Tbid { tbid: 0 },
        smac: [0; 6],
        dmac: [0; 6],
    };
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    Some(NextHop {
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
    })
}
