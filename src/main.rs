//! The one `lazysnap` binary: `serve` runs the daemon; operator commands come beside it.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazysnap: {e:#}");
            ExitCode::FAILURE
        }
    }
}
