//! Entry names: anything that could escape the dataset folder is refused outright, because an
//! archive that tries is hostile, not just untidy.

use super::IngestError;

/// Splits a safe entry name into its components, or says why it is unsafe.
pub fn check_entry_name(name: &str) -> Result<Vec<&str>, IngestError> {
    let refuse = |why| {
        Err(IngestError::UnsafeEntry {
            name: name.to_string(),
            why,
        })
    };
    if name.contains('\\') {
        return refuse("backslashes are not allowed in entry names");
    }
    if name.starts_with('/') {
        return refuse("absolute paths are not allowed");
    }
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return refuse("drive letters are not allowed");
    }
    if name.contains('\0') {
        return refuse("NUL bytes are not allowed");
    }
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return refuse("'..' components are not allowed");
    }
    Ok(parts)
}

/// Hidden files and the litter of desktop archivers, ignored silently.
pub fn is_litter(parts: &[&str]) -> bool {
    parts
        .iter()
        .any(|p| p.starts_with('.') || *p == "__MACOSX" || p.eq_ignore_ascii_case("Thumbs.db"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [
            "../x.jpg",
            "dog/../../x.jpg",
            "./../x.jpg",
            "/etc/passwd",
            "C:/x.jpg",
            "c:x.jpg",
            "dog\\x.jpg",
            "..\\x.jpg",
        ] {
            assert!(check_entry_name(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(
            check_entry_name("./root/dog//a.jpg").unwrap(),
            vec!["root", "dog", "a.jpg"]
        );
    }

    #[test]
    fn litter_is_recognised() {
        assert!(is_litter(&["__MACOSX", "dog", "._a.jpg"]));
        assert!(is_litter(&["dog", ".DS_Store"]));
        assert!(!is_litter(&["dog", "a.jpg"]));
    }
}
