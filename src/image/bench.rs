//! Whole-image throughput: the streaming pipeline with all cores vs one core, for
//! `volcrypt bench` (issue 2 §6). The payload comes from memory and goes to a sink, so the
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
