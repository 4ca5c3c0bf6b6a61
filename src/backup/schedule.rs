//! When the daily backup runs: `backup.schedule` ("HH:MM", local time) next after
//! now, on the machine's clock and time zone (chrono `Local`; a time skipped by a
//! daylight-saving change runs an hour later, a repeated one runs once).

use chrono::{DateTime, Duration as ChronoDuration, Local, LocalResult, NaiveTime, TimeZone};

/// "02:00" → (2, 0): the parser is the configuration's (`backup.schedule`).
pub use crate::config::units::parse_time;

/// The first time strictly after `now` whose local clock reads `h:m`.
pub fn next_run<Tz: TimeZone>(now: &DateTime<Tz>, h: u32, m: u32) -> DateTime<Tz> {
    let tz = now.timezone();
    let at = NaiveTime::from_hms_opt(h, m, 0).unwrap_or(NaiveTime::MIN);
    let mut day = now.date_naive();
    for _ in 0..4 {
        let naive = day.and_time(at);
        let candidate = match tz.from_local_datetime(&naive) {
            LocalResult::Single(t) => Some(t),
            LocalResult::Ambiguous(a, _) => Some(a),
            // Skipped by a DST change: an hour later exists.
            LocalResult::None => tz
                .from_local_datetime(&(naive + ChronoDuration::hours(1)))
                .earliest(),
        };
        if let Some(t) = candidate {
            if t > *now {
                return t;
            }
        }
        day = day.succ_opt().unwrap_or(day);
    }
    now.clone() + ChronoDuration::days(1)
}

/// `next_run` on the local clock.
pub fn next_local(h: u32, m: u32) -> DateTime<Local> {
    next_run(&Local::now(), h, m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Timelike};

    #[test]
    fn parses_and_refuses() {
        assert_eq!(parse_time("02:00"), Ok((2, 0)));
        assert_eq!(parse_time("23:59"), Ok((23, 59)));
        assert!(parse_time("24:00").is_err());
        assert!(parse_time("2am").is_err());
        assert!(parse_time("").is_err());
    }

    #[test]
    fn next_is_today_or_tomorrow() {
        let tz = FixedOffset::east_opt(3600).expect("offset");
        let before = tz
            .with_ymd_and_hms(2026, 3, 1, 1, 30, 0)
            .single()
            .expect("t");
        let n = next_run(&before, 2, 0);
        assert_eq!((n.day0(), n.hour(), n.minute()), (before.day0(), 2, 0));
        let after = tz
            .with_ymd_and_hms(2026, 3, 1, 2, 0, 0)
            .single()
            .expect("t");
        let n = next_run(&after, 2, 0);
        assert_eq!(n - after, ChronoDuration::days(1));
    }

    use chrono::Datelike;
}
