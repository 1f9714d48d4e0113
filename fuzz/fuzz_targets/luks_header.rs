//! Any bytes given as a LUKS image or detached header: parse must end in Ok or a clean error,
//! and an accepted header must summarise and attempt an unlock without panicking. KDF limits
//! are tiny so a fuzzed iteration count cannot stall the fuzzer.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use volcrypt::crypto::kdf::KdfLimits;
use volcrypt::luks::Header;

fuzz_target!(|data: &[u8]| {
    let limits = KdfLimits {
        max_pbkdf2_iterations: 2_000,
        max_argon2_memory_kib: 256,
        max_argon2_time: 2,
    };
    for device in [None, Some(data.len() as u64)] {
        if let Ok(h) = Header::read(&mut Cursor::new(data), device) {
            let s = h.summary();
            let _ = s.to_string();
            let _ = h.check_activation_allowed();
            let _ = h.unlock(&mut Cursor::new(data), b"fuzz", None, &limits);
        }
    }
});
