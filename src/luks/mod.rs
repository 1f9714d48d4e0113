//! The LUKS1 and LUKS2 on-disk formats.
//!
//! (Skeleton: filled in by the format work.)

use crate::error::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a LUKS device")]
    NotLuks,
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::Invalid
    }
}
