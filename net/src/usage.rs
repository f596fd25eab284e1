//! A tenant's usage limits per accounting period (Hono's `resource-limits.data-volume` and
//! `connection-duration`), as the registry reads them and the adapters enforce them.

use chrono::{DateTime, Datelike, TimeZone, Utc};

/// A limit on what a tenant uses per accounting period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageLimit {
    /// When the limit takes effect (seconds since the epoch); before it, no limit.
    pub effective_since: i64,
    /// Most bytes (data volume) or seconds (connection duration) per period.
    pub max: u64,
    /// Period length in days, counted from `effective_since`; `None`: calendar months
    /// (UTC), Hono's `monthly` (the first period runs from `effective_since` to the end
    /// of its month).
    pub period_days: Option<u32>,
}

impl UsageLimit {
    /// The start of the accounting period that contains `now` (seconds since the epoch),
    /// or `None` before the limit takes effect.
    pub fn period_start(&self, now: i64) -> Option<i64> {
        if now < self.effective_since {
            return None;
        }
        match self.period_days {
            Some(days) => {
                let length = i64::from(days.max(1)) * 86_400;
                Some(self.effective_since + (now - self.effective_since) / length * length)
            }
            None => {
                let today = DateTime::from_timestamp(now, 0)?;
                let month = Utc.with_ymd_and_hms(today.year(), today.month(), 1, 0, 0, 0);
                Some(month.single()?.timestamp().max(self.effective_since))
            }
        }
    }
}
