//! The streaming sector pipeline behind `image encrypt` and `image decrypt`.
//!
//! Images can be far larger than memory, and the cipher is fast enough that a single core, or
//! a reader that waits for the cipher, would be the bottleneck. So three stages overlap:
//!
//! 1. a reader thread fills chunk buffers taken from a small fixed pool,
//! 2. the calling thread transforms each chunk with every core of a rayon pool (the chunk is
//!    split into sector-aligned pieces, each given the IV of its first sector),
//! 3. a writer thread writes the chunks out in order and returns the buffers to the pool.
//!
//! Memory is bounded by the pool: `IN_FLIGHT` chunks of `chunk_size` bytes, whatever the
//! image size. The buffers hold plaintext, so they are zeroized when dropped.

use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use zeroize::Zeroizing;

/// LUKS counts IVs in 512-byte units whatever the sector size.
pub const IV_UNIT: u64 = 512;

/// Default chunk size: large enough that per-chunk overhead vanishes, small enough that a few
/// in flight stay well under 100 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 8 << 20;

/// Chunk buffers in the pool (one being read, one being transformed, one being written, one
/// spare so no stage waits for another needlessly).
const IN_FLIGHT: usize = 4;

/// Pieces of a chunk handed to the rayon threads. Small enough for good load balancing on
/// many cores, large enough that the cipher runs at full speed inside each.
const PIECE_SIZE: usize = 256 << 10;

/// How to run a stream.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Worker threads for the cipher; `None` = every core the OS gives us.
    pub threads: Option<usize>,
    /// Bytes read, transformed and written at a time (rounded to a multiple of the sector size).
    pub chunk_size: usize,
    /// Draw a progress bar on stderr (callers pass `stderr().is_terminal()`).
    pub progress: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            threads: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            progress: false,
        }
    }
}

/// Where a stream failed: reading its input or writing its output (the transform itself
/// cannot fail; its parameters are checked before the stream starts).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading: {0}")]
    Read(#[source] io::Error),
    #[error("reading: the input ended after {got} of {expected} bytes")]
    ShortInput { got: u64, expected: u64 },
    #[error("writing: {0}")]
    Write(#[source] io::Error),
    #[error("sector size {0} is not a power of two in 512..=4096")]
    BadSectorSize(usize),
    #[error("{len} bytes is not a whole number of {sector_size}-byte sectors")]
    NotWholeSectors { len: u64, sector_size: usize },
    #[error("cannot start {0} worker threads: {1}")]
    Threads(usize, String),
}

/// A chunk on its way through the pipeline: position (for its IV) and bytes.
struct Chunk {
    offset: u64,
    buf: Zeroizing<Vec<u8>>,
}

/// Reads exactly `len` bytes from `reader`, transforms them sector by sector with
/// `op(piece, first_iv)` and writes them to `writer` in order. `piece` is a whole number of
/// sectors; `first_iv` is `iv_base + offset_of_piece / 512`. Returns the bytes written.
pub fn transform<R, W, F>(
    reader: R,
    writer: W,
    len: u64,
    sector_size: usize,
    iv_base: u64,
    opts: &StreamOptions,
    op: F,
) -> Result<u64, StreamError>
where
    R: Read + Send,
    W: Write + Send,
    F: Fn(&mut [u8], u64) + Sync,
{
    if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
        return Err(StreamError::BadSectorSize(sector_size));
    }
    if !len.is_multiple_of(sector_size as u64) {
        return Err(StreamError::NotWholeSectors { len, sector_size });
    }
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("volcrypt-cipher-{i}"))
        .build()
        .map_err(|e| StreamError::Threads(threads, e.to_string()))?;

    let chunk_size = round_to_sectors(opts.chunk_size.max(sector_size), sector_size);
    // Never allocate more than the stream needs: a 1 MiB image gets 1 MiB buffers.
    let buf_size = usize::try_from(len).map_or(chunk_size, |l| l.min(chunk_size));
    let piece_size = round_to_sectors(PIECE_SIZE.max(sector_size), sector_size);

    let bar = progress_bar(opts.progress, len);

    let (free_tx, free_rx) = sync_channel::<Zeroizing<Vec<u8>>>(IN_FLIGHT);
    let (full_tx, full_rx) = sync_channel::<Chunk>(IN_FLIGHT);
    let (done_tx, done_rx) = sync_channel::<Chunk>(IN_FLIGHT);
    if len > 0 {
        for _ in 0..IN_FLIGHT {
            // Cannot fail: the channel has room for IN_FLIGHT buffers and the receiver is alive.
            let _ = free_tx.send(Zeroizing::new(vec![0u8; buf_size]));
        }
    }

    let result = std::thread::scope(|s| {
        let reader_thread = s.spawn(move || read_stage(reader, len, buf_size, free_rx, full_tx));
        let bar_w = bar.clone();
        let writer_thread = s.spawn(move || write_stage(writer, done_rx, free_tx, &bar_w));

        // Transform stage, on this thread, using the rayon pool.
        for mut chunk in full_rx.iter() {
            let base = chunk.offset;
            pool.install(|| {
                chunk
                    .buf
                    .par_chunks_mut(piece_size)
                    .enumerate()
                    .for_each(|(i, piece)| {
                        let off = base + (i * piece_size) as u64;
                        op(piece, iv_base.wrapping_add(off / IV_UNIT));
                    });
            });
            if done_tx.send(chunk).is_err() {
                break; // the writer stopped: its error is reported below
            }
        }
        drop(done_tx);
        let written = writer_thread.join().unwrap_or_else(|_| {
            Err(StreamError::Write(io::Error::other(
                "writer thread panicked",
            )))
        });
        let read = reader_thread.join().unwrap_or_else(|_| {
            Err(StreamError::Read(io::Error::other(
                "reader thread panicked",
            )))
        });
        // A read error is the root cause when both fail (the writer then saw a short stream).
        read?;
        written
    });
    match &result {
        Ok(_) => bar.finish_and_clear(),
        Err(_) => bar.abandon(),
    }
    let written = result?;
    if written != len {
        return Err(StreamError::ShortInput {
            got: written,
            expected: len,
        });
    }
    Ok(written)
}

fn round_to_sectors(n: usize, sector_size: usize) -> usize {
    (n / sector_size).max(1) * sector_size
}

pub(crate) fn progress_bar(enabled: bool, len: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

fn read_stage<R: Read>(
    mut reader: R,
    len: u64,
    buf_size: usize,
    free: Receiver<Zeroizing<Vec<u8>>>,
    full: SyncSender<Chunk>,
) -> Result<(), StreamError> {
    let mut offset = 0u64;
    while offset < len {
        let Ok(mut buf) = free.recv() else {
            return Ok(()); // the writer stopped; it reports why
        };
        let want = usize::try_from(len - offset).map_or(buf_size, |r| r.min(buf_size));
        buf.resize(want, 0);
        let got = read_full(&mut reader, &mut buf).map_err(StreamError::Read)?;
        if got < want {
            return Err(StreamError::ShortInput {
                got: offset + got as u64,
                expected: len,
            });
        }
        if full.send(Chunk { offset, buf }).is_err() {
            return Ok(());
        }
        offset += want as u64;
    }
    Ok(())
}

/// Like `read_exact`, but reports how much was read when the input ends early.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn write_stage<W: Write>(
    mut writer: W,
    done: Receiver<Chunk>,
    free: SyncSender<Zeroizing<Vec<u8>>>,
    bar: &ProgressBar,
) -> Result<u64, StreamError> {
    let mut written = 0u64;
    for chunk in done.iter() {
        writer.write_all(&chunk.buf).map_err(StreamError::Write)?;
        written += chunk.buf.len() as u64;
        bar.set_position(written);
        // The reader may have finished and dropped its receiver: nothing to return then.
        let _ = free.send(chunk.buf);
    }
    writer.flush().map_err(StreamError::Write)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in "cipher" that makes every byte depend on its sector's IV, so any mistake in
    /// IV bookkeeping, ordering or coverage shows up as a mismatch.
    fn fake_op(sector_size: usize) -> impl Fn(&mut [u8], u64) + Sync {
        move |piece: &mut [u8], first_iv: u64| {
            assert_eq!(piece.len() % sector_size, 0, "pieces are whole sectors");
            for (k, sector) in piece.chunks_mut(sector_size).enumerate() {
                let iv = first_iv + (k * sector_size / 512) as u64;
                for (j, b) in sector.iter_mut().enumerate() {
                    *b ^= (iv.wrapping_mul(31).wrapping_add(j as u64) % 251) as u8;
                }
            }
        }
    }

    fn expected(input: &[u8], sector_size: usize, iv_base: u64) -> Vec<u8> {
        let mut out = input.to_vec();
        fake_op(sector_size)(&mut out, iv_base);
        out
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn output_matches_a_single_pass_for_every_chunking_and_thread_count() {
        for &sector in &[512usize, 4096] {
            for &(len, chunk, threads) in &[
                (0usize, 8192usize, 1usize),
                (4096, 4096, 1),
                (1 << 20, 8192, 3),
                (3 << 20, 1 << 20, 2),
                ((5 << 20) + 3 * 4096, 600 * 1024, 4),
            ] {
                let input = pattern(len);
                let mut out = Vec::new();
                let opts = StreamOptions {
                    threads: Some(threads),
                    chunk_size: chunk,
                    progress: false,
                };
                let n = transform(
                    &input[..],
                    &mut out,
                    len as u64,
                    sector,
                    77,
                    &opts,
                    fake_op(sector),
                )
                .expect("stream");
                assert_eq!(n, len as u64);
                assert!(
                    out == expected(&input, sector, 77),
                    "sector {sector} len {len} chunk {chunk} threads {threads}"
                );
            }
        }
    }

    #[test]
    fn a_short_input_is_an_error_naming_the_sizes() {
        let input = pattern(8192);
        let err = transform(
            &input[..],
            Vec::new(),
            16384,
            512,
            0,
            &StreamOptions::default(),
            fake_op(512),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("8192") && msg.contains("16384"), "{msg}");
    }

    #[test]
    fn partial_sectors_and_bad_sector_sizes_are_refused_before_any_work() {
        let input = pattern(1000);
        let e = transform(
            &input[..],
            Vec::new(),
            1000,
            512,
            0,
            &StreamOptions::default(),
            fake_op(512),
        )
        .unwrap_err();
        assert!(
            matches!(e, StreamError::NotWholeSectors { len: 1000, .. }),
            "{e}"
        );
        let e = transform(
            &input[..],
            Vec::new(),
            0,
            1024 + 512,
            0,
            &StreamOptions::default(),
            fake_op(512),
        )
        .unwrap_err();
        assert!(matches!(e, StreamError::BadSectorSize(1536)), "{e}");
    }

    struct FailingWriter;
    impl Write for FailingWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_error_stops_the_pipeline_without_hanging() {
        let input = pattern(4 << 20);
        let opts = StreamOptions {
            threads: Some(2),
            chunk_size: 64 << 10,
            progress: false,
        };
        let e = transform(
            &input[..],
            FailingWriter,
            4 << 20,
            512,
            0,
            &opts,
            fake_op(512),
        )
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
    }

    struct FailingReader(usize);
    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("bad sector"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_read_error_is_reported_as_the_cause() {
        let opts = StreamOptions {
            threads: Some(2),
            chunk_size: 64 << 10,
            progress: false,
        };
        let e = transform(
            FailingReader(200 << 10),
            Vec::new(),
            1 << 20,
            512,
            0,
            &opts,
            fake_op(512),
        )
        .unwrap_err();
        assert!(matches!(e, StreamError::Read(_)), "{e}");
        assert!(e.to_string().contains("bad sector"), "{e}");
    }
}
