//! `lazysnap mounts`: the lazy layers a running daemon has mounted now, asked over the control
//! API. Layers on the ordinary overlayfs path are not lazy and not listed.

use clap::Args;

use lazysnap::grpc::proto::control::{MountRow, MountsRequest, Takeover};

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
    let mut text = if list.mounts.is_empty() {
        "no lazy layers mounted\n".to_owned()
    } else {
        render_mounts(&list.mounts, output::now_unix_ms())
    };
    if let Some(takeover) = &list.takeover {
        text.push_str(&render_takeover(takeover));
    }
    output::emit(&text)
}

/// One line on how the daemon took over the previous one's connections, and where the fds
/// are held.
fn render_takeover(t: &Takeover) -> String {
    let held = match t.fd_store.as_str() {
        "none" => "FUSE fds held nowhere: lazy mounts die with the daemon".to_owned(),
        store => format!("FUSE fds held by {store}"),
    };
    if t.connections == 0 && t.dropped == 0 {
        return format!("{held}; nothing taken over at start\n");
    }
    format!(
        "{held}; taken over at start: {} connection(s) in {} ms, {} dropped\n",
        t.connections, t.duration_ms, t.dropped
    )
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
        ("TAKEN OVER", Align::Left),
        ("VERIFIED", Align::Left),
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
            if m.taken_over { "yes" } else { "-" }.to_owned(),
            match m.verification.as_str() {
                "" => "-",
                "verified" => "yes",
                "bad" => "BAD",
                other => other,
            }
            .to_owned(),
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
            taken_over: true,
            verification: "verified".to_owned(),
        }
    }

    #[test]
    fn mounts_json_keeps_full_digest_and_proto_names() {
        let json = serde_json::to_value(MountsResponse {
            mounts: vec![row()],
            takeover: None,
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
                "taken_over": true,
                "verification": "verified",
            }], "takeover": null})
        );
    }

    #[test]
    fn mounts_table_shows_one_row_per_mount() {
        let text = render_mounts(&[row()], 1_000 + 5 * 60_000);
        assert_eq!(
            text,
            "DIGEST               REFERENCE               MOUNTPOINT                        STATE        MOUNTED  FETCHED  SERVED  TAKEN OVER  VERIFIED\n\
             sha256:0123456789ab  registry.example/app:1  /var/lib/lazysnap/snapshots/3/fs  prefetching  5m ago   1.0 MiB   512 B  yes         yes\n"
        );
        let mut bad = row();
        bad.verification = "bad".to_owned();
        assert!(
            render_mounts(&[bad], 1_000)
                .lines()
                .nth(1)
                .is_some_and(|l| l.ends_with("BAD")),
            "a bad layer stands out"
        );
    }

    #[test]
    fn takeover_line_says_where_fds_are_held_and_what_was_taken_over() {
        let mut t = Takeover {
            fd_store: "holder".to_owned(),
            connections: 3,
            dropped: 1,
            duration_ms: 12,
        };
        assert_eq!(
            render_takeover(&t),
            "FUSE fds held by holder; taken over at start: 3 connection(s) in 12 ms, 1 dropped\n"
        );
        t.connections = 0;
        t.dropped = 0;
        assert_eq!(
            render_takeover(&t),
            "FUSE fds held by holder; nothing taken over at start\n"
        );
        t.fd_store = "none".to_owned();
        assert!(render_takeover(&t).contains("die with the daemon"));
    }
}
