//! `lazysnap mounts`: the lazy layers a running daemon has mounted now, asked over the control
//! API. Layers on the ordinary overlayfs path are not lazy and not listed.

use clap::Args;

use lazysnap::grpc::proto::control::{MountRow, MountsRequest};

use super::client;
use super::output::{self, Align, Table};
use super::ControlArgs;

#[derive(Debug, Args)]
pub struct MountsArgs {
    #[command(flatten)]
    control: ControlArgs,
}

pub fn run(args: MountsArgs) -> anyhow::Result<()> {
    let list = client::call(args.control.socket(), |mut c| async move {
        c.mounts(MountsRequest {}).await
    })?;
    if args.control.json {
        return output::emit_json(&list);
    }
    if list.mounts.is_empty() {
        return output::emit("no lazy layers mounted\n");
    }
    output::emit(&render_mounts(&list.mounts, output::now_unix_ms()))
}

fn render_mounts(mounts: &[MountRow], now_ms: u64) -> String {
    let mut t = Table::new(&[
        ("DIGEST", Align::Left),
        ("REFERENCE", Align::Left),
        ("MOUNTPOINT", Align::Left),
        ("STATE", Align::Left),
        ("MOUNTED", Align::Left),
        ("FETCHED", Align::Right),
        ("SERVED", Align::Right),
    ]);
    for m in mounts {
        t.row([
            output::short_digest(&m.digest),
            or_dash(&m.reference),
            or_dash(&m.mountpoint),
            or_dash(&m.state),
            output::relative_time(m.mounted_unix_ms, now_ms),
            output::human_bytes(m.fetched_bytes),
            output::human_bytes(m.served_bytes),
        ]);
    }
    t.render()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazysnap::grpc::proto::control::MountsResponse;

    fn row() -> MountRow {
        MountRow {
            digest: format!("sha256:{}", "0123456789abcdef".repeat(4)),
            reference: "registry.example/app:1".to_owned(),
            mountpoint: "/var/lib/lazysnap/snapshots/3/fs".to_owned(),
            state: "prefetching".to_owned(),
            mounted_unix_ms: 1_000,
            fetched_bytes: 1 << 20,
            served_bytes: 512,
        }
    }

    #[test]
    fn mounts_json_keeps_full_digest_and_proto_names() {
        let json = serde_json::to_value(MountsResponse {
            mounts: vec![row()],
        })
        .expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({"mounts": [{
                "digest": row().digest,
                "reference": "registry.example/app:1",
                "mountpoint": "/var/lib/lazysnap/snapshots/3/fs",
                "state": "prefetching",
                "mounted_unix_ms": 1_000,
                "fetched_bytes": 1_048_576,
                "served_bytes": 512,
            }]})
        );
    }

    #[test]
    fn mounts_table_shows_one_row_per_mount() {
        let text = render_mounts(&[row()], 1_000 + 5 * 60_000);
        assert_eq!(
            text,
            "DIGEST               REFERENCE               MOUNTPOINT                        STATE        MOUNTED  FETCHED  SERVED\n\
             sha256:0123456789ab  registry.example/app:1  /var/lib/lazysnap/snapshots/3/fs  prefetching  5m ago   1.0 MiB   512 B\n"
        );
    }
}
