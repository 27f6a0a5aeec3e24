//! API keys and who needs one: plain settings, read by `config` and enforced by the
//! `api::access` middleware on the router groups that `api::app` mounts.
//!
//! Keys are compared through their SHA-256 digests in constant time and never shown.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

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

/// The groups routes are mounted in; a route's group decides whether it needs a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Anything that changes state: always needs a key when keys are set.
    Write,
    /// Reads under `/api`: need a key with `--protect-reads`.
    Read,
    /// `POST /api/predict`: needs a key with `--protect-predict`.
    Predict,
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
    pub fn accepts(&self, presented: &str) -> bool {
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

    /// Whether a route mounted under `guard` needs a key.
    pub fn needs_key(&self, guard: Guard) -> bool {
        !self.keys.is_empty()
            && match guard {
                Guard::Write => true,
                Guard::Read => self.protect_reads,
                Guard::Predict => self.protect_predict,
            }
    }
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
        assert!(a.needs_key(Guard::Write));
        assert!(!a.needs_key(Guard::Read));
        assert!(!a.needs_key(Guard::Predict));
        a.protect_predict = true;
        a.protect_reads = true;
        assert!(a.needs_key(Guard::Predict));
        assert!(a.needs_key(Guard::Read));
        assert!(!Access::default().needs_key(Guard::Write));
    }
}
