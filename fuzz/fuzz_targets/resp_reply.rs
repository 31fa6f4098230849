//! Bytes a backend sends back to a health check, read as RESP replies one
//! after another until the reader stops. Invariants: never a panic, and a
//! reply never holds more than the codec's bounds.
#![no_main]

use std::sync::OnceLock;

use balancer_user::health::resp::{read_reply, Reply, MAX_BULK, MAX_LINE};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::{Builder, Runtime};

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Builder::new_current_thread().build().expect("a runtime"))
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut reader = data;
        // Each good reply consumes at least three bytes (type, CR, LF).
        for _ in 0..=data.len() / 3 {
            match read_reply(&mut reader).await {
                Ok(Reply::Bulk(b)) => assert!(b.len() <= MAX_BULK),
                Ok(Reply::Simple(s) | Reply::Error(s)) => assert!(s.len() <= 4 * MAX_LINE),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
});
