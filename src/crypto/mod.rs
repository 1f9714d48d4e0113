//! The userspace engine's cryptographic primitives.
//!
//! (Skeleton: filled in by the crypto work — sector ciphers, KDFs with limits, AF splitter.)

use crate::error::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported cipher {0:?}")]
    UnsupportedCipher(String),
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Invalid
    }
}
