//! Conversions between containerd's protobuf messages and the snapshotter's domain types; the
//! only place where both meet.

use std::collections::HashMap;
use std::time::SystemTime;

use tonic::Status;

use super::proto::{snapshots as pb, types};
use crate::snapshot::{Info, Kind, Labels, Mount};

pub fn labels(labels: HashMap<String, String>) -> Labels {
    labels.into_iter().collect()
}

/// containerd sends an empty string for "no parent".
pub fn parent(parent: &str) -> Option<&str> {
    (!parent.is_empty()).then_some(parent)
}

pub fn mounts(mounts: Vec<Mount>) -> Vec<types::Mount> {
    mounts
        .into_iter()
        .map(|m| types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

pub fn info(info: Info) -> pb::Info {
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: kind(info.kind) as i32,
        created_at: Some(info.created_at.into()),
        updated_at: Some(info.updated_at.into()),
        labels: info.labels.into_iter().collect(),
    }
}

fn kind(kind: Kind) -> pb::Kind {
    match kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

/// The parts of an `Info` an Update may carry. Kind and timestamps are ignored by the
/// snapshotter, so unknown values there are not an error.
pub fn update_info(info: Option<pb::Info>) -> Result<Info, Status> {
    let info = info.ok_or_else(|| Status::invalid_argument("update request carries no info"))?;
    let kind = match pb::Kind::try_from(info.kind) {
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Committed) => Kind::Committed,
        _ => Kind::Active,
    };
    let time = |t: Option<prost_types::Timestamp>| {
        t.and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    Ok(Info {
        name: info.name,
        parent: info.parent,
        kind,
        created_at: time(info.created_at),
        updated_at: time(info.updated_at),
        labels: labels(info.labels),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trips_timestamps_below_a_millisecond() {
        let created = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456);
        let domain = Info {
            name: "n".into(),
            parent: String::new(),
            kind: Kind::Committed,
            created_at: created,
            updated_at: created,
            labels: Labels::from([("a".to_string(), "b".to_string())]),
        };
        let back = update_info(Some(info(domain.clone()))).expect("convert back");
        assert_eq!(back, domain);
    }
}
