//! Whether the kernel's crypto API runs a cipher with a key size, asked before a format.
//!
//! Without this check a cipher whose module is missing, or a key size the kernel refuses, shows
//! up as libcryptsetup's or dm-crypt's bare "Input/output error". Binding an AF_ALG socket to
//! the cipher and setting a key of the requested size answers the same question the kernel
//! will, and lets the refusal name the cipher and the key size. When the check itself cannot
//! be made (no AF_ALG, even AES-CBC cannot be bound) it answers "unknown" and the format goes
//! ahead as before: the check never refuses what the kernel would accept.

use nix::sys::socket::{
    AddressFamily, AlgAddr, SockFlag, SockType, bind, setsockopt, socket, sockopt,
};

/// The kernel's answer for a cipher specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Runs,
    /// The reason, naming the kernel algorithm and key size.
    Refused(String),
    /// AF_ALG could not tell (not available here).
    Unknown,
}

/// The kernel algorithm dm-crypt builds for `cipher` and `mode` (`aes`, `xts-plain64` →
/// `xts(aes)`; `cbc-essiv:sha256` → `cbc(aes)`: the IV generator is dm-crypt's).
pub fn kernel_name(cipher: &str, mode: &str) -> String {
    let chain = mode.split('-').next().unwrap_or(mode);
    format!("{chain}({cipher})")
}

fn bind_to(name: &str) -> Result<std::os::fd::OwnedFd, nix::Error> {
    if name.len() >= 64 {
        return Err(nix::Error::ENAMETOOLONG);
    }
    let fd = socket(
        AddressFamily::Alg,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &AlgAddr::new("skcipher", name),
    )?;
    Ok(fd)
}

/// Ask the kernel whether it runs `cipher`-`mode` with a `key_bits` key.
pub fn check(cipher: &str, mode: &str, key_bits: u32) -> Answer {
    let name = kernel_name(cipher, mode);
    let fd = match bind_to(&name) {
        Ok(fd) => fd,
        Err(e) => {
            // Only a kernel that binds AES-CBC, which every dm-crypt host has, can be said to
            // lack the requested algorithm.
            if bind_to("cbc(aes)").is_ok() {
                return Answer::Refused(format!(
                    "the kernel crypto API has no {name} for cipher {cipher}-{mode} ({e}; is its \
                     module loaded?)"
                ));
            }
            return Answer::Unknown;
        }
    };
    // Distinct bytes: XTS refuses a key whose two halves are equal in FIPS mode.
    let key: Vec<u8> = (0..key_bits / 8)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(1))
        .collect();
    match setsockopt(&fd, sockopt::AlgSetKey::default(), &key) {
        Ok(()) => Answer::Runs,
        Err(nix::Error::EINVAL) => Answer::Refused(format!(
            "the kernel refuses a {key_bits}-bit key for {name} (cipher {cipher}-{mode})"
        )),
        Err(_) => Answer::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_follow_dm_crypt() {
        assert_eq!(kernel_name("aes", "xts-plain64"), "xts(aes)");
        assert_eq!(kernel_name("aes", "cbc-essiv:sha256"), "cbc(aes)");
        assert_eq!(kernel_name("serpent", "xts-plain"), "xts(serpent)");
    }

    #[test]
    fn an_unknown_algorithm_is_never_said_to_run() {
        // Refused where AF_ALG works, unknown where it does not: never "runs".
        assert_ne!(check("nosuchcipher", "xts-plain64", 256), Answer::Runs);
    }
}
