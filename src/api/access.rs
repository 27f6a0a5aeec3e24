//! Optional API keys and CORS.
//!
//! With keys configured, every write route needs `Authorization: Bearer <key>`; predictions
//! and reads need one too when the operator says so. `/healthz`, `/readyz` and the page stay
//! open. Keys are compared through their SHA-256 digests in constant time and never logged.

use std::fmt;
use std::str::FromStr;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::state::AppState;

/// An API key; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl FromStr for ApiKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() < 16 {
            return Err("an API key needs at least 16 characters".into());
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Who may do what.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Empty: no keys, everything open.
    pub keys: Vec<ApiKey>,
    pub protect_predict: bool,
    pub protect_reads: bool,
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

impl Access {
    /// Whether `presented` is one of the keys, in time independent of where they differ.
    fn accepts(&self, presented: &str) -> bool {
        let p = digest(presented.as_bytes());
        self.keys.iter().fold(false, |ok, key| {
            let k = digest(key.0.as_bytes());
            let diff = p
                .iter()
                .zip(k.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            ok | (diff == 0)
        })
    }

    /// Whether a request to `/api{path}` with `method` needs a key.
    fn needs_key(&self, method: &Method, path: &str) -> bool {
        if self.keys.is_empty() || method == Method::OPTIONS {
            return false;
        }
        let read = matches!(*method, Method::GET | Method::HEAD);
        if path == "/predict" {
            self.protect_predict
        } else if read {
            self.protect_reads && path != "/openapi.json"
        } else {
            true
        }
    }
}

/// Middleware on the `/api` router.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let access = &state.settings.access;
    if !access.needs_key(request.method(), request.uri().path()) {
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
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access {
            keys: vec![
                "k".repeat(16).parse().unwrap(),
                "another-key-0123456".parse().unwrap(),
            ],
            protect_predict: false,
            protect_reads: false,
        }
    }

    #[test]
    fn keys_are_checked_and_never_shown() {
        let a = access();
        assert!(a.accepts(&"k".repeat(16)));
        assert!(a.accepts("another-key-0123456"));
        assert!(!a.accepts("another-key-0123457"));
        assert!(!a.accepts(""));
        assert!(!format!("{a:?}").contains("kkkk"));
        assert!("short".parse::<ApiKey>().is_err());
    }

    #[test]
    fn writes_always_need_a_key_reads_and_predict_when_asked() {
        let mut a = access();
        assert!(a.needs_key(&Method::POST, "/datasets"));
        assert!(a.needs_key(&Method::DELETE, "/datasets/x"));
        assert!(!a.needs_key(&Method::GET, "/datasets"));
        assert!(!a.needs_key(&Method::POST, "/predict"));
        a.protect_predict = true;
        a.protect_reads = true;
        assert!(a.needs_key(&Method::POST, "/predict"));
        assert!(a.needs_key(&Method::GET, "/runs"));
        assert!(!a.needs_key(&Method::OPTIONS, "/runs"));
        assert!(!Access::default().needs_key(&Method::POST, "/datasets"));
    }
}
