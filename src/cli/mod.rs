//! Command-line parsing and dispatch: one file per subcommand, one `match` here. `serve` runs the
//! daemon; `index` indexes an image's gzip layers in the registry; `cache`, `trace` and
//! `mounts` are operator commands that ask a running daemon over its
//! control socket (`client`) and print what it says (`output`). They never touch cache state on
//! disk themselves.

mod cache;
mod client;
mod index;
mod mounts;
mod output;
mod serve;
mod trace;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use lazysnap::config::DEFAULT_CONTROL_ADDRESS;

/// The version `--version` prints: the crate's, and the commit it was built from (`build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("LAZYSNAP_COMMIT"),
    ")"
);

/// lazysnap: a containerd remote snapshotter that pulls eStargz and zstd:chunked layers lazily.
#[derive(Debug, Parser)]
#[command(version = VERSION, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve containerd's Snapshots API (the proxy plugin) on a Unix socket.
    Serve(serve::ServeArgs),
    /// Show and manage the local store (cached layer data) of a running daemon.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Show, export and import the read traces that drive prefetch.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// List the lazy layers mounted now.
    Mounts(mounts::MountsArgs),
    /// Index an image's plain gzip layers for lazy pulling, and push the index next to it.
    Index(index::IndexArgs),
    /// Hold lazy mounts' FUSE fds while no daemon runs (started by `serve`, not by hand).
    #[command(hide = true)]
    FdHolder(FdHolderArgs),
}

#[derive(Debug, Args)]
pub struct FdHolderArgs {
    /// The holder's socket, where daemons hand it fds and take them back.
    #[arg(long, value_name = "SOCKET")]
    socket: PathBuf,
}

/// The daemon's control socket, taken by every operator command.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// The daemon's control socket (`control_address` in its config).
    #[arg(
        long = "control",
        value_name = "SOCKET",
        env = "LAZYSNAP_CONTROL",
        default_value = DEFAULT_CONTROL_ADDRESS
    )]
    path: PathBuf,
}

impl SocketArgs {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The flags of every operator command that prints an answer. Flattened into each subcommand,
/// so they may come after its own arguments.
#[derive(Debug, Args)]
pub struct ControlArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Print one JSON document, with the control API's field names, instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ControlArgs {
    pub fn socket(&self) -> &Path {
        self.socket.path()
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Cache(command) => cache::run(command),
        Command::Trace(command) => trace::run(command),
        Command::Mounts(args) => mounts::run(args),
        Command::Index(args) => index::run(args),
        // Before any thread exists: the holder forks to detach.
        Command::FdHolder(args) => lazysnap::takeover::run_holder(&args.socket, true)
            .with_context(|| format!("fd holder at {}", args.socket.display())),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn version_names_the_commit() {
        let version = Cli::command().render_version();
        let expected = format!(
            "lazysnap {} ({})",
            env!("CARGO_PKG_VERSION"),
            env!("LAZYSNAP_COMMIT")
        );
        assert_eq!(version.trim_end(), expected);
        assert!(!env!("LAZYSNAP_COMMIT").is_empty());
    }

    #[test]
    fn control_flags_may_follow_the_subcommand_arguments() {
        let cli = Cli::try_parse_from([
            "lazysnap",
            "cache",
            "ls",
            "--json",
            "--control",
            "/tmp/x/control.sock",
        ])
        .expect("parse");
        let Command::Cache(cache::CacheCommand::Ls(args)) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert!(args.control.json);
        assert_eq!(args.control.socket(), Path::new("/tmp/x/control.sock"));
    }

    #[test]
    fn trace_export_takes_control_but_not_json() {
        let cli = Cli::try_parse_from([
            "lazysnap",
            "trace",
            "export",
            "sha256:abc",
            "-o",
            "f",
            "--control",
            "/tmp/x/control.sock",
        ])
        .expect("parse");
        assert!(matches!(
            cli.command,
            Command::Trace(trace::TraceCommand::Export(_))
        ));
        assert!(
            Cli::try_parse_from(["lazysnap", "trace", "export", "sha256:abc", "--json"]).is_err()
        );
    }
}
