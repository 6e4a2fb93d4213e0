//! The gRPC face of the queue service: decode, validate into domain values
//! (naming the offending field), call [`Queues`], encode. No rule of the
//! domain lives here.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::Notify;
use tonic::{Request, Response, Status, Streaming};

use plinth::queue::v1 as pb;
use plinth::queue::v1::queue_service_server::QueueService;
use plinth_runtime::auth::subject_of;
use plinth_runtime::auth::unix_now_ms;
use plinth_runtime::error::to_status;
use plinth_runtime::wire::{self, duration, duration_ms, timestamp, timestamp_ms};

use crate::error::QueueError;
use crate::model::{
    AckOutcome, Backoff, Counts, Enqueued, Leased, MAX_BATCH, MAX_DELAY_MS, MAX_ERROR, MAX_LEASE_MS, MAX_WAIT_MS,
    MIN_LEASE_MS, Message, Nack, NackOutcome, NewMessage, RetryFilter, Schedule, Settings, State, check_queue_name,
    format_token, parse_token,
};
use crate::service::{QueueView, Queues, SettingsUpdate};

fn status(e: QueueError) -> Status {
    to_status(&e)
}

/// The queue service over gRPC.
#[derive(Clone)]
pub struct QueueGrpc {
    queues: Queues,
}

impl QueueGrpc {
    /// Serves `queues`.
    pub fn new(queues: Queues) -> Self {
        Self { queues }
    }
}

fn queue_name(name: &str) -> Result<&str, Status> {
    check_queue_name("queue", name).map_err(status)?;
    Ok(name)
}

fn page_size(size: i32) -> Result<usize, Status> {
    wire::page_size("page_size", size, 100).map_err(|e| status(e.into()))
}

fn decode_token(token: &str) -> Result<String, Status> {
    wire::page_token_text("page_token", token).map_err(|e| status(e.into()))
}

fn opt_duration(field: &str, d: Option<&prost_types::Duration>, min: i64, max: i64) -> Result<Option<i64>, Status> {
    d.map(|d| duration_ms(field, d, min, max))
        .transpose()
        .map_err(|e| status(e.into()))
}

/// Settings from the wire; zero values take the defaults (or, for an
/// update, whatever the mask says).
fn settings(field: &str, s: Option<&pb::QueueSettings>) -> Result<Settings, Status> {
    let d = Settings::default();
    let Some(s) = s else { return Ok(d) };
    let f = |name: &str| format!("{field}.{name}");
    let backoff = match &s.backoff {
        None => d.backoff,
        Some(b) => Backoff {
            initial_ms: opt_duration(&f("backoff.initial"), b.initial.as_ref(), 0, MAX_LEASE_MS)?
                .unwrap_or(d.backoff.initial_ms),
            max_ms: opt_duration(&f("backoff.max"), b.max.as_ref(), 0, MAX_DELAY_MS)?.unwrap_or(d.backoff.max_ms),
            multiplier: if b.multiplier == 0.0 {
                d.backoff.multiplier
            } else {
                b.multiplier
            },
            jitter: b.jitter,
        },
    };
    Ok(Settings {
        max_attempts: if s.max_attempts == 0 {
            d.max_attempts
        } else {
            s.max_attempts
        },
        backoff,
        lease_ms: opt_duration(
            &f("lease_duration"),
            s.lease_duration.as_ref(),
            MIN_LEASE_MS,
            MAX_LEASE_MS,
        )?
        .unwrap_or(d.lease_ms),
        ttl_ms: opt_duration(&f("message_ttl"), s.message_ttl.as_ref(), 0, MAX_DELAY_MS)?.unwrap_or(d.ttl_ms),
        dedup_window_ms: opt_duration(&f("dedup_window"), s.dedup_window.as_ref(), 0, MAX_DELAY_MS)?
            .unwrap_or(d.dedup_window_ms),
        rate_limit: s.rate_limit_per_second,
        max_concurrency: s.max_concurrency,
        depth_alert: s.depth_alert_threshold,
        dead_letter_queue: s.dead_letter_queue.clone(),
        fifo_groups: s.fifo_groups,
    })
}

/// The setting names a non-zero wire value sets (an update without a mask).
fn given_fields(s: &pb::QueueSettings) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |set: bool, name: &str| {
        if set {
            out.push(name.to_owned());
        }
    };
    add(s.max_attempts != 0, "max_attempts");
    add(s.backoff.is_some(), "backoff");
    add(s.lease_duration.is_some(), "lease_duration");
    add(s.message_ttl.is_some(), "message_ttl");
    add(s.dedup_window.is_some(), "dedup_window");
    add(s.rate_limit_per_second != 0.0, "rate_limit_per_second");
    add(s.max_concurrency != 0, "max_concurrency");
    add(s.depth_alert_threshold != 0, "depth_alert_threshold");
    add(!s.dead_letter_queue.is_empty(), "dead_letter_queue");
    add(s.fifo_groups, "fifo_groups");
    out
}

fn wire_settings(s: &Settings) -> pb::QueueSettings {
    pb::QueueSettings {
        max_attempts: s.max_attempts,
        backoff: Some(pb::Backoff {
            initial: Some(duration(s.backoff.initial_ms)),
            max: Some(duration(s.backoff.max_ms)),
            multiplier: s.backoff.multiplier,
            jitter: s.backoff.jitter,
        }),
        lease_duration: Some(duration(s.lease_ms)),
        message_ttl: (s.ttl_ms > 0).then(|| duration(s.ttl_ms)),
        dedup_window: Some(duration(s.dedup_window_ms)),
        rate_limit_per_second: s.rate_limit,
        max_concurrency: s.max_concurrency,
        depth_alert_threshold: s.depth_alert,
        dead_letter_queue: s.dead_letter_queue.clone(),
        fifo_groups: s.fifo_groups,
    }
}

fn wire_counts(c: &Counts) -> pb::QueueCounts {
    pb::QueueCounts {
        scheduled: c.scheduled,
        ready: c.ready,
        leased: c.leased,
        dead: c.dead,
    }
}

fn wire_queue(v: &QueueView) -> pb::Queue {
    let q = &v.queue;
    pb::Queue {
        name: q.name.clone(),
        settings: Some(wire_settings(&q.settings)),
        paused: q.paused,
        draining: q.drain_state != 0,
        counts: Some(wire_counts(&v.counts)),
        create_time: Some(timestamp(q.created_at)),
        update_time: Some(timestamp(q.updated_at)),
        etag: format!("\"{}\"", q.generation),
    }
}

fn wire_state(s: State) -> i32 {
    s as i32
}

fn wire_message(m: Message) -> pb::Message {
    let next = matches!(m.state, State::Scheduled | State::Leased).then(|| timestamp(m.next_at));
    pb::Message {
        id: m.id,
        queue: m.queue,
        state: wire_state(m.state),
        payload: m.payload.into(),
        content_type: m.content_type,
        headers: m.headers.into_iter().collect(),
        priority: m.priority,
        dedup_key: m.dedup_key,
        group_key: m.group_key,
        attempts: m.attempts,
        enqueue_time: Some(timestamp(m.enqueued_at)),
        next_time: next,
        expire_time: m.expires_at.map(timestamp),
        last_error: m.last_error,
        origin_queue: m.origin_queue,
    }
}

fn wire_leased(l: Leased) -> pb::LeasedMessage {
    pb::LeasedMessage {
        lease_token: format_token(l.token),
        lease_expire_time: Some(timestamp(l.expires_at)),
        message: Some(wire_message(l.message)),
    }
}

fn wire_enqueued(e: Enqueued) -> pb::EnqueueResult {
    pb::EnqueueResult {
        message_id: e.id,
        duplicate: e.duplicate,
        state: e.state.map_or(0, wire_state),
    }
}

fn new_message(field: &str, m: pb::NewMessage, max_payload: usize, now: i64) -> Result<NewMessage, Status> {
    if m.run_time.is_some() && m.delay.is_some() {
        return Err(status(QueueError::invalid(
            format!("{field}.delay"),
            "set run_time or delay, not both",
        )));
    }
    let run_at = m
        .run_time
        .as_ref()
        .map(|t| timestamp_ms(&format!("{field}.run_time"), t))
        .transpose()
        .map_err(|e| status(e.into()))?;
    if run_at.is_some_and(|t| t > now.saturating_add(MAX_DELAY_MS)) {
        return Err(status(QueueError::invalid(
            format!("{field}.run_time"),
            "must be within 365 days from now",
        )));
    }
    let out = NewMessage {
        payload: m.payload.to_vec(),
        content_type: m.content_type,
        headers: m.headers.into_iter().collect(),
        priority: m.priority,
        run_at,
        delay_ms: opt_duration(&format!("{field}.delay"), m.delay.as_ref(), 0, MAX_DELAY_MS)?.unwrap_or(0),
        ttl_ms: opt_duration(&format!("{field}.ttl"), m.ttl.as_ref(), 1, MAX_DELAY_MS)?,
        dedup_key: m.dedup_key,
        group_key: m.group_key,
    };
    out.check(field, max_payload).map_err(status)?;
    Ok(out)
}

fn message_id(field: &str, id: i64) -> Result<i64, Status> {
    if id > 0 {
        Ok(id)
    } else {
        Err(status(QueueError::invalid(field, "must be a message id (positive)")))
    }
}

fn state(field: &str, s: i32) -> Result<State, Status> {
    match pb::MessageState::try_from(s) {
        Ok(pb::MessageState::Unspecified) => Ok(State::Ready),
        Ok(pb::MessageState::Scheduled) => Ok(State::Scheduled),
        Ok(pb::MessageState::Ready) => Ok(State::Ready),
        Ok(pb::MessageState::Leased) => Ok(State::Leased),
        Ok(pb::MessageState::Dead) => Ok(State::Dead),
        Err(_) => Err(status(QueueError::invalid(field, "is not a message state"))),
    }
}

fn wire_schedule(s: Schedule) -> pb::Schedule {
    let t = s.template;
    pb::Schedule {
        name: s.name,
        cron: s.cron,
        time_zone: if s.time_zone.is_empty() {
            "UTC".into()
        } else {
            s.time_zone
        },
        template: Some(pb::NewMessage {
            payload: t.payload.into(),
            content_type: t.content_type,
            headers: t.headers.into_iter().collect(),
            priority: t.priority,
            ttl: t.ttl_ms.map(duration),
            group_key: t.group_key,
            ..pb::NewMessage::default()
        }),
        paused: s.paused,
        next_run_time: (s.next_run_at < i64::MAX).then(|| timestamp(s.next_run_at)),
        last_run_time: s.last_run_at.map(timestamp),
        create_time: Some(timestamp(s.created_at)),
    }
}

fn schedule_name(name: &str) -> Result<&str, Status> {
    check_queue_name("schedule", name).map_err(status)?;
    Ok(name)
}

/// Most credits a stream may have outstanding.
const MAX_CREDITS: i64 = 10_000;
/// Most messages pushed in one stream response.
const PUSH_BATCH: i64 = 256;

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send + 'static>>;

/// The leases a stream has handed out and that may still be held; released
/// when the stream is dropped.
struct Held {
    queues: Queues,
    queue: String,
    /// (token, lease expiry), oldest first.
    leases: VecDeque<(i64, i64)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let now = unix_now_ms();
        let tokens: Vec<i64> = self
            .leases
            .drain(..)
            .filter(|(_, expires)| *expires > now)
            .map(|(t, _)| t)
            .collect();
        if !tokens.is_empty() {
            self.queues.release_later(&self.queue, tokens);
        }
    }
}

/// One worker stream's state between pushes.
struct Subscription {
    inbound: Streaming<pb::SubscribeRequest>,
    lease_ms: Option<i64>,
    credits: i64,
    waker: Arc<Notify>,
    poll: Duration,
    held: Held,
    done: bool,
}

impl Subscription {
    /// Takes a request's credits; an error ends the stream.
    fn grant(&mut self, r: &pb::SubscribeRequest) -> Result<(), Status> {
        if !r.queue.is_empty() && r.queue != self.held.queue {
            return Err(status(QueueError::invalid(
                "queue",
                "must stay the queue the stream opened",
            )));
        }
        if !(1..=1000).contains(&r.credits) {
            return Err(status(QueueError::invalid("credits", "must be between 1 and 1000")));
        }
        if self.credits + i64::from(r.credits) > MAX_CREDITS {
            return Err(status(QueueError::invalid(
                "credits",
                format!("at most {MAX_CREDITS} may be outstanding"),
            )));
        }
        self.credits += i64::from(r.credits);
        Ok(())
    }

    /// Handles what the worker sent; false when the stream should end.
    fn received(&mut self, msg: Result<Option<pb::SubscribeRequest>, Status>) -> Result<bool, Status> {
        match msg {
            Ok(Some(r)) => self.grant(&r).map(|()| true),
            Ok(None) | Err(_) => Ok(false),
        }
    }

    /// The next push, or `None` when the stream is over.
    async fn next(mut self) -> Option<(Result<pb::SubscribeResponse, Status>, Self)> {
        loop {
            if self.done {
                return None;
            }
            let now = unix_now_ms();
            while self.held.leases.front().is_some_and(|(_, expires)| *expires <= now) {
                self.held.leases.pop_front();
            }
            if self.credits == 0 {
                let msg = self.inbound.message().await;
                match self.received(msg) {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => {
                        self.done = true;
                        return Some((Err(e), self));
                    }
                }
            }
            let waker = self.waker.clone();
            let woken = waker.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let queues = self.held.queues.clone();
            match queues
                .lease_now(&self.held.queue, self.credits.min(PUSH_BATCH), self.lease_ms)
                .await
            {
                Err(e) => {
                    self.done = true;
                    return Some((Err(status(e)), self));
                }
                Ok(got) if !got.is_empty() => {
                    self.credits -= got.len() as i64;
                    if let Some(first) = got.first() {
                        self.held.leases.push_back((first.token, first.expires_at));
                    }
                    let response = pb::SubscribeResponse {
                        messages: got.into_iter().map(wire_leased).collect(),
                    };
                    return Some((Ok(response), self));
                }
                Ok(_) => {}
            }
            tokio::select! {
                msg = self.inbound.message() => match self.received(msg) {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => {
                        self.done = true;
                        return Some((Err(e), self));
                    }
                },
                () = &mut woken => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}

#[tonic::async_trait]
impl QueueService for QueueGrpc {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| status(QueueError::invalid("queue", "the first request must name the queue")))?;
        let name = queue_name(&first.queue)?.to_owned();
        let lease_ms = opt_duration(
            "lease_duration",
            first.lease_duration.as_ref(),
            MIN_LEASE_MS,
            MAX_LEASE_MS,
        )?;
        // Refuse an unknown queue before the stream opens.
        self.queues.queue(&name).await.map_err(status)?;
        let mut sub = Subscription {
            inbound,
            lease_ms,
            credits: 0,
            waker: self.queues.waker(&name),
            poll: Duration::from_millis(self.queues.settings().poll_ms),
            held: Held {
                queues: self.queues.clone(),
                queue: name,
                leases: VecDeque::new(),
            },
            done: false,
        };
        sub.grant(&first)?;
        let stream = futures::stream::unfold(sub, Subscription::next);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::CreateScheduleResponse>, Status> {
        let r = request.into_inner();
        let queue = queue_name(&r.queue)?;
        let s = r
            .schedule
            .ok_or_else(|| status(QueueError::invalid("schedule", "is required")))?;
        check_queue_name("schedule.name", &s.name).map_err(status)?;
        let template = s.template.unwrap_or_default();
        if template.run_time.is_some() || template.delay.is_some() {
            return Err(status(QueueError::invalid(
                "schedule.template.delay",
                "each tick runs at once; run_time and delay are not allowed",
            )));
        }
        if !template.dedup_key.is_empty() {
            return Err(status(QueueError::invalid(
                "schedule.template.dedup_key",
                "each tick is enqueued exactly once already; dedup_key is not allowed",
            )));
        }
        let max = self.queues.settings().max_payload_bytes;
        let template = new_message("schedule.template", template, max, unix_now_ms())?;
        let schedule = Schedule {
            queue: queue.to_owned(),
            name: s.name,
            cron: s.cron,
            time_zone: s.time_zone,
            template,
            paused: false,
            next_run_at: 0,
            last_run_at: None,
            created_at: 0,
        };
        let created = self.queues.create_schedule(schedule).await.map_err(status)?;
        Ok(Response::new(pb::CreateScheduleResponse {
            schedule: Some(wire_schedule(created)),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let r = request.into_inner();
        let list = self.queues.schedules(queue_name(&r.queue)?).await.map_err(status)?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: list.into_iter().map(wire_schedule).collect(),
        }))
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::PauseScheduleRequest>,
    ) -> Result<Response<pb::PauseScheduleResponse>, Status> {
        let r = request.into_inner();
        let s = self
            .queues
            .pause_schedule(queue_name(&r.queue)?, schedule_name(&r.schedule)?)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PauseScheduleResponse {
            schedule: Some(wire_schedule(s)),
        }))
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Result<Response<pb::ResumeScheduleResponse>, Status> {
        let r = request.into_inner();
        let s = self
            .queues
            .resume_schedule(queue_name(&r.queue)?, schedule_name(&r.schedule)?)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ResumeScheduleResponse {
            schedule: Some(wire_schedule(s)),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let r = request.into_inner();
        self.queues
            .delete_schedule(queue_name(&r.queue)?, schedule_name(&r.schedule)?)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    async fn create_queue(
        &self,
        request: Request<pb::CreateQueueRequest>,
    ) -> Result<Response<pb::CreateQueueResponse>, Status> {
        let who = subject_of(&request);
        let q = request
            .into_inner()
            .queue
            .ok_or_else(|| status(QueueError::invalid("queue", "is required")))?;
        check_queue_name("queue.name", &q.name).map_err(status)?;
        let s = settings("queue.settings", q.settings.as_ref())?;
        s.check("queue.settings", &q.name).map_err(status)?;
        let view = self.queues.create_queue(&q.name, &s, &who).await.map_err(status)?;
        Ok(Response::new(pb::CreateQueueResponse {
            queue: Some(wire_queue(&view)),
        }))
    }

    async fn get_queue(&self, request: Request<pb::GetQueueRequest>) -> Result<Response<pb::GetQueueResponse>, Status> {
        let r = request.into_inner();
        let view = self.queues.queue(queue_name(&r.queue)?).await.map_err(status)?;
        Ok(Response::new(pb::GetQueueResponse {
            queue: Some(wire_queue(&view)),
        }))
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let r = request.into_inner();
        let size = page_size(r.page_size)?;
        let after = if r.page_token.is_empty() {
            String::new()
        } else {
            decode_token(&r.page_token)?
        };
        let mut views = self.queues.queues(&after, size + 1).await.map_err(status)?;
        let more = views.len() > size;
        views.truncate(size);
        let next = if more {
            views
                .last()
                .map(|v| wire::page_token(&v.queue.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListQueuesResponse {
            queues: views.iter().map(wire_queue).collect(),
            next_page_token: next,
        }))
    }

    async fn update_queue(
        &self,
        request: Request<pb::UpdateQueueRequest>,
    ) -> Result<Response<pb::UpdateQueueResponse>, Status> {
        let who = subject_of(&request);
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let given = r
            .settings
            .ok_or_else(|| status(QueueError::invalid("settings", "is required")))?;
        let fields = match &r.update_mask {
            Some(mask) if !mask.paths.is_empty() => mask.paths.clone(),
            _ => given_fields(&given),
        };
        let generation = if r.etag.is_empty() {
            0
        } else {
            r.etag
                .trim_matches('"')
                .parse::<i64>()
                .ok()
                .filter(|g| *g > 0)
                .ok_or_else(|| status(QueueError::invalid("etag", "is not an etag this service issued")))?
        };
        let update = SettingsUpdate {
            settings: settings("settings", Some(&given))?,
            fields,
            generation,
        };
        let view = self.queues.update_queue(name, update, &who).await.map_err(status)?;
        Ok(Response::new(pb::UpdateQueueResponse {
            queue: Some(wire_queue(&view)),
        }))
    }

    async fn delete_queue(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Result<Response<pb::DeleteQueueResponse>, Status> {
        let who = subject_of(&request);
        let r = request.into_inner();
        let n = self
            .queues
            .delete_queue(queue_name(&r.queue)?, &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteQueueResponse { deleted_messages: n }))
    }

    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let who = subject_of(&request);
        let r = request.into_inner();
        let view = self.queues.pause(queue_name(&r.queue)?, &who).await.map_err(status)?;
        Ok(Response::new(pb::PauseQueueResponse {
            queue: Some(wire_queue(&view)),
        }))
    }

    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let who = subject_of(&request);
        let r = request.into_inner();
        let view = self.queues.resume(queue_name(&r.queue)?, &who).await.map_err(status)?;
        Ok(Response::new(pb::ResumeQueueResponse {
            queue: Some(wire_queue(&view)),
        }))
    }

    async fn drain_queue(
        &self,
        request: Request<pb::DrainQueueRequest>,
    ) -> Result<Response<pb::DrainQueueResponse>, Status> {
        let who = subject_of(&request);
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let wait = opt_duration("wait", r.wait.as_ref(), 0, MAX_WAIT_MS)?.unwrap_or(0);
        let in_flight = self
            .queues
            .drain(name, Duration::from_millis(u64::try_from(wait).unwrap_or(0)), &who)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DrainQueueResponse {
            in_flight,
            drained: in_flight == 0,
        }))
    }

    async fn get_queue_status(
        &self,
        request: Request<pb::GetQueueStatusRequest>,
    ) -> Result<Response<pb::GetQueueStatusResponse>, Status> {
        let r = request.into_inner();
        let s = self.queues.status(queue_name(&r.queue)?).await.map_err(status)?;
        Ok(Response::new(pb::GetQueueStatusResponse {
            queue: s.queue.name.clone(),
            counts: Some(wire_counts(&s.counts)),
            in_flight: s.counts.leased,
            oldest_ready_age: Some(duration(s.oldest_ready_ms)),
            enqueue_rate: s.rates.enqueued,
            ack_rate: s.rates.acked,
            fail_rate: s.rates.failed,
            paused: s.queue.paused,
            draining: s.queue.drain_state != 0,
        }))
    }

    async fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Result<Response<pb::EnqueueResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let m = r
            .message
            .ok_or_else(|| status(QueueError::invalid("message", "is required")))?;
        let max = self.queues.settings().max_payload_bytes;
        let m = new_message("message", m, max, plinth_runtime::auth::unix_now_ms())?;
        let mut results = self.queues.enqueue(name, vec![m]).await.map_err(status)?;
        Ok(Response::new(pb::EnqueueResponse {
            result: results.pop().map(wire_enqueued),
        }))
    }

    async fn enqueue_batch(
        &self,
        request: Request<pb::EnqueueBatchRequest>,
    ) -> Result<Response<pb::EnqueueBatchResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        if r.messages.is_empty() || r.messages.len() > MAX_BATCH {
            return Err(status(QueueError::invalid(
                "messages",
                format!("must hold 1 to {MAX_BATCH} messages"),
            )));
        }
        let max = self.queues.settings().max_payload_bytes;
        let now = plinth_runtime::auth::unix_now_ms();
        let messages = r
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| new_message(&format!("messages[{i}]"), m, max, now))
            .collect::<Result<Vec<_>, _>>()?;
        let results = self.queues.enqueue(name, messages).await.map_err(status)?;
        Ok(Response::new(pb::EnqueueBatchResponse {
            results: results.into_iter().map(wire_enqueued).collect(),
        }))
    }

    async fn lease(&self, request: Request<pb::LeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let max = match r.max_messages {
            0 => 1,
            n if (1..=1000).contains(&n) => i64::from(n),
            _ => {
                return Err(status(QueueError::invalid(
                    "max_messages",
                    "must be between 0 and 1000",
                )));
            }
        };
        let lease = opt_duration("lease_duration", r.lease_duration.as_ref(), MIN_LEASE_MS, MAX_LEASE_MS)?;
        let wait = opt_duration("wait", r.wait.as_ref(), 0, MAX_WAIT_MS)?.unwrap_or(0);
        let leased = self
            .queues
            .lease(
                name,
                max,
                lease,
                Duration::from_millis(u64::try_from(wait).unwrap_or(0)),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::LeaseResponse {
            messages: leased.into_iter().map(wire_leased).collect(),
        }))
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        if r.acks.is_empty() || r.acks.len() > MAX_BATCH {
            return Err(status(QueueError::invalid(
                "acks",
                format!("must hold 1 to {MAX_BATCH} entries"),
            )));
        }
        let acks = r
            .acks
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Ok((
                    message_id(&format!("acks[{i}].message_id"), a.message_id)?,
                    parse_token(&format!("acks[{i}].lease_token"), &a.lease_token).map_err(status)?,
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let outcomes = self.queues.ack(name, &acks).await.map_err(status)?;
        Ok(Response::new(pb::AckResponse {
            outcomes: outcomes
                .into_iter()
                .map(|o| match o {
                    AckOutcome::Acked => pb::AckOutcome::Acked as i32,
                    AckOutcome::Stale => pb::AckOutcome::Stale as i32,
                    AckOutcome::NotFound => pb::AckOutcome::NotFound as i32,
                })
                .collect(),
        }))
    }

    async fn nack(&self, request: Request<pb::NackRequest>) -> Result<Response<pb::NackResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let id = message_id("message_id", r.message_id)?;
        let token = parse_token("lease_token", &r.lease_token).map_err(status)?;
        if r.error.len() > MAX_ERROR {
            return Err(status(QueueError::invalid(
                "error",
                format!("must be at most {MAX_ERROR} bytes"),
            )));
        }
        let nack = Nack {
            error: r.error,
            delay_ms: opt_duration("delay", r.delay.as_ref(), 0, MAX_DELAY_MS)?,
            dead_letter: r.dead_letter,
        };
        let outcome = self.queues.nack(name, id, token, &nack).await.map_err(status)?;
        Ok(Response::new(match outcome {
            NackOutcome::Retry(at) => pb::NackResponse {
                state: pb::MessageState::Scheduled as i32,
                next_time: Some(timestamp(at)),
            },
            NackOutcome::Dead => pb::NackResponse {
                state: pb::MessageState::Dead as i32,
                next_time: None,
            },
        }))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let id = message_id("message_id", r.message_id)?;
        let token = parse_token("lease_token", &r.lease_token).map_err(status)?;
        let lease = opt_duration("lease_duration", r.lease_duration.as_ref(), MIN_LEASE_MS, MAX_LEASE_MS)?;
        let expires = self.queues.extend(name, id, token, lease).await.map_err(status)?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            lease_expire_time: Some(timestamp(expires)),
        }))
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let id = message_id("message_id", r.message_id)?;
        let m = self.queues.message(name, id).await.map_err(status)?;
        Ok(Response::new(pb::GetMessageResponse {
            message: Some(wire_message(m)),
        }))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let s = state("state", r.state)?;
        let size = page_size(r.page_size)?;
        let after = if r.page_token.is_empty() {
            0
        } else {
            decode_token(&r.page_token)?
                .parse::<i64>()
                .map_err(|_| status(QueueError::invalid("page_token", "is not a token from a previous page")))?
        };
        let mut messages = self.queues.messages(name, s, after, size + 1).await.map_err(status)?;
        let more = messages.len() > size;
        messages.truncate(size);
        let next = if more {
            messages
                .last()
                .map(|m| wire::page_token(&m.id.to_string()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListMessagesResponse {
            messages: messages.into_iter().map(wire_message).collect(),
            next_page_token: next,
        }))
    }

    async fn purge_queue(
        &self,
        request: Request<pb::PurgeQueueRequest>,
    ) -> Result<Response<pb::PurgeQueueResponse>, Status> {
        let who = subject_of(&request);
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        let mut states = Vec::new();
        for (i, s) in r.states.iter().enumerate() {
            if *s == 0 {
                return Err(status(QueueError::invalid(
                    format!("states[{i}]"),
                    "must be a message state",
                )));
            }
            let s = state(&format!("states[{i}]"), *s)?;
            if !states.contains(&s) {
                states.push(s);
            }
        }
        if states.is_empty() {
            states = State::ALL.to_vec();
        }
        let purged = self.queues.purge(name, &states, &who).await.map_err(status)?;
        Ok(Response::new(pb::PurgeQueueResponse { purged }))
    }

    async fn retry_failed(
        &self,
        request: Request<pb::RetryFailedRequest>,
    ) -> Result<Response<pb::RetryFailedResponse>, Status> {
        let who = subject_of(&request);
        let r = request.into_inner();
        let name = queue_name(&r.queue)?;
        if r.message_ids.len() > MAX_BATCH {
            return Err(status(QueueError::invalid(
                "message_ids",
                format!("must hold at most {MAX_BATCH} ids"),
            )));
        }
        if r.error_contains.len() > MAX_ERROR {
            return Err(status(QueueError::invalid(
                "error_contains",
                format!("must be at most {MAX_ERROR} bytes"),
            )));
        }
        let limit = match r.limit {
            0 => 10_000,
            n if (1..=10_000).contains(&n) => i64::from(n),
            _ => return Err(status(QueueError::invalid("limit", "must be between 0 and 10000"))),
        };
        for (i, id) in r.message_ids.iter().enumerate() {
            message_id(&format!("message_ids[{i}]"), *id)?;
        }
        let filter = RetryFilter {
            error_contains: r.error_contains,
            ids: r.message_ids,
            limit,
        };
        let retried = self.queues.retry_failed(name, &filter, &who).await.map_err(status)?;
        Ok(Response::new(pb::RetryFailedResponse { retried }))
    }
}
