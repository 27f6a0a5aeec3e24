//! `/healthz` (the process answers), `/readyz` (database reachable, weights present, device),
//! `/metrics` (Prometheus) and the OpenAPI document.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::db::status::RunStatus;
use crate::error::ApiError;
use crate::state::{AppState, DeviceInfo};

/// Liveness and readiness: always open, for probes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// `/metrics`, mounted in the read group.
pub fn metrics_router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// What readiness depends on.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    pub database: bool,
    pub weights: bool,
    /// The inference thread answered a ping within 5 s.
    pub inference: bool,
    pub device: DeviceInfo,
}

/// Ready to train and predict: the database answers, the pretrained weights are present and
/// the inference thread runs.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = state.db.ping().await.is_ok();
    let weights = state.weights.as_ref().is_some_and(|p| p.is_file());
    let inference = state
        .inference
        .responds(std::time::Duration::from_secs(5))
        .await;
    let ready = database && weights && inference;
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        database,
        weights,
        inference,
        device: (*state.device).clone(),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// `GET /api/openapi.json`.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::ApiDoc::openapi())
}

/// Prometheus text format; run counts by status are read from the database now.
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = crate::db::runs::count_by_status(&state.db).await?;
    for status in RunStatus::ALL {
        let n = counts.iter().find(|(s, _)| *s == status).map_or(0, |c| c.1);
        metrics::gauge!("transferd_runs", "status" => status.as_str()).set(n as f64);
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::prometheus().render(),
    ))
}
