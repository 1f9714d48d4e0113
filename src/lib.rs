//! volcrypt: a per-host agent that turns volume attach events into dm-crypt mappings.
//!
//! The crate is laid out by concern, one obvious place for each:
//!
//! - [`secret`]: secret types and the OpenStack passphrase rule (raw vs lowercase hex).
//! - [`crypto`]: the userspace engine's primitives: sector ciphers (fast AES-XTS, CBC with
//!   plain/plain64/essiv IVs), KDFs with cost limits, the LUKS anti-forensic splitter.
//! - [`luks`]: the LUKS1/LUKS2 on-disk formats: parse, validate, unlock, write.
//! - [`image`]: whole-container operations on files (inspect, check-key, decrypt, encrypt),
//!   streaming, parallel, with progress.
//! - [`keys`]: key managers (local keystore, Barbican, Cinder fixed key).
//! - [`request`]: the attach request (what Nova hands os-brick) and its validation.
//! - `volume` (feature `system`): attach/detach/extend/status through libcryptsetup and dm.
//! - `rpc` (feature `system`): `volcrypt serve`, the attach API on a Unix socket.
//! - `udev` (feature `system`): block devices by identity (serial, WWN, by-path, LUKS UUID),
//!   enumeration and the udev monitor thread behind udev-triggered activation.
//! - [`config`]: the TOML configuration file and its defaults.
//! - [`kind`]: the kinds of failure every layer's error reports (a leaf: imports nothing).
//! - [`error`]: the command line's error and its cryptsetup-compatible exit codes.
//! - [`cli`]: the command-line front end.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod cipher_policy;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod image;
pub mod keys;
pub mod kind;
pub mod luks;
pub mod request;
#[cfg(feature = "system")]
pub mod rpc;
pub mod secret;
#[cfg(feature = "system")]
pub mod udev;
#[cfg(feature = "system")]
pub mod volume;

pub use error::{Error, ExitStatus};
