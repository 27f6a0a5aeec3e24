//! An HTTP client of a running server for the end-to-end tests: upload the fixture zip,
//! queue tiny runs, poll and follow them over SSE.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub async fn wait_healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {base} never became ready");
}

/// A run small enough for CI; `finetune_epochs` sets how long the fine-tune lasts (forced
/// on: the fixtures are small data, where `auto` would skip it).
pub fn tiny(finetune_epochs: usize) -> Value {
    json!({
        "backbone": "lite0", "input_size": 128, "batch_size": 8, "views": 2,
        "finetune": {"enabled": true, "epochs": finetune_epochs, "unfreeze": 1, "patience": finetune_epochs},
    })
}

pub async fn upload(base: &str) -> Value {
    upload_zip(base, super::pets_zip()).await
}

/// Uploads `zip` as the dataset "pets"; 201 asserted.
pub async fn upload_zip(base: &str, zip: Vec<u8>) -> Value {
    let form = reqwest::multipart::Form::new().text("name", "pets").part(
        "file",
        reqwest::multipart::Part::bytes(zip).file_name("pets.zip"),
    );
    let res = reqwest::Client::new()
        .post(format!("{base}/api/datasets"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

pub async fn start_run(base: &str, dataset: &Value, config: Value) -> String {
    let res = reqwest::Client::new()
        .post(format!("{base}/api/runs"))
        .json(&json!({"dataset_id": dataset["id"], "config": config}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let run: Value = res.json().await.unwrap();
    run["id"].as_str().unwrap().to_string()
}

pub async fn get(base: &str, path: &str) -> Value {
    let res = reqwest::get(format!("{base}{path}")).await.unwrap();
    assert!(res.status().is_success(), "{path}: {}", res.status());
    res.json().await.unwrap()
}

/// Reads SSE events of a run until `stop` says so or the stream ends.
pub async fn follow(
    base: &str,
    run: &str,
    mut stop: impl FnMut(&str, &Value) -> bool,
) -> Vec<(String, Value)> {
    let mut res = reqwest::get(format!("{base}/api/runs/{run}/events"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), res.chunk())
        .await
        .expect("SSE stream stalled")
    {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // keep-alive comment
            }
            let value: Value = serde_json::from_str(&data).unwrap();
            let done = stop(&name, &value);
            events.push((name, value));
            if done {
                return events;
            }
        }
    }
    events
}

pub async fn wait_status(base: &str, run: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = get(base, &format!("/api/runs/{run}")).await;
        if r["status"] == want {
            return r;
        }
        assert!(
            !["succeeded", "failed", "cancelled"].contains(&r["status"].as_str().unwrap()),
            "run ended {} while waiting for {want}: {r}",
            r["status"]
        );
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {want}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
