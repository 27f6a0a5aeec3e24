//! The request timeout: a request that takes longer than `--request-timeout` is answered
//! `503` with the JSON error body. tower-http's `TimeoutLayer` answers with an empty body,
//! so this is a small middleware with the same effect and our body. It is mounted as a
//! route layer on every route except uploads and the live event stream (`api::app`).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Runs the request, or answers 503 once `limit` has passed (dropping the handler).
pub async fn within(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("transferd_http_timeouts_total").increment(1);
            ApiError::TimedOut(format!(
                "the request took longer than the server's limit of {:.1} s",
                limit.as_secs_f64()
            ))
            .into_response()
        }
    }
}
