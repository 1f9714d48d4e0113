//! Whole-container operations on image files.
//!
//! (Skeleton: filled in by the image work.)

use crate::error::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::WrongDevice
    }
}
