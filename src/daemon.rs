//! `lazysnap serve`: opens the state under the root dir, binds containerd's socket, the control
//! socket and (if configured) the metrics address, and serves until SIGTERM or SIGINT, then
//! lets in-flight calls finish.
//!
//! Lazy layers' FUSE fds are held outside the daemon (`crate::takeover`): at start the
//! connections an earlier daemon left are taken over, and at exit they stay mounted for the
//! next one (unless [`OnExit::Unmount`]).

use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::cache::LocalStore;
use crate::config::Config;
use crate::format::Formats;
use crate::grpc;
use crate::layer::Resolver;
use crate::mount::{LazyLayers, LazyOptions};
use crate::prefetch::TraceStore;
use crate::registry::{self, RegistryClient};
use crate::report::LazyNode;
use crate::snapshot::{RemoteFs, Snapshotter};
use crate::socket::{bind, SocketAccess};
use crate::takeover::FdStore;

/// What becomes of lazy mounts when the daemon stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// They stay mounted and held, for the next daemon to take over: containers keep
    /// reading across a restart or an upgrade.
    KeepMounts,
    /// They are unmounted (detached where containers still use them, which then read
    /// errors) and no longer held: lazysnap leaves the node.
    Unmount,
}

/// How the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Stopped {
    /// Everything is down; the runtime may be shut down as usual.
    Clean,
    /// Lazy mounts are left for the next daemon while their FUSE sessions still run here:
    /// exit the process without shutting the runtime down. Shutting it down would cancel
    /// the reads those sessions have taken, and fuser answers a dropped reply with `EIO`,
    /// which a container would see; left unanswered, the next daemon gets them resent.
    LeftMounted,
}

/// Runs the daemon with `config` until a termination signal arrives.
pub async fn run(config: Config, on_exit: OnExit) -> anyhow::Result<Stopped> {
    // Handlers first: FUSE session threads started below inherit the signal disposition, and
    // without a handler a SIGTERM landing on one would kill the daemon without unmounting.
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    // Resolved before anything is mounted, so a typo in the group fails the start cleanly.
    let control_group = config.control_gid()?;
    std::fs::create_dir_all(&config.root)
        .with_context(|| format!("create root dir {}", config.root.display()))?;
    let layers = if config.fuse.lazy_pull {
        Some(lazy_layers(&config)?)
    } else {
        None
    };
    let remote = layers.clone().map(|l| l as Arc<dyn RemoteFs>);
    let root = config.root.clone();
    let snapshotter = tokio::task::spawn_blocking(move || -> anyhow::Result<Snapshotter> {
        let snapshotter = Snapshotter::open_with(&root, remote)
            .with_context(|| format!("open snapshotter state in {}", root.display()))?;
        // Lazy layers of the previous run come back, and whatever a crash left half-made goes,
        // before containerd can see any of it.
        snapshotter
            .restore_remote_mounts()
            .context("restore lazy layer mounts")?;
        snapshotter
            .cleanup()
            .context("clean up orphaned snapshot directories")?;
        Ok(snapshotter)
    })
    .await??;
    let listener = bind(&config.address, SocketAccess::ROOT_ONLY)?;
    let control_listener = bind(
        &config.control_address,
        SocketAccess::control(control_group.as_ref().map(|(gid, _)| *gid)),
    )?;
    let metrics_listener = match (config.metrics.address, &layers) {
        (Some(address), Some(_)) => Some(crate::metrics::bind(address).await?),
        (Some(address), None) => {
            tracing::warn!(%address, "metrics are off: lazy pulling is off, so there is nothing to count");
            None
        }
        (None, _) => None,
    };
    // Every server stops on the same signal.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        let _ = stop_tx.send(true);
    });
    match (&config.cri.image_service_address, &layers) {
        (Some(address), Some(layers)) => {
            let proxy =
                grpc::CriImageProxy::new(&config.cri.containerd_address, layers.registry().clone())
                    .map_err(|e| anyhow::anyhow!("CRI image proxy: {}", e.message()))?;
            let listener = bind(address, SocketAccess::ROOT_ONLY)?;
            tracing::info!(address = %address.display(), containerd = %config.cri.containerd_address.display(), "serving the CRI image service for the kubelet");
            let address = address.clone();
            let stop = stopped();
            tokio::spawn(async move {
                if let Err(e) = grpc::serve_cri(proxy, listener, stop).await {
                    tracing::error!(error = %crate::error_chain(&e), "CRI image service failed");
                }
                let _ = std::fs::remove_file(&address);
            });
        }
        (Some(_), None) => tracing::warn!(
            "[cri] image_service_address is set but lazy pulling is off: not serving it"
        ),
        (None, _) => {}
    }
    let control = tokio::spawn(grpc::serve_control(
        grpc::ControlService::new(layers.clone().map(|l| l as Arc<dyn LazyNode>)),
        grpc::ControlAccess::new(control_group),
        control_listener,
        stopped(),
    ));
    if let (Some(listener), Some(layers)) = (metrics_listener, &layers) {
        tracing::info!(address = ?listener.local_addr().ok(), "serving Prometheus metrics at /metrics");
        tokio::spawn(crate::metrics::serve(listener, layers.clone(), stopped()));
    }
    tracing::info!(
        address = %config.address.display(),
        control_address = %config.control_address.display(),
        root = %config.root.display(),
        "serving containerd snapshots API"
    );
    crate::takeover::notify_ready("serving");
    let served = grpc::serve(Arc::new(snapshotter), listener, stopped())
        .await
        .context("gRPC server failed");
    let mut stopped = Stopped::Clean;
    if let Some(layers) = &layers {
        let layers = layers.clone();
        let kept = tokio::task::spawn_blocking(move || layers.shutdown(on_exit == OnExit::Unmount))
            .await
            .context("stop lazy layers")?;
        if kept > 0 {
            stopped = Stopped::LeftMounted;
        }
    }
    served?;
    match control.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %crate::error_chain(&e), "control API server failed"),
        Err(e) => tracing::warn!(error = %e, "control API server task failed"),
    }
    let _ = std::fs::remove_file(&config.address);
    let _ = std::fs::remove_file(&config.control_address);
    tracing::info!("stopped");
    Ok(stopped)
}

/// The lazy-layer machinery: registry client, local store, traces, FUSE mounts.
fn lazy_layers(config: &Config) -> anyhow::Result<Arc<LazyLayers>> {
    let registry = RegistryClient::new(registry::RegistryConfig {
        request_timeout: config.registry.request_timeout,
        read_deadline: config.registry.read_deadline,
        docker_config: config.registry.docker_config.clone(),
        hosts_dir: config.registry.hosts_dir.clone(),
    })
    .context("create registry client")?;
    let cache_dir = config.root.join("cache");
    let cache = LocalStore::open(&cache_dir, config.cache.disk_budget_bytes)
        .with_context(|| format!("open the local store in {}", cache_dir.display()))?;
    let traces = TraceStore::open(
        config.root.join("traces"),
        config.prefetch.max_trace_entries,
        config.prefetch.max_trace_names,
    )
    .context("open trace store")?;
    let exe = std::env::current_exe().context("find the lazysnap binary")?;
    let (fd_store, held) = FdStore::open(&config.root.join("fd-holder.sock"), &exe);
    tracing::info!(
        fd_store = fd_store.kind(),
        held = held.len(),
        "lazy mounts' FUSE fds are held outside the daemon"
    );
    Ok(Arc::new(LazyLayers::new(
        Resolver::new(registry, Formats::builtin_with(config.limits)),
        Arc::new(cache),
        Arc::new(traces),
        LazyOptions {
            layers_dir: config.root.join("layers"),
            read_timeout: config.fuse.read_timeout,
            passthrough: config.fuse.passthrough.wanted(),
            passthrough_min_file_bytes: config.fuse.passthrough_min_file_bytes,
            readahead_bytes: config.fuse.readahead_bytes,
            dispatch_threads: config.fuse.dispatch_threads,
            memory_bytes: config.cache.memory_bytes,
            unmounted_state_bytes: config.cache.unmounted_state_bytes,
            prefetch: config.prefetch.clone(),
        },
        tokio::runtime::Handle::current(),
        fd_store,
        held,
    )))
}
