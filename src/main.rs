//! The one `lazysnap` binary: `serve` runs the daemon; `cache`, `trace` and `mounts` ask a running
//! daemon over its control socket.

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
