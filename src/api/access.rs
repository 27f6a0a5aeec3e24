//! Enforcing the API keys and CORS. Which routes need a key is decided by the group a route
//! is mounted in (`api::app`), never by matching paths, so renaming or adding a route cannot
//! drop its protection. `/healthz`, `/readyz`, the OpenAPI document and the page are public.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::keys::Guard;
use crate::state::AppState;

/// Route-layer middleware of one group: `state` is the app's state and the group's guard.
pub async fn require_key(
    State((state, guard)): State<(AppState, Guard)>,
    request: Request,
    next: Next,
) -> Response {
    let access = &state.settings.access;
    // Preflights carry no credentials; the CORS layer answers them.
    if request.method() == Method::OPTIONS || !access.needs_key(guard) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(key) if access.accepts(key.trim()) => next.run(request).await,
        Some(_) => unauthorized("the API key is not valid"),
        None => unauthorized("this route needs an API key: send `Authorization: Bearer <key>`"),
    }
}

fn unauthorized(message: &str) -> Response {
    let mut res = ApiError::Unauthorized(message.into()).into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

/// CORS for the configured origins (`*` for any); `None` when there are none.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
            // Browsers hide other headers from cross-origin callers; paging needs this one.
            .expose_headers([super::page::NEXT_CURSOR, header::RETRY_AFTER]),
    )
}
