//! containerd's registry host configuration (`config_path`, e.g. `/etc/containerd/certs.d`):
//! `<dir>/<host>/hosts.toml` (or `<dir>/_default/hosts.toml`) lists mirrors to try in order
//! before the origin `server`, each with its TLS settings and extra headers.
//!
//! ```toml
//! server = "https://registry.example.com"
//! [host."http://mirror.local:5000"]
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = false
//!   ca = "/etc/certs/mirror-ca.pem"
//!   override_path = false
//!   [host."http://mirror.local:5000".header]
//!     x-team = "infra"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::reference::Reference;

/// One place to read blobs from, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL blob paths are appended to, ending in `/v2` unless `override_path` was set.
    pub base: String,
    /// The origin registry (last in the list) rather than a mirror.
    pub is_origin: bool,
    /// May resolve tags to manifests (capability `resolve`; containerd's default for a host
    /// that lists no capabilities). Content fetched by digest needs only `pull`.
    pub resolves: bool,
    pub skip_verify: bool,
    pub ca: Vec<PathBuf>,
    pub headers: Vec<(String, String)>,
}

impl Endpoint {
    pub fn blob_url(&self, repository: &str, digest: &str) -> String {
        format!("{}/{repository}/blobs/{digest}", self.base)
    }

    /// Host and port, for logs and credentials.
    pub fn host(&self) -> &str {
        let rest = self
            .base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest)
    }
}

/// Why a hosts.toml was refused; names the file.
///
/// TOML errors are kept as their message and line rather than as a `#[source]`: a
/// `toml::de::Error` prints the offending line of the file, and hosts.toml `header` tables
/// often carry `Authorization` values that must not reach logs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("{} is not valid hosts.toml{}: {message}", path.display(), at_line(*line))]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}: host {url:?}: {message}", path.display())]
    Entry {
        path: PathBuf,
        url: String,
        message: String,
    },
    #[error("{}: host {url:?} must start with http:// or https://", path.display())]
    Scheme { path: PathBuf, url: String },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    host: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    skip_verify: bool,
    ca: Option<CaList>,
    override_path: bool,
    header: BTreeMap<String, HeaderValue>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CaList {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HeaderValue {
    One(String),
    Many(Vec<String>),
}

/// How often a cached hosts.toml is looked at again: often enough that an operator's edit
/// takes effect within a second, rarely enough that a burst of chunk reads costs one `stat`
/// per host and second instead of one read and parse per request.
pub const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// Hosts whose configuration is remembered; beyond this the cache starts over (re-reading a
/// file is cheap, an unbounded map is not).
const MAX_CACHED_HOSTS: usize = 1024;

/// What identifies one version of a hosts file without reading it: an editor that writes in
/// place changes mtime and usually length, one that renames a new file over it changes the
/// inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

struct Cached {
    checked: Instant,
    /// The file the endpoints came from and its stamp; `None` when there was no file.
    source: Option<(PathBuf, Stamp)>,
    endpoints: Result<Vec<Endpoint>, HostsError>,
}

/// Parsed hosts.toml per registry host, re-read only when the file changed (or appeared or
/// vanished); a missing file is remembered as missing too.
pub struct HostsCache {
    dir: Option<PathBuf>,
    recheck: Duration,
    entries: Mutex<HashMap<String, Cached>>,
}

impl HostsCache {
    pub fn new(dir: Option<PathBuf>, recheck: Duration) -> Self {
        HostsCache {
            dir,
            recheck,
            entries: Mutex::default(),
        }
    }

    /// The endpoints for `reference`: mirrors from the hosts file (those that may `pull`),
    /// then the origin. Without a hosts file, just the origin.
    pub fn endpoints(&self, reference: &Reference) -> Result<Vec<Endpoint>, HostsError> {
        let Some(dir) = &self.dir else {
            return Ok(vec![origin(reference)]);
        };
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = entries.get(&reference.host) {
            if now.duration_since(cached.checked) < self.recheck {
                return cached.endpoints.clone();
            }
        }
        // The stat and read happen under the lock: they are local and small, and this keeps
        // concurrent readers from parsing the same file at once.
        let found = find_file(dir, &reference.host);
        if let Some(cached) = entries.get_mut(&reference.host) {
            if cached.source == found {
                cached.checked = now;
                return cached.endpoints.clone();
            }
        }
        let endpoints = match &found {
            None => Ok(vec![origin(reference)]),
            Some((path, _)) => load(path, origin(reference)),
        };
        if entries.len() >= MAX_CACHED_HOSTS && !entries.contains_key(&reference.host) {
            entries.clear();
        }
        entries.insert(
            reference.host.clone(),
            Cached {
                checked: now,
                source: found,
                endpoints: endpoints.clone(),
            },
        );
        endpoints
    }
}

fn origin(reference: &Reference) -> Endpoint {
    Endpoint {
        base: reference.api_base_url(),
        is_origin: true,
        resolves: true,
        skip_verify: false,
        ca: Vec::new(),
        headers: Vec::new(),
    }
}

/// The hosts file that applies to `host` (its own, else `_default`) and its stamp.
fn find_file(dir: &Path, host: &str) -> Option<(PathBuf, Stamp)> {
    [host, "_default"].iter().find_map(|h| {
        let path = dir.join(h).join("hosts.toml");
        let meta = std::fs::metadata(&path).ok()?;
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        };
        Some((path, stamp))
    })
}

fn load(path: &Path, origin: Endpoint) -> Result<Vec<Endpoint>, HostsError> {
    let text = std::fs::read_to_string(path).map_err(|e| HostsError::Read {
        path: path.to_owned(),
        source: Arc::new(e),
    })?;
    parse(path, &text, origin)
}

fn parse(path: &Path, text: &str, mut origin: Endpoint) -> Result<Vec<Endpoint>, HostsError> {
    let file: HostsFile = toml::from_str(text).map_err(|e| HostsError::Syntax {
        path: path.to_owned(),
        line: e
            .span()
            .and_then(|span| text.get(..span.start))
            .map(|before| before.matches('\n').count() + 1),
        message: e.message().trim_end().to_owned(),
    })?;
    if let Some(server) = &file.server {
        origin.base = format!("{}/v2", server.trim_end_matches('/'));
    }
    let mut out = Vec::new();
    // toml::Table keeps the file's order (preserve_order), which is the order to try.
    for (url, value) in &file.host {
        let entry: HostEntry =
            value
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| HostsError::Entry {
                    path: path.to_owned(),
                    url: url.clone(),
                    message: e.message().trim_end().to_owned(),
                })?;
        let pulls = entry
            .capabilities
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c == "pull"));
        if !pulls {
            continue;
        }
        let resolves = entry
            .capabilities
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c == "resolve"));
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(HostsError::Scheme {
                path: path.to_owned(),
                url: url.clone(),
            });
        }
        let url = url.trim_end_matches('/');
        let base = if entry.override_path {
            url.to_owned()
        } else {
            format!("{url}/v2")
        };
        let ca = match entry.ca {
            None => Vec::new(),
            Some(CaList::One(p)) => vec![p],
            Some(CaList::Many(v)) => v,
        };
        let headers = entry
            .header
            .into_iter()
            .flat_map(|(k, v)| match v {
                HeaderValue::One(v) => vec![(k.clone(), v)],
                HeaderValue::Many(vs) => vs.into_iter().map(|v| (k.clone(), v)).collect(),
            })
            .collect();
        let endpoint = Endpoint {
            base,
            is_origin: false,
            resolves,
            skip_verify: entry.skip_verify,
            ca,
            headers,
        };
        if endpoint.base == origin.base {
            origin = Endpoint {
                is_origin: true,
                resolves: true,
                ..endpoint
            };
        } else {
            out.push(endpoint);
        }
    }
    out.push(origin);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Endpoint {
        Endpoint {
            base: "https://registry.example/v2".into(),
            is_origin: true,
            resolves: true,
            skip_verify: false,
            ca: Vec::new(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn mirrors_in_file_order_then_origin() {
        let text = r#"
server = "https://origin.example"
[host."http://mirror-b:5000"]
  capabilities = ["pull", "resolve"]
  [host."http://mirror-b:5000".header]
    x-team = "infra"
[host."https://push-only.example"]
  capabilities = ["push"]
[host."https://mirror-a.example/prefix"]
  override_path = true
  skip_verify = true
  ca = ["/etc/a.pem", "/etc/b.pem"]
"#;
        let e = parse(Path::new("hosts.toml"), text, origin()).expect("parse");
        let bases: Vec<&str> = e.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            vec![
                "http://mirror-b:5000/v2",
                "https://mirror-a.example/prefix",
                "https://origin.example/v2"
            ]
        );
        assert_eq!(
            e[0].headers,
            vec![("x-team".to_string(), "infra".to_string())]
        );
        assert!(e[1].skip_verify && e[1].ca.len() == 2);
        assert!(e[2].is_origin && !e[0].is_origin);
        // A host without capabilities may resolve tags, as in containerd.
        assert!(e[0].resolves && e[1].resolves && e[2].resolves);
        assert_eq!(e[0].host(), "mirror-b:5000");
        assert_eq!(
            e[0].blob_url("a/b", "sha256:x"),
            "http://mirror-b:5000/v2/a/b/blobs/sha256:x"
        );
    }

    #[test]
    fn a_mirror_that_may_only_pull_does_not_resolve_tags() {
        let text = "[host.\"http://cache:5000\"]\n  capabilities = [\"pull\"]\n";
        let e = parse(Path::new("hosts.toml"), text, origin()).expect("parse");
        assert_eq!(e.len(), 2);
        assert!(!e[0].resolves, "pull only");
        assert!(e[1].is_origin && e[1].resolves);
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let path = Path::new("/etc/containerd/certs.d/r/hosts.toml");
        let err = parse(path, "\n\nserver = [", origin()).expect_err("bad toml");
        assert!(
            matches!(err, HostsError::Syntax { line: Some(3), .. }),
            "{err:?}"
        );
        let err = parse(path, "[host.\"mirror:5000\"]\n", origin()).expect_err("no scheme");
        assert!(matches!(err, HostsError::Scheme { .. }), "{err}");
        assert!(err.to_string().contains("http://"), "{err}");
        assert!(err.to_string().contains("certs.d/r/hosts.toml"), "{err}");
        let err = parse(path, "[host.\"http://m\"]\nskip_verify = \"x\"\n", origin())
            .expect_err("bad entry");
        assert!(matches!(err, HostsError::Entry { .. }), "{err}");
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write hosts.toml");
    }

    fn bases(cache: &HostsCache, reference: &Reference) -> Vec<String> {
        cache
            .endpoints(reference)
            .expect("endpoints")
            .into_iter()
            .map(|e| e.base)
            .collect()
    }

    #[test]
    fn hosts_cache_sees_edits_new_files_and_removals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reference = Reference::parse("127.0.0.1:5000/a/b:1").expect("reference");
        let cache = HostsCache::new(Some(dir.path().to_owned()), Duration::ZERO);
        assert_eq!(
            bases(&cache, &reference),
            vec!["http://127.0.0.1:5000/v2"],
            "no file: the origin alone"
        );

        let default = dir.path().join("_default/hosts.toml");
        write(&default, "[host.\"http://m-default:1\"]\n");
        assert_eq!(
            bases(&cache, &reference),
            vec!["http://m-default:1/v2", "http://127.0.0.1:5000/v2"],
            "a file that appears is used"
        );

        let own = dir.path().join("127.0.0.1:5000/hosts.toml");
        write(&own, "[host.\"http://m1:1\"]\n");
        assert_eq!(
            bases(&cache, &reference),
            vec!["http://m1:1/v2", "http://127.0.0.1:5000/v2"],
            "the host's own file wins over _default"
        );

        // Same length, so only mtime (and, for editors that rename, the inode) tells.
        std::thread::sleep(Duration::from_millis(20));
        write(&own, "[host.\"http://m2:1\"]\n");
        assert_eq!(
            bases(&cache, &reference),
            vec!["http://m2:1/v2", "http://127.0.0.1:5000/v2"],
            "an edit in place is seen"
        );

        write(&own, "[host.\"m3\"]\n");
        assert!(
            matches!(cache.endpoints(&reference), Err(HostsError::Scheme { .. })),
            "a broken edit is reported"
        );

        std::fs::remove_file(&own).expect("rm");
        std::fs::remove_file(&default).expect("rm");
        assert_eq!(
            bases(&cache, &reference),
            vec!["http://127.0.0.1:5000/v2"],
            "removing the files goes back to the origin"
        );
    }

    #[test]
    fn hosts_cache_does_not_look_again_within_the_recheck_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reference = Reference::parse("127.0.0.1:5000/a/b:1").expect("reference");
        let own = dir.path().join("127.0.0.1:5000/hosts.toml");
        write(&own, "[host.\"http://m1:1\"]\n");
        let cache = HostsCache::new(Some(dir.path().to_owned()), Duration::from_secs(3600));
        assert_eq!(bases(&cache, &reference)[0], "http://m1:1/v2");
        std::fs::remove_file(&own).expect("rm");
        assert_eq!(
            bases(&cache, &reference)[0],
            "http://m1:1/v2",
            "served from the cache, not the disk"
        );

        // A missing file is remembered as missing as well.
        let other = Reference::parse("127.0.0.1:6000/a/b:1").expect("reference");
        assert_eq!(bases(&cache, &other), vec!["http://127.0.0.1:6000/v2"]);
        write(
            &dir.path().join("127.0.0.1:6000/hosts.toml"),
            "[host.\"http://m9:1\"]\n",
        );
        assert_eq!(bases(&cache, &other), vec!["http://127.0.0.1:6000/v2"]);
    }
}
