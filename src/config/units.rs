//! Units in the configuration and in what the appliance prints: durations
//! ("35s", "7d"), byte sizes ("10MiB"), the daily time of day ("02:00"), their
//! serde adapters, and the one byte formatter every message uses.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The longest duration a setting may have: 100 years (longer ones overflow the
/// clocks they are added to, and mean "never" anyway).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86400);

/// Parses "35s", "2m", "1h", "7d" or a bare number of seconds (at most
/// [`MAX_DURATION`]).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. \"30s\", \"5m\", \"7d\")"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .and_then(at_most_max)
        .ok_or_else(|| too_long(s))
}

fn at_most_max(d: Duration) -> Option<Duration> {
    (d <= MAX_DURATION).then_some(d)
}

fn too_long(s: &str) -> String {
    format!("{s:?} is too long: use at most 100 years (e.g. \"7d\")")
}

/// Parses "10MiB", "512MB", "64k", "1G" or a bare number of bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use e.g. \"512MB\", \"10MiB\", \"2G\")"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult).ok_or_else(|| {
        format!("{s:?} is too large: a size must stay below 16 EiB (e.g. \"512MB\", \"2G\")")
    })
}

/// A local time of day, "HH:MM" (24-hour): "02:00" → (2, 0).
pub fn parse_time(s: &str) -> Result<(u32, u32), String> {
    let bad =
        || "not a time of day: write \"HH:MM\" (24-hour local time), e.g. \"02:00\"".to_string();
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok((h, m))
}

/// The units [`human_bytes`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteUnits {
    /// B, KiB, MiB or GiB, one decimal above bytes: "512 B", "1.5 KiB", "2.0 GiB".
    All,
    /// MiB or GiB, one decimal: "0.3 MiB", "1.9 GiB" (memory).
    MibUp,
    /// GiB with one decimal, else whole MiB rounded up: "3 MiB" (space needed).
    MibCeil,
}

/// `b` bytes for people, in binary multiples.
pub fn human_bytes(b: u64, units: ByteUnits) -> String {
    const KIB: f64 = 1024.0;
    const MIB: f64 = KIB * 1024.0;
    const GIB: f64 = MIB * 1024.0;
    let f = b as f64;
    if b >= 1 << 30 {
        return format!("{:.1} GiB", f / GIB);
    }
    match units {
        ByteUnits::All if b >= 1 << 20 => format!("{:.1} MiB", f / MIB),
        ByteUnits::All if b >= 1 << 10 => format!("{:.1} KiB", f / KIB),
        ByteUnits::All => format!("{b} B"),
        ByteUnits::MibUp => format!("{:.1} MiB", f / MIB),
        ByteUnits::MibCeil => format!("{:.0} MiB", (f / MIB).ceil()),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

/// serde: a duration as a number of seconds or a [`parse_duration`] text.
pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => at_most_max(Duration::from_secs(n))
            .ok_or_else(|| serde::de::Error::custom(too_long(&n.to_string()))),
        NumOrText::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

/// serde: a size as a number of bytes or a [`parse_size`] text.
pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => Ok(n),
        NumOrText::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_formatter_three_styles() {
        assert_eq!(human_bytes(512, ByteUnits::All), "512 B");
        assert_eq!(human_bytes(1536, ByteUnits::All), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20, ByteUnits::All), "3.0 MiB");
        assert_eq!(human_bytes(2 << 30, ByteUnits::All), "2.0 GiB");
        assert_eq!(human_bytes(300 << 10, ByteUnits::MibUp), "0.3 MiB");
        assert_eq!(human_bytes(2 << 30, ByteUnits::MibUp), "2.0 GiB");
        assert_eq!(human_bytes((2 << 20) + 1, ByteUnits::MibCeil), "3 MiB");
        assert_eq!(human_bytes(3 << 30, ByteUnits::MibCeil), "3.0 GiB");
    }
}
