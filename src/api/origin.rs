//! Refusing requests forged by other web pages, and DNS rebinding.
//!
//! A page on any website can make a browser send simple cross-site requests (a form post, a
//! `no-cors` fetch) to a server on the user's machine; with no keys set they would be
//! obeyed. Browsers say where a request comes from (`Sec-Fetch-Site`, `Origin`), so every
//! request that can change state is refused when it comes from another site, unless
//! `--cors-origin` allows that origin. And since a hostile domain can be made to resolve to
//! 127.0.0.1, a server bound to loopback answers only to loopback host names (plus
//! `--public-host`).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

/// Middleware on the whole router.
pub async fn same_site(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let settings = &state.settings;
    if let Err(e) = check_host(
        request.headers(),
        settings.addr.ip().is_loopback(),
        &settings.public_hosts,
    ) {
        return e.into_response();
    }
    if let Err(e) = check_origin(request.method(), request.headers(), &settings.cors_origins) {
        return e.into_response();
    }
    next.run(request).await
}

/// The host name of a `Host` header or an origin's authority, without the port.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Bound to loopback: the `Host` must name loopback or a `--public-host`. Elsewhere, with
/// `--public-host` given, it must be one of them or an IP address.
fn check_host(headers: &HeaderMap, loopback: bool, public: &[String]) -> Result<(), ApiError> {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return Ok(()); // HTTP/1.0 clients and in-process tests send none
    };
    let name = host_name(host);
    let listed = public
        .iter()
        .any(|p| host_name(p).eq_ignore_ascii_case(name));
    let ok = if loopback {
        is_loopback_name(name) || listed
    } else {
        public.is_empty() || listed || name.parse::<std::net::IpAddr>().is_ok()
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::MisdirectedHost(format!(
            "this server does not answer to host {name:?}; add it with --public-host"
        )))
    }
}

/// Requests that can change state (anything but GET, HEAD and OPTIONS) must not come from
/// another site, unless its origin is allowed by `--cors-origin`.
fn check_origin(method: &Method, headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = value(header::ORIGIN.as_str());
    let allowed_origin = origin.is_some_and(|o| {
        allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(o))
    });
    let foreign = match value("sec-fetch-site") {
        // A browser that says so: only the page itself (or a typed URL) may write.
        Some(site) => !matches!(site, "same-origin" | "none"),
        // Older browsers: compare the origin with the host it was sent to.
        None => match (origin, value(header::HOST.as_str())) {
            (Some("null"), _) => true,
            (Some(o), Some(host)) => {
                let authority = o.split("://").nth(1).unwrap_or(o);
                !authority.eq_ignore_ascii_case(host)
            }
            _ => false, // not a browser (curl, scripts): keys are their guard
        },
    };
    if foreign && !allowed_origin {
        return Err(ApiError::Forbidden(format!(
            "cross-site request refused (origin {}); a page on another site may not change \
             this server's data unless --cors-origin allows it",
            origin.unwrap_or("unknown")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn cross_site_writes_are_refused_unless_allowed() {
        let post = Method::POST;
        let evil = headers(&[
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(check_origin(&post, &evil, &[]).is_err());
        assert!(
            check_origin(&Method::GET, &evil, &[]).is_ok(),
            "reads are not refused here"
        );
        assert!(check_origin(&post, &evil, &["https://evil.example".into()]).is_ok());
        assert!(check_origin(&post, &evil, &["*".into()]).is_ok());
        let same = headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(check_origin(&post, &same, &[]).is_ok());
        let sibling = headers(&[
            ("origin", "http://127.0.0.1:3000"),
            ("sec-fetch-site", "same-site"),
        ]);
        assert!(
            check_origin(&post, &sibling, &[]).is_err(),
            "another port is another origin"
        );
        // No Sec-Fetch-Site: the origin is compared with the host.
        let old_same = headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(check_origin(&post, &old_same, &[]).is_ok());
        let old_evil = headers(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(check_origin(&post, &old_evil, &[]).is_err());
        assert!(check_origin(&post, &headers(&[("origin", "null")]), &[]).is_err());
        assert!(
            check_origin(&post, &headers(&[]), &[]).is_ok(),
            "curl sends neither"
        );
    }

    #[test]
    fn a_loopback_server_answers_only_to_loopback_names() {
        let host = |h: &str| headers(&[("host", h)]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "app.localhost",
        ] {
            assert!(check_host(&host(ok), true, &[]).is_ok(), "{ok}");
        }
        assert!(check_host(&host("rebind.evil.example:8080"), true, &[]).is_err());
        let public = vec!["transferd.lan".to_string()];
        assert!(check_host(&host("transferd.lan:8080"), true, &public).is_ok());
        // Bound elsewhere: unchecked without a list, checked with one.
        assert!(check_host(&host("anything.example"), false, &[]).is_ok());
        assert!(check_host(&host("anything.example"), false, &public).is_err());
        assert!(check_host(&host("10.0.0.5:8080"), false, &public).is_ok());
        assert!(check_host(&headers(&[]), true, &[]).is_ok());
    }
}
