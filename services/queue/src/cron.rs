//! Cron expressions in IANA time zones: standard five-field cron (day of
//! week 0–7, Sunday 0 or 7) or six fields with seconds first, and the
//! `@hourly`-style shorthands. Only parsing and "the next tick after"
//! live here; firing is the service's.

use std::str::FromStr;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use jiff_cron::Schedule;

use crate::error::QueueError;

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Cron {
    schedule: Schedule,
    zone: TimeZone,
}

const WEEKDAYS: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Standard cron numbers weekdays from 0 (Sunday); the parser from 1
/// (Sunday). Names mean the same in both, so numbers become names.
fn weekday_names(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut number = String::new();
    let mut after_step = false;
    let flush = |out: &mut String, number: &mut String, after_step: bool| {
        if number.is_empty() {
            return;
        }
        match number.parse::<usize>().ok().and_then(|n| WEEKDAYS.get(n)) {
            Some(name) if !after_step => out.push_str(name),
            _ => out.push_str(number),
        }
        number.clear();
    };
    for c in field.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        flush(&mut out, &mut number, after_step);
        after_step = c == '/';
        out.push(c);
    }
    flush(&mut out, &mut number, after_step);
    out
}

impl Cron {
    /// Parses `expression` in `zone` ("" is UTC); `field` names the
    /// schedule in the request for errors.
    pub fn parse(field: &str, expression: &str, zone: &str) -> Result<Cron, QueueError> {
        let zone = if zone.is_empty() {
            TimeZone::UTC
        } else {
            TimeZone::get(zone)
                .map_err(|_| QueueError::invalid(format!("{field}.time_zone"), "is not an IANA time zone"))?
        };
        let parts: Vec<&str> = expression.split_whitespace().collect();
        let normalized = match parts.as_slice() {
            [shorthand] if shorthand.starts_with('@') => (*shorthand).to_owned(),
            [m, h, dom, mon, dow] => format!("0 {m} {h} {dom} {mon} {}", weekday_names(dow)),
            [s, m, h, dom, mon, dow] => format!("{s} {m} {h} {dom} {mon} {}", weekday_names(dow)),
            _ => {
                return Err(QueueError::invalid(
                    format!("{field}.cron"),
                    "must have five fields (minute hour day-of-month month day-of-week) or six with seconds first",
                ));
            }
        };
        let schedule =
            Schedule::from_str(&normalized).map_err(|e| QueueError::invalid(format!("{field}.cron"), e.to_string()))?;
        let cron = Cron { schedule, zone };
        if cron.next_after(crate::model::MIN_TICK_SEARCH_FROM).is_none() {
            return Err(QueueError::invalid(format!("{field}.cron"), "never fires"));
        }
        Ok(cron)
    }

    /// The first tick strictly after `ms` (milliseconds since the epoch).
    pub fn next_after(&self, ms: i64) -> Option<i64> {
        let at = Timestamp::from_millisecond(ms).ok()?.to_zoned(self.zone.clone());
        self.schedule.after(at).next().map(|z| z.timestamp().as_millisecond())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn five_fields_read_weekdays_from_sunday_zero() {
        // 2026-11-26 is a Thursday.
        let weekdays = Cron::parse("schedule", "30 9 * * 1-5", "UTC").unwrap();
        assert_eq!(
            weekdays.next_after(at("2026-11-27T10:00:00Z")),
            Some(at("2026-11-30T09:30:00Z")),
            "Friday after 9:30 → Monday"
        );
        let sundays = Cron::parse("schedule", "0 0 * * 0", "UTC").unwrap();
        assert_eq!(
            sundays.next_after(at("2026-11-26T00:00:00Z")),
            Some(at("2026-11-29T00:00:00Z"))
        );
        let every_other_minute = Cron::parse("schedule", "*/2 * * * *", "UTC").unwrap();
        assert_eq!(
            every_other_minute.next_after(at("2026-11-26T00:01:00Z")),
            Some(at("2026-11-26T00:02:00Z"))
        );
    }

    #[test]
    fn time_zones_move_the_tick() {
        let nine_in_berlin = Cron::parse("schedule", "0 9 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            nine_in_berlin.next_after(at("2026-11-26T00:00:00Z")),
            Some(at("2026-11-26T08:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_name_the_field() {
        for (expr, zone, field) in [
            ("* * *", "UTC", "schedule.cron"),
            ("61 * * * *", "UTC", "schedule.cron"),
            ("* * * * *", "Mars/Olympus", "schedule.time_zone"),
        ] {
            match Cron::parse("schedule", expr, zone) {
                Err(QueueError::Invalid(v)) => assert_eq!(v[0].field, field, "{expr} {zone}"),
                other => panic!("{expr} {zone}: {other:?}"),
            }
        }
    }
}
