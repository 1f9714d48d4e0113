//! The 4096-byte LUKS2 binary header (one per copy) and its checksum.

use super::super::{Error, LUKS_MAGIC, util};
use crate::crypto::hash::HashAlg;

const H: &str = "LUKS2";
pub const BINARY_LEN: usize = 4096;
pub const SECONDARY_MAGIC: [u8; 6] = *b"SKUL\xba\xbe";
/// Every allowed hdr_size (binary + JSON), which is also where a secondary copy may sit.
pub const HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];
const OFF_HDR_SIZE: usize = 8;
const OFF_SEQID: usize = 16;
const OFF_LABEL: usize = 24;
const OFF_CSUM_ALG: usize = 72;
const OFF_SALT: usize = 104;
const OFF_UUID: usize = 168;
const OFF_SUBSYSTEM: usize = 208;
const OFF_HDR_OFFSET: usize = 256;
pub const OFF_CSUM: usize = 0x1C0;
pub const CSUM_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryHeader {
    pub primary: bool,
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: String,
    pub csum_alg: String,
    pub salt: [u8; 64],
    pub uuid: String,
    pub subsystem: String,
    pub hdr_offset: u64,
    pub csum: [u8; CSUM_LEN],
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Human name of a copy for messages.
pub fn copy_name(primary: bool, offset: u64) -> String {
    if primary {
        "primary copy".to_string()
    } else {
        format!("secondary copy at offset {offset}")
    }
}

impl BinaryHeader {
    /// Parses one copy read at `offset`. Wrong magic is `NotLuks` (no copy there).
    pub fn parse(b: &[u8], offset: u64, primary: bool) -> Result<Self, Error> {
        let magic = if primary { LUKS_MAGIC } else { SECONDARY_MAGIC };
        if b.len() < BINARY_LEN || b[..6] != magic {
            return Err(Error::NotLuks);
        }
        let copy = copy_name(primary, offset);
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 2 {
            return Err(Error::invalid(
                H,
                "version",
                format!("{copy}: {version} is not 2"),
            ));
        }
        let hdr_size = be64(b, OFF_HDR_SIZE);
        if !HDR_SIZES.contains(&hdr_size) {
            return Err(Error::invalid(
                H,
                "hdr_size",
                format!("{copy}: {hdr_size} is not a power of two between 16 KiB and 4 MiB"),
            ));
        }
        let hdr_offset = be64(b, OFF_HDR_OFFSET);
        if hdr_offset != offset {
            return Err(Error::invalid(
                H,
                "hdr_offset",
                format!("{copy}: {hdr_offset} does not match where the copy was read ({offset})"),
            ));
        }
        if !primary && hdr_offset != hdr_size {
            return Err(Error::invalid(
                H,
                "hdr_offset",
                format!("{copy}: a secondary copy must sit at hdr_size ({hdr_size})"),
            ));
        }
        let label = util::c_string(&b[OFF_LABEL..OFF_CSUM_ALG], H, "label")?;
        let csum_alg = util::c_string(&b[OFF_CSUM_ALG..OFF_SALT], H, "checksum_alg")?;
        let uuid = util::c_string(&b[OFF_UUID..OFF_SUBSYSTEM], H, "uuid")?;
        let subsystem = util::c_string(&b[OFF_SUBSYSTEM..OFF_HDR_OFFSET], H, "subsystem")?;
        let mut salt = [0u8; 64];
        salt.copy_from_slice(&b[OFF_SALT..OFF_SALT + 64]);
        let mut csum = [0u8; CSUM_LEN];
        csum.copy_from_slice(&b[OFF_CSUM..OFF_CSUM + CSUM_LEN]);
        Ok(BinaryHeader {
            primary,
            hdr_size,
            seqid: be64(b, OFF_SEQID),
            label,
            csum_alg,
            salt,
            uuid,
            subsystem,
            hdr_offset,
            csum,
        })
    }

    /// Serialises this copy with the checksum over `json` (hdr_size - 4096 bytes).
    pub fn encode(&self, json: &[u8]) -> Result<Vec<u8>, Error> {
        let mut b = vec![0u8; BINARY_LEN];
        b[..6].copy_from_slice(if self.primary {
            &LUKS_MAGIC
        } else {
            &SECONDARY_MAGIC
        });
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&self.hdr_size.to_be_bytes());
        b[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&self.seqid.to_be_bytes());
        util::put_c_string(&mut b[OFF_LABEL..OFF_CSUM_ALG], &self.label, "label")?;
        util::put_c_string(
            &mut b[OFF_CSUM_ALG..OFF_SALT],
            &self.csum_alg,
            "checksum_alg",
        )?;
        b[OFF_SALT..OFF_SALT + 64].copy_from_slice(&self.salt);
        util::put_c_string(&mut b[OFF_UUID..OFF_SUBSYSTEM], &self.uuid, "uuid")?;
        util::put_c_string(
            &mut b[OFF_SUBSYSTEM..OFF_HDR_OFFSET],
            &self.subsystem,
            "subsystem",
        )?;
        b[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&self.hdr_offset.to_be_bytes());
        let alg = HashAlg::from_name(&self.csum_alg)?;
        let sum = checksum(alg, &b, json);
        b[OFF_CSUM..OFF_CSUM + sum.len()].copy_from_slice(&sum);
        b.extend_from_slice(json);
        Ok(b)
    }
}

/// Checksum over the binary header (csum field zeroed) followed by the JSON area.
pub fn checksum(alg: HashAlg, binary: &[u8], json: &[u8]) -> Vec<u8> {
    let mut zeroed = binary[..BINARY_LEN].to_vec();
    zeroed[OFF_CSUM..OFF_CSUM + CSUM_LEN].fill(0);
    alg.digest(&[&zeroed, json])
}

/// Verifies the stored checksum of one copy.
pub fn verify_checksum(bin: &BinaryHeader, binary: &[u8], json: &[u8]) -> Result<(), Error> {
    let copy = copy_name(bin.primary, bin.hdr_offset);
    let alg = HashAlg::from_name(&bin.csum_alg)
        .map_err(|e| Error::invalid(H, "checksum_alg", format!("{copy}: {e}")))?;
    let sum = checksum(alg, binary, json);
    if sum.len() > CSUM_LEN || !util::ct_eq(&sum, &bin.csum[..sum.len()]) {
        return Err(Error::invalid(
            H,
            "checksum",
            format!("{copy}: {} checksum mismatch", bin.csum_alg),
        ));
    }
    Ok(())
}
