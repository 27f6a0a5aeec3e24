//! Database URLs as logs and error messages show them: the password masked.

/// `url` with the password in its user info (`postgres://user:secret@host/db`) or in a
/// `password=` query parameter replaced by `***`.
pub fn redacted(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..].find(['/', '?']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = rest..rest + at;
            if let Some(colon) = out[userinfo.clone()].find(':') {
                out.replace_range(userinfo.start + colon + 1..userinfo.end, "***");
            }
        }
    }
    if let Some(query) = out.find('?') {
        let mut parts: Vec<String> = out[query + 1..].split('&').map(str::to_string).collect();
        for part in &mut parts {
            if part.to_ascii_lowercase().starts_with("password=") {
                *part = "password=***".into();
            }
        }
        out = format!("{}?{}", &out[..query], parts.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_are_masked_and_the_rest_kept() {
        assert_eq!(
            redacted("postgres://app:s3cr@t@db.internal:5432/transferd"),
            "postgres://app:***@db.internal:5432/transferd"
        );
        assert_eq!(
            redacted("postgres://app@db/x?sslmode=require&password=hunter2"),
            "postgres://app@db/x?sslmode=require&password=***"
        );
        assert_eq!(
            redacted("sqlite://data/transferd.db"),
            "sqlite://data/transferd.db"
        );
        assert_eq!(
            redacted("postgres:///x?host=/tmp"),
            "postgres:///x?host=/tmp"
        );
    }
}
