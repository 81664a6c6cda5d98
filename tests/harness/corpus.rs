//! The benchmark corpus: images built here from Debian packages, each with the command whose
//! start is measured and what that command prints. Built into one OCI layout under a work
//! directory (`harness::layout`), reused by later runs; see `harness::debian`, `tools`, `data`.

use std::path::Path;

use super::layout::{self, Layer};

/// `PATH` of the Debian-based images.
pub const DEBIAN_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One image of the corpus, in the layout under its tag (`name`).
pub struct CorpusImage {
    pub name: &'static str,
    /// A `/bin/sh -c` script: the start being measured.
    pub workload: String,
    /// What the workload prints (its trimmed output).
    pub expect: &'static str,
    pub layers: Vec<Layer>,
}

/// The `python` image: a Debian minbase root; python3; numpy; pandas (four layers, about
/// 300 MB unpacked). The workload imports two standard modules and prints 1.
pub fn python(work: &Path, layout: &Path) -> CorpusImage {
    let base = super::debian::minbase(&work.join("roots"));
    let roots = work.join("roots");
    let py = super::debian::stage(&roots, "python3", &base, &["python3"], |_| {});
    let numpy = super::debian::stage(&roots, "python3-numpy", &py, &["python3-numpy"], |_| {});
    let pandas = super::debian::stage(
        &roots,
        "python3-pandas",
        &numpy,
        &["python3-pandas"],
        |_| {},
    );
    let layers = vec![
        super::debian::diff_layer(layout, "minbase", None, &base),
        super::debian::diff_layer(layout, "python3", Some(&base), &py),
        super::debian::diff_layer(layout, "python3-numpy", Some(&py), &numpy),
        super::debian::diff_layer(layout, "python3-pandas", Some(&numpy), &pandas),
    ];
    layout::add_image(
        layout,
        "python",
        &layers,
        &["/usr/bin/python3"],
        &[DEBIAN_PATH],
    );
    CorpusImage {
        name: "python",
        workload: "python3 -c 'import json, sqlite3; print(1)'".into(),
        expect: "1",
        layers,
    }
}
