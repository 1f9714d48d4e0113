//! `volcrypt keystore …`: manage the local keystore (operators).
//!
//! `add` reads the payload from a file or stdin and never prints it; nothing here ever prints
//! a payload or a passphrase — `show-meta` shows the type, size and passphrase derivation only.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::Error;
use crate::keys::{self, KeyManager, Keystore, Secret, keystore::MAX_SECRET_FILE};
use crate::secret::{SecretBytes, SecretType};

#[derive(Debug, Args)]
pub struct KeystoreArgs {
    /// Keystore directory (default: key_manager.keystore.dir from the config, else
    /// /var/lib/volcrypt/keys).
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,
    /// Config file (default /etc/volcrypt/volcrypt.toml if it exists).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: KeystoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeystoreCommand {
    /// Store a secret. The payload comes from --file (or stdin with `--file -`) and is never
    /// printed.
    Add {
        /// Secret id (what volumes name as encryption_key_id).
        id: String,
        /// Secret type: passphrase (used verbatim) or symmetric/opaque/... (used as lowercase
        /// hex), as in Barbican.
        #[arg(long = "type", value_name = "TYPE")]
        secret_type: SecretType,
        /// File holding the payload; `-` reads stdin.
        #[arg(long, value_name = "FILE|-")]
        file: PathBuf,
        /// How the input encodes the payload.
        #[arg(long, value_enum, default_value_t = Encoding::Raw)]
        encoding: Encoding,
        /// Drop one trailing newline from raw input (`echo pw | …`). os-brick uses passphrase
        /// payloads byte for byte, so by default a newline is kept.
        #[arg(long)]
        trim_newline: bool,
        /// Replace an existing secret with this id (atomically).
        #[arg(long)]
        replace: bool,
    },
    /// List secret ids and types.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret.
    Remove { id: String },
    /// Show a secret's type, payload size and passphrase derivation (never its contents).
    ShowMeta {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Encoding {
    /// The bytes as they are.
    Raw,
    /// Hex digits (e.g. a symmetric key written as hex); whitespace around it ignored.
    Hex,
    /// Standard base64 (as Barbican's payload_content_encoding=base64).
    Base64,
}

fn keystore_dir(args: &KeystoreArgs) -> Result<PathBuf, Error> {
    match &args.dir {
        Some(d) => Ok(d.clone()),
        None => Ok(Config::load_or_default(args.config.as_deref())?
            .key_manager
            .keystore
            .dir),
    }
}

pub fn run(args: KeystoreArgs) -> Result<(), Error> {
    let dir = keystore_dir(&args)?;
    match args.command {
        KeystoreCommand::Add {
            id,
            secret_type,
            file,
            encoding,
            trim_newline,
            replace,
        } => {
            keys::validate_key_id(&id)?;
            let raw = read_input(&file)?;
            let payload = decode(&raw, encoding, trim_newline)?;
            let ks = Keystore::create(&dir)?;
            let secret = Secret::new(secret_type, payload);
            if replace {
                ks.put(&id, &secret)?;
            } else {
                ks.add(&id, &secret)?;
            }
            eprintln!(
                "stored {} secret {id} ({} bytes) in {}",
                secret.secret_type,
                secret.payload.len(),
                dir.display()
            );
            Ok(())
        }
        KeystoreCommand::List { json } => {
            let ks = Keystore::open(&dir)?;
            let entries = ks.list()?;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|(id, t)| {
                        serde_json::json!({"id": id, "secret_type": t, "derivation": t.derivation()})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for (id, t) in entries {
                    println!("{id}\t{t}");
                }
            }
            Ok(())
        }
        KeystoreCommand::Remove { id } => {
            Keystore::open(&dir)?.remove(&id)?;
            eprintln!("removed secret {id} from {}", dir.display());
            Ok(())
        }
        KeystoreCommand::ShowMeta { id, json } => {
            let ks = Keystore::open(&dir)?;
            let secret = ks.get(&id)?;
            let derivation = secret.secret_type.derivation();
            let passphrase_len = secret.passphrase().len();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": id, "secret_type": secret.secret_type,
                        "payload_bytes": secret.payload.len(), "derivation": derivation,
                        "passphrase_bytes": passphrase_len, "manager": ks.kind(),
                        "path": ks.dir().join(&id),
                    })
                );
            } else {
                println!("id:               {id}");
                println!("secret type:      {}", secret.secret_type);
                println!("payload:          {} bytes", secret.payload.len());
                println!("derivation:       {derivation}");
                println!("passphrase:       {passphrase_len} bytes");
                println!("file:             {}", ks.dir().join(&id).display());
            }
            Ok(())
        }
    }
}

/// Read the whole input (bounded), into a zeroizing buffer.
fn read_input(file: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let mut buf = Zeroizing::new(Vec::new());
    let limit = MAX_SECRET_FILE + 1;
    let res = if file == Path::new("-") {
        std::io::stdin().lock().take(limit).read_to_end(&mut buf)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_end(&mut buf))
    };
    res.map_err(|e| keys::Error::io(file, e))?;
    if buf.len() as u64 > MAX_SECRET_FILE - 64 {
        return Err(Error::Usage(format!(
            "{}: payload larger than {} bytes",
            file.display(),
            MAX_SECRET_FILE - 64
        )));
    }
    Ok(buf)
}

fn decode(raw: &[u8], encoding: Encoding, trim_newline: bool) -> Result<SecretBytes, Error> {
    let bad = |why: &str| Error::Usage(format!("payload ({encoding:?} encoding): {why}"));
    let bytes = match encoding {
        Encoding::Raw => {
            let b = if trim_newline {
                raw.strip_suffix(b"\n")
                    .map(|r| r.strip_suffix(b"\r").unwrap_or(r))
                    .unwrap_or(raw)
            } else {
                raw
            };
            SecretBytes::new(b.to_vec())
        }
        Encoding::Hex => keys::fixed::decode_hex(raw, MAX_SECRET_FILE as usize).map_err(bad)?,
        Encoding::Base64 => {
            use base64::Engine;
            let text: Zeroizing<Vec<u8>> = Zeroizing::new(
                raw.iter()
                    .copied()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect(),
            );
            let v = base64::engine::general_purpose::STANDARD
                .decode(&*text)
                .map_err(|_| bad("not valid base64"))?;
            SecretBytes::new(v)
        }
    };
    if bytes.is_empty() {
        return Err(bad("it is empty"));
    }
    Ok(bytes)
}

/// `volcrypt secret …`: secrets in the configured key manager (Barbican, or the keystore).
#[derive(Debug, Args)]
pub struct SecretArgs {
    /// Config file naming the key manager (default /etc/volcrypt/volcrypt.toml if it exists).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: SecretCommand,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Create a secret with a random payload in the key manager and print its id (never the
    /// payload): what an image or a volume is then encrypted with (`--key-id`,
    /// `encryption_key_id`).
    Create {
        /// passphrase: printable text (base64 of random bytes, used verbatim as the LUKS
        /// passphrase); symmetric: random key bytes (used as their lowercase hex).
        #[arg(long = "type", value_name = "passphrase|symmetric")]
        secret_type: NewSecretType,
        /// Random bits in the payload: the key size of a symmetric secret (128 to 4096, whole
        /// bytes), the entropy of a passphrase.
        #[arg(long, default_value_t = 256)]
        bits: u32,
        /// A name for the secret (Barbican: its `name`; keystore: its id).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NewSecretType {
    Passphrase,
    Symmetric,
}

pub fn run_secret(args: SecretArgs) -> Result<(), Error> {
    let SecretCommand::Create {
        secret_type,
        bits,
        name,
    } = args.command;
    if !(128..=4096).contains(&bits) || bits % 8 != 0 {
        return Err(Error::Usage(format!(
            "--bits {bits}: must be a multiple of 8 from 128 to 4096"
        )));
    }
    let config = Config::load_or_default(args.config.as_deref())?;
    let km = keys::from_config(&config.key_manager)?;
    let secret = random_secret(secret_type, bits)?;
    let id = km.create(name.as_deref(), &secret)?;
    eprintln!(
        "created {} secret ({} bits of randomness) in the {}",
        secret.secret_type,
        bits,
        km.kind()
    );
    println!("{id}");
    Ok(())
}

/// A secret of `bits` random bits: the bytes themselves (symmetric) or their base64 text
/// (passphrase: printable, as Nova's own passphrase secrets are).
fn random_secret(kind: NewSecretType, bits: u32) -> Result<Secret, Error> {
    let mut raw = Zeroizing::new(vec![0u8; bits as usize / 8]);
    getrandom::fill(&mut raw)
        .map_err(|e| Error::Usage(format!("the system's random source failed: {e}")))?;
    Ok(match kind {
        NewSecretType::Symmetric => {
            Secret::new(SecretType::Symmetric, SecretBytes::new(raw.to_vec()))
        }
        NewSecretType::Passphrase => {
            use base64::Engine;
            let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*raw));
            Secret::new(
                SecretType::Passphrase,
                SecretBytes::new(text.as_bytes().to_vec()),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_secrets_have_the_asked_size_and_differ() {
        let a = random_secret(NewSecretType::Symmetric, 256).unwrap();
        let b = random_secret(NewSecretType::Symmetric, 256).unwrap();
        assert_eq!(a.payload.len(), 32);
        assert_ne!(a.payload, b.payload);
        let p = random_secret(NewSecretType::Passphrase, 256).unwrap();
        assert_eq!(p.secret_type, SecretType::Passphrase);
        assert_eq!(p.payload.len(), 44);
        assert!(p.payload.expose().iter().all(|c| c.is_ascii_graphic()));
    }
}
