//! Key managers: where a volume's secret comes from.
//!
//! (Skeleton: filled in by the key-manager work.)

use crate::error::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("secret {0} not found")]
    NotFound(String),
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Invalid
    }
}
