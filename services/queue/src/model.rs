//! The queue's domain values, already validated: names, settings with their
//! defaults and bounds, messages to add, stored messages, and the retry
//! backoff. Wire types are converted into these in `grpc`; storage takes
//! them as they are.

use std::collections::BTreeMap;

use crate::error::QueueError;

/// Most messages in one enqueue, ack or lease.
pub const MAX_BATCH: usize = 1000;
/// Longest lease, and the bounds of every lease duration.
pub const MIN_LEASE_MS: i64 = 1000;
/// Longest lease.
pub const MAX_LEASE_MS: i64 = 12 * 3600 * 1000;
/// Longest long-poll wait.
pub const MAX_WAIT_MS: i64 = 60_000;
/// Furthest a message may be scheduled or kept.
pub const MAX_DELAY_MS: i64 = 365 * 24 * 3600 * 1000;
const MAX_TEXT: usize = 255;
const MAX_HEADERS: usize = 64;
const MAX_HEADER_VALUE: usize = 4096;
/// Longest `last_error` kept.
pub const MAX_ERROR: usize = 4096;
/// Where a new schedule's first tick is looked for when checking that it
/// ever fires (2000-01-01).
pub const MIN_TICK_SEARCH_FROM: i64 = 946_684_800_000;

/// Checks a queue name: 1–63 of `a-z0-9-_.`, starting with a letter.
pub fn check_queue_name(field: &str, name: &str) -> Result<(), QueueError> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(QueueError::invalid(
            field,
            "must be 1 to 63 of a-z, 0-9, '-', '_' and '.', starting with a letter",
        ))
    }
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), QueueError> {
    if text.len() > max {
        return Err(QueueError::invalid(field, format!("must be at most {max} bytes")));
    }
    if text.chars().any(char::is_control) {
        return Err(QueueError::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Retry backoff: `initial`, times `multiplier` per further failure, at most
/// `max`, optionally with full jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// After the first failure.
    pub initial_ms: i64,
    /// Ceiling.
    pub max_ms: i64,
    /// Growth per failure (≥ 1).
    pub multiplier: f64,
    /// Full jitter: uniformly random in `0..=delay`.
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 1000,
            max_ms: 600_000,
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl Backoff {
    /// The ceiling of the wait after the `failures`-th failure (1-based),
    /// before jitter.
    pub fn ceiling_ms(&self, failures: i32) -> i64 {
        let exponent = failures.saturating_sub(1).clamp(0, 64);
        let grown = self.initial_ms as f64 * self.multiplier.powi(exponent);
        if grown.is_finite() && grown < self.max_ms as f64 {
            grown as i64
        } else {
            self.max_ms
        }
    }

    /// The wait after the `failures`-th failure, jittered when configured.
    pub fn delay_ms(&self, failures: i32) -> i64 {
        let ceiling = self.ceiling_ms(failures);
        if self.jitter && ceiling > 0 {
            rand::random_range(0..=ceiling)
        } else {
            ceiling
        }
    }
}

/// A queue's settings, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Deliveries before dead-lettering.
    pub max_attempts: i32,
    /// Retry backoff.
    pub backoff: Backoff,
    /// Default lease.
    pub lease_ms: i64,
    /// Message TTL (0: none).
    pub ttl_ms: i64,
    /// Dedup window.
    pub dedup_window_ms: i64,
    /// Messages handed out per second (0: no limit).
    pub rate_limit: f64,
    /// Leases in flight at most (0: no limit).
    pub max_concurrency: i32,
    /// Ready messages that raise a depth alert (0: none).
    pub depth_alert: i64,
    /// Where dead letters go ("" keeps them here).
    pub dead_letter_queue: String,
    /// One message of a group at a time, in enqueue order.
    pub fifo_groups: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Backoff::default(),
            lease_ms: 30_000,
            ttl_ms: 0,
            dedup_window_ms: 3_600_000,
            rate_limit: 0.0,
            max_concurrency: 0,
            depth_alert: 0,
            dead_letter_queue: String::new(),
            fifo_groups: false,
        }
    }
}

impl Settings {
    /// Checks every bound; `prefix` is the path of the settings message in the request.
    pub fn check(&self, prefix: &str, queue: &str) -> Result<(), QueueError> {
        let f = |name: &str| format!("{prefix}.{name}");
        let mut bad = Vec::new();
        if !(1..=1000).contains(&self.max_attempts) {
            bad.push((f("max_attempts"), "must be between 1 and 1000".to_owned()));
        }
        if !(0..=MAX_LEASE_MS).contains(&self.backoff.initial_ms) {
            bad.push((f("backoff.initial"), "must be between 0s and 12h".to_owned()));
        }
        if !(self.backoff.initial_ms..=MAX_DELAY_MS).contains(&self.backoff.max_ms) {
            bad.push((
                f("backoff.max"),
                "must be at least backoff.initial and at most 365 days".to_owned(),
            ));
        }
        if !(1.0..=100.0).contains(&self.backoff.multiplier) {
            bad.push((f("backoff.multiplier"), "must be between 1 and 100".to_owned()));
        }
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.lease_ms) {
            bad.push((f("lease_duration"), "must be between 1s and 12h".to_owned()));
        }
        if !(0..=MAX_DELAY_MS).contains(&self.ttl_ms) {
            bad.push((f("message_ttl"), "must be at most 365 days".to_owned()));
        }
        if !(0..=MAX_DELAY_MS).contains(&self.dedup_window_ms) {
            bad.push((f("dedup_window"), "must be at most 365 days".to_owned()));
        }
        if !(self.rate_limit.is_finite() && (0.0..=1_000_000.0).contains(&self.rate_limit)) {
            bad.push((f("rate_limit_per_second"), "must be between 0 and 1000000".to_owned()));
        }
        if !(0..=1_000_000).contains(&self.max_concurrency) {
            bad.push((f("max_concurrency"), "must be between 0 and 1000000".to_owned()));
        }
        if self.depth_alert < 0 {
            bad.push((f("depth_alert_threshold"), "must not be negative".to_owned()));
        }
        if !self.dead_letter_queue.is_empty() {
            if let Err(QueueError::Invalid(v)) = check_queue_name(&f("dead_letter_queue"), &self.dead_letter_queue) {
                bad.extend(v.into_iter().map(|v| (v.field, v.description)));
            } else if self.dead_letter_queue == queue {
                bad.push((f("dead_letter_queue"), "must not be the queue itself".to_owned()));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(QueueError::Invalid(
                bad.into_iter()
                    .map(|(field, d)| plinth_runtime::error::FieldViolation::new(field, d))
                    .collect(),
            ))
        }
    }
}

/// A stored queue.
#[derive(Debug, Clone)]
pub struct Queue {
    /// Name.
    pub name: String,
    /// Settings.
    pub settings: Settings,
    /// Leases are not handed out.
    pub paused: bool,
    /// 0 none, 1 draining, 2 drained.
    pub drain_state: i32,
    /// Changes with every update.
    pub generation: i64,
    /// When created.
    pub created_at: i64,
    /// When last changed.
    pub updated_at: i64,
}

impl Queue {
    /// Whether leases are handed out.
    pub fn hands_out(&self) -> bool {
        !self.paused && self.drain_state == 0
    }
}

/// Messages by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Scheduled.
    pub scheduled: i64,
    /// Ready.
    pub ready: i64,
    /// Leased.
    pub leased: i64,
    /// Dead.
    pub dead: i64,
}

/// A message's state; the numbers are the stored ones and the proto's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for its run time or backoff.
    Scheduled = 1,
    /// May be leased.
    Ready = 2,
    /// In flight.
    Leased = 3,
    /// Dead letter.
    Dead = 4,
}

impl State {
    /// All states.
    pub const ALL: [State; 4] = [State::Scheduled, State::Ready, State::Leased, State::Dead];

    /// From the stored number.
    pub fn from_i32(n: i32) -> Option<State> {
        State::ALL.into_iter().find(|s| *s as i32 == n)
    }
}

/// A message to add, validated.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    /// The job.
    pub payload: Vec<u8>,
    /// Its type.
    pub content_type: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Higher first.
    pub priority: i32,
    /// Not before (ms since epoch); `None`: now.
    pub run_at: Option<i64>,
    /// Run no earlier than this long from now.
    pub delay_ms: i64,
    /// TTL overriding the queue's (ms); `None`: the queue's.
    pub ttl_ms: Option<i64>,
    /// Dedup key ("" none).
    pub dedup_key: String,
    /// Fairness group ("" the default group).
    pub group_key: String,
}

impl NewMessage {
    /// Checks sizes and texts; `field` is the message's path in the request.
    pub fn check(&self, field: &str, max_payload: usize) -> Result<(), QueueError> {
        if self.payload.len() > max_payload {
            return Err(QueueError::invalid(
                format!("{field}.payload"),
                format!("must be at most {max_payload} bytes"),
            ));
        }
        check_text(&format!("{field}.content_type"), &self.content_type, MAX_TEXT)?;
        check_text(&format!("{field}.dedup_key"), &self.dedup_key, MAX_TEXT)?;
        check_text(&format!("{field}.group_key"), &self.group_key, MAX_TEXT)?;
        if self.headers.len() > MAX_HEADERS {
            return Err(QueueError::invalid(
                format!("{field}.headers"),
                format!("must have at most {MAX_HEADERS} entries"),
            ));
        }
        for (k, v) in &self.headers {
            if k.is_empty() {
                return Err(QueueError::invalid(
                    format!("{field}.headers"),
                    "names must not be empty",
                ));
            }
            check_text(&format!("{field}.headers"), k, MAX_TEXT)?;
            if v.len() > MAX_HEADER_VALUE {
                return Err(QueueError::invalid(
                    format!("{field}.headers[{k}]"),
                    format!("must be at most {MAX_HEADER_VALUE} bytes"),
                ));
            }
        }
        if !(-1000..=1000).contains(&self.priority) {
            return Err(QueueError::invalid(
                format!("{field}.priority"),
                "must be between -1000 and 1000",
            ));
        }
        Ok(())
    }

    /// When it becomes ready.
    pub fn ready_at(&self, now: i64) -> i64 {
        self.run_at.unwrap_or(now).max(now.saturating_add(self.delay_ms))
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Id.
    pub id: i64,
    /// Queue.
    pub queue: String,
    /// State.
    pub state: State,
    /// Job.
    pub payload: Vec<u8>,
    /// Type.
    pub content_type: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Priority.
    pub priority: i32,
    /// Dedup key.
    pub dedup_key: String,
    /// Group.
    pub group_key: String,
    /// Deliveries so far.
    pub attempts: i32,
    /// Enqueued at.
    pub enqueued_at: i64,
    /// Scheduled: ready at; leased: lease expiry.
    pub next_at: i64,
    /// When it became (or becomes) ready.
    pub ready_at: i64,
    /// TTL deadline.
    pub expires_at: Option<i64>,
    /// Last failure.
    pub last_error: String,
    /// A dead letter from another queue: that queue.
    pub origin_queue: String,
    /// The current delivery's token.
    pub lease_token: Option<i64>,
}

/// A message handed to a worker.
#[derive(Debug, Clone)]
pub struct Leased {
    /// The message.
    pub message: Message,
    /// The delivery's token.
    pub token: i64,
    /// Lease expiry.
    pub expires_at: i64,
}

/// The outcome of one enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The id (the first message's for a duplicate).
    pub id: i64,
    /// Nothing was added.
    pub duplicate: bool,
    /// Its state (a duplicate whose first message is gone: `None`).
    pub state: Option<State>,
}

/// How one ack ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Deleted.
    Acked,
    /// The token is not the current delivery's.
    Stale,
    /// No such message.
    NotFound,
}

/// What a nack asks for.
#[derive(Debug, Clone, Default)]
pub struct Nack {
    /// Why.
    pub error: String,
    /// Retry after exactly this long.
    pub delay_ms: Option<i64>,
    /// Dead-letter now.
    pub dead_letter: bool,
}

/// What became of a nacked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackOutcome {
    /// Retried at this time.
    Retry(i64),
    /// Dead-lettered.
    Dead,
}

/// Which dead letters to redrive.
#[derive(Debug, Clone, Default)]
pub struct RetryFilter {
    /// Last error contains this.
    pub error_contains: String,
    /// Only these ids (empty: any).
    pub ids: Vec<i64>,
    /// At most this many.
    pub limit: i64,
}

/// A lease token on the wire: 16 hex digits.
pub fn format_token(token: i64) -> String {
    format!("{:016x}", token as u64)
}

/// Parses a lease token; `field` names it when malformed.
pub fn parse_token(field: &str, text: &str) -> Result<i64, QueueError> {
    if text.len() != 16 {
        return Err(QueueError::invalid(field, "is not a lease token this service issued"));
    }
    u64::from_str_radix(text, 16)
        .map(|t| t as i64)
        .map_err(|_| QueueError::invalid(field, "is not a lease token this service issued"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_and_jitter_stays_below_it() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
            multiplier: 3.0,
            jitter: false,
        };
        assert_eq!(
            (1..=4).map(|n| b.ceiling_ms(n)).collect::<Vec<_>>(),
            vec![100, 300, 900, 1000]
        );
        let jittered = Backoff { jitter: true, ..b };
        for _ in 0..200 {
            assert!((0..=900).contains(&jittered.delay_ms(3)));
        }
    }

    #[test]
    fn names_and_tokens_are_checked() {
        assert!(check_queue_name("queue", "emails.high-1").is_ok());
        for bad in ["", "Emails", "1st", "a b", &"x".repeat(64)] {
            assert!(check_queue_name("queue", bad).is_err(), "{bad}");
        }
        let t = format_token(-5);
        assert_eq!(parse_token("lease_token", &t).unwrap(), -5);
        assert!(parse_token("lease_token", "xyz").is_err());
    }
}

/// A cron schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The queue it enqueues into.
    pub queue: String,
    /// Its name.
    pub name: String,
    /// The cron expression as given.
    pub cron: String,
    /// IANA zone ("" UTC).
    pub time_zone: String,
    /// What each tick enqueues.
    pub template: NewMessage,
    /// Ticks skipped.
    pub paused: bool,
    /// The next tick.
    pub next_run_at: i64,
    /// The last tick that enqueued.
    pub last_run_at: Option<i64>,
    /// When created.
    pub created_at: i64,
}
