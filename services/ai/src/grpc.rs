//! The gRPC face of the ai service: decode and validate into
//! [`crate::model`] values (naming the offending field), call [`Ai`],
//! encode.

use std::pin::Pin;

use base64::Engine;
use futures::Stream;
use serde_json::Value;
use tonic::{Request, Response, Status};

use plinth::ai::v1 as pb;
use plinth::ai::v1::ai_service_server::AiService;
use plinth_runtime::auth::{Principal, unix_now_ms};
use plinth_runtime::error::{FieldViolation, InvalidRequest, to_status};
use plinth_runtime::wire::{duration, json_of_struct, timestamp_ms};

use crate::cache::CachePolicy;
use crate::error::AiError;
use crate::model::{
    ChatRequest, EmbedRequest, FinishReason, Image, Message, Part, Reasoning, ReasoningEffort, ResponseFormat, Role,
    StreamEvent, Tool, ToolCall, ToolChoice,
};
use crate::service::{Ai, Attempt, Caller, Served, StreamItem};
use crate::usage::{Dimension, UsageQuery, UsageSum, usage_pb};

/// Most messages in one request.
pub const MAX_MESSAGES: usize = 1000;
/// Most tools in one request.
pub const MAX_TOOLS: usize = 128;
/// Most inputs of one `Embed`.
pub const MAX_INPUTS: usize = 2048;
/// Most stop sequences.
pub const MAX_STOP: usize = 4;

fn status(e: AiError) -> Status {
    to_status(&e)
}

/// The ai service over gRPC.
#[derive(Clone, Debug)]
pub struct AiGrpc {
    ai: Ai,
}

impl AiGrpc {
    /// Serves `ai`.
    pub fn new(ai: Ai) -> Self {
        Self { ai }
    }
}

fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Principal>()
        .map(|p| Caller {
            tenant: p.tenant.clone(),
            subject: p.subject.clone(),
            api_key: p.api_key.clone().unwrap_or_default(),
        })
        .unwrap_or_else(|| Caller {
            subject: "anonymous".into(),
            ..Caller::default()
        })
}

fn role(n: i32) -> Option<Role> {
    match pb::Role::try_from(n).ok()? {
        pb::Role::Unspecified => None,
        pb::Role::System => Some(Role::System),
        pb::Role::Developer => Some(Role::Developer),
        pb::Role::User => Some(Role::User),
        pb::Role::Assistant => Some(Role::Assistant),
        pb::Role::Tool => Some(Role::Tool),
    }
}

/// Integral numbers back to integers: a `Struct` carries every number as a
/// double, and schemas say `"maxItems": 3`, not `3.0`.
fn integral(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(integral).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, integral(v))).collect()),
        other => other,
    }
}

fn schema(field: &str, s: Option<&prost_types::Struct>, out: &mut Vec<FieldViolation>) -> Value {
    match s {
        None => serde_json::json!({"type": "object", "properties": {}}),
        Some(s) => match json_of_struct(field, s) {
            Ok(o) => integral(Value::Object(o)),
            Err(bad) => {
                out.extend(bad.0);
                Value::Null
            }
        },
    }
}

fn valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn messages(list: &[pb::Message], out: &mut Vec<FieldViolation>) -> Vec<Message> {
    let mut result = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Some(role) = role(m.role) else {
            out.push(FieldViolation::new(
                format!("{at}.role"),
                "must be one of SYSTEM, DEVELOPER, USER, ASSISTANT, TOOL",
            ));
            continue;
        };
        let mut content = Vec::with_capacity(m.content.len());
        for (j, p) in m.content.iter().enumerate() {
            let pf = format!("{at}.content[{j}]");
            match &p.part {
                Some(pb::content_part::Part::Text(t)) => content.push(Part::Text(t.clone())),
                Some(pb::content_part::Part::Image(img)) => {
                    if role != Role::User {
                        out.push(FieldViolation::new(&pf, "images are allowed in user messages only"));
                    }
                    match &img.source {
                        Some(pb::image_input::Source::Url(u)) => {
                            if !(u.starts_with("https://") || u.starts_with("http://") || u.starts_with("data:")) {
                                out.push(FieldViolation::new(
                                    format!("{pf}.image.url"),
                                    "must be an http(s) or data: URL",
                                ));
                            }
                            content.push(Part::Image(Image::from_url(u)));
                        }
                        Some(pb::image_input::Source::Data(bytes)) => {
                            if !img.media_type.starts_with("image/") {
                                out.push(FieldViolation::new(
                                    format!("{pf}.image.media_type"),
                                    "is required with data and must be an image/* type",
                                ));
                            }
                            content.push(Part::Image(Image::Inline {
                                media_type: img.media_type.clone(),
                                base64: base64::engine::general_purpose::STANDARD.encode(bytes),
                            }));
                        }
                        None => out.push(FieldViolation::new(format!("{pf}.image"), "needs a url or data")),
                    }
                }
                Some(pb::content_part::Part::Reasoning(b)) => {
                    if role != Role::Assistant {
                        out.push(FieldViolation::new(
                            &pf,
                            "reasoning is allowed in assistant messages only",
                        ));
                    }
                    content.push(Part::Reasoning(Reasoning {
                        text: b.text.clone(),
                        signature: (!b.signature.is_empty()).then(|| b.signature.clone()),
                        redacted: (!b.redacted.is_empty()).then(|| b.redacted.clone()),
                    }));
                }
                Some(pb::content_part::Part::CachePoint(_)) => content.push(Part::CachePoint),
                None => out.push(FieldViolation::new(
                    &pf,
                    "needs text, an image, reasoning or a cache point",
                )),
            }
        }
        let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
        for (j, c) in m.tool_calls.iter().enumerate() {
            let cf = format!("{at}.tool_calls[{j}]");
            if role != Role::Assistant {
                out.push(FieldViolation::new(&cf, "only assistant messages carry tool calls"));
            }
            if c.id.is_empty() {
                out.push(FieldViolation::new(format!("{cf}.id"), "is required"));
            }
            if !valid_tool_name(&c.name) {
                out.push(FieldViolation::new(
                    format!("{cf}.name"),
                    "must be 1-64 letters, digits, _ or -",
                ));
            }
            tool_calls.push(ToolCall {
                id: c.id.clone(),
                name: c.name.clone(),
                arguments: c.arguments.clone(),
                thought_signature: (!c.thought_signature.is_empty()).then(|| c.thought_signature.clone()),
            });
        }
        if role == Role::Tool && m.tool_call_id.is_empty() {
            out.push(FieldViolation::new(
                format!("{at}.tool_call_id"),
                "is required on tool messages",
            ));
        }
        if content.is_empty() && tool_calls.is_empty() && role != Role::Tool {
            out.push(FieldViolation::new(format!("{at}.content"), "must not be empty"));
        }
        result.push(Message {
            role,
            content,
            tool_calls,
            tool_call_id: (!m.tool_call_id.is_empty()).then(|| m.tool_call_id.clone()),
            name: (!m.name.is_empty()).then(|| m.name.clone()),
        });
    }
    result
}

fn tools(list: &[pb::Tool], out: &mut Vec<FieldViolation>) -> Vec<Tool> {
    if list.len() > MAX_TOOLS {
        out.push(FieldViolation::new("tools", format!("at most {MAX_TOOLS} tools")));
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            if !valid_tool_name(&t.name) {
                out.push(FieldViolation::new(
                    format!("tools[{i}].name"),
                    "must be 1-64 letters, digits, _ or -",
                ));
            }
            Tool {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: schema(&format!("tools[{i}].parameters"), t.parameters.as_ref(), out),
            }
        })
        .collect()
}

/// A wire request as a validated [`ChatRequest`] (model name left empty for the router).
pub fn chat_request(r: &pb::GenerateRequest) -> Result<ChatRequest, InvalidRequest> {
    let mut out = Vec::new();
    if r.model.is_empty() {
        out.push(FieldViolation::new("model", "is required"));
    }
    if r.messages.is_empty() {
        out.push(FieldViolation::new("messages", "must hold at least one message"));
    } else if r.messages.len() > MAX_MESSAGES {
        out.push(FieldViolation::new(
            "messages",
            format!("at most {MAX_MESSAGES} messages"),
        ));
    }
    let msgs = messages(&r.messages, &mut out);
    let tool_list = tools(&r.tools, &mut out);
    let tool_choice = match r.tool_choice.as_ref().and_then(|c| c.choice.as_ref()) {
        None => ToolChoice::Unset,
        Some(pb::tool_choice::Choice::Mode(m)) => match pb::ToolChoiceMode::try_from(*m) {
            Ok(pb::ToolChoiceMode::Unspecified) => ToolChoice::Unset,
            Ok(pb::ToolChoiceMode::Auto) => ToolChoice::Auto,
            Ok(pb::ToolChoiceMode::None) => ToolChoice::None,
            Ok(pb::ToolChoiceMode::Required) => ToolChoice::Required,
            Err(_) => {
                out.push(FieldViolation::new("tool_choice.mode", "is not a known mode"));
                ToolChoice::Unset
            }
        },
        Some(pb::tool_choice::Choice::Function(name)) => {
            if !tool_list.iter().any(|t| &t.name == name) {
                out.push(FieldViolation::new(
                    "tool_choice.function",
                    "must name one of the tools",
                ));
            }
            ToolChoice::Function(name.clone())
        }
    };
    if matches!(tool_choice, ToolChoice::Required) && tool_list.is_empty() {
        out.push(FieldViolation::new("tool_choice", "REQUIRED needs at least one tool"));
    }
    let response_format = match &r.response_format {
        None => ResponseFormat::Text,
        Some(f) => match pb::ResponseFormatType::try_from(f.r#type) {
            Ok(pb::ResponseFormatType::Unspecified) => ResponseFormat::Text,
            Ok(pb::ResponseFormatType::JsonObject) => ResponseFormat::JsonObject,
            Ok(pb::ResponseFormatType::JsonSchema) => {
                if f.schema.is_none() {
                    out.push(FieldViolation::new(
                        "response_format.schema",
                        "is required for JSON_SCHEMA",
                    ));
                }
                ResponseFormat::JsonSchema {
                    name: if f.schema_name.is_empty() {
                        "response".into()
                    } else {
                        f.schema_name.clone()
                    },
                    schema: schema("response_format.schema", f.schema.as_ref(), &mut out),
                    strict: f.strict,
                }
            }
            Err(_) => {
                out.push(FieldViolation::new("response_format.type", "is not a known type"));
                ResponseFormat::Text
            }
        },
    };
    if let Some(t) = r.temperature
        && !(0.0..=2.0).contains(&t)
    {
        out.push(FieldViolation::new("temperature", "must be between 0 and 2"));
    }
    if let Some(p) = r.top_p
        && !(0.0..=1.0).contains(&p)
    {
        out.push(FieldViolation::new("top_p", "must be between 0 and 1"));
    }
    if let Some(m) = r.max_tokens
        && !(1..=1_000_000).contains(&m)
    {
        out.push(FieldViolation::new("max_tokens", "must be between 1 and 1,000,000"));
    }
    if r.stop.len() > MAX_STOP {
        out.push(FieldViolation::new(
            "stop",
            format!("at most {MAX_STOP} stop sequences"),
        ));
    }
    if r.stop.iter().any(String::is_empty) {
        out.push(FieldViolation::new("stop", "stop sequences must not be empty"));
    }
    let reasoning_effort = match pb::ReasoningEffort::try_from(r.reasoning_effort) {
        Ok(pb::ReasoningEffort::Unspecified) => None,
        Ok(pb::ReasoningEffort::Low) => Some(ReasoningEffort::Low),
        Ok(pb::ReasoningEffort::Medium) => Some(ReasoningEffort::Medium),
        Ok(pb::ReasoningEffort::High) => Some(ReasoningEffort::High),
        Err(_) => {
            out.push(FieldViolation::new("reasoning_effort", "is not a known effort"));
            None
        }
    };
    if !out.is_empty() {
        return Err(InvalidRequest(out));
    }
    Ok(ChatRequest {
        model: String::new(),
        messages: msgs,
        tools: tool_list,
        tool_choice,
        parallel_tool_calls: r.parallel_tool_calls,
        response_format,
        temperature: r.temperature,
        top_p: r.top_p,
        max_tokens: r.max_tokens.and_then(|m| u32::try_from(m).ok()),
        stop: r.stop.clone(),
        user: (!r.user.is_empty()).then(|| r.user.clone()),
        reasoning_effort,
    })
}

fn finish_pb(f: FinishReason) -> i32 {
    (match f {
        FinishReason::Unspecified => pb::FinishReason::Unspecified,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::ToolCalls => pb::FinishReason::ToolCalls,
        FinishReason::ContentFilter => pb::FinishReason::ContentFilter,
        FinishReason::Paused => pb::FinishReason::Paused,
        FinishReason::Error => pb::FinishReason::Error,
    }) as i32
}

fn attempts_pb(attempts: &[Attempt]) -> Vec<pb::Attempt> {
    attempts
        .iter()
        .map(|a| pb::Attempt {
            provider: a.provider.clone(),
            model: a.model.clone(),
            error: a.error.clone(),
            skipped: a.skipped,
        })
        .collect()
}

fn first_stream_message(served: &Served) -> pb::GenerateStreamResponse {
    pb::GenerateStreamResponse {
        id: served.id.clone(),
        provider: served.provider.clone(),
        provider_model: served.provider_model.clone(),
        attempts: attempts_pb(&served.attempts),
        ..Default::default()
    }
}

fn stream_message(id: &str, item: StreamItem) -> pb::GenerateStreamResponse {
    let mut m = pb::GenerateStreamResponse {
        id: id.to_owned(),
        ..Default::default()
    };
    match item {
        StreamItem::Event(StreamEvent::Text(t)) => m.text = t,
        StreamItem::Event(StreamEvent::Reasoning(t)) => m.reasoning = t,
        StreamItem::Event(StreamEvent::ReasoningSignature(s)) => m.reasoning_signature = s,
        StreamItem::Event(StreamEvent::RedactedReasoning(d)) => m.redacted_reasoning = d,
        StreamItem::Event(StreamEvent::ToolCallStart {
            index,
            id,
            name,
            thought_signature,
        }) => m.tool_calls.push(pb::ToolCallDelta {
            index: i32::try_from(index).unwrap_or(i32::MAX),
            id,
            name,
            arguments: String::new(),
            thought_signature: thought_signature.unwrap_or_default(),
        }),
        StreamItem::Event(StreamEvent::ToolCallArguments { index, fragment }) => m.tool_calls.push(pb::ToolCallDelta {
            index: i32::try_from(index).unwrap_or(i32::MAX),
            arguments: fragment,
            ..Default::default()
        }),
        StreamItem::Event(StreamEvent::Finish(f)) => m.finish_reason = finish_pb(f),
        StreamItem::Event(StreamEvent::Usage(u)) => m.usage = Some(usage_pb(&u)),
        StreamItem::Done { usage, cost } => {
            m.usage = Some(usage_pb(&usage));
            m.cost_usd = cost.usd();
            m.priced = cost.priced;
        }
    }
    m
}

fn sum_pb(s: &UsageSum) -> pb::UsageRow {
    pb::UsageRow {
        tenant: s.tenant.clone(),
        api_key: s.api_key.clone(),
        model: s.model.clone(),
        provider: s.provider.clone(),
        requests: s.requests,
        failed_requests: s.failed_requests,
        cache_hits: s.cache_hits,
        usage: Some(pb::Usage {
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            cached_input_tokens: s.cached_input_tokens,
            cache_write_tokens: s.cache_write_tokens,
            reasoning_tokens: s.reasoning_tokens,
            total_tokens: s.input_tokens.saturating_add(s.output_tokens),
        }),
        cost_usd: s.cost_nanos as f64 / 1e9,
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AiService for AiGrpc {
    type GenerateStreamStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let chat = chat_request(&r).map_err(|e| status(e.into()))?;
        let policy = match pb::CachePolicy::try_from(r.cache) {
            Ok(pb::CachePolicy::Bypass) => CachePolicy::Bypass,
            Ok(pb::CachePolicy::Use) => CachePolicy::Use,
            Ok(pb::CachePolicy::Unspecified) => CachePolicy::Deterministic,
            Err(_) => return Err(status(AiError::invalid("cache", "is not a known cache policy"))),
        };
        let answer = self
            .ai
            .generate(&caller, &r.model, chat, policy)
            .await
            .map_err(status)?;
        let resp = answer.response;
        let mut content: Vec<pb::ContentPart> = resp
            .reasoning_blocks
            .into_iter()
            .map(|b| pb::ContentPart {
                part: Some(pb::content_part::Part::Reasoning(pb::ReasoningBlock {
                    text: b.text,
                    signature: b.signature.unwrap_or_default(),
                    redacted: b.redacted.unwrap_or_default(),
                })),
            })
            .collect();
        if !resp.text.is_empty() {
            content.push(pb::ContentPart {
                part: Some(pb::content_part::Part::Text(resp.text)),
            });
        }
        Ok(Response::new(pb::GenerateResponse {
            id: answer.served.id,
            model: answer.served.model,
            provider: answer.served.provider,
            provider_model: answer.served.provider_model,
            message: Some(pb::Message {
                role: pb::Role::Assistant as i32,
                content,
                tool_calls: resp
                    .tool_calls
                    .into_iter()
                    .map(|c| pb::ToolCall {
                        id: c.id,
                        name: c.name,
                        arguments: c.arguments,
                        thought_signature: c.thought_signature.unwrap_or_default(),
                    })
                    .collect(),
                tool_call_id: String::new(),
                name: String::new(),
            }),
            reasoning: resp.reasoning,
            finish_reason: finish_pb(resp.finish_reason),
            usage: Some(usage_pb(&resp.usage)),
            cost_usd: answer.cost.usd(),
            priced: answer.cost.priced,
            attempts: attempts_pb(&answer.served.attempts),
            cached: answer.cached,
        }))
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let chat = chat_request(&r).map_err(|e| status(e.into()))?;
        let streaming = self.ai.generate_stream(&caller, &r.model, chat).await.map_err(status)?;
        let first = first_stream_message(&streaming.served);
        let id = streaming.served.id;
        let items = tokio_stream::wrappers::ReceiverStream::new(streaming.items);
        let rest = futures::StreamExt::map(items, move |item| item.map(|i| stream_message(&id, i)).map_err(status));
        let stream = futures::StreamExt::chain(futures::stream::once(async move { Ok(first) }), rest);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let caller = caller(&request);
        let r = request.into_inner();
        let mut out = Vec::new();
        if r.model.is_empty() {
            out.push(FieldViolation::new("model", "is required"));
        }
        if r.inputs.is_empty() || r.inputs.len() > MAX_INPUTS {
            out.push(FieldViolation::new(
                "inputs",
                format!("must hold 1 to {MAX_INPUTS} texts"),
            ));
        }
        if let Some(i) = r.inputs.iter().position(String::is_empty) {
            out.push(FieldViolation::new(format!("inputs[{i}]"), "must not be empty"));
        }
        if let Some(d) = r.dimensions
            && !(1..=65_536).contains(&d)
        {
            out.push(FieldViolation::new("dimensions", "must be between 1 and 65,536"));
        }
        if !out.is_empty() {
            return Err(status(AiError::Invalid(out)));
        }
        let embed = EmbedRequest {
            model: String::new(),
            inputs: r.inputs,
            dimensions: r.dimensions.and_then(|d| u32::try_from(d).ok()),
            user: (!r.user.is_empty()).then_some(r.user),
        };
        let done = self.ai.embed(&caller, &r.model, embed).await.map_err(status)?;
        Ok(Response::new(pb::EmbedResponse {
            id: done.served.id,
            model: done.served.model,
            provider: done.served.provider,
            provider_model: done.served.provider_model,
            embeddings: done
                .response
                .vectors
                .into_iter()
                .map(|values| pb::Embedding { values })
                .collect(),
            usage: Some(usage_pb(&done.response.usage)),
            cost_usd: done.cost.usd(),
            priced: done.cost.priced,
        }))
    }

    async fn count_tokens(
        &self,
        request: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        let r = request.into_inner();
        let mut out = Vec::new();
        if r.model.is_empty() {
            out.push(FieldViolation::new("model", "is required"));
        }
        let chat = ChatRequest {
            messages: messages(&r.messages, &mut out),
            tools: tools(&r.tools, &mut out),
            ..ChatRequest::default()
        };
        if !out.is_empty() {
            return Err(status(AiError::Invalid(out)));
        }
        let n = self.ai.count_tokens(&r.model, &chat).map_err(status)?;
        Ok(Response::new(pb::CountTokensResponse {
            input_tokens: i64::try_from(n).unwrap_or(i64::MAX),
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self
            .ai
            .models()
            .into_iter()
            .map(|m| pb::Model {
                name: m.name,
                targets: m
                    .targets
                    .into_iter()
                    .map(|t| pb::Target {
                        provider: t.provider,
                        kind: t.kind.to_owned(),
                        model: t.model,
                        tier: i32::try_from(t.tier).unwrap_or(i32::MAX),
                        weight: i32::try_from(t.weight).unwrap_or(i32::MAX),
                        breaker: (match t.breaker {
                            plinth_runtime::resilience::BreakerState::Closed => pb::BreakerState::Closed,
                            plinth_runtime::resilience::BreakerState::HalfOpen => pb::BreakerState::HalfOpen,
                            plinth_runtime::resilience::BreakerState::Open => pb::BreakerState::Open,
                        }) as i32,
                        cooling_down: t
                            .cooling_down
                            .map(|d| duration(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_usage(&self, request: Request<pb::GetUsageRequest>) -> Result<Response<pb::GetUsageResponse>, Status> {
        let own_tenant = request
            .extensions()
            .get::<Principal>()
            .map(|p| p.tenant.clone())
            .unwrap_or_default();
        let r = request.into_inner();
        let mut out = Vec::new();
        let start_ms = match &r.start_time {
            Some(t) => timestamp_ms("start_time", t).unwrap_or_else(|bad| {
                out.extend(bad.0);
                0
            }),
            None => 0,
        };
        let end_ms = match &r.end_time {
            Some(t) => timestamp_ms("end_time", t).unwrap_or_else(|bad| {
                out.extend(bad.0);
                0
            }),
            None => unix_now_ms().saturating_add(1),
        };
        if end_ms < start_ms {
            out.push(FieldViolation::new("end_time", "must not be before start_time"));
        }
        let mut group_by = Vec::new();
        for (i, d) in r.group_by.iter().enumerate() {
            let dim = match pb::UsageDimension::try_from(*d) {
                Ok(pb::UsageDimension::Tenant) => Dimension::Tenant,
                Ok(pb::UsageDimension::ApiKey) => Dimension::ApiKey,
                Ok(pb::UsageDimension::Model) => Dimension::Model,
                Ok(pb::UsageDimension::Provider) => Dimension::Provider,
                _ => {
                    out.push(FieldViolation::new(
                        format!("group_by[{i}]"),
                        "must be TENANT, API_KEY, MODEL or PROVIDER",
                    ));
                    continue;
                }
            };
            if !group_by.contains(&dim) {
                group_by.push(dim);
            }
        }
        if !own_tenant.is_empty() && !r.tenant.is_empty() && r.tenant != own_tenant {
            out.push(FieldViolation::new(
                "tenant",
                "callers of a tenant can read only their own tenant's usage",
            ));
        }
        if !out.is_empty() {
            return Err(status(AiError::Invalid(out)));
        }
        let tenant = if own_tenant.is_empty() { r.tenant } else { own_tenant };
        let mut query = UsageQuery {
            start_ms,
            end_ms,
            tenant,
            api_key: r.api_key,
            model: r.model,
            provider: r.provider,
            group_by: Vec::new(),
        };
        let total = self.ai.usage(&query).await.map_err(status)?;
        let rows = if group_by.is_empty() {
            Vec::new()
        } else {
            query.group_by = group_by;
            self.ai.usage(&query).await.map_err(status)?
        };
        Ok(Response::new(pb::GetUsageResponse {
            rows: rows.iter().map(sum_pb).collect(),
            total: Some(total.first().map(sum_pb).unwrap_or_default()),
        }))
    }
}
