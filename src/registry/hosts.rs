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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::reference::Reference;

/// One place to read blobs from, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL blob paths are appended to, ending in `/v2` unless `override_path` was set.
    pub base: String,
    /// The origin registry (last in the list) rather than a mirror.
    pub is_origin: bool,
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
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct HostsError {
    pub path: PathBuf,
    pub reason: String,
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

/// The endpoints for `reference`: mirrors from the hosts file (those that may `pull`), then
/// the origin. Without a hosts file, just the origin.
pub fn endpoints(
    hosts_dir: Option<&Path>,
    reference: &Reference,
) -> Result<Vec<Endpoint>, HostsError> {
    let origin = Endpoint {
        base: reference.api_base_url(),
        is_origin: true,
        skip_verify: false,
        ca: Vec::new(),
        headers: Vec::new(),
    };
    let Some(dir) = hosts_dir else {
        return Ok(vec![origin]);
    };
    let path = [reference.host.as_str(), "_default"]
        .iter()
        .map(|h| dir.join(h).join("hosts.toml"))
        .find(|p| p.exists());
    let Some(path) = path else {
        return Ok(vec![origin]);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| HostsError {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    parse(&text, origin).map_err(|reason| HostsError { path, reason })
}

fn parse(text: &str, mut origin: Endpoint) -> Result<Vec<Endpoint>, String> {
    let file: HostsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if let Some(server) = &file.server {
        origin.base = format!("{}/v2", server.trim_end_matches('/'));
    }
    let mut out = Vec::new();
    // toml::Table keeps the file's order (preserve_order), which is the order to try.
    for (url, value) in &file.host {
        let entry: HostEntry = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| format!("host {url:?}: {e}"))?;
        let pulls = entry
            .capabilities
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c == "pull"));
        if !pulls {
            continue;
        }
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!("host {url:?} must start with http:// or https://"));
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
            skip_verify: entry.skip_verify,
            ca,
            headers,
        };
        if endpoint.base == origin.base {
            origin = Endpoint {
                is_origin: true,
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
        let e = parse(text, origin()).expect("parse");
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
        assert_eq!(e[0].host(), "mirror-b:5000");
        assert_eq!(
            e[0].blob_url("a/b", "sha256:x"),
            "http://mirror-b:5000/v2/a/b/blobs/sha256:x"
        );
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        assert!(parse("server = [", origin()).is_err());
        let err = parse("[host.\"mirror:5000\"]\n", origin()).expect_err("no scheme");
        assert!(err.contains("http://"), "{err}");
    }
}
