//! Differential tests against OpenSSL (an independent implementation): random keys and data,
//! AES-128/256-XTS and AES-CBC with plain/plain64/essiv IVs computed here the dm-crypt way
//! (independently of volcrypt's IV code), sector sizes 512..4096, IV numbers near the 32- and
//! 64-bit wrap points. Plus the AF splitter round trip and KDF limit refusals.

use openssl::symm::{Cipher, Crypter, Mode};
use volcrypt::crypto::kdf::KdfLimits;
use volcrypt::crypto::xts::{Implementation, Xts};
use volcrypt::crypto::{
    Argon2Variant, CipherSpec, Error, HashAlg, Kdf, SectorCipher, af_merge, af_split, random_bytes,
};

fn rand_vec(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    openssl::rand::rand_bytes(&mut v).unwrap();
    v
}

fn openssl_crypt(cipher: Cipher, key: &[u8], iv: &[u8], data: &[u8], encrypt: bool) -> Vec<u8> {
    let mode = if encrypt {
        Mode::Encrypt
    } else {
        Mode::Decrypt
    };
    let mut c = Crypter::new(cipher, mode, key, Some(iv)).unwrap();
    c.pad(false);
    let mut out = vec![0u8; data.len() + 16];
    let mut n = c.update(data, &mut out).unwrap();
    n += c.finalize(&mut out[n..]).unwrap();
    out.truncate(n);
    out
}

/// dm-crypt's IV block for IV number `n`, computed with OpenSSL for ESSIV.
fn dm_iv(iv_mode: &str, key: &[u8], n: u64) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    match iv_mode {
        "plain" => b[..4].copy_from_slice(&(n as u32).to_le_bytes()),
        "plain64" => b[..8].copy_from_slice(&n.to_le_bytes()),
        "essiv:sha256" => {
            b[..8].copy_from_slice(&n.to_le_bytes());
            let salt = openssl::sha::sha256(key);
            let mut c = Crypter::new(Cipher::aes_256_ecb(), Mode::Encrypt, &salt, None).unwrap();
            c.pad(false);
            let mut out = vec![0u8; 32];
            let k = c.update(&b, &mut out).unwrap();
            assert_eq!(k, 16);
            b.copy_from_slice(&out[..16]);
        }
        _ => unreachable!("{iv_mode}"),
    }
    b
}

fn openssl_cipher(mode: &str, key_len: usize) -> Cipher {
    match (mode, key_len) {
        ("xts", 32) => Cipher::aes_128_xts(),
        ("xts", 64) => Cipher::aes_256_xts(),
        ("cbc", 16) => Cipher::aes_128_cbc(),
        ("cbc", 24) => Cipher::aes_192_cbc(),
        ("cbc", 32) => Cipher::aes_256_cbc(),
        _ => unreachable!(),
    }
}

/// Encrypts `data` sector by sector with OpenSSL, the dm-crypt way.
fn openssl_sectors(
    mode: &str,
    iv_mode: &str,
    key: &[u8],
    data: &[u8],
    sector_size: usize,
    first_iv: u64,
    encrypt: bool,
) -> Vec<u8> {
    let cipher = openssl_cipher(mode, key.len());
    let step = (sector_size / 512) as u64;
    let mut out = Vec::with_capacity(data.len());
    for (k, sector) in data.chunks(sector_size).enumerate() {
        let n = first_iv.wrapping_add(k as u64 * step);
        let iv = dm_iv(iv_mode, key, n);
        out.extend(openssl_crypt(cipher, key, &iv, sector, encrypt));
    }
    out
}

#[test]
fn sector_ciphers_match_openssl() {
    let specs: [(&str, &str, &[usize]); 6] = [
        ("xts", "plain64", &[32, 64]),
        ("xts", "plain", &[32, 64]),
        ("xts", "essiv:sha256", &[64]),
        ("cbc", "essiv:sha256", &[16, 24, 32]),
        ("cbc", "plain", &[16, 32]),
        ("cbc", "plain64", &[16, 24, 32]),
    ];
    let first_ivs = [0u64, 7, 0xffff_fff0, u64::MAX - 20, 123_456_789];
    let mut cases = 0;
    for (mode, iv_mode, key_lens) in specs {
        let spec = CipherSpec::parse(&format!("aes-{mode}-{iv_mode}")).unwrap();
        for &key_len in key_lens {
            for sector_size in [512usize, 1024, 2048, 4096] {
                for &first_iv in &first_ivs {
                    let key = rand_vec(key_len);
                    // 1..=70 sectors: crosses volcrypt's 64-sector IV batch.
                    let sectors = 1 + (rand_vec(1)[0] as usize % 70);
                    let plain = rand_vec(sector_size * sectors);
                    let c = SectorCipher::new(&spec, &key).unwrap();
                    let want =
                        openssl_sectors(mode, iv_mode, &key, &plain, sector_size, first_iv, true);
                    let mut got = plain.clone();
                    c.encrypt(&mut got, sector_size, first_iv);
                    assert!(
                        got == want,
                        "{spec} key {key_len} sector {sector_size} iv {first_iv} encrypt"
                    );
                    c.decrypt(&mut got, sector_size, first_iv);
                    assert!(got == plain, "{spec} decrypt round trip");
                    // Decrypt OpenSSL's ciphertext independently of our encrypt.
                    let mut back = want.clone();
                    c.decrypt(&mut back, sector_size, first_iv);
                    assert!(
                        back == plain,
                        "{spec} key {key_len} sector {sector_size} decrypt"
                    );
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 13 * 4 * 5);
}

#[test]
fn every_xts_implementation_matches_openssl_on_random_data() {
    for imp in Implementation::available() {
        for key_len in [32, 64] {
            for _ in 0..8 {
                let key = rand_vec(key_len);
                let xts = Xts::with_implementation(&key, imp).unwrap();
                // Odd block counts too (the fast paths have 16/32-block main loops and tails).
                let blocks = 1 + (rand_vec(2)[0] as usize % 300);
                let sector = blocks * 16;
                let sectors = 1 + rand_vec(1)[0] as usize % 5;
                let plain = rand_vec(sector * sectors);
                let ivs: Vec<[u8; 16]> = (0..sectors)
                    .map(|_| rand_vec(16).try_into().unwrap())
                    .collect();
                let mut want = Vec::new();
                for (s, iv) in plain.chunks(sector).zip(&ivs) {
                    want.extend(openssl_crypt(
                        openssl_cipher("xts", key_len),
                        &key,
                        iv,
                        s,
                        true,
                    ));
                }
                let mut got = plain.clone();
                xts.encrypt_sectors(&mut got, sector, &ivs);
                assert!(got == want, "{imp:?} key {key_len} sector {sector} encrypt");
                xts.decrypt_sectors(&mut got, sector, &ivs);
                assert!(
                    got == plain,
                    "{imp:?} key {key_len} sector {sector} decrypt"
                );
            }
        }
    }
}

#[test]
fn af_split_merge_round_trip_with_luks_parameters() {
    for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
        for key_len in [32, 64] {
            let mut key = vec![0u8; key_len];
            random_bytes(&mut key).unwrap();
            let m = af_split(&key, 4000, hash).unwrap();
            // Sector-padded material, as read from a keyslot area, merges too.
            let mut padded = m.to_vec();
            padded.resize(padded.len().div_ceil(512) * 512, 0xee);
            assert_eq!(
                af_merge(&padded, key_len, 4000, hash).unwrap().expose(),
                &key[..]
            );
            // Two splits of the same key differ (random stripes).
            assert_ne!(*af_split(&key, 4000, hash).unwrap(), *m);
        }
    }
}

#[test]
fn kdf_limits_refuse_without_doing_the_work() {
    // Each of these would take hours or terabytes if attempted: returning at all shows the
    // refusal happens first.
    let limits = KdfLimits::default();
    let cases = [
        Kdf::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations: u32::MAX,
        },
        Kdf::Argon2 {
            variant: Argon2Variant::Argon2id,
            time: 4,
            memory_kib: u32::MAX,
            parallel: 4,
        },
        Kdf::Argon2 {
            variant: Argon2Variant::Argon2i,
            time: u32::MAX,
            memory_kib: 1024 * 1024,
            parallel: 4,
        },
    ];
    for kdf in cases {
        let e = kdf
            .derive(b"passphrase", &[0; 32], 64, &limits)
            .unwrap_err();
        assert!(matches!(e, Error::KdfLimitExceeded { .. }), "{kdf:?}: {e}");
        assert_eq!(volcrypt::error::ExitStatus::from(e.kind()).code(), 3);
        let wrapped: volcrypt::Error = e.into();
        assert_eq!(wrapped.exit_status().code(), 3);
    }
    // Tighter configured limits apply too, and the message names the value and the limit.
    let tight = KdfLimits {
        max_pbkdf2_iterations: 1000,
        ..KdfLimits::default()
    };
    let e = Kdf::Pbkdf2 {
        hash: HashAlg::Sha1,
        iterations: 1001,
    }
    .derive(b"p", b"s", 32, &tight)
    .unwrap_err();
    assert!(
        e.to_string().contains("1001") && e.to_string().contains("1000"),
        "{e}"
    );
    assert!(
        Kdf::Pbkdf2 {
            hash: HashAlg::Sha1,
            iterations: 1000
        }
        .derive(b"p", b"s", 32, &tight)
        .is_ok()
    );
    assert_eq!(
        Kdf::Argon2 {
            variant: Argon2Variant::Argon2id,
            time: 4,
            memory_kib: 1 << 20,
            parallel: 4
        }
        .memory_bytes(),
        1 << 30
    );
}

#[test]
fn pbkdf2_matches_openssl_for_every_shared_hash() {
    use openssl::hash::MessageDigest;
    for (h, md) in [
        (HashAlg::Sha1, MessageDigest::sha1()),
        (HashAlg::Sha224, MessageDigest::sha224()),
        (HashAlg::Sha256, MessageDigest::sha256()),
        (HashAlg::Sha384, MessageDigest::sha384()),
        (HashAlg::Sha512, MessageDigest::sha512()),
    ] {
        for (pw_len, salt_len, iters, out_len) in
            [(0, 32, 1, 32), (7, 16, 1000, 64), (200, 32, 3, 100)]
        {
            let pw = rand_vec(pw_len);
            let salt = rand_vec(salt_len);
            let mut want = vec![0u8; out_len];
            openssl::pkcs5::pbkdf2_hmac(&pw, &salt, iters, md, &mut want).unwrap();
            let mut got = vec![0u8; out_len];
            volcrypt::crypto::pbkdf2(h, &pw, &salt, iters as u32, &mut got);
            assert_eq!(got, want, "{h} pw {pw_len} iters {iters}");
        }
        assert_eq!(
            h.digest(&[b"abc"]),
            openssl::hash::hash(md, b"abc").unwrap().to_vec()
        );
    }
}
