//! Provider adapters: each speaks one upstream wire format and translates
//! both ways between it and [`crate::model`], streaming included. They share
//! one HTTP client (connection pooling), one error type whose
//! [`ProviderError::retryable`] drives fallback, and one SSE decoder.

pub mod anthropic;
pub mod gemini;
pub mod openai;
pub mod sse;

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use plinth_runtime::error::chain;
use plinth_runtime::secrets::{SecretRef, SecretSource};
use secrecy::{ExposeSecret, SecretString};

use crate::model::{ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, StreamEvent};
use sse::{SseDecoder, SseEvent};

/// A stream of answer steps from one provider.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// What an upstream call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The provider answered with an HTTP error.
    #[error("upstream answered {status} {kind}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The provider's error type or status (`overloaded_error`, `RESOURCE_EXHAUSTED`).
        kind: String,
        /// The provider's message.
        message: String,
        /// The provider's `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// The provider reported an error inside a stream that began with HTTP 200.
    #[error("upstream stream failed with {kind}: {message}")]
    Stream {
        /// The provider's error type.
        kind: String,
        /// The provider's message.
        message: String,
    },
    /// No connection, or it broke.
    #[error("upstream connection failed: {0}")]
    Connect(String),
    /// No answer (or no next chunk) within the timeout.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer does not parse as the provider's format.
    #[error("upstream answer is malformed: {0}")]
    Malformed(String),
    /// This provider cannot do what was asked (embeddings on Anthropic).
    #[error("{0}")]
    Unsupported(String),
    /// The provider's API key is a config secret that is not available
    /// (not set, not a secret value, or not loaded yet); nothing was sent.
    #[error("the API key secret {0} is not available from the config service")]
    MissingKey(String),
    /// The request cannot be expressed in this provider's format; the
    /// caller's mistake, named by field.
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The failure of one upstream request that several callers shared
    /// (coalesced embeddings), as seen by all but the first of them: it
    /// was reported to the target's circuit breaker once, for everyone.
    #[error("{0}")]
    Shared(Box<ProviderError>),
}

impl ProviderError {
    /// The failure itself, unwrapped from [`ProviderError::Shared`].
    pub fn origin(&self) -> &ProviderError {
        match self {
            ProviderError::Shared(e) => e.origin(),
            e => e,
        }
    }

    /// Whether this caller must not report the failure to the target's
    /// breaker again (another caller of the same request did).
    pub fn already_reported(&self) -> bool {
        matches!(self, ProviderError::Shared(_))
    }

    /// Whether another target may succeed where this one failed: rate
    /// limits, overload, server errors, timeouts and broken connections.
    pub fn retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
            ProviderError::Stream { .. }
            | ProviderError::Connect(_)
            | ProviderError::Timeout(_)
            | ProviderError::Malformed(_)
            | ProviderError::Unsupported(_)
            | ProviderError::MissingKey(_) => true,
            ProviderError::Invalid { .. } => false,
            ProviderError::Shared(e) => e.retryable(),
        }
    }

    /// Whether the failure says something about the target's health (for
    /// its circuit breaker): not a refusal of this particular request.
    pub fn counts_against_target(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 429 || *status >= 500 || *status == 408,
            ProviderError::Stream { .. }
            | ProviderError::Connect(_)
            | ProviderError::Timeout(_)
            | ProviderError::Malformed(_) => true,
            ProviderError::Unsupported(_) | ProviderError::MissingKey(_) | ProviderError::Invalid { .. } => false,
            ProviderError::Shared(e) => e.counts_against_target(),
        }
    }

    /// The provider's `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            ProviderError::Shared(e) => e.retry_after(),
            _ => None,
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ProviderError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Which wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI Chat Completions and Embeddings.
    OpenAi,
    /// Azure OpenAI: OpenAI's format at deployment URLs with `api-key`.
    Azure,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini generateContent (AI Studio).
    Gemini,
}

impl ProviderKind {
    /// The name used in configuration, usage records and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    /// The OpenTelemetry GenAI `gen_ai.provider.name`.
    pub fn semconv_name(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Azure => "azure.ai.openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gcp.gemini",
        }
    }

    /// Parses a configuration name; `custom` and `openai-compatible` are
    /// OpenAI's format at another base URL.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "openai" | "custom" | "openai-compatible" => Some(ProviderKind::OpenAi),
            "azure" | "azure-openai" => Some(ProviderKind::Azure),
            "anthropic" => Some(ProviderKind::Anthropic),
            "gemini" | "google" => Some(ProviderKind::Gemini),
            _ => None,
        }
    }

    /// The public API's base URL.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("https://api.openai.com/v1"),
            ProviderKind::Azure => None,
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            ProviderKind::Gemini => Some("https://generativelanguage.googleapis.com"),
        }
    }
}

/// Where a provider account's API key comes from.
#[derive(Clone, Default)]
pub enum ApiKey {
    /// None: local endpoints that need no key.
    #[default]
    None,
    /// Given in the settings (or read from a file at start).
    Fixed(SecretString),
    /// A config service secret, read from its live copy on every request,
    /// so a rotation applies to the next call.
    Secret {
        /// The secret's address.
        at: SecretRef,
        /// The live copy.
        source: Arc<dyn SecretSource>,
    },
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiKey::None => f.write_str("none"),
            ApiKey::Fixed(_) => f.write_str("[redacted]"),
            ApiKey::Secret { at, .. } => write!(f, "config secret {at}"),
        }
    }
}

/// Where and how to reach one provider account.
#[derive(Clone)]
pub struct Endpoint {
    /// Base URL without a trailing slash (`https://api.openai.com/v1`,
    /// `https://api.anthropic.com`, `https://{resource}.openai.azure.com`).
    pub base_url: String,
    /// The API key.
    pub api_key: ApiKey,
    /// Azure's `api-version`.
    pub api_version: Option<String>,
    /// How long to wait for the response headers, and then for each chunk.
    pub timeout: Duration,
    /// The shared HTTP client.
    pub client: reqwest::Client,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key)
            .field("api_version", &self.api_version)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Endpoint {
    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url.trim_end_matches('/'), path)
    }

    /// `use_key` with the key to send now (`None` for endpoints that need
    /// none); a key from the settings is lent, not copied.
    pub fn with_key<T>(&self, use_key: impl FnOnce(Option<&str>) -> T) -> Result<T, ProviderError> {
        match &self.api_key {
            ApiKey::None => Ok(use_key(None)),
            ApiKey::Fixed(k) => Ok(use_key(Some(k.expose_secret()))),
            ApiKey::Secret { at, source } => {
                let key = source
                    .secret(at)
                    .ok_or_else(|| ProviderError::MissingKey(at.to_string()))?;
                Ok(use_key(Some(key.expose_secret())))
            }
        }
    }

    /// Sends `request` and waits for the response headers; an HTTP error
    /// status becomes [`ProviderError::Status`] through `parse_error`.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
        parse_error: fn(&[u8]) -> (String, String),
    ) -> Result<reqwest::Response, ProviderError> {
        let response = tokio::time::timeout(self.timeout, request.send())
            .await
            .map_err(|_| ProviderError::Timeout(self.timeout))?
            .map_err(|e| ProviderError::Connect(chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after(response.headers());
        let body = tokio::time::timeout(self.timeout, response.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let (kind, message) = parse_error(&body);
        let retry_after = retry_after.or_else(|| retry_delay_in_body(&body));
        Err(ProviderError::Status {
            status: status.as_u16(),
            kind,
            message,
            retry_after,
        })
    }

    /// Sends `request` and decodes the JSON body.
    pub async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        parse_error: fn(&[u8]) -> (String, String),
    ) -> Result<T, ProviderError> {
        let response = self.send(request, parse_error).await?;
        let body = tokio::time::timeout(self.timeout, response.bytes())
            .await
            .map_err(|_| ProviderError::Timeout(self.timeout))?
            .map_err(|e| ProviderError::Connect(chain(&e)))?;
        serde_json::from_slice(&body).map_err(|e| ProviderError::Malformed(e.to_string()))
    }
}

/// One adapter per wire format.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + fmt::Debug {
    /// Its wire format.
    fn kind(&self) -> ProviderKind;
    /// One whole answer.
    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError>;
    /// A streamed answer. Errors before the first event (HTTP status,
    /// connection) come back here; later ones inside the stream.
    async fn chat_stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError>;
    /// Embeddings.
    async fn embed(&self, request: &EmbedRequest) -> Result<EmbedResponse, ProviderError>;
}

/// Builds the adapter for `kind` at `endpoint`.
pub fn adapter(kind: ProviderKind, endpoint: Endpoint) -> Box<dyn Provider> {
    match kind {
        ProviderKind::OpenAi => Box::new(openai::OpenAi::new(endpoint, false)),
        ProviderKind::Azure => Box::new(openai::OpenAi::new(endpoint, true)),
        ProviderKind::Anthropic => Box::new(anthropic::Anthropic::new(endpoint)),
        ProviderKind::Gemini => Box::new(gemini::Gemini::new(endpoint)),
    }
}

/// Turns one provider's SSE events into [`StreamEvent`]s.
pub trait Translator: Send + 'static {
    /// One SSE event.
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<StreamEvent>, ProviderError>;
    /// The body ended; `Err` when it ended where the format says it must not.
    fn on_end(&mut self) -> Result<Vec<StreamEvent>, ProviderError>;
}

/// Reads `response` as server-sent events through `translator`, with
/// `idle` as the longest wait for the next chunk. Events already decoded
/// are delivered before an error that follows them; nothing after it.
pub fn sse_stream(response: reqwest::Response, translator: impl Translator, idle: Duration) -> EventStream {
    struct State<T> {
        body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
        decoder: SseDecoder,
        translator: T,
        pending: VecDeque<Result<StreamEvent, ProviderError>>,
        done: bool,
    }
    impl<T: Translator> State<T> {
        fn translate(&mut self, events: Vec<SseEvent>) {
            for event in events {
                match self.translator.on_event(&event) {
                    Ok(out) => self.pending.extend(out.into_iter().map(Ok)),
                    Err(e) => {
                        self.fail(e);
                        return;
                    }
                }
            }
        }
        fn fail(&mut self, e: ProviderError) {
            self.pending.push_back(Err(e));
            self.done = true;
        }
    }
    let state = State {
        body: Box::pin(response.bytes_stream()),
        decoder: SseDecoder::default(),
        translator,
        pending: VecDeque::new(),
        done: false,
    };
    Box::pin(futures::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(item) = s.pending.pop_front() {
                return Some((item, s));
            }
            if s.done {
                return None;
            }
            match tokio::time::timeout(idle, s.body.next()).await {
                Err(_) => s.fail(ProviderError::Timeout(idle)),
                Ok(Some(Err(e))) => s.fail(ProviderError::Connect(chain(&e))),
                Ok(Some(Ok(chunk))) => {
                    let events = s.decoder.push(&chunk);
                    s.translate(events);
                }
                Ok(None) => {
                    let events = s.decoder.finish();
                    s.translate(events);
                    if !s.done {
                        match s.translator.on_end() {
                            Ok(out) => s.pending.extend(out.into_iter().map(Ok)),
                            Err(e) => s.pending.push_back(Err(e)),
                        }
                        s.done = true;
                    }
                }
            }
        }
    }))
}

/// The `Retry-After` (seconds or an HTTP date) or OpenAI's `retry-after-ms`.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Google's `google.rpc.RetryInfo` in an error body
/// (`error.details[].retryDelay`, e.g. `"17s"`): Gemini says when to retry
/// there rather than in a `Retry-After` header.
pub fn retry_delay_in_body(body: &[u8]) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["details"].as_array()?.iter().find_map(|d| {
        let is_retry_info = d["@type"].as_str().is_some_and(|t| t.ends_with("google.rpc.RetryInfo"));
        let secs = d["retryDelay"].as_str()?.strip_suffix('s')?.parse::<f64>().ok()?;
        (is_retry_info && secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    })
}

/// Tool arguments (JSON text) as an object, for providers that want one.
/// Empty text is `{}`; anything but a JSON object is the caller's error.
pub fn arguments_object(arguments: &str, field: &str) -> Result<serde_json::Value, ProviderError> {
    if arguments.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    match serde_json::from_str::<serde_json::Value>(arguments) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(ProviderError::invalid(
            field,
            "tool call arguments must be a JSON object",
        )),
        Err(e) => Err(ProviderError::invalid(
            field,
            format!("tool call arguments are not valid JSON: {e}"),
        )),
    }
}
