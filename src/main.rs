use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = volcrypt::cli::Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    match volcrypt::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volcrypt: {e}");
            ExitCode::from(e.exit_status().code() as u8)
        }
    }
}

/// Logs go to stderr so that `--output -` can stream plaintext on stdout.
fn init_logging(default_level: &str, format: volcrypt::cli::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VOLCRYPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        volcrypt::cli::LogFormat::Json => builder.json().init(),
        volcrypt::cli::LogFormat::Text => builder.init(),
    }
}
