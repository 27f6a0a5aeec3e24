//! End-to-end tests against a real server on port 0 with its own data directory: upload a
//! fixture zip, train a tiny run, follow it over SSE and by polling, predict; cancel a run;
//! shut down mid-run and resume; kill -9 a server process mid-run and recover.

mod common;

use common::client::{follow, get, start_run, tiny, upload, wait_healthy, wait_status};

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use transferd::Settings;
use transferd::ml::device::DeviceChoice;

struct Server {
    base: String,
    token: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

fn settings(dir: &Path) -> Settings {
    let mut s = Settings::defaults(dir);
    s.weights = Some(common::weights_path());
    s.device = DeviceChoice::Cpu;
    s.limits.min_images_per_class = 2;
    s
}

async fn start(dir: &Path) -> Server {
    start_with(dir, |_| {}).await
}

async fn start_with(dir: &Path, tweak: impl FnOnce(&mut Settings)) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    let mut settings = settings(dir);
    tweak(&mut settings);
    let handle = tokio::spawn(transferd::run(listener, settings, token.clone()));
    wait_healthy(&base).await;
    Server {
        base,
        token,
        handle,
    }
}

impl Server {
    async fn stop(self) {
        self.token.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

fn first_finetune_epoch(name: &str, v: &Value) -> bool {
    name == "epoch" && v["metrics"]["phase"] == "finetune"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_train_follow_and_predict() {
    let dir = tempfile::tempdir().unwrap();
    // A 64 MiB cache budget: the tiny runs fit, the oversized config at the end (about
    // 200 MB of activations on these 24 photos) does not.
    let server = start_with(dir.path(), |s| s.max_cache_bytes = 64 << 20).await;
    let base = server.base.clone();
    let ready = get(&base, "/readyz").await;
    assert_eq!(ready["device"]["backend"], "flex");

    let dataset = upload(&base).await;
    assert_eq!(dataset["total_images"], 24);
    let run = start_run(&base, &dataset, tiny(2)).await;

    let events = follow(&base, &run, |_, _| false).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "snapshot");
    assert!(
        names.contains(&"progress") && names.contains(&"epoch"),
        "{names:?}"
    );
    assert!(
        names.iter().filter(|n| **n == "phase_finished").count() >= 2,
        "{names:?}"
    );
    let (last, value) = events.last().unwrap();
    assert_eq!(
        (last.as_str(), &value["status"]),
        ("status", &json!("succeeded")),
        "{value}"
    );

    let r = get(&base, &format!("/api/runs/{run}")).await;
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["percent"], 100.0);
    assert_eq!(r["model_id"], run.as_str());
    for p in r["phases"].as_array().unwrap() {
        let want = if p["phase"] == "baseline" {
            "skipped"
        } else {
            "succeeded"
        };
        assert_eq!(p["status"], want, "{p}");
    }
    let metrics = get(&base, &format!("/api/runs/{run}/metrics")).await;
    let rows = metrics.as_array().unwrap();
    assert!(rows.iter().any(|m| m["phase"] == "warmup"));
    assert!(rows.iter().any(|m| m["phase"] == "finetune"));

    let eval = get(&base, &format!("/api/runs/{run}/evaluation")).await;
    assert_eq!(eval["classes"], json!(["cat", "dog"]));
    let confusion: u64 = eval["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(
        confusion, 4,
        "20% of 12 per class, rounded down, is held out"
    );
    let off_diagonal: u64 = (0..2)
        .map(|i| eval["confusion"][i][1 - i].as_u64().unwrap())
        .sum();
    let mistakes = eval["misclassified"].as_array().unwrap();
    assert_eq!(
        mistakes.len() as u64,
        off_diagonal,
        "one entry per mistake: {eval}"
    );
    // The run records how it was measured and what it decided (fine-tune forced on here).
    let t = &eval["training"];
    assert_eq!(t["estimate"], "holdout", "{t}");
    assert_eq!(t["estimate_images"], 4, "{t}");
    assert_eq!(t["trained_on_images"], 24, "the refit saw every photo: {t}");
    assert_eq!(t["finetune"]["ran"], true, "{t}");
    assert_eq!(t["backbone"], "lite0", "{t}");
    for m in mistakes {
        let url = m["image_url"].as_str().unwrap();
        assert_eq!(
            reqwest::get(format!("{base}{url}")).await.unwrap().status(),
            200
        );
    }

    let models = get(&base, "/api/models").await;
    assert_eq!(models[0]["id"], run.as_str());
    assert_eq!(models[0]["is_default"], true);

    // One image as the raw body.
    let cat = std::fs::read(common::fixtures().join("samples/test_cat.jpg")).unwrap();
    let res = reqwest::Client::new()
        .post(format!("{base}/api/predict?top_k=1"))
        .header("content-type", "image/jpeg")
        .body(cat.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["model_id"], run.as_str());
    let pred = &p["predictions"][0];
    let sum: f64 = pred["probabilities"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-4, "{pred}");
    assert!(["cat", "dog"].contains(&pred["label"].as_str().unwrap()));
    assert_eq!(pred["top_k"].as_array().unwrap().len(), 1);

    // A batch of several multipart images, and one that is not an image.
    let dog = std::fs::read(common::fixtures().join("pets/dog/dog.1.jpg")).unwrap();
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(cat.clone()).file_name("cat.jpg"),
        )
        .part(
            "image",
            reqwest::multipart::Part::bytes(dog).file_name("dog.jpg"),
        );
    let res = reqwest::Client::new()
        .post(format!("{base}/api/predict?model={run}"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(p["predictions"][1]["filename"], "dog.jpg");
    // Concurrent requests (micro-batched together) get the same answer as a lone one.
    let single = pred["probabilities"]["cat"].as_f64().unwrap();
    let client = reqwest::Client::new();
    let answers = futures_util::future::join_all((0..12).map(|_| {
        let request = client
            .post(format!("{base}/api/predict"))
            .body(cat.clone())
            .send();
        async move { request.await.unwrap().json::<Value>().await.unwrap() }
    }))
    .await;
    for a in answers {
        let p = a["predictions"][0]["probabilities"]["cat"]
            .as_f64()
            .unwrap();
        assert!((p - single).abs() < 1e-4, "{p} vs {single}");
    }
    let res = reqwest::Client::new()
        .post(format!("{base}/api/predict"))
        .body("definitely not an image")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);

    // A forward pass that panics (the database says the model takes 64 px, its weights
    // were trained at another size) fails that request with a JSON 500; the inference
    // thread lives on, stays ready, and answers the next request.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("transferd.db").display()
    ))
    .await
    .unwrap();
    let size: i64 = sqlx::query_scalar("SELECT input_size FROM models WHERE id = ?")
        .bind(&run)
        .fetch_one(&db)
        .await
        .unwrap();
    let set_size = |s: i64| {
        sqlx::query("UPDATE models SET input_size = ? WHERE id = ?")
            .bind(s)
            .bind(&run)
            .execute(&db)
    };
    set_size(64).await.unwrap();
    let predict = || {
        reqwest::Client::new()
            .post(format!("{base}/api/predict"))
            .body(cat.clone())
            .send()
    };
    let res = predict().await.unwrap();
    assert_eq!(res.status(), 500);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal", "{body}");
    set_size(size).await.unwrap();
    assert_eq!(predict().await.unwrap().status(), 200);
    let ready = get(&base, "/readyz").await;
    assert_eq!(ready["inference"], true, "{ready}");

    // A config whose frozen pass could never fit is refused when queued (it would abort the
    // process, and after a restart the next one), and the server carries on.
    let res = reqwest::Client::new()
        .post(format!("{base}/api/runs"))
        .json(&json!({"dataset_id": dataset["id"],
            "config": {"input_size": 512, "views": 16, "finetune": {"enabled": true, "unfreeze": 15}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert!(res.text().await.unwrap().contains("--max-cache-bytes"));
    assert_eq!(get(&base, "/healthz").await["status"], "ok");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_run_keeps_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = server.base.clone();
    let dataset = upload(&base).await;
    let run = start_run(&base, &dataset, tiny(200)).await;
    follow(&base, &run, first_finetune_epoch).await;
    let res = reqwest::Client::new()
        .post(format!("{base}/api/runs/{run}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let events = follow(&base, &run, |_, _| false).await;
    assert_eq!(events.last().unwrap().1["status"], "cancelled");
    let r = get(&base, &format!("/api/runs/{run}")).await;
    assert_eq!(r["status"], "cancelled");
    let phase = |name: &str| {
        r["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["phase"] == name)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(phase("warmup"), "succeeded");
    assert_eq!(phase("finetune"), "cancelled");
    let metrics = get(&base, &format!("/api/runs/{run}/metrics")).await;
    assert!(
        metrics
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["phase"] == "finetune")
    );
    assert_eq!(get(&base, "/api/models").await, json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_run_leaves_it_queued_and_a_restart_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = server.base.clone();
    let dataset = upload(&base).await;
    let run = start_run(&base, &dataset, tiny(6)).await;
    follow(&base, &run, first_finetune_epoch).await;
    server.stop().await;

    let server = start(dir.path()).await;
    let base = server.base.clone();
    let r = wait_status(&base, &run, "succeeded").await;
    assert_eq!(r["attempts"], 2, "{r}");
    let metrics = get(&base, &format!("/api/runs/{run}/metrics")).await;
    let warmup = metrics
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["phase"] == "warmup")
        .count();
    assert!(warmup > 0, "the warm-up's metrics survive the restart");
    let model =
        std::fs::read_to_string(dir.path().join(format!("models/{run}/metrics.json"))).unwrap();
    assert!(
        model.contains("\"warmup\""),
        "the model's metrics include the warm-up"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_recovers_its_run_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let weights = common::weights_path();
    let mut child = common::process::Proc::spawn(
        dir.path(),
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--min-images-per-class",
            "2",
            // The dead process's claim lapses after this long; then any worker takes it.
            "--lease-seconds",
            "2",
            "--weights",
            weights.to_str().unwrap(),
        ],
        &[],
    );
    let (base, addr) = (child.base.clone(), child.addr.clone());
    wait_healthy(&base).await;
    let health = std::process::Command::new(env!("CARGO_BIN_EXE_transferd"))
        .args(["healthcheck", "--addr", &addr])
        .status()
        .unwrap();
    assert!(health.success(), "the container health check passes");
    let dataset = upload(&base).await;
    let run = start_run(&base, &dataset, tiny(6)).await;
    follow(&base, &run, first_finetune_epoch).await;
    child.kill(); // SIGKILL: no shutdown code runs

    let server = start(dir.path()).await;
    let base = server.base.clone();
    let r = wait_status(&base, &run, "succeeded").await;
    assert_eq!(r["attempts"], 2, "{r}");
    assert_ne!(r["worker_id"], Value::Null, "{r}");
    let datasets = get(&base, "/api/datasets").await;
    assert_eq!(datasets[0]["total_images"], 24, "the dataset is intact");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_images_vanished_fails_and_the_next_one_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = server.base.clone();
    let broken = upload(&base).await;
    let fine = upload(&base).await;
    // Every image of the first dataset disappears from disk behind the server's back.
    let folder = dir
        .path()
        .join("datasets")
        .join(broken["id"].as_str().unwrap());
    for entry in std::fs::read_dir(&folder).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let doomed = start_run(&base, &broken, tiny(1)).await;
    let next = start_run(&base, &fine, tiny(1)).await;
    let events = follow(&base, &doomed, |_, _| false).await;
    let last = &events.last().unwrap().1;
    assert_eq!(last["status"], "failed", "{last}");
    let r = get(&base, &format!("/api/runs/{doomed}")).await;
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("image"), "a useful message: {error}");
    wait_status(&base, &next, "succeeded").await;

    // A model that cannot be written (the models folder replaced by a file): the run fails
    // with a plain message; the path and the OS error go to the log only.
    let models = dir.path().join("models");
    std::fs::remove_dir_all(&models).unwrap();
    std::fs::write(&models, b"not a folder").unwrap();
    let unsaved = start_run(&base, &fine, tiny(1)).await;
    let r = wait_status(&base, &unsaved, "failed").await;
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("saving the model"), "{error}");
    assert!(
        !error.contains(dir.path().to_str().unwrap()) && !error.contains("os error"),
        "no server paths or OS errors reach clients: {error}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), |s| {
        s.header_read_timeout = Duration::from_millis(800);
        s.max_connections = 2;
    })
    .await;
    let addr = server.base.trim_start_matches("http://").to_string();
    // wait_healthy's connection may still be open; let it time out first.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // A client that sends half a request line and stops is cut off after the timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the server closes the connection, it does not wait for ever")
        .unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(4),
        "closed after the header timeout: {waited:?}"
    );
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        !answer.contains("200 OK"),
        "no answer to an unfinished request: {answer}"
    );

    // Two idle connections fill the cap: a third client waits for one of them to time out.
    let _a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let health: Value = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "served only once an idle connection was closed: {waited:?}"
    );
    server.stop().await;
}
