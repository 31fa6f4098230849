#!/usr/bin/env bash
# Installs what `cargo xtask test|demo|bench` need on a fresh Debian (bookworm)
# machine, as root. Idempotent: a second run checks and prints "ok" lines only.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (installs Debian packages, mounts bpffs)" >&2
    exit 1
fi

# 1. Debian packages the tests, demo and benchmarks use.
#    redis-tools brings redis-cli and redis-benchmark; systemd brings
#    systemd-analyze, which checks scripts/balancer.service; lintian checks
#    the Debian package; chromium loads the status page in
#    tests/tests/status_page.rs; nftables is the in-kernel DNAT peer of the
#    benchmark's churn scenario; stress-ng loads the CPUs in tests/tests/cluster.rs.
pkgs=(redis-server redis-tools bpftool iproute2 ethtool keepalived haproxy tcpdump procps psmisc systemd lintian chromium nftables stress-ng)
missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages start system-wide daemons; the tests start their own in
    # namespaces, so stop and disable the stock ones (no systemd here is fine).
    # nftables runs no daemon, and stopping its unit would flush the host's
    # ruleset, so it is left alone.
    for svc in redis-server keepalived haproxy; do
        if command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
        service "$svc" stop >/dev/null 2>&1 || true
    done
else
    say "ok: Debian packages (${pkgs[*]})"
fi

# 2. rust-src for nightly (`-Z build-std=core` for bpfel-unknown-none).
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    say "adding rust-src to the nightly toolchain"
    rustup component add rust-src --toolchain nightly
else
    say "ok: nightly rust-src"
fi

# 2b. clippy and rustfmt for the stable toolchain (`cargo xtask test` lints).
for comp in clippy rustfmt; do
    if ! rustup component list --toolchain stable --installed 2>/dev/null | grep -q "^$comp"; then
        say "adding $comp to the stable toolchain"
        rustup component add "$comp" --toolchain stable
    fi
done

# 3. bpf-linker, linked against the nightly toolchain's own libLLVM.
if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
    sysroot=$(rustc +nightly --print sysroot)
    major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    prefix=$HOME/.local/llvm-rust
    mkdir -p "$prefix/lib"
    ln -sf "$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)" "$prefix/lib/libLLVM.so"
    say "building bpf-linker 0.13.0 against rustc's LLVM $major (about a minute)"
    LLVM_PREFIX=$prefix cargo +stable install --locked bpf-linker --version 0.13.0 \
        --no-default-features --features "llvm-$major"
else
    say "ok: bpf-linker"
fi

# 3b. cargo-fuzz, for the libFuzzer targets under fuzz/ (`cargo xtask fuzz`).
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
    say "building cargo-fuzz 0.13.2 (about two minutes)"
    cargo +stable install --locked cargo-fuzz --version 0.13.2
else
    say "ok: cargo-fuzz"
fi

# 3c. cargo-deb, for the Debian package (`cargo xtask deb`).
if ! command -v cargo-deb >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-deb" ]; then
    say "building cargo-deb 3.8.0 (about two minutes)"
    cargo +stable install --locked cargo-deb --version 3.8.0
else
    say "ok: cargo-deb"
fi

# 4. bpffs.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    say "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
else
    say "ok: bpffs mounted"
fi

# 5. Kernel BPF run-time statistics off by default; benches switch them on.
say "done"
