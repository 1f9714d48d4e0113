//! Parameters of a new container: the user's options resolved against cryptsetup 2.6's
//! defaults, so an image made by `volcrypt image encrypt` looks like one made by
//! `cryptsetup luksFormat` with the same options.

use std::time::Duration;

use crate::crypto::cipher::CipherSpec;
use crate::crypto::hash::HashAlg;
use crate::crypto::kdf::{self, Argon2Variant, Kdf, KdfLimits};
use crate::luks::NewContainer;

use super::Error;

/// cryptsetup's defaults (2.6, Debian build).
pub const DEFAULT_CIPHER: &str = "aes-xts-plain64";
pub const DEFAULT_HASH: &str = "sha256";
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;
pub const DEFAULT_ARGON2_MEMORY_KIB: u32 = 1 << 20;
pub const DEFAULT_ARGON2_PARALLEL: u32 = 4;
/// cryptsetup's bounds for forced KDF costs.
pub const MIN_PBKDF2_ITERATIONS: u32 = 1000;
pub const MIN_ARGON2_TIME: u32 = 4;
pub const MIN_ARGON2_MEMORY_KIB: u32 = 32;
pub const MAX_ARGON2_MEMORY_KIB: u32 = 4 << 20;
pub const MAX_ARGON2_PARALLEL: u32 = 4;
/// LUKS2 labels are 48 bytes on disk including the terminating NUL.
pub const MAX_LABEL_BYTES: usize = 47;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PbkdfType {
    Pbkdf2,
    Argon2i,
    Argon2id,
}

/// What the user asked for; `None` = cryptsetup's default.
#[derive(Debug, Clone, Default)]
pub struct EncryptOptions {
    /// 1 or 2.
    pub version: Option<u8>,
    pub cipher: Option<String>,
    pub key_size_bits: Option<u32>,
    pub sector_size: Option<u32>,
    pub hash: Option<String>,
    pub pbkdf: Option<PbkdfType>,
    pub iter_time_ms: Option<u64>,
    /// PBKDF2 iterations, or the Argon2 time cost (cryptsetup's `--pbkdf-force-iterations`).
    pub iterations: Option<u32>,
    pub memory_kib: Option<u32>,
    pub parallel: Option<u32>,
    pub label: Option<String>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Parameter(msg.into())
}

impl EncryptOptions {
    /// Resolves every default for a payload of `payload_size` bytes. Benchmarked KDF costs
    /// (from `--iter-time`) are capped at `limits`; explicit costs above them are left for
    /// `luks::create` to refuse (exit 3), so the user hears about it.
    pub fn resolve(
        &self,
        payload_size: u64,
        detached_header: bool,
        limits: &KdfLimits,
    ) -> Result<NewContainer, Error> {
        let version = self.version.unwrap_or(2);
        if version != 1 && version != 2 {
            return Err(bad(format!(
                "--type luks{version}: only luks1 and luks2 exist"
            )));
        }
        let cipher = CipherSpec::parse(self.cipher.as_deref().unwrap_or(DEFAULT_CIPHER))?;
        let key_bits = match self.key_size_bits {
            Some(bits) => bits,
            // cryptsetup doubles its 256-bit default for XTS (two AES keys).
            None if cipher.to_string().contains("-xts-") => 512,
            None => 256,
        };
        if key_bits == 0 || !key_bits.is_multiple_of(8) {
            return Err(bad(format!(
                "--key-size {key_bits}: must be a positive multiple of 8 bits"
            )));
        }
        let key_bytes = (key_bits / 8) as usize;
        cipher.check_key_len(key_bytes)?;

        let sector_size = match (version, self.sector_size) {
            (1, None | Some(512)) => 512,
            (1, Some(s)) => {
                return Err(bad(format!(
                    "--sector-size {s}: LUKS1 supports only 512-byte sectors"
                )));
            }
            (_, Some(s)) if (512..=4096).contains(&s) && s.is_power_of_two() => s,
            (_, Some(s)) => {
                return Err(bad(format!(
                    "--sector-size {s}: must be a power of two between 512 and 4096"
                )));
            }
            // cryptsetup 2.6 picks 4096 when the device allows it.
            (_, None) if payload_size.is_multiple_of(4096) => 4096,
            (_, None) => 512,
        };

        let hash = HashAlg::from_name(self.hash.as_deref().unwrap_or(DEFAULT_HASH))?;

        if let Some(label) = &self.label {
            if version == 1 {
                return Err(bad(
                    "--label: LUKS1 headers have no label (use --type luks2)",
                ));
            }
            if label.len() > MAX_LABEL_BYTES || label.contains('\0') {
                return Err(bad(format!(
                    "--label: at most {MAX_LABEL_BYTES} bytes without NUL (got {} bytes)",
                    label.len()
                )));
            }
        }

        let kdf = self.resolve_kdf(version, hash, limits)?;
        Ok(NewContainer {
            version,
            cipher,
            key_bytes,
            sector_size,
            hash,
            kdf,
            label: self.label.clone(),
            detached_header,
            payload_size,
        })
    }

    fn resolve_kdf(&self, version: u8, hash: HashAlg, limits: &KdfLimits) -> Result<Kdf, Error> {
        let pbkdf = self.pbkdf.unwrap_or(if version == 1 {
            PbkdfType::Pbkdf2
        } else {
            PbkdfType::Argon2id
        });
        if self.iter_time_ms.is_some() && self.iterations.is_some() {
            return Err(bad("--iter-time and --pbkdf-iterations exclude each other"));
        }
        let target = Duration::from_millis(self.iter_time_ms.unwrap_or(DEFAULT_ITER_TIME_MS));
        if target.is_zero() {
            return Err(bad("--iter-time 0: must be at least 1 ms"));
        }
        // Argon2Variant need not be Copy: build it where it is used.
        let variant = || {
            if pbkdf == PbkdfType::Argon2i {
                Argon2Variant::Argon2i
            } else {
                Argon2Variant::Argon2id
            }
        };
        match pbkdf {
            PbkdfType::Pbkdf2 => {
                if self.memory_kib.is_some() || self.parallel.is_some() {
                    return Err(bad(
                        "--pbkdf-memory and --pbkdf-parallel apply only to argon2i/argon2id",
                    ));
                }
                let iterations = match self.iterations {
                    Some(n) if n < MIN_PBKDF2_ITERATIONS => {
                        return Err(bad(format!(
                            "--pbkdf-iterations {n}: PBKDF2 needs at least {MIN_PBKDF2_ITERATIONS}"
                        )));
                    }
                    Some(n) => n,
                    None => kdf::pbkdf2_iterations_for(hash, target).clamp(
                        MIN_PBKDF2_ITERATIONS,
                        limits.max_pbkdf2_iterations.max(MIN_PBKDF2_ITERATIONS),
                    ),
                };
                return Ok(Kdf::Pbkdf2 { hash, iterations });
            }
            PbkdfType::Argon2i | PbkdfType::Argon2id => {}
        }
        if version == 1 {
            return Err(bad(
                "--pbkdf argon2i/argon2id: LUKS1 supports only pbkdf2 (use --type luks2)",
            ));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let parallel = match self.parallel {
            Some(p) if !(1..=MAX_ARGON2_PARALLEL).contains(&p) => {
                return Err(bad(format!(
                    "--pbkdf-parallel {p}: must be between 1 and {MAX_ARGON2_PARALLEL}"
                )));
            }
            Some(p) => p,
            None => DEFAULT_ARGON2_PARALLEL
                .min(u32::try_from(cpus).unwrap_or(u32::MAX))
                .max(1),
        };
        let min_memory = MIN_ARGON2_MEMORY_KIB.max(8 * parallel);
        let memory_kib = match self.memory_kib {
            Some(m) if !(min_memory..=MAX_ARGON2_MEMORY_KIB).contains(&m) => {
                return Err(bad(format!(
                    "--pbkdf-memory {m}: must be between {min_memory} and {MAX_ARGON2_MEMORY_KIB} KiB"
                )));
            }
            Some(m) => m,
            // cryptsetup: 1 GiB, but never more than half the machine's RAM.
            None => DEFAULT_ARGON2_MEMORY_KIB
                .min(half_physical_memory_kib())
                .min(limits.max_argon2_memory_kib)
                .max(min_memory),
        };
        let time = match self.iterations {
            Some(t) if t < MIN_ARGON2_TIME => {
                return Err(bad(format!(
                    "--pbkdf-iterations {t}: Argon2 needs a time cost of at least {MIN_ARGON2_TIME}"
                )));
            }
            Some(t) => t,
            None => kdf::argon2_time_for(variant(), memory_kib, parallel, target)
                .clamp(MIN_ARGON2_TIME, limits.max_argon2_time.max(MIN_ARGON2_TIME)),
        };
        Ok(Kdf::Argon2 {
            variant: variant(),
            time,
            memory_kib,
            parallel,
        })
    }
}

/// Half of MemTotal from /proc/meminfo, in KiB (u32::MAX when unknown, i.e. no cap).
fn half_physical_memory_kib() -> u32 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return u32::MAX;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(u32::MAX, |kib| u32::try_from(kib / 2).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> KdfLimits {
        KdfLimits::default()
    }

    fn pbkdf2(iterations: u32) -> EncryptOptions {
        EncryptOptions {
            pbkdf: Some(PbkdfType::Pbkdf2),
            iterations: Some(iterations),
            ..EncryptOptions::default()
        }
    }

    #[test]
    fn luks2_defaults_follow_cryptsetup() {
        let o = EncryptOptions {
            iterations: Some(4),
            memory_kib: Some(64),
            ..EncryptOptions::default()
        };
        let p = o.resolve(1 << 20, false, &limits()).expect("resolve");
        assert_eq!(p.version, 2);
        assert_eq!(p.cipher.to_string(), "aes-xts-plain64");
        assert_eq!(p.key_bytes, 64);
        assert_eq!(p.sector_size, 4096);
        assert_eq!(p.hash, HashAlg::Sha256);
        match p.kdf {
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                parallel,
            } => {
                assert_eq!(variant, Argon2Variant::Argon2id);
                assert_eq!((time, memory_kib), (4, 64));
                assert!((1..=4).contains(&parallel));
            }
            other => panic!("expected argon2id, got {other:?}"),
        }
        // Not a multiple of 4096: 512-byte sectors.
        let p = o
            .resolve((1 << 20) + 512, false, &limits())
            .expect("resolve");
        assert_eq!(p.sector_size, 512);
    }

    #[test]
    fn luks1_defaults_and_refusals() {
        let o = EncryptOptions {
            version: Some(1),
            ..pbkdf2(1000)
        };
        let p = o.resolve(1 << 20, false, &limits()).expect("resolve");
        assert_eq!((p.version, p.sector_size, p.key_bytes), (1, 512, 64));
        assert_eq!(
            p.kdf,
            Kdf::Pbkdf2 {
                hash: HashAlg::Sha256,
                iterations: 1000
            }
        );

        for bad in [
            EncryptOptions {
                sector_size: Some(4096),
                ..o.clone()
            },
            EncryptOptions {
                label: Some("x".into()),
                ..o.clone()
            },
            EncryptOptions {
                version: Some(1),
                pbkdf: Some(PbkdfType::Argon2id),
                ..EncryptOptions::default()
            },
        ] {
            let e = bad.resolve(1 << 20, false, &limits()).unwrap_err();
            assert!(e.to_string().contains("LUKS1"), "{e}");
        }
    }

    #[test]
    fn cbc_defaults_to_a_256_bit_key_and_bad_values_are_named() {
        let o = EncryptOptions {
            cipher: Some("aes-cbc-essiv:sha256".into()),
            ..pbkdf2(1000)
        };
        assert_eq!(
            o.resolve(4096, false, &limits())
                .expect("resolve")
                .key_bytes,
            32
        );
        let cases = [
            (
                EncryptOptions {
                    key_size_bits: Some(300),
                    ..pbkdf2(1000)
                },
                "300",
            ),
            (
                EncryptOptions {
                    sector_size: Some(1536),
                    ..pbkdf2(1000)
                },
                "1536",
            ),
            (pbkdf2(999), "999"),
            (
                EncryptOptions {
                    pbkdf: Some(PbkdfType::Argon2i),
                    iterations: Some(3),
                    ..EncryptOptions::default()
                },
                "3",
            ),
            (
                EncryptOptions {
                    pbkdf: Some(PbkdfType::Argon2i),
                    iterations: Some(4),
                    memory_kib: Some(8),
                    ..EncryptOptions::default()
                },
                "8",
            ),
            (
                EncryptOptions {
                    label: Some("x".repeat(48)),
                    ..pbkdf2(1000)
                },
                "48",
            ),
        ];
        for (o, needle) in cases {
            let e = o.resolve(1 << 20, false, &limits()).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
            assert_eq!(e.kind(), crate::kind::Kind::Invalid);
        }
    }
}
