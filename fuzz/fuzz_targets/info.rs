//! The text of an `INFO persistence` or `INFO replication` reply, as a
//! backend sends it. Invariant: never a panic; a parsed replication
//! section has at most `MAX_LINKS` links.
#![no_main]

use balancer_user::health::info::{parse_persistence, parse_replication, MAX_LINKS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_persistence(data);
    if let Ok(replication) = parse_replication(data) {
        assert!(replication.links.len() <= MAX_LINKS);
        let _ = replication.link_state();
    }
});
