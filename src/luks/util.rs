//! Small helpers shared by the LUKS1 and LUKS2 readers.

use std::io::{self, Read, Seek, SeekFrom};

use super::Error;

/// Reads up to `buf.len()` bytes at `offset`; returns how many were available (short at EOF).
pub(crate) fn read_at_most(
    r: &mut (impl Read + Seek),
    offset: u64,
    buf: &mut [u8],
) -> io::Result<usize> {
    r.seek(SeekFrom::Start(offset))?;
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is an invalid header that names
/// `field`, not an I/O error.
pub(crate) fn read_exact_at(
    r: &mut (impl Read + Seek),
    offset: u64,
    buf: &mut [u8],
    header: &'static str,
    field: &str,
) -> Result<(), Error> {
    let got = read_at_most(r, offset, buf)?;
    if got < buf.len() {
        return Err(Error::invalid(
            header,
            field,
            format!(
                "{} bytes at offset {offset} are beyond the end of the file (only {got} available)",
                buf.len()
            ),
        ));
    }
    Ok(())
}

/// Length of the stream (file or device) in bytes.
pub(crate) fn stream_len(r: &mut (impl Read + Seek)) -> io::Result<u64> {
    r.seek(SeekFrom::End(0))
}

/// A fixed-size, NUL-terminated text field: at least one NUL, printable ASCII before it.
pub(crate) fn c_string(bytes: &[u8], header: &'static str, field: &str) -> Result<String, Error> {
    let Some(end) = bytes.iter().position(|&b| b == 0) else {
        return Err(Error::invalid(
            header,
            field,
            format!("not NUL-terminated within its {} bytes", bytes.len()),
        ));
    };
    let text = &bytes[..end];
    if let Some(bad) = text.iter().find(|b| !(0x20..0x7f).contains(*b)) {
        return Err(Error::invalid(
            header,
            field,
            format!("contains a non-printable byte 0x{bad:02x}"),
        ));
    }
    Ok(String::from_utf8_lossy(text).into_owned())
}

/// Writes `text` NUL-padded into a fixed field; fails when it does not fit with its NUL.
pub(crate) fn put_c_string(dst: &mut [u8], text: &str, field: &str) -> Result<(), Error> {
    if text.len() >= dst.len() {
        return Err(Error::BadParameters(format!(
            "{field} {text:?} is longer than {} bytes",
            dst.len() - 1
        )));
    }
    dst.fill(0);
    dst[..text.len()].copy_from_slice(text.as_bytes());
    Ok(())
}

/// Constant-time equality for digests, so timing does not reveal how much of a digest matched.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A version 4 UUID string from the OS RNG.
pub(crate) fn new_uuid() -> Result<String, Error> {
    let mut b = [0u8; 16];
    crate::crypto::random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

pub(crate) fn round_up(value: u64, align: u64) -> Option<u64> {
    value.div_ceil(align).checked_mul(align)
}
