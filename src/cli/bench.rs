//! `volcrypt bench`: measures the userspace engine's hot paths on one core and prints ratios
//! measured in the same run (never absolute numbers compared against a stored baseline):
//!
//! - AES-256-XTS on 4 KiB sectors, encrypt and decrypt: volcrypt's engine vs OpenSSL's EVP
//!   aes-256-xts (with `--features bench-openssl`) and vs a one-block-at-a-time XTS;
//! - PBKDF2-HMAC-SHA256 iterations per second vs OpenSSL's PKCS5_PBKDF2_HMAC;
//! - Argon2id time for a fixed cost.
//!
//! Each measurement interleaves the contenders over several repetitions, times them in CPU time
//! of the measuring thread and keeps each one's best repetition: the machine may be shared, and
//! interference only ever slows a run down.
//! The helpers are public so `benches/crypto.rs` (cargo bench) measures exactly the same way.

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::crypto::xts::{Implementation, ReferenceXts, Xts};
use crate::crypto::{Argon2Variant, CipherSpec, HashAlg, Kdf, KdfLimits, SectorCipher};
use crate::error::Error;

/// Options of `volcrypt bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Seconds spent per contender and measurement (split over the repetitions).
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
    /// Repetitions per contender (the best one counts).
    #[arg(long, default_value_t = 10)]
    pub repetitions: u32,
}

/// Sector size of the XTS measurements (LUKS2's default).
pub const SECTOR: usize = 4096;
/// Bytes per timed call: 256 sectors = 1 MiB, which stays in the L2 cache.
pub const BUF: usize = 256 * SECTOR;

/// A contender: a name, the units (bytes, iterations) one call processes, and the call.
pub struct Contender<'a> {
    pub name: String,
    pub units_per_call: f64,
    pub call: Box<dyn FnMut() + 'a>,
}

impl<'a> Contender<'a> {
    pub fn new(name: impl Into<String>, units_per_call: f64, call: impl FnMut() + 'a) -> Self {
        Contender {
            name: name.into(),
            units_per_call,
            call: Box::new(call),
        }
    }
}

/// CPU time consumed by the calling thread. The benchmark rates use it rather than wall time
/// because build machines are shared: time slices lost to other processes are not counted,
/// while both contenders of a ratio are measured the same way.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass; CLOCK_THREAD_CPUTIME_ID exists
    // on every Linux since 2.6.12. On failure ts stays zero and the caller sees no progress
    // in CPU time, bounded by its wall-clock limit.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs the contenders interleaved, `reps` repetitions of about `rep_time` of this thread's CPU
/// time each (at most 10 × `rep_time` of wall time), and returns each one's best rate in units
/// per CPU second.
pub fn measure(contenders: &mut [Contender<'_>], reps: u32, rep_time: Duration) -> Vec<f64> {
    let mut best = vec![0f64; contenders.len()];
    // Warm up (caches, frequency, lazy initialisation).
    for c in contenders.iter_mut() {
        (c.call)();
    }
    for _ in 0..reps.max(1) {
        for (c, b) in contenders.iter_mut().zip(best.iter_mut()) {
            let wall = Instant::now();
            let cpu = thread_cpu_time();
            let mut calls = 0u64;
            let mut used = Duration::ZERO;
            while calls == 0 || (used < rep_time && wall.elapsed() < rep_time * 10) {
                (c.call)();
                calls += 1;
                used = thread_cpu_time().saturating_sub(cpu);
            }
            let secs = if used.is_zero() {
                wall.elapsed().as_secs_f64()
            } else {
                used.as_secs_f64()
            };
            let rate = calls as f64 * c.units_per_call / secs.max(1e-9);
            *b = b.max(rate);
        }
    }
    best
}

/// Deterministic filler so runs are comparable.
pub fn test_data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(131) >> 3) as u8).collect()
}

/// A fixed 64-byte AES-256-XTS key for the benchmark (not secret).
pub fn bench_key() -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect()
}

/// The volcrypt contenders for AES-256-XTS on `SECTOR`-byte sectors of a `BUF` buffer: the engine as
/// LUKS uses it (best implementation), each implementation forced, and the one-block-at-a-time
/// baseline.
pub fn volcrypt_xts_contenders(encrypt: bool) -> Vec<Contender<'static>> {
    let key = bench_key();
    let mut out = Vec::new();
    let cipher = match SectorCipher::new(&CipherSpec::AES_XTS_PLAIN64, &key) {
        Ok(c) => c,
        Err(_) => return out,
    };
    let imp = cipher.xts_implementation().map(|i| i.name()).unwrap_or("?");
    // One buffer shared by the volcrypt contenders (they run one after the other).
    let data = std::rc::Rc::new(std::cell::RefCell::new(test_data(BUF)));
    {
        let d = data.clone();
        out.push(Contender::new(
            format!("volcrypt ({imp})"),
            BUF as f64,
            move || {
                let mut d = d.borrow_mut();
                if encrypt {
                    cipher.encrypt(black_box(&mut d[..]), SECTOR, 0);
                } else {
                    cipher.decrypt(black_box(&mut d[..]), SECTOR, 0);
                }
            },
        ));
    }
    for imp in Implementation::available() {
        let Ok(x) = Xts::with_implementation(&key, imp) else {
            continue;
        };
        let d = data.clone();
        let ivs: Vec<[u8; 16]> = (0..BUF / SECTOR)
            .map(|i| {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&(i as u64 * 8).to_le_bytes());
                b
            })
            .collect();
        out.push(Contender::new(
            format!("  {}", imp.name()),
            BUF as f64,
            move || {
                let mut d = d.borrow_mut();
                if encrypt {
                    x.encrypt_sectors(black_box(&mut d[..]), SECTOR, &ivs);
                } else {
                    x.decrypt_sectors(black_box(&mut d[..]), SECTOR, &ivs);
                }
            },
        ));
    }
    if let Ok(r) = ReferenceXts::new(&key) {
        let d = data.clone();
        out.push(Contender::new(
            "one-block-at-a-time baseline",
            BUF as f64,
            move || {
                let mut d = d.borrow_mut();
                for (i, s) in d.chunks_exact_mut(SECTOR).enumerate() {
                    let mut iv = [0u8; 16];
                    iv[..8].copy_from_slice(&(i as u64 * 8).to_le_bytes());
                    r.crypt_sector(black_box(s), &iv, encrypt);
                }
            },
        ));
    }
    out
}

/// volcrypt's engine (as LUKS uses it) on `sector`-byte sectors of a `BUF` buffer.
pub fn volcrypt_engine_contender(encrypt: bool, sector: usize) -> Option<Contender<'static>> {
    let cipher = SectorCipher::new(&CipherSpec::AES_XTS_PLAIN64, &bench_key()).ok()?;
    let mut data = test_data(BUF);
    Some(Contender::new("volcrypt", BUF as f64, move || {
        if encrypt {
            cipher.encrypt(black_box(&mut data[..]), sector, 0);
        } else {
            cipher.decrypt(black_box(&mut data[..]), sector, 0);
        }
    }))
}

/// PBKDF2-HMAC-SHA256 with volcrypt: a contender doing `iterations` per call.
pub fn volcrypt_pbkdf2_contender<'a>(iterations: u32) -> Contender<'a> {
    Contender::new("volcrypt", f64::from(iterations), move || {
        let mut out = [0u8; 32];
        crate::crypto::pbkdf2(
            HashAlg::Sha256,
            black_box(b"volcrypt benchmark passphrase"),
            &[7u8; 32],
            iterations,
            &mut out,
        );
        black_box(out);
    })
}

fn gbps(rate: f64) -> String {
    format!("{:.2} GB/s", rate / 1e9)
}

/// Prints one comparison line per XTS direction; `extra` adds contenders (OpenSSL) that run
/// interleaved with volcrypt's and are compared against the first (volcrypt) contender.
fn bench_xts(
    args: &BenchArgs,
    extra: &mut dyn FnMut(bool) -> Vec<Contender<'static>>,
) -> Result<(), Error> {
    let rep_time = Duration::from_secs_f64(args.seconds / f64::from(args.repetitions.max(1)));
    for encrypt in [true, false] {
        let dir = if encrypt { "encrypt" } else { "decrypt" };
        let mut contenders = volcrypt_xts_contenders(encrypt);
        let first_extra = contenders.len();
        contenders.extend(extra(encrypt));
        let rates = measure(&mut contenders, args.repetitions, rep_time);
        let ours = rates.first().copied().unwrap_or(0.0);
        println!("aes-256-xts {dir} 4KiB sectors, one core:");
        for (i, (c, r)) in contenders.iter().zip(&rates).enumerate() {
            let ratio = if i == 0 || *r == 0.0 {
                String::new()
            } else if i >= first_extra {
                format!(", volcrypt/{} ratio {:.2}x", c.name, ours / r)
            } else {
                format!(", volcrypt {:.2}x of this", ours / r)
            };
            println!("  {:<32} {}{ratio}", c.name, gbps(*r));
        }
        if let Some(pos) = (first_extra..contenders.len()).next() {
            println!(
                "aes-256-xts {dir} 4KiB: volcrypt {}, {} {}, ratio {:.2}x",
                gbps(ours),
                contenders[pos].name,
                gbps(rates[pos]),
                ours / rates[pos]
            );
        }
    }
    Ok(())
}

/// LUKS1 images (and qemu-img's) use 512-byte sectors: the per-sector overhead shows here.
fn bench_xts_small_sectors(
    args: &BenchArgs,
    extra: &mut dyn FnMut(bool, usize) -> Vec<Contender<'static>>,
) -> Result<(), Error> {
    let rep_time = Duration::from_secs_f64(args.seconds / f64::from(args.repetitions.max(1)));
    for encrypt in [true, false] {
        let dir = if encrypt { "encrypt" } else { "decrypt" };
        let mut contenders: Vec<Contender<'static>> = volcrypt_engine_contender(encrypt, 512)
            .into_iter()
            .collect();
        contenders.extend(extra(encrypt, 512));
        let rates = measure(&mut contenders, args.repetitions, rep_time);
        let ours = rates.first().copied().unwrap_or(0.0);
        print!("aes-256-xts {dir} 512B: volcrypt {}", gbps(ours));
        for (c, r) in contenders.iter().zip(&rates).skip(1) {
            print!(", {} {}, ratio {:.2}x", c.name, gbps(*r), ours / r);
        }
        println!();
    }
    Ok(())
}

fn bench_pbkdf2(
    args: &BenchArgs,
    extra: &mut dyn FnMut(u32) -> Vec<Contender<'static>>,
) -> Result<(), Error> {
    let rep_time = Duration::from_secs_f64(args.seconds / f64::from(args.repetitions.max(1)));
    let iterations = 100_000;
    let mut contenders = vec![volcrypt_pbkdf2_contender(iterations)];
    contenders.extend(extra(iterations));
    let rates = measure(&mut contenders, args.repetitions, rep_time);
    print!("pbkdf2-hmac-sha256: volcrypt {:.0} iterations/s", rates[0]);
    for (c, r) in contenders.iter().zip(&rates).skip(1) {
        print!(
            ", {} {:.0} iterations/s, ratio {:.2}x",
            c.name,
            r,
            rates[0] / r
        );
    }
    println!();
    Ok(())
}

fn bench_argon2() -> Result<(), Error> {
    // A fixed, moderate cost: cryptsetup's default (1 GiB, 4 lanes) would take most of the
    // machine's memory and cores; this one shows the per-core speed.
    let (time, memory_kib, parallel) = (4, 64 * 1024, 1);
    let kdf = Kdf::Argon2 {
        variant: Argon2Variant::Argon2id,
        time,
        memory_kib,
        parallel,
    };
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let key = kdf.derive(b"volcrypt benchmark", &[5u8; 32], 64, &KdfLimits::default())?;
        black_box(key);
        best = best.min(start.elapsed());
    }
    println!(
        "argon2id t={time} m={memory_kib}KiB p={parallel}: {:.0} ms ({:.0} MiB/s of memory passes)",
        best.as_secs_f64() * 1e3,
        f64::from(time) * f64::from(memory_kib) / 1024.0 / best.as_secs_f64()
    );
    Ok(())
}

/// Runs every measurement and prints the results.
pub fn run(args: BenchArgs) -> Result<(), Error> {
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(Error::Usage(format!(
            "--seconds must be a positive number, not {}",
            args.seconds
        )));
    }
    println!(
        "XTS implementations on this CPU (preferred first): {}",
        Implementation::available()
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    #[cfg(feature = "bench-openssl")]
    {
        bench_xts(&args, &mut |enc| vec![openssl_side::xts_contender(enc)])?;
        bench_xts_small_sectors(&args, &mut |enc, sector| {
            vec![openssl_side::xts_contender_sized(enc, sector)]
        })?;
        bench_pbkdf2(&args, &mut |n| vec![openssl_side::pbkdf2_contender(n)])?;
    }
    #[cfg(not(feature = "bench-openssl"))]
    {
        println!(
            "(OpenSSL comparison needs a build with `--features bench-openssl`; absolute numbers only)"
        );
        bench_xts(&args, &mut |_| Vec::new())?;
        bench_xts_small_sectors(&args, &mut |_, _| Vec::new())?;
        bench_pbkdf2(&args, &mut |_| Vec::new())?;
    }
    bench_argon2()?;
    crate::image::bench::print_whole_image_comparison()
}

/// The OpenSSL side of the comparisons, linked only with `--features bench-openssl`.
#[cfg(feature = "bench-openssl")]
pub mod openssl_side {
    use std::hint::black_box;

    use openssl::cipher::Cipher;
    use openssl::cipher_ctx::CipherCtx;

    use super::{BUF, Contender, SECTOR, bench_key, test_data};

    /// OpenSSL EVP aes-256-xts on 4 KiB sectors.
    pub fn xts_contender(encrypt: bool) -> Contender<'static> {
        xts_contender_sized(encrypt, SECTOR)
    }

    /// OpenSSL EVP aes-256-xts, key set once, IV set per `sector`-byte sector (as cryptsetup
    /// does).
    pub fn xts_contender_sized(encrypt: bool, sector: usize) -> Contender<'static> {
        let key = bench_key();
        let mut data = test_data(BUF);
        let mut ctx = CipherCtx::new().ok();
        if let Some(c) = ctx.as_mut() {
            let r = if encrypt {
                c.encrypt_init(Some(Cipher::aes_256_xts()), Some(&key), None)
            } else {
                c.decrypt_init(Some(Cipher::aes_256_xts()), Some(&key), None)
            };
            if r.is_err() {
                ctx = None;
            }
        }
        Contender::new("openssl", BUF as f64, move || {
            let Some(c) = ctx.as_mut() else { return };
            let step = (sector / 512) as u64;
            for (i, s) in data.chunks_exact_mut(sector).enumerate() {
                let mut iv = [0u8; 16];
                iv[..8].copy_from_slice(&(i as u64 * step).to_le_bytes());
                let ok = if encrypt {
                    c.encrypt_init(None, None, Some(&iv))
                } else {
                    c.decrypt_init(None, None, Some(&iv))
                };
                if ok.is_ok() {
                    let _ = c.cipher_update_inplace(black_box(s), sector);
                }
            }
        })
    }

    /// OpenSSL PKCS5_PBKDF2_HMAC with SHA-256.
    pub fn pbkdf2_contender(iterations: u32) -> Contender<'static> {
        Contender::new("openssl", f64::from(iterations), move || {
            let mut out = [0u8; 32];
            let _ = openssl::pkcs5::pbkdf2_hmac(
                black_box(b"volcrypt benchmark passphrase"),
                &[7u8; 32],
                iterations as usize,
                openssl::hash::MessageDigest::sha256(),
                &mut out,
            );
            black_box(out);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_reports_a_rate_for_every_contender() {
        let mut n = 0u64;
        let mut m = 0u64;
        let mut cs = vec![
            Contender::new("a", 1.0, || n += 1),
            Contender::new("b", 2.0, || m += 1),
        ];
        let rates = measure(&mut cs, 2, Duration::from_millis(5));
        assert_eq!(rates.len(), 2);
        assert!(rates.iter().all(|r| *r > 0.0 && r.is_finite()), "{rates:?}");
    }

    #[test]
    fn xts_contenders_cover_engine_every_implementation_and_baseline() {
        let cs = volcrypt_xts_contenders(true);
        assert_eq!(cs.len(), 2 + Implementation::available().len());
        assert!(cs[0].name.starts_with("volcrypt"));
        assert!(cs.last().is_some_and(|c| c.name.contains("baseline")));
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - before < Duration::from_millis(2) {
            x = black_box(x.wrapping_add(1));
        }
        assert!(x > 0);
    }
}
