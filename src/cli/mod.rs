//! The command-line front end: argument definitions and dispatch. Each command family lives in
//! its own file; this one only routes.

use clap::{Parser, Subcommand};

use crate::error::Error;

pub mod bench;
pub mod image;
pub mod keys;
#[cfg(feature = "system")]
pub mod serve;
#[cfg(feature = "system")]
pub mod volume;

/// The exit codes, as `crate::error::ExitStatus` defines them (0–5 are cryptsetup's).
const EXIT_CODES: &str = "Exit codes (0-5 as cryptsetup's):
  0  success (also a repeated detach: was_active false)
  1  wrong parameters or invalid data (not LUKS, malformed request, refusal to format)
  2  no key accepted (wrong key, or the key could not be fetched)
  3  out of memory, or a KDF cost above the configured limit
  4  wrong device or file (missing, unreadable)
  5  busy or already exists (mapping in use, name held, device held or opened exclusively)
  6  verify / image verify: a difference was found
  7  verify / image verify: cannot verify (cipher not in the userspace engine, no key)
  8  --socket: the agent closed the connection before answering";

#[derive(Debug, Parser)]
#[command(
    name = "volcrypt",
    version,
    about = "Open LUKS volumes with dm-crypt the way OpenStack does, and inspect, check, decrypt and encrypt LUKS images in userspace",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Log verbosity (error, warn, info, debug, trace); VOLCRYPT_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    /// Log format: human-readable text, or one JSON object per line (for log collectors).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with LUKS container images in userspace (no root, no device-mapper).
    #[command(subcommand)]
    Image(image::ImageCommand),
    #[cfg(feature = "system")]
    #[command(flatten)]
    Volume(volume::VolumeCommand),
    /// Manage the local keystore: add, list, remove secrets, show their metadata.
    Keystore(keys::KeystoreArgs),
    /// Secrets in the configured key manager: `secret create` makes one with a random payload.
    Secret(keys::SecretArgs),
    /// Measure the userspace engine (AES-XTS, PBKDF2, Argon2) on one core; ratios vs OpenSSL
    /// with `--features bench-openssl`.
    Bench(bench::BenchArgs),
    /// Run the agent: the attach API on a Unix socket (HTTP/1.1 + JSON), until SIGTERM.
    #[cfg(feature = "system")]
    Serve(serve::ServeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Run one parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
        #[cfg(feature = "system")]
        Command::Volume(cmd) => volume::run(cmd),
        Command::Keystore(args) => keys::run(args),
        Command::Secret(args) => keys::run_secret(args),
        Command::Bench(args) => bench::run(args),
        #[cfg(feature = "system")]
        Command::Serve(args) => serve::run(args),
    }
}

#[cfg(test)]
mod tests {
    /// `--help` lists every exit code the CLI can return.
    #[test]
    fn help_lists_every_exit_code() {
        use crate::error::ExitStatus as S;
        for s in [
            S::Ok,
            S::Invalid,
            S::NoKey,
            S::OutOfMemory,
            S::WrongDevice,
            S::Busy,
            S::Mismatch,
            S::CannotVerify,
            S::AgentLost,
        ] {
            let line = format!("\n  {}  ", s as i32);
            assert!(
                super::EXIT_CODES.contains(&line),
                "{s:?} missing from --help"
            );
        }
    }
}
