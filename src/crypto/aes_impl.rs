//! Hand-written AES-XTS for x86_64 (AES-NI, VAES-256/AVX2, VAES-512/AVX-512), because image
//! encrypt/decrypt throughput is bounded by it and a generic block-cipher interface leaves
//! most of the CPU's AES units idle.
//!
//! Why this is fast:
//! - 8 vectors in flight (8, 16 or 32 blocks): the AES instructions' latency (several cycles)
//!   is hidden behind independent blocks, so the AES units issue every cycle;
//! - tweaks are multiplied in bulk: each vector lane is advanced by α^(blocks in flight) with
//!   one carry-less multiply per vector instead of one α step per block;
//! - the per-sector initial tweaks AES_{K2}(IV) of up to 8 sectors are encrypted together.
//!
//! Everything is checked against the portable path, the IEEE 1619 vectors and OpenSSL
//! (tests/crypto_kat.rs, tests/crypto_openssl.rs).

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use std::arch::x86_64::*;

    use zeroize::{Zeroize, ZeroizeOnDrop};

    use crate::crypto::xts::{Implementation, mul_alpha};

    /// An instruction-set level this CPU supports, detected at run time.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Level {
        AesNi,
        Vaes256,
        Vaes512,
    }

    impl Level {
        /// The levels this CPU supports, fastest first.
        pub fn detect_all() -> Vec<Level> {
            let mut v = Vec::new();
            let aesni = is_x86_feature_detected!("aes") && is_x86_feature_detected!("pclmulqdq");
            if !aesni {
                return v;
            }
            let vaes = is_x86_feature_detected!("vaes") && is_x86_feature_detected!("vpclmulqdq");
            if vaes
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
            {
                v.push(Level::Vaes512);
            }
            if vaes && is_x86_feature_detected!("avx2") {
                v.push(Level::Vaes256);
            }
            v.push(Level::AesNi);
            v
        }

        pub fn implementation(&self) -> Implementation {
            match self {
                Level::AesNi => Implementation::AesNi,
                Level::Vaes256 => Implementation::Vaes256,
                Level::Vaes512 => Implementation::Vaes512,
            }
        }
    }

    /// Expanded AES round keys for XTS: data key (both directions) and tweak key. Zeroized on
    /// drop.
    #[derive(Zeroize, ZeroizeOnDrop)]
    pub struct XtsKeys {
        enc: [[u8; 16]; 15],
        dec: [[u8; 16]; 15],
        tweak: [[u8; 16]; 15],
        /// 10 (AES-128) or 14 (AES-256).
        rounds: usize,
    }

    impl XtsKeys {
        /// `key` is 32 or 64 bytes (checked by the caller, [`crate::crypto::xts::Xts`]);
        /// `level` came from [`Level::detect_all`].
        pub fn new(key: &[u8], level: Level) -> Self {
            let _ = level;
            let half = key.len() / 2;
            let mut k = XtsKeys {
                enc: [[0; 16]; 15],
                dec: [[0; 16]; 15],
                tweak: [[0; 16]; 15],
                rounds: if half == 16 { 10 } else { 14 },
            };
            // SAFETY: every Level implies AES-NI, detected at run time by Level::detect_all.
            unsafe {
                expand_key(&key[..half], &mut k.enc);
                expand_key(&key[half..], &mut k.tweak);
                inverse_keys(&k.enc, k.rounds, &mut k.dec);
            }
            k
        }
    }

    #[inline]
    fn load128(b: &[u8; 16]) -> __m128i {
        // SAFETY: reads exactly the 16 bytes of `b`; unaligned loads are allowed.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    #[inline]
    fn store128(b: &mut [u8; 16], v: __m128i) {
        // SAFETY: writes exactly the 16 bytes of `b`; unaligned stores are allowed.
        unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) }
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    fn expand_assist(k: __m128i, t: __m128i) -> __m128i {
        let mut k = k;
        let mut s = _mm_slli_si128::<4>(k);
        k = _mm_xor_si128(k, s);
        s = _mm_slli_si128::<4>(s);
        k = _mm_xor_si128(k, s);
        s = _mm_slli_si128::<4>(s);
        k = _mm_xor_si128(k, s);
        _mm_xor_si128(k, t)
    }

    /// FIPS 197 key expansion with AESKEYGENASSIST, for 16- or 32-byte keys.
    #[target_feature(enable = "aes")]
    fn expand_key(key: &[u8], out: &mut [[u8; 16]; 15]) {
        let mut b = [0u8; 16];
        b.copy_from_slice(&key[..16]);
        let mut k0 = load128(&b);
        store128(&mut out[0], k0);
        if key.len() == 16 {
            macro_rules! step {
                ($i:expr, $rcon:expr) => {
                    let a = _mm_aeskeygenassist_si128::<$rcon>(k0);
                    k0 = expand_assist(k0, _mm_shuffle_epi32::<0xff>(a));
                    store128(&mut out[$i], k0);
                };
            }
            step!(1, 0x01);
            step!(2, 0x02);
            step!(3, 0x04);
            step!(4, 0x08);
            step!(5, 0x10);
            step!(6, 0x20);
            step!(7, 0x40);
            step!(8, 0x80);
            step!(9, 0x1b);
            step!(10, 0x36);
        } else {
            b.copy_from_slice(&key[16..32]);
            let mut k1 = load128(&b);
            store128(&mut out[1], k1);
            macro_rules! step {
                ($i:expr, $rcon:expr) => {
                    let a = _mm_aeskeygenassist_si128::<$rcon>(k1);
                    k0 = expand_assist(k0, _mm_shuffle_epi32::<0xff>(a));
                    store128(&mut out[$i], k0);
                };
            }
            macro_rules! step_odd {
                ($i:expr) => {
                    let a = _mm_aeskeygenassist_si128::<0>(k0);
                    k1 = expand_assist(k1, _mm_shuffle_epi32::<0xaa>(a));
                    store128(&mut out[$i], k1);
                };
            }
            step!(2, 0x01);
            step_odd!(3);
            step!(4, 0x02);
            step_odd!(5);
            step!(6, 0x04);
            step_odd!(7);
            step!(8, 0x08);
            step_odd!(9);
            step!(10, 0x10);
            step_odd!(11);
            step!(12, 0x20);
            step_odd!(13);
            step!(14, 0x40);
        }
        b.zeroize();
    }

    /// Round keys for the equivalent inverse cipher (AESDEC): reversed, InvMixColumns applied
    /// to all but the first and last.
    #[target_feature(enable = "aes")]
    fn inverse_keys(enc: &[[u8; 16]; 15], rounds: usize, dec: &mut [[u8; 16]; 15]) {
        dec[0] = enc[rounds];
        for i in 1..rounds {
            store128(&mut dec[i], _mm_aesimc_si128(load128(&enc[rounds - i])));
        }
        dec[rounds] = enc[0];
    }

    /// Encrypts up to 8 blocks in place with the round keys `rk`, interleaved.
    #[target_feature(enable = "aes")]
    fn encrypt_blocks_8<const ROUNDS: usize>(rk: &[[u8; 16]; 15], blocks: &mut [[u8; 16]]) {
        let mut x = [_mm_setzero_si128(); 8];
        let n = blocks.len().min(8);
        for j in 0..n {
            x[j] = _mm_xor_si128(load128(&blocks[j]), load128(&rk[0]));
        }
        for key in rk.iter().take(ROUNDS).skip(1) {
            let k = load128(key);
            for xj in x.iter_mut() {
                *xj = _mm_aesenc_si128(*xj, k);
            }
        }
        let k = load128(&rk[ROUNDS]);
        for j in 0..n {
            store128(&mut blocks[j], _mm_aesenclast_si128(x[j], k));
        }
    }

    /// One block of XTS with tweak `t` (tails of sectors that are not a multiple of the
    /// vector step).
    #[target_feature(enable = "aes")]
    fn xts_one_block<const ENC: bool, const ROUNDS: usize>(
        rk: &[[u8; 16]; 15],
        b: &mut [u8; 16],
        t: u128,
    ) {
        let tw = load128(&t.to_le_bytes());
        let mut x = _mm_xor_si128(_mm_xor_si128(load128(b), tw), load128(&rk[0]));
        for key in rk.iter().take(ROUNDS).skip(1) {
            x = if ENC {
                _mm_aesenc_si128(x, load128(key))
            } else {
                _mm_aesdec_si128(x, load128(key))
            };
        }
        x = if ENC {
            _mm_aesenclast_si128(x, load128(&rk[ROUNDS]))
        } else {
            _mm_aesdeclast_si128(x, load128(&rk[ROUNDS]))
        };
        store128(b, _mm_xor_si128(x, tw));
    }

    /// Vector helpers for one width; the XTS kernel below is stamped out once per width.
    mod w128 {
        use std::arch::x86_64::*;
        pub type V = __m128i;
        pub const BYTES: usize = 16;
        #[inline]
        #[target_feature(enable = "sse2")]
        pub fn zero() -> V {
            _mm_setzero_si128()
        }
        #[inline]
        pub fn load(b: &[u8; BYTES]) -> V {
            super::load128(b)
        }
        #[inline]
        pub fn store(b: &mut [u8; BYTES], v: V) {
            super::store128(b, v)
        }
        #[inline]
        pub fn bcast(k: &[u8; 16]) -> V {
            super::load128(k)
        }
        #[inline]
        #[target_feature(enable = "sse2")]
        pub fn xor(a: V, b: V) -> V {
            _mm_xor_si128(a, b)
        }
        #[inline]
        #[target_feature(enable = "aes")]
        pub fn enc(a: V, k: V) -> V {
            _mm_aesenc_si128(a, k)
        }
        #[inline]
        #[target_feature(enable = "aes")]
        pub fn enclast(a: V, k: V) -> V {
            _mm_aesenclast_si128(a, k)
        }
        #[inline]
        #[target_feature(enable = "aes")]
        pub fn dec(a: V, k: V) -> V {
            _mm_aesdec_si128(a, k)
        }
        #[inline]
        #[target_feature(enable = "aes")]
        pub fn declast(a: V, k: V) -> V {
            _mm_aesdeclast_si128(a, k)
        }
        /// Each lane × α^8 (8 blocks in flight).
        #[inline]
        #[target_feature(enable = "pclmulqdq")]
        pub fn next(x: V) -> V {
            let poly = _mm_set_epi64x(0, 0x87);
            let s = _mm_slli_epi64::<8>(x);
            let c = _mm_srli_epi64::<56>(x);
            let up = _mm_slli_si128::<8>(c);
            let red = _mm_clmulepi64_si128::<0x01>(c, poly);
            _mm_xor_si128(_mm_xor_si128(s, up), red)
        }
        #[inline]
        pub fn lane0(v: V) -> u128 {
            let mut b = [0u8; 16];
            super::store128(&mut b, v);
            u128::from_le_bytes(b)
        }
    }

    mod w256 {
        use std::arch::x86_64::*;
        pub type V = __m256i;
        pub const BYTES: usize = 32;
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn zero() -> V {
            _mm256_setzero_si256()
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn load(b: &[u8; BYTES]) -> V {
            // SAFETY: reads exactly the 32 bytes of `b`; unaligned loads are allowed.
            unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn store(b: &mut [u8; BYTES], v: V) {
            // SAFETY: writes exactly the 32 bytes of `b`; unaligned stores are allowed.
            unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) }
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn bcast(k: &[u8; 16]) -> V {
            _mm256_broadcastsi128_si256(super::load128(k))
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn xor(a: V, b: V) -> V {
            _mm256_xor_si256(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,vaes")]
        pub fn enc(a: V, k: V) -> V {
            _mm256_aesenc_epi128(a, k)
        }
        #[inline]
        #[target_feature(enable = "avx2,vaes")]
        pub fn enclast(a: V, k: V) -> V {
            _mm256_aesenclast_epi128(a, k)
        }
        #[inline]
        #[target_feature(enable = "avx2,vaes")]
        pub fn dec(a: V, k: V) -> V {
            _mm256_aesdec_epi128(a, k)
        }
        #[inline]
        #[target_feature(enable = "avx2,vaes")]
        pub fn declast(a: V, k: V) -> V {
            _mm256_aesdeclast_epi128(a, k)
        }
        /// Each lane × α^16 (16 blocks in flight).
        #[inline]
        #[target_feature(enable = "avx2,vpclmulqdq")]
        pub fn next(x: V) -> V {
            let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
            let s = _mm256_slli_epi64::<16>(x);
            let c = _mm256_srli_epi64::<48>(x);
            let up = _mm256_bslli_epi128::<8>(c);
            let red = _mm256_clmulepi64_epi128::<0x01>(c, poly);
            _mm256_xor_si256(_mm256_xor_si256(s, up), red)
        }
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn lane0(v: V) -> u128 {
            super::w128::lane0(_mm256_castsi256_si128(v))
        }
    }

    mod w512 {
        use std::arch::x86_64::*;
        pub type V = __m512i;
        pub const BYTES: usize = 64;
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn zero() -> V {
            _mm512_setzero_si512()
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn load(b: &[u8; BYTES]) -> V {
            // SAFETY: reads exactly the 64 bytes of `b`; unaligned loads are allowed.
            unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn store(b: &mut [u8; BYTES], v: V) {
            // SAFETY: writes exactly the 64 bytes of `b`; unaligned stores are allowed.
            unsafe { _mm512_storeu_si512(b.as_mut_ptr().cast(), v) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn bcast(k: &[u8; 16]) -> V {
            _mm512_broadcast_i32x4(super::load128(k))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn xor(a: V, b: V) -> V {
            _mm512_xor_si512(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f,vaes")]
        pub fn enc(a: V, k: V) -> V {
            _mm512_aesenc_epi128(a, k)
        }
        #[inline]
        #[target_feature(enable = "avx512f,vaes")]
        pub fn enclast(a: V, k: V) -> V {
            _mm512_aesenclast_epi128(a, k)
        }
        #[inline]
        #[target_feature(enable = "avx512f,vaes")]
        pub fn dec(a: V, k: V) -> V {
            _mm512_aesdec_epi128(a, k)
        }
        #[inline]
        #[target_feature(enable = "avx512f,vaes")]
        pub fn declast(a: V, k: V) -> V {
            _mm512_aesdeclast_epi128(a, k)
        }
        /// Each lane × α^32 (32 blocks in flight).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
        pub fn next(x: V) -> V {
            let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
            let s = _mm512_slli_epi64::<32>(x);
            let c = _mm512_srli_epi64::<32>(x);
            let up = _mm512_bslli_epi128::<8>(c);
            let red = _mm512_clmulepi64_epi128::<0x01>(c, poly);
            _mm512_xor_si512(_mm512_xor_si512(s, up), red)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn lane0(v: V) -> u128 {
            super::w128::lane0(_mm512_castsi512_si128(v))
        }
    }

    /// Vectors in flight per kernel iteration.
    const W: usize = 8;

    /// One XTS sector: `W` vectors (W × LANES blocks) per iteration, then single blocks.
    macro_rules! xts_kernel {
        ($name:ident, $w:ident, $feat:literal) => {
            #[target_feature(enable = $feat)]
            fn $name<const ENC: bool, const ROUNDS: usize>(
                keys: &[[u8; 16]; 15],
                sector: &mut [u8],
                t0: u128,
            ) {
                use $w as v;
                let mut rk = [v::zero(); 15];
                for (r, k) in rk.iter_mut().zip(keys.iter()).take(ROUNDS + 1) {
                    *r = v::bcast(k);
                }
                // Lane l of vector j holds T0·α^(j·LANES + l).
                let mut init = [[0u8; v::BYTES]; W];
                let mut t = t0;
                for vec in init.iter_mut() {
                    for lane in vec.chunks_exact_mut(16) {
                        lane.copy_from_slice(&t.to_le_bytes());
                        t = mul_alpha(t);
                    }
                }
                let mut tw = [v::zero(); W];
                for (tj, ij) in tw.iter_mut().zip(init.iter()) {
                    *tj = v::load(ij);
                }
                let (chunks, rest) = sector.as_chunks_mut::<{ v::BYTES }>();
                let mut groups = chunks.chunks_exact_mut(W);
                for g in &mut groups {
                    let mut x = [v::zero(); W];
                    for j in 0..W {
                        x[j] = v::xor(v::xor(v::load(&g[j]), tw[j]), rk[0]);
                    }
                    for k in rk.iter().take(ROUNDS).skip(1) {
                        for xj in x.iter_mut() {
                            *xj = if ENC {
                                v::enc(*xj, *k)
                            } else {
                                v::dec(*xj, *k)
                            };
                        }
                    }
                    for j in 0..W {
                        let y = if ENC {
                            v::enclast(x[j], rk[ROUNDS])
                        } else {
                            v::declast(x[j], rk[ROUNDS])
                        };
                        v::store(&mut g[j], v::xor(y, tw[j]));
                        tw[j] = v::next(tw[j]);
                    }
                }
                // Fewer than W vectors left (sector sizes that are not a multiple of the
                // step): one block at a time, continuing from lane 0 of the next tweaks.
                let mut t = v::lane0(tw[0]);
                let left = groups.into_remainder();
                let (blocks, _) = left.as_flattened_mut().as_chunks_mut::<16>();
                let (rest_blocks, _) = rest.as_chunks_mut::<16>();
                for b in blocks.iter_mut().chain(rest_blocks.iter_mut()) {
                    xts_one_block::<ENC, ROUNDS>(keys, b, t);
                    t = mul_alpha(t);
                }
            }
        };
    }

    xts_kernel!(xts_w128, w128, "aes,pclmulqdq");
    xts_kernel!(xts_w256, w256, "aes,pclmulqdq,avx2,vaes,vpclmulqdq");
    xts_kernel!(
        xts_w512,
        w512,
        "aes,pclmulqdq,avx2,avx512f,avx512bw,vaes,vpclmulqdq"
    );

    /// Encrypts or decrypts consecutive sectors, sector i with IV block `ivs[i]`.
    /// `data.len() == ivs.len() * sector_size`, `sector_size` a non-zero multiple of 16.
    pub fn xts_sectors(
        k: &XtsKeys,
        level: Level,
        data: &mut [u8],
        sector_size: usize,
        ivs: &[[u8; 16]],
        encrypt: bool,
    ) {
        let keys = if encrypt { &k.enc } else { &k.dec };
        for (run, run_ivs) in data.chunks_mut(sector_size * 8).zip(ivs.chunks(8)) {
            let mut t0_buf = [[0u8; 16]; 8];
            let t0 = &mut t0_buf[..run_ivs.len()];
            t0.copy_from_slice(run_ivs);
            // SAFETY (all calls below): `level` came from Level::detect_all, which checked
            // every target feature the called function enables.
            unsafe {
                if k.rounds == 10 {
                    encrypt_blocks_8::<10>(&k.tweak, t0);
                } else {
                    encrypt_blocks_8::<14>(&k.tweak, t0);
                }
            }
            for (sector, t) in run.chunks_exact_mut(sector_size).zip(t0.iter()) {
                let t = u128::from_le_bytes(*t);
                unsafe {
                    match (level, encrypt, k.rounds == 10) {
                        (Level::AesNi, true, true) => xts_w128::<true, 10>(keys, sector, t),
                        (Level::AesNi, true, false) => xts_w128::<true, 14>(keys, sector, t),
                        (Level::AesNi, false, true) => xts_w128::<false, 10>(keys, sector, t),
                        (Level::AesNi, false, false) => xts_w128::<false, 14>(keys, sector, t),
                        (Level::Vaes256, true, true) => xts_w256::<true, 10>(keys, sector, t),
                        (Level::Vaes256, true, false) => xts_w256::<true, 14>(keys, sector, t),
                        (Level::Vaes256, false, true) => xts_w256::<false, 10>(keys, sector, t),
                        (Level::Vaes256, false, false) => xts_w256::<false, 14>(keys, sector, t),
                        (Level::Vaes512, true, true) => xts_w512::<true, 10>(keys, sector, t),
                        (Level::Vaes512, true, false) => xts_w512::<true, 14>(keys, sector, t),
                        (Level::Vaes512, false, true) => xts_w512::<false, 10>(keys, sector, t),
                        (Level::Vaes512, false, false) => xts_w512::<false, 14>(keys, sector, t),
                    }
                }
            }
            t0_buf.zeroize();
        }
    }
}
