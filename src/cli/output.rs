//! Presentation for the operator commands: aligned tables, humanised sizes, progress bars,
//! relative times and the `--json` document. Pure formatting over plain values; it knows nothing
//! of gRPC or the daemon (the view structs that feed `--json` live beside each command).

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

/// Width of the bar inside `[` `]` drawn by [`bar`].
const BAR_WIDTH: u64 = 10;

/// How a table column is padded: text to the left, numbers to the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table of text cells, rendered with every column as wide as its widest cell and two spaces
/// between columns.
#[derive(Debug)]
pub struct Table {
    header: Option<Vec<String>>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with a header row; one `(title, alignment)` per column.
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Table {
            header: Some(
                columns
                    .iter()
                    .map(|(title, _)| (*title).to_owned())
                    .collect(),
            ),
            align: columns.iter().map(|(_, align)| *align).collect(),
            rows: Vec::new(),
        }
    }

    /// A table without a header, for `key  value` listings.
    pub fn headless(align: &[Align]) -> Self {
        Table {
            header: None,
            align: align.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row. Control characters are escaped, since cells carry names from images and
    /// registries that must not reach the terminal as escape sequences or line breaks.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.rows
            .push(cells.into_iter().map(|c| sanitize(c.as_ref())).collect());
    }

    pub fn render(&self) -> String {
        let lines: Vec<&Vec<String>> = self.header.iter().chain(self.rows.iter()).collect();
        let columns = lines
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(0)
            .max(self.align.len());
        let mut widths = vec![0; columns];
        for line in &lines {
            for (width, cell) in widths.iter_mut().zip(line.iter()) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = width - cell.chars().count();
                match self.align.get(i).copied().unwrap_or(Align::Left) {
                    Align::Left => {
                        text.push_str(cell);
                        text.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        text.extend(std::iter::repeat_n(' ', pad));
                        text.push_str(cell);
                    }
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Escapes control characters (newlines, ESC, ...) and leaves everything else as it is.
fn sanitize(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_owned();
    }
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Bytes with a binary unit and one decimal: `512 B`, `1.5 MiB`, `2.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Step up while the value would print as 1024.0 or more.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A 10-cell bar, `[####------]`, filled in proportion to `done / total`, rounded down so that
/// a full bar always means complete. An unknown total (0) draws an empty bar.
pub fn bar(done: u64, total: u64) -> String {
    let filled = if total == 0 {
        0
    } else {
        (u128::from(done.min(total)) * u128::from(BAR_WIDTH) / u128::from(total)) as u64
    };
    let mut s = String::with_capacity(BAR_WIDTH as usize + 2);
    s.push('[');
    for i in 0..BAR_WIDTH {
        s.push(if i < filled { '#' } else { '-' });
    }
    s.push(']');
    s
}

/// `done / total` as a whole percentage, rounded down (so `100%` means complete), `<1%` for a
/// start, and `-` when the total is unknown (0).
pub fn percent(done: u64, total: u64) -> String {
    if total == 0 {
        return "-".to_owned();
    }
    let pct = u128::from(done.min(total)) * 100 / u128::from(total);
    if pct == 0 && done > 0 {
        "<1%".to_owned()
    } else {
        format!("{pct}%")
    }
}

/// A ratio in `[0, 1]` as a percentage with one decimal, `-` when it is not a number.
pub fn ratio(value: f64) -> String {
    if value.is_finite() {
        format!("{:.1}%", value * 100.0)
    } else {
        "-".to_owned()
    }
}

/// How long ago the Unix-millisecond time `then_ms` was, seen at `now_ms`: `12s ago`,
/// `5m ago`, `3h ago`, `2d ago`. `0` is the protocol's "never"; a time ahead of the local clock
/// (skew between daemon and CLI cannot happen on one node, but rounding can) reads `just now`.
pub fn relative_time(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return "never".to_owned();
    }
    let Some(ago_ms) = now_ms.checked_sub(then_ms) else {
        return "just now".to_owned();
    };
    let secs = ago_ms / 1000;
    match secs {
        0 => "just now".to_owned(),
        1..=59 => format!("{secs}s ago"),
        60..=3_599 => format!("{}m ago", secs / 60),
        3_600..=172_799 => format!("{}h ago", secs / 3_600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// The local clock as Unix milliseconds (0 if it reads before 1970).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A digest as tables show it: the algorithm and the first 12 hex digits
/// (`sha256:0123456789ab`). `--json` always carries the full digest.
pub fn short_digest(digest: &str) -> String {
    const SHOWN: usize = 12;
    let (algorithm, hex) = digest.split_once(':').unwrap_or(("", digest));
    if hex.chars().count() <= SHOWN {
        return digest.to_owned();
    }
    let head: String = hex.chars().take(SHOWN).collect();
    if algorithm.is_empty() && !digest.contains(':') {
        head
    } else {
        format!("{algorithm}:{head}")
    }
}

/// `yes` or `no`.
pub fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// Writes `text` to stdout. A reader that went away (`lazysnap cache ls | head`) is not an error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    emit_bytes(text.as_bytes())
}

pub fn emit_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("write to stdout"),
    }
}

/// Prints `value` as one JSON document on stdout (the `--json` output).
pub fn emit_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("encode JSON")?;
    text.push('\n');
    emit(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        // Just under the next unit does not print as "1024.0 KiB".
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn bar_fills_in_tenths_rounding_down() {
        assert_eq!(bar(0, 100), "[----------]");
        assert_eq!(bar(40, 100), "[####------]");
        assert_eq!(bar(99, 100), "[#########-]");
        assert_eq!(bar(100, 100), "[##########]");
        assert_eq!(bar(200, 100), "[##########]");
        assert_eq!(bar(5, 0), "[----------]");
        assert_eq!(bar(u64::MAX, u64::MAX), "[##########]");
    }

    #[test]
    fn percent_never_claims_complete_early() {
        assert_eq!(percent(0, 10), "0%");
        assert_eq!(percent(1, 1000), "<1%");
        assert_eq!(percent(999, 1000), "99%");
        assert_eq!(percent(1000, 1000), "100%");
        assert_eq!(percent(3, 0), "-");
        assert_eq!(ratio(0.8333), "83.3%");
        assert_eq!(ratio(f64::NAN), "-");
    }

    #[test]
    fn relative_time_picks_one_unit() {
        let now = 1_700_000_000_000;
        assert_eq!(relative_time(0, now), "never");
        assert_eq!(relative_time(now, now), "just now");
        assert_eq!(relative_time(now + 5_000, now), "just now");
        assert_eq!(relative_time(now - 12_000, now), "12s ago");
        assert_eq!(relative_time(now - 59_999, now), "59s ago");
        assert_eq!(relative_time(now - 60_000, now), "1m ago");
        assert_eq!(relative_time(now - 3_600_000, now), "1h ago");
        assert_eq!(relative_time(now - 47 * 3_600_000, now), "47h ago");
        assert_eq!(relative_time(now - 3 * 86_400_000, now), "3d ago");
    }

    #[test]
    fn short_digest_keeps_algorithm_and_twelve_hex() {
        let full = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert_eq!(short_digest(&full), "sha256:0123456789ab");
        assert_eq!(short_digest("sha256:abc"), "sha256:abc");
        assert_eq!(short_digest("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_digest(""), "");
    }

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&[("NAME", Align::Left), ("SIZE", Align::Right)]);
        table.row(["a", "1.5 MiB"]);
        table.row(["longer-name", "12 B"]);
        assert_eq!(
            table.render(),
            "NAME            SIZE\n\
             a            1.5 MiB\n\
             longer-name     12 B\n"
        );
    }

    #[test]
    fn table_trims_trailing_padding_and_tolerates_short_rows() {
        let mut table = Table::headless(&[Align::Left, Align::Left]);
        table.row(["key", "v"]);
        table.row(["much longer key"]);
        assert_eq!(table.render(), "key              v\nmuch longer key\n");
    }

    #[test]
    fn table_escapes_control_characters() {
        let mut table = Table::headless(&[Align::Left]);
        table.row(["evil\n\u{1b}[31mname"]);
        assert_eq!(table.render(), "evil\\n\\u{1b}[31mname\n");
    }
}
