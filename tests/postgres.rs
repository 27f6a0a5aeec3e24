//! The database layer on a real PostgreSQL server (a throwaway cluster per test): every query reads and writes as on SQLite, concurrent
//! workers never claim the same run, leases lapse and are reaped, and run events cross
//! processes through LISTEN/NOTIFY.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::postgres::Cluster;
use transferd::db::cancel::CancelOutcome;
use transferd::db::queue::{self, Guard, Lease};
use transferd::db::status::{PhaseStatus, RunStatus};
use transferd::db::{self, Db, Page};
use transferd::ingest::Ingested;
use transferd::ml::config::TrainConfig;
use transferd::ml::events::{EpochMetrics, Phase, PhaseSummary};

/// A cluster of the test's own (stopped when it is dropped) and a migrated database in it.
async fn fresh() -> (Cluster, Db) {
    let pg = Cluster::start();
    let url = pg.database("transferd").await;
    let db = db::connect(&url).await.expect("connect and migrate");
    (pg, db)
}

fn two_classes() -> Ingested {
    Ingested::empty(&["cat", "dog"])
}

const LEASE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn every_table_reads_back_what_was_written() {
    let (_pg, db) = fresh().await;
    assert_eq!(db.engine(), "postgres");
    db.ping().await.unwrap();
    let d = db::datasets::insert(&db, "d1", "pets", &two_classes(), None)
        .await
        .unwrap();
    assert_eq!((d.name.as_str(), d.total_images), ("pets", 0));
    // A dataset version carries where it came from.
    let origin = db::datasets::Origin {
        parent_id: "d1".into(),
        excluded: 3,
        relabelled: 1,
    };
    db::datasets::insert(&db, "d2", "more", &two_classes(), Some(&origin))
        .await
        .unwrap();
    let d2 = db::datasets::get(&db, "d2").await.unwrap().unwrap();
    assert_eq!(d2.origin, Some(origin));
    assert_eq!(d.origin, None);
    let first = db::datasets::list(
        &db,
        &Page {
            limit: 1,
            after: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(first.len(), 1);
    let cursor = Some((first[0].created_at.clone(), first[0].id.clone()));
    let second = db::datasets::list(
        &db,
        &Page {
            limit: 5,
            after: cursor,
        },
    )
    .await
    .unwrap();
    assert_eq!(second.len(), 1, "keyset paging goes on after the cursor");
    assert_ne!(first[0].id, second[0].id);

    let config = TrainConfig::default();
    db::runs::create(&db, "r1", "d1", &config).await.unwrap();
    let queued = db::runs::create_bounded(&db, "r2", "d1", &config, 1)
        .await
        .unwrap();
    assert!(queued.is_none(), "the queue bound holds on PostgreSQL");
    let run = db::runs::get(&db, "r1").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.phases.len(), 3);
    assert_eq!(
        db::datasets::delete(&db, "d1").await.unwrap(),
        db::datasets::Delete::InUse(1)
    );

    let claimed = queue::claim_next(&db, "w1", LEASE).await.unwrap().unwrap();
    assert_eq!((claimed.id.as_str(), claimed.attempts), ("r1", 1));
    let m = EpochMetrics {
        phase: Phase::Warmup,
        epoch: 1,
        train_loss: 0.5,
        train_accuracy: 0.8,
        val_loss: 0.4,
        val_accuracy: 0.85,
        learning_rate: 1e-3,
        seconds: 2.0,
    };
    db::epochs::add_epoch(&db, "r1", "w1", &m).await.unwrap();
    db::epochs::add_epoch(&db, "r1", "w1", &m).await.unwrap(); // an upsert, not a duplicate
    assert_eq!(
        db::epochs::metrics(&db, "r1").await.unwrap(),
        vec![m.clone()]
    );
    let summary = PhaseSummary {
        phase: Phase::Warmup,
        epochs_run: 1,
        best_epoch: 1,
        best_val_loss: 0.4,
        best_val_accuracy: 0.85,
        seconds: 2.0,
    };
    db::epochs::phase_done(&db, "r1", "w1", &summary)
        .await
        .unwrap();
    let stale = EpochMetrics {
        epoch: 2,
        ..m.clone()
    };
    db::epochs::add_epoch(&db, "r1", "w2", &stale)
        .await
        .unwrap();
    assert_eq!(
        db::epochs::metrics(&db, "r1").await.unwrap().len(),
        1,
        "w2 does not hold r1"
    );
    let progress = db::epochs::Progress {
        percent: 40.0,
        ..Default::default()
    };
    db::epochs::set_progress(
        &db,
        "r1",
        "w2",
        &db::epochs::Progress {
            percent: 99.0,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    db::epochs::set_progress(&db, "r1", "w1", &progress)
        .await
        .unwrap();
    let run = db::runs::get(&db, "r1").await.unwrap().unwrap();
    assert_eq!(run.percent, 40.0);
    assert_eq!(run.worker_id.as_deref(), Some("w1"));
    assert_eq!(run.best_val_accuracy, Some(0.85));

    let classes = vec!["cat".to_string(), "dog".to_string()];
    let success = db::models::Success {
        run_id: "r1",
        dataset_id: Some("d1"),
        classes: &classes,
        input_size: 224,
        val_accuracy: 0.85,
        evaluation: "{\"accuracy\":0.85}",
    };
    assert!(
        !db::models::record_success(&db, &success, "w2")
            .await
            .unwrap(),
        "not w2's run"
    );
    assert!(
        db::models::record_success(&db, &success, "w1")
            .await
            .unwrap()
    );
    let run = db::runs::get(&db, "r1").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.model_id.as_deref(), Some("r1"));
    assert_eq!(run.phases[0].status, PhaseStatus::Succeeded);
    assert_eq!(run.phases[1].status, PhaseStatus::Skipped);
    let model = db::models::default_model(&db).await.unwrap().unwrap();
    assert_eq!((model.id.as_str(), model.is_default), ("r1", true));
    assert_eq!(
        db::epochs::evaluation(&db, "r1").await.unwrap().as_deref(),
        Some("{\"accuracy\":0.85}")
    );
    assert!(db::models::promote(&db, "r1").await.unwrap());
    assert_eq!(
        db::models::delete(&db, "r1").await.unwrap(),
        db::models::DeleteModel::IsDefault
    );

    db::runs::create(&db, "r3", "d2", &config).await.unwrap();
    assert_eq!(
        db::cancel::cancel(&db, "r3").await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        db::cancel::cancel(&db, "r3").await.unwrap(),
        CancelOutcome::AlreadyEnded(RunStatus::Cancelled)
    );
    assert_eq!(
        db::cancel::cancel(&db, "nope").await.unwrap(),
        CancelOutcome::NotFound
    );
    let counts = db::runs::count_by_status(&db).await.unwrap();
    assert!(counts.contains(&(RunStatus::Succeeded, 1)), "{counts:?}");
    assert!(counts.contains(&(RunStatus::Cancelled, 1)), "{counts:?}");
    let listed = db::runs::list(&db, Some(RunStatus::Cancelled), &Page::ALL)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "r3");
    assert_eq!(
        db::datasets::delete(&db, "d2").await.unwrap(),
        db::datasets::Delete::Deleted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_workers_never_claim_the_same_run() {
    let (_pg, db) = fresh().await;
    db::datasets::insert(&db, "d", "d", &two_classes(), None)
        .await
        .unwrap();
    let runs = 60;
    for i in 0..runs {
        db::runs::create(&db, &format!("run-{i:03}"), "d", &TrainConfig::default())
            .await
            .unwrap();
    }
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                let me = format!("w{w}");
                let mut mine = Vec::new();
                while let Some(c) = queue::claim_next(&db, &me, LEASE).await.unwrap() {
                    mine.push(c.id);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut busy = 0;
    for w in workers {
        let mine = w.await.unwrap();
        busy += usize::from(!mine.is_empty());
        all.extend(mine);
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), runs, "every run claimed exactly once");
    assert_eq!(distinct.len(), runs);
    assert!(busy > 1, "the claims were spread over several workers");
    let running = db::runs::list(&db, Some(RunStatus::Running), &Page::ALL)
        .await
        .unwrap();
    assert_eq!(running.len(), runs);
}

#[tokio::test]
async fn a_lapsed_lease_is_lost_and_the_run_queued_again() {
    let (_pg, db) = fresh().await;
    db::datasets::insert(&db, "d", "d", &two_classes(), None)
        .await
        .unwrap();
    db::runs::create(&db, "r", "d", &TrainConfig::default())
        .await
        .unwrap();
    let short = Duration::from_millis(200);
    queue::claim_next(&db, "dead", short)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        queue::heartbeat(&db, "r", "dead", short).await.unwrap(),
        Lease::Held { cancel: false }
    );
    assert_eq!(
        db::cancel::cancel(&db, "r").await.unwrap(),
        CancelOutcome::Requested
    );
    assert_eq!(
        queue::heartbeat(&db, "r", "dead", short).await.unwrap(),
        Lease::Held { cancel: true },
        "a cancel made anywhere reaches the worker through its heartbeat"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let storage_dir = tempfile::tempdir().unwrap();
    let storage = transferd::storage::Storage::new(storage_dir.path());
    storage.prepare().unwrap();
    let objects = transferd::objects::Objects::local(storage);
    let jobs = transferd::jobs::Jobs::new();
    assert_eq!(
        transferd::jobs::reap(&db, &objects, &jobs).await.unwrap(),
        (1, 0)
    );
    assert_eq!(
        queue::heartbeat(&db, "r", "dead", short).await.unwrap(),
        Lease::Lost
    );
    assert!(
        !queue::finish(&db, "r", RunStatus::Failed, None, Guard::Holder("dead"))
            .await
            .unwrap(),
        "the dead worker cannot end a run it lost"
    );
    let again = queue::claim_next(&db, "alive", LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id.as_str(), again.attempts), ("r", 2));
}

#[tokio::test]
async fn run_events_reach_every_process_on_the_database() {
    let pg = Cluster::start();
    let url = pg.database("events").await;
    let (a, b) = (
        db::connect(&url).await.unwrap(),
        db::connect(&url).await.unwrap(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let publisher = transferd::jobs::Jobs::connect(&a, &shutdown).await.unwrap();
    let watcher = transferd::jobs::Jobs::connect(&b, &shutdown).await.unwrap();
    let mut rx = watcher.subscribe();
    let mut own = publisher.subscribe();
    publisher.publish_status("r", RunStatus::Failed, Some("boom".into()));
    for rx in [&mut rx, &mut own] {
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the event arrives")
            .unwrap();
        assert_eq!(event.run_id, "r");
        match event.kind {
            transferd::jobs::events::EventKind::Status { status, error } => {
                assert_eq!(status, RunStatus::Failed);
                assert_eq!(error.as_deref(), Some("boom"));
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), own.recv())
            .await
            .is_err(),
        "each event arrives once, not once locally and once more through NOTIFY"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn an_unreachable_database_is_named_without_its_password() {
    let url = format!(
        "postgres://app:hunter2@127.0.0.1:{}/nothing",
        common::postgres::free_port()
    );
    let err = db::connect(&url).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot reach the database at postgres://app:***@127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn a_database_that_goes_away_gives_json_503s() {
    use tower::ServiceExt;
    let (pg, db) = fresh().await;
    let dir = tempfile::tempdir().unwrap();
    let state = transferd::AppState::for_tests(db, transferd::Settings::defaults(dir.path()));
    let get = |state: transferd::AppState| async move {
        let req = axum::http::Request::get("/api/datasets")
            .body(axum::body::Body::empty())
            .unwrap();
        let res = transferd::app(state).oneshot(req).await.unwrap();
        let status = res.status();
        let retry = res.headers().get("retry-after").cloned();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
        (status, retry, body)
    };
    assert_eq!(get(state.clone()).await.0, 200);
    pg.kill();
    let (status, retry, body) = get(state.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    assert!(retry.is_some());
}
