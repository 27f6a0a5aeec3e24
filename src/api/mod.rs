//! The HTTP API, one router module per resource, and the page in `static/` at `/`.
//! Every handler answers JSON; errors are [`crate::error::ApiError`].

pub mod access;
pub mod audit;
mod body;
pub mod datasets;
pub mod events;
pub mod export;
mod headers;
pub mod health;
pub mod models;
mod origin;
pub mod page;
mod photos;
pub mod predict;
pub mod runs;
mod timeout;
pub mod versions;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tower_http::services::ServeDir;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::keys::Guard;
use crate::state::AppState;

/// The OpenAPI document, generated from the handlers' annotations and types.
#[derive(OpenApi)]
#[openapi(
    info(title = "transferd", description = "Transfer learning as a service: upload a zip of labelled photos, train, predict."),
    paths(
        datasets::upload, datasets::list, datasets::show, datasets::delete, datasets::file,
        versions::create,
        runs::create, runs::default_config, runs::list, runs::show, runs::metrics, runs::evaluation, runs::cancel,
        audit::audit,
        events::events,
        models::list, models::promote, models::remove, export::export_model,
        predict::predict,
        health::healthz, health::readyz,
    ),
    components(schemas(crate::jobs::RunEvent, crate::jobs::events::EventKind)),
    tags(
        (name = "datasets", description = "Zip uploads of folder-per-class photos"),
        (name = "runs", description = "Training runs: warm-up, then fine-tune"),
        (name = "models", description = "Trained classifiers"),
        (name = "predict", description = "Class probabilities of images"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// A worker's probe listener: `/healthz`, `/readyz` and `/metrics` (behind a key under
/// `--protect-reads`), nothing else.
pub fn probes(state: AppState) -> Router {
    crate::telemetry::prometheus();
    let metrics = health::metrics_router().route_layer(axum::middleware::from_fn_with_state(
        (state.clone(), Guard::Read),
        access::require_key,
    ));
    Router::new()
        .merge(health::router())
        .merge(metrics)
        .fallback(|| async {
            crate::error::ApiError::NotFound("a worker serves only its probes".into())
        })
        .layer(axum::middleware::from_fn(headers::secure))
        .with_state(state)
}

/// The whole application: API routes, OpenAPI document and the static page.
pub fn app(state: AppState) -> Router {
    crate::telemetry::prometheus(); // installed before the first metric is recorded
    // A route's group decides whether it needs a key: a new route is protected by where it
    // is mounted.
    let guarded = |group: Router<AppState>, guard: Guard| {
        group.route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), guard),
            access::require_key,
        ))
    };
    let writes = Router::new()
        .merge(datasets::writes())
        .merge(runs::writes())
        .merge(models::writes());
    let reads = Router::new()
        .merge(datasets::reads())
        .merge(runs::reads())
        .merge(audit::reads())
        .merge(models::reads())
        .merge(export::reads());
    // Every route answers within the request timeout, except those that last as long as
    // their data: uploads and the live event stream.
    let timeout =
        axum::middleware::from_fn_with_state(state.settings.request_timeout, timeout::within);
    let timed = Router::new()
        .merge(guarded(writes, Guard::Write))
        .merge(guarded(reads, Guard::Read))
        .merge(guarded(predict::router(), Guard::Predict))
        .route("/openapi.json", axum::routing::get(health::openapi))
        .route_layer(timeout.clone());
    let untimed = Router::new()
        .merge(guarded(datasets::uploads(), Guard::Write))
        // A version copies a whole dataset (to the shared store too): as long as an upload.
        .merge(guarded(versions::writes(), Guard::Write))
        .merge(guarded(events::streams(), Guard::Read));
    let api = timed
        .merge(untimed)
        .fallback(|| async { crate::error::ApiError::NotFound("no such API route".into()) })
        // Handlers enforce their own, configurable limits while streaming.
        .layer(DefaultBodyLimit::disable());
    let router = Router::new()
        .nest("/api", api)
        .merge(health::router().route_layer(timeout.clone()))
        // Metrics read like the API: behind a key under --protect-reads.
        .merge(guarded(health::metrics_router(), Guard::Read).route_layer(timeout))
        .fallback_service(ServeDir::new(&state.settings.static_dir))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin::same_site,
        ))
        .layer(axum::middleware::from_fn(headers::secure))
        .layer(axum::middleware::from_fn(crate::telemetry::http_metrics))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::extract::Request| {
                    let route = req
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or("unmatched", |p| p.as_str());
                    tracing::info_span!("request", method = %req.method(), route,
                        status = tracing::field::Empty, latency_ms = tracing::field::Empty)
                })
                .on_request(())
                .on_response(
                    |res: &axum::response::Response,
                     latency: std::time::Duration,
                     span: &tracing::Span| {
                        span.record("status", res.status().as_u16());
                        span.record("latency_ms", latency.as_secs_f64() * 1e3);
                        tracing::info!("request done");
                    },
                ),
        );
    let router = match access::cors(&state.settings.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}
