//! The Kubernetes path, spoken as the kubelet speaks it: a CRI client pulls through lazysnap's
//! CRI image service (which forwards to containerd's CRI and keeps pull secrets) and runs a
//! pod through containerd's CRI runtime service; containerd's CRI plugin uses lazysnap as its
//! snapshotter with snapshot annotations on. Public and private (basic auth, token auth)
//! images are pulled lazily with `PullImage` credentials only, and a wrong password fails the
//! pull with an error that says authentication failed.

mod harness;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{auth::AuthRegistry, image, Stack};
use lazysnap::grpc::proto::cri;
use tonic::transport::{Channel, Endpoint};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

type Images = cri::image_service_client::ImageServiceClient<Channel>;
type Runtime = cri::runtime_service_client::RuntimeServiceClient<Channel>;

/// A kubelet's two CRI connections: images through lazysnap, runtime to containerd.
struct Kubelet {
    rt: tokio::runtime::Runtime,
    images: Images,
    runtime: Runtime,
}

fn channel(rt: &tokio::runtime::Runtime, socket: &Path) -> Channel {
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(10));
    rt.block_on(endpoint.connect())
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()))
}

impl Kubelet {
    fn new(stack: &Stack) -> Kubelet {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let images = Images::new(channel(&rt, &stack.cri_socket()));
        let runtime = Runtime::new(channel(&rt, &stack.containerd_socket()));
        Kubelet {
            rt,
            images,
            runtime,
        }
    }

    fn pull(
        &mut self,
        image: &str,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, tonic::Status> {
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth,
            sandbox_config: None,
        };
        self.rt
            .block_on(self.images.pull_image(request))
            .map(|r| r.into_inner().image_ref)
    }
}

fn sandbox_config(stack: &Stack, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: stack.path(&format!("pods/{name}")).display().to_string(),
        labels: HashMap::new(),
        annotations: HashMap::new(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                // Host networking: no CNI on the test machine, as on many CI nodes.
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                }),
            }),
        }),
    }
}

/// Runs `script` in a container of `image` in a new pod, waits for it to exit and returns
/// what it printed, from its CRI log file; removes container and pod.
fn run_pod(kubelet: &mut Kubelet, stack: &Stack, name: &str, image: &str, script: &str) -> String {
    let config = sandbox_config(stack, name);
    let rt = &kubelet.rt;
    let runtime = &mut kubelet.runtime;
    let pod = rt
        .block_on(runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        }))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", stack.diagnostics()))
        .into_inner()
        .pod_sandbox_id;
    let container = rt
        .block_on(runtime.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                log_path: format!("{name}.log"),
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        }))
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", stack.diagnostics()))
        .into_inner()
        .container_id;
    rt.block_on(runtime.start_container(cri::StartContainerRequest {
        container_id: container.clone(),
    }))
    .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", stack.diagnostics()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = rt
            .block_on(runtime.container_status(cri::ContainerStatusRequest {
                container_id: container.clone(),
                verbose: false,
            }))
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status");
        if status.state == cri::ContainerState::ContainerExited as i32 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "container did not exit in time: {status:?}\n{}",
            stack.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.exit_code, 0, "{status:?}");
    let log = PathBuf::from(&config.log_directory).join(format!("{name}.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    // CRI log lines: "<RFC 3339 time> stdout F <text>".
    let printed: String = text
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .map(|l| format!("{l}\n"))
        .collect();
    rt.block_on(runtime.remove_container(cri::RemoveContainerRequest {
        container_id: container,
    }))
    .expect("RemoveContainer");
    rt.block_on(runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    }))
    .expect("StopPodSandbox");
    rt.block_on(runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    }))
    .expect("RemovePodSandbox");
    printed
}

/// The sandbox ("pause") image: busybox sleeping until the pod is stopped.
fn push_pause(stack: &Stack) {
    let spec = image::ImageSpec {
        layers: vec![image::busybox_layer()],
        blobs: Vec::new(),
        cmd: vec!["/bin/sleep".into(), "86400".into()],
    };
    image::push(&spec, &stack.dir, &stack.pause_image_ref());
}

/// FUSE mounts of lazy layers under lazysnap's root.
fn fuse_mounts(stack: &Stack) -> usize {
    let root = stack.lazysnap_root().display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&root) && l.contains(" - fuse"))
        .count()
}

#[test]
fn cri_pulls_an_estargz_image_lazily_and_runs_a_pod_from_it() {
    let stack = Stack::start_cri(LAZYSNAP, "");
    push_pause(&stack);
    let plain = stack.image_ref("app:gzip");
    image::push(&image::standard_image(), &stack.dir, &plain);
    let lazy = stack.image_ref("app:esgz");
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);
    let mut kubelet = Kubelet::new(&stack);

    let before = stack.registry_blob_bytes();
    let image_ref = kubelet
        .pull(&lazy, None)
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", stack.diagnostics()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    let layers = stack.lazy_layers();
    assert_eq!(layers.len(), 3, "every layer mounted lazily: {layers:?}");
    assert!(fuse_mounts(&stack) >= 3, "FUSE mounts under the root");
    let compressed: u64 = layers.iter().map(|(_, size)| size).sum();
    let fetched: u64 = layers
        .iter()
        .map(|(digest, _)| stack.registry_blob_bytes_of(digest))
        .sum();
    eprintln!(
        "PullImage read {fetched} bytes of the layers' {compressed} ({:.2}%); {} bytes of blobs in all",
        fetched as f64 * 100.0 / compressed as f64,
        stack.registry_blob_bytes() - before
    );
    assert!(
        fetched * 20 <= compressed,
        "{fetched} of {compressed} bytes at pull"
    );

    let status = kubelet
        .rt
        .block_on(kubelet.images.image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: lazy.clone(),
                ..Default::default()
            }),
            verbose: false,
        }))
        .expect("ImageStatus")
        .into_inner();
    assert!(status.image.is_some_and(|i| i.repo_tags.contains(&lazy)));
    let fs = kubelet
        .rt
        .block_on(kubelet.images.image_fs_info(cri::ImageFsInfoRequest {}))
        .expect("ImageFsInfo")
        .into_inner();
    assert!(!fs.image_filesystems.is_empty(), "{fs:?}");

    let out = run_pod(
        &mut kubelet,
        &stack,
        "reader",
        &lazy,
        "cat /data/small.txt /top.txt",
    );
    assert_eq!(out, "hello from layer 2\nlayer 3\n");

    kubelet
        .rt
        .block_on(kubelet.images.remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: lazy.clone(),
                ..Default::default()
            }),
        }))
        .expect("RemoveImage");
    let listed = kubelet
        .rt
        .block_on(
            kubelet
                .images
                .list_images(cri::ListImagesRequest { filter: None }),
        )
        .expect("ListImages")
        .into_inner();
    assert!(
        !listed.images.iter().any(|i| i.repo_tags.contains(&lazy)),
        "{listed:?}"
    );
}

/// Pushes the standard image, converted to eStargz, to a private registry.
fn push_private(stack: &Stack, registry: &AuthRegistry) -> String {
    registry.push(&image::standard_image(), "private:gzip");
    let plain = registry.image_ref("private:gzip");
    let lazy = registry.image_ref("private:esgz");
    registry.convert_and_push(stack, &plain, &lazy, &["--estargz"]);
    lazy
}

fn private_registry_through_cri(token: bool) {
    let password = harness::auth::random_hex(12);
    let stack = Stack::start_cri(LAZYSNAP, "");
    push_pause(&stack);
    let dir = stack.path("private");
    std::fs::create_dir_all(&dir).expect("dir");
    let registry = if token {
        AuthRegistry::token(&dir, "puller", &password)
    } else {
        AuthRegistry::basic(&dir, "puller", &password)
    };
    // containerd's CRI reaches the private registry over plain HTTP too.
    let host_dir = stack.path("certs.d").join(registry.host());
    std::fs::create_dir_all(&host_dir).expect("certs.d");
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{h}\"\n[host.\"http://{h}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            h = registry.host()
        ),
    )
    .expect("hosts.toml");
    let lazy = push_private(&stack, &registry);
    let mut kubelet = Kubelet::new(&stack);

    let wrong = cri::AuthConfig {
        username: "puller".into(),
        password: "not-the-password".into(),
        ..Default::default()
    };
    let err = kubelet
        .pull(&lazy, Some(wrong))
        .expect_err("a wrong password fails the pull");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(
        err.message().contains("authentication failed"),
        "{}",
        err.message()
    );

    let right = cri::AuthConfig {
        username: "puller".into(),
        password: password.clone(),
        ..Default::default()
    };
    kubelet.pull(&lazy, Some(right)).unwrap_or_else(|e| {
        panic!(
            "PullImage with the pull secret: {e}\n{}",
            stack.diagnostics()
        )
    });
    let layers = stack.lazy_layers();
    assert_eq!(
        layers.len(),
        3,
        "the private image's layers mounted lazily with PullImage credentials only: {layers:?}\n{}",
        stack.lazysnap_log()
    );
    let out = run_pod(
        &mut kubelet,
        &stack,
        "private",
        &lazy,
        "cat /data/small.txt",
    );
    assert_eq!(out, "hello from layer 2\n");

    // No credential in any log of the run.
    let mut secrets = vec![password.clone()];
    secrets.extend(registry.tokens_issued().into_iter().filter_map(|t| t.token));
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&stack.dir)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.extend(registry.log_files());
    assert!(!logs.is_empty());
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for secret in &secrets {
            assert!(
                secret.is_empty() || !text.contains(secret.as_str()),
                "a credential appears in {}",
                log.display()
            );
        }
    }
}

#[test]
fn cri_pull_secrets_reach_lazysnap_for_a_basic_auth_registry() {
    private_registry_through_cri(false);
}

#[test]
fn cri_pull_secrets_reach_lazysnap_for_a_token_auth_registry() {
    private_registry_through_cri(true);
}
