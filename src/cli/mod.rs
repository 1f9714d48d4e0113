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

#[derive(Debug, Parser)]
#[command(
    name = "volcrypt",
    version,
    about = "Open LUKS volumes with dm-crypt the way OpenStack does, and inspect, check, decrypt and encrypt LUKS images in userspace"
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
        Command::Bench(args) => bench::run(args),
        #[cfg(feature = "system")]
        Command::Serve(args) => serve::run(args),
    }
}
