//! `cargo xtask bench`: the measurements behind bench/results/REPORT.md.
//!
//! - [`packet_cost`]: ns per packet of each data-plane path through
//!   `BPF_PROG_TEST_RUN`, next to a program that only returns XDP_PASS.
//! - [`lab_run`]: redis-benchmark from the lab's client against one backend
//!   directly, the VIP through our XDP data plane and the VIP through
//!   HAProxy, with the CPU each balancer spends.
//! - [`failover`]: the client's longest gap when the VIP holder's link is
//!   cut, for our agents and for keepalived + HAProxy (default and tuned).
//! - [`churn`]: a new connection per request through each front (direct,
//!   this balancer, HAProxy, nftables), two runs back to back.
//! - [`storm`]: every client reconnecting at once after the master's link
//!   is cut.
//! - [`report`]: the Markdown report and the SVG charts.
//!
//! Benchmarks never decide a test's outcome; the harness fails only when a
//! measurement could not be taken (or proved wrong, e.g. a packet that did
//! not take the path it was meant to measure).
pub mod churn;
pub mod cpu;
pub mod failover;
pub mod haproxy;
pub mod lab_run;
pub mod packet_cost;
pub mod redis_benchmark;
pub mod report;
pub mod storm;
