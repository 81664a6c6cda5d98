//! `lazysnap trace ls|show|export|import`: the read traces a running daemon keeps per layer
//! (which file chunks containers read first, which drive prefetch), asked over the control API.
//! Export and import move a trace between nodes as the daemon's opaque JSON document; this
//! command only carries the bytes and never parses or edits the document.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use lazysnap::grpc::proto::control::{
    TraceExportRequest, TraceImportRequest, TraceListRequest, TraceShowRequest, TraceShowResponse,
    TraceSummary,
};

use super::client;
use super::output::{self, Align, Table};
use super::{ControlArgs, SocketArgs};

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// The traces this node keeps, one per layer.
    Ls(LsArgs),
    /// A layer's trace, chunk by chunk in first-read order.
    Show(ShowArgs),
    /// Write a layer's trace as a portable document (what `trace import` takes).
    Export(ExportArgs),
    /// Merge a document from `trace export` (of this node or another) into this node's trace.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The layer's digest, e.g. sha256:0123… (in full).
    #[arg(value_name = "DIGEST")]
    digest: String,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The layer's digest, e.g. sha256:0123… (in full).
    #[arg(value_name = "DIGEST")]
    digest: String,
    /// Write the document to FILE instead of stdout (`-` is stdout).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    control: SocketArgs,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A document from `trace export`; `-` reads stdin.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    control: ControlArgs,
}

pub fn run(command: TraceCommand) -> anyhow::Result<()> {
    match command {
        TraceCommand::Ls(args) => ls(args),
        TraceCommand::Show(args) => show(args),
        TraceCommand::Export(args) => export(args),
        TraceCommand::Import(args) => import(args),
    }
}

fn ls(args: LsArgs) -> anyhow::Result<()> {
    let list = client::call(args.control.socket(), |mut c| async move {
        c.trace_list(TraceListRequest {}).await
    })?;
    if args.control.json {
        return output::emit_json(&list);
    }
    if list.traces.is_empty() {
        return output::emit("no traces recorded\n");
    }
    let now_ms = output::now_unix_ms();
    let mut t = Table::new(&[
        ("DIGEST", Align::Left),
        ("ENTRIES", Align::Right),
        ("BYTES", Align::Right),
        ("NAMES", Align::Right),
        ("MOUNTS", Align::Right),
        ("UPDATED", Align::Left),
    ]);
    for s in &list.traces {
        t.row([
            output::short_digest(&s.digest),
            s.entries.to_string(),
            output::human_bytes(s.bytes),
            s.names.to_string(),
            s.mounts.to_string(),
            output::relative_time(s.updated_unix_ms, now_ms),
        ]);
    }
    output::emit(&t.render())
}

fn show(args: ShowArgs) -> anyhow::Result<()> {
    let request = TraceShowRequest {
        digest: args.digest,
    };
    let trace = client::call(args.control.socket(), |mut c| async move {
        c.trace_show(request).await
    })?;
    if args.control.json {
        return output::emit_json(&trace);
    }
    output::emit(&render_show(&trace, output::now_unix_ms()))
}

fn render_show(trace: &TraceShowResponse, now_ms: u64) -> String {
    let mut text = match &trace.summary {
        Some(s) => format!("{}\n\n", describe(s, now_ms)),
        None => String::new(),
    };
    let mut t = Table::new(&[
        ("#", Align::Right),
        ("PATH", Align::Left),
        ("OFFSET", Align::Right),
        ("BYTES", Align::Right),
        ("SINCE MOUNT", Align::Right),
    ]);
    for (i, e) in trace.entries.iter().enumerate() {
        t.row([
            (i + 1).to_string(),
            e.path.clone(),
            e.offset.to_string(),
            output::human_bytes(e.bytes),
            format!("{} ms", e.since_mount_ms),
        ]);
    }
    text.push_str(&t.render());
    text
}

/// `trace of DIGEST: N entries (SIZE) and K names from M mounts, updated WHEN`.
fn describe(s: &TraceSummary, now_ms: u64) -> String {
    format!(
        "trace of {}: {} entries ({}) and {} names from {} mounts, updated {}",
        s.digest,
        s.entries,
        output::human_bytes(s.bytes),
        s.names,
        s.mounts,
        output::relative_time(s.updated_unix_ms, now_ms)
    )
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let request = TraceExportRequest {
        digest: args.digest,
    };
    let exported = client::call(args.control.path(), |mut c| async move {
        c.trace_export(request).await
    })?;
    // Only written once the daemon answered, so a failed export leaves no empty file behind.
    match args.output.as_deref() {
        None => output::emit_bytes(&exported.document),
        Some(path) if path == Path::new("-") => output::emit_bytes(&exported.document),
        Some(path) => std::fs::write(path, &exported.document)
            .with_context(|| format!("write {}", path.display())),
    }
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
    let document = read_document(&args.file)?;
    let imported = client::call(args.control.socket(), |mut c| async move {
        c.trace_import(TraceImportRequest { document }).await
    })?;
    if args.control.json {
        return output::emit_json(&imported);
    }
    match &imported.summary {
        Some(s) => output::emit(&format!(
            "imported; {}\n",
            describe(s, output::now_unix_ms())
        )),
        None => output::emit("imported\n"),
    }
}

fn read_document(file: &Path) -> anyhow::Result<Vec<u8>> {
    let (document, name) = if file == Path::new("-") {
        let mut document = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut document)
            .context("read the trace document from stdin")?;
        (document, "stdin".to_owned())
    } else {
        let document = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
        (document, file.display().to_string())
    };
    if document.is_empty() {
        anyhow::bail!("{name} is empty; expected a document from `lazysnap trace export`");
    }
    Ok(document)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazysnap::grpc::proto::control::TraceEntry;

    fn sample() -> TraceShowResponse {
        TraceShowResponse {
            summary: Some(TraceSummary {
                digest: "sha256:abc".to_owned(),
                entries: 2,
                bytes: 3 << 16,
                mounts: 1,
                updated_unix_ms: 1_000,
                names: 5,
            }),
            entries: vec![
                TraceEntry {
                    path: "usr/bin/python3".to_owned(),
                    offset: 0,
                    bytes: 1 << 16,
                    since_mount_ms: 7,
                },
                TraceEntry {
                    path: "etc/passwd".to_owned(),
                    offset: 131_072,
                    bytes: 1 << 17,
                    since_mount_ms: 1_234,
                },
            ],
        }
    }

    #[test]
    fn show_json_has_summary_and_entries() {
        let json = serde_json::to_value(sample()).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({
                "summary": {
                    "digest": "sha256:abc",
                    "entries": 2,
                    "bytes": 196_608,
                    "mounts": 1,
                    "updated_unix_ms": 1_000,
                    "names": 5,
                },
                "entries": [
                    {"path": "usr/bin/python3", "offset": 0, "bytes": 65_536, "since_mount_ms": 7},
                    {"path": "etc/passwd", "offset": 131_072, "bytes": 131_072, "since_mount_ms": 1_234},
                ],
            })
        );
    }

    #[test]
    fn show_table_numbers_entries_from_one() {
        let text = render_show(&sample(), 61_000);
        assert_eq!(
            text,
            "trace of sha256:abc: 2 entries (192.0 KiB) and 5 names from 1 mounts, updated 1m ago\n\
             \n\
             #  PATH             OFFSET      BYTES  SINCE MOUNT\n\
             1  usr/bin/python3       0   64.0 KiB         7 ms\n\
             2  etc/passwd       131072  128.0 KiB      1234 ms\n"
        );
    }

    #[test]
    fn empty_import_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("trace.json");
        std::fs::write(&file, b"").expect("write");
        let err = read_document(&file).expect_err("empty document");
        assert!(err.to_string().contains("trace.json is empty"), "{err}");
        let missing = dir.path().join("missing.json");
        let err = read_document(&missing).expect_err("missing file");
        assert!(format!("{err:#}").contains("missing.json"), "{err:#}");
    }
}
