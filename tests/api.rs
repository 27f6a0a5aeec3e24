//! Handler tests: the router driven with `oneshot` over a fresh `#[sqlx::test]` database and a
//! temporary data directory. No worker runs here, so runs stay queued.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::harness::{error_message, harness, pets_with, zip_request};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::SqlitePool;
use std::time::Duration;
use tower::ServiceExt;
use transferd::app;

#[sqlx::test(migrations = "migrations/sqlite")]
async fn upload_reports_classes_counts_and_skipped_files(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let good = std::fs::read(common::fixtures().join("pets/dog/dog.0.jpg")).unwrap();
    let zip = pets_with(
        vec![
            ("my data/cat/notes.jpg", b"not a photo at all".to_vec()),
            ("my data/dog/truncated.jpg", good[..good.len() / 3].to_vec()),
            ("my data/dog/copy-of-dog0.jpg", good.clone()),
            ("my data/README.txt", b"hello".to_vec()),
            ("__MACOSX/my data/._x.jpg", b"junk".to_vec()),
        ],
        "my data/",
    );
    let (status, body) = h.upload(zip).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "pets");
    assert_eq!(
        body["classes"],
        json!([{"name": "cat", "count": 12}, {"name": "dog", "count": 12}])
    );
    assert_eq!(body["total_images"], 24);
    let skipped = body["skipped"].as_array().unwrap();
    let reason = |name: &str| {
        skipped
            .iter()
            .find(|s| s["name"].as_str().unwrap().ends_with(name))
            .map(|s| s["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{name} not skipped: {skipped:?}"))
    };
    assert!(reason("notes.jpg").contains("not an image"));
    assert!(reason("truncated.jpg").contains("truncated"));
    assert!(reason("copy-of-dog0.jpg").contains("duplicate"));
    assert!(reason("README.txt").contains("not inside a class folder"));
    assert_eq!(skipped.len(), 4, "{skipped:?}");

    let id = body["id"].as_str().unwrap();
    let (status, one) = h.get(&format!("/api/datasets/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["total_images"], 24);
    let (_, list) = h.get("/api/datasets").await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    // The stored image comes back byte for byte.
    let file_id: i64 = sqlx::query_scalar(
        "SELECT id FROM dataset_files WHERE dataset_id = ? AND original_name = 'my data/dog/dog.0.jpg'",
    )
    .bind(id)
    .fetch_one(&h.pool)
    .await
    .unwrap();
    let res = app(h.state.clone())
        .oneshot(
            Request::get(format!("/api/datasets/{id}/files/{file_id}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "image/jpeg");
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), good);
    let (status, _) = h.get(&format!("/api/datasets/{id}/files/999999")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn multipart_upload_with_train_and_val_folders(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let entries = common::pet_entries("");
    let refs: Vec<(String, Vec<u8>)> = entries
        .iter()
        .enumerate()
        .map(|(i, (n, b))| {
            let split = if i % 4 == 0 { "val" } else { "train" };
            (format!("root/{split}/{n}"), b.clone())
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = refs.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let zip = common::zip_of(&refs);
    let boundary = "XBOUNDARYX";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nmy pets\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"pets.zip\"\r\nContent-Type: application/zip\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&zip);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (status, v) = h
        .send(
            Request::post("/api/datasets")
                .header(
                    header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "my pets");
    assert_eq!(v["total_images"], 24);
    assert!(v["warnings"][0].as_str().unwrap().contains("merged"), "{v}");
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn hostile_and_malformed_uploads_are_refused_and_lose_nothing(pool: SqlitePool) {
    let h = harness(pool, |s| {
        s.max_upload_bytes = 4 << 20;
        s.limits.max_entry_bytes = 1 << 20;
        s.limits.max_total_bytes = 3 << 20;
    });
    let (status, first) = h.upload(common::pets_zip()).await;
    assert_eq!(status, StatusCode::CREATED);
    let jpg = std::fs::read(common::fixtures().join("pets/cat/cat.0.jpg")).unwrap();

    let mut symlink = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    symlink
        .add_symlink("dog", "/etc", zip::write::SimpleFileOptions::default())
        .unwrap();
    let symlink = {
        use std::io::Write;
        symlink
            .start_file("dog/passwd.jpg", zip::write::SimpleFileOptions::default())
            .unwrap();
        symlink.write_all(&jpg).unwrap();
        symlink.finish().unwrap().into_inner()
    };
    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "traversal",
            zip_request(pets_with(vec![("../evil.jpg", jpg.clone())], "")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "'..'",
        ),
        (
            "dot traversal",
            zip_request(pets_with(vec![("./../evil.jpg", jpg.clone())], "")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "'..'",
        ),
        (
            "absolute",
            zip_request(pets_with(vec![("/tmp/evil.jpg", jpg.clone())], "")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "absolute",
        ),
        (
            "backslash",
            zip_request(pets_with(vec![("dog\\..\\evil.jpg", jpg.clone())], "")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "backslash",
        ),
        (
            "drive",
            zip_request(pets_with(vec![("C:/evil.jpg", jpg.clone())], "")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "drive",
        ),
        (
            "symlink",
            zip_request(symlink),
            StatusCode::UNPROCESSABLE_ENTITY,
            "symbolic link",
        ),
        (
            "one class",
            zip_request(common::zip_of(&[("dog/a.jpg", jpg.clone())])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "at least 2 classes",
        ),
        (
            "flat",
            zip_request(common::zip_of(&[("a.jpg", jpg.clone())])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no class folders",
        ),
        (
            "empty zip",
            zip_request(common::zip_of(&[])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no files",
        ),
        (
            "not a zip",
            zip_request(b"PK but not really a zip".to_vec()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not a readable zip",
        ),
        (
            "ambiguous",
            zip_request(common::zip_of(&[
                ("train/dog/a.jpg", jpg.clone()),
                ("cat/b.jpg", jpg.clone()),
            ])),
            StatusCode::UNPROCESSABLE_ENTITY,
            "ambiguous",
        ),
        (
            "entry bomb",
            zip_request(pets_with(vec![("dog/zeros.jpg", vec![0u8; 8 << 20])], "")),
            StatusCode::PAYLOAD_TOO_LARGE,
            "per-file limit",
        ),
        (
            "total bomb",
            zip_request(pets_with(
                (0..4)
                    .map(|i| {
                        (
                            ["dog/z0", "dog/z1", "dog/z2", "dog/z3"][i],
                            vec![0u8; 900 << 10],
                        )
                    })
                    .collect(),
                "",
            )),
            StatusCode::PAYLOAD_TOO_LARGE,
            "inflates to more than",
        ),
        (
            "too big",
            zip_request(vec![b'P'; 5 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
        (
            "empty body",
            zip_request(Vec::new()),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            "wrong type",
            Request::post("/api/datasets")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("hi"))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "multipart",
        ),
        (
            "no file field",
            Request::post("/api/datasets")
                .header(header::CONTENT_TYPE, "multipart/form-data; boundary=B")
                .body(Body::from(
                    "--B\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nx\r\n--B--\r\n",
                ))
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "`file`",
        ),
    ];
    for (what, req, expected, needle) in cases {
        let (status, body) = h.send(req).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert!(error_message(&body).contains(needle), "{what}: {body}");
        assert!(body["error"]["code"].is_string(), "{what}: {body}");
    }
    // Nothing half-written, the first dataset intact.
    assert_eq!(h.dataset_dirs(), 1);
    let (_, list) = h.get("/api/datasets").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], first["id"]);
    let files: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dataset_files")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(files, 24);
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("tmp")).unwrap().count(),
        0,
        "tmp cleaned"
    );
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn runs_are_validated_queued_listed_and_cancelled(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let (_, ds) = h.upload(common::pets_zip()).await;
    let ds_id = ds["id"].as_str().unwrap();

    let (status, v) = h
        .json(
            "POST",
            "/api/runs",
            json!({"dataset_id": ds_id, "config": {"warmup": {"folds": "many"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "config.warmup.folds");
    for (config, field) in [
        (json!({"refit": "yes"}), "config.refit"),
        (json!({"backbone": "resnet50"}), "config.backbone"),
        (
            json!({"finetune": {"enabled": "sometimes"}}),
            "config.finetune.enabled",
        ),
        (json!({"warmup": {"l2": -1.0}}), "config.warmup.l2"),
    ] {
        let (status, v) = h
            .json(
                "POST",
                "/api/runs",
                json!({"dataset_id": ds_id, "config": config}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{config}: {v}");
        assert_eq!(v["error"]["field"], field, "{config}: {v}");
    }
    let (status, v) = h
        .json(
            "POST",
            "/api/runs",
            json!({"dataset_id": ds_id, "config": {"input_size": 9999}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "config.input_size");
    let (status, v) = h
        .json(
            "POST",
            "/api/runs",
            json!({"dataset_id": ds_id, "config": {"bogus": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(error_message(&v).contains("bogus"));
    let (status, _) = h
        .json("POST", "/api/runs", json!({"dataset_id": "nope"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = h
        .send(
            Request::post("/api/runs")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    let (status, run) = h
        .json(
            "POST",
            "/api/runs",
            json!({"dataset_id": ds_id, "config": {"baseline": {"enabled": true}}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["status"], "queued");
    assert_eq!(run["config"]["warmup"]["folds"], 5, "defaults filled in");
    assert_eq!(
        run["config"]["finetune"]["enabled"], "auto",
        "defaults filled in"
    );
    let phases: Vec<(&str, &str)> = run["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["phase"].as_str().unwrap(), p["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        phases,
        vec![
            ("warmup", "pending"),
            ("finetune", "pending"),
            ("baseline", "pending")
        ]
    );
    let run_id = run["id"].as_str().unwrap();

    // A dataset in use cannot be deleted.
    let del = Request::delete(format!("/api/datasets/{ds_id}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(del).await.0, StatusCode::CONFLICT);

    let (_, list) = h.get("/api/runs?status=queued").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        h.get("/api/runs?status=bogus").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (status, metrics) = h.get(&format!("/api/runs/{run_id}/metrics")).await;
    assert_eq!((status, metrics), (StatusCode::OK, json!([])));
    assert_eq!(
        h.get(&format!("/api/runs/{run_id}/evaluation")).await.0,
        StatusCode::CONFLICT
    );

    let (status, cancelled) = h
        .json("POST", &format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(cancelled["status"], "cancelled");
    assert!(
        cancelled["phases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "cancelled")
    );
    let (status, _) = h
        .json("POST", &format!("/api/runs/{run_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(h.get("/api/runs/nope").await.0, StatusCode::NOT_FOUND);

    // Now the dataset can go, with its folder.
    let del = Request::delete(format!("/api/datasets/{ds_id}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(del).await.0, StatusCode::NO_CONTENT);
    assert_eq!(h.dataset_dirs(), 0);
    let (_, run) = h.get(&format!("/api/runs/{run_id}")).await;
    assert_eq!(
        run["dataset_id"],
        Value::Null,
        "the run outlives its dataset"
    );
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn predict_needs_a_model_and_health_reports(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let jpg = std::fs::read(common::fixtures().join("pets/cat/cat.0.jpg")).unwrap();
    let (status, v) = h
        .send(Request::post("/api/predict").body(Body::from(jpg)).unwrap())
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(error_message(&v).contains("no trained model"));
    let (status, _) = h
        .send(
            Request::post("/api/predict?model=nope")
                .body(Body::from("x"))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/api/models").await, (StatusCode::OK, json!([])));
    assert_eq!(
        h.json("POST", "/api/models/nope/promote", json!({}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    let (status, defaults) = h.get("/api/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(defaults["warmup"]["folds"], 5);
    assert_eq!(defaults["backbone"], "auto");
    assert_eq!(defaults["refit"], true);
    assert_eq!(defaults["finetune"]["unfreeze"], 1);
    assert_eq!(h.get("/healthz").await.1["status"], "ok");
    let (status, ready) = h.get("/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no weights in this harness"
    );
    assert_eq!(ready["database"], true);
    assert_eq!(ready["device"]["backend"], "flex");
    let (status, v) = h.get("/api/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "not_found");

    let res = app(h.state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for needle in [
        "transferd_http_requests_total{",
        "route=\"/api/models/{id}/promote\"",
        "transferd_http_request_duration_seconds_bucket{",
        "transferd_runs{status=\"queued\"} 0",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from /metrics:\n{text}"
        );
    }

    let (status, doc) = h.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/api/datasets",
        "/api/runs/{id}/events",
        "/api/predict",
        "/readyz",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["TrainConfig"].is_object());
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn api_keys_guard_writes_and_optionally_reads_and_predict(pool: SqlitePool) {
    let key = "s3cret-key-for-tests-0001";
    let h = harness(pool, |s| s.access.keys = vec![key.parse().unwrap()]);
    let (status, v) = h.upload(common::pets_zip()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    let mut req = zip_request(common::pets_zip());
    req.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer wrong-key-0000000000".parse().unwrap(),
    );
    assert_eq!(h.send(req).await.0, StatusCode::UNAUTHORIZED);
    let mut req = zip_request(common::pets_zip());
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    assert_eq!(h.send(req).await.0, StatusCode::CREATED);
    assert_eq!(h.dataset_dirs(), 1, "refused uploads stored nothing");
    // Reads, predictions (409: no model yet, but not 401) and health stay open.
    assert_eq!(h.get("/api/datasets").await.0, StatusCode::OK);
    let jpg = std::fs::read(common::fixtures().join("pets/cat/cat.0.jpg")).unwrap();
    let predict = || {
        Request::post("/api/predict")
            .body(Body::from(jpg.clone()))
            .unwrap()
    };
    assert_eq!(h.send(predict()).await.0, StatusCode::CONFLICT);
    assert_eq!(h.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(
        h.json("POST", "/api/runs/x/cancel", json!({})).await.0,
        StatusCode::UNAUTHORIZED
    );

    let strict = harness(h.pool.clone(), |s| {
        s.access.keys = vec![key.parse().unwrap()];
        s.access.protect_reads = true;
        s.access.protect_predict = true;
    });
    assert_eq!(
        strict.get("/api/datasets").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(strict.send(predict()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(strict.get("/readyz").await.1["database"], true);
}

/// Every route the OpenAPI document lists, as (method, path with its parameters filled in).
fn documented_routes() -> Vec<(String, String)> {
    use utoipa::OpenApi;
    let doc = serde_json::to_value(transferd::api::ApiDoc::openapi()).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let filled = path.replace("{id}", "x").replace("{file_id}", "1");
            out.push((method.to_uppercase(), filled));
        }
    }
    out
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn every_documented_route_is_guarded_by_its_group(pool: SqlitePool) {
    // Protection follows where a route is mounted; this walks every documented route, so a
    // route mounted in the wrong group (or outside the groups) fails here.
    let key = "s3cret-key-for-tests-0001";
    let routes = documented_routes();
    assert!(routes.len() >= 15, "{routes:?}");
    let public = ["/healthz", "/readyz"];
    let strict = harness(pool.clone(), |s| {
        s.access.keys = vec![key.parse().unwrap()];
        s.access.protect_reads = true;
        s.access.protect_predict = true;
    });
    let writes_only = harness(pool.clone(), |s| s.access.keys = vec![key.parse().unwrap()]);
    let predict_too = harness(pool, |s| {
        s.access.keys = vec![key.parse().unwrap()];
        s.access.protect_predict = true;
    });
    for (method, path) in &routes {
        let req = || {
            Request::builder()
                .method(method.as_str())
                .uri(path.as_str())
                .body(Body::empty())
                .unwrap()
        };
        let (status, body) = strict.send(req()).await;
        if public.contains(&path.as_str()) {
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            continue;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
        let is_predict = path == "/api/predict";
        let is_write = method != "GET" && !is_predict;
        let (status, body) = writes_only.send(req()).await;
        assert_eq!(
            status == StatusCode::UNAUTHORIZED,
            is_write,
            "{method} {path} with keys but open reads and predictions: {status} {body}"
        );
        let (status, body) = predict_too.send(req()).await;
        assert_eq!(
            status == StatusCode::UNAUTHORIZED,
            is_write || is_predict,
            "{method} {path} with keys and protected predictions only: {status} {body}"
        );
    }
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn cors_is_off_unless_origins_are_configured(pool: SqlitePool) {
    let preflight = || {
        Request::builder()
            .method("OPTIONS")
            .uri("/api/datasets")
            .header(header::ORIGIN, "https://app.example")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .body(Body::empty())
            .unwrap()
    };
    let h = harness(pool.clone(), |_| {});
    let res = app(h.state.clone()).oneshot(preflight()).await.unwrap();
    assert!(
        res.headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none()
    );
    let h = harness(pool, |s| {
        s.cors_origins = vec!["https://app.example".into()]
    });
    let res = app(h.state.clone()).oneshot(preflight()).await.unwrap();
    assert_eq!(
        res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn a_failed_write_leaves_no_half_dataset(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    // Where the dataset folder should go, a file: the final rename fails.
    let datasets = h.dir.path().join("datasets");
    std::fs::remove_dir_all(&datasets).unwrap();
    std::fs::write(&datasets, b"in the way").unwrap();
    let (status, v) = h.upload(common::pets_zip()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "internal");
    assert!(
        !error_message(&v).contains("datasets"),
        "no internals leak: {v}"
    );
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("tmp")).unwrap().count(),
        0
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM datasets")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

/// A body that never finishes: a client that stalls mid-request.
fn stalled_body() -> Body {
    Body::from_stream(futures_util::stream::pending::<
        Result<Vec<u8>, std::io::Error>,
    >())
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn slow_requests_time_out_with_json_but_uploads_do_not(pool: SqlitePool) {
    let h = harness(pool, |s| {
        s.request_timeout = std::time::Duration::from_millis(300)
    });
    let started = std::time::Instant::now();
    let (status, v) = h
        .send(
            Request::post("/api/runs")
                .header(header::CONTENT_TYPE, "application/json")
                .body(stalled_body())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    // An upload runs as long as its data takes: still waiting well past the timeout.
    let upload = app(h.state.clone()).oneshot(
        Request::post("/api/datasets")
            .header(header::CONTENT_TYPE, "application/zip")
            .body(stalled_body())
            .unwrap(),
    );
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(1500), upload)
            .await
            .is_err(),
        "an upload is not cut off by the request timeout"
    );
    // But an upload that stalls past --upload-stall-timeout is abandoned with a 408.
    let impatient = harness(h.pool.clone(), |s| {
        s.upload_stall_timeout = std::time::Duration::from_millis(300)
    });
    let (status, v) = impatient
        .send(
            Request::post("/api/datasets")
                .header(header::CONTENT_TYPE, "application/zip")
                .body(stalled_body())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{v}");
    assert_eq!(v["error"]["code"], "request_timeout");
    assert_eq!(impatient.dataset_dirs(), 0);
}

/// A multipart body of (field name, file name, bytes) parts.
fn multipart(parts: &[(&str, Option<&str>, Vec<u8>)]) -> Request<Body> {
    let boundary = "x-b0undary";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        let file = file.map_or(String::new(), |f| format!("; filename=\"{f}\""));
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post("/api/datasets")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap()
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn multipart_fields_are_bounded_and_unknown_ones_refused(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let zip = common::pets_zip();
    let (status, v) = h
        .send(multipart(&[
            ("file", Some("a.zip"), zip.clone()),
            ("extra", None, b"x".to_vec()),
        ]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_message(&v).contains("\"extra\""), "{v}");
    let (status, v) = h
        .send(multipart(&[
            ("file", Some("a.zip"), zip.clone()),
            ("file", Some("b.zip"), zip.clone()),
        ]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_message(&v).contains("more than one `file`"), "{v}");
    let (status, v) = h
        .send(multipart(&[
            ("name", None, vec![b'n'; 2048]),
            ("file", Some("a.zip"), zip.clone()),
        ]))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "name");
    assert_eq!(h.dataset_dirs(), 0, "nothing refused was stored");
    let (status, v) = h
        .send(multipart(&[
            ("name", None, b"pets".to_vec()),
            ("file", Some("a.zip"), zip),
        ]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "pets");
}

/// Queues a run on `ds` and records it as succeeded with a model row (no files): what the
/// worker leaves behind, without training.
async fn succeeded_run(h: &common::harness::Harness, pool: &SqlitePool, ds: &Value) -> String {
    let (status, run) = h
        .json("POST", "/api/runs", json!({"dataset_id": ds["id"]}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let db = transferd::db::Db::from(pool.clone());
    let lease = std::time::Duration::from_secs(60);
    transferd::db::queue::claim_next(&db, "test-worker", lease)
        .await
        .unwrap()
        .unwrap();
    let classes = vec!["cat".to_string(), "dog".to_string()];
    let recorded = transferd::db::models::record_success(
        &db,
        &transferd::db::models::Success {
            run_id: run["id"].as_str().unwrap(),
            dataset_id: ds["id"].as_str(),
            classes: &classes,
            input_size: 224,
            val_accuracy: 0.9,
            evaluation: "{}",
        },
        "test-worker",
    )
    .await
    .unwrap();
    assert!(recorded);
    run["id"].as_str().unwrap().to_string()
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn a_full_prediction_queue_refuses_at_once_with_retry_after(pool: SqlitePool) {
    let h = harness(pool.clone(), |s| s.predict_queue = 2);
    // A model row to predict with (its files are never reached: admission comes first).
    let (_, ds) = h.upload(common::pets_zip()).await;
    let first = succeeded_run(&h, &pool, &ds).await;
    let jpg = std::fs::read(common::fixtures().join("pets/cat/cat.0.jpg")).unwrap();

    // The queue is full: refused at once, with Retry-After and the JSON body.
    let held = h.state.inference.admit(2).unwrap();
    let res = app(h.state.clone())
        .oneshot(
            Request::post("/api/predict")
                .body(Body::from(jpg.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[header::RETRY_AFTER], "1");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "busy", "{v}");
    assert!(error_message(&v).contains("queue is full"), "{v}");
    let res = app(h.state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("transferd_predict_refused_total") && !l.ends_with(" 0")),
        "refusals are counted: {text}"
    );
    drop(held);
    assert_eq!(
        h.state.inference.queued(),
        0,
        "the refused request took no place"
    );

    // More images than the whole queue holds can never fit: 413, not a retry.
    let boundary = "b0undary";
    let mut body = Vec::new();
    for i in 0..3 {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{i}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&jpg);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let (status, v) = h
        .send(
            Request::post("/api/predict")
                .header(
                    header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        error_message(&v).contains("more than the prediction queue holds"),
        "{v}"
    );

    // Deleting models: never the default; another one goes, its run's record stays.
    let (status, v) = h
        .send(
            Request::delete(format!("/api/models/{first}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the only model is the default: {v}"
    );
    succeeded_run(&h, &pool, &ds).await;
    std::fs::create_dir_all(h.state.storage.model(&first)).unwrap();
    let (status, _) = h
        .send(
            Request::delete(format!("/api/models/{first}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        !h.state.storage.model(&first).exists(),
        "its files went too"
    );
    let (_, models) = h.get("/api/models").await;
    assert_eq!(models.as_array().unwrap().len(), 1);
    let (status, old) = h.get(&format!("/api/runs/{first}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(old["model_id"].is_null(), "{old}");
    let (status, _) = h
        .send(
            Request::delete(format!("/api/models/{first}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn forged_cross_site_requests_rebinding_and_headers(pool: SqlitePool) {
    let h = harness(pool.clone(), |_| {});
    let (_, ds) = h.upload(common::pets_zip()).await;
    let body = json!({"dataset_id": ds["id"]}).to_string();
    // A form on another site posting text/plain: refused for where it comes from...
    let (status, v) = h
        .send(
            Request::post("/api/runs")
                .header(header::CONTENT_TYPE, "text/plain")
                .header(header::ORIGIN, "https://evil.example")
                .header("sec-fetch-site", "cross-site")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    // ...and, from anywhere, for its type.
    let (status, v) = h
        .send(
            Request::post("/api/runs")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    let (_, runs) = h.get("/api/runs").await;
    assert_eq!(runs, json!([]), "nothing was queued");
    // A delete from another site, even without a body, is refused; the dataset stays.
    let (status, _) = h
        .send(
            Request::delete(format!("/api/datasets/{}", ds["id"].as_str().unwrap()))
                .header(header::ORIGIN, "https://evil.example")
                .header(header::HOST, "127.0.0.1:8080")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(h.get("/api/datasets").await.1.as_array().unwrap().len(), 1);
    // DNS rebinding: a hostile name pointed at 127.0.0.1.
    let (status, v) = h
        .send(
            Request::get("/api/datasets")
                .header(header::HOST, "rebind.evil.example:8080")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{v}");

    // Headers: never sniffed, the page confined; images cached publicly only when reads
    // are open.
    let res = app(h.state.clone())
        .oneshot(Request::get("/api/datasets").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert!(
        res.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let key = "s3cret-key-for-tests-0001";
    let strict = harness(pool, |s| {
        // The same data directory, so the stored image is there to serve.
        s.data_dir = h.dir.path().to_path_buf();
        s.access.keys = vec![key.parse().unwrap()];
        s.access.protect_reads = true;
    });
    let image = |h: &common::harness::Harness, auth: bool| {
        let mut req = Request::get(format!(
            "/api/datasets/{}/files/1",
            ds["id"].as_str().unwrap()
        ));
        if auth {
            req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        app(h.state.clone()).oneshot(req.body(Body::empty()).unwrap())
    };
    let open = image(&h, false).await.unwrap();
    assert_eq!(open.status(), StatusCode::OK);
    assert!(
        open.headers()[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .starts_with("public")
    );
    let private = image(&strict, true).await.unwrap();
    assert_eq!(private.status(), StatusCode::OK);
    assert_eq!(
        private.headers()[header::CACHE_CONTROL],
        "private, no-store"
    );
    assert_eq!(private.headers()[header::VARY], "Authorization");
    // /metrics reads like the API: behind the key under --protect-reads.
    let metrics = app(strict.state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn a_run_too_big_for_memory_is_refused_before_it_starts(pool: SqlitePool) {
    let h = harness(pool, |s| s.max_cache_bytes = 200 << 10);
    let (_, ds) = h.upload(common::pets_zip()).await;
    // 24 photos (small data: head only, no activations) × 1,280 float features: 120 KiB a
    // view, so one view fits in 200 KiB and two do not.
    let (status, v) = h
        .json(
            "POST",
            "/api/runs",
            json!({"dataset_id": ds["id"], "config": {"views": 2}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(error_message(&v).contains("--max-cache-bytes"), "{v}");
    let (status, v) = h
        .json(
            "POST",
            "/api/runs",
            json!({"dataset_id": ds["id"], "config": {"views": 1, "input_size": 64}}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a run that fits is queued: {v}"
    );
    let (_, runs) = h.get("/api/runs").await;
    assert_eq!(runs.as_array().unwrap().len(), 1, "only the one that fits");

    // The queue itself is bounded.
    let full = harness(h.pool.clone(), |s| s.max_queued_runs = 1);
    let (status, v) = full
        .json(
            "POST",
            "/api/runs",
            json!({"dataset_id": ds["id"], "config": {"views": 1, "input_size": 64}}),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(error_message(&v).contains("--max-queued-runs"), "{v}");
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn uploads_need_room_on_the_disk_and_in_the_quota(pool: SqlitePool) {
    let zip = common::pets_zip();
    let sized = |zip: &Vec<u8>| {
        let mut req = zip_request(zip.clone());
        req.headers_mut().insert(
            header::CONTENT_LENGTH,
            zip.len().to_string().parse().unwrap(),
        );
        req
    };
    // More headroom asked for than any disk has.
    let full = harness(pool.clone(), |s| s.min_free_bytes = u64::MAX / 4);
    let (status, v) = full.send(sized(&zip)).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{v}");
    assert!(error_message(&v).contains("MiB free"), "{v}");
    assert_eq!(full.dataset_dirs(), 0);
    // A quota: the first upload fits, the second would not.
    let quota = (zip.len() as u64) * 3 / 2;
    let h = harness(pool, |s| s.data_quota_bytes = Some(quota));
    assert_eq!(h.send(sized(&zip)).await.0, StatusCode::CREATED);
    let (status, v) = h.send(sized(&zip)).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{v}");
    assert!(error_message(&v).contains("--data-quota-bytes"), "{v}");
    assert_eq!(h.dataset_dirs(), 1, "the first dataset is intact");
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn live_event_streams_are_capped(pool: SqlitePool) {
    let h = harness(pool, |s| s.max_event_streams = 1);
    let (_, ds) = h.upload(common::pets_zip()).await;
    let (_, run) = h
        .json("POST", "/api/runs", json!({"dataset_id": ds["id"]}))
        .await;
    let stream = || {
        Request::get(format!("/api/runs/{}/events", run["id"].as_str().unwrap()))
            .body(Body::empty())
            .unwrap()
    };
    // The run stays queued (no worker here), so the first stream stays open.
    let first = app(h.state.clone()).oneshot(stream()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = app(h.state.clone()).oneshot(stream()).await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.headers().contains_key(header::RETRY_AFTER));
    drop(first);
    let third = app(h.state.clone()).oneshot(stream()).await.unwrap();
    assert_eq!(
        third.status(),
        StatusCode::OK,
        "a closed stream gives its place back"
    );
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn a_stream_ends_when_its_run_ends_even_if_the_event_is_missed(pool: SqlitePool) {
    let h = harness(pool.clone(), |_| {});
    let (_, ds) = h.upload(common::pets_zip()).await;
    let (_, run) = h
        .json("POST", "/api/runs", json!({"dataset_id": ds["id"]}))
        .await;
    let id = run["id"].as_str().unwrap();
    let req = Request::get(format!("/api/runs/{id}/events"))
        .body(Body::empty())
        .unwrap();
    let res = app(h.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Ended behind the stream's back: no event is published (as when another process's
    // notification is lost).
    let db = transferd::db::Db::from(pool);
    transferd::db::cancel::cancel(&db, id).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(30), res.into_body().collect())
        .await
        .expect("the stream ends once the database says the run is over")
        .unwrap()
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("event: status"), "{text}");
    assert!(text.contains("\"status\":\"cancelled\""), "{text}");
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn lists_come_a_page_at_a_time(pool: SqlitePool) {
    let h = harness(pool, |_| {});
    let zip = pets_with(vec![("cat/notes.jpg", b"not a photo".to_vec())], "");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, v) = h.upload(zip.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let page = |uri: String| {
        let state = h.state.clone();
        async move {
            let res = app(state)
                .oneshot(Request::get(uri).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = res.status();
            let next = res
                .headers()
                .get("x-next-cursor")
                .map(|v| v.to_str().unwrap().to_string());
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                next,
                serde_json::from_slice::<Value>(&body).unwrap(),
            )
        }
    };
    let (status, next, first) = page("/api/datasets?limit=2".into()).await;
    assert_eq!(status, StatusCode::OK);
    let first = first.as_array().unwrap().clone();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0]["id"], ids[2].as_str(), "newest first");
    // The list carries counts, not every skipped file.
    assert_eq!(first[0]["skipped_count"], 1);
    assert_eq!(first[0]["skipped"], json!([]));
    let cursor = next.expect("a third dataset follows");
    let (_, next, rest) = page(format!("/api/datasets?limit=2&cursor={cursor}")).await;
    assert_eq!(rest.as_array().unwrap().len(), 1);
    assert_eq!(rest[0]["id"], ids[0].as_str());
    assert!(next.is_none(), "the last page says so");
    // The dataset's own route keeps the skipped files.
    let (_, one) = h.get(&format!("/api/datasets/{}", ids[0])).await;
    assert_eq!(one["skipped"][0]["name"], "cat/notes.jpg");
    for bad in [
        "/api/datasets?limit=0",
        "/api/runs?limit=5000",
        "/api/models?cursor=nonsense",
    ] {
        let (status, _, v) = page(bad.into()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {v}");
    }
}

#[sqlx::test(migrations = "migrations/sqlite")]
async fn an_endless_multipart_header_is_cut_at_the_upload_limit(pool: SqlitePool) {
    let h = harness(pool, |s| s.max_upload_bytes = 1 << 20);
    // One part header line of 3 MB: no field data at all, so only a cap on the whole body
    // stops it.
    let mut body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; x=\"".to_vec();
    body.extend(std::iter::repeat_n(b'a', 3 << 20));
    body.extend_from_slice(b"\"\r\n\r\nPK\r\n--b--\r\n");
    let (status, v) = h
        .send(
            Request::post("/api/datasets")
                .header(header::CONTENT_TYPE, "multipart/form-data; boundary=b")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(h.dataset_dirs(), 0);
}
