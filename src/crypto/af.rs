//! The LUKS anti-forensic information splitter (LUKS1 spec §2.4, "AF-splitter"): a key is
//! stored as `stripes` blocks of which all are needed to recover it, so that erasing any part
//! of the key material destroys the key.
//!
//! Diffusion H over a block: the block is cut into digest-sized chunks; chunk i becomes
//! hash(be32(i) || chunk), truncated for the last, shorter chunk.
//! Split: s_0..s_{n-2} random, d = 0, d = H(d ⊕ s_i) for each, s_{n-1} = d ⊕ key.
//! Merge: the same chain, then key = d ⊕ s_{n-1}.

use zeroize::Zeroizing;

use super::hash::HashAlg;
use super::{Error, random_bytes};
use crate::secret::SecretBytes;

/// Largest split material we agree to handle (LUKS uses 4000 stripes × ≤ 64-byte keys = 256 KB).
pub const MAX_MATERIAL_BYTES: usize = 64 * 1024 * 1024;

fn material_len(key_len: usize, stripes: u32) -> Result<usize, Error> {
    if key_len == 0 || stripes == 0 {
        return Err(Error::InvalidAfParameters(format!(
            "key length {key_len} and stripes {stripes} must both be non-zero"
        )));
    }
    match key_len.checked_mul(stripes as usize) {
        Some(n) if n <= MAX_MATERIAL_BYTES => Ok(n),
        _ => Err(Error::InvalidAfParameters(format!(
            "key length {key_len} × stripes {stripes} exceeds {MAX_MATERIAL_BYTES} bytes"
        ))),
    }
}

/// The diffusion function H, in place.
fn diffuse(block: &mut [u8], hash: HashAlg) {
    let dl = hash.output_len();
    for (i, chunk) in block.chunks_mut(dl).enumerate() {
        let index = (i as u32).to_be_bytes();
        let mut d = Zeroizing::new(hash.digest(&[&index, chunk]));
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
        zeroize::Zeroize::zeroize(&mut *d);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Splits `key` into `stripes` blocks (returned concatenated, `key.len() * stripes` bytes), the
/// first `stripes - 1` drawn from the OS RNG.
pub fn af_split(key: &[u8], stripes: u32, hash: HashAlg) -> Result<Zeroizing<Vec<u8>>, Error> {
    let total = material_len(key.len(), stripes)?;
    let kl = key.len();
    let mut out = Zeroizing::new(vec![0u8; total]);
    let last = total - kl;
    random_bytes(&mut out[..last])?;
    let mut d = Zeroizing::new(vec![0u8; kl]);
    for stripe in out[..last].chunks(kl) {
        xor_into(&mut d, stripe);
        diffuse(&mut d, hash);
    }
    xor_into(&mut d, key);
    out[last..].copy_from_slice(&d);
    Ok(out)
}

/// Recovers a `key_len`-byte key from split `material` (at least `key_len * stripes` bytes;
/// anything after that, such as sector padding, is ignored).
pub fn af_merge(
    material: &[u8],
    key_len: usize,
    stripes: u32,
    hash: HashAlg,
) -> Result<SecretBytes, Error> {
    let total = material_len(key_len, stripes)?;
    if material.len() < total {
        return Err(Error::InvalidAfParameters(format!(
            "key material is {} bytes, {key_len} × {stripes} stripes need {total}",
            material.len()
        )));
    }
    let last = total - key_len;
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for stripe in material[..last].chunks(key_len) {
        xor_into(&mut d, stripe);
        diffuse(&mut d, hash);
    }
    xor_into(&mut d, &material[last..total]);
    Ok(SecretBytes::new(d.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_recovers_the_key_for_every_hash() {
        for hash in HashAlg::ALL {
            // 64-byte key with sha1 exercises a short last diffusion chunk (64 = 3×20 + 4).
            for kl in [16, 32, 64] {
                let key: Vec<u8> = (0..kl as u8).collect();
                let m = af_split(&key, 4000, hash).unwrap();
                assert_eq!(m.len(), kl * 4000);
                assert_eq!(af_merge(&m, kl, 4000, hash).unwrap().expose(), &key[..]);
                // Any flipped bit in any stripe destroys the key.
                let mut bad = m.to_vec();
                bad[kl * 1234 + 3] ^= 1;
                assert_ne!(af_merge(&bad, kl, 4000, hash).unwrap().expose(), &key[..]);
            }
        }
    }

    #[test]
    fn merge_with_one_stripe_is_identity_and_short_material_is_refused() {
        let key = [7u8; 32];
        assert_eq!(
            af_merge(&key, 32, 1, HashAlg::Sha256).unwrap().expose(),
            &key
        );
        assert!(af_merge(&key, 32, 2, HashAlg::Sha256).is_err());
        assert!(af_merge(&key, 0, 2, HashAlg::Sha256).is_err());
        assert!(af_split(&key, 0, HashAlg::Sha256).is_err());
        assert!(af_merge(&key, usize::MAX, u32::MAX, HashAlg::Sha256).is_err());
    }

    #[test]
    fn diffusion_matches_the_luks1_definition() {
        // Two stripes of a 40-byte key with sha1: key = H(s0) ⊕ s1 where H hashes
        // be32(0)||s0[0..20] and be32(1)||s0[20..40].
        let s0: Vec<u8> = (0..40u8).collect();
        let s1 = vec![0x55u8; 40];
        let mut m = s0.clone();
        m.extend_from_slice(&s1);
        let got = af_merge(&m, 40, 2, HashAlg::Sha1).unwrap();
        let mut want = HashAlg::Sha1.digest(&[&0u32.to_be_bytes(), &s0[..20]]);
        want.extend(HashAlg::Sha1.digest(&[&1u32.to_be_bytes(), &s0[20..]]));
        xor_into(&mut want, &s1);
        assert_eq!(got.expose(), &want[..]);
    }
}
