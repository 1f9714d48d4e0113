//! The top-level error, and the mapping of every failure onto cryptsetup's exit codes, because
//! operators and scripts coming from cryptsetup already branch on those numbers.

use std::fmt;

/// Process exit statuses, numbered exactly as cryptsetup's (see cryptsetup(8), "RETURN CODES").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Ok = 0,
    /// Wrong parameters or invalid data (including "not LUKS").
    Invalid = 1,
    /// No key available with this passphrase.
    NoKey = 2,
    /// Out of memory, or a KDF cost above the configured limit.
    OutOfMemory = 3,
    /// Wrong device or file specified.
    WrongDevice = 4,
    /// Device already exists or is busy.
    Busy = 5,
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// Every layer's error, so the CLI (and later the RPC) has one type to map onto exit codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Crypto(#[from] crate::crypto::Error),
    #[error(transparent)]
    Luks(#[from] crate::luks::Error),
    #[error(transparent)]
    Image(#[from] crate::image::Error),
    #[error(transparent)]
    Keys(#[from] crate::keys::Error),
    #[error(transparent)]
    Request(#[from] crate::request::Error),
    #[cfg(feature = "system")]
    #[error(transparent)]
    Volume(#[from] crate::volume::Error),
    #[cfg(feature = "system")]
    #[error(transparent)]
    Rpc(#[from] crate::rpc::Error),
    #[cfg(feature = "system")]
    #[error(transparent)]
    Udev(#[from] crate::udev::Error),
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// Bad command-line usage that clap could not catch (conflicting options and the like).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Error::Crypto(e) => e.exit_status(),
            Error::Luks(e) => e.exit_status(),
            Error::Image(e) => e.exit_status(),
            Error::Keys(e) => e.exit_status(),
            Error::Request(e) => e.exit_status(),
            #[cfg(feature = "system")]
            Error::Volume(e) => e.exit_status(),
            #[cfg(feature = "system")]
            Error::Rpc(e) => e.exit_status(),
            #[cfg(feature = "system")]
            Error::Udev(e) => e.exit_status(),
            Error::Config(e) => e.exit_status(),
            Error::Usage(_) => ExitStatus::Invalid,
        }
    }
}
