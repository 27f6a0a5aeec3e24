//! A router over a fresh database and data directory, driven with `oneshot`.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use sqlx::SqlitePool;
use tower::ServiceExt;
use transferd::{AppState, Settings, app};

pub struct Harness {
    pub state: AppState,
    /// The same database, for assertions in SQL.
    pub pool: SqlitePool,
    pub dir: tempfile::TempDir,
}

pub fn harness(pool: SqlitePool, tweak: impl FnOnce(&mut Settings)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults(dir.path());
    settings.limits.min_images_per_class = 2;
    tweak(&mut settings);
    Harness {
        state: AppState::for_tests(pool.clone(), settings),
        pool,
        dir,
    }
}

impl Harness {
    pub async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let res = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    pub async fn upload(&self, zip: Vec<u8>) -> (StatusCode, Value) {
        self.send(zip_request(zip)).await
    }

    pub async fn json(&self, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            Request::builder()
                .method(method)
                .uri(uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    /// Dataset folders on disk.
    pub fn dataset_dirs(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("datasets"))
            .unwrap()
            .count()
    }
}

pub fn zip_request(zip: Vec<u8>) -> Request<Body> {
    Request::post("/api/datasets?name=pets")
        .header(header::CONTENT_TYPE, "application/zip")
        .body(Body::from(zip))
        .unwrap()
}

pub fn error_message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The pet fixtures under `prefix`, plus `extra` entries, as a zip.
pub fn pets_with(extra: Vec<(&str, Vec<u8>)>, prefix: &str) -> Vec<u8> {
    let entries = super::pet_entries(prefix);
    let mut refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    refs.extend(extra);
    super::zip_of(&refs)
}
