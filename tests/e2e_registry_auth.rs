//! Lazy pulls from private registries, without CRI: the standard image pushed to a
//! docker-registry that demands HTTP basic credentials (htpasswd) or bearer tokens (the Docker
//! token flow, from a token server of the harness), converted to eStargz and pulled with
//! `ctr-remote image rpull --user`. lazysnap takes its own credentials from the docker
//! `config.json` its config names: with the right password every layer is mounted lazily and
//! read through the registry's auth; with a wrong one every layer falls back to the ordinary
//! path and lazysnap's log says authentication failed. Neither the password nor any token
//! ever reaches a log.

mod harness;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use harness::auth::{self, AuthKind, AuthRegistry};
use harness::{image, Stack};
use sha2::{Digest as _, Sha256};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const USER: &str = "lazysnap-tester";

/// The private registry is started before the Stack (lazysnap's config names its host), so
/// the Stack's own one-at-a-time lock comes too late: tests of this file take turns here.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const LAZY_MOUNT_FAILED: &str = "lazy mount failed; falling back to download and unpack";
const MOUNTED_LAZILY: &str = "layer mounted lazily";

/// Writes lazysnap's config (docker config with `user:password` for `host`, an empty hosts
/// directory so the machine's `/etc/containerd/certs.d` cannot interfere); returns its path.
fn lazysnap_config(dir: &Path, host: &str, password: &str) -> PathBuf {
    let docker_config = dir.join("docker-config.json");
    std::fs::write(&docker_config, auth::docker_config(host, USER, password))
        .expect("write docker config");
    let hosts_dir = dir.join("certs.d");
    std::fs::create_dir_all(&hosts_dir).expect("create hosts dir");
    let config = dir.join("lazysnap.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\ndocker_config = \"{}\"\nhosts_dir = \"{}\"\n",
            docker_config.display(),
            hosts_dir.display()
        ),
    )
    .expect("write lazysnap config");
    config
}

/// Top-level `*.log` files of `dir` (not walking into snapshot mounts).
fn logs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read stack dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log") && p.is_file())
        .collect();
    out.sort();
    out
}

/// Fails if any of `secrets` appears in any of `files`.
fn assert_absent(files: &[PathBuf], secrets: &[(&str, String)]) {
    for file in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (what, secret) in secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} appears in {}",
                file.display()
            );
        }
    }
}

/// A temporary directory kept (and named) instead of removed when LAZYSNAP_KEEP_TMP is set.
struct Tmp(tempfile::TempDir);

impl Drop for Tmp {
    fn drop(&mut self) {
        if std::env::var_os("LAZYSNAP_KEEP_TMP").is_some() {
            let dir = std::mem::replace(&mut self.0, tempfile::tempdir().expect("temp dir"));
            eprintln!("kept test directory {}", dir.keep().display());
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn private_registry_lazy_pull(kind: AuthKind, lazysnap_has_the_password: bool) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    harness::require_root();
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("lazysnap-auth-")
        .tempdir()
        .expect("temp dir");
    // Kept, like the Stack's directory, with LAZYSNAP_KEEP_TMP set.
    let tmp = Tmp(tmp);
    let password = format!("pw-{}", auth::random_hex(12));
    let wrong_password = format!("wrong-{}", auth::random_hex(12));
    let registry = match kind {
        AuthKind::Basic => AuthRegistry::basic(tmp.0.path(), USER, &password),
        AuthKind::Token => AuthRegistry::token(tmp.0.path(), USER, &password),
        AuthKind::Anonymous => unreachable!("private registries only"),
    };
    let lazysnap_password = if lazysnap_has_the_password {
        &password
    } else {
        &wrong_password
    };
    let config = lazysnap_config(tmp.0.path(), registry.host(), lazysnap_password);
    let stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );

    let spec = image::standard_image();
    registry.push(&spec, "app:gzip");
    // Anonymous access is refused: the registry really is private.
    let anonymous = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--no-creds"])
        .arg(format!("docker://{}", registry.image_ref("app:gzip")))
        .output()
        .expect("run skopeo");
    assert!(
        !anonymous.status.success(),
        "anonymous access to the private registry must fail"
    );
    let plain = registry.image_ref("app:gzip");
    let lazy = registry.image_ref("app:esgz");
    registry.convert_and_push(&stack, &plain, &lazy, &["--estargz"]);
    let tokens_before_pull = registry.token_server().map(|t| t.requests().len());

    let pull_started = Instant::now();
    registry.rpull(&stack, &lazy);
    let pull_time = pull_started.elapsed();
    let log = stack.lazysnap_log();
    let mounted = log.matches(MOUNTED_LAZILY).count();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(LAZY_MOUNT_FAILED))
        .collect();

    // What the container sees is right either way (lazily or through the ordinary path).
    let big = spec.layers[1]
        .iter()
        .find_map(|e| match e {
            image::Entry::File { path, data, .. } if path == "data/big.bin" => Some(data),
            _ => None,
        })
        .expect("big.bin in the standard image");
    let out = stack.run(
        "lazysnap",
        &lazy,
        "reader",
        "cat /data/small.txt /top.txt; sha256sum /data/big.bin | cut -d' ' -f1",
    );
    assert_eq!(
        out,
        format!("hello from layer 2\nlayer 3\n{}\n", sha256_hex(big)),
        "file contents in the container"
    );

    let lazysnap_requests: Vec<auth::AccessEntry> = registry
        .requests()
        .into_iter()
        .filter(auth::AccessEntry::by_lazysnap)
        .collect();
    if lazysnap_has_the_password {
        assert_eq!(mounted, 3, "every layer mounted lazily:\n{log}");
        assert!(failed.is_empty(), "no lazy mount failed:\n{log}");
        let layers = stack.lazy_layers();
        assert_eq!(layers.len(), 3, "three lazy layers saved: {layers:?}");
        // The chunks of big.bin came through the registry's auth, as lazysnap's own reads.
        let (big_layer, _) = &layers[0];
        assert!(
            lazysnap_requests
                .iter()
                .any(|r| r.is_range_get_of(big_layer)),
            "lazysnap read ranges of {big_layer} from the registry:\n{}",
            registry.access_log()
        );
        assert!(
            lazysnap_requests.iter().any(|r| r.status == 401),
            "lazysnap was challenged (the registry is private):\n{}",
            registry.access_log()
        );
        // Once it knows how the registry authenticates, lazysnap sends that up front: a 401
        // per request would double the round trips of every chunk read. The unauthenticated
        // `GET /v2/` that open connections ahead of the image's first requests are answered
        // 401 here by design (they wait on no one, and their answer only keeps the
        // connection), so they are not among the requests counted.
        let reads: Vec<&auth::AccessEntry> = lazysnap_requests
            .iter()
            .filter(|r| !(r.method == "GET" && r.path == "/v2/"))
            .collect();
        let challenged = reads.iter().filter(|r| r.status == 401).count();
        assert!(
            challenged * 4 <= reads.len(),
            "{challenged} of {} requests were challenged:\n{}",
            reads.len(),
            registry.access_log()
        );
        if kind == AuthKind::Token {
            let issued: Vec<auth::TokenRequest> = registry
                .tokens_issued()
                .into_iter()
                .filter(auth::TokenRequest::by_lazysnap)
                .collect();
            assert!(
                !issued.is_empty(),
                "the token server issued tokens to lazysnap: {:?}",
                registry.token_server().map(|t| t.requests())
            );
            for request in &issued {
                assert_eq!(request.user.as_deref(), Some(USER));
                assert_eq!(request.service.as_deref(), Some(auth::TOKEN_SERVICE));
                assert_eq!(request.scopes, vec!["repository:app:pull".to_owned()]);
            }
            // One token serves every layer of the repository until it expires.
            assert!(
                issued.len() <= 3,
                "lazysnap asked for {} tokens for one repository",
                issued.len()
            );
        }
    } else {
        assert_eq!(mounted, 0, "no layer may be mounted lazily:\n{log}");
        assert!(stack.lazy_layers().is_empty());
        assert_eq!(
            failed.len(),
            3,
            "every layer fell back to the ordinary path:\n{log}"
        );
        let expected = format!("authentication failed at {}", registry.host());
        for line in &failed {
            assert!(
                line.contains(&expected),
                "the fallback says authentication failed ({expected:?}): {line}"
            );
        }
        assert!(
            !lazysnap_requests
                .iter()
                .any(|r| r.status == 200 || r.status == 206),
            "lazysnap got no blob data:\n{}",
            registry.access_log()
        );
        if kind == AuthKind::Token {
            let refused: Vec<auth::TokenRequest> = registry
                .token_server()
                .expect("token server")
                .requests()
                .into_iter()
                .skip(tokens_before_pull.unwrap_or(0))
                .filter(auth::TokenRequest::by_lazysnap)
                .collect();
            assert!(
                !refused.is_empty() && refused.iter().all(|r| r.status == 401),
                "the token server refused lazysnap: {refused:?}"
            );
        }
        eprintln!("fallback line: {}", failed[0]);
    }

    // No secret in any log: the password nowhere; tokens not in lazysnap's (or containerd's)
    // logs (the registry and token server are allowed to name their own tokens, and don't).
    let basic_header_value = |p: &str| {
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{USER}:{p}"),
        )
    };
    let mut all_logs = logs_in(&stack.dir);
    assert!(
        all_logs.len() >= 3,
        "lazysnap, containerd and registry logs in {}: {all_logs:?}",
        stack.dir.display()
    );
    let ours = all_logs.clone();
    all_logs.extend(registry.log_files());
    assert_absent(
        &all_logs,
        &[
            ("the password", password.clone()),
            ("the wrong password", wrong_password.clone()),
            ("the basic credentials", basic_header_value(&password)),
            (
                "the wrong basic credentials",
                basic_header_value(&wrong_password),
            ),
        ],
    );
    if let Some(server) = registry.token_server() {
        let tokens = server.tokens();
        assert!(!tokens.is_empty(), "tokens were issued (to ctr and skopeo)");
        let secrets: Vec<(&str, String)> = tokens
            .into_iter()
            .flat_map(|t| {
                // the signature alone is as secret as the token
                let signature = t.rsplit('.').next().unwrap_or_default().to_owned();
                [
                    ("an issued token", t),
                    ("an issued token's signature", signature),
                ]
            })
            .collect();
        assert_absent(&ours, &secrets);
    }
    eprintln!(
        "{kind:?} auth, lazysnap {} the password: rpull {pull_time:?}, test {:?}",
        if lazysnap_has_the_password {
            "has"
        } else {
            "lacks"
        },
        started.elapsed()
    );
}

#[test]
fn basic_auth_registry_layers_mount_lazily() {
    private_registry_lazy_pull(AuthKind::Basic, true);
}

#[test]
fn token_auth_registry_layers_mount_lazily() {
    private_registry_lazy_pull(AuthKind::Token, true);
}

#[test]
fn basic_auth_with_a_wrong_password_falls_back_and_says_so() {
    private_registry_lazy_pull(AuthKind::Basic, false);
}

#[test]
fn token_auth_with_a_wrong_password_falls_back_and_says_so() {
    private_registry_lazy_pull(AuthKind::Token, false);
}
