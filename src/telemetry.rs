//! Logs and metrics. Logs go to stderr, human-readable or JSON; metrics are kept by the
//! `metrics` facade and rendered in Prometheus text format at `GET /metrics`.
//!
//! Metric names:
//! - `transferd_http_requests_total{method,route,status}`, `transferd_http_request_duration_seconds{method,route,status}`
//! - `transferd_runs{status}` (read from the database at scrape time)
//! - `transferd_training_images_per_second{stage}`, `transferd_training_epochs_total{phase}`
//! - `transferd_predict_duration_seconds`, `transferd_predict_images_total`,
//!   `transferd_predict_batch_size`, `transferd_model_cache_total{result}`

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Sets up logging to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                seconds,
            )
            .expect("valid buckets")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("transferd_predict_batch_size".into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            )
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); then metrics go there.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Middleware: request count and latency by method, matched route and status.
pub async fn http_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // A fixed set: any token is a valid method, and each would make a new series.
    let method = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
    .to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    let labels = [
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("transferd_http_requests_total", &labels).increment(1);
    metrics::histogram!("transferd_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}
