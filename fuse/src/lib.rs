//! A read-only FUSE filesystem over a layer index; it knows nothing of containerd or HTTP.
