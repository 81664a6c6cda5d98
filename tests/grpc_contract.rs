//! containerd's snapshotter contract checked over the real gRPC surface: the daemon's service on
//! a Unix socket, called by a tonic client as containerd's proxy plugin would. Codes matter here
//! because containerd branches on them (`errdefs.FromGRPC`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use lazysnap::grpc::proto::snapshots::{self as pb, snapshots_client::SnapshotsClient};
use lazysnap::snapshot::Snapshotter;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

struct Server {
    _dir: tempfile::TempDir,
    client: SnapshotsClient<Channel>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("lazysnap.sock");
    let snapshotter = Arc::new(Snapshotter::open(&dir.path().join("root")).expect("open"));
    let listener = UnixListener::bind(&socket).expect("bind");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(lazysnap::grpc::serve(snapshotter, listener, async {
        let _ = rx.await;
    }));
    let path: PathBuf = socket.clone();
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect");
    Server {
        _dir: dir,
        client: SnapshotsClient::new(channel),
        shutdown: Some(tx),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn prepare(key: &str, parent: &str, labels: &[(&str, &str)]) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

async fn list(client: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<String> {
    let mut stream = client
        .list(pb::ListSnapshotsRequest {
            filters: filters.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let mut names = Vec::new();
    while let Some(batch) = stream.message().await.expect("list message") {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    names
}

#[tokio::test]
async fn lifecycle_and_error_codes() {
    let mut server = start().await;
    let c = &mut server.client;

    let mounts = c
        .prepare(prepare("a", "", &[]))
        .await
        .expect("prepare")
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "bind");
    let err = c
        .prepare(prepare("a", "", &[]))
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("\"a\""),
        "names the key: {}",
        err.message()
    );
    let err = c
        .prepare(prepare("b", "a", &[]))
        .await
        .expect_err("parent active");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .prepare(prepare("b", "nope", &[]))
        .await
        .expect_err("no parent");
    assert_eq!(err.code(), Code::NotFound);

    c.commit(pb::CommitSnapshotRequest {
        name: "base".into(),
        key: "a".into(),
        labels: HashMap::from([("containerd.io/snapshot.ref".into(), "sha256:x".into())]),
        ..Default::default()
    })
    .await
    .expect("commit");
    c.view(pb::ViewSnapshotRequest {
        key: "v".into(),
        parent: "base".into(),
        ..Default::default()
    })
    .await
    .expect("view");
    let err = c
        .commit(pb::CommitSnapshotRequest {
            name: "v2".into(),
            key: "v".into(),
            ..Default::default()
        })
        .await
        .expect_err("commit a view");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .remove(pb::RemoveSnapshotRequest {
            key: "base".into(),
            ..Default::default()
        })
        .await
        .expect_err("remove with child");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("remove"), "{}", err.message());
    for missing in ["stat", "mounts", "usage", "remove"] {
        let code = match missing {
            "stat" => c
                .stat(pb::StatSnapshotRequest {
                    key: "zz".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            "mounts" => c
                .mounts(pb::MountsRequest {
                    key: "zz".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            "usage" => c
                .usage(pb::UsageRequest {
                    key: "zz".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            _ => c
                .remove(pb::RemoveSnapshotRequest {
                    key: "zz".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        }
        .expect_err(missing)
        .code();
        assert_eq!(code, Code::NotFound, "{missing} of a missing key");
    }

    // containerd's lookup of a committed remote snapshot
    let found = list(c, &[r#"labels."containerd.io/snapshot.ref"==sha256:x"#]).await;
    assert_eq!(found, vec!["base"]);
    assert_eq!(
        list(c, &["kind==view", "kind==committed"]).await,
        vec!["base", "v"]
    );
    let err = c
        .list(pb::ListSnapshotsRequest {
            filters: vec!["kind=".into()],
            ..Default::default()
        })
        .await
        .expect_err("bad filter");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Stat and List return the same Info; Update bumps updated_at only
    let stat = c
        .stat(pb::StatSnapshotRequest {
            key: "base".into(),
            ..Default::default()
        })
        .await
        .expect("stat")
        .into_inner()
        .info
        .expect("info");
    let mut info = stat.clone();
    info.labels.insert("extra".into(), "1".into());
    let updated = c
        .update(pb::UpdateSnapshotRequest {
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.extra".into()],
            }),
            ..Default::default()
        })
        .await
        .expect("update")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(updated.created_at, stat.created_at);
    assert_eq!(updated.labels.get("extra").map(String::as_str), Some("1"));
    let err = c
        .update(pb::UpdateSnapshotRequest {
            info: Some(updated.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
            ..Default::default()
        })
        .await
        .expect_err("parent is immutable");
    assert_eq!(err.code(), Code::InvalidArgument);

    c.cleanup(pb::CleanupRequest::default())
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn stat_during_an_open_list_stream_does_not_deadlock() {
    let mut server = start().await;
    let c = &mut server.client;
    for i in 0..250 {
        c.prepare(prepare(&format!("k{i:03}"), "", &[]))
            .await
            .expect("prepare");
    }
    let mut stream = c
        .list(pb::ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let first = stream.message().await.expect("first").expect("a batch");
    let mut other = c.clone();
    let stat = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        other.stat(pb::StatSnapshotRequest {
            key: first.info[0].name.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("stat answered while the list stream is open");
    stat.expect("stat");
    let mut total = first.info.len();
    while let Some(batch) = stream.message().await.expect("batch") {
        total += batch.info.len();
    }
    assert_eq!(total, 250);
}
