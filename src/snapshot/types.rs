//! Domain types of containerd's snapshot model, free of protobuf: what the snapshotter speaks
//! and what `grpc::convert` translates to and from the wire.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The lifecycle state of a snapshot, as containerd defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only snapshot of a committed parent; cannot be committed.
    View,
    /// A writable snapshot; can be committed once.
    Active,
    /// An immutable snapshot that can be a parent.
    Committed,
}

impl Kind {
    /// The spelling containerd's filters use (`kind==active`).
    pub fn as_filter_value(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Labels are an ordered map so that Stat and List render them identically every time.
pub type Labels = BTreeMap<String, String>;

/// What containerd sees of a snapshot (Stat, List, Update).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    /// Empty when the snapshot has no parent, as containerd expects.
    pub parent: String,
    pub kind: Kind,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub labels: Labels,
}

/// Disk usage of a snapshot's own layer, in bytes and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// One mount as containerd's `mount.Mount` describes it: the arguments of mount(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}
