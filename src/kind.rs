//! What kind of failure an error is, independent of how it is reported.
//!
//! Every layer's error answers [`Kind`] through a `kind()` method; only the edges turn a kind
//! into a number a user sees: the CLI into cryptsetup's exit codes (`error::ExitStatus`), the
//! agent into HTTP statuses (`rpc::errors`). Keeping the kinds in this leaf module, which imports
//! nothing, lets every layer name them without importing the edges (and the edges import every
//! layer).

/// The categories cryptsetup's exit codes draw, because operators branch on exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Wrong parameters or invalid data (including "not LUKS", a malformed request).
    Invalid,
    /// No key available: wrong passphrase/key, or the key could not be fetched.
    NoKey,
    /// Out of memory, or a KDF cost above the configured limit.
    OutOfMemory,
    /// Wrong device or file: missing, unreadable, not a block device.
    WrongDevice,
    /// Busy or already exists: a name held by another device, a mapping in use, a device
    /// held by a mapping or opened exclusively.
    Busy,
    /// Verification ran and found data that differs from what it should be (ciphertext that
    /// does not decrypt to the plaintext shown, a damaged keyslot area, a plaintext mismatch).
    Mismatch,
    /// Verification could not run: the userspace engine lacks the cipher, or the key is not
    /// available. Distinct from a mismatch so that "could not check" never reads as "corrupt".
    CannotVerify,
    /// The agent accepted the request but closed the connection before it answered (it died or
    /// was stopped mid-request): the operation may or may not have happened. volcrypt's own
    /// category, not one of cryptsetup's.
    AgentLost,
}
