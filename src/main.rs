use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = volcrypt::cli::Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    quiet_on_closed_stdout();
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| volcrypt::cli::run(cli)));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("volcrypt: {e}");
            ExitCode::from(e.exit_status().code() as u8)
        }
        Err(payload) if is_stdout_closed_panic(payload.as_ref()) => ExitCode::SUCCESS,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// The reader of our output went away (`volcrypt image inspect … | head`): like every Unix
/// tool, stop quietly instead of reporting an error. `print!` panics when stdout is a closed
/// pipe; the hook keeps that panic silent and `main` turns it into a normal exit.
fn quiet_on_closed_stdout() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_stdout_closed_panic(info.payload()) {
            default_hook(info);
        }
    }));
}

/// The message std's `print!`/`println!` panic with when writing to a closed pipe.
fn is_stdout_closed_panic(payload: &(dyn std::any::Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied());
    let epipe = std::io::Error::from_raw_os_error(libc::EPIPE);
    text.is_some_and(|t| t == format!("failed printing to stdout: {epipe}"))
}

/// A command that writes its output itself (`image decrypt --output -`) reports a closed pipe
/// as an I/O error somewhere in its error's source chain.
fn is_broken_pipe(e: &volcrypt::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::BrokenPipe
        {
            return true;
        }
        cur = err.source();
    }
    false
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
