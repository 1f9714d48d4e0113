//! The command line's error, and the mapping of every failure onto cryptsetup's exit codes,
//! because operators and scripts coming from cryptsetup already branch on those numbers.
//!
//! This is an edge: it imports every layer's error, and no layer imports it. Layers say what
//! kind of failure they had ([`crate::kind::Kind`]); the number is chosen here.

use std::fmt;

use crate::kind::Kind;

/// Process exit statuses, numbered exactly as cryptsetup's (see cryptsetup(8), "RETURN CODES"),
/// plus volcrypt's own after them for what cryptsetup never meets (a verify verdict, an agent
/// lost mid-request). `--help` lists them (`cli::EXIT_CODES`).
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
    /// `verify`: the data differs from what it should be (cryptsetup has no such code).
    Mismatch = 6,
    /// `verify`: verification could not run (cipher not in the userspace engine, no key).
    CannotVerify = 7,
    /// volcrypt's own, not cryptsetup's: the agent (`--socket`) closed the connection before
    /// answering. The request may or may not have been carried out: ask the agent
    /// (`volcrypt status --socket …`) before retrying.
    AgentLost = 8,
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<Kind> for ExitStatus {
    fn from(kind: Kind) -> ExitStatus {
        match kind {
            Kind::Invalid => ExitStatus::Invalid,
            Kind::NoKey => ExitStatus::NoKey,
            Kind::OutOfMemory => ExitStatus::OutOfMemory,
            Kind::WrongDevice => ExitStatus::WrongDevice,
            Kind::Busy => ExitStatus::Busy,
            Kind::Mismatch => ExitStatus::Mismatch,
            Kind::CannotVerify => ExitStatus::CannotVerify,
            Kind::AgentLost => ExitStatus::AgentLost,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// Every layer's error, so the CLI has one type to map onto exit codes.
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
    Verify(#[from] crate::volume::verify::Error),
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
    /// `image check-properties` found disagreements (each printed before).
    #[error("{count} Glance propert{} disagree(s) with the image", if *count == 1 { "y" } else { "ies" })]
    PropertiesDisagree { count: usize },
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Error::Crypto(e) => e.kind().into(),
            Error::Luks(e) => e.kind().into(),
            Error::Image(e) => e.kind().into(),
            Error::Keys(e) => e.kind().into(),
            Error::Request(e) => e.kind().into(),
            #[cfg(feature = "system")]
            Error::Volume(e) => e.kind().into(),
            #[cfg(feature = "system")]
            Error::Verify(e) => e.kind().into(),
            #[cfg(feature = "system")]
            Error::Rpc(e) => e.kind().into(),
            #[cfg(feature = "system")]
            Error::Udev(e) => e.kind().into(),
            Error::Config(e) => e.kind().into(),
            Error::Usage(_) => ExitStatus::Invalid,
            Error::PropertiesDisagree { .. } => crate::kind::Kind::Mismatch.into(),
        }
    }
}
