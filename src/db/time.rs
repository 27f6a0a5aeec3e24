//! Timestamps as the database stores them, made in Rust so that both engines store the
//! same text: UTC RFC 3339 with milliseconds (`2026-11-30T14:35:50.123Z`), which sorts in
//! time order as text. Leases use plain Unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Now, as stored in every `created_at`, `updated_at` and `finished_at`.
pub fn now() -> String {
    format_millis(now_millis())
}

/// `millis` since the epoch as UTC RFC 3339 with milliseconds.
fn format_millis(millis: i64) -> String {
    let (days, ms_of_day) = (millis.div_euclid(86_400_000), millis.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000
    )
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, public domain).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day in a century leap year), 23:59:59.999.
        assert_eq!(format_millis(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(format_millis(1_796_049_350_123), "2026-11-30T14:35:50.123Z");
        assert_eq!(format_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn text_order_is_time_order() {
        let a = format_millis(1_000_000_000_000);
        let b = format_millis(1_000_000_000_001);
        assert!(a < b);
        assert!(now() > a);
    }
}
