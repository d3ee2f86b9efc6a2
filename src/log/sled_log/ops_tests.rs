//! The operator views against the real sled log: verify finds a healthy log healthy and each
//! kind of damage damaged; import restores an export with its ids, byte for byte.

use super::*;
use crate::envelope::Data;
use crate::log::retention::{Limits, RetentionPolicy, RuleConfig};

fn open_with(dir: &std::path::Path, retention: RetentionPolicy) -> Arc<SledLog> {
    let opts = LogOptions {
        retention,
        ..super::tests::opts(dir)
    };
    SledLog::open(&opts, Hub::new(16), Metrics::new()).expect("open")
}

fn ev(topic: &str, n: u64) -> NewEvent {
    NewEvent {
        topic: Topic::parse(topic).unwrap(),
        event_type: n.is_multiple_of(3).then(|| "kind".into()),
        msg_id: n.is_multiple_of(2).then(|| format!("m{n}").into()),
        data: if n.is_multiple_of(5) {
            Data::Bytes(vec![n as u8, 0, 255].into())
        } else {
            Data::Json(format!("{{\"n\": {n}}}").into())
        },
    }
}

/// A log with several topics, shared chunks, a trimmed topic and remembered msg_ids.
async fn populated(dir: &std::path::Path) -> Arc<SledLog> {
    let rule = RuleConfig {
        pattern: "trim/**".into(),
        limits: Limits {
            max_events: 3,
            ..Limits::default()
        },
    };
    let policy =
        RetentionPolicy::new(&[rule], Limits::default(), 0, Duration::from_secs(3600)).unwrap();
    let log = open_with(dir, policy);
    for round in 0..20u64 {
        let batch = (0..4)
            .map(|k| ev(["a", "b/c", "trim/x", "a"][k as usize], round * 4 + k))
            .collect();
        log.append(batch).await.unwrap();
    }
    log.compact_now().await.unwrap();
    log
}

async fn export_bytes(log: &SledLog) -> Vec<u8> {
    export_as(log, crate::export::Format::Ndjson).await
}

async fn export_as(log: &SledLog, format: crate::export::Format) -> Vec<u8> {
    let all = PatternSet::new(vec![Pattern::parse("**").unwrap()]).unwrap();
    let mut out = Vec::new();
    crate::export::export(log, all, EventId(0), format, &mut out)
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn a_populated_log_verifies_healthy_and_inspects_to_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let log = populated(dir.path()).await;
    let v = log.verify().unwrap();
    assert!(v.healthy(), "{:?}", v.problems);
    assert_eq!(v.events, 80);
    let i = log.inspect().unwrap();
    assert_eq!(i.events, 80 - 17, "trim/x keeps 3 of 20");
    assert_eq!((i.first_id, i.last_id, i.topics), (Some(1), 80, 3));
    assert_eq!(i.trimmed_topics, 1);
    assert_eq!(i.dedupe_entries, 40);
    assert!(i.space_amplification.is_some_and(|a| a > 1.0));
}

#[tokio::test]
async fn verify_reports_a_missing_index_entry_a_wrong_record_and_a_missing_chunk() {
    for damage in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let log = populated(dir.path()).await;
        let tree = &log.shared.tree;
        match damage {
            0 => {
                let (k, _) = tree
                    .scan_prefix([record::INDEX_PREFIX])
                    .next()
                    .unwrap()
                    .unwrap();
                tree.remove(k).unwrap();
            }
            1 => {
                let t = Topic::parse("a").unwrap();
                let mut r = *log.shared.registry.read().unwrap().get(&t).unwrap();
                r.count += 1;
                log.shared.registry.write().unwrap().insert(t, r);
            }
            _ => {
                let (k, _) = tree
                    .scan_prefix([record::CHUNK_PREFIX])
                    .next_back()
                    .unwrap()
                    .unwrap();
                tree.remove(k).unwrap();
            }
        }
        let v = log.verify().unwrap();
        assert!(!v.healthy(), "damage {damage} went unnoticed");
    }
}

#[tokio::test]
async fn export_then_import_into_an_empty_log_is_byte_identical_and_keeps_msg_ids() {
    let src = tempfile::tempdir().unwrap();
    let log = populated(src.path()).await;
    let exported = export_bytes(&log).await;
    assert_eq!(exported.iter().filter(|&&b| b == b'\n').count(), 63);

    let dst = tempfile::tempdir().unwrap();
    let copy = open_with(dst.path(), RetentionPolicy::keep_everything());
    let events: Vec<ImportEvent> = exported
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| crate::export::parse_line(l).unwrap())
        .collect();
    // In two imports: ids with holes (what trim/x lost) and a split across calls.
    let (a, b) = events.split_at(30);
    assert_eq!(copy.import(a.to_vec()).await.unwrap(), 30);
    assert_eq!(copy.import(b.to_vec()).await.unwrap(), 33);
    assert_eq!(export_bytes(&copy).await, exported);
    assert!(copy.verify().unwrap().healthy());
    assert_eq!(copy.head(), log.head());
    // Imported msg_ids are remembered; ids continue after the last imported.
    let repeat = copy.append(vec![ev("a", 76)]).await.unwrap();
    assert_eq!(repeat.duplicate_of, vec![EventId(77)]);
    let fresh = copy.append(vec![ev("a", 1)]).await.unwrap();
    assert_eq!(fresh.first.0, 81);
    // Going backwards is refused, and nothing of it is stored.
    let again = copy.import(events[..1].to_vec()).await.unwrap_err();
    assert!(again.to_string().contains("ids must increase"), "{again}");
    assert!(copy.verify().unwrap().healthy());
}

#[tokio::test]
async fn a_msgpack_export_imports_back_byte_identical() {
    let src = tempfile::tempdir().unwrap();
    let log = populated(src.path()).await;
    let exported = export_as(&log, crate::export::Format::Msgpack).await;
    let mut input = &exported[..];
    let mut events = Vec::new();
    while let Some(e) = crate::export::read_msgpack(&mut input).unwrap() {
        events.push(e);
    }
    assert_eq!(events.len(), 63);
    let dst = tempfile::tempdir().unwrap();
    let copy = open_with(dst.path(), RetentionPolicy::keep_everything());
    copy.import(events).await.unwrap();
    assert_eq!(
        export_as(&copy, crate::export::Format::Msgpack).await,
        exported
    );
    assert!(copy.verify().unwrap().healthy());
    // Bytes stayed bytes, msg_ids came along.
    let repeat = copy.append(vec![ev("a", 76)]).await.unwrap();
    assert_eq!(repeat.duplicate_of, vec![EventId(77)]);
}
