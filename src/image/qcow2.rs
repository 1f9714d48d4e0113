//! Reading qcow2 images whose data is encrypted with LUKS (qemu's `encrypt.format=luks`).
//!
//! Only what decrypting needs is read: the header, its extensions, the active L1 table and the
//! L2 tables it names. Refcounts and snapshots are never used (reading needs neither). The
//! parser is strict because a misread mapping silently produces wrong plaintext: every offset
//! is checked against the file size and the cluster alignment before it is used, and every
//! feature this reader does not implement (backing files, external data files, compressed
//! clusters, the legacy AES method, unknown incompatible feature bits) is refused by name.
//!
//! Encryption rule (qemu is the reference): the LUKS1 header lives in clusters named by the
//! "full disk encryption" header extension; its payload offset is ignored, and each 512-byte
//! sector of a data cluster is encrypted with the LUKS volume key and the IV of the sector's
//! *host* (file) position, `host_offset / 512`, not its guest position.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use serde::Serialize;

/// `QFI\xfb`, the first four bytes of every qcow image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// qcow2 header extension holding the LUKS header's place: offset and length (both u64).
const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
/// Header extension naming an external data file.
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// crypt_method values.
const CRYPT_NONE: u32 = 0;
const CRYPT_AES: u32 = 1;
const CRYPT_LUKS: u32 = 2;

/// Bits 9..=55 of an L1/L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COPIED: u64 = 1 << 63;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// Bits that must be zero in a standard L2 entry (1-8 and 56-61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits that must be zero in an L1 entry (0-8 and 56-62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// The largest L1 table read (qemu's own limit: 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest LUKS header area accepted (a LUKS1 header with 8 keyslots of 4000 stripes of a
/// 512-bit key is about 2 MiB; qemu rounds it up to whole clusters).
const MAX_LUKS_AREA: u64 = 16 << 20;

/// The encryption sector: qemu's LUKS layer encrypts 512-byte sectors.
pub const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A header or table field breaks the format's rules.
    #[error("qcow2 {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A valid qcow2 feature this reader does not process.
    #[error("{0}")]
    Unsupported(String),
    #[error("reading the qcow2 image: {0}")]
    Io(#[from] io::Error),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Whether `r` starts with the qcow magic (position is restored to 0).
pub fn is_qcow(r: &mut (impl Read + Seek)) -> io::Result<bool> {
    let mut m = [0u8; 4];
    r.seek(SeekFrom::Start(0))?;
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut m[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    r.seek(SeekFrom::Start(0))?;
    Ok(got == 4 && m == MAGIC)
}

/// The validated qcow2 header: what reading the guest data needs.
#[derive(Debug, Clone, Serialize)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// Guest (virtual disk) size in bytes.
    pub virtual_size: u64,
    pub l1_entries: u32,
    pub l1_offset: u64,
    pub extended_l2: bool,
    /// The image was not closed cleanly (refcounts may be stale; the mapping is still valid).
    pub dirty: bool,
    pub snapshots: u32,
    /// Where the LUKS header lies in the file.
    pub luks_offset: u64,
    pub luks_length: u64,
    #[serde(skip)]
    file_size: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads exactly `buf.len()` bytes at `offset`, naming what was being read when the file ends.
fn read_exact_at(
    r: &mut (impl Read + Seek),
    offset: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<(), Error> {
    r.seek(SeekFrom::Start(offset))?;
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid(
                what,
                format!("ends beyond the end of the file (at byte {offset})"),
            )
        } else {
            Error::Io(e)
        }
    })
}

impl Qcow2Header {
    /// Reads and validates the header of a qcow2 image of `file_size` bytes.
    pub fn read(r: &mut (impl Read + Seek), file_size: u64) -> Result<Self, Error> {
        let mut fixed = [0u8; 104];
        if file_size < 72 {
            return Err(invalid(
                "header",
                format!("file of {file_size} bytes is too short"),
            ));
        }
        let fixed_len = file_size.min(104) as usize;
        read_exact_at(r, 0, &mut fixed[..fixed_len], "header")?;
        if fixed[..4] != MAGIC {
            return Err(invalid("magic", "not a qcow2 image"));
        }
        let version = be32(&fixed, 4);
        if version == 1 {
            return Err(Error::Unsupported(
                "qcow version 1 images are not supported: convert with qemu-img first".into(),
            ));
        }
        if version != 2 && version != 3 {
            return Err(invalid("version", format!("unsupported version {version}")));
        }
        let backing_file_offset = be64(&fixed, 8);
        let cluster_bits = be32(&fixed, 20);
        let virtual_size = be64(&fixed, 24);
        let crypt_method = be32(&fixed, 32);
        let l1_entries = be32(&fixed, 36);
        let l1_offset = be64(&fixed, 40);
        let snapshots = be32(&fixed, 60);

        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                "cluster_bits",
                format!("{cluster_bits} is outside 9..=21 (512 bytes to 2 MiB)"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, header_length) = if version == 3 {
            if fixed_len < 104 {
                return Err(invalid("header", "version 3 header is truncated"));
            }
            let hl = be32(&fixed, 100);
            if hl < 104 || u64::from(hl) > cluster_size || !hl.is_multiple_of(8) {
                return Err(invalid(
                    "header_length",
                    format!("{hl} (must be 104..={cluster_size}, a multiple of 8)"),
                ));
            }
            (be64(&fixed, 72), hl)
        } else {
            (0, 72)
        };

        if backing_file_offset != 0 {
            return Err(Error::Unsupported(
                "images with a backing file are not supported: flatten with qemu-img convert \
                 first"
                    .into(),
            ));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "qcow2 incompatible feature bits {unknown:#x} are not supported"
            )));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Error::Unsupported(
                "the image is marked corrupt: repair it with `qemu-img check -r all` first".into(),
            ));
        }
        if incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(Error::Unsupported(
                "images with an external data file are not supported: convert with qemu-img \
                 first"
                    .into(),
            ));
        }
        let extended_l2 = incompatible & INCOMPAT_EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(invalid(
                "cluster_bits",
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        match crypt_method {
            CRYPT_LUKS => {}
            CRYPT_NONE => {
                return Err(Error::Unsupported(
                    "the qcow2 image is not encrypted (crypt_method 0): nothing to decrypt; \
                     use qemu-img convert"
                        .into(),
                ));
            }
            CRYPT_AES => {
                return Err(Error::Unsupported(
                    "the qcow2 image uses the legacy AES-CBC encryption (crypt_method 1), which \
                     is insecure and not supported: only LUKS encryption (encrypt.format=luks) is"
                        .into(),
                ));
            }
            m => return Err(invalid("crypt_method", format!("unknown method {m}"))),
        }
        if virtual_size == 0
            || !virtual_size.is_multiple_of(SECTOR)
            || virtual_size > i64::MAX as u64
        {
            return Err(invalid(
                "size",
                format!(
                    "virtual size {virtual_size} is not a positive whole number of 512-byte sectors"
                ),
            ));
        }

        // The L1 table must cover the whole virtual disk and lie inside the file.
        let entries_per_l2 = cluster_size / if extended_l2 { 16 } else { 8 };
        let bytes_per_l1 = cluster_size * entries_per_l2;
        let needed = virtual_size.div_ceil(bytes_per_l1);
        if u64::from(l1_entries) < needed {
            return Err(invalid(
                "l1_size",
                format!("{l1_entries} entries cannot map a virtual size of {virtual_size} bytes"),
            ));
        }
        if u64::from(l1_entries) * 8 > MAX_L1_BYTES {
            return Err(invalid(
                "l1_size",
                format!("{l1_entries} entries is too large"),
            ));
        }
        if needed > 0 {
            check_extent(
                "l1_table_offset",
                l1_offset,
                needed * 8,
                cluster_size,
                file_size,
            )?;
        }

        // Header extensions: from header_length to the end of the first cluster.
        let area_end = cluster_size.min(file_size);
        let area_len = area_end.saturating_sub(u64::from(header_length)) as usize;
        let mut area = vec![0u8; area_len];
        read_exact_at(r, u64::from(header_length), &mut area, "header extensions")?;
        let mut fde = None;
        let mut pos = 0usize;
        loop {
            if pos + 8 > area.len() {
                return Err(invalid(
                    "header extensions",
                    "no end marker inside the first cluster",
                ));
            }
            let kind = be32(&area, pos);
            let len = be32(&area, pos + 4) as usize;
            if kind == 0 {
                break;
            }
            let data = pos + 8;
            let padded = len.div_ceil(8) * 8;
            if data + padded > area.len() {
                return Err(invalid(
                    format!("header extension {kind:#010x}"),
                    format!("length {len} runs past the first cluster"),
                ));
            }
            match kind {
                EXT_FULL_DISK_ENCRYPTION => {
                    if len != 16 {
                        return Err(invalid(
                            "full disk encryption header extension",
                            format!("length {len}, expected 16"),
                        ));
                    }
                    if fde.is_some() {
                        return Err(invalid(
                            "full disk encryption header extension",
                            "appears twice",
                        ));
                    }
                    fde = Some((be64(&area, data), be64(&area, data + 8)));
                }
                EXT_EXTERNAL_DATA_FILE => {
                    return Err(Error::Unsupported(
                        "images with an external data file are not supported: convert with \
                         qemu-img first"
                            .into(),
                    ));
                }
                _ => {}
            }
            pos = data + padded;
        }
        let (luks_offset, luks_length) = fde.ok_or_else(|| {
            invalid(
                "full disk encryption header extension",
                "missing in a LUKS-encrypted image",
            )
        })?;
        if luks_length == 0 || luks_length > MAX_LUKS_AREA {
            return Err(invalid(
                "full disk encryption header extension",
                format!("LUKS header length {luks_length} is outside 1..={MAX_LUKS_AREA}"),
            ));
        }
        check_extent(
            "full disk encryption header extension",
            luks_offset,
            luks_length,
            cluster_size,
            file_size,
        )?;
        if luks_offset == 0 {
            return Err(invalid(
                "full disk encryption header extension",
                "the LUKS header cannot overlap the qcow2 header",
            ));
        }
        Ok(Qcow2Header {
            version,
            cluster_bits,
            cluster_size,
            virtual_size,
            l1_entries,
            l1_offset,
            extended_l2,
            dirty: incompatible & INCOMPAT_DIRTY != 0,
            snapshots,
            luks_offset,
            luks_length,
            file_size,
        })
    }

    /// Guest bytes one L2 table maps.
    fn bytes_per_l2(&self) -> u64 {
        self.cluster_size * self.entries_per_l2()
    }

    fn entries_per_l2(&self) -> u64 {
        self.cluster_size / if self.extended_l2 { 16 } else { 8 }
    }

    /// Reads the L1 entries that cover the virtual disk (validated: reserved bits clear,
    /// L2 tables cluster-aligned inside the file).
    pub fn read_l1(&self, r: &mut (impl Read + Seek)) -> Result<Vec<u64>, Error> {
        let needed = self.virtual_size.div_ceil(self.bytes_per_l2());
        let mut raw = vec![0u8; (needed * 8) as usize];
        read_exact_at(r, self.l1_offset, &mut raw, "L1 table")?;
        let mut out = Vec::with_capacity(needed as usize);
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let e = be64(c, 0);
            if e & L1_RESERVED != 0 {
                return Err(invalid(
                    format!("L1 entry {i}"),
                    format!("reserved bits set ({e:#018x})"),
                ));
            }
            let off = e & OFFSET_MASK;
            if off != 0 {
                check_extent(
                    &format!("L1 entry {i}"),
                    off,
                    self.cluster_size,
                    self.cluster_size,
                    self.file_size,
                )?;
            }
            out.push(off);
        }
        Ok(out)
    }

    /// Decodes one L2 table (at `l2_offset`, 0 = none) into the extents of guest data it maps,
    /// starting at guest offset `guest_base` and clipped to the virtual size.
    pub fn read_l2(
        &self,
        r: &mut (impl Read + Seek),
        l2_offset: u64,
        guest_base: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), Error> {
        let span = self.bytes_per_l2().min(self.virtual_size - guest_base);
        if l2_offset == 0 {
            push(out, Extent::Zero { len: span });
            return Ok(());
        }
        let mut table = vec![0u8; self.cluster_size as usize];
        read_exact_at(r, l2_offset, &mut table, "L2 table")?;
        let clusters = span.div_ceil(self.cluster_size);
        let entry_size = if self.extended_l2 { 16 } else { 8 };
        for k in 0..clusters {
            let at = (k * entry_size) as usize;
            let e = be64(&table, at);
            let guest = guest_base + k * self.cluster_size;
            let len = self.cluster_size.min(self.virtual_size - guest);
            let field = || format!("L2 entry for guest offset {guest}");
            if e & L2_COMPRESSED != 0 {
                return Err(Error::Unsupported(format!(
                    "guest offset {guest} is a compressed cluster: qcow2 does not allow \
                     compressed clusters in encrypted images, refusing to decrypt"
                )));
            }
            if e & L2_RESERVED != 0 {
                return Err(invalid(field(), format!("reserved bits set ({e:#018x})")));
            }
            let zero_flag = e & L2_ZERO != 0;
            if zero_flag && (self.version == 2 || self.extended_l2) {
                return Err(invalid(
                    field(),
                    "bit 0 is set where the format reserves it",
                ));
            }
            let host = e & OFFSET_MASK;
            if host == 0 && e & L2_COPIED != 0 {
                return Err(invalid(
                    field(),
                    "host offset 0 (only valid with an external data file)",
                ));
            }
            if !self.extended_l2 {
                if zero_flag || host == 0 {
                    push(out, Extent::Zero { len });
                } else {
                    check_extent(&field(), host, len, self.cluster_size, self.file_size)?;
                    push(out, Extent::Data { host, len });
                }
                continue;
            }
            let bitmap = be64(&table, at + 8);
            let alloc = bitmap as u32;
            let zeros = (bitmap >> 32) as u32;
            if alloc & zeros != 0 {
                return Err(invalid(
                    field(),
                    format!("subclusters both allocated and zero (bitmap {bitmap:#018x})"),
                ));
            }
            if alloc != 0 && host == 0 {
                return Err(invalid(
                    field(),
                    "allocated subclusters without a host offset",
                ));
            }
            if alloc != 0 {
                // Alignment only: qemu writes allocated subclusters alone, so the file may end
                // inside the host cluster; each allocated subcluster is bounded below.
                check_extent(&field(), host, 0, self.cluster_size, self.file_size)?;
            }
            let sub = self.cluster_size / 32;
            for s in 0..32u64 {
                let start = s * sub;
                if start >= len {
                    break;
                }
                let l = sub.min(len - start);
                if alloc & (1 << s) != 0 {
                    check_extent(&field(), host + start, l, SECTOR, self.file_size)?;
                    push(
                        out,
                        Extent::Data {
                            host: host + start,
                            len: l,
                        },
                    );
                } else {
                    push(out, Extent::Zero { len: l });
                }
            }
        }
        Ok(())
    }
}

/// Checks that `len` bytes at `offset` are cluster-aligned and inside the file.
fn check_extent(
    field: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_size: u64,
) -> Result<(), Error> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(invalid(
            field,
            format!("offset {offset} is not aligned to the {cluster_size}-byte cluster size"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(invalid(
            field,
            format!("{len} bytes at offset {offset} run past the end of the {file_size}-byte file"),
        )),
    }
}

/// A run of guest data, in guest order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Reads as zeros (unallocated or zero clusters).
    Zero { len: u64 },
    /// Encrypted data at this host offset.
    Data { host: u64, len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Zero { len } | Extent::Data { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `e`, merging it with the previous extent when they continue each other (zeros
/// after zeros, data right after data in the file), so that runs are read in large pieces.
fn push(out: &mut Vec<Extent>, e: Extent) {
    match (out.last_mut(), e) {
        (Some(Extent::Zero { len }), Extent::Zero { len: l }) => *len += l,
        (Some(Extent::Data { host, len }), Extent::Data { host: h, len: l })
            if *host + *len == h =>
        {
            *len += l
        }
        _ => out.push(e),
    }
}

/// A window of a file seen as a file of its own: the LUKS header area inside a qcow2 image,
/// whose keyslot offsets are relative to the start of the area.
pub struct Window<'a> {
    file: &'a mut File,
    base: u64,
    len: u64,
    pos: u64,
}

impl<'a> Window<'a> {
    pub fn new(file: &'a mut File, base: u64, len: u64) -> Self {
        Window {
            file,
            base,
            len,
            pos: 0,
        }
    }
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        self.file.seek(SeekFrom::Start(self.base + self.pos))?;
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the LUKS header area",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal valid v3 LUKS-encrypted header: 64 KiB clusters, 1 MiB disk, L1 at cluster 1,
    /// LUKS area at cluster 2, one L2 table at cluster 3.
    fn sample() -> Vec<u8> {
        let cs = 65536usize;
        let mut f = vec![0u8; cs * 5];
        f[..4].copy_from_slice(&MAGIC);
        f[4..8].copy_from_slice(&3u32.to_be_bytes());
        f[20..24].copy_from_slice(&16u32.to_be_bytes());
        f[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        f[32..36].copy_from_slice(&2u32.to_be_bytes());
        f[36..40].copy_from_slice(&1u32.to_be_bytes());
        f[40..48].copy_from_slice(&(cs as u64).to_be_bytes());
        f[96..100].copy_from_slice(&4u32.to_be_bytes());
        f[100..104].copy_from_slice(&112u32.to_be_bytes());
        f[112..116].copy_from_slice(&EXT_FULL_DISK_ENCRYPTION.to_be_bytes());
        f[116..120].copy_from_slice(&16u32.to_be_bytes());
        f[120..128].copy_from_slice(&(2 * cs as u64).to_be_bytes());
        f[128..136].copy_from_slice(&(cs as u64).to_be_bytes());
        // L1[0] -> L2 at cluster 3; L2[1] -> data at cluster 4; L2[2] zero flag.
        f[cs..cs + 8].copy_from_slice(&((3 * cs as u64) | L2_COPIED).to_be_bytes());
        f[3 * cs + 8..3 * cs + 16].copy_from_slice(&((4 * cs as u64) | L2_COPIED).to_be_bytes());
        f[3 * cs + 16..3 * cs + 24].copy_from_slice(&L2_ZERO.to_be_bytes());
        f
    }

    fn extents(bytes: &[u8]) -> Result<Vec<Extent>, Error> {
        let mut c = Cursor::new(bytes);
        let h = Qcow2Header::read(&mut c, bytes.len() as u64)?;
        let l1 = h.read_l1(&mut c)?;
        let mut out = Vec::new();
        for (i, &l2) in l1.iter().enumerate() {
            h.read_l2(&mut c, l2, i as u64 * h.bytes_per_l2(), &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn sample_maps_data_zero_and_unallocated_clusters() {
        let ext = extents(&sample()).expect("valid");
        assert_eq!(
            ext,
            vec![
                Extent::Zero { len: 65536 },
                Extent::Data {
                    host: 4 * 65536,
                    len: 65536
                },
                Extent::Zero {
                    len: (1 << 20) - 2 * 65536
                },
            ]
        );
    }

    #[test]
    fn refusals_name_the_feature() {
        let mut b = sample();
        b[8..16].copy_from_slice(&1000u64.to_be_bytes());
        let e = extents(&b).unwrap_err().to_string();
        assert!(e.contains("backing file"), "{e}");

        let mut b = sample();
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        let e = extents(&b).unwrap_err().to_string();
        assert!(e.contains("legacy AES"), "{e}");

        let mut b = sample();
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let e = extents(&b).unwrap_err().to_string();
        assert!(e.contains("incompatible feature"), "{e}");

        let mut b = sample();
        b[72..80].copy_from_slice(&INCOMPAT_EXTERNAL_DATA.to_be_bytes());
        let e = extents(&b).unwrap_err().to_string();
        assert!(e.contains("external data file"), "{e}");

        let mut b = sample();
        let cs = 65536;
        b[3 * cs + 8..3 * cs + 16].copy_from_slice(&(L2_COMPRESSED | 12345).to_be_bytes());
        let e = extents(&b).unwrap_err().to_string();
        assert!(e.contains("compressed"), "{e}");

        let mut b = sample();
        b[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        let e = extents(&b).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

        /// Corrupting any bytes or truncating the file yields an error or a mapping, never a
        /// panic, and every data extent lies inside the file.
        #[test]
        fn corrupt_or_truncated_images_never_panic(
            edits in proptest::collection::vec((0usize..5 * 65536, proptest::num::u8::ANY), 0..12),
            hot in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 0..6),
            cut in proptest::option::of(0usize..5 * 65536),
        ) {
            let mut b = sample();
            for (at, v) in edits { b[at] = v; }
            for (at, v) in hot { b[at] = v; }
            if let Some(c) = cut { b.truncate(c); }
            if let Ok(ext) = extents(&b) {
                for e in ext {
                    if let Extent::Data { host, len } = e {
                        proptest::prop_assert!(host + len <= b.len() as u64);
                    }
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(mut b in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            if b.len() >= 4 { b[..4].copy_from_slice(&MAGIC); }
            let _ = extents(&b);
        }
    }
}
