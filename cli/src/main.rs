//! `pgiplock`: run a lock worker, inspect the lock tables, or watch a handover and a failover.
//!
//! `pgiplock demo` is self-contained: it starts a throwaway PostgreSQL when no database is
//! given, runs three workers and prints what happened. See `pgiplock --help`.

mod command;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = command::Cli::parse();
    command::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgiplock: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(command::run(args));
    // Do not wait for stray blocking tasks (e.g. a stuck stdin read) once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgiplock: {}", error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// The error and its causes on one line ("error connecting to server: Connection refused"),
/// skipping causes whose text the message already contains.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
