//! The password-based key derivation functions LUKS keyslots use (PBKDF2, Argon2i, Argon2id),
//! with cost limits checked *before* any work so that a hostile header cannot make us burn
//! gigabytes of memory or hours of CPU, and the cryptsetup-style benchmarks behind
//! `--iter-time`.

use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::Error;
use super::hash::{HashAlg, pbkdf2};
use crate::secret::SecretBytes;

/// The Argon2 variants LUKS2 uses (always version 0x13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Argon2Variant {
    Argon2i,
    Argon2id,
}

impl Argon2Variant {
    /// The keyslot `kdf.type` string.
    pub fn name(&self) -> &'static str {
        match self {
            Argon2Variant::Argon2i => "argon2i",
            Argon2Variant::Argon2id => "argon2id",
        }
    }

    fn algorithm(self) -> argon2::Algorithm {
        match self {
            Argon2Variant::Argon2i => argon2::Algorithm::Argon2i,
            Argon2Variant::Argon2id => argon2::Algorithm::Argon2id,
        }
    }
}

/// A keyslot's key derivation function and its cost parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kdf {
    Pbkdf2 {
        hash: HashAlg,
        iterations: u32,
    },
    Argon2 {
        variant: Argon2Variant,
        time: u32,
        memory_kib: u32,
        parallel: u32,
    },
}

/// Upper bounds on KDF costs. A header asking for more is refused with exit status 3.
#[derive(Clone, Debug)]
pub struct KdfLimits {
    pub max_pbkdf2_iterations: u32,
    pub max_argon2_memory_kib: u32,
    pub max_argon2_time: u32,
}

/// cryptsetup's own maximum Argon2 memory cost (4 GiB in KiB).
pub const CRYPTSETUP_MAX_ARGON2_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// cryptsetup's minimum PBKDF2 iteration count for new keyslots.
pub const MIN_PBKDF2_ITERATIONS: u32 = 1000;
/// cryptsetup's minimum Argon2 time cost for new keyslots.
pub const MIN_ARGON2_TIME: u32 = 4;
/// Argon2 lane count limit (RFC 9106: 2^24 - 1).
pub const MAX_ARGON2_PARALLEL: u32 = 0x00ff_ffff;

impl Default for KdfLimits {
    fn default() -> Self {
        KdfLimits {
            max_pbkdf2_iterations: 100_000_000,
            max_argon2_memory_kib: CRYPTSETUP_MAX_ARGON2_MEMORY_KIB,
            max_argon2_time: 1000,
        }
    }
}

impl Kdf {
    /// The `kdf.type` string of a LUKS2 keyslot ("pbkdf2", "argon2i", "argon2id").
    pub fn type_name(&self) -> &'static str {
        match self {
            Kdf::Pbkdf2 { .. } => "pbkdf2",
            Kdf::Argon2 { variant, .. } => variant.name(),
        }
    }

    /// Checks the parameters' ranges and the limits without deriving anything.
    pub fn check(&self, limits: &KdfLimits) -> Result<(), Error> {
        match *self {
            Kdf::Pbkdf2 { iterations, .. } => {
                if iterations == 0 {
                    return Err(Error::InvalidKdfParameters(
                        "pbkdf2 iterations must be at least 1".into(),
                    ));
                }
                if iterations > limits.max_pbkdf2_iterations {
                    return Err(Error::KdfLimitExceeded {
                        kdf: "pbkdf2",
                        parameter: "iterations",
                        value: iterations.into(),
                        limit: limits.max_pbkdf2_iterations.into(),
                    });
                }
            }
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                parallel,
            } => {
                let kdf = variant.name();
                if time == 0 {
                    return Err(Error::InvalidKdfParameters(format!(
                        "{kdf} time cost must be at least 1"
                    )));
                }
                if parallel == 0 || parallel > MAX_ARGON2_PARALLEL {
                    return Err(Error::InvalidKdfParameters(format!(
                        "{kdf} parallel cost {parallel} is outside 1..={MAX_ARGON2_PARALLEL}"
                    )));
                }
                if memory_kib > limits.max_argon2_memory_kib {
                    return Err(Error::KdfLimitExceeded {
                        kdf,
                        parameter: "memory (KiB)",
                        value: memory_kib.into(),
                        limit: limits.max_argon2_memory_kib.into(),
                    });
                }
                if time > limits.max_argon2_time {
                    return Err(Error::KdfLimitExceeded {
                        kdf,
                        parameter: "time cost",
                        value: time.into(),
                        limit: limits.max_argon2_time.into(),
                    });
                }
                // RFC 9106: at least 8 KiB per lane.
                if u64::from(memory_kib) < 8 * u64::from(parallel) {
                    return Err(Error::InvalidKdfParameters(format!(
                        "{kdf} memory {memory_kib} KiB is below 8 KiB per lane for {parallel} lanes"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Derives `out_len` bytes from `password` and `salt`. Refuses (Error::KdfLimitExceeded,
    /// exit 3) before doing any work when the costs are over `limits`.
    pub fn derive(
        &self,
        password: &[u8],
        salt: &[u8],
        out_len: usize,
        limits: &KdfLimits,
    ) -> Result<SecretBytes, Error> {
        self.check(limits)?;
        if out_len == 0 || out_len > MAX_OUTPUT_LEN {
            return Err(Error::InvalidKdfParameters(format!(
                "derived key length {out_len} is outside 1..={MAX_OUTPUT_LEN}"
            )));
        }
        let mut out = vec![0u8; out_len];
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => pbkdf2(hash, password, salt, iterations, &mut out),
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                parallel,
            } => argon2_raw(
                variant,
                password,
                salt,
                &[],
                &[],
                time,
                memory_kib,
                parallel,
                &mut out,
            )?,
        }
        Ok(SecretBytes::new(out))
    }

    /// Memory this KDF will allocate, for budgets.
    pub fn memory_bytes(&self) -> u64 {
        match *self {
            // An HMAC state and a block or two: negligible, but not zero.
            Kdf::Pbkdf2 { .. } => 4096,
            Kdf::Argon2 { memory_kib, .. } => u64::from(memory_kib) * 1024,
        }
    }
}

/// Longest derived key we agree to produce (LUKS keys are at most 64 bytes; keep headroom).
pub const MAX_OUTPUT_LEN: usize = 1024;

/// Argon2 (version 0x13) with the full RFC 9106 input set: a `secret` (key) and associated
/// `data`, both empty for LUKS. Exposed so the RFC 9106 test vectors can exercise the same code
/// path [`Kdf::derive`] uses. Does not check [`KdfLimits`]: callers do.
#[allow(clippy::too_many_arguments)]
pub fn argon2_raw(
    variant: Argon2Variant,
    password: &[u8],
    salt: &[u8],
    secret: &[u8],
    associated_data: &[u8],
    time: u32,
    memory_kib: u32,
    parallel: u32,
    out: &mut [u8],
) -> Result<(), Error> {
    let bad = |e: argon2::Error| match e {
        argon2::Error::OutOfMemory => {
            Error::OutOfMemory(format!("{} needs {memory_kib} KiB", variant.name()))
        }
        e => Error::InvalidKdfParameters(format!("{}: {e}", variant.name())),
    };
    let mut builder = argon2::ParamsBuilder::new();
    builder
        .m_cost(memory_kib)
        .t_cost(time)
        .p_cost(parallel)
        .output_len(out.len());
    if !associated_data.is_empty() {
        builder.data(argon2::AssociatedData::new(associated_data).map_err(bad)?);
    }
    let params = builder.build().map_err(bad)?;
    let ctx = if secret.is_empty() {
        argon2::Argon2::new(variant.algorithm(), argon2::Version::V0x13, params)
    } else {
        argon2::Argon2::new_with_secret(secret, variant.algorithm(), argon2::Version::V0x13, params)
            .map_err(bad)?
    };
    ctx.hash_password_into(password, salt, out).map_err(bad)
}

/// cryptsetup-style benchmark for `--iter-time`: the PBKDF2 iteration count that takes about
/// `target` on this machine (at least cryptsetup's minimum of 1000).
pub fn pbkdf2_iterations_for(hash: HashAlg, target: Duration) -> u32 {
    // Time growing runs until one is long enough to measure reliably, then scale linearly.
    let salt = [0u8; 32];
    let mut out = Zeroizing::new(vec![0u8; hash.output_len()]);
    let mut iterations: u32 = 1000;
    let elapsed = loop {
        let start = Instant::now();
        pbkdf2(hash, b"volcrypt benchmark", &salt, iterations, &mut out);
        let elapsed = start.elapsed();
        if elapsed >= Duration::from_millis(100) || iterations >= (1 << 26) {
            break elapsed;
        }
        iterations *= 4;
    };
    scale(iterations, elapsed, target, MIN_PBKDF2_ITERATIONS, u32::MAX)
}

/// cryptsetup-style benchmark for `--iter-time`: the Argon2 time cost that takes about `target`
/// with `memory_kib` and `parallel` (at least cryptsetup's minimum of 4, at most the default
/// limit of 1000).
pub fn argon2_time_for(
    variant: Argon2Variant,
    memory_kib: u32,
    parallel: u32,
    target: Duration,
) -> u32 {
    // One pass over at most 64 MiB, scaled to the requested memory: Argon2's cost is linear in
    // memory × passes, and this keeps the benchmark itself short.
    let parallel = parallel.clamp(1, 64);
    let probe_kib = memory_kib.clamp(8 * parallel, 64 * 1024);
    let mut out = Zeroizing::new([0u8; 32]);
    let start = Instant::now();
    let res = argon2_raw(
        variant,
        b"volcrypt benchmark",
        &[0u8; 32],
        &[],
        &[],
        1,
        probe_kib,
        parallel,
        &mut out[..],
    );
    if res.is_err() {
        return MIN_ARGON2_TIME;
    }
    let per_pass = start
        .elapsed()
        .mul_f64(f64::from(memory_kib.max(probe_kib)) / f64::from(probe_kib));
    scale(
        1,
        per_pass,
        target,
        MIN_ARGON2_TIME,
        KdfLimits::default().max_argon2_time,
    )
}

/// `count * target / elapsed`, clamped to `min..=max`.
fn scale(count: u32, elapsed: Duration, target: Duration, min: u32, max: u32) -> u32 {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let scaled = f64::from(count) * target.as_secs_f64() / secs;
    if scaled.is_nan() || scaled < f64::from(min) {
        min
    } else if scaled > f64::from(max) {
        max
    } else {
        scaled as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_before_work() {
        let limits = KdfLimits::default();
        // 4 GiB + 1 KiB of Argon2 memory: refused instantly, nothing allocated.
        let kdf = Kdf::Argon2 {
            variant: Argon2Variant::Argon2id,
            time: 4,
            memory_kib: CRYPTSETUP_MAX_ARGON2_MEMORY_KIB + 1,
            parallel: 4,
        };
        let e = kdf.derive(b"pw", &[0; 32], 32, &limits).unwrap_err();
        assert!(matches!(e, Error::KdfLimitExceeded { .. }), "{e}");
        assert_eq!(e.kind(), crate::kind::Kind::OutOfMemory);
        let kdf = Kdf::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations: u32::MAX,
        };
        let start = Instant::now();
        let e = kdf.derive(b"pw", &[0; 32], 32, &limits).unwrap_err();
        assert_eq!(e.kind(), crate::kind::Kind::OutOfMemory);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn bad_parameters_are_exit_1() {
        let limits = KdfLimits::default();
        for kdf in [
            Kdf::Pbkdf2 {
                hash: HashAlg::Sha1,
                iterations: 0,
            },
            Kdf::Argon2 {
                variant: Argon2Variant::Argon2i,
                time: 0,
                memory_kib: 64,
                parallel: 1,
            },
            Kdf::Argon2 {
                variant: Argon2Variant::Argon2i,
                time: 1,
                memory_kib: 64,
                parallel: 0,
            },
            Kdf::Argon2 {
                variant: Argon2Variant::Argon2id,
                time: 1,
                memory_kib: 15,
                parallel: 2,
            },
        ] {
            let e = kdf.derive(b"pw", &[0; 32], 32, &limits).unwrap_err();
            assert_eq!(e.kind(), crate::kind::Kind::Invalid, "{kdf:?}: {e}");
        }
    }

    #[test]
    fn benchmarks_respect_minimums() {
        assert!(pbkdf2_iterations_for(HashAlg::Sha256, Duration::from_millis(1)) >= 1000);
        assert!(argon2_time_for(Argon2Variant::Argon2id, 1024, 1, Duration::from_millis(1)) >= 4);
    }
}
