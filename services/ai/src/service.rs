//! What each call means: route to a target, fall back on retryable
//! failures, stream with billing even when the caller goes away, price and
//! record every call. The wire (`grpc`) and the gateway's OpenAI surface
//! both call this.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use plinth_runtime::Tasks;
use plinth_runtime::auth::unix_now_ms;
use plinth_runtime::config::{AiBudget, AiSettings};
use plinth_runtime::events::outbox::Relay;
use plinth_runtime::resilience::BreakerState;
use plinth_runtime::secrets::SecretSource;
use plinth_runtime::state::SharedStateRef;
use plinth_runtime::storage::Db;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::cache::{CachePolicy, ResponseCache};
use crate::coalesce::Coalescer;
use crate::error::AiError;
use crate::limits::{Limit, Reservation};
use crate::model::{Accumulator, ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, StreamEvent, Usage};
use crate::pricing::{Cost, Prices};
use crate::providers::{EventStream, ProviderError};
use crate::router::{Route, Router, Skip, Target};
use crate::usage::{self, Outcome, Recorder, UsageLog, UsageQuery, UsageRecord, UsageSum};
use crate::{telemetry, tokens};

/// Who is calling, for usage records.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The tenant, or empty.
    pub tenant: String,
    /// The user or service account.
    pub subject: String,
    /// The API key id, or empty.
    pub api_key: String,
}

/// A target tried or skipped before the one that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Provider name.
    pub provider: String,
    /// Provider model.
    pub model: String,
    /// Why it was not used.
    pub error: String,
    /// Skipped without a call.
    pub skipped: bool,
}

/// Which target answered, after which attempts.
#[derive(Debug, Clone)]
pub struct Served {
    /// Plinth's call id.
    pub id: String,
    /// The logical model.
    pub model: String,
    /// The provider that answered.
    pub provider: String,
    /// Its wire format in the GenAI conventions' names (`openai`,
    /// `anthropic`, `gcp.gemini`, `azure.ai.openai`); empty when none answered.
    pub kind: &'static str,
    /// Its model.
    pub provider_model: String,
    /// Targets before it.
    pub attempts: Vec<Attempt>,
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Routing.
    pub served: Served,
    /// The answer.
    pub response: ChatResponse,
    /// Its cost.
    pub cost: Cost,
    /// Served from the response cache.
    pub cached: bool,
}

/// Embeddings.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// Routing.
    pub served: Served,
    /// The vectors.
    pub response: EmbedResponse,
    /// Their cost.
    pub cost: Cost,
}

/// One step of a streamed answer as the caller sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A step of the answer.
    Event(StreamEvent),
    /// The end: usage and cost as billed.
    Done {
        /// Tokens.
        usage: Usage,
        /// Cost.
        cost: Cost,
    },
}

/// A started stream: where it is served from, then its items.
#[derive(Debug)]
pub struct Streaming {
    /// Routing.
    pub served: Served,
    /// Items; ends after `Done` or an error.
    pub items: mpsc::Receiver<Result<StreamItem, AiError>>,
}

/// A target's state, for `ListModels`.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    /// Provider name.
    pub provider: String,
    /// Wire format.
    pub kind: &'static str,
    /// Provider model.
    pub model: String,
    /// Tier.
    pub tier: u32,
    /// Weight.
    pub weight: u32,
    /// Breaker.
    pub breaker: BreakerState,
    /// Cool-down left.
    pub cooling_down: Option<Duration>,
}

/// A logical model, for `ListModels`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Its name.
    pub name: String,
    /// Its targets.
    pub targets: Vec<TargetInfo>,
}

struct Inner {
    router: Router,
    prices: Prices,
    recorder: Recorder,
    cache: ResponseCache,
    coalescer: Coalescer,
    usage: UsageLog,
    default_max_tokens: u32,
    tasks: Tasks,
    state: SharedStateRef,
    caller_rpm: u64,
    caller_tpm: u64,
    budgets: Vec<AiBudget>,
}

/// The ai service's domain; cheap to clone.
#[derive(Clone)]
pub struct Ai {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ai {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ai").finish_non_exhaustive()
    }
}

/// The target that answered, its answer and the attempts before it; or
/// why none did, with the attempts.
type Fallback<T> = Result<(Arc<Target>, T, Vec<Attempt>), (AiError, Vec<Attempt>)>;

/// An opened upstream stream and its first event.
type Opened = (EventStream, StreamEvent);

impl Ai {
    /// The service over `db`, with targets from `settings`; starts the
    /// usage writer on `tasks`. Provider keys given as `api_key_secret`
    /// are read from `secrets`.
    pub fn new(
        settings: &AiSettings,
        db: Db,
        relay: Option<Relay>,
        state: SharedStateRef,
        tasks: Tasks,
        secrets: Option<Arc<dyn SecretSource>>,
    ) -> Result<Self, AiError> {
        for (i, b) in settings.budgets.iter().enumerate() {
            if b.tenant.is_some() == b.api_key.is_some() {
                return Err(AiError::Config(format!(
                    "budgets[{i}]: give exactly one of tenant or api_key"
                )));
            }
            if !(b.usd.is_finite() && b.usd >= 0.0) || crate::limits::period(&b.period, 0).is_none() {
                return Err(AiError::Config(format!(
                    "budgets[{i}]: usd must be a non-negative amount and period day or month"
                )));
            }
        }
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_millis(settings.timeout_ms.clamp(1, 10_000)))
            .build()
            .map_err(|e| AiError::Config(format!("HTTP client: {e}")))?;
        let router = Router::from_settings(settings, client, secrets.as_ref())?;
        let log = UsageLog::new(db);
        let (recorder, writer) = usage::recorder(log.clone(), relay);
        tasks.spawn("ai-usage-writer", writer.run(tasks.token()));
        Ok(Self {
            inner: Arc::new(Inner {
                router,
                prices: Prices::new(&settings.prices),
                recorder,
                cache: ResponseCache::new(state.clone(), Duration::from_secs(settings.cache_ttl_secs)),
                coalescer: Coalescer::new(Duration::from_millis(settings.embed_batch_window_ms), tasks.clone()),
                usage: log,
                default_max_tokens: settings.default_max_tokens.max(1),
                tasks,
                state,
                caller_rpm: settings.caller_requests_per_minute,
                caller_tpm: settings.caller_tokens_per_minute,
                budgets: settings.budgets.clone(),
            }),
        })
    }

    /// One whole answer.
    pub async fn generate(
        &self,
        caller: &Caller,
        model: &str,
        request: ChatRequest,
        cache: CachePolicy,
    ) -> Result<Answer, AiError> {
        let span = telemetry::span("generate", model);
        self.generate_in_span(caller, model, request, cache)
            .instrument(span)
            .await
    }

    async fn generate_in_span(
        &self,
        caller: &Caller,
        model: &str,
        request: ChatRequest,
        cache: CachePolicy,
    ) -> Result<Answer, AiError> {
        let call = Call {
            caller,
            operation: "generate",
            model,
            started: Instant::now(),
        };
        let route = self.inner.router.route(model)?;
        let (request, prompt) = self.with_max_tokens(request);
        let cache_key = self.inner.cache.key(cache, model, &request);
        if let Some(key) = &cache_key
            && let Some(hit) = self.inner.cache.get(key).await
        {
            let served = Served {
                id: call_id(),
                model: model.to_owned(),
                provider: hit.provider,
                kind: "",
                provider_model: hit.provider_model,
                attempts: Vec::new(),
            };
            let free = Cost { nanos: 0, priced: true };
            let end = Ending {
                cache_hit: true,
                ..Ending::answered(Usage::default(), free)
            };
            self.record(&call, &served, end).await;
            return Ok(Answer {
                served,
                response: hit.response,
                cost: free,
                cached: true,
            });
        }
        let reserve = prompt + u64::from(request.max_tokens.unwrap_or(0));
        let mut held = self.reserve(caller, route, reserve).await?;
        let result = fallback(route, &self.inner.state, &mut held, reserve, |target| {
            let request = ChatRequest {
                model: target.model.clone(),
                ..request.clone()
            };
            async move { target.adapter.chat(&request).await }
        })
        .await;
        let (target, response, attempts) = self.settle(&call, &mut held, result).await?;
        let (served, cost) = self.answered(&call, &target, attempts, response.usage).await;
        held.settle(response.usage.total(), cost.nanos).await;
        if let Some(key) = &cache_key
            && response.finish_reason != crate::model::FinishReason::Error
        {
            let entry = crate::cache::Entry {
                provider: served.provider.clone(),
                provider_model: served.provider_model.clone(),
                response,
            };
            self.inner.cache.put(key, &entry).await;
            return Ok(Answer {
                served,
                response: entry.response,
                cost,
                cached: false,
            });
        }
        Ok(Answer {
            served,
            response,
            cost,
            cached: false,
        })
    }

    /// A streamed answer. Fallback happens before the first event; the
    /// stream is read by a task of its own, so a caller that goes away stops
    /// the upstream request and is billed for what was produced.
    pub async fn generate_stream(
        &self,
        caller: &Caller,
        model: &str,
        request: ChatRequest,
    ) -> Result<Streaming, AiError> {
        let span = telemetry::span("generate_stream", model);
        self.generate_stream_in_span(caller, model, request, span.clone())
            .instrument(span)
            .await
    }

    async fn generate_stream_in_span(
        &self,
        caller: &Caller,
        model: &str,
        request: ChatRequest,
        span: tracing::Span,
    ) -> Result<Streaming, AiError> {
        let call = Call {
            caller,
            operation: "generate_stream",
            model,
            started: Instant::now(),
        };
        let route = self.inner.router.route(model)?;
        let (request, prompt) = self.with_max_tokens(request);
        let reserve = prompt + u64::from(request.max_tokens.unwrap_or(0));
        let mut held = self.reserve(caller, route, reserve).await?;
        let result = fallback(route, &self.inner.state, &mut held, reserve, |target| {
            let request = ChatRequest {
                model: target.model.clone(),
                ..request.clone()
            };
            async move {
                let mut stream = target.adapter.chat_stream(&request).await?;
                match stream.next().await {
                    Some(Ok(first)) => Ok::<Opened, ProviderError>((stream, first)),
                    Some(Err(e)) => Err(e),
                    None => Err(ProviderError::Malformed("the stream ended before any event".into())),
                }
            }
        })
        .await;
        let (target, (upstream, first), attempts) = self.settle(&call, &mut held, result).await?;
        let served = served(call_id(), model, &target, attempts);
        let (sender, items) = mpsc::channel(64);
        let pump = Pump {
            ai: self.clone(),
            caller: caller.clone(),
            served: served.clone(),
            target,
            prompt_estimate: prompt,
            started: call.started,
            held,
        };
        self.inner
            .tasks
            .spawn("ai-stream", pump.run(upstream, first, sender).instrument(span));
        Ok(Streaming { served, items })
    }

    /// Embeddings, in input order.
    pub async fn embed(&self, caller: &Caller, model: &str, request: EmbedRequest) -> Result<Embedded, AiError> {
        let span = telemetry::span("embed", model);
        self.embed_in_span(caller, model, request).instrument(span).await
    }

    async fn embed_in_span(&self, caller: &Caller, model: &str, request: EmbedRequest) -> Result<Embedded, AiError> {
        let call = Call {
            caller,
            operation: "embed",
            model,
            started: Instant::now(),
        };
        let route = self.inner.router.route(model)?;
        let reserve: u64 = request.inputs.iter().map(|t| tokens::of_text(t)).sum();
        let mut held = self.reserve(caller, route, reserve).await?;
        let result = fallback(route, &self.inner.state, &mut held, reserve, |target| {
            let request = EmbedRequest {
                model: target.model.clone(),
                ..request.clone()
            };
            let coalescer = self.inner.coalescer.clone();
            async move { coalescer.embed(target, request).await }
        })
        .await;
        let (target, mut response, attempts) = self.settle(&call, &mut held, result).await?;
        if response.usage.input_tokens == 0 {
            // Some providers (Gemini) do not count embedding input.
            response.usage.input_tokens = reserve;
        }
        let (served, cost) = self.answered(&call, &target, attempts, response.usage).await;
        held.settle(response.usage.total(), cost.nanos).await;
        Ok(Embedded { served, response, cost })
    }

    /// `request` with the default `max_tokens` when it has none, and its
    /// estimated prompt tokens.
    fn with_max_tokens(&self, mut request: ChatRequest) -> (ChatRequest, u64) {
        request.max_tokens.get_or_insert(self.inner.default_max_tokens);
        let prompt = tokens::of_request(&request);
        (request, prompt)
    }

    /// Estimated prompt tokens of `request` for `model`.
    pub fn count_tokens(&self, model: &str, request: &ChatRequest) -> Result<u64, AiError> {
        self.inner.router.route(model)?;
        Ok(tokens::of_request(request))
    }

    /// Every logical model with its targets' health.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner
            .router
            .routes()
            .map(|r| ModelInfo {
                name: r.name.clone(),
                targets: r
                    .targets
                    .iter()
                    .map(|t| TargetInfo {
                        provider: t.provider.clone(),
                        kind: t.kind.name(),
                        model: t.model.clone(),
                        tier: t.tier,
                        weight: t.weight,
                        breaker: t.breaker_state(),
                        cooling_down: t.cooling_down(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Usage sums.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageSum>, AiError> {
        self.inner.usage.summarize(query).await
    }

    /// Records how `call` ended: metrics, span attributes and the usage row.
    async fn record(&self, call: &Call<'_>, served: &Served, end: Ending) {
        // The error type is the kind of failure, not its text (a metric label).
        let error_type = (end.outcome == Outcome::Failure).then_some("upstream");
        telemetry::finished(call.operation, served, &end.usage, call.started.elapsed(), error_type);
        self.inner
            .recorder
            .record(UsageRecord {
                id: served.id.clone(),
                time_ms: unix_now_ms(),
                tenant: call.caller.tenant.clone(),
                subject: call.caller.subject.clone(),
                api_key: call.caller.api_key.clone(),
                operation: call.operation,
                model: served.model.clone(),
                provider: served.provider.clone(),
                provider_model: served.provider_model.clone(),
                usage: end.usage,
                cost_nanos: end.cost.nanos,
                priced: end.cost.priced,
                latency_ms: i64::try_from(call.started.elapsed().as_millis()).unwrap_or(i64::MAX),
                outcome: end.outcome,
                error: end.error,
                fallback_path: served
                    .attempts
                    .iter()
                    .map(|a| format!("{}/{}", a.provider, a.model))
                    .collect(),
                estimated: end.estimated,
                cache_hit: end.cache_hit,
            })
            .await;
    }

    /// Takes the caller's rate limits and budgets for a call that may use
    /// `tokens` (prompt estimate plus `max_tokens`), before any target is tried.
    async fn reserve(&self, caller: &Caller, route: &Route, tokens: u64) -> Result<Reservation, AiError> {
        let inner = &self.inner;
        let mut held = Reservation::none(inner.tasks.clone());
        if inner.caller_rpm > 0 || inner.caller_tpm > 0 {
            let scope = if caller.api_key.is_empty() {
                format!("caller {}", caller.subject)
            } else {
                format!("api key {}", caller.api_key)
            };
            let limit = Limit {
                scope,
                requests_per_minute: inner.caller_rpm,
                tokens_per_minute: inner.caller_tpm,
            };
            if let Err(refused) = held
                .take_limits(&inner.state, &[limit], tokens)
                .await
                .map_err(|e| AiError::Limits(e.to_string()))?
            {
                return Err(AiError::RateLimited {
                    reason: refused.reason,
                    retry_after: refused.retry_after,
                });
            }
        }
        let budgets = inner.budgets.iter().filter(|b| {
            b.tenant
                .as_ref()
                .is_some_and(|t| !caller.tenant.is_empty() && *t == caller.tenant)
                || b.api_key
                    .as_ref()
                    .is_some_and(|k| !caller.api_key.is_empty() && *k == caller.api_key)
        });
        for budget in budgets {
            // The most this call could cost: all of `tokens` at the dearest
            // target's output price (output is the dearer side at every
            // provider we know).
            let worst = Usage {
                output_tokens: tokens,
                ..Usage::default()
            };
            let mut most = 0;
            for t in &route.targets {
                let cost = inner.prices.cost(&t.provider, &t.model, &worst);
                if !cost.priced {
                    return Err(AiError::Unpriced(format!(
                        "a budget applies to this caller but target {} of model {:?} has no price; add it to [[ai.prices]]",
                        t.label(),
                        route.name
                    )));
                }
                most = most.max(cost.nanos);
            }
            let (scope, query) = match (&budget.tenant, &budget.api_key) {
                (Some(t), _) => (
                    format!("tenant {t}"),
                    UsageQuery {
                        tenant: t.clone(),
                        ..UsageQuery::default()
                    },
                ),
                (None, k) => (
                    format!("api key {}", k.clone().unwrap_or_default()),
                    UsageQuery {
                        api_key: k.clone().unwrap_or_default(),
                        ..UsageQuery::default()
                    },
                ),
            };
            let usage = inner.usage.clone();
            let spent_before = async move |start_ms: i64| -> Result<i64, AiError> {
                let q = UsageQuery {
                    start_ms,
                    end_ms: i64::MAX,
                    ..query
                };
                Ok(usage.summarize(&q).await?.first().map_or(0, |s| s.cost_nanos))
            };
            if let Err(refused) = held
                .take_budget(&inner.state, budget, &scope, most, spent_before)
                .await?
            {
                return Err(AiError::BudgetExceeded {
                    reason: refused.reason,
                    retry_after: refused.retry_after,
                });
            }
        }
        Ok(held)
    }

    /// A fallback's result. On failure the reservation is given back and,
    /// unless the caller made the mistake, the failure is recorded.
    async fn settle<T>(
        &self,
        call: &Call<'_>,
        held: &mut Reservation,
        result: Fallback<T>,
    ) -> Result<(Arc<Target>, T, Vec<Attempt>), AiError> {
        let (error, attempts) = match result {
            Ok(ok) => return Ok(ok),
            Err(failed) => failed,
        };
        held.give_back().await;
        if !matches!(error, AiError::UnknownModel(_) | AiError::Invalid(_)) {
            let served = Served {
                id: call_id(),
                model: call.model.to_owned(),
                provider: String::new(),
                kind: "",
                provider_model: String::new(),
                attempts,
            };
            self.record(call, &served, Ending::failed(error.to_string())).await;
        }
        Err(error)
    }

    /// Prices and records a whole answer from `target`.
    async fn answered(&self, call: &Call<'_>, target: &Target, attempts: Vec<Attempt>, usage: Usage) -> (Served, Cost) {
        let cost = self.inner.prices.cost(&target.provider, &target.model, &usage);
        let served = served(call_id(), call.model, target, attempts);
        self.record(call, &served, Ending::answered(usage, cost)).await;
        (served, cost)
    }
}

/// One call, for its usage record.
struct Call<'a> {
    caller: &'a Caller,
    operation: &'static str,
    model: &'a str,
    started: Instant,
}

/// How a call ended.
struct Ending {
    usage: Usage,
    cost: Cost,
    outcome: Outcome,
    error: String,
    estimated: bool,
    cache_hit: bool,
}

impl Ending {
    fn answered(usage: Usage, cost: Cost) -> Self {
        Self {
            usage,
            cost,
            outcome: Outcome::Success,
            error: String::new(),
            estimated: false,
            cache_hit: false,
        }
    }

    fn failed(error: String) -> Self {
        Self {
            outcome: Outcome::Failure,
            error,
            ..Self::answered(Usage::default(), Cost::default())
        }
    }
}

fn call_id() -> String {
    format!("gen-{}", uuid::Uuid::now_v7().simple())
}

fn served(id: String, model: &str, target: &Target, attempts: Vec<Attempt>) -> Served {
    Served {
        id,
        model: model.to_owned(),
        provider: target.provider.clone(),
        kind: target.kind.semconv_name(),
        provider_model: target.model.clone(),
        attempts,
    }
}

/// Tries `route`'s targets in plan order until one answers; skips open
/// and cooling-down targets; stops at the first error that another target
/// would repeat (the caller's own mistake).
async fn fallback<T, F>(
    route: &Route,
    state: &SharedStateRef,
    held: &mut Reservation,
    tokens: u64,
    mut call: impl FnMut(Arc<Target>) -> F,
) -> Fallback<T>
where
    F: Future<Output = Result<T, ProviderError>> + Send,
{
    let mut attempts = Vec::new();
    let mut last: Option<ProviderError> = None;
    let mut soonest: Option<Duration> = None;
    let mut cooling = false;
    for target in route.plan() {
        if let Err(skip) = target.admit() {
            cooling |= matches!(skip, Skip::CoolingDown(_));
            let d = skip.retry_after();
            soonest = Some(soonest.map_or(d, |s| s.min(d)));
            attempts.push(Attempt {
                provider: target.provider.clone(),
                model: target.model.clone(),
                error: skip.to_string(),
                skipped: true,
            });
            continue;
        }
        if let Some(limit) = &target.limit {
            let taken = held
                .take_limits(state, std::slice::from_ref(limit), tokens)
                .await
                .map_err(|e| (AiError::Limits(e.to_string()), attempts.clone()))?;
            if let Err(refused) = taken {
                // Not called: the breaker slot admit() took is handed back unused.
                target.report(true, None);
                cooling = true;
                soonest = Some(soonest.map_or(refused.retry_after, |s| s.min(refused.retry_after)));
                attempts.push(Attempt {
                    provider: target.provider.clone(),
                    model: target.model.clone(),
                    error: refused.reason,
                    skipped: true,
                });
                continue;
            }
        }
        match call(target.clone()).await {
            Ok(value) => {
                target.report(true, None);
                return Ok((target, value, attempts));
            }
            Err(e) => {
                if e.already_reported() {
                    target.release();
                } else {
                    target.report(!e.counts_against_target(), e.retry_after());
                }
                if let Some(d) = e.retry_after() {
                    soonest = Some(soonest.map_or(d, |s| s.min(d)));
                }
                tracing::warn!(
                    model = %route.name,
                    target = %target.label(),
                    error = %e,
                    retryable = e.retryable(),
                    "ai target failed"
                );
                if let ProviderError::Invalid { field, reason } = e.origin() {
                    return Err((AiError::invalid(field.clone(), reason.clone()), attempts));
                }
                attempts.push(Attempt {
                    provider: target.provider.clone(),
                    model: target.model.clone(),
                    error: e.to_string(),
                    skipped: false,
                });
                let retryable = e.retryable();
                last = Some(e);
                if !retryable {
                    break;
                }
            }
        }
    }
    let summary = attempts
        .iter()
        .map(|a| format!("{}/{}: {}", a.provider, a.model, a.error))
        .collect::<Vec<_>>()
        .join("; ");
    // Rate limited: the last call was refused with 429, or no call was made
    // and some target is cooling down after a provider's Retry-After.
    let rate_limited = match &last {
        Some(e) => matches!(e.origin(), ProviderError::Status { status: 429, .. }),
        None => cooling,
    };
    Err((
        AiError::Exhausted {
            model: route.name.clone(),
            summary,
            rate_limited,
            retry_after: soonest,
        },
        attempts,
    ))
}

/// Reads one upstream stream for one caller.
struct Pump {
    ai: Ai,
    caller: Caller,
    served: Served,
    target: Arc<Target>,
    prompt_estimate: u64,
    started: Instant,
    held: Reservation,
}

impl Pump {
    async fn run(
        self,
        mut upstream: EventStream,
        first: StreamEvent,
        sender: mpsc::Sender<Result<StreamItem, AiError>>,
    ) -> Result<(), AiError> {
        let mut seen = Accumulator::default();
        let mut next: Option<Result<StreamEvent, ProviderError>> = Some(Ok(first));
        let (outcome, error) = loop {
            match next {
                None => break (Outcome::Success, String::new()),
                Some(Ok(event)) => {
                    seen.push(&event);
                    if !matches!(event, StreamEvent::Usage(_))
                        && sender.send(Ok(StreamItem::Event(event))).await.is_err()
                    {
                        break (Outcome::Cancelled, String::new());
                    }
                }
                Some(Err(e)) => {
                    self.target.report(!e.counts_against_target(), e.retry_after());
                    tracing::warn!(target = %self.target.label(), error = %e, "ai stream broke after its first event");
                    let _ = sender.send(Err(AiError::StreamBroken(e.to_string()))).await;
                    break (Outcome::Failure, e.to_string());
                }
            }
            next = tokio::select! {
                item = upstream.next() => item,
                () = sender.closed() => {
                    break (Outcome::Cancelled, String::new());
                }
            };
        };
        drop(upstream);
        let answer = seen.finish();
        let mut usage = answer.usage;
        let mut estimated = false;
        if usage.input_tokens == 0 {
            usage.input_tokens = self.prompt_estimate;
            estimated = true;
        }
        if usage.output_tokens == 0 {
            let produced = tokens::of_text(&answer.text)
                + tokens::of_text(&answer.reasoning)
                + answer
                    .tool_calls
                    .iter()
                    .map(|c| tokens::of_text(&c.name) + tokens::of_text(&c.arguments))
                    .sum::<u64>();
            if produced > 0 {
                usage.output_tokens = produced;
                estimated = true;
            }
        }
        let cost = self
            .ai
            .inner
            .prices
            .cost(&self.target.provider, &self.target.model, &usage);
        self.held.settle(usage.total(), cost.nanos).await;
        if outcome == Outcome::Success {
            let _ = sender.send(Ok(StreamItem::Done { usage, cost })).await;
        }
        let call = Call {
            caller: &self.caller,
            operation: "generate_stream",
            model: &self.served.model,
            started: self.started,
        };
        let end = Ending {
            usage,
            cost,
            outcome,
            error,
            estimated,
            cache_hit: false,
        };
        self.ai.record(&call, &self.served, end).await;
        Ok(())
    }
}
