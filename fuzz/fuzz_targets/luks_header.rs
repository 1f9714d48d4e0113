//! Any bytes given as a LUKS image or detached header: parse must end in Ok or a clean error,
//! and an accepted header must summarise and attempt an unlock without panicking. KDF limits
//! are tiny so a fuzzed iteration count cannot stall the fuzzer.
//!
//! A LUKS2 copy whose checksum does not match is rejected before its JSON is looked at, and
//! random mutations almost never keep a SHA-256 right: each input is also tried with the
//! checksums of both copies recomputed, so the fuzzer reaches the JSON validation.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use volcrypt::crypto::HashAlg;
use volcrypt::crypto::kdf::KdfLimits;
use volcrypt::luks::Header;

/// Size of the binary part of a LUKS2 header copy.
const BINARY: usize = 4096;
/// Offset and length of the checksum field in the binary part.
const CSUM: std::ops::Range<usize> = 0x1C0..0x200;

fn exercise(data: &[u8]) {
    let limits = KdfLimits {
        max_pbkdf2_iterations: 2_000,
        max_argon2_memory_kib: 256,
        max_argon2_time: 2,
    };
    for device in [None, Some(data.len() as u64)] {
        if let Ok(h) = Header::read(&mut Cursor::new(data), device) {
            let s = h.summary();
            let _ = s.to_string();
            let _ = serde_json::to_string(&s);
            let _ = h.check_activation_allowed();
            let _ = h.unlock(&mut Cursor::new(data), b"fuzz", None, &limits);
        }
    }
}

/// Recomputes the SHA-256 checksum of a copy at `at` whose binary header says `hdr_size`.
fn fix_checksum(b: &mut [u8], at: usize) -> Option<usize> {
    let hdr_size = usize::try_from(u64::from_be_bytes(b.get(at + 8..at + 16)?.try_into().ok()?)).ok()?;
    if hdr_size <= BINARY || at.checked_add(hdr_size)? > b.len() {
        return None;
    }
    let mut bin = b[at..at + BINARY].to_vec();
    bin[CSUM].fill(0);
    let sum = HashAlg::Sha256.digest(&[&bin, &b[at + BINARY..at + hdr_size]]);
    b[at + CSUM.start..at + CSUM.end].fill(0);
    b[at + CSUM.start..at + CSUM.start + sum.len()].copy_from_slice(&sum);
    Some(hdr_size)
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    let mut fixed = data.to_vec();
    if let Some(hdr_size) = fix_checksum(&mut fixed, 0) {
        let _ = fix_checksum(&mut fixed, hdr_size);
        exercise(&fixed);
    }
});
