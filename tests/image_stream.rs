//! The streaming engine with the real sector ciphers: chunked, parallel output must equal one
//! whole-buffer pass (same IVs), for every thread count, chunk size and sector size.

mod common;

use volcrypt::crypto::cipher::{CipherSpec, SectorCipher};
use volcrypt::image::{StreamOptions, decrypt_to, encrypt_to};

use common::random_bytes;

#[test]
fn chunked_parallel_streams_equal_a_single_pass_and_round_trip() {
    let len = (3 << 20) + 5 * 4096;
    let plain = random_bytes(len, 0x1234_5678);
    for (spec, key_len) in [
        ("aes-xts-plain64", 64),
        ("aes-xts-plain64", 32),
        ("aes-xts-plain", 64),
        ("aes-cbc-essiv:sha256", 32),
        ("aes-cbc-plain", 16),
        ("aes-cbc-plain64", 32),
    ] {
        let spec = CipherSpec::parse(spec).expect("spec");
        let key = random_bytes(key_len, key_len as u64);
        let cipher = SectorCipher::new(&spec, &key).expect("cipher");
        for sector in [512usize, 4096] {
            let iv_tweak = 1000u64;
            let mut reference = plain.clone();
            cipher.encrypt(&mut reference, sector, iv_tweak);
            assert_ne!(reference, plain);
            for (threads, chunk) in [(Some(1), 64 << 10), (None, 1 << 20), (Some(3), 200 * 4096)] {
                let opts = StreamOptions {
                    threads,
                    chunk_size: chunk,
                    progress: false,
                };
                let mut enc = Vec::new();
                let n = encrypt_to(
                    &plain[..],
                    &mut enc,
                    &cipher,
                    len as u64,
                    sector,
                    iv_tweak,
                    &opts,
                )
                .expect("encrypt stream");
                assert_eq!(n, len as u64);
                assert!(
                    enc == reference,
                    "{spec} sector {sector} threads {threads:?} chunk {chunk}"
                );
                let mut dec = Vec::new();
                decrypt_to(
                    &enc[..],
                    &mut dec,
                    &cipher,
                    len as u64,
                    sector,
                    iv_tweak,
                    &opts,
                )
                .expect("decrypt stream");
                assert!(
                    dec == plain,
                    "{spec} round trip sector {sector} threads {threads:?}"
                );
            }
        }
    }
}

/// Whole-image decrypt throughput, all cores vs one. A benchmark, not a timed
/// test: run it with `cargo test --release --test image_stream -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run explicitly in release mode"]
fn whole_image_decrypt_throughput_all_cores_vs_one() {
    use volcrypt::image::bench::decrypt_throughput;
    let spec = CipherSpec::parse("aes-xts-plain64").expect("spec");
    let key = random_bytes(64, 7);
    let total = 1u64 << 30;
    // Warm up (page-faulting buffers, spinning up the pool).
    decrypt_throughput(&spec, &key, 64 << 20, 4096, None).expect("warm-up");
    let one = decrypt_throughput(&spec, &key, total, 4096, Some(1)).expect("one core");
    let all = decrypt_throughput(&spec, &key, total, 4096, None).expect("all cores");
    for t in [one, all] {
        println!(
            "whole-image decrypt, AES-256-XTS, 4 KiB sectors, {} thread(s): {:.2} GB/s",
            t.threads,
            t.bytes_per_second() / 1e9
        );
    }
    println!(
        "all cores ({}) vs one: {:.2}x",
        all.threads,
        all.bytes_per_second() / one.bytes_per_second()
    );
    assert_eq!(one.bytes, total);
    assert_eq!(all.bytes, total);
}
