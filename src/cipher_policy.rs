//! Which cipher specifications volcrypt formats a volume with, and which it refuses.
//!
//! An encrypted volume type must never produce plaintext on disk, nor ciphertext that leaks
//! the data's patterns. The rules, in the order they are applied:
//! - `cipher_null` (any mode) does no encryption at all: refused everywhere, for a new format,
//!   for plain dm-crypt, and as the cipher of an existing LUKS header (such a "volume" is not
//!   encrypted and volcrypt does not pretend it is);
//! - ECB mode encrypts equal blocks to equal ciphertext, and 64-bit-block ciphers (DES,
//!   3DES, Blowfish, CAST5, IDEA) lose their security after a few GiB under one key (birthday
//!   bound): never used for a new format; an existing volume using them still opens (its data
//!   is never stranded) with a warning;
//! - a new format accepts exactly what cryptsetup and OpenStack document: `aes`, `serpent` or
//!   `twofish` with `xts-plain64`, `xts-plain` or `cbc-essiv:sha256`, and key sizes that mode
//!   takes (XTS: 256 or 512 bits, two keys; CBC-ESSIV: 128, 192 or 256 bits). Anything else
//!   is refused for a format, naming what is accepted.

/// The verdict on a cipher specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// On the allow-list: may format a new volume.
    Accepted,
    /// Real encryption, but not what a new volume gets: opens an existing one with a warning.
    Weak(String),
    /// No encryption at all: refused everywhere.
    Null(String),
}

/// Block ciphers with a 64-bit block (kernel crypto API names).
const BLOCK_64: [&str; 6] = ["des", "des3_ede", "blowfish", "cast5", "idea", "tea"];

/// Ciphers and modes a new volume may be formatted with.
pub const CIPHERS: [&str; 3] = ["aes", "serpent", "twofish"];
pub const MODES: [&str; 3] = ["xts-plain64", "xts-plain", "cbc-essiv:sha256"];

/// Judge `cipher` (`aes`) and `mode` (`xts-plain64`), as cryptsetup splits a specification.
pub fn judge(cipher: &str, mode: &str) -> Verdict {
    let c = cipher.to_ascii_lowercase();
    let m = mode.to_ascii_lowercase();
    if c.starts_with("cipher_null") || c == "null" || m.starts_with("null") {
        return Verdict::Null(format!(
            "{cipher}-{mode} does no encryption (cipher_null stores the data in clear)"
        ));
    }
    if m == "ecb" || m.starts_with("ecb-") {
        return Verdict::Weak(format!(
            "{cipher}-{mode} uses ECB, which encrypts equal blocks to equal ciphertext and so \
             shows the data's patterns"
        ));
    }
    if BLOCK_64.contains(&c.as_str()) {
        return Verdict::Weak(format!(
            "{cipher} has a 64-bit block: a volume of a few GiB under one key exceeds its \
             birthday bound"
        ));
    }
    if CIPHERS.contains(&c.as_str()) && MODES.contains(&m.as_str()) {
        return Verdict::Accepted;
    }
    Verdict::Weak(format!(
        "{cipher}-{mode} is not on the list volcrypt formats with (ciphers: {}; modes: {})",
        CIPHERS.join(", "),
        MODES.join(", ")
    ))
}

/// For an accepted cipher, the key sizes (bits) its mode takes, in the order messages list
/// them.
pub fn key_sizes(mode: &str) -> &'static [u32] {
    if mode.to_ascii_lowercase().starts_with("xts") {
        &[256, 512]
    } else {
        &[128, 192, 256]
    }
}

/// Whether `bits` is a key size an accepted `cipher-mode` takes; the message says which are.
pub fn check_key_size(cipher: &str, mode: &str, bits: u32) -> Result<(), String> {
    let sizes = key_sizes(mode);
    if sizes.contains(&bits) {
        return Ok(());
    }
    let list: Vec<String> = sizes.iter().map(u32::to_string).collect();
    Err(format!(
        "{bits} bits is not a key size {cipher}-{mode} takes (accepted: {}{})",
        list.join(", "),
        if mode.starts_with("xts") {
            "; XTS uses two keys, so 256 is AES-128-XTS and 512 is AES-256-XTS"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_ciphers_are_null_whatever_the_mode() {
        for (c, m) in [
            ("cipher_null", "ecb"),
            ("cipher_null", "cbc-plain"),
            ("CIPHER_NULL", "ECB"),
        ] {
            match judge(c, m) {
                Verdict::Null(why) => assert!(why.contains("no encryption"), "{why}"),
                v => panic!("{c}-{m}: {v:?}"),
            }
        }
    }

    #[test]
    fn ecb_and_64_bit_blocks_are_weak_with_a_reason() {
        match judge("aes", "ecb") {
            Verdict::Weak(why) => assert!(why.contains("ECB"), "{why}"),
            v => panic!("{v:?}"),
        }
        for c in ["des3_ede", "blowfish", "cast5", "des"] {
            match judge(c, "cbc-essiv:sha256") {
                Verdict::Weak(why) => assert!(why.contains("64-bit block"), "{why}"),
                v => panic!("{c}: {v:?}"),
            }
        }
        match judge("aes", "cbc-plain") {
            Verdict::Weak(why) => assert!(why.contains("xts-plain64"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn the_documented_ciphers_are_accepted() {
        for c in CIPHERS {
            for m in MODES {
                assert_eq!(judge(c, m), Verdict::Accepted, "{c}-{m}");
            }
        }
    }

    #[test]
    fn key_sizes_follow_the_mode() {
        assert!(check_key_size("aes", "xts-plain64", 256).is_ok());
        assert!(check_key_size("aes", "xts-plain64", 512).is_ok());
        let e = check_key_size("aes", "xts-plain64", 128).unwrap_err();
        assert!(e.contains("accepted: 256, 512"), "{e}");
        assert!(check_key_size("aes", "cbc-essiv:sha256", 256).is_ok());
        assert!(check_key_size("aes", "cbc-essiv:sha256", 192).is_ok());
        let e = check_key_size("aes", "cbc-essiv:sha256", 512).unwrap_err();
        assert!(e.contains("accepted: 128, 192, 256"), "{e}");
    }
}
