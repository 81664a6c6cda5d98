//! The `tools` image of the benchmark corpus: a compiler toolchain, whose start reads many
//! small files (the C headers a program includes, the driver, `cc1`, `as`, `ld`, crt objects,
//! libc's linker script and archives). A Debian minbase root; gcc and libc6-dev installed with
//! apt; a hello-world source. The workload compiles, links and runs it.

use std::path::Path;

use super::corpus::{CorpusImage, DEBIAN_PATH};
use super::layout::{self, LayerWriter};

/// A hello world that includes what a small real program does.
pub const HELLO_C: &str = r#"#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    printf("%d\n", (int)sqrt(1.0));
    return 0;
}
"#;

pub fn tools(work: &Path, layout: &Path) -> CorpusImage {
    let roots = work.join("roots");
    let base = super::debian::minbase(&roots);
    let gcc = super::debian::stage(&roots, "gcc", &base, &["gcc", "libc6-dev"], |_| {});
    let mut layers = vec![
        super::debian::diff_layer(layout, "minbase", None, &base),
        super::debian::diff_layer(layout, "gcc", Some(&base), &gcc),
    ];
    layers.push(super::debian::cached_layer(layout, "hello-c", || {
        let mut w = LayerWriter::create(layout, 6);
        w.file("hello.c", 0o644, HELLO_C.len() as u64, HELLO_C.as_bytes());
        w.finish()
    }));
    layout::add_image(layout, "tools", &layers, &["/bin/sh"], &[DEBIAN_PATH]);
    CorpusImage {
        name: "tools",
        workload: "gcc -O1 -o /tmp/hello /hello.c -lm && /tmp/hello".into(),
        expect: "1",
        layers,
    }
}
