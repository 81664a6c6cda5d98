//! Command-line parsing and dispatch: one file per subcommand, one `match` here.

mod serve;

use clap::{Parser, Subcommand};

/// lazysnap: a containerd remote snapshotter that pulls eStargz and zstd:chunked layers lazily.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve containerd's Snapshots API (the proxy plugin) on a Unix socket.
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::serve(args),
    }
}
