//! Where a subscription starts, as the three streaming transports read it from a request:
//! a cursor (`Last-Event-ID`, `last_event_id`, `since`), `start=latest` or `start_time=T`.
//!
//! A cursor wins over both start options, so a client that reconnects with one resumes
//! exactly and does not get a snapshot again. `start=latest` and `start_time` together are
//! a 400 (`invalid_start`), as is any value either cannot take.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::ApiError;
use crate::envelope::EventId;
use crate::subscription::Start;

/// The start options of one request, read but not yet combined with its cursor.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StartOptions {
    /// `start=latest` was given.
    pub latest: bool,
    /// `start_time`, as Unix milliseconds.
    pub time: Option<u64>,
}

impl StartOptions {
    /// Reads a `start` value: `latest` is the only one.
    pub fn set_start(&mut self, value: &str) -> Result<(), ApiError> {
        if value != "latest" {
            return Err(ApiError::invalid_start(format!(
                "start {value:?}: the only start is \"latest\" (or give start_time, or a cursor)"
            )));
        }
        self.latest = true;
        Ok(())
    }

    /// Reads a `start_time` value: RFC 3339 or Unix milliseconds.
    pub fn set_time(&mut self, value: &str) -> Result<(), ApiError> {
        self.time = Some(parse_time(value)?);
        Ok(())
    }

    /// Where the subscription starts: the cursor when there is one, else the start option,
    /// else live. Two start options at once are refused.
    pub fn start(self, cursor: Option<EventId>) -> Result<Start, ApiError> {
        if self.latest && self.time.is_some() {
            return Err(ApiError::invalid_start(
                "start=latest and start_time are two different starts: give one of them",
            ));
        }
        Ok(match (cursor, self.latest, self.time) {
            (Some(c), _, _) => Start::After(c),
            (None, true, _) => Start::Latest,
            (None, false, Some(t)) => Start::Time(t),
            (None, false, None) => Start::Live,
        })
    }
}

/// `start_time`: milliseconds since the Unix epoch, or an RFC 3339 date-time
/// (`2026-12-06T05:00:00Z`, `…+01:00`, fractions allowed; before 1970 reads as 0).
pub fn parse_time(value: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid_start(format!(
            "start_time {value:?} is neither an RFC 3339 date-time (2026-01-31T12:00:00Z) \
             nor milliseconds since the Unix epoch"
        ))
    };
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().map_err(|_| bad());
    }
    let at = OffsetDateTime::parse(v, &Rfc3339).map_err(|_| bad())?;
    // Before 1970 is before every event: from the oldest retained one.
    let ms = (at.unix_timestamp_nanos() / 1_000_000).max(0);
    u64::try_from(ms).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_reads_rfc3339_and_epoch_milliseconds() {
        assert_eq!(
            parse_time("1969-12-31T23:59:59Z").unwrap(),
            0,
            "before 1970: from the start"
        );
        assert_eq!(parse_time("1700000000123").unwrap(), 1_700_000_000_123);
        assert_eq!(
            parse_time("2023-11-14T22:13:20.123Z").unwrap(),
            1_700_000_000_123
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20.123+01:00").unwrap(),
            1_700_000_000_123
        );
        for bad in [
            "",
            "yesterday",
            "-5",
            "2023-11-14",
            "1e3",
            "99999999999999999999",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert_eq!(e.code, "invalid_start", "{bad}");
        }
    }

    #[test]
    fn a_cursor_wins_and_two_starts_are_refused() {
        let both = StartOptions {
            latest: true,
            time: Some(5),
        };
        assert_eq!(both.start(None).unwrap_err().code, "invalid_start");
        let latest = StartOptions {
            latest: true,
            time: None,
        };
        assert_eq!(
            latest.start(Some(EventId(9))).unwrap(),
            Start::After(EventId(9))
        );
        assert_eq!(latest.start(None).unwrap(), Start::Latest);
        let mut o = StartOptions::default();
        assert_eq!(o.set_start("earliest").unwrap_err().code, "invalid_start");
        o.set_time("7").unwrap();
        assert_eq!(o.start(None).unwrap(), Start::Time(7));
        assert_eq!(StartOptions::default().start(None).unwrap(), Start::Live);
    }
}
