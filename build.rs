//! Generates containerd's Snapshots API (vendored in `proto/containerd`), lazysnap's own
//! control API (`proto/lazysnap`) and the part of the CRI it fronts (`proto/cri`), with protox
//! so that no `protoc` binary is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/lazysnap/v1/control.proto",
        "proto/cri/runtime/v1/api.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // The CLI prints control API answers as JSON under their proto field names.
        .type_attribute(".lazysnap.v1", "#[derive(serde::Serialize)]")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
