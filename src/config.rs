//! The daemon's configuration: one TOML file, every key optional with a documented default,
//! unknown keys refused. Command-line flags override the file, as `containerd-stargz-grpc`'s do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the daemon looks when `--config` is not given; a missing file there means defaults.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lazysnap/config.toml";
/// State (metadata, snapshots, cache) survives reboots, so it lives under /var/lib.
pub const DEFAULT_ROOT: &str = "/var/lib/lazysnap";
/// Where containerd's docs put per-registry `hosts.toml` files.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";
/// The socket is a runtime file, recreated at every start, so it lives under /run.
pub const DEFAULT_ADDRESS: &str = "/run/lazysnap/lazysnap.sock";
/// The CLI's socket sits beside containerd's, apart so that it can be given other permissions.
pub const DEFAULT_CONTROL_ADDRESS: &str = "/run/lazysnap/control.sock";
/// Where containerd serves its API (and its CRI) by default.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";

/// The whole configuration tree.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding all state: `metadata.redb` and `snapshots/`. Default `/var/lib/lazysnap`.
    pub root: PathBuf,
    /// Unix socket of containerd's Snapshots gRPC service. Default `/run/lazysnap/lazysnap.sock`.
    pub address: PathBuf,
    /// Unix socket of lazysnap's control API, which the `lazysnap cache|trace|mounts` commands
    /// use. Default `/run/lazysnap/control.sock`.
    pub control_address: PathBuf,
    /// Group (name or numeric id) whose members may use the control API besides root: the
    /// control socket is then 0660 and owned by it. Default none: the socket is 0600 and only
    /// root may call.
    pub control_group: Option<String>,
    /// Log level of lazysnap itself (`error`, `warn`, `info`, `debug`, `trace`; libraries log
    /// at `warn`), or full tracing directives such as `info,h2=debug`; `RUST_LOG` wins when
    /// set. Default `info`.
    pub log_level: String,
    /// How layer blobs are read from registries.
    pub registry: RegistryConfig,
    /// The FUSE mounts of lazy layers.
    pub fuse: FuseConfig,
    /// The local store of fetched data.
    pub cache: CacheConfig,
    /// Read traces, prefetch, readahead and background fetch.
    pub prefetch: PrefetchConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// The CRI image service lazysnap can front for the kubelet.
    pub cri: CriConfig,
    /// What one lazy layer may claim in its index.
    /// `[limits]`: what one lazy layer may claim in its index; the keys, units and defaults
    /// are those of `metadata::Limits`, which enforces them.
    pub limits: crate::metadata::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: DEFAULT_ROOT.into(),
            address: DEFAULT_ADDRESS.into(),
            control_address: DEFAULT_CONTROL_ADDRESS.into(),
            control_group: None,
            log_level: "info".into(),
            registry: RegistryConfig::default(),
            fuse: FuseConfig::default(),
            cache: CacheConfig::default(),
            prefetch: PrefetchConfig::default(),
            metrics: MetricsConfig::default(),
            cri: CriConfig::default(),
            limits: crate::metadata::Limits::default(),
        }
    }
}

/// `[registry]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// One HTTP request may take this long (e.g. `"10s"`). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// One read of layer data, retries included, fails after this long. Default 20 s.
    #[serde(with = "humantime_serde")]
    pub read_deadline: Duration,
    /// A docker `config.json` whose `auths` give registry credentials. Default none.
    pub docker_config: Option<PathBuf>,
    /// containerd's registry hosts directory (`config_path`): `<dir>/<host>/hosts.toml` lists
    /// mirrors tried before the origin. Default `/etc/containerd/certs.d`; a missing directory
    /// or host file means "the origin only".
    pub hosts_dir: Option<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            request_timeout: Duration::from_secs(10),
            read_deadline: Duration::from_secs(20),
            docker_config: None,
            hosts_dir: Some(DEFAULT_HOSTS_DIR.into()),
        }
    }
}

/// `[fuse]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuseConfig {
    /// Whether eStargz and zstd:chunked layers are pulled lazily; when false every layer is
    /// downloaded and unpacked by containerd. Default true.
    pub lazy_pull: bool,
    /// A read in a container that cannot be answered within this time fails with EIO instead
    /// of hanging. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Whether files complete in the local store are read by the kernel directly (FUSE
    /// passthrough, Linux 6.9+): `auto` (where the kernel supports it), `on`, `off`. It costs
    /// one level of the kernel's filesystem stacking depth (nothing can stack on the
    /// container's overlay). Default `off`.
    pub passthrough: Passthrough,
    /// Passthrough is asked for only on layers holding a regular file at least this large.
    /// It pays on bulk reads (on the project's VM, warm sequential reads at 0.8-1.1x
    /// overlayfs against 0.6-0.7x served by lazysnap) but costs a round trip to lazysnap at
    /// every open, which a mount without it lets the kernel do alone: a python start that
    /// opens ~50 files took 15-30% longer with it. A layer of system files and scripts
    /// starts faster without; one carrying a model, a dataset or a large library reads
    /// faster with it.
    /// 0 passes every layer through. Default 64 MiB.
    pub passthrough_min_file_bytes: u64,
    /// The kernel's readahead window on each lazy mount, in bytes: a file read in order
    /// reaches the daemon in requests of up to 1 MiB, this many bytes ahead. 0 leaves the
    /// kernel's 128 KiB. Default 4 MiB.
    pub readahead_bytes: u64,
    /// Threads reading each lazy mount's FUSE requests. With more than one, all but one may
    /// answer a small read of stored bytes themselves (one thread wake-up less per random
    /// read) while one stays free for lookups and other reads. A node with many mounted
    /// layers may want 1: each thread keeps a 16 MiB request buffer, mostly untouched.
    /// 1 to 16. Default 2.
    pub dispatch_threads: usize,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            lazy_pull: true,
            read_timeout: Duration::from_secs(30),
            passthrough: Passthrough::Off,
            passthrough_min_file_bytes: 64 << 20,
            readahead_bytes: 4 << 20,
            dispatch_threads: 2,
        }
    }
}

/// More FUSE dispatch threads per mount than this buy nothing: reads that wait on the disk
/// or the network run elsewhere, and each thread keeps a 16 MiB request buffer.
const MAX_DISPATCH_THREADS: usize = 16;

/// `[fuse] passthrough`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Passthrough {
    Auto,
    On,
    Off,
}

impl Passthrough {
    /// Whether to ask the kernel for it on this machine. `on` asks even where the kernel looks
    /// too old (a backport); the mount still falls back to serving reads if the kernel says no.
    pub fn wanted(self) -> bool {
        match self {
            Passthrough::On => true,
            Passthrough::Off => false,
            Passthrough::Auto => kernel_at_least(6, 9),
        }
    }
}

/// Whether the running kernel's release is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (got_major, got_minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (got_major, got_minor) >= (major, minor)
}

/// `[cache]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes of fetched data the daemon holds in memory at once, between the registry and the
    /// disk store (at least 16 MiB are used). Hot data is kept by the kernel's page cache, not
    /// by the daemon. Default 64 MiB.
    pub memory_bytes: u64,
    /// Bytes the disk store may hold; past it the least recently used files are evicted.
    /// 0 means no limit. Default 0.
    pub disk_budget_bytes: u64,
    /// The saved states (index and parameters) of layers no snapshot mounts any more are
    /// kept up to this many bytes, so that an image removed and pulled again mounts without
    /// asking the registry; the least recently unmounted go first, and `lazysnap cache
    /// prune` removes them all. They count against `disk_budget_bytes`. Default 256 MiB;
    /// 0 removes a layer's state with its last snapshot.
    pub unmounted_state_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_bytes: 64 << 20,
            disk_budget_bytes: 0,
            unmounted_state_bytes: 256 << 20,
        }
    }
}

/// `[prefetch]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// Whether mounting a layer prefetches what its trace (and its landmark file) names.
    /// Default true.
    pub enabled: bool,
    /// How long after each mount the chunks a container reads first are recorded into the
    /// layer's trace. Default 60 s; 0 records nothing.
    #[serde(with = "humantime_serde")]
    pub trace_window: Duration,
    /// The most chunks one layer's trace keeps. Default 100000.
    pub max_trace_entries: usize,
    /// The most names (lookups, directory listings, symlink reads) one layer's trace keeps.
    /// The next mount of the layer asks them itself before a container does (with `enabled`),
    /// so the kernel answers the container's from its caches instead of a round trip to the
    /// daemon each. 0 records and replays none. Default 16384.
    pub max_trace_names: usize,
    /// Range requests prefetch may have in flight at once, over all layers. Default 4.
    pub concurrency: usize,
    /// Honour eStargz landmark files (`.prefetch.landmark`) written by
    /// `ctr-remote image optimize`. Default true.
    pub landmarks: bool,
    /// The widest readahead window for a file read sequentially, in bytes; it starts at
    /// 256 KiB and doubles while the pattern holds. 0 turns readahead off. Default 8 MiB.
    pub readahead_max_bytes: u64,
    /// A container's read that misses also fetches the uncached chunks that follow it in the
    /// layer blob, up to this many compressed bytes, the rest of its file when that is small,
    /// and the other files of a small directory: files stored together are read together (an
    /// interpreter importing its modules, a compiler including headers),
    /// so one round trip brings several. They come in a request of their own beside the
    /// read's, so the read does not wait for them. 0 fetches only what the read touches.
    /// Default 64 KiB: on the python image, 256 KiB saved four of 31 round trips but fetched
    /// 1.6 times what was read; 64 KiB fetches 1.1 times.
    pub amplify_bytes: u64,
    /// A container's read of the start of a program or shared library (ELF) also fetches, at
    /// once and whole, up to this many of the libraries it needs (`DT_NEEDED`, looked up in
    /// the usual library directories of the image's mounted layers), instead of the loader
    /// waiting a round trip for each in turn. 0 turns it off. Default 32.
    pub shared_libraries: usize,
    /// After prefetch, fetch the rest of every mounted layer at low priority, so containers
    /// stop depending on the registry. Default false.
    pub background_fetch: bool,
    /// Of the chunks a layer's trace names that are already on local disk, the most bytes
    /// read ahead into the page cache when the layer is mounted (without passthrough, through
    /// the mount itself, whose page cache the container reads), so that a container started
    /// again finds its files in memory, as it would right after a normal pull unpacked them.
    /// The kernel may drop them again under memory pressure. Default 256 MiB; 0 = off.
    pub preload_bytes: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enabled: true,
            trace_window: Duration::from_secs(60),
            max_trace_entries: 100_000,
            max_trace_names: 16_384,
            concurrency: 4,
            landmarks: true,
            readahead_max_bytes: 8 << 20,
            amplify_bytes: 64 << 10,
            shared_libraries: 32,
            background_fetch: false,
            preload_bytes: 256 << 20,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where Prometheus text is served at `/metrics`, e.g. `"127.0.0.1:9645"`; keep it on
    /// loopback or a node-local address. Default none (no endpoint).
    pub address: Option<std::net::SocketAddr>,
}

/// `[cri]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// Where to serve the CRI image service (`runtime.v1.ImageService`) for the kubelet's
    /// `--image-service-endpoint`: every call goes on to containerd, and the credentials of
    /// each `PullImage` are kept in memory for lazy pulls of private images. Default none
    /// (not served).
    pub image_service_address: Option<PathBuf>,
    /// containerd's socket, where CRI calls are forwarded. Default
    /// `/run/containerd/containerd.sock`.
    pub containerd_address: PathBuf,
}

impl Default for CriConfig {
    fn default() -> Self {
        CriConfig {
            image_service_address: None,
            containerd_address: DEFAULT_CONTAINERD_ADDRESS.into(),
        }
    }
}

/// Why a configuration was refused; every variant names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message names the key and shows the line, so it is part of ours (and not
    /// repeated as a source).
    #[error("config {}: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Loads `path` if given (it must exist), else the default path if it exists, else defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { error, .. } => ConfigError::Parse {
                path: path.into(),
                error,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: PathBuf::new(),
            error: Box::new(error),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The tracing directives for `log_level`: a bare level applies to lazysnap's own crates
    /// only, because `debug` for gRPC and HTTP libraries buries our lines under frame dumps.
    pub fn log_filter(&self) -> String {
        let level = self.log_level.trim();
        if level.contains(['=', ',']) {
            level.to_owned()
        } else {
            format!("warn,lazysnap={level},lazysnap_fuse={level}")
        }
    }

    /// The id and name of `control_group`, looked up in the system's group database; `None`
    /// when it is not set.
    pub fn control_gid(&self) -> Result<Option<(nix::unistd::Gid, String)>, ConfigError> {
        let Some(group) = &self.control_group else {
            return Ok(None);
        };
        let invalid = |reason: String| ConfigError::Invalid {
            key: "control_group",
            reason,
        };
        let found = match group.parse::<u32>() {
            Ok(id) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id)).map(|g| {
                // A numeric id without a name is still a group the kernel can check.
                Some(
                    g.map_or((nix::unistd::Gid::from_raw(id), group.clone()), |g| {
                        (g.gid, g.name)
                    }),
                )
            }),
            Err(_) => nix::unistd::Group::from_name(group).map(|g| g.map(|g| (g.gid, g.name))),
        };
        match found {
            Ok(Some(found)) => Ok(Some(found)),
            Ok(None) => Err(invalid(format!("no group {group:?} on this system"))),
            Err(e) => Err(invalid(format!("looking up group {group:?}: {e}"))),
        }
    }

    /// Checks what serde cannot: values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.root.is_absolute() {
            return Err(ConfigError::Invalid {
                key: "root",
                reason: format!("{:?} must be an absolute path", self.root),
            });
        }
        let cri_address = self.cri.image_service_address.as_ref();
        for (key, path) in [
            ("address", Some(&self.address)),
            ("control_address", Some(&self.control_address)),
            ("cri.image_service_address", cri_address),
            ("cri.containerd_address", Some(&self.cri.containerd_address)),
        ] {
            let Some(path) = path else { continue };
            if !path.is_absolute() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{path:?} must be an absolute path"),
                });
            }
        }
        if self.address == self.control_address {
            return Err(ConfigError::Invalid {
                key: "control_address",
                reason: "must differ from `address`".into(),
            });
        }
        if cri_address.is_some_and(|a| a == &self.address || a == &self.control_address) {
            return Err(ConfigError::Invalid {
                key: "cri.image_service_address",
                reason: "must differ from `address` and `control_address`".into(),
            });
        }
        if let Some(group) = &self.control_group {
            if group.is_empty() || group.contains([':', '\n']) || group.trim() != group {
                return Err(ConfigError::Invalid {
                    key: "control_group",
                    reason: format!("{group:?} is not a group name or id"),
                });
            }
        }
        if !(1..=MAX_DISPATCH_THREADS).contains(&self.fuse.dispatch_threads) {
            return Err(ConfigError::Invalid {
                key: "fuse.dispatch_threads",
                reason: format!(
                    "{} is not between 1 and {MAX_DISPATCH_THREADS}",
                    self.fuse.dispatch_threads
                ),
            });
        }
        if self.prefetch.concurrency == 0 {
            return Err(ConfigError::Invalid {
                key: "prefetch.concurrency",
                reason: "must be at least 1".into(),
            });
        }
        for (key, value) in [
            ("registry.request_timeout", self.registry.request_timeout),
            ("registry.read_deadline", self.registry.read_deadline),
            ("fuse.read_timeout", self.fuse.read_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be longer than zero".into(),
                });
            }
        }
        for (key, value) in self.limits.keys() {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1".into(),
                });
            }
        }
        tracing_subscriber::EnvFilter::try_new(self.log_filter()).map_err(|e| {
            ConfigError::Invalid {
                key: "log_level",
                reason: format!("{:?}: {e}", self.log_level),
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").expect("parse"), Config::default());
    }

    #[test]
    fn keys_are_read() {
        let c =
            Config::parse("root = \"/srv/ls\"\naddress = \"/run/x.sock\"\nlog_level = \"debug\"\n")
                .expect("parse");
        assert_eq!(c.root, PathBuf::from("/srv/ls"));
        assert_eq!(c.address, PathBuf::from("/run/x.sock"));
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn sections_and_durations() {
        let c = Config::parse(
            "[registry]\nread_deadline = \"3s\"\n[fuse]\nread_timeout = \"500ms\"\nlazy_pull = false\n[cache]\nmemory_bytes = 1024\n",
        )
        .expect("parse");
        assert_eq!(c.registry.read_deadline, Duration::from_secs(3));
        assert_eq!(c.fuse.read_timeout, Duration::from_millis(500));
        assert!(!c.fuse.lazy_pull);
        assert_eq!(c.cache.memory_bytes, 1024);
        assert_eq!(c.fuse.passthrough, Passthrough::Off);
        let c = Config::parse("[fuse]\npassthrough = \"on\"").expect("parse");
        assert!(c.fuse.passthrough.wanted());
        let err = Config::parse("[fuse]\npassthrough = \"maybe\"").expect_err("bad value");
        assert!(err.to_string().contains("passthrough"), "{err}");
        let err = Config::parse("[fuse]\nread_timeout = \"soon\"").expect_err("bad duration");
        assert!(err.to_string().contains("read_timeout"), "{err}");
        let err = Config::parse("[fuse]\nread_timeout = \"0s\"").expect_err("zero");
        assert!(err.to_string().contains("fuse.read_timeout"), "{err}");
        assert_eq!(c.fuse.dispatch_threads, 2);
        let c = Config::parse("[fuse]\ndispatch_threads = 1").expect("parse");
        assert_eq!(c.fuse.dispatch_threads, 1);
        for bad in [0, 17] {
            let err = Config::parse(&format!("[fuse]\ndispatch_threads = {bad}"))
                .expect_err("out of range");
            assert!(err.to_string().contains("fuse.dispatch_threads"), "{err}");
            assert!(err.to_string().contains(&bad.to_string()), "{err}");
        }
        let err = Config::parse("[cache]\nmemory = 1").expect_err("unknown key in a section");
        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn prefetch_and_metrics_sections() {
        let c = Config::parse(
            "[prefetch]\ntrace_window = \"5s\"\nbackground_fetch = true\nconcurrency = 2\n[metrics]\naddress = \"127.0.0.1:9645\"\n[cache]\ndisk_budget_bytes = 1000\n",
        )
        .expect("parse");
        assert_eq!(c.prefetch.trace_window, Duration::from_secs(5));
        assert!(c.prefetch.background_fetch);
        assert_eq!(c.prefetch.concurrency, 2);
        assert_eq!(
            c.metrics.address,
            Some("127.0.0.1:9645".parse().expect("addr"))
        );
        assert_eq!(c.cache.disk_budget_bytes, 1000);
        let err = Config::parse("[prefetch]\nconcurrency = 0").expect_err("zero");
        assert!(err.to_string().contains("prefetch.concurrency"), "{err}");
        let err = Config::parse("[metrics]\naddress = \"localhost\"").expect_err("no port");
        assert!(err.to_string().contains("address"), "{err}");
        let c = Config::parse("[cri]\nimage_service_address = \"/run/lazysnap/cri.sock\"\n")
            .expect("cri");
        assert_eq!(
            c.cri.image_service_address,
            Some(PathBuf::from("/run/lazysnap/cri.sock"))
        );
        let err =
            Config::parse("[cri]\nimage_service_address = \"cri.sock\"\n").expect_err("relative");
        assert!(
            err.to_string().contains("cri.image_service_address"),
            "{err}"
        );
        let err = Config::parse("control_address = \"/run/lazysnap/lazysnap.sock\"")
            .expect_err("same socket");
        assert!(err.to_string().contains("control_address"), "{err}");
    }

    #[test]
    fn control_group_is_read_and_resolved() {
        let c = Config::parse("control_group = \"root\"").expect("parse");
        assert_eq!(c.control_group.as_deref(), Some("root"));
        let (gid, name) = c.control_gid().expect("resolve").expect("set");
        assert_eq!((gid.as_raw(), name.as_str()), (0, "root"));
        let c = Config::parse("control_group = \"0\"").expect("parse numeric");
        assert_eq!(
            c.control_gid().expect("resolve").map(|g| g.0.as_raw()),
            Some(0)
        );
        assert_eq!(Config::default().control_gid().expect("unset"), None);
        let c = Config::parse("control_group = \"no-such-group-here\"").expect("parse");
        let err = c.control_gid().expect_err("unknown group");
        assert!(err.to_string().contains("`control_group`"), "{err}");
        let err = Config::parse("control_group = \"\"").expect_err("empty");
        assert!(err.to_string().contains("`control_group`"), "{err}");
        let err = Config::parse("control_group = 4").expect_err("not a string");
        assert!(err.to_string().contains("control_group"), "{err}");
    }

    #[test]
    fn the_shipped_config_is_the_defaults() {
        let text = include_str!("../packaging/config.toml");
        assert_eq!(Config::parse(text).expect("parse"), Config::default());
    }

    #[test]
    fn limits_section() {
        let c = Config::parse("[limits]\nmax_entries = 1000\nmax_chunk_bytes = 1048576\n")
            .expect("parse");
        assert_eq!(c.limits.max_entries, 1000);
        assert_eq!(c.limits.max_chunk_bytes, 1 << 20);
        assert_eq!(c.limits.max_name_bytes, 255);
        let err = Config::parse("[limits]\nmax_entries = 0").expect_err("zero");
        assert!(err.to_string().contains("`limits.max_entries`"), "{err}");
        let err = Config::parse("[limits]\nmax_names = 3").expect_err("unknown");
        assert!(err.to_string().contains("max_names"), "{err}");
        let err = Config::parse("[limits]\nmax_toc_bytes = -1").expect_err("negative");
        assert!(err.to_string().contains("max_toc_bytes"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("roots = \"/x\"").expect_err("unknown key");
        assert!(err.to_string().contains("roots"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::parse("root = \"relative\"").expect_err("relative root");
        assert!(err.to_string().contains("`root`"), "{err}");
        let err = Config::parse("log_level = \"lazysnap=loud\"").expect_err("bad level");
        assert!(err.to_string().contains("`log_level`"), "{err}");
        let err = Config::parse("root = 3").expect_err("wrong type");
        assert!(err.to_string().contains("root"), "{err}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/lazysnap.toml"))).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/lazysnap.toml"),
            "{err}"
        );
    }
}
