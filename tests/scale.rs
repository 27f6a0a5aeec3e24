//! Scale-out end to end, every part a real process on loopback: PostgreSQL, SeaweedFS (S3),
//! two API replicas (`serve --no-worker`) and two training workers (`worker`), each with a
//! data directory of its own (a cache: nothing is shared on local disk). Upload through
//! replica A and queue two runs; both workers train at once; an SSE client on replica B
//! sees progress from both; `kill -9` a worker mid-run, and the other takes its run after
//! the lease lapses and finishes it; a cancel through B stops a run the other worker holds;
//! both replicas predict; an upload while the store is down is a 503 that stores nothing;
//! then everything restarts and nothing is lost.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::client::{follow, get, start_run, tiny, upload, wait_healthy, wait_status};
use common::postgres::Cluster;
use common::process::Proc;
use common::seaweed::Seaweed;
use serde_json::Value;

const BUCKET: &str = "transferd-e2e";

struct Fleet {
    url: String,
    store: String,
    env: Vec<(String, String)>,
    weights: String,
}

impl Fleet {
    fn api(&self, dir: &std::path::Path) -> Proc {
        self.spawn(dir, &["serve", "--no-worker"])
    }

    fn worker(&self, dir: &std::path::Path) -> Proc {
        self.spawn(dir, &["worker"])
    }

    fn spawn(&self, dir: &std::path::Path, role: &[&str]) -> Proc {
        let mut args = role.to_vec();
        args.extend([
            "--addr",
            "127.0.0.1:0",
            "--database-url",
            &self.url,
            "--object-store",
            &self.store,
            "--device",
            "cpu",
            "--min-images-per-class",
            "2",
            "--lease-seconds",
            "5",
            "--weights",
            &self.weights,
        ]);
        Proc::spawn(dir, &args, &self.env)
    }
}

/// Polls run `id` until `check` accepts it.
async fn wait_for(base: &str, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let run = get(base, &format!("/api/runs/{id}")).await;
        if check(&run) {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The process id inside a worker name (`host-PID-tag-N`).
fn pid_of(worker_id: &Value) -> u32 {
    let name = worker_id.as_str().expect("a worker holds the run");
    let parts: Vec<&str> = name.rsplitn(4, '-').collect();
    parts[2].parse().expect("a pid in the worker name")
}

async fn predict(base: &str) -> Value {
    let cat = std::fs::read(common::fixtures().join("samples/test_cat.jpg")).unwrap();
    let res = reqwest::Client::new()
        .post(format!("{base}/api/predict"))
        .header("content-type", "image/jpeg")
        .body(cat)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_and_two_workers_share_postgres_and_s3() {
    let pg = Cluster::start();
    let mut s3 = Seaweed::start();
    s3.bucket(BUCKET).await;
    let fleet = Fleet {
        url: pg.database("transferd").await,
        store: format!("s3://{BUCKET}/e2e"),
        env: s3.env(),
        weights: common::weights_path().to_str().unwrap().to_string(),
    };
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut a, mut b) = (fleet.api(dirs[0].path()), fleet.api(dirs[1].path()));
    let mut w1 = fleet.worker(dirs[2].path());
    let mut w2 = fleet.worker(dirs[3].path());
    for p in [&a, &b, &w1, &w2] {
        wait_healthy(&p.base).await;
    }
    let probe = reqwest::get(format!("{}/api/datasets", w1.base))
        .await
        .unwrap();
    assert_eq!(probe.status(), 404, "a worker serves only its probes");

    // 1. Upload through A, queue two runs: both workers train at once.
    let dataset = upload(&a.base).await;
    let first = start_run(&a.base, &dataset, tiny(40)).await;
    let second = start_run(&a.base, &dataset, tiny(40)).await;
    let mut holders = HashSet::new();
    for id in [&first, &second] {
        let run = wait_for(&a.base, id, "running", |r| r["status"] == "running").await;
        holders.insert(pid_of(&run["worker_id"]));
    }
    assert_eq!(
        holders,
        HashSet::from([w1.pid(), w2.pid()]),
        "one run on each worker"
    );

    // 2. An SSE client on B sees progress from both (trained elsewhere, sent by NOTIFY).
    for id in [&first, &second] {
        let events = follow(&b.base, id, |name, _| name == "progress").await;
        assert_eq!(events.first().map(|e| e.0.as_str()), Some("snapshot"));
        assert_eq!(
            events.last().map(|e| e.0.as_str()),
            Some("progress"),
            "{events:?}"
        );
    }

    // 3. kill -9 worker 1 mid-run: after its lease lapses worker 2 takes the run and
    // finishes it (once its own run is done: each worker trains one run at a time).
    let on_w1 = {
        let run = get(&a.base, &format!("/api/runs/{first}")).await;
        if pid_of(&run["worker_id"]) == w1.pid() {
            first.clone()
        } else {
            second.clone()
        }
    };
    let on_w2 = if on_w1 == first {
        second.clone()
    } else {
        first.clone()
    };
    w1.kill();
    let taken = wait_for(&b.base, &on_w1, "the dead worker's run", |r| {
        r["status"] == "succeeded"
    })
    .await;
    assert_eq!(pid_of(&taken["worker_id"]), w2.pid(), "{taken}");
    assert_eq!(taken["attempts"], 2, "{taken}");
    let other = wait_status(&a.base, &on_w2, "succeeded").await;
    assert_eq!(other["attempts"], 1, "{other}");

    // 4. A cancel through B stops a run that worker 2 holds.
    let third = start_run(&a.base, &dataset, tiny(200)).await;
    let run = wait_for(&b.base, &third, "the third run training", |r| {
        r["status"] == "running" && r["phase"].is_string()
    })
    .await;
    assert_eq!(pid_of(&run["worker_id"]), w2.pid());
    let res = reqwest::Client::new()
        .post(format!("{}/api/runs/{third}/cancel", b.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let cancelled = wait_status(&a.base, &third, "cancelled").await;
    assert_eq!(cancelled["attempts"], 1, "{cancelled}");

    // 5. Both replicas predict with the default model, fetched from the store.
    let (pa, pb) = (predict(&a.base).await, predict(&b.base).await);
    assert_eq!(pa["model_id"], pb["model_id"]);
    assert_eq!(
        pa["predictions"], pb["predictions"],
        "the same model gives the same answer"
    );

    // With the object store down an upload is refused with a JSON 503 and leaves no row.
    s3.stop();
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(common::pets_zip()).file_name("pets.zip"),
    );
    let res = reqwest::Client::new()
        .post(format!("{}/api/datasets", b.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let listed = get(&a.base, "/api/datasets").await;
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "no row names missing objects"
    );

    // 6. Restart everything, API replicas on empty data directories: nothing is lost.
    for p in [&mut a, &mut b, &mut w2] {
        p.stop();
    }
    pg.restart();
    s3.start_again();
    s3.ready(BUCKET).await;
    let a2 = fleet.api(dirs[4].path());
    let _w3 = fleet.worker(dirs[5].path());
    wait_healthy(&a2.base).await;
    let runs = get(&a2.base, "/api/runs").await;
    let status: Vec<(String, String)> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().into(),
                r["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(status.len(), 3, "{status:?}");
    for (id, want) in [
        (&first, "succeeded"),
        (&second, "succeeded"),
        (&third, "cancelled"),
    ] {
        assert!(
            status.contains(&(id.clone(), want.to_string())),
            "{status:?}"
        );
    }
    let ds = get(
        &a2.base,
        &format!("/api/datasets/{}", dataset["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(ds["total_images"], dataset["total_images"]);
    let files = get(&a2.base, &format!("/api/runs/{first}/evaluation")).await;
    assert!(files.is_object(), "{files}");
    let again = predict(&a2.base).await;
    assert_eq!(
        again["predictions"], pa["predictions"],
        "the model survived the restart"
    );
    let image = reqwest::get(format!(
        "{}/api/datasets/{}/files/1",
        a2.base,
        dataset["id"].as_str().unwrap()
    ))
    .await
    .unwrap();
    assert_eq!(
        image.status(),
        200,
        "dataset images come back from the store"
    );
}
