//! Whole-image throughput: the streaming pipeline with all cores vs one core, for
//! `volcrypt bench`. The payload comes from memory and goes to a sink, so the
//! numbers measure the cipher and the pipeline, not the disk.

use std::io;
use std::time::Instant;

use crate::crypto::cipher::{CipherSpec, SectorCipher};

use super::stream::{StreamError, StreamOptions};

/// One measured run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Worker threads used.
    pub threads: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl Throughput {
    pub fn bytes_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds
        } else {
            f64::INFINITY
        }
    }
}

/// Decrypts `total_bytes` of (meaningless) ciphertext with `threads` workers (`None` = all
/// cores) through the same pipeline `image decrypt` uses, and times it.
pub fn decrypt_throughput(
    spec: &CipherSpec,
    key: &[u8],
    total_bytes: u64,
    sector_size: usize,
    threads: Option<usize>,
) -> Result<Throughput, BenchError> {
    let cipher = SectorCipher::new(spec, key)?;
    let threads_used = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let opts = StreamOptions {
        threads: Some(threads_used),
        ..StreamOptions::default()
    };
    let len = total_bytes / sector_size as u64 * sector_size as u64;
    let start = Instant::now();
    let bytes = super::decrypt_to(
        io::Read::take(io::repeat(0x5a), len),
        io::sink(),
        &cipher,
        len,
        sector_size,
        0,
        &opts,
    )?;
    Ok(Throughput {
        threads: threads_used,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Crypto(#[from] crate::crypto::Error),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Best of `reps` runs of [`decrypt_throughput`] (wall time: the run is multi-threaded, and
/// interference from other processes only ever slows a run down).
pub fn best_decrypt_throughput(
    spec: &CipherSpec,
    key: &[u8],
    total_bytes: u64,
    sector_size: usize,
    threads: Option<usize>,
    reps: u32,
) -> Result<Throughput, BenchError> {
    let mut best = decrypt_throughput(spec, key, total_bytes, sector_size, threads)?;
    for _ in 1..reps.max(1) {
        let t = decrypt_throughput(spec, key, total_bytes, sector_size, threads)?;
        if t.bytes_per_second() > best.bytes_per_second() {
            best = t;
        }
    }
    Ok(best)
}

/// The whole-image section of `volcrypt bench`: AES-256-XTS decrypt through the streaming
/// pipeline with one core and with all cores, and their ratio.
pub fn print_whole_image_comparison() -> Result<(), crate::error::Error> {
    let to_error = |e: BenchError| match e {
        BenchError::Crypto(c) => crate::error::Error::Crypto(c),
        BenchError::Stream(s) => crate::error::Error::Usage(format!("whole-image benchmark: {s}")),
    };
    let spec = CipherSpec::parse("aes-xts-plain64")?;
    // A fixed, non-secret benchmark key.
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(3))
        .collect();
    let total = 512u64 << 20;
    // Warm-up: page in the chunk buffers, start the pools.
    decrypt_throughput(&spec, &key, 32 << 20, 4096, None).map_err(to_error)?;
    let one = best_decrypt_throughput(&spec, &key, total, 4096, Some(1), 3).map_err(to_error)?;
    let all = best_decrypt_throughput(&spec, &key, total, 4096, None, 3).map_err(to_error)?;
    println!();
    println!(
        "Whole-image decrypt (aes-xts-plain64 512-bit, 4 KiB sectors, 8 MiB chunks, memory to sink, best of 3 x {} MiB):",
        total >> 20
    );
    println!("  1 core:  {:.2} GB/s", one.bytes_per_second() / 1e9);
    println!(
        "  {} cores: {:.2} GB/s",
        all.threads,
        all.bytes_per_second() / 1e9
    );
    println!(
        "  all cores vs one core: {:.2}x",
        all.bytes_per_second() / one.bytes_per_second()
    );
    Ok(())
}
