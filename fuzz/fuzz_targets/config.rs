//! A configuration file as an operator might write it, or garble it.
//! Invariant: never a panic; an error names the file.
#![no_main]

use balancer_user::config::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = parse(text, "fuzz.toml") {
        assert!(error.to_string().contains("fuzz.toml"), "{error}");
    }
});
