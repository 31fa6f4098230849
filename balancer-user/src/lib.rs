//! The balancer agent as a library: the binary `balancer` and the
//! integration tests share it.

/// The XDP object (`balancer-ebpf`), embedded at build time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer.bpf.o"));
