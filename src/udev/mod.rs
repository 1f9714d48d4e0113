//! udev: finding block devices by identity, and hearing them come and go.
//!
//! - [`device`]: a plain, owned snapshot of a udev block device (node, number, the identity
//!   properties volcrypt matches on) and the pure matching of a [`Selector`] against it;
//! - [`scan`]: enumeration of the block devices present now (resolving a selector, the
//!   agent's start-up pass);
//! - [`monitor`]: the udev monitor on its own thread (libudev handles are not `Send`), turning
//!   events for devices tagged `volcrypt` (see `udev-rules/90-volcrypt.rules`) into owned
//!   [`DeviceEvent`]s on a tokio channel.
//!
//! The agent's use of all this (waiting attaches, teardown on remove, re-activation) lives in
//! `rpc::devices`.
//!
//! [`Selector`]: crate::request::Selector

pub mod device;
pub mod monitor;
pub mod scan;

pub use device::{Action, BlockDevice, DeviceEvent};
pub use monitor::spawn_monitor;
pub use scan::{find, scan};

/// The tag the rules file gives the devices the agent's monitor listens to.
pub const TAG: &str = "volcrypt";

/// udev errors (enumeration, monitor set-up). Messages say what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("udev {op}: {error}")]
    Udev {
        op: &'static str,
        error: std::io::Error,
    },
    #[error("no block device matches {selector}")]
    NoMatch { selector: String },
    #[error("{selector} matches {count} block devices ({nodes}): refusing to guess")]
    Ambiguous {
        selector: String,
        count: usize,
        nodes: String,
    },
}

impl Error {
    pub fn kind(&self) -> crate::kind::Kind {
        match self {
            Error::Udev { .. } => crate::kind::Kind::Invalid,
            Error::NoMatch { .. } => crate::kind::Kind::WrongDevice,
            Error::Ambiguous { .. } => crate::kind::Kind::Busy,
        }
    }

    pub(crate) fn udev(op: &'static str, error: std::io::Error) -> Error {
        Error::Udev { op, error }
    }
}
