//! `lazysnap serve`: loads the config, applies flag overrides, sets up logging and runs the
//! daemon on a multi-threaded runtime.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tracing_subscriber::EnvFilter;

use lazysnap::config::Config;

/// How long, once the servers have stopped, the runtime waits for work still running on it:
/// a trace being written finishes in this time. What is left (a blocking thread stuck in a
/// registry read, a task waiting on the network) would keep a stopped daemon alive for up to
/// a request timeout, and dies with the process instead.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file (TOML). Default /etc/lazysnap/config.toml if it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory; overrides `root` in the config.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Unix socket for containerd; overrides `address` in the config.
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// Unix socket for the control API (the `lazysnap` CLI); overrides `control_address`.
    #[arg(long, value_name = "SOCKET")]
    control_address: Option<PathBuf>,
    /// Log filter; overrides `log_level` in the config (RUST_LOG wins over both).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// On SIGTERM/SIGINT, unmount every lazy layer and stop holding its FUSE fd, as when
    /// taking lazysnap off a node for good. By default lazy layers stay mounted for the next
    /// `lazysnap serve` to take over, so running containers keep reading.
    #[arg(long)]
    unmount_on_exit: bool,
}

/// Allocations from this size up get mappings of their own, whatever was freed before.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 256 << 10;

/// Keeps large buffers out of the heap. Each FUSE dispatch thread allocates a zeroed 16 MiB
/// request buffer (fuser's, sized for the largest write) of which a read-only mount touches a
/// few KiB; as a mapping of its own its untouched pages never count. glibc's threshold for
/// that is dynamic, though: once a mapping of 16 MiB has been freed (a layer unmounted), it
/// rises past 16 MiB, and every later buffer comes from the heap and is zeroed page by page,
/// 16 MiB resident per dispatch thread, which made a warm restart of the python image peak at
/// 200-300 MiB. Setting it fixes it (and the heap's trim threshold with it).
#[cfg(target_env = "gnu")]
fn keep_large_buffers_out_of_the_heap() {
    // SAFETY: mallopt only sets allocator parameters; called before the runtime starts any
    // thread.
    let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    if set != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay resident");
    }
}

/// Other C libraries have no such threshold to fix (nor `mallopt`).
#[cfg(not(target_env = "gnu"))]
fn keep_large_buffers_out_of_the_heap() {}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(root) = args.root {
        config.root = root;
    }
    if let Some(address) = args.address {
        config.address = address;
    }
    if let Some(control) = args.control_address {
        config.control_address = control;
    }
    if let Some(level) = args.log_level {
        config.log_level = level;
    }
    config.validate()?;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            EnvFilter::try_new(&directives).with_context(|| format!("RUST_LOG={directives:?}"))?
        }
        _ => EnvFilter::try_new(config.log_filter())?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    keep_large_buffers_out_of_the_heap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lazysnap")
        .build()
        .context("start tokio runtime")?;
    let on_exit = if args.unmount_on_exit {
        lazysnap::daemon::OnExit::Unmount
    } else {
        lazysnap::daemon::OnExit::KeepMounts
    };
    let result = runtime.block_on(lazysnap::daemon::run(config, on_exit));
    if let Ok(lazysnap::daemon::Stopped::LeftMounted) = result {
        // No runtime shutdown: reads the FUSE sessions took must stay unanswered (the next
        // daemon gets them resent), not be cancelled into EIO.
        std::process::exit(0);
    }
    // Dropping the runtime would wait for every blocking task, however long it takes.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result.map(drop)
}
