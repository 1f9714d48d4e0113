//! `cargo bench --bench crypto`: the same measurements as `volcrypt bench`, always with the
//! OpenSSL comparisons (OpenSSL is a dev-dependency). Prints ratios measured in this run.

use std::hint::black_box;
use std::time::Duration;

use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use volcrypt::cli::bench::{
    BUF, Contender, SECTOR, bench_key, measure, test_data, volcrypt_engine_contender,
    volcrypt_pbkdf2_contender, volcrypt_xts_contenders,
};

fn openssl_xts(encrypt: bool, sector: usize) -> Contender<'static> {
    let key = bench_key();
    let mut data = test_data(BUF);
    let mut ctx = CipherCtx::new().unwrap();
    if encrypt {
        ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(&key), None)
            .unwrap();
    } else {
        ctx.decrypt_init(Some(Cipher::aes_256_xts()), Some(&key), None)
            .unwrap();
    }
    Contender::new("openssl EVP aes-256-xts", BUF as f64, move || {
        for (i, s) in data.chunks_exact_mut(sector).enumerate() {
            let mut iv = [0u8; 16];
            iv[..8].copy_from_slice(&(i as u64 * (sector as u64 / 512)).to_le_bytes());
            if encrypt {
                ctx.encrypt_init(None, None, Some(&iv)).unwrap();
            } else {
                ctx.decrypt_init(None, None, Some(&iv)).unwrap();
            }
            ctx.cipher_update_inplace(black_box(s), sector).unwrap();
        }
    })
}

fn openssl_pbkdf2(iterations: u32) -> Contender<'static> {
    Contender::new(
        "openssl PKCS5_PBKDF2_HMAC",
        f64::from(iterations),
        move || {
            let mut out = [0u8; 32];
            openssl::pkcs5::pbkdf2_hmac(
                black_box(b"volcrypt benchmark passphrase"),
                &[7u8; 32],
                iterations as usize,
                openssl::hash::MessageDigest::sha256(),
                &mut out,
            )
            .unwrap();
            black_box(out);
        },
    )
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and then a smoke run is enough.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (reps, rep_time) = if quick {
        println!("smoke run (not `cargo bench`): the numbers below mean nothing");
        (1, Duration::from_millis(10))
    } else {
        (10, Duration::from_millis(200))
    };
    for encrypt in [true, false] {
        let dir = if encrypt { "encrypt" } else { "decrypt" };
        let mut cs = volcrypt_xts_contenders(encrypt);
        cs.push(openssl_xts(encrypt, SECTOR));
        let rates = measure(&mut cs, reps, rep_time);
        let ours = rates[0];
        let ossl = rates[rates.len() - 1];
        for (c, r) in cs.iter().zip(&rates) {
            println!(
                "  {:<36} {:6.2} GB/s  (volcrypt/this {:.2}x)",
                c.name,
                r / 1e9,
                ours / r
            );
        }
        println!(
            "aes-256-xts {dir} 4KiB: volcrypt {:.2} GB/s, openssl {:.2} GB/s, ratio {:.2}x",
            ours / 1e9,
            ossl / 1e9,
            ours / ossl
        );
    }
    for encrypt in [true, false] {
        let dir = if encrypt { "encrypt" } else { "decrypt" };
        let mut cs: Vec<Contender<'static>> = volcrypt_engine_contender(encrypt, 512)
            .into_iter()
            .collect();
        cs.push(openssl_xts(encrypt, 512));
        let rates = measure(&mut cs, reps, rep_time);
        println!(
            "aes-256-xts {dir} 512B: volcrypt {:.2} GB/s, openssl {:.2} GB/s, ratio {:.2}x",
            rates[0] / 1e9,
            rates[1] / 1e9,
            rates[0] / rates[1]
        );
    }
    let iterations = if quick { 1000 } else { 100_000 };
    let mut cs = vec![
        volcrypt_pbkdf2_contender(iterations),
        openssl_pbkdf2(iterations),
    ];
    let rates = measure(&mut cs, reps, rep_time);
    println!(
        "pbkdf2-hmac-sha256: volcrypt {:.0} it/s, openssl {:.0} it/s, ratio {:.2}x",
        rates[0],
        rates[1],
        rates[0] / rates[1]
    );
}
