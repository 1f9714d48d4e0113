//! Writing a qcow2 (v3) image with LUKS encryption from a raw plaintext image, as qemu reads it
//! (`encrypt.format=luks`): a LUKS1 header in clusters named by the full disk encryption
//! header extension, data clusters encrypted with the IV of their host sector, and clusters
//! of all zeros left unallocated so the image stays as sparse as its input.
//!
//! The layout is fixed before any data is read, so the image is written in one pass:
//!
//! ```text
//! cluster 0            header + extensions (written last, so a failed run leaves no image)
//! refcount table       sized for the largest file this input can produce
//! L1 table
//! LUKS header area     header + key material, rounded up to whole clusters
//! L2 tables            one per L1 entry (an L2 table of a zero region maps nothing)
//! data clusters        only the non-zero clusters of the input, in guest order
//! refcount blocks      every cluster of the file has refcount 1
//! ```

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use rayon::prelude::*;
use zeroize::Zeroizing;

use super::output::{Existing, Outputs};
use super::qcow2::{MAGIC, SECTOR};
use super::{
    EncryptOptions, EncryptReport, Error, StreamOptions, file_size, io_err, open_err,
    refuse_same_file,
};
use crate::crypto::cipher::{CipherSpec, SectorCipher};
use crate::crypto::kdf::KdfLimits;
use crate::luks;
use crate::secret::SecretBytes;

/// qemu's default cluster size.
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// 16-bit refcounts (qemu's default refcount_order 4).
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
const COPIED: u64 = 1 << 63;
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
const HEADER_LENGTH: u32 = 112;
/// Clusters read, checked for zeros and encrypted at a time.
const BATCH_CLUSTERS: usize = 128;

fn clusters(bytes: u64) -> u64 {
    bytes.div_ceil(CLUSTER)
}

/// `image encrypt --format qcow2`.
pub fn encrypt(
    input: &Path,
    output: &Path,
    passphrase: &SecretBytes,
    options: &EncryptOptions,
    limits: &KdfLimits,
    opts: &StreamOptions,
) -> Result<EncryptReport, Error> {
    refuse_same_file("overwrite the input", input, output)?;
    let mut options = options.clone();
    match options.version {
        None | Some(1) => options.version = Some(1),
        Some(v) => {
            return Err(Error::Parameter(format!(
                "--type luks{v}: qcow2 encryption uses a LUKS1 header (the only version qemu \
                 reads inside qcow2)"
            )));
        }
    }
    let mut in_file = File::open(input).map_err(open_err(input))?;
    let size = file_size(&mut in_file).map_err(io_err(input))?;
    if size == 0 {
        return Err(Error::EmptyInput {
            path: input.display().to_string(),
        });
    }
    if !size.is_multiple_of(SECTOR) {
        return Err(Error::NotWholeSectors {
            path: input.display().to_string(),
            size,
            sector_size: SECTOR as u32,
            padded: size.div_ceil(SECTOR) * SECTOR,
        });
    }
    let params = options.resolve(size, false, limits)?;
    let created = luks::create(&params, passphrase.expose(), limits)?;
    let mut outputs = Outputs::default();
    let mut out = outputs.create(output, Existing::Overwrite)?.file;
    in_file.seek(SeekFrom::Start(0)).map_err(io_err(input))?;
    let report = write_image(
        (&mut in_file).take(size),
        &input.display().to_string(),
        size,
        created,
        &params.cipher,
        &mut out,
        output,
        opts,
    )?;
    outputs.keep();
    Ok(report)
}

/// Writes a qcow2-LUKS image of the `size` bytes of plaintext `reader` yields into `out`
/// (a new, empty file), under the freshly `created` LUKS1 header. Plaintext exists only in
/// memory here, a batch of clusters at a time; `image convert` passes a reader that decrypts
/// another image.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_image<R: Read>(
    mut reader: R,
    input_name: &str,
    size: u64,
    created: luks::Created,
    cipher_spec: &CipherSpec,
    out: &mut File,
    output: &Path,
    opts: &StreamOptions,
) -> Result<EncryptReport, Error> {
    let cipher = SectorCipher::new(cipher_spec, created.volume_key.expose())?;
    let summary = created.header_summary.clone();
    // qemu records the LUKS header's length as its payload offset (header + key material).
    let luks_len = created.data_offset.max(created.header.len() as u64);
    let luks_header = created.header;
    drop(created.volume_key);

    // Fixed layout.
    let data_clusters_max = clusters(size);
    let l2_entries = CLUSTER / 8;
    let l1_entries = data_clusters_max.div_ceil(l2_entries);
    let l1_entries_u32 = u32::try_from(l1_entries)
        .map_err(|_| Error::Parameter(format!("{size} bytes is too large for a qcow2 image")))?;
    let l1_clusters = clusters(l1_entries * 8);
    let luks_clusters = clusters(luks_len);
    // Refcount table big enough for every cluster the file can ever have.
    let fixed_without_rt = 1 + l1_clusters + luks_clusters + l1_entries;
    let mut rt_clusters = 1u64;
    loop {
        let before_blocks = fixed_without_rt + rt_clusters + data_clusters_max;
        let blocks = before_blocks.div_ceil(REFCOUNTS_PER_BLOCK.saturating_sub(1).max(1)) + 1;
        let need = clusters(blocks * 8);
        if need <= rt_clusters {
            break;
        }
        rt_clusters = need;
    }
    let rt_offset = CLUSTER;
    let l1_offset = rt_offset + rt_clusters * CLUSTER;
    let luks_offset = l1_offset + l1_clusters * CLUSTER;
    let l2_base = luks_offset + luks_clusters * CLUSTER;
    let data_base = l2_base + l1_entries * CLUSTER;

    let threads = opts
        .threads
        .unwrap_or_else(rayon::current_num_threads)
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Parameter(format!("cannot start {threads} worker threads: {e}")))?;

    let bar = super::stream::progress_bar(opts.progress, size);
    let result = (|| -> Result<u64, Error> {
        let werr = |e| Error::Io {
            path: output.display().to_string(),
            source: e,
        };
        out.seek(SeekFrom::Start(luks_offset)).map_err(werr)?;
        out.write_all(&luks_header).map_err(werr)?;

        // Data: read cluster batches, keep the non-zero clusters, encrypt them with the IV
        // of the host sector they land on, append them.
        let mut l2 = vec![0u64; (l1_entries * l2_entries) as usize];
        let mut next = data_base;
        let mut buf = Zeroizing::new(vec![0u8; BATCH_CLUSTERS * CLUSTER as usize]);
        let mut guest_cluster = 0u64;
        out.seek(SeekFrom::Start(data_base)).map_err(werr)?;
        let mut remaining = size;
        while remaining > 0 {
            let n = remaining.min(buf.len() as u64) as usize;
            reader
                .read_exact(&mut buf[..n])
                .map_err(|source| Error::Io {
                    path: input_name.to_string(),
                    source,
                })?;
            // Pad the last cluster with zeros (never read back: beyond the virtual size).
            let padded = (n as u64).div_ceil(CLUSTER) * CLUSTER;
            buf[n..padded as usize].fill(0);
            let chunk = &mut buf[..padded as usize];
            // Decide the host place of every non-zero cluster, then compact them.
            let mut kept = Vec::new();
            for (k, c) in chunk.chunks(CLUSTER as usize).enumerate() {
                if c.iter().any(|&b| b != 0) {
                    l2[(guest_cluster + k as u64) as usize] =
                        (next + kept.len() as u64 * CLUSTER) | COPIED;
                    kept.push(k);
                }
            }
            for (j, &k) in kept.iter().enumerate() {
                if j != k {
                    let (dst, src) = chunk.split_at_mut(k * CLUSTER as usize);
                    dst[j * CLUSTER as usize..(j + 1) * CLUSTER as usize]
                        .copy_from_slice(&src[..CLUSTER as usize]);
                }
            }
            let data = &mut chunk[..kept.len() * CLUSTER as usize];
            let first = next;
            pool.install(|| {
                data.par_chunks_mut(CLUSTER as usize)
                    .enumerate()
                    .for_each(|(j, c)| {
                        cipher.encrypt(c, SECTOR as usize, (first + j as u64 * CLUSTER) / SECTOR)
                    })
            });
            out.write_all(data).map_err(werr)?;
            next += data.len() as u64;
            guest_cluster += padded / CLUSTER;
            remaining -= n as u64;
            bar.set_position(size - remaining);
        }

        // Refcount blocks after the data: every cluster of the file (including the blocks)
        // has refcount 1.
        let used_before = next / CLUSTER;
        let mut blocks = used_before.div_ceil(REFCOUNTS_PER_BLOCK);
        while (used_before + blocks).div_ceil(REFCOUNTS_PER_BLOCK) > blocks {
            blocks += 1;
        }
        let total = used_before + blocks;
        if blocks * 8 > rt_clusters * CLUSTER {
            return Err(Error::Parameter(
                "internal: the refcount table is too small for the image".into(),
            ));
        }
        let rb_offset = next;
        let mut rt = vec![0u8; (rt_clusters * CLUSTER) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; CLUSTER as usize];
            let first = b * REFCOUNTS_PER_BLOCK;
            let last = (first + REFCOUNTS_PER_BLOCK).min(total);
            for i in first..last {
                let at = ((i - first) * 2) as usize;
                block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            out.write_all(&block).map_err(werr)?;
            let at = (b * 8) as usize;
            rt[at..at + 8].copy_from_slice(&(rb_offset + b * CLUSTER).to_be_bytes());
        }

        // L2 tables, L1 table, refcount table.
        out.seek(SeekFrom::Start(l2_base)).map_err(werr)?;
        let mut table = vec![0u8; CLUSTER as usize];
        for entries in l2.chunks(l2_entries as usize) {
            for (i, e) in entries.iter().enumerate() {
                table[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            out.write_all(&table).map_err(werr)?;
        }
        let mut l1 = vec![0u8; (l1_clusters * CLUSTER) as usize];
        for i in 0..l1_entries {
            let e = (l2_base + i * CLUSTER) | COPIED;
            l1[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
        }
        out.seek(SeekFrom::Start(l1_offset)).map_err(werr)?;
        out.write_all(&l1).map_err(werr)?;
        out.seek(SeekFrom::Start(rt_offset)).map_err(werr)?;
        out.write_all(&rt).map_err(werr)?;
        out.sync_all().map_err(werr)?;

        // The header last: until it is written the file is not a qcow2 image.
        let mut h = vec![0u8; CLUSTER as usize];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[32..36].copy_from_slice(&2u32.to_be_bytes());
        h[36..40].copy_from_slice(&l1_entries_u32.to_be_bytes());
        h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
        h[56..60].copy_from_slice(&u32::try_from(rt_clusters).unwrap_or(u32::MAX).to_be_bytes());
        h[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h[100..104].copy_from_slice(&HEADER_LENGTH.to_be_bytes());
        let ext = HEADER_LENGTH as usize;
        h[ext..ext + 4].copy_from_slice(&EXT_FULL_DISK_ENCRYPTION.to_be_bytes());
        h[ext + 4..ext + 8].copy_from_slice(&16u32.to_be_bytes());
        h[ext + 8..ext + 16].copy_from_slice(&luks_offset.to_be_bytes());
        h[ext + 16..ext + 24].copy_from_slice(&luks_len.to_be_bytes());
        out.seek(SeekFrom::Start(0)).map_err(werr)?;
        out.write_all(&h).map_err(werr)?;
        out.sync_all().map_err(werr)?;
        Ok(size)
    })();
    match &result {
        Ok(_) => bar.finish_and_clear(),
        Err(_) => bar.abandon(),
    }
    let n = result?;
    Ok(EncryptReport {
        summary,
        payload_bytes: n,
        data_offset: data_base,
        sector_size: SECTOR as u32,
    })
}
