//! Embeds the XDP object built by `cargo xtask build-ebpf`.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let obj = manifest.join("../target/bpf/balancer.bpf.o");
    println!("cargo:rerun-if-changed={}", obj.display());
    if !obj.exists() {
        panic!(
            "the XDP object {} is missing: run `cargo xtask build-ebpf` first \
             (`cargo xtask build`, `test` and `demo` do it for you)",
            obj.display()
        );
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("balancer.bpf.o");
    fs::copy(&obj, &out).expect("copy the XDP object into OUT_DIR");
}
