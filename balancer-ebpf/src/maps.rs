//! The maps, sized for the defaults; the agent resizes `CONNTRACK` at load
//! time (`EbpfLoader::map_max_entries`). BTF maps, so `bpftool map dump`
//! prints field names.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use balancer_common::{
    conntrack_entries, counter, FlowEntry, FlowKey, Service, ServiceKey, Settings, TrafficStats,
    DEFAULT_CONNTRACK_FLOWS, MAX_BACKENDS, MAX_SERVICES, SNAT_CURSORS,
};

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map]
pub static CONNTRACK: LruHashMap<
    FlowKey,
    FlowEntry,
    { conntrack_entries(DEFAULT_CONNTRACK_FLOWS) as usize },
> = LruHashMap::new();

#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
pub static RR_CURSOR: PerCpuArray<u32, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map]
pub static SERVICE_STATS: PerCpuArray<TrafficStats, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats, { MAX_SERVICES as usize * MAX_BACKENDS }> =
    PerCpuArray::new();

#[btf_map]
pub static SNAT_CURSOR: PerCpuArray<u32, { SNAT_CURSORS as usize + 1 }> = PerCpuArray::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { counter::SLOTS as usize }> = PerCpuArray::new();

/// Adds one to counter slot `which` (this CPU's copy).
#[inline(always)]
pub fn count(which: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(which) {
        unsafe { *p += 1 };
    }
}

/// Accounts one packet of `bytes` to a service and one of its backends;
/// `reply`: it came from the backend.
#[inline(always)]
pub fn account(service_id: u32, slot: u32, bytes: u64, new_flow: bool, reply: bool) {
    let n = new_flow as u64;
    let r = reply as u64;
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_flows += n;
            (*s).replies += r;
        }
    }
    let idx = balancer_common::backend_stats_index(service_id, slot);
    if let Some(s) = BACKEND_STATS.get_ptr_mut(idx) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_flows += n;
            (*s).replies += r;
        }
    }
}
