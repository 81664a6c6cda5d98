//! Image references as containerd writes them in snapshot labels: `host[:port]/repo[:tag]`,
//! `repo@sha256:...`, and Docker Hub short forms.

use std::fmt;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host as written (`127.0.0.1:5000`, `docker.io`).
    pub host: String,
    pub repository: String,
    /// Tag or `sha256:` digest; blob reads do not need it, but logs name it.
    pub object: String,
}

/// Why a reference string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {problem}")]
pub struct ReferenceError {
    pub input: String,
    pub problem: ReferenceProblem,
}

/// What is wrong with a refused reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceProblem {
    #[error("empty")]
    Empty,
    #[error("contains whitespace")]
    Whitespace,
    #[error("no repository")]
    NoRepository,
    #[error("empty tag or digest")]
    NoObject,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let bad = |problem| ReferenceError {
            input: input.to_owned(),
            problem,
        };
        if input.is_empty() {
            return Err(bad(ReferenceProblem::Empty));
        }
        if input.contains(char::is_whitespace) {
            return Err(bad(ReferenceProblem::Whitespace));
        }
        let (name, object) = match input.split_once('@') {
            Some((name, digest)) => (name, digest.to_owned()),
            None => match input.rsplit_once(':') {
                // a colon after the last slash is a tag, before it a port
                Some((name, tag)) if !tag.contains('/') => (name, tag.to_owned()),
                _ => (input, "latest".to_owned()),
            },
        };
        let (host, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        let repository = if host == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() {
            return Err(bad(ReferenceProblem::NoRepository));
        }
        if object.is_empty() {
            return Err(bad(ReferenceProblem::NoObject));
        }
        Ok(Reference {
            host,
            repository,
            object,
        })
    }

    /// Whether the registry is on this machine, where containerd too talks plain HTTP.
    pub fn is_loopback(&self) -> bool {
        let host = self
            .host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(h, p)| {
                if p.chars().all(|c| c.is_ascii_digit()) {
                    h
                } else {
                    self.host.as_str()
                }
            });
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false)
    }

    /// The registry API's base URL (`.../v2`) for this host: plain HTTP on loopback, as
    /// containerd does, HTTPS elsewhere.
    pub fn api_base_url(&self) -> String {
        let host = if self.host == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.host
        };
        let scheme = if self.is_loopback() { "http" } else { "https" };
        format!("{scheme}://{host}/v2")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.object.contains(':') { '@' } else { ':' };
        write!(f, "{}/{}{sep}{}", self.host, self.repository, self.object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_containerd_writes() {
        let r = Reference::parse("127.0.0.1:5000/ns/img:esgz").expect("parse");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.object.as_str()),
            ("127.0.0.1:5000", "ns/img", "esgz")
        );
        assert!(r.is_loopback());
        assert_eq!(r.api_base_url(), "http://127.0.0.1:5000/v2");
        let r = Reference::parse("ghcr.io/a/b@sha256:abc").expect("parse");
        assert_eq!(r.object, "sha256:abc");
        assert_eq!(r.api_base_url(), "https://ghcr.io/v2");
        let r = Reference::parse("busybox").expect("parse");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.object.as_str()),
            ("docker.io", "library/busybox", "latest")
        );
        assert_eq!(r.api_base_url(), "https://registry-1.docker.io/v2");
        assert!(Reference::parse("localhost:5000/x")
            .expect("parse")
            .is_loopback());
        let problem = |input| Reference::parse(input).map_err(|e| e.problem).err();
        assert_eq!(problem(""), Some(ReferenceProblem::Empty));
        assert_eq!(problem("a b"), Some(ReferenceProblem::Whitespace));
        assert_eq!(problem("ghcr.io/"), Some(ReferenceProblem::NoRepository));
        assert_eq!(problem("ghcr.io/a/b:"), Some(ReferenceProblem::NoObject));
        let err = Reference::parse("a b").expect_err("whitespace");
        assert_eq!(
            err.to_string(),
            "invalid image reference \"a b\": contains whitespace"
        );
    }
}
