//! `volcrypt image …`: userspace LUKS container commands.
//!
//! (Skeleton: filled in by the image work.)

use clap::Subcommand;

use crate::error::Error;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Detect and validate a LUKS header and print what it holds.
    Inspect {
        image: std::path::PathBuf,
    },
}

pub fn run(cmd: ImageCommand) -> Result<(), Error> {
    match cmd {
        ImageCommand::Inspect { image } => Err(Error::Usage(format!(
            "{}: inspect is not implemented yet",
            image.display()
        ))),
    }
}
