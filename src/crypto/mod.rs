//! The userspace engine's cryptographic primitives: hashes and PBKDF2 ([`hash`]), the LUKS key
//! derivation functions with cost limits ([`kdf`]), the anti-forensic splitter ([`af`]), cipher
//! specifications and whole-sector encryption ([`cipher`]), and the fast AES-XTS engine behind
//! it ([`xts`], built on the hand-written x86_64 AES kernels of the private `aes_impl`).
//!
//! Everything here is a plain function or a small value type; the LUKS layer decides what to
//! call with which parameters.
//!
//! Soundness: the SIMD kernels may only run on a CPU that has their instructions. The only
//! `unsafe` code lives in the private `aes_impl` module, whose kernels are reachable only
//! through an [`xts::Xts`] built from run-time CPU detection; nothing public lets safe code
//! choose an instruction set the CPU lacks.
#![deny(unsafe_code)]

use crate::kind::Kind;

#[allow(unsafe_code)]
mod aes_impl;
pub mod af;
pub mod cbc;
pub mod cipher;
pub mod hash;
pub mod kdf;
pub mod xts;

pub use af::{af_merge, af_split};
pub use cipher::{CipherSpec, IvMode, Mode, SectorCipher};
pub use hash::{HashAlg, pbkdf2};
pub use kdf::{Argon2Variant, Kdf, KdfLimits, argon2_time_for, pbkdf2_iterations_for};

/// Errors of the crypto layer. Messages name the offending value (never key material).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A cipher specification volcrypt cannot process (e.g. serpent, twofish, cbc-benbi, lrw).
    #[error(
        "unsupported cipher {0:?} (supported: aes-xts-plain64, aes-xts-plain, aes-cbc-essiv:sha256, aes-cbc-plain, aes-cbc-plain64)"
    )]
    UnsupportedCipher(String),
    /// A hash name volcrypt does not implement.
    #[error("unsupported hash {0:?} (supported: sha1, sha224, sha256, sha384, sha512, ripemd160)")]
    UnsupportedHash(String),
    /// An AES-XTS implementation asked for by name that this CPU cannot run.
    #[error("the {0} AES-XTS implementation needs CPU features this machine lacks")]
    ImplementationUnavailable(&'static str),
    /// A key whose length does not fit the cipher.
    #[error("invalid key length for {spec}: {got} bytes (expected {expected})")]
    InvalidKeyLength {
        spec: String,
        got: usize,
        expected: &'static str,
    },
    /// A KDF cost above the configured limit; refused before any work is done.
    #[error("{kdf} {parameter} {value} exceeds the configured limit {limit}")]
    KdfLimitExceeded {
        kdf: &'static str,
        parameter: &'static str,
        value: u64,
        limit: u64,
    },
    /// KDF parameters that are out of range (zero iterations, too little memory for the lanes...).
    #[error("invalid KDF parameters: {0}")]
    InvalidKdfParameters(String),
    /// Anti-forensic splitter parameters that do not fit together.
    #[error("invalid anti-forensic split parameters: {0}")]
    InvalidAfParameters(String),
    /// Memory for a KDF (Argon2) could not be allocated.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The operating system's random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Rng(String),
}

impl Error {
    /// Maps onto cryptsetup's exit codes: a KDF cost above the limit or a failed allocation is
    /// "out of memory" (3), everything else is "wrong parameters or invalid data" (1).
    pub fn kind(&self) -> Kind {
        match self {
            Error::KdfLimitExceeded { .. } | Error::OutOfMemory(_) => Kind::OutOfMemory,
            _ => Kind::Invalid,
        }
    }
}

/// Fills `buf` from the operating system's random number generator (getrandom(2)).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Rng(e.to_string()))
}
