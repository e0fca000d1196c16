//! The `ablate` binary: parse arguments, set up logging, dispatch. Everything else lives in the
//! library (`coordinator::cli`, `coordinator::run`) so tests can drive it without a process.

use std::process::ExitCode;

use clap::Parser as _;
use coordinator::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` is a daemon: log what it does. The interactive commands keep stderr for progress and
    // errors unless RUST_LOG asks for more.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => coordinator::run::run(args).await,
            Command::Serve(args) => coordinator::cli::serve(args).await.map(|()| 0),
            Command::Plan(args) => coordinator::plan::plan_command(args),
            Command::Submit(args) => coordinator::cli::submit(args).await.map(|()| 0),
            Command::Status(args) => coordinator::cli::status(args).await,
            Command::List(args) => coordinator::cli::list(args).await.map(|()| 0),
            Command::Cancel(args) => coordinator::cli::cancel(args).await.map(|()| 0),
            Command::Backup(args) => coordinator::cli::backup(args).map(|()| 0),
            Command::Restore(args) => coordinator::cli::restore(args).map(|()| 0),
            Command::Drain(args) => coordinator::cli::drain(args).await.map(|()| 0),
            Command::Report(args) => coordinator::cli::report(args).await.map(|()| 0),
            Command::Export(args) => coordinator::export::export_command(args).await.map(|()| 0),
        }
    });
    // Workers and servers were stopped inside the commands; do not wait on stray blocking tasks.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
