//! AES-CBC over whole sectors (dm-crypt's `aes-cbc-*` modes): each sector is chained from its
//! own IV block, independently of the others.

use super::xts::AesAny;

/// Blocks decrypted per bulk call (CBC decryption is parallel; encryption is inherently serial).
const RUN: usize = 64;

/// Encrypts one sector in place, chaining from `iv`.
pub(crate) fn encrypt_sector(key: &AesAny, sector: &mut [u8], iv: &[u8; 16]) {
    let (blocks, _) = aes::Block::slice_as_chunks_mut(sector);
    let mut prev = *iv;
    for b in blocks.iter_mut() {
        for (x, p) in b.iter_mut().zip(prev.iter()) {
            *x ^= p;
        }
        key.encrypt_blocks(std::slice::from_mut(b));
        prev.copy_from_slice(b);
    }
}

/// Decrypts one sector in place, chaining from `iv`.
pub(crate) fn decrypt_sector(key: &AesAny, sector: &mut [u8], iv: &[u8; 16]) {
    let (blocks, _) = aes::Block::slice_as_chunks_mut(sector);
    let mut prev = *iv;
    let mut saved = [[0u8; 16]; RUN];
    for run in blocks.chunks_mut(RUN) {
        for (s, b) in saved.iter_mut().zip(run.iter()) {
            s.copy_from_slice(b);
        }
        key.decrypt_blocks(run);
        for (i, b) in run.iter_mut().enumerate() {
            let chain = if i == 0 { &prev } else { &saved[i - 1] };
            for (x, c) in b.iter_mut().zip(chain.iter()) {
                *x ^= c;
            }
        }
        prev = saved[run.len() - 1];
    }
    zeroize::Zeroize::zeroize(&mut saved);
}
