//! The trust features end to end: the dataset audit, dataset versions, "unknown" answers and
//! model export, against a real `transferd serve` on port 0 and the `transferd` CLI; the ONNX
//! export checked with ONNX Runtime (Python, `bench/peers/requirements-onnx.txt`, installed
//! by `.ci/run`) for every backbone.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use transferd::ml::backbone::Backbone;
use transferd::ml::preprocess::{self, Preprocessing};

async fn predict(base: &str, bytes: Vec<u8>, query: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("{base}/api/predict{query}"))
        .body(bytes)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_versions_unknown_answers_and_export_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::process::Proc::spawn(
        dir.path(),
        &[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--min-images-per-class",
            "2",
        ],
        &[(
            "TRANSFERD_WEIGHTS".into(),
            common::weights_path().display().to_string(),
        )],
    );
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let dataset = common::client::upload_zip(&base, common::pets_zip_with_near_duplicate()).await;
    assert_eq!(dataset["total_images"], 25);
    let mut config = common::client::tiny(1);
    config["finetune"]["enabled"] = json!(false);
    let run = common::client::start_run(&base, &dataset, config.clone()).await;
    // One run trains at a time: a second one waits in the queue, and has no audit yet.
    let queued = common::client::start_run(&base, &dataset, config).await;
    let early = http
        .get(format!("{base}/api/runs/{queued}/audit"))
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), 409);
    let body: Value = early.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("succeeded"),
        "{body}"
    );
    let cancelled = http
        .post(format!("{base}/api/runs/{queued}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    common::client::wait_status(&base, &run, "succeeded").await;

    let audit = common::client::get(&base, &format!("/api/runs/{run}/audit")).await;
    assert_eq!(audit["photos"], 25, "{audit}");
    let pair = audit["near_duplicates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            [&p["a"], &p["b"]].iter().any(|x| {
                x["original_name"]
                    .as_str()
                    .unwrap_or("")
                    .contains("cat0-copy")
            })
        })
        .unwrap_or_else(|| panic!("the planted copy is found: {audit}"))
        .clone();
    assert_eq!(pair["kind"], "cross_class", "{pair}");
    // A 90% resize re-encoded is the same picture to the network (the threshold is 0.80).
    assert!(pair["similarity"].as_f64().unwrap() > 0.95, "{pair}");
    let copy = [&pair["a"], &pair["b"]]
        .into_iter()
        .find(|x| x["original_name"].as_str().unwrap().contains("cat0-copy"))
        .unwrap()
        .clone();
    let image = http
        .get(format!("{base}{}", copy["image_url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(image.status(), 200);
    let missing = http
        .get(format!("{base}/api/runs/nope/audit"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A version without the copy; the original stays as it was.
    let ds = dataset["id"].as_str().unwrap();
    let version = |body: Value| {
        let http = http.clone();
        let url = format!("{base}/api/datasets/{ds}/versions");
        async move {
            let res = http.post(url).json(&body).send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = version(json!({"exclude": [copy["file_id"]]})).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["total_images"], 24);
    assert_eq!(v["origin"]["parent_id"], ds);
    assert_eq!(v["origin"]["excluded"], 1);
    let original = common::client::get(&base, &format!("/api/datasets/{ds}")).await;
    assert_eq!(original["total_images"], 25);
    let (status, v) =
        version(json!({"relabel": [{"file_id": copy["file_id"], "label": "cat"}]})).await;
    assert_eq!(status, 201, "{v}");
    let cats = v["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cat")
        .unwrap()["count"]
        .clone();
    assert_eq!(cats, 13, "{v}");
    assert_eq!(v["origin"]["relabelled"], 1, "{v}");
    for (bad, says) in [
        (json!({"exclude": [999999]}), "999999"),
        (
            json!({"relabel": [{"file_id": copy["file_id"], "label": "horse"}]}),
            "horse",
        ),
        (
            json!({"relabel": [{"file_id": 999998, "label": "cat"}]}),
            "999998",
        ),
        // The first dataset of a fresh database holds file ids 1 to 25: all of them out.
        (
            json!({"exclude": (1..=25).collect::<Vec<i64>>()}),
            "no images",
        ),
        (json!({}), "nothing to change"),
        (
            json!({"exclude": [copy["file_id"]], "relabel": [{"file_id": copy["file_id"], "label": "cat"}]}),
            "both",
        ),
    ] {
        let (status, v) = version(bad).await;
        assert_eq!(status, 422, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    let files = common::client::get(&base, &format!("/api/datasets/{ds}")).await;
    assert_eq!(files["total_images"], 25, "refusals change nothing");
    let res = http
        .post(format!("{base}/api/datasets/nope/versions"))
        .json(&json!({"exclude": [1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    // Unknown answers: a foreign picture is unknown, a pet photo is not.
    let foreign = dir.path().join("stripes.png");
    common::stripes(&foreign);
    let (status, p) = predict(&base, std::fs::read(&foreign).unwrap(), "").await;
    assert_eq!(status, 200, "{p}");
    let p = &p["predictions"][0];
    assert_eq!(p["unknown"], true, "{p}");
    assert!(p["label"].is_null(), "{p}");
    assert!(p["ood_score"].as_f64().unwrap() > p["unknown_threshold"].as_f64().unwrap());
    assert_eq!(p["probabilities"].as_object().unwrap().len(), 2);
    let cat = std::fs::read(common::fixtures().join("samples/test_cat.jpg")).unwrap();
    let (_, q) = predict(&base, cat.clone(), "").await;
    let q = &q["predictions"][0];
    assert_eq!(q["unknown"], false, "{q}");
    assert_eq!(q["label"], "cat", "{q}");
    let high = format!(
        "?unknown_threshold={}",
        p["ood_score"].as_f64().unwrap() * 2.0
    );
    let (_, r) = predict(&base, std::fs::read(&foreign).unwrap(), &high).await;
    assert_eq!(
        r["predictions"][0]["unknown"], false,
        "a looser threshold lets it through"
    );
    let (status, r) = predict(&base, cat, "?unknown_threshold=-1").await;
    assert_eq!(status, 422, "{r}");

    // Export: both formats, 404 and 422.
    let model = common::client::get(&base, "/api/models").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for format in ["onnx", "safetensors"] {
        let res = http
            .get(format!("{base}/api/models/{model}/export?format={format}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let disposition = res.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            disposition.contains(&format!("model-{model}.{format}")),
            "{disposition}"
        );
        assert!(res.bytes().await.unwrap().len() > 1_000_000);
    }
    let res = http
        .get(format!("{base}/api/models/{model}/export?format=pth"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("onnx, safetensors"),
        "{body}"
    );
    let res = http
        .get(format!("{base}/api/models/nope/export?format=onnx"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    server.stop();
}

fn transferd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_transferd"));
    cmd.arg("--data-dir")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("data"))
        .env("RUST_LOG", "warn");
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// For every backbone: train a head on the fixtures with the CLI, export it to ONNX with the
/// CLI, and run the file in ONNX Runtime on the same preprocessed photos: the probabilities
/// match `transferd predict` within 1e-4.
#[test]
fn onnx_export_matches_predict_in_onnx_runtime_for_every_backbone() {
    let ort = Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .unwrap();
    assert!(
        ort.status.success(),
        "this test needs ONNX Runtime: pip install -r bench/peers/requirements-onnx.txt"
    );
    let work = tempfile::tempdir().unwrap();
    let photos: Vec<_> = [
        "samples/test_cat.jpg",
        "samples/test_dog.jpg",
        "pets/cat/cat.3.jpg",
    ]
    .iter()
    .map(|p| common::fixtures().join(p))
    .collect();
    for backbone in [Backbone::Lite0, Backbone::Lite1, Backbone::Lite2] {
        common::weights_of(backbone);
        let name = backbone.name();
        let config = work.path().join(format!("{name}.json"));
        std::fs::write(
            &config,
            json!({"backbone": name, "views": 1, "finetune": {"enabled": false}}).to_string(),
        )
        .unwrap();
        let model = work.path().join(name);
        run_ok(
            transferd()
                .args(["train", "--device", "cpu", "--data"])
                .arg(common::fixtures().join("pets"))
                .arg("--out")
                .arg(&model)
                .arg("--config")
                .arg(&config),
        );
        let onnx = work.path().join(format!("{name}.onnx"));
        let exported: Value = serde_json::from_str(
            run_ok(
                transferd()
                    .args(["export", "--format", "onnx", "--model"])
                    .arg(&model)
                    .arg("--out")
                    .arg(&onnx),
            )
            .trim(),
        )
        .unwrap();
        assert_eq!(
            exported["bytes"].as_u64().unwrap(),
            std::fs::metadata(&onnx).unwrap().len()
        );
        let predicted = run_ok(
            transferd()
                .args(["predict", "--device", "cpu", "--model"])
                .arg(&model)
                .args(&photos),
        );
        let saved: Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        let pre: Preprocessing = serde_json::from_value(saved["preprocessing"].clone()).unwrap();
        let classes: Vec<String> = serde_json::from_value(saved["classes"].clone()).unwrap();
        let mut input = Vec::new();
        for p in &photos {
            let image = preprocess::decode(&std::fs::read(p).unwrap(), 4096).unwrap();
            input.extend(preprocess::eval_view(&image, &pre));
        }
        let raw = work.path().join(format!("{name}.f32"));
        std::fs::write(
            &raw,
            input
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        let ort: Value = serde_json::from_str(&run_ok(
            Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/ort_predict.py"))
                .arg(&onnx)
                .arg(&raw)
                .arg(photos.len().to_string())
                .arg(pre.input_size.to_string()),
        ))
        .unwrap();
        assert_eq!(
            ort["classes"],
            json!(classes),
            "class names travel in the metadata"
        );
        let ort_rows = ort["probabilities"].as_array().unwrap();
        assert_eq!(predicted.lines().count(), photos.len(), "{predicted}");
        assert_eq!(ort_rows.len(), photos.len(), "{ort}");
        for (line, ort_p) in predicted.lines().zip(ort_rows) {
            let ours: Value = serde_json::from_str(line).unwrap();
            for (c, class) in classes.iter().enumerate() {
                let a = ours["probabilities"][class].as_f64().unwrap();
                let b = ort_p[c].as_f64().unwrap();
                assert!(
                    (a - b).abs() < 1e-4,
                    "{name} {class}: transferd {a}, ONNX Runtime {b}"
                );
            }
        }
    }
}

/// A version's origin is stored with its report and read back, on the embedded database.
#[sqlx::test(migrations = "migrations/sqlite")]
async fn a_versions_origin_is_stored_with_it(pool: sqlx::SqlitePool) {
    let db = transferd::db::Db::from(pool);
    let (staged, _) = common::read_folder(&common::fixtures().join("pets"), &common::tiny_config());
    let origin = transferd::db::datasets::Origin {
        parent_id: "parent".into(),
        excluded: 2,
        relabelled: 1,
    };
    let d =
        transferd::db::datasets::insert(&db, "v", "pets (fixed)", &staged.ingested, Some(&origin))
            .await
            .unwrap();
    assert_eq!(d.origin.as_ref(), Some(&origin));
    let back = transferd::db::datasets::get(&db, "v")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.origin, Some(origin));
    let plain = transferd::db::datasets::insert(&db, "p", "pets", &staged.ingested, None)
        .await
        .unwrap();
    assert_eq!(plain.origin, None);
}
