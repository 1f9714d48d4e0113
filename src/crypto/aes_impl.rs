//! Hand-written AES-XTS for x86_64 (AES-NI, VAES-256/AVX2, VAES-512/AVX-512), because image
//! encrypt/decrypt throughput is bounded by it and a generic block-cipher interface leaves
//! most of the CPU's AES units idle.
//!
//! Why this is fast:
//! - 8 vectors in flight (8, 16 or 32 blocks): the AES instructions' latency (several cycles)
//!   is hidden behind independent blocks, so the AES units issue every cycle;
//! - tweaks are multiplied in bulk and stay in registers: each vector lane is advanced by
//!   α^(blocks in flight) with one carry-less multiply per vector instead of one α step per
//!   block, and a sector's first tweak vectors are derived from T0 the same way;
//! - the per-sector initial tweaks AES_{K2}(IV) of up to 8 sectors are encrypted together.
//!
//! Everything is checked against the portable path, the IEEE 1619 vectors and OpenSSL
//! (tests/crypto_kat.rs, tests/crypto_openssl.rs).

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    // Every `unsafe` block of the crate's crypto is here; each one says why it is sound.
    #![deny(clippy::undocumented_unsafe_blocks)]

    use std::arch::x86_64::*;

    use zeroize::{Zeroize, ZeroizeOnDrop};

    use crate::crypto::xts::{Implementation, mul_alpha};

    /// Proof that the CPU running this process supports one instruction-set level.
    ///
    /// The only way to get a `Level` is run-time detection ([`Level::detect`],
    /// [`Level::detect_all`]): the field is private to this module and nothing here builds
    /// one any other way. The kernels below are called through `unsafe` on the strength of
    /// this proof, so safe code must not be able to forge it (a forged `Vaes512` would run
    /// AVX-512 instructions on a CPU without them).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(in crate::crypto) struct Level(Kind);

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        AesNi,
        Vaes256,
        Vaes512,
    }

    impl Level {
        /// The fastest level this CPU supports, if it has AES-NI at all.
        pub(in crate::crypto) fn detect() -> Option<Level> {
            Self::detect_all().first().copied()
        }

        /// Every level this CPU supports, preferred first (tests and benchmarks run each).
        ///
        /// VAES-512 comes first: with 32 blocks per iteration it has half the per-iteration
        /// overhead of VAES-256, and measured ~10% faster on 4 KiB sectors on Sapphire Rapids
        /// (`volcrypt bench` shows every level side by side on the machine at hand).
        ///
        /// Each level checks every feature its kernel enables (`xts_kernel!` below); the
        /// standard library caches the CPUID results, so this is a few atomic loads.
        pub(in crate::crypto) fn detect_all() -> Vec<Level> {
            let mut v = Vec::new();
            let aesni = is_x86_feature_detected!("aes") && is_x86_feature_detected!("pclmulqdq");
            if !aesni {
                return v;
            }
            let vaes = is_x86_feature_detected!("vaes") && is_x86_feature_detected!("vpclmulqdq");
            if vaes && is_x86_feature_detected!("avx2") {
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    v.push(Level(Kind::Vaes512));
                }
                v.push(Level(Kind::Vaes256));
            }
            v.push(Level(Kind::AesNi));
            v
        }

        pub(in crate::crypto) fn implementation(self) -> Implementation {
            match self.0 {
                Kind::AesNi => Implementation::AesNi,
                Kind::Vaes256 => Implementation::Vaes256,
                Kind::Vaes512 => Implementation::Vaes512,
            }
        }
    }

    /// Expanded AES round keys for XTS: data key (both directions) and tweak key, with the
    /// detected level they run at (detection happens once per key, never per sector).
    /// Zeroized on drop.
    #[derive(Zeroize, ZeroizeOnDrop)]
    pub(in crate::crypto) struct XtsKeys {
        enc: [[u8; 16]; 15],
        dec: [[u8; 16]; 15],
        tweak: [[u8; 16]; 15],
        /// 10 (AES-128) or 14 (AES-256).
        rounds: usize,
        #[zeroize(skip)]
        level: Level,
    }

    impl XtsKeys {
        /// `key` is 32 or 64 bytes (AES-128-XTS or AES-256-XTS); `None` for any other length.
        pub(in crate::crypto) fn new(key: &[u8], level: Level) -> Option<Self> {
            let rounds = match key.len() {
                32 => 10,
                64 => 14,
                _ => return None,
            };
            let half = key.len() / 2;
            let mut k = XtsKeys {
                enc: [[0; 16]; 15],
                dec: [[0; 16]; 15],
                tweak: [[0; 16]; 15],
                rounds,
                level,
            };
            // SAFETY: these functions enable only `aes`; every `Level` is proof (it can only
            // come from detection) that the CPU has AES-NI.
            unsafe {
                expand_key(&key[..half], &mut k.enc);
                expand_key(&key[half..], &mut k.tweak);
                inverse_keys(&k.enc, k.rounds, &mut k.dec);
            }
            Some(k)
        }

        pub(in crate::crypto) fn level(&self) -> Level {
            self.level
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
        /// The first tweak vector: lane l = t·α^l.
        #[inline]
        #[target_feature(enable = "sse2")]
        pub fn first(t: u128) -> V {
            _mm_set_epi64x((t >> 64) as i64, t as i64)
        }
        /// Each lane × α^S (R = 64 − S): shift both 64-bit halves, carry the low half's top
        /// bits into the high half, and fold the high half's top bits back with the XTS
        /// polynomial (a carry-less multiply by 0x87).
        #[inline]
        #[target_feature(enable = "pclmulqdq")]
        pub fn mul<const S: i32, const R: i32>(x: V) -> V {
            let poly = _mm_set_epi64x(0, 0x87);
            let s = _mm_slli_epi64::<S>(x);
            let c = _mm_srli_epi64::<R>(x);
            let up = _mm_slli_si128::<8>(c);
            let red = _mm_clmulepi64_si128::<0x01>(c, poly);
            _mm_xor_si128(_mm_xor_si128(s, up), red)
        }
        /// Tweak vectors 1..W from vector 0 (lanes = 1), with a dependency chain of depth 3.
        #[inline]
        #[target_feature(enable = "pclmulqdq")]
        pub fn ahead(t: &mut [V; super::W]) {
            t[1] = mul::<1, 63>(t[0]);
            t[2] = mul::<2, 62>(t[0]);
            t[3] = mul::<2, 62>(t[1]);
            t[4] = mul::<4, 60>(t[0]);
            t[5] = mul::<4, 60>(t[1]);
            t[6] = mul::<4, 60>(t[2]);
            t[7] = mul::<4, 60>(t[3]);
        }
        /// Each lane × α^8 (8 blocks in flight).
        #[inline]
        #[target_feature(enable = "pclmulqdq")]
        pub fn next(x: V) -> V {
            mul::<8, 56>(x)
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
        /// The first tweak vector: lane l = t·α^l.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn first(t: u128) -> V {
            let t1 = crate::crypto::xts::mul_alpha(t);
            _mm256_set_epi64x((t1 >> 64) as i64, t1 as i64, (t >> 64) as i64, t as i64)
        }
        /// Each lane × α^S (R = 64 − S): shift both 64-bit halves, carry the low half's top
        /// bits into the high half, and fold the high half's top bits back with the XTS
        /// polynomial (a carry-less multiply by 0x87).
        #[inline]
        #[target_feature(enable = "avx2,vpclmulqdq")]
        pub fn mul<const S: i32, const R: i32>(x: V) -> V {
            let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
            let s = _mm256_slli_epi64::<S>(x);
            let c = _mm256_srli_epi64::<R>(x);
            let up = _mm256_bslli_epi128::<8>(c);
            let red = _mm256_clmulepi64_epi128::<0x01>(c, poly);
            _mm256_xor_si256(_mm256_xor_si256(s, up), red)
        }
        /// Tweak vectors 1..W from vector 0 (lanes = 2), with a dependency chain of depth 3.
        #[inline]
        #[target_feature(enable = "avx2,vpclmulqdq")]
        pub fn ahead(t: &mut [V; super::W]) {
            t[1] = mul::<2, 62>(t[0]);
            t[2] = mul::<4, 60>(t[0]);
            t[3] = mul::<4, 60>(t[1]);
            t[4] = mul::<8, 56>(t[0]);
            t[5] = mul::<8, 56>(t[1]);
            t[6] = mul::<8, 56>(t[2]);
            t[7] = mul::<8, 56>(t[3]);
        }
        /// Each lane × α^16 (16 blocks in flight).
        #[inline]
        #[target_feature(enable = "avx2,vpclmulqdq")]
        pub fn next(x: V) -> V {
            mul::<16, 48>(x)
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
        /// The first tweak vector: lane l = t·α^l.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn first(t: u128) -> V {
            use crate::crypto::xts::mul_alpha;
            let t1 = mul_alpha(t);
            let t2 = mul_alpha(t1);
            let t3 = mul_alpha(t2);
            _mm512_set_epi64(
                (t3 >> 64) as i64,
                t3 as i64,
                (t2 >> 64) as i64,
                t2 as i64,
                (t1 >> 64) as i64,
                t1 as i64,
                (t >> 64) as i64,
                t as i64,
            )
        }
        /// Each lane × α^S (R = 64 − S): shift both 64-bit halves, carry the low half's top
        /// bits into the high half, and fold the high half's top bits back with the XTS
        /// polynomial (a carry-less multiply by 0x87).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
        pub fn mul<const S: u32, const R: u32>(x: V) -> V {
            let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
            let s = _mm512_slli_epi64::<S>(x);
            let c = _mm512_srli_epi64::<R>(x);
            let up = _mm512_bslli_epi128::<8>(c);
            let red = _mm512_clmulepi64_epi128::<0x01>(c, poly);
            _mm512_xor_si512(_mm512_xor_si512(s, up), red)
        }
        /// Tweak vectors 1..W from vector 0 (lanes = 4), with a dependency chain of depth 3.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
        pub fn ahead(t: &mut [V; super::W]) {
            t[1] = mul::<4, 60>(t[0]);
            t[2] = mul::<8, 56>(t[0]);
            t[3] = mul::<8, 56>(t[1]);
            t[4] = mul::<16, 48>(t[0]);
            t[5] = mul::<16, 48>(t[1]);
            t[6] = mul::<16, 48>(t[2]);
            t[7] = mul::<16, 48>(t[3]);
        }
        /// Each lane × α^32 (32 blocks in flight).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
        pub fn next(x: V) -> V {
            mul::<32, 32>(x)
        }
    }

    /// Vectors in flight per kernel iteration.
    const W: usize = 8;

    /// A run of XTS sectors (sector i with initial tweak `t0s[i]`), round keys broadcast once:
    /// per sector `W` vectors (W × lanes blocks) per iteration, then single blocks.
    macro_rules! xts_kernel {
        ($name:ident, $w:ident, $feat:literal) => {
            #[target_feature(enable = $feat)]
            fn $name<const ENC: bool, const ROUNDS: usize>(
                keys: &[[u8; 16]; 15],
                run: &mut [u8],
                sector_size: usize,
                t0s: &[[u8; 16]],
            ) {
                use $w as v;
                let mut rk = [v::zero(); 15];
                for (r, k) in rk.iter_mut().zip(keys.iter()).take(ROUNDS + 1) {
                    *r = v::bcast(k);
                }
                for (sector, t0) in run.chunks_exact_mut(sector_size).zip(t0s.iter()) {
                    let t0 = u128::from_le_bytes(*t0);
                    // Lane l of vector j holds T0·α^(j·lanes + l), built in registers: the first
                    // vector from T0, the others from it by vector multiplies (depth 3).
                    let mut tw = [v::zero(); W];
                    tw[0] = v::first(t0);
                    v::ahead(&mut tw);
                    let (chunks, rest) = sector.as_chunks_mut::<{ v::BYTES }>();
                    let chunks_len = chunks.len();
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
                    // step): one block at a time. The tweak is recomputed from T0 rather than
                    // read from the vectors, which keeps the main loop free of lane extraction.
                    let done = (chunks_len / W) * W * (v::BYTES / 16);
                    let left = groups.into_remainder();
                    let (blocks, _) = left.as_flattened_mut().as_chunks_mut::<16>();
                    let (rest_blocks, _) = rest.as_chunks_mut::<16>();
                    let mut t = t0;
                    if !blocks.is_empty() || !rest_blocks.is_empty() {
                        for _ in 0..done {
                            t = mul_alpha(t);
                        }
                    }
                    for b in blocks.iter_mut().chain(rest_blocks.iter_mut()) {
                        xts_one_block::<ENC, ROUNDS>(keys, b, t);
                        t = mul_alpha(t);
                    }
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

    impl XtsKeys {
        /// Encrypts or decrypts consecutive sectors in place, sector i with IV block `ivs[i]`,
        /// at the level these keys were made for. `data.len() == ivs.len() * sector_size`,
        /// `sector_size` a non-zero multiple of 16 (checked by [`crate::crypto::xts::Xts`];
        /// a violation gives wrong output, never out-of-bounds access: the kernels only touch
        /// memory through slices).
        pub(in crate::crypto) fn crypt_sectors(
            &self,
            data: &mut [u8],
            sector_size: usize,
            ivs: &[[u8; 16]],
            encrypt: bool,
        ) {
            let keys = if encrypt { &self.enc } else { &self.dec };
            let aes128 = self.rounds == 10;
            for (run, run_ivs) in data.chunks_mut(sector_size * 8).zip(ivs.chunks(8)) {
                let mut t0_buf = [[0u8; 16]; 8];
                let t0 = &mut t0_buf[..run_ivs.len()];
                t0.copy_from_slice(run_ivs);
                // SAFETY: `encrypt_blocks_8` enables only `aes`; `self.level` is proof (it can
                // only come from detection) that the CPU has AES-NI.
                unsafe {
                    if aes128 {
                        encrypt_blocks_8::<10>(&self.tweak, t0);
                    } else {
                        encrypt_blocks_8::<14>(&self.tweak, t0);
                    }
                }
                let ss = sector_size;
                // SAFETY: each kernel is called only for the level that detected every
                // feature it enables (compare `Level::detect_all` with `xts_kernel!` uses):
                // AesNi: aes, pclmulqdq; Vaes256: those plus avx2, vaes, vpclmulqdq; Vaes512:
                // those plus avx512f, avx512bw.
                unsafe {
                    match (self.level.0, encrypt, aes128) {
                        (Kind::AesNi, true, true) => xts_w128::<true, 10>(keys, run, ss, t0),
                        (Kind::AesNi, true, false) => xts_w128::<true, 14>(keys, run, ss, t0),
                        (Kind::AesNi, false, true) => xts_w128::<false, 10>(keys, run, ss, t0),
                        (Kind::AesNi, false, false) => xts_w128::<false, 14>(keys, run, ss, t0),
                        (Kind::Vaes256, true, true) => xts_w256::<true, 10>(keys, run, ss, t0),
                        (Kind::Vaes256, true, false) => xts_w256::<true, 14>(keys, run, ss, t0),
                        (Kind::Vaes256, false, true) => xts_w256::<false, 10>(keys, run, ss, t0),
                        (Kind::Vaes256, false, false) => xts_w256::<false, 14>(keys, run, ss, t0),
                        (Kind::Vaes512, true, true) => xts_w512::<true, 10>(keys, run, ss, t0),
                        (Kind::Vaes512, true, false) => xts_w512::<true, 14>(keys, run, ss, t0),
                        (Kind::Vaes512, false, true) => xts_w512::<false, 10>(keys, run, ss, t0),
                        (Kind::Vaes512, false, false) => xts_w512::<false, 14>(keys, run, ss, t0),
                    }
                }
                t0_buf.zeroize();
            }
        }
    }
}
