//! `volcrypt image …`: userspace LUKS container commands (no root, no device-mapper).
//!
//! Option names follow cryptsetup's where the meaning is the same, so operators can carry
//! their habits over; exit codes are cryptsetup's (see `crate::error`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};

use crate::crypto::kdf::KdfLimits;
use crate::error::Error;
use crate::image::{self, EncryptOptions, Output, StreamOptions, params::PbkdfType};
use crate::secret::{self, SecretBytes, SecretType};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Detect and validate a LUKS1/LUKS2 header (raw, or inside a qcow2 image) and print what
    /// it holds (exit 1 if invalid).
    Inspect {
        /// The image (or device) holding the header, or the payload when --header is given.
        image: PathBuf,
        #[command(flatten)]
        header: HeaderArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        glance: GlanceArgs,
        /// The Barbican secret id to put in os_encrypt_key_id (with --glance-properties).
        #[arg(long, value_name = "ID", requires = "glance_properties")]
        os_encrypt_key_id: Option<String>,
    },
    /// Check a Glance property set (JSON object: disk_format, container_format, os_encrypt_*,
    /// os_decrypt_*; legacy cinder_* names accepted with a note) against an encrypted image;
    /// names every disagreement (exit 6) and prints the findings as JSON.
    CheckProperties {
        /// The encrypted image (raw LUKS or qcow2-LUKS).
        image: PathBuf,
        /// The property set (`-` for standard input).
        properties: PathBuf,
    },
    /// Check a key against the keyslots; report the slot that accepts it (exit 2 if none).
    CheckKey {
        /// LUKS image or block device (only the payload when --header is given).
        image: PathBuf,
        #[command(flatten)]
        header: HeaderArg,
        #[command(flatten)]
        key: KeyArgs,
        /// Try only this keyslot.
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Write the decrypted payload (byte-exact) to a file or to standard output; for a qcow2
    /// image, the raw guest disk.
    Decrypt(Box<DecryptArgs>),
    /// Write a LUKS container holding INPUT (whose size must be whole sectors). Defaults are
    /// cryptsetup 2.6's: LUKS2, aes-xts-plain64, 512-bit key, argon2id, 2000 ms, 4096-byte
    /// sectors when the size allows.
    Encrypt(Box<EncryptArgs>),
    /// Convert an encrypted image between raw LUKS and qcow2-LUKS (either direction), into a
    /// new file or onto a block device (which gets raw LUKS), keeping the key: the same
    /// passphrase or secret opens the result, whose header wraps the source's volume key.
    /// Streams in memory: no plaintext is ever written to disk. Cipher, key size and (where
    /// the format allows) sector size and LUKS version are the source's.
    Convert(Box<ConvertArgs>),
    /// Check every keyslot the key opens (and the keyless facts of the others), the
    /// volume-key digest, that the whole payload decrypts and, with --plaintext, that it holds
    /// exactly that plaintext. Exit 0 verified, 6 a difference or damage found, 7 cannot
    /// verify (no keyslot accepts the key, cipher not in the userspace engine).
    Verify(Box<VerifyArgs>),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// LUKS image or block device (only the payload when --header is given).
    pub image: PathBuf,
    #[command(flatten)]
    pub header: HeaderArg,
    #[command(flatten)]
    pub key: KeyArgs,
    /// The plaintext the container must hold, byte for byte (e.g. the raw image it was made
    /// from); the first differing sector is reported.
    #[arg(long, value_name = "FILE")]
    pub plaintext: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub threads: ThreadArgs,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// LUKS image or block device (only the payload when --header is given).
    pub image: PathBuf,
    #[command(flatten)]
    pub header: HeaderArg,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Try only this keyslot.
    #[arg(long, value_name = "N")]
    pub key_slot: Option<u32>,
    /// Output file, or `-` for standard output. Never the image itself.
    #[arg(long, short = 'o', value_name = "FILE|-")]
    pub output: PathBuf,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub threads: ThreadArgs,
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Plaintext image (e.g. raw disk image). Its size must be a multiple of the sector size.
    pub input: PathBuf,
    /// The container to write (with --header: the encrypted payload only, at offset 0).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Write a detached header to FILE.
    #[arg(long, value_name = "FILE")]
    pub header: Option<PathBuf>,
    /// Container format: raw LUKS, or a qcow2 (v3) image with LUKS1 encryption as qemu
    /// writes it (`encrypt.format=luks`; 64 KiB clusters, all-zero clusters unallocated).
    #[arg(long, value_enum, default_value = "raw")]
    pub format: ImageFormat,
    #[command(flatten)]
    pub keyslot: KeyslotArgs,
    /// Cipher specification, e.g. aes-xts-plain64, aes-cbc-essiv:sha256.
    #[arg(long, short = 'c', value_name = "SPEC")]
    pub cipher: Option<String>,
    /// Volume key size in bits (aes-xts: 256 or 512).
    #[arg(long, short = 's', value_name = "BITS")]
    pub key_size: Option<u32>,
    /// Encryption sector size (LUKS2: 512, 1024, 2048, 4096).
    #[arg(long, value_name = "BYTES")]
    pub sector_size: Option<u32>,
    /// LUKS2 label.
    #[arg(long)]
    pub label: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub threads: ThreadArgs,
    #[command(flatten)]
    pub glance: GlanceArgs,
}

/// The header and keyslot a written image gets (`encrypt`, `convert`): the options cryptsetup's
/// `luksFormat` has for them.
#[derive(Debug, Args)]
pub struct KeyslotArgs {
    /// LUKS version (encrypt: luks2; convert: the source's; qcow2 is always LUKS1).
    #[arg(long = "type", value_enum, value_name = "luks1|luks2")]
    pub luks_type: Option<LuksType>,
    /// Hash for PBKDF2, the AF splitter and the key digest.
    #[arg(long, value_name = "HASH")]
    pub hash: Option<String>,
    /// KDF of the keyslot (default: argon2id for LUKS2, pbkdf2 for LUKS1).
    #[arg(long, value_enum)]
    pub pbkdf: Option<PbkdfType>,
    /// Benchmark the KDF cost so that unlocking takes about MS milliseconds.
    #[arg(
        long,
        short = 'i',
        value_name = "MS",
        conflicts_with = "pbkdf_iterations"
    )]
    pub iter_time: Option<u64>,
    /// Fixed KDF cost: PBKDF2 iterations or Argon2 time cost (no benchmark).
    #[arg(long, value_name = "N", alias = "pbkdf-force-iterations")]
    pub pbkdf_iterations: Option<u32>,
    /// Argon2 memory cost in KiB.
    #[arg(long, value_name = "KIB")]
    pub pbkdf_memory: Option<u32>,
    /// Argon2 parallel threads.
    #[arg(long, value_name = "N")]
    pub pbkdf_parallel: Option<u32>,
}

impl KeyslotArgs {
    /// The encrypt options these set (the rest at their defaults).
    fn options(self) -> EncryptOptions {
        EncryptOptions {
            version: self.luks_type.map(|t| match t {
                LuksType::Luks1 => 1,
                LuksType::Luks2 => 2,
            }),
            hash: self.hash,
            pbkdf: self.pbkdf,
            iter_time_ms: self.iter_time,
            iterations: self.pbkdf_iterations,
            memory_kib: self.pbkdf_memory,
            parallel: self.pbkdf_parallel,
            ..EncryptOptions::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The encrypted image to convert: raw LUKS1/LUKS2 or qcow2-LUKS (detected).
    pub source: PathBuf,
    /// A new file (an existing file is refused), or a block device not in use (opened
    /// exclusively; it must hold the header and the whole payload).
    #[arg(long, short = 'o', value_name = "FILE|DEVICE")]
    pub output: PathBuf,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Result format: raw LUKS (`raw`, alias `luks`; what a volume holds) or a qcow2 (v3)
    /// image with LUKS1 encryption as qemu writes it.
    #[arg(long, value_enum, default_value = "raw")]
    pub format: ImageFormat,
    #[command(flatten)]
    pub keyslot: KeyslotArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub threads: ThreadArgs,
    #[command(flatten)]
    pub glance: GlanceArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    #[value(alias = "luks")]
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LuksType {
    Luks1,
    Luks2,
}

#[derive(Debug, Args)]
pub struct HeaderArg {
    /// Detached header file (the image then holds only the payload).
    #[arg(long, value_name = "FILE")]
    pub header: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Key file, read whole (no newline stripping, as cryptsetup); `-` for standard input.
    #[arg(
        long,
        short = 'd',
        value_name = "FILE",
        required_unless_present = "key_id",
        conflicts_with = "key_id"
    )]
    pub key_file: Option<PathBuf>,
    /// Key-manager secret type of the key file: passphrase = bytes verbatim;
    /// symmetric/opaque/… = their lowercase hex (the OpenStack os-brick rule).
    #[arg(long, value_name = "TYPE", default_value = "passphrase")]
    pub secret_type: SecretType,
    /// Take the key from the configured key manager instead of a file (no key file touches
    /// the disk); the secret's own type decides the passphrase rule.
    #[arg(long, value_name = "ID")]
    pub key_id: Option<String>,
    /// Config file naming the key manager for --key-id (default /etc/volcrypt/volcrypt.toml if
    /// it exists).
    #[arg(long, value_name = "FILE", requires = "key_id")]
    pub config: Option<PathBuf>,
}

/// `--glance-properties`: the property set for uploading the image to Glance.
#[derive(Debug, Args)]
pub struct GlanceArgs {
    /// Write the Glance property set of the image (JSON) to FILE, `-` for standard output.
    #[arg(long, value_name = "FILE")]
    pub glance_properties: Option<PathBuf>,
    /// os_encrypt_key_deletion_policy in that set: whether Glance deletes the secret with the
    /// image.
    #[arg(long, value_enum, default_value = "do-not-delete")]
    pub key_deletion_policy: image::glance::DeletionPolicy,
}

impl GlanceArgs {
    /// Write the property set of the image at `path` (if asked).
    fn write(&self, path: &Path, key_id: Option<&str>) -> Result<(), Error> {
        let Some(to) = &self.glance_properties else {
            return Ok(());
        };
        let facts = image::glance::facts_of(path)?;
        let props = image::glance::properties(&facts, key_id, self.key_deletion_policy);
        let text = serde_json::to_string_pretty(&props)
            .map_err(|e| Error::Usage(format!("cannot encode the properties: {e}")))?;
        if to == Path::new("-") {
            println!("{text}");
        } else {
            std::fs::write(to, format!("{text}\n"))
                .map_err(|e| Error::Usage(format!("cannot write {}: {e}", to.display())))?;
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Refuse (exit 3) Argon2 memory above KIB.
    #[arg(long, value_name = "KIB")]
    pub max_pbkdf_memory: Option<u32>,
    /// Refuse (exit 3) PBKDF2 iterations above N.
    #[arg(long, value_name = "N")]
    pub max_pbkdf_iterations: Option<u32>,
    /// Refuse (exit 3) an Argon2 time cost above N.
    #[arg(long, value_name = "N")]
    pub max_argon2_time: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ThreadArgs {
    /// Cipher worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl LimitArgs {
    fn limits(&self) -> KdfLimits {
        let mut l = KdfLimits::default();
        if let Some(m) = self.max_pbkdf_memory {
            l.max_argon2_memory_kib = m;
        }
        if let Some(n) = self.max_pbkdf_iterations {
            l.max_pbkdf2_iterations = n;
        }
        if let Some(t) = self.max_argon2_time {
            l.max_argon2_time = t;
        }
        l
    }
}

impl KeyArgs {
    /// The passphrase LUKS sees: the key file's bytes after the secret-type rule, or the
    /// key manager's secret after its own type's rule.
    fn passphrase(&self) -> Result<SecretBytes, Error> {
        if let Some(id) = &self.key_id {
            let config = crate::config::Config::load_or_default(self.config.as_deref())?;
            let km = crate::keys::from_config(&config.key_manager)?;
            return Ok(km.get(id)?.passphrase());
        }
        let file = self
            .key_file
            .as_deref()
            .ok_or_else(|| Error::Usage("give --key-file or --key-id".into()))?;
        let payload = image::read_key_file(file)?;
        Ok(secret::derive_passphrase(&self.secret_type, &payload))
    }
}

fn stream_options(threads: &ThreadArgs) -> Result<StreamOptions, Error> {
    if threads.threads == Some(0) {
        return Err(Error::Usage("--threads 0: need at least one thread".into()));
    }
    Ok(StreamOptions {
        threads: threads.threads,
        progress: std::io::stderr().is_terminal(),
        ..StreamOptions::default()
    })
}

pub fn run(cmd: ImageCommand) -> Result<(), Error> {
    match cmd {
        ImageCommand::Inspect {
            image,
            header,
            json,
            glance,
            os_encrypt_key_id,
        } => {
            if glance.glance_properties.is_some() {
                if header.header.is_some() {
                    return Err(Error::Usage(
                        "--glance-properties describes an image that holds its header;                          not with --header"
                            .into(),
                    ));
                }
                return glance.write(&image, os_encrypt_key_id.as_deref());
            }
            inspect(&image, header.header.as_deref(), json)
        }
        ImageCommand::CheckProperties { image, properties } => {
            check_properties(&image, &properties)
        }
        ImageCommand::CheckKey {
            image,
            header,
            key,
            key_slot,
            limits,
        } => {
            let passphrase = key.passphrase()?;
            let (slot, _key) = if is_qcow2(&image, header.header.as_deref())? {
                image::qcow2_luks::open(&image)?.unlock(&passphrase, key_slot, &limits.limits())?
            } else {
                let mut opened = image::open(&image, header.header.as_deref())?;
                opened.unlock(&passphrase, key_slot, &limits.limits())?
            };
            println!("Key slot {slot} unlocked.");
            Ok(())
        }
        ImageCommand::Decrypt(args) => {
            let DecryptArgs {
                image,
                header,
                key,
                key_slot,
                output,
                limits,
                threads,
            } = *args;
            let opts = stream_options(&threads)?;
            let passphrase = key.passphrase()?;
            let out = if output == Path::new("-") {
                Output::Stdout
            } else {
                Output::File(&output)
            };
            let report = if is_qcow2(&image, header.header.as_deref())? {
                image::qcow2_luks::decrypt(
                    &image,
                    &passphrase,
                    key_slot,
                    &limits.limits(),
                    out,
                    &opts,
                )?
            } else {
                image::decrypt(
                    &image,
                    header.header.as_deref(),
                    &passphrase,
                    key_slot,
                    &limits.limits(),
                    out,
                    &opts,
                )?
            };
            tracing::info!(slot = report.slot, bytes = report.bytes, "decrypted");
            if output != Path::new("-") {
                eprintln!(
                    "Key slot {} unlocked; wrote {} bytes of plaintext to {}.",
                    report.slot,
                    report.bytes,
                    output.display()
                );
            }
            Ok(())
        }
        ImageCommand::Verify(args) => verify(*args),
        ImageCommand::Convert(args) => convert(*args),
        ImageCommand::Encrypt(args) => {
            let EncryptArgs {
                input,
                output,
                key,
                header,
                format,
                keyslot,
                cipher,
                key_size,
                sector_size,
                label,
                limits,
                threads,
                glance,
            } = *args;
            if glance.glance_properties.is_some() && header.is_some() {
                return Err(Error::Usage(
                    "--glance-properties describes an image that holds its header; not with \
                     --header"
                        .into(),
                ));
            }
            let opts = stream_options(&threads)?;
            let passphrase = key.passphrase()?;
            let options = EncryptOptions {
                cipher,
                key_size_bits: key_size,
                sector_size,
                label,
                ..keyslot.options()
            };
            let report = match format {
                ImageFormat::Raw => image::encrypt(
                    &input,
                    &output,
                    header.as_deref(),
                    &passphrase,
                    &options,
                    &limits.limits(),
                    &opts,
                )?,
                ImageFormat::Qcow2 => {
                    if header.is_some() {
                        return Err(Error::Usage(
                            "--header cannot be used with --format qcow2: a qcow2 image holds \
                             its LUKS header inside"
                                .into(),
                        ));
                    }
                    image::qcow2_write::encrypt(
                        &input,
                        &output,
                        &passphrase,
                        &options,
                        &limits.limits(),
                        &opts,
                    )?
                }
            };
            eprintln!(
                "Wrote {} bytes of payload ({}-byte sectors) to {} at offset {}{}.",
                report.payload_bytes,
                report.sector_size,
                output.display(),
                report.data_offset,
                match &header {
                    Some(h) => format!(", detached header in {}", h.display()),
                    None => String::new(),
                }
            );
            glance.write(&output, key.key_id.as_deref())
        }
    }
}

fn convert(args: ConvertArgs) -> Result<(), Error> {
    let ConvertArgs {
        source,
        output,
        key,
        format,
        keyslot,
        limits,
        threads,
        glance,
    } = args;
    let to_device = std::fs::metadata(&output)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
    if glance.glance_properties.is_some() && to_device {
        return Err(Error::Usage(
            "--glance-properties describes an image file for upload; not with a block device \
             output"
                .into(),
        ));
    }
    let opts = stream_options(&threads)?;
    let passphrase = key.passphrase()?;
    let options = keyslot.options();
    let target = match format {
        ImageFormat::Raw => image::Format::Luks,
        ImageFormat::Qcow2 => image::Format::Qcow2,
    };
    let report = image::convert::convert(
        &source,
        &output,
        target,
        &passphrase,
        &options,
        &limits.limits(),
        &opts,
    )?;
    let name = |f: image::Format| match f {
        image::Format::Luks => "raw LUKS",
        image::Format::Qcow2 => "qcow2-LUKS",
    };
    eprintln!(
        "Key slot {} of the {} source unlocked; wrote {} bytes of payload as {} (LUKS{}, {}, \
         {}-byte sectors) to {}{}. The same key opens it (the source's volume key is kept).",
        report.slot,
        name(report.source),
        report.payload_bytes,
        name(report.target),
        report.summary.version,
        report.summary.cipher.as_deref().unwrap_or("?"),
        report.sector_size,
        output.display(),
        if report.block_device {
            " (block device)"
        } else {
            ""
        },
    );
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    glance.write(&output, key.key_id.as_deref())
}

/// `image check-properties`: the findings as JSON on stdout; exit 6 on any disagreement.
fn check_properties(image_path: &Path, properties: &Path) -> Result<(), Error> {
    let text = if properties == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Error::Usage(format!("cannot read the properties: {e}")))?;
        s
    } else {
        std::fs::read_to_string(properties)
            .map_err(|e| Error::Usage(format!("cannot read {}: {e}", properties.display())))?
    };
    let props: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| {
            Error::Usage(format!(
                "{}: not a JSON object of properties: {e}",
                properties.display()
            ))
        })?;
    let facts = image::glance::facts_of(image_path)?;
    let findings = image::glance::check(&facts, &props);
    let out = serde_json::to_string_pretty(&findings)
        .map_err(|e| Error::Usage(format!("cannot encode the findings: {e}")))?;
    println!("{out}");
    for n in &findings.notes {
        eprintln!("note: {n}");
    }
    if findings.disagreements.is_empty() {
        return Ok(());
    }
    for d in &findings.disagreements {
        eprintln!("disagreement: {d}");
    }
    Err(Error::PropertiesDisagree {
        count: findings.disagreements.len(),
    })
}

fn verify(args: VerifyArgs) -> Result<(), Error> {
    let opts = stream_options(&args.threads)?;
    let passphrase = args.key.passphrase()?;
    let report = image::verify::verify(
        &args.image,
        args.header.header.as_deref(),
        &passphrase,
        args.plaintext.as_deref(),
        &args.limits.limits(),
        &opts,
    )?;
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Usage(format!("cannot encode the report as JSON: {e}")))?;
        println!("{text}");
    } else {
        for s in &report.keyslots {
            println!("{}", s.describe());
        }
        println!(
            "payload: {} bytes at offset {} ({}, {}-byte sectors) decrypted with keyslot {}",
            report.payload_bytes,
            report.payload_offset,
            report.cipher,
            report.sector_size,
            report.opened_by
        );
        if report.plaintext_compared && report.plaintext_diff.is_none() {
            println!("plaintext: identical");
        }
    }
    match report.failure() {
        None => {
            if !args.json {
                println!("verified");
            }
            Ok(())
        }
        Some(message) => Err(image::Error::Verify(image::verify::VerifyFailed {
            path: args.image.display().to_string(),
            message,
            kind: crate::kind::Kind::Mismatch,
        })
        .into()),
    }
}

/// Whether `image` is a qcow2 image (read through the qcow2 path). A qcow2 image carries its
/// LUKS header inside, so a detached header makes no sense with it.
fn is_qcow2(image: &Path, header: Option<&Path>) -> Result<bool, Error> {
    let qcow2 = image::detect(image)? == image::Format::Qcow2;
    if qcow2 && header.is_some() {
        return Err(Error::Usage(format!(
            "{}: a qcow2 image holds its LUKS header inside; --header cannot be used with it",
            image.display()
        )));
    }
    Ok(qcow2)
}

fn inspect(image_path: &Path, header: Option<&Path>, json: bool) -> Result<(), Error> {
    if is_qcow2(image_path, header)? {
        let summary = image::qcow2_luks::open(image_path)?.summary();
        if json {
            let text = serde_json::to_string_pretty(&summary)
                .map_err(|e| Error::Usage(format!("cannot encode the summary as JSON: {e}")))?;
            println!("{text}");
        } else {
            print!("{summary}");
        }
        return Ok(());
    }
    let opened = image::open(image_path, header)?;
    let summary = opened.header.summary();
    if json {
        let text = serde_json::to_string_pretty(&summary)
            .map_err(|e| Error::Usage(format!("cannot encode the summary as JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{summary}");
    }
    Ok(())
}
